"""Chance level: the loss an untrained model should give, and a check against it.

An untrained model spreads its probability evenly. For each loss that gives:

* ``"softmax"``: uniform over the ``K`` classes of the head, ``log K``.
* ``"nca"`` (``nca_loss``, batch soft-kNN): uniform over the neighbours. Query ``i``
  has ``n_pos_i`` same-label references among ``n_ref`` candidates, so its loss is
  ``-log(n_pos_i / n_ref)``, averaged over the valid queries (``n_pos_i > 0``). In a
  batch of ``n`` the query itself is excluded: ``n_ref = n - 1``. The same formula
  covers a ``NeighborCache`` (``ref_labels`` = the cache's labels, no exclusion).
* ``"prototype"``: uniform over the prototypes, ``log P``; with in-batch prototypes
  ``P`` is the number of classes present in the batch.

A first loss far from this usually means wrongly encoded data (labels that do not
match the inputs, unscaled inputs), a broken setup (loss on the wrong tensors) or a
badly scaled initialisation or temperature.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

__all__ = ["KINDS", "ChanceCheck", "chance_level", "check_initial_loss"]

KINDS = ("softmax", "nca", "prototype")


def chance_level(kind: str, labels, *, ref_labels=None, num_classes: int | None = None) -> float:
    """Expected loss of an untrained model, for one batch.

    Args:
        kind: ``"softmax"``, ``"nca"`` or ``"prototype"`` (see the module docstring).
        labels: (N,) integer labels of the batch's queries.
        ref_labels: ``"nca"`` only: (M,) labels of separate references (e.g. a cache).
            Default ``None``: the batch is its own reference set, self excluded.
        num_classes: ``"softmax"``: the head's class count ``K`` (default: the number
            of distinct labels in ``labels``, which underestimates ``K`` if a batch
            misses classes). ``"prototype"``: the number of prototypes (default: the
            classes present in ``labels``).

    Returns:
        The chance loss as a float (``reduction="mean"``).

    Raises:
        ValueError: unknown ``kind``, empty or non-1-D labels, ``num_classes < 1``, or an
            ``"nca"`` batch in which no query has a positive.
        TypeError: non-integer labels.

    Example::

        chance_level("nca", torch.tensor([0, 0, 1, 1]))      # -log(1/3) = 1.0986
        chance_level("softmax", y, num_classes=10)            # log(10)
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    labels = _labels("labels", labels)
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be an int >= 1 or None, got {num_classes!r}")
    if kind in ("softmax", "prototype"):
        k = num_classes if num_classes is not None else torch.unique(labels).numel()
        return math.log(k)
    if ref_labels is None:
        n_ref = labels.numel() - 1
        n_pos = (labels[:, None] == labels[None, :]).sum(1) - 1
    else:
        ref_labels = _labels("ref_labels", ref_labels)
        n_ref = ref_labels.numel()
        n_pos = (labels[:, None] == ref_labels[None, :]).sum(1)
    valid = n_pos > 0
    if not bool(valid.any()):
        raise ValueError("no query has a same-label reference, so the nca loss is undefined; "
                         "use a class-balanced batch (nbkernels.sampler.ClassBalancedBatchSampler)")
    return float(-torch.log(n_pos[valid].double() / n_ref).mean())


@dataclass
class ChanceCheck:
    """Outcome of :func:`check_initial_loss`. ``ok`` is False when the loss is far
    from ``chance``; ``message`` then says what is likely wrong."""

    loss: float
    chance: float
    ok: bool
    message: str


def check_initial_loss(loss, chance: float, *, rtol: float = 0.5, atol: float = 0.1,
                       name: str = "loss", warn: bool = True) -> ChanceCheck:
    """Compare the first training loss with the chance level and warn when it is far.

    "Far" means ``|loss - chance| > max(atol, rtol * chance)``. The default accepts a
    first loss within 50% of chance: default initialisations rarely land exactly on
    uniform, but a wrongly encoded dataset or a broken loss usually lands well outside.

    Args:
        loss: the first loss (float or 0-dim tensor).
        chance: from :func:`chance_level`.
        rtol, atol: the tolerance above.
        name: how the message refers to the loss.
        warn: emit ``warnings.warn(..., RuntimeWarning)`` when the check fails.

    Returns:
        A :class:`ChanceCheck`.
    """
    loss = float(loss)
    tol = max(atol, rtol * chance)
    if not math.isfinite(loss):
        ok, message = False, (f"first {name} is {loss}: the forward pass already produces non-finite "
                              "values; check the inputs for NaN/inf and the initial weight scale")
    elif loss > chance + tol:
        ok, message = False, (
            f"first {name} {loss:.4g} is far above the chance level {chance:.4g}: the untrained model "
            "is confidently wrong. Likely causes: labels that do not match the inputs (wrongly encoded "
            "data), unnormalised inputs or a too large initial weight scale, or a too small temperature.")
    elif loss < chance - tol:
        ok, message = False, (
            f"first {name} {loss:.4g} is far below the chance level {chance:.4g}: the model predicts the "
            "labels before any training. Likely causes: the labels leak into the inputs, the loss is "
            "computed on the wrong tensors, or the model was already trained. For a neighbor loss at a "
            "low temperature it can also mean that the inputs already separate the classes (an untrained "
            "network keeps that structure) or, with in-batch prototypes, that each query is part of its "
            "own class mean; check with a kNN on the raw inputs.")
    else:
        ok, message = True, f"first {name} {loss:.4g} is close to the chance level {chance:.4g}"
    if warn and not ok:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return ChanceCheck(loss=loss, chance=float(chance), ok=ok, message=message)


def _labels(name: str, labels) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(labels.shape)}")
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"{name} must have an integer dtype, got {labels.dtype}")
    return labels.detach().cpu()
