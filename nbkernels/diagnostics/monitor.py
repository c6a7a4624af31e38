"""``TrainingMonitor``: what to watch while a network trains.

Forward hooks collect activation statistics over every forward pass run with autograd
enabled since the previous :meth:`TrainingMonitor.record` (evaluation under
``torch.no_grad()`` is left out). ``record`` then reads the parameters and their
``.grad``, so call it after ``loss.backward()`` and before ``optimizer.zero_grad()``.

Definitions (all per record):

* parameter norm: ``sqrt(sum_p ||p||^2)`` over every parameter of the model;
* gradient norm of a layer: ``sqrt(sum ||g||^2)`` over the parameters the module owns
  directly (``recurse=False``), and its ``max |g|``; ``grad_norm`` is the total;
* dead ReLU fraction: the share of ``nn.ReLU``/``nn.ReLU6`` output units (every output
  element except the batch dimension) that were ``<= 0`` for *every* sample seen;
* saturation: the share of ``nn.Tanh`` outputs with ``|y| > threshold`` and of
  ``nn.Sigmoid`` outputs with ``|2y - 1| > threshold`` (``threshold=0.99``: ``y`` below
  0.005 or above 0.995);
* non-finite: the first place a NaN/inf showed up, checking in causal order the
  forward outputs (execution order, leaf modules), the loss, the gradients and the
  parameters (registration order of the layers).

Activations computed with ``torch.nn.functional`` calls instead of modules are not
seen by the hooks.
"""
from __future__ import annotations

import math
import numbers
import warnings
import weakref
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .chance import check_initial_loss

__all__ = ["StepRecord", "TrainingMonitor"]

_RELU = (nn.ReLU, nn.ReLU6)


@dataclass
class StepRecord:
    """The quantities of one logged step. Fractions are ``None`` when the model has
    no module of that kind; ``nonfinite`` is ``None`` when everything was finite."""

    step: int
    train_loss: float
    test_loss: float | None
    param_norm: float
    grad_norm: float
    layer_grad_norm: dict[str, float] = field(default_factory=dict)
    layer_grad_max: dict[str, float] = field(default_factory=dict)
    dead_relu: float | None = None
    layer_dead_relu: dict[str, float] = field(default_factory=dict)
    tanh_saturation: float | None = None
    sigmoid_saturation: float | None = None
    nonfinite: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class TrainingMonitor:
    """Record training-health quantities of ``model`` and diagnose common failures.

    Args:
        model: the ``nn.Module`` being trained. Hooks are added to its submodules;
            :meth:`close` (or leaving a ``with`` block) removes them, and so does the
            garbage collection of a monitor that was never closed (the hooks hold only a
            weak reference to the monitor: they do not keep it alive).
        chance: the loss an untrained model should give (see
            :func:`nbkernels.diagnostics.chance_level`). When given, the first
            recorded train loss is compared with it (warning when far), and
            :meth:`diagnose` reports a loss that stays at chance.
        saturation_threshold: see the module docstring. Default 0.99.
        warn: emit a ``RuntimeWarning`` as soon as a record finds non-finite values
            and when the first loss is far from chance. Default True.

    Example::

        monitor = TrainingMonitor(model, chance=math.log(10))
        loss.backward(); monitor.record(step, loss, test_loss); optimizer.step()
        print(monitor.diagnose())
    """

    def __init__(self, model: nn.Module, *, chance: float | None = None,
                 saturation_threshold: float = 0.99, warn: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not 0.0 < saturation_threshold < 1.0:
            raise ValueError(f"saturation_threshold must be in (0, 1), got {saturation_threshold}")
        self.model = model
        self.chance = chance
        self.saturation_threshold = saturation_threshold
        self.warn = warn
        self.history: list[StepRecord] = []
        self.chance_check = None
        self._warned_nonfinite = False
        # Layers that own parameters, in registration order, named for reports.
        self._layers = [(_display(name), m) for name, m in model.named_modules()
                        if any(True for _ in m.parameters(recurse=False))]
        self._handles = []
        self._reset_stats()
        ref = weakref.ref(self)
        for name, module in model.named_modules():
            if not any(True for _ in module.children()):
                self._handles.append(module.register_forward_hook(_hook(ref, _display(name))))
        # Removes the hooks once, on close() or when the monitor is collected unclosed.
        # It holds the handles only (which hold the hooks dicts weakly), not the monitor.
        self._finalizer = weakref.finalize(self, _remove_hooks, self._handles)

    # -- hooks -------------------------------------------------------------------------

    def _reset_stats(self) -> None:
        self._alive: dict[str, torch.Tensor] = {}  # per ReLU: unit ever > 0
        self._sat = {"tanh": [0, 0], "sigmoid": [0, 0]}  # [saturated count tensor, total]
        # per layer, in first-execution order: were all its outputs finite? (bounded memory)
        self._finite: dict[str, torch.Tensor] = {}

    def _observe(self, name: str, mod: nn.Module, output) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return
        out = output.detach()
        # A 0-dim tensor stays on the device: no sync in the training loop.
        finite = torch.isfinite(out).all()
        prev = self._finite.get(name)
        self._finite[name] = finite if prev is None else prev & finite
        if isinstance(mod, _RELU) and out.dim() >= 1:
            alive = (out > 0).reshape(out.shape[0], -1).any(0)
            prev = self._alive.get(name)
            self._alive[name] = alive if prev is None or prev.shape != alive.shape else prev | alive
        elif isinstance(mod, nn.Tanh):
            self._count_saturated("tanh", out.abs())
        elif isinstance(mod, nn.Sigmoid):
            self._count_saturated("sigmoid", (2 * out - 1).abs())

    def _count_saturated(self, kind: str, magnitude: torch.Tensor) -> None:
        stat = self._sat[kind]
        stat[0] = stat[0] + (magnitude > self.saturation_threshold).sum()
        stat[1] += magnitude.numel()

    # -- recording ---------------------------------------------------------------------

    def record(self, step: int, train_loss, test_loss=None) -> StepRecord:
        """Log one step; call after ``backward()`` and before the optimizer zeroes the grads.

        Args:
            step: the step number (any int; used on the x axis of plots).
            train_loss: the training loss: a Python (or NumPy) real number, or a tensor
                holding one value (0-dim, or any shape with one element such as ``(1,)``);
                a tensor is read once here.
            test_loss: optional held-out loss: None, or as ``train_loss``.

        Raises:
            TypeError: a loss is not a number or a tensor (or ``train_loss`` is None).
            ValueError: a loss tensor holds more or fewer than one value.

        Returns:
            The new :class:`StepRecord`, also appended to ``history``.
        """
        _check_loss("train_loss", train_loss)
        if test_loss is not None:
            _check_loss("test_loss", test_loss)
        params = [p for p in self.model.parameters()]
        device = params[0].device if params else torch.device("cpu")
        # Gather every scalar into one tensor so that a GPU run syncs once per record.
        values = [torch.as_tensor(train_loss, dtype=torch.float64, device=device).detach().reshape(())]
        values.append(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params))
                      if params else torch.zeros((), dtype=torch.float64, device=device))
        grad_names = []
        for name, layer in self._layers:
            grads = [p.grad.detach().double() for p in layer.parameters(recurse=False) if p.grad is not None]
            if grads:
                grad_names.append(name)
                values.append(torch.sqrt(sum((g ** 2).sum() for g in grads)))
                values.append(torch.stack([g.abs().amax() if g.numel() else g.new_zeros(()) for g in grads]).max())
        relu_names = list(self._alive)
        values += [(~self._alive[n]).double().mean() for n in relu_names]
        values += [(~self._alive[n]).double().sum() for n in relu_names]
        values += [torch.as_tensor(self._sat[k][0], dtype=torch.float64, device=device) for k in ("tanh", "sigmoid")]
        values += [finite.to(device, torch.float64) for finite in self._finite.values()]
        flat = torch.stack([v.to(device) for v in values]).tolist()

        loss, param_norm = flat[0], flat[1]
        pos = 2
        layer_norm, layer_max = {}, {}
        for name in grad_names:
            layer_norm[name], layer_max[name] = flat[pos], flat[pos + 1]
            pos += 2
        dead = dict(zip(relu_names, flat[pos:pos + len(relu_names)]))
        pos += len(relu_names)
        dead_units = sum(flat[pos:pos + len(relu_names)])
        pos += len(relu_names)
        sat_counts = flat[pos:pos + 2]
        pos += 2
        finite_flags = flat[pos:]
        total_units = sum(self._alive[n].numel() for n in relu_names)
        sat = [c / self._sat[k][1] if self._sat[k][1] else None for c, k in zip(sat_counts, ("tanh", "sigmoid"))]

        rec = StepRecord(
            step=int(step), train_loss=loss,
            test_loss=None if test_loss is None else _as_float(test_loss),
            param_norm=param_norm,
            grad_norm=math.sqrt(sum(v * v for v in layer_norm.values())),
            layer_grad_norm=layer_norm, layer_grad_max=layer_max,
            dead_relu=dead_units / total_units if total_units else None,
            layer_dead_relu=dead,
            tanh_saturation=sat[0], sigmoid_saturation=sat[1],
            nonfinite=self._find_nonfinite(loss, finite_flags, layer_norm, param_norm),
        )
        self._reset_stats()
        self.history.append(rec)
        self._warn_on(rec)
        return rec

    def _find_nonfinite(self, loss: float, finite_flags: list[float], layer_norm: dict[str, float],
                        param_norm: float) -> str | None:
        for name, ok in zip(self._finite, finite_flags):
            if ok < 1.0:
                return f"forward output of layer '{name}'"
        if not math.isfinite(loss):
            return "loss (every layer output was finite: check the loss inputs and its temperature)"
        for name, norm in layer_norm.items():
            if not math.isfinite(norm):
                return f"gradient of layer '{name}'"
        for name, layer in self._layers if not math.isfinite(param_norm) else ():
            if not all(bool(torch.isfinite(p).all()) for p in layer.parameters(recurse=False)):
                return f"parameters of layer '{name}'"
        return None

    def _warn_on(self, rec: StepRecord) -> None:
        if len(self.history) == 1 and self.chance is not None:
            self.chance_check = check_initial_loss(rec.train_loss, self.chance, name="train loss",
                                                   warn=self.warn)
        if rec.nonfinite and self.warn and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(f"non-finite values at step {rec.step}, first in the {rec.nonfinite}; "
                          "the learning rate is likely too high, or the inputs contain NaN/inf",
                          RuntimeWarning, stacklevel=3)

    # -- reading -----------------------------------------------------------------------

    def series(self, name: str) -> list:
        """One field of every record, e.g. ``monitor.series("train_loss")``."""
        if name not in StepRecord.__dataclass_fields__:
            raise ValueError(f"name must be a StepRecord field ({', '.join(StepRecord.__dataclass_fields__)}), "
                             f"got {name!r}")
        return [getattr(r, name) for r in self.history]

    def diagnose(self, *, min_records: int = 5) -> list[str]:
        """Findings about the training so far, as sentences; an empty list means healthy.

        Checks: non-finite values (naming the first layer), a first loss far from
        chance, a train loss that does not decrease or stays at chance, a parameter
        norm that grows more than tenfold, vanishing gradients, more than half the
        ReLU units dead, more than half the tanh/sigmoid outputs saturated, and a test
        loss rising well above its minimum while the train loss falls. Trend checks
        need at least ``min_records`` records.
        """
        h = self.history
        if not h:
            return []
        found = []
        bad = next((r for r in h if r.nonfinite), None)
        if bad is not None:
            found.append(f"non-finite values from step {bad.step}, first in the {bad.nonfinite}: "
                         "lower the learning rate, clip gradients, or check the inputs for NaN/inf")
        if self.chance_check is not None and not self.chance_check.ok:
            found.append(self.chance_check.message)
        finite = [r for r in h if math.isfinite(r.train_loss)]
        if len(finite) >= min_records:
            first = finite[0].train_loss
            recent = _mean([r.train_loss for r in finite[-max(1, len(finite) // 5):]])
            if recent > 0.9 * first:
                found.append(f"train loss did not decrease (first {first:.4g}, recent {recent:.4g}): "
                             "check that labels match the inputs, the learning rate, and that the "
                             "optimizer holds the model's parameters")
            if self.chance is not None and abs(recent - self.chance) < 0.1 * max(self.chance, 1e-12):
                found.append(f"train loss is still at the chance level {self.chance:.4g} "
                             f"(recent {recent:.4g}): the model learns nothing; shuffled or wrongly "
                             "encoded labels give exactly this")
            test = [(r.test_loss, r.train_loss) for r in finite if r.test_loss is not None
                    and math.isfinite(r.test_loss)]
            if len(test) >= min_records:
                best = min(t for t, _ in test)
                if test[-1][0] > 1.2 * best + 1e-3 and test[-1][1] < first:
                    found.append(f"test loss rose from its minimum {best:.4g} to {test[-1][0]:.4g} while the "
                                 "train loss fell: overfitting; stop earlier or regularise")
        norms = [r.param_norm for r in h if math.isfinite(r.param_norm)]
        if len(h) >= 2 and (len(norms) < len(h) or (norms and norms[-1] > 10 * norms[0])):
            end = norms[-1] if len(norms) == len(h) else float("inf")
            found.append(f"parameter norm grew from {h[0].param_norm:.4g} to {end:.4g}: "
                         "the learning rate is likely too high")
        last = h[-1]
        if last.layer_grad_norm and math.isfinite(last.grad_norm) and last.grad_norm < 1e-8:
            found.append(f"gradients vanished (total norm {last.grad_norm:.3g} at step {last.step})")
        if last.dead_relu is not None and last.dead_relu > 0.5:
            worst = max(last.layer_dead_relu, key=last.layer_dead_relu.get)
            found.append(f"{last.dead_relu:.0%} of ReLU units are dead (worst: layer '{worst}', "
                         f"{last.layer_dead_relu[worst]:.0%}): lower the learning rate or check the init")
        for kind in ("tanh", "sigmoid"):
            frac = getattr(last, f"{kind}_saturation")
            if frac is not None and frac > 0.5:
                found.append(f"{frac:.0%} of {kind} outputs are saturated: inputs or weights are too large")
        return found

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Remove the hooks. The history stays readable."""
        self._finalizer()
        self._handles = []

    def __enter__(self) -> TrainingMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _hook(ref: weakref.ref, name: str):
    """A forward hook that feeds the monitor behind ``ref`` while it is alive."""
    def hook(mod, inputs, output):
        monitor = ref()
        if monitor is not None:
            monitor._observe(name, mod, output)
    return hook


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()


_LOSS_EXPECTED = ("a Python number or a tensor holding one value (shape (), (1,) or any "
                  "other shape with one element)")


def _check_loss(name: str, value) -> None:
    """``value`` is a real number, or a tensor / NumPy array holding one real value."""
    if isinstance(value, bool) or (value is not None and not isinstance(value, numbers.Real)
                                   and not isinstance(value, torch.Tensor)
                                   and hasattr(value, "__array__")):
        value = torch.as_tensor(value)  # a NumPy array: checked as a tensor
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be {_LOSS_EXPECTED}, got a tensor of shape "
                             f"{tuple(value.shape)} ({value.numel()} values): reduce it first, "
                             "e.g. loss.mean()")
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be {_LOSS_EXPECTED}, got a {value.dtype} tensor")
        return
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {_LOSS_EXPECTED}, got {type(value).__name__} {value!r}")


def _as_float(value) -> float:
    if isinstance(value, torch.Tensor) or hasattr(value, "__array__"):
        return float(torch.as_tensor(value).detach().reshape(()))
    return float(value)


def _display(name: str) -> str:
    return name or "model"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)
