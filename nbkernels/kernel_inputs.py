"""The rows every backend receives, prepared once per call for every path (one call,
chunks of a bank, streamed chunks, other ranks' shards).

Per metric:

* ``"cosine"``: rows normalized to unit length (a row at infinity to its limit direction,
  the signs of its infinite entries); the kernels then score ``"dot"``, and the backward
  applies the normalization's Jacobian (:func:`input_grad`).
* ``"sqeuclidean"``: queries and references shifted by one common vector, the mean of the
  queries' finite rows (detached; the midpoint of their range where a row shifted by the
  mean would overflow its dtype). Distances do not change under translation, and the
  kernels' expansion ``||q||^2 - 2 q.r + ||r||^2`` then cancels nothing that matters for
  embeddings that share a large mean (ReLU features, unnormalized backbones): at an offset
  of 50 with a spread of 0.1, fp32 rows were off by 1.3 nats without it. The shift
  depends on the queries alone, so every chunk of the references gets the same one, as
  partial states that are merged must (``nbkernels.partials``). Its gradient is the
  identity (the vector is a constant of the call).
* ``"dot"``: unchanged.

The centring runs in the accumulation dtype and rounds each row once to its dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from nbkernels import _validation as check
from nbkernels._validation import acc_dtype, kernel_temperature  # noqa: F401 (re-exported)
from nbkernels.backends.infinity import at_infinity

_EPS = 1e-12  # as torch.nn.functional.normalize
# The metrics, once: each user metric and the kernel metric its prepared rows are scored
# with (a new metric that is a row transform is one entry here and one case below).
KERNEL_METRIC = {"sqeuclidean": "sqeuclidean", "cosine": "dot", "dot": "dot"}
METRICS = tuple(KERNEL_METRIC)              # what metric= takes
KERNEL_METRICS = ("sqeuclidean", "dot")      # what the launchers take


class Prep(NamedTuple):
    """How a call's rows are prepared: the user's metric, the kernels' metric, the centre
    (``"sqeuclidean"``, in the accumulation dtype) or None."""

    metric: str
    kmetric: str
    centre: torch.Tensor | None


def _limit_direction(x):
    """Rows at infinity become the signs of their infinite entries (their direction)."""
    far = at_infinity(x)[:, None]
    return torch.where(far, torch.where(torch.isinf(x), torch.sign(x), 0.0), x)


def normalize(x):
    """Unit rows in x's dtype (computed in the accumulation dtype)."""
    unit = torch.nn.functional.normalize(_limit_direction(x.to(acc_dtype(x.dtype))), dim=1,
                                         eps=_EPS)
    return unit.to(x.dtype)


def normalize_backward(x, grad):
    """Gradient through x / max(||x||, eps): (g - x_hat (x_hat . g)) / ||x||; 0 for rows at
    infinity (||x|| = inf). In the accumulation dtype."""
    acc = acc_dtype(x.dtype)
    x = x.to(acc)
    grad = grad.to(acc)
    norm = x.norm(dim=1, keepdim=True)
    x_hat = torch.nn.functional.normalize(_limit_direction(x), dim=1, eps=_EPS)
    radial = torch.where(norm > _EPS, (x_hat * grad).sum(1, keepdim=True), torch.zeros_like(norm))
    return (grad - x_hat * radial) / norm.clamp_min(_EPS)


def centre_of(q):
    """The mean of q's finite rows, detached, in the accumulation dtype (0 if none); where
    a row shifted by it would leave q's dtype (fp16 rows of +-6e4), the midpoint of
    their range in each dimension, by which no finite row can (on the device, no sync)."""
    acc, top = acc_dtype(q.dtype), torch.finfo(q.dtype).max
    q = q.detach().to(acc)
    finite = torch.isfinite(q).all(1, keepdim=True)
    total = torch.where(finite, q, 0.0).sum(0)
    mean = total / finite.sum().clamp_min(1).to(acc)
    if q.dtype == torch.float64 or not q.numel():
        return mean
    lo = torch.where(finite, q, top).amin(0)
    hi = torch.where(finite, q, -top).amax(0)
    mid = torch.where(lo <= hi, lo / 2 + hi / 2, 0.0)
    over = (torch.where(finite, q - mean, 0.0).abs() > top).any()
    return torch.where(over, mid, mean)


def _shifted(x, centre):
    # inf - c stays inf (a point at infinity), NaN stays NaN
    return (x.to(centre.dtype) - centre).to(x.dtype)


def prepare_queries(q, metric):
    """``(qk, prep)``: the kernel queries and what the references of the call need."""
    if metric == "cosine":
        return normalize(q), Prep(metric, "dot", None)
    if metric == "sqeuclidean":
        centre = centre_of(q)
        return _shifted(q, centre), Prep(metric, "sqeuclidean", centre)
    return q, Prep(metric, KERNEL_METRIC[metric], None)


def prepare_refs(r, prep):
    """The kernel rows of references ``r`` (all of them or one chunk) for ``prep``.

    Raises ``ValueError`` (asynchronously on an accelerator) where a finite reference
    shifted by the queries' centre leaves r's dtype (fp16 references 65504 or more from
    the queries' centre): it would count as a point at infinity."""
    if prep.metric == "cosine":
        return normalize(r)
    if prep.centre is not None:
        rk = _shifted(r, prep.centre)
        if rk.dtype != prep.centre.dtype and rk.numel():
            lost = torch.isinf(rk) & torch.isfinite(r)
            check.device_check(
                ~lost.any(), f"sqeuclidean references must lie within {r.dtype}'s range "
                f"(|x| <= {torch.finfo(r.dtype).max:.6g}) of the queries' centre (the mean "
                "of the queries, or the midpoint of their range), which their rows are "
                f"shifted by; pass {acc_dtype(r.dtype)} embeddings")
        return rk
    return r


def prepare(q, r, metric):
    """``(qk, rk, kernel metric)``; for the batch against itself (``r is q``) ``rk is qk``."""
    qk, prep = prepare_queries(q, metric)
    return qk, (qk if r is q else prepare_refs(r, prep)), prep.kmetric


def symmetric(q, r, q_labels, r_labels, offset):
    """The batch loss: the references are the queries themselves (``r is q``, one label
    vector), self excluded (``offset`` 0) or not (None). The logits are then symmetric up
    to a per-row shift, so one matrix product serves each pair of blocks and one kernel
    gives the whole gradient. Decided once per call (``autograd``, ``partials``) and
    passed to the lse launchers as their ``symmetric`` flag."""
    return q is r and q_labels is r_labels and (offset is None or offset == 0)


def symmetric_flag(flag, q, r, q_labels, r_labels, offset):
    """The lse launchers' ``symmetric`` argument, checked: True only where
    :func:`symmetric` holds (a launcher may then return the whole gradient as ``dq``)."""
    if flag and not symmetric(q, r, q_labels, r_labels, offset):
        why = ("r is not q" if q is not r else "r_labels is not q_labels"
               if q_labels is not r_labels else f"offset is {offset!r}")
        raise ValueError("symmetric=True needs the batch against itself: r is q, r_labels is "
                         f"q_labels and offset None or 0 (here {why})")
    return bool(flag)


def row_shift(qk, temperature, kmetric, shifted=True):
    """The per-query constant ||q||^2 / T that the fused backends' lse values leave out
    under "sqeuclidean" (``nbkernels.backends``: lse - row_shift is the true lse); 0 for
    "dot" or for a backend whose values are not ``shifted`` (the reference)."""
    if kmetric != "sqeuclidean" or not shifted:
        return 0.0
    acc = acc_dtype(qk.dtype)
    return qk.to(acc).pow(2).sum(1) / temperature


def input_grad(x, grad, metric):
    """The gradient w.r.t. the user's rows ``x`` from the one w.r.t. their kernel rows
    (None stays None): the normalization's Jacobian for "cosine", else the identity."""
    if grad is None or metric != "cosine":
        return grad
    return normalize_backward(x, grad)
