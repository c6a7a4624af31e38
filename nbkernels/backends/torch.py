"""Blocked pure-PyTorch backend (``backend="torch"``): custom ops and launchers.

The algorithm itself (tiling, online log-sum-exp, backward math) lives in
:mod:`nbkernels.backends.torch_blocked`, where its docstring describes it; tile sizes
are set there too. This module wraps it in ``torch.library`` custom ops (with fake
implementations, for ``torch.compile``) and exposes the four launchers described in
:mod:`nbkernels.backends`.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from nbkernels._validation import acc_dtype
from nbkernels.backends.fake import fake_grads
from nbkernels.backends.infinity import finite_rows, silent_rows, undefined_rows
from nbkernels.backends.torch_blocked import (blocked_lse_backward, blocked_lse_forward,
                                              blocked_probs_backward, blocked_probs_forward)
from nbkernels.kernel_inputs import KERNEL_METRICS, symmetric_flag


# ------------------------------------------------------------------------ custom ops
# The launchers run as opaque ``torch.library.custom_op``s with fake implementations, so
# that the autograd Functions calling them trace under ``torch.compile(fullgraph=True)``
# (the tiling reads label ranges on the host). Custom ops take no ``None`` gradient and no
# tensor identity: ``symmetric`` says ``r is q`` (the batch loss), and gradients that are
# not produced come back empty. Autocast does not apply inside (accumulation stays fp32).


def _outside_autocast(fn):
    @functools.wraps(fn)
    def run(q, *args):
        with torch.autocast(q.device.type, enabled=False):
            return fn(q, *args)

    return run


METRICS = KERNEL_METRICS


def _inputs(q, r, q_labels, r_labels, metric, symmetric):
    if metric not in METRICS:  # cosine reaches the launchers as "dot" on normalized rows
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if symmetric:
        r, r_labels = q, q_labels
    q, r, q_far, r_far = finite_rows(q, r, metric)
    return q, r, q_labels, r_labels, q_far, r_far


@torch.library.custom_op("nbkernels::torch_lse_fwd", mutates_args=())
@_outside_autocast
def _lse_fwd_op(q: torch.Tensor, r: torch.Tensor, q_labels: torch.Tensor,
                r_labels: torch.Tensor, temperature: torch.Tensor, metric: str,
                offset: Optional[int], symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q, r, q_labels, r_labels, q_far, r_far = _inputs(q, r, q_labels, r_labels, metric, symmetric)
    lse_all, lse_pos = blocked_lse_forward(q, r, q_labels, r_labels, temperature, metric, offset,
                                           symmetric, r_far)
    return undefined_rows(lse_all, q_far), undefined_rows(lse_pos, q_far)


@_lse_fwd_op.register_fake
def _(q, r, q_labels, r_labels, temperature, metric, offset, symmetric):
    acc = acc_dtype(q.dtype)
    return q.new_empty(q.shape[0], dtype=acc), q.new_empty(q.shape[0], dtype=acc)


@torch.library.custom_op("nbkernels::torch_probs_fwd", mutates_args=())
@_outside_autocast
def _probs_fwd_op(q: torch.Tensor, r: torch.Tensor, r_labels: torch.Tensor,
                  temperature: torch.Tensor, num_classes: int, metric: str,
                  offset: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    q, r, _, r_labels, q_far, r_far = _inputs(q, r, None, r_labels, metric, False)
    yhat, lse_all = blocked_probs_forward(q, r, r_labels, temperature, num_classes, metric, offset,
                                          r_far)
    return undefined_rows(yhat, q_far), undefined_rows(lse_all, q_far)


@_probs_fwd_op.register_fake
def _(q, r, r_labels, temperature, num_classes, metric, offset):
    acc = acc_dtype(q.dtype)
    return q.new_empty(q.shape[0], num_classes, dtype=acc), q.new_empty(q.shape[0], dtype=acc)


def _grads_out(q, r, temperature, grads):
    """Custom ops return no None: an empty tensor stands for a gradient not computed."""
    empty = (q.new_empty(0), r.new_empty(0), temperature.new_empty(0))
    return tuple(e if g is None else g for g, e in zip(grads, empty))


@torch.library.custom_op("nbkernels::torch_lse_bwd", mutates_args=())
@_outside_autocast
def _lse_bwd_op(q: torch.Tensor, r: torch.Tensor, q_labels: torch.Tensor,
                r_labels: torch.Tensor, temperature: torch.Tensor, lse_all: torch.Tensor,
                lse_pos: torch.Tensor, g_all: torch.Tensor, g_pos: torch.Tensor, metric: str,
                offset: Optional[int], symmetric: bool, need_q: bool, need_r: bool,
                need_t: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q_in, r_in = q, r
    q, r, q_labels, r_labels, q_far, r_far = _inputs(q, r, q_labels, r_labels, metric, symmetric)
    lse_all, lse_pos, g_all, g_pos = silent_rows(q_far, lse_all, lse_pos, g_all, g_pos)
    grads = blocked_lse_backward(q, r, q_labels, r_labels, temperature, lse_all, lse_pos, g_all,
                                 g_pos, metric, offset, symmetric, r_far, need_q, need_r, need_t)
    dq = grads[0] if need_q or (symmetric and need_r) else None
    return _grads_out(q_in, r_in, temperature, (dq, grads[1], grads[2] if need_t else None))


@_lse_bwd_op.register_fake
def _(q, r, q_labels, r_labels, temperature, lse_all, lse_pos, g_all, g_pos, metric, offset,
      symmetric, need_q, need_r, need_t):
    return fake_grads(q, r, temperature, need_q, need_r, need_t, symmetric)


@torch.library.custom_op("nbkernels::torch_probs_bwd", mutates_args=())
@_outside_autocast
def _probs_bwd_op(q: torch.Tensor, r: torch.Tensor, r_labels: torch.Tensor,
                  temperature: torch.Tensor, yhat: torch.Tensor, lse_all: torch.Tensor,
                  g: torch.Tensor, metric: str, offset: Optional[int], need_q: bool,
                  need_r: bool, need_t: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q_in, r_in = q, r
    q, r, _, r_labels, q_far, r_far = _inputs(q, r, None, r_labels, metric, False)
    yhat, lse_all, g = silent_rows(q_far, yhat, lse_all, g)
    grads = blocked_probs_backward(q, r, r_labels, temperature, yhat, lse_all, g, metric, offset,
                                   r_far, need_q, need_r, need_t)
    return _grads_out(q_in, r_in, temperature, grads)


@_probs_bwd_op.register_fake
def _(q, r, r_labels, temperature, yhat, lse_all, g, metric, offset, need_q, need_r, need_t):
    return fake_grads(q, r, temperature, need_q, need_r, need_t)


# ------------------------------------------------------------------------- launchers


def lse_forward(q, r, q_labels, r_labels, temperature, *, metric, offset, symmetric=False):
    """Shifted ``(lse_all, lse_pos)``, each (N,) in the accumulation dtype."""
    sym = symmetric_flag(symmetric, q, r, q_labels, r_labels, offset)
    return torch.ops.nbkernels.torch_lse_fwd(q, r, q_labels, r_labels, temperature, metric,
                                             offset, sym)


def probs_forward(q, r, r_labels, temperature, num_classes, *, metric, offset):
    """``(yhat, lse_all)``: (N, num_classes) and shifted (N,), in the accumulation dtype."""
    return torch.ops.nbkernels.torch_probs_fwd(q, r, r_labels, temperature, int(num_classes),
                                               metric, offset)


def _none_unless(grads, need_q, need_r, need_t, sym=False):
    dq, dr, dt = grads
    return (dq if need_q or (sym and need_r) else None, dr if need_r and not sym else None,
            dt if need_t else None)


def lse_backward(q, r, q_labels, r_labels, temperature, lse_all, lse_pos, g_all, g_pos,
                 *, metric, offset, need_q, need_r, need_t, symmetric=False):
    """``(dq, dr, dt)`` of ``sum(g_all lse_all + g_pos lse_pos)``; None where not needed.
    ``symmetric`` (the batch loss): ``dq`` is the whole gradient and ``dr`` None."""
    sym = symmetric_flag(symmetric, q, r, q_labels, r_labels, offset)
    acc = acc_dtype(q.dtype)
    g_all = torch.zeros_like(lse_all, dtype=acc) if g_all is None else g_all
    g_pos = torch.zeros_like(lse_pos, dtype=acc) if g_pos is None else g_pos
    grads = torch.ops.nbkernels.torch_lse_bwd(q, r, q_labels, r_labels, temperature, lse_all,
                                              lse_pos, g_all, g_pos, metric, offset, sym,
                                              need_q, need_r, need_t)
    return _none_unless(grads, need_q, need_r, need_t, sym)


def probs_backward(q, r, r_labels, temperature, yhat, lse_all, g, *, metric, offset, need_q,
                   need_r, need_t):
    """``(dq, dr, dt)`` of ``sum(g yhat)``; None where not needed."""
    grads = torch.ops.nbkernels.torch_probs_bwd(q, r, r_labels, temperature, yhat, lse_all, g,
                                                metric, offset, need_q, need_r, need_t)
    return _none_unless(grads, need_q, need_r, need_t)
