"""``nn.Module`` wrappers of the neighbor losses."""
from __future__ import annotations

import math

import torch
from torch import nn

from nbkernels import _validation as check
from nbkernels import kernel_inputs
from nbkernels import backends
from nbkernels import functional as F


class _NeighborLossModule(nn.Module):
    def _init_options(self, temperature, metric, reduction, backend, learn_temperature,
                      scale_out):
        # chunk_size, distributed, group: see nca_loss; checked here, the process group
        # in forward (a module may be built before it)
        F._scale_types(scale_out.get("chunk_size"), scale_out["distributed"], scale_out["group"])
        self.scale_out = scale_out
        # a bool, NumPy's too (a comparison of NumPy scalars gives one)
        if not isinstance(learn_temperature, bool) and type(learn_temperature).__name__ not in (
                "bool", "bool_"):
            raise TypeError(f"learn_temperature must be a bool, got "
                            f"{type(learn_temperature).__name__}")
        check.choice("metric", metric, kernel_inputs.METRICS)
        check.choice("reduction", reduction, check.REDUCTIONS)
        check.choice("backend", backend, backends.CHOICES)
        self.metric, self.reduction, self.backend = metric, reduction, backend
        # the inputs' dtype is not known yet: checked against fp64 here, and against the
        # inputs' accumulation dtype in forward
        check.temperature(temperature, torch.device("cpu"))
        if learn_temperature:
            # log-parametrized: T = exp(log_temperature) stays > 0 under any update. Held in
            # fp64, so that T is exact for fp64 inputs (one scalar: no cost elsewhere)
            self.log_temperature = nn.Parameter(
                torch.tensor(math.log(float(temperature)), dtype=torch.float64))
        else:
            self._temperature = float(temperature)

    @property
    def temperature(self):
        if hasattr(self, "log_temperature"):
            return self.log_temperature.exp()
        return self._temperature

    def _t(self, device):
        t = self.temperature
        return t.to(device) if isinstance(t, torch.Tensor) else t

    def _temperature_repr(self):
        if hasattr(self, "log_temperature"):
            return f"temperature={self.log_temperature.detach().exp().item():.6g} (learned)"
        return f"temperature={self._temperature}"


class NCALoss(_NeighborLossModule):
    """Module form of :func:`nbkernels.nca_loss`.

    Args:
        temperature: initial T (float > 0). metric, reduction, backend: as in ``nca_loss``.
        learn_temperature: hold T as a parameter ``log_temperature`` (T = exp of it).

    Example::

        criterion = nbkernels.NCALoss(temperature=0.1, learn_temperature=True)
        loss = criterion(model(x), y)
    """

    def __init__(self, temperature=0.1, *, metric="sqeuclidean", reduction="mean",
                 backend="auto", learn_temperature=False, chunk_size=None, distributed=False,
                 group=None):
        super().__init__()
        self._init_options(temperature, metric, reduction, backend, learn_temperature,
                           dict(chunk_size=chunk_size, distributed=distributed, group=group))

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        return F.nca_loss(embeddings, labels, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                          temperature=self._t(embeddings.device), metric=self.metric,
                          reduction=self.reduction, backend=self.backend, **self.scale_out)

    def extra_repr(self):
        return f"temperature={self.temperature}, metric={self.metric!r}, reduction={self.reduction!r}"


class PrototypeLoss(_NeighborLossModule):
    """Module form of :func:`nbkernels.prototype_loss`.

    With ``num_classes`` and ``dim`` it owns learned prototypes (ProxyNCA), a
    ``(num_classes, dim)`` parameter; otherwise it uses the class means of each batch,
    or the prototypes passed to ``forward``.

    Example::

        criterion = nbkernels.PrototypeLoss(num_classes=10, dim=64, metric="cosine")
        loss = criterion(model(x), y)
    """

    def __init__(self, temperature=0.1, *, metric="sqeuclidean", reduction="mean",
                 backend="auto", learn_temperature=False, num_classes=None, dim=None,
                 distributed=False, group=None):
        super().__init__()
        self._init_options(temperature, metric, reduction, backend, learn_temperature,
                           dict(distributed=distributed, group=group))
        if (num_classes is None) != (dim is None):
            raise ValueError("num_classes and dim go together: pass both to learn prototypes, "
                             f"or neither; got num_classes={num_classes}, dim={dim}")
        self.prototypes = None
        if num_classes is not None:
            num_classes = check.num_classes(num_classes)
            dim = check.integer("dim", dim, low=1)
            self.prototypes = nn.Parameter(torch.randn(num_classes, dim) / math.sqrt(dim))

    def forward(self, embeddings, labels, prototypes=None, prototype_labels=None):
        if prototypes is None and prototype_labels is None:
            prototypes = self.prototypes
        return F.prototype_loss(embeddings, labels, prototypes=prototypes,
                                prototype_labels=prototype_labels,
                                temperature=self._t(embeddings.device), metric=self.metric,
                                reduction=self.reduction, backend=self.backend, **self.scale_out)

    def extra_repr(self):
        parts = []
        if self.prototypes is not None:
            num_classes, dim = self.prototypes.shape
            parts += [f"num_classes={num_classes}", f"dim={dim}"]
        parts += [self._temperature_repr(), f"metric={self.metric!r}",
                  f"reduction={self.reduction!r}", f"backend={self.backend!r}"]
        return ", ".join(parts)
