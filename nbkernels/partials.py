r"""Mergeable partial states: the one mechanism behind chunked, streamed and sharded references.

Split the references into chunks ``R_1, R_2, ...`` (slices of a bank, pieces streamed
from the host, or the shards of other ranks). For queries ``q_i`` (labels ``a_i``), the
state of chunk ``k`` (:class:`Partials`) is, per query::

    lse_all_i   = log sum_{j in R_k}          exp(s_ij)     (max + log of the sum)
    lse_pos_i   = log sum_{j in R_k, b_j=a_i} exp(s_ij)     (-inf when none)
    positives_i = #{j in R_k : b_j = a_i}                   (excluded pair left out)
    yhat_ic     = sum_{j in R_k, b_j=c} exp(s_ij - lse_all_i)   (class mass, optional)

with ``s_ij = sim(q_i, r_j) / T`` (see ``nbkernels.backends.reference``). Two states
combine exactly, in any order (:func:`merge`)::

    lse = M + log sum_k exp(lse_k - M),   M = max_k lse_k
    positives = sum_k positives_k,        yhat = sum_k yhat_k exp(lse_all_k - lse_all)

and a merged state finishes into the NCA loss row ``lse_all - lse_pos`` (0 without a
positive) or into ``yhat`` (:func:`finish_loss`, :func:`finish_yhat`).

The backward is exact and chunk by chunk (:func:`chunk_backward`): chunk ``k``'s
gradient is the single-shot gradient restricted to its columns, which needs only the
*final* merged normalizers, never another chunk::

    ds_ij = g_all_i exp(s_ij - lse_all_i) + g_pos_i [b_j = a_i] exp(s_ij - lse_pos_i)
    ds_ij = exp(s_ij - lse_all_i) (G_{i,b_j} - sum_c G_ic yhat_ic)        (for yhat)

lse values may leave out a per-query constant (the fused backends drop ``-||q_i||^2/T``
for "sqeuclidean"). Every chunk of one query drops the same constant, so merges, the
loss and yhat do not depend on it; only never mix states of two backends.

Example: queries ``q`` (N, D) against a bank (M, D) in chunks of ``c`` rows. For the
batch against itself pass ``offset=0, start=j`` (query i skips global reference i)::

    parts = [chunk_partials(q, bank[j:j + c], y, bank_y[j:j + c], T) for j in range(0, M, c)]
    final = merge(*parts)
    rows, valid = finish_loss(final)                      # (N,), (N,) bool
    g = torch.ones_like(rows)                             # upstream gradient of rows.sum()
    dq = sum(chunk_backward(q, bank[j:j + c], y, bank_y[j:j + c], T, final, g_loss=g,
                            need_r=False)[0] for j in range(0, M, c))
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from nbkernels._validation import acc_dtype

from nbkernels import _validation as check
from nbkernels import kernel_inputs
from nbkernels.backends.infinity import finite_or_zero
from nbkernels import backends
from nbkernels.autograd import is_empty

_NEG_INF = float("-inf")


class Partials(NamedTuple):
    """Per-query state of some references; all (N,) or (N, C), in the accumulation dtype.

    ``lse_pos`` and ``positives`` are None for a state computed without query labels,
    ``yhat`` is None for one computed without ``num_classes``.
    """

    lse_all: torch.Tensor
    lse_pos: torch.Tensor | None = None
    positives: torch.Tensor | None = None
    yhat: torch.Tensor | None = None


def positive_counts(q_labels, r_labels, offset=None):
    """Number of positives of each query, from the labels alone (no N x M work)."""
    if is_empty(r_labels.shape[0]):
        return torch.zeros(q_labels.shape[0], dtype=torch.long, device=q_labels.device)
    ordered = torch.sort(r_labels).values
    count = (torch.searchsorted(ordered, q_labels, right=True)
             - torch.searchsorted(ordered, q_labels, right=False))
    if offset is not None:
        j = torch.arange(q_labels.shape[0], device=q_labels.device) + offset
        inside = (j >= 0) & (j < r_labels.shape[0])
        same = r_labels[j.clamp(0, r_labels.shape[0] - 1)] == q_labels
        count = count - (inside & same).to(count.dtype)
    return count


def has_positive(lse_pos):
    """(N,) bool: the rows whose positives carry weight, i.e. ``lse_pos > -inf`` (NaN
    counts as one, so that it reaches the loss). A row whose only positives have logit
    -inf (references at infinity under "sqeuclidean", -inf dot products) has none: its
    loss is 0 and it does not count in the mean, as if those references were absent."""
    return lse_pos != _NEG_INF


def row_shift(mod, qk, temperature, kmetric):
    """The per-query constant that ``mod``'s lse values leave out (add it back: lse - shift)."""
    return kernel_inputs.row_shift(qk, temperature, kmetric, getattr(mod, "SHIFTED", True))


# ---------------------------------------------------------------- on kernel inputs
# ``qk``/``rk`` are what the launchers see: cosine rows already normalized, metric "dot".


def empty_partials(n, num_classes, with_loss, dtype, device):
    acc = acc_dtype(dtype)
    lse = torch.full((n,), _NEG_INF, dtype=acc, device=device)
    return Partials(
        lse,
        lse.clone() if with_loss else None,
        torch.zeros(n, dtype=torch.long, device=device) if with_loss else None,
        None if num_classes is None else torch.zeros(n, num_classes, dtype=acc, device=device))


def kernel_partials(mod, qk, rk, q_labels, r_labels, t, kmetric, offset, num_classes):
    """Partials of ``qk`` against one chunk; ``offset`` is local to the chunk."""
    with_loss = q_labels is not None
    if qk.shape[0] == 0 or rk.shape[0] == 0:
        return empty_partials(qk.shape[0], num_classes, with_loss, qk.dtype, qk.device)
    lse_all = lse_pos = positives = yhat = None
    if with_loss:
        lse_all, lse_pos = mod.lse_forward(
            qk, rk, q_labels, r_labels, t, metric=kmetric, offset=offset,
            symmetric=kernel_inputs.symmetric(qk, rk, q_labels, r_labels, offset))
        positives = positive_counts(q_labels, r_labels, offset)
    if num_classes is not None:
        yhat, lse_all = mod.probs_forward(qk, rk, r_labels, t, num_classes, metric=kmetric,
                                          offset=offset)
    return Partials(lse_all, lse_pos, positives, yhat)


def kernel_backward(mod, qk, rk, q_labels, r_labels, t, kmetric, offset, final,
                    g_all=None, g_pos=None, g_yhat=None, *, need_q, need_r, need_t):
    """(dq, dr, dt) of one chunk from the final merged state; ``offset`` local to the chunk."""
    if qk.shape[0] == 0 or rk.shape[0] == 0 or not (need_q or need_r or need_t):
        return None, None, None
    parts = []
    if g_all is not None or g_pos is not None:
        g_all = torch.zeros_like(final.lse_all) if g_all is None else g_all
        g_pos = torch.zeros_like(final.lse_pos) if g_pos is None else g_pos
        parts.append(mod.lse_backward(
            qk, rk, q_labels, r_labels, t, final.lse_all, final.lse_pos, g_all, g_pos,
            metric=kmetric, offset=offset, need_q=need_q, need_r=need_r, need_t=need_t,
            symmetric=kernel_inputs.symmetric(qk, rk, q_labels, r_labels, offset)))
    if g_yhat is not None:
        parts.append(mod.probs_backward(qk, rk, r_labels, t, final.yhat, final.lse_all, g_yhat,
                                        metric=kmetric, offset=offset,
                                        need_q=need_q, need_r=need_r, need_t=need_t))
    return tuple(add(*xs) for xs in zip(*parts)) if parts else (None, None, None)


def add(*xs):
    """Sum of the tensors among ``xs`` in their accumulation dtype; None if all are None."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    total = xs[0].to(acc_dtype(xs[0].dtype))
    for x in xs[1:]:
        total = total + x
    return total


def local_offset(offset, start):
    return None if offset is None else offset - start


# ---------------------------------------------------------------- the public API


def _check(q, r, q_labels, r_labels, temperature, metric, backend, offset, start,
           num_classes=None):
    """The arguments of the public functions; returns (temperature, backend, offset
    local to the chunk)."""
    check.embeddings("q", q)
    check.embeddings("r", r)
    check.same_dim("r", r, "q", q)
    if q_labels is not None:
        check.labels("q_labels", q_labels, q.shape[0], "q")
    check.labels("r_labels", r_labels, r.shape[0], "r")
    if num_classes is not None:
        check.label_range("r_labels", r_labels, check.num_classes(num_classes))
    check.choice("metric", metric, kernel_inputs.METRICS)
    start = check.integer("start", start, low=0)
    offset = None if offset is None else check.integer("offset", offset)
    t = check.temperature(temperature, q.device, check.acc_dtype(q.dtype))
    return t, backends.resolve(backend, q.device), local_offset(offset, start)


def chunk_partials(q, r, q_labels, r_labels, temperature, *, num_classes=None,
                   metric="sqeuclidean", offset=None, start=0, backend="torch"):
    """The state of queries ``q`` (N, D) against one chunk ``r`` (M_k, D) of references.

    Args:
        q_labels: (N,) int64, or None for a state without the loss terms.
        r_labels: (M_k,) int64 labels of the chunk.
        temperature: float or 0-dim tensor on q's device.
        num_classes: C to also compute the class mass ``yhat`` (N, C), else None.
        offset: None, or the *global* self-exclusion offset: query i skips reference
            ``i + offset`` of the whole set. start: global index of ``r``'s first row.
        metric, backend: as in ``nbkernels.nca_loss``; the chunks of one state must
            share the backend.

    Returns :class:`Partials`. No autograd: see :func:`chunk_backward`.
    """
    t, backend, offset = _check(q, r, q_labels, r_labels, temperature, metric, backend, offset,
                                start, num_classes)
    # the centre of "sqeuclidean" comes from q: every chunk of one state gets the same
    qk, rk, kmetric = kernel_inputs.prepare(q, r, metric)
    mod = backends.get(backend, qk.device, qk.dtype)
    return kernel_partials(mod, qk, rk, q_labels, r_labels, t, kmetric, offset,
                           None if num_classes is None else int(num_classes))


def merge(*parts):
    """Merge states of the same queries over disjoint references (exact, any order)."""
    if not parts:
        raise ValueError("merge needs at least one Partials")
    if len(parts) == 1:
        return parts[0]
    lse_all = torch.stack([p.lse_all for p in parts])  # [K, N]
    m_all = finite_or_zero(lse_all.amax(0))
    w = torch.exp(lse_all - m_all)  # the running-max rescale of each state's sum
    total = w.sum(0)
    fields = [m_all + torch.log(total), None, None, None]
    if all(p.lse_pos is not None for p in parts):
        fields[1] = _logsumexp(torch.stack([p.lse_pos for p in parts]))
        fields[2] = sum(p.positives for p in parts)
    if all(p.yhat is not None for p in parts):
        # yhat = sum_k yhat_k exp(lse_k - lse); a state without terms (w = 0) adds nothing
        mass = sum(torch.where(wk[:, None] == 0, 0.0, wk[:, None] * p.yhat)
                   for wk, p in zip(w, parts))
        fields[3] = mass / total[:, None]
    return Partials(*fields)


def _logsumexp(x):
    m = finite_or_zero(x.amax(0))
    return m + torch.log(torch.exp(x - m).sum(0))


def finish_loss(part):
    """``(rows, valid)``: the NCA loss rows (N,) of a merged state, 0 on rows without a
    positive (NaN kept), and the (N,) bool mask of rows with a positive."""
    valid = has_positive(part.lse_pos)
    zero_or_nan = torch.where(torch.isnan(part.lse_all), part.lse_all,
                              torch.zeros_like(part.lse_all))
    return torch.where(valid, part.lse_all - part.lse_pos, zero_or_nan), valid


def finish_yhat(part):
    """The class distribution (N, C) of a merged state."""
    return part.yhat


def chunk_backward(q, r, q_labels, r_labels, temperature, final, *, g_loss=None, g_yhat=None,
                   metric="sqeuclidean", offset=None, start=0, backend="torch",
                   need_q=True, need_r=True, need_t=False):
    """Chunk ``r``'s share of the gradient, from the *final* merged state ``final``.

    Args:
        g_loss: (N,) upstream gradient of ``finish_loss(final)[0]``, or None.
        g_yhat: (N, C) upstream gradient of ``finish_yhat(final)``, or None.
        Others as in :func:`chunk_partials`, with the same values as there.

    Returns ``(dq, dr, dt)``: dq (N, D) and dt in the accumulation dtype (sum them over
    the chunks), dr (M_k, D) in r's dtype; None where not asked for.
    """
    t, backend, offset = _check(q, r, q_labels, r_labels, temperature, metric, backend, offset,
                                start)
    # the centre of "sqeuclidean" comes from q: every chunk of one state gets the same
    qk, rk, kmetric = kernel_inputs.prepare(q, r, metric)
    g_all = g_pos = None
    if g_loss is not None:
        g_all = torch.where(has_positive(final.lse_pos), g_loss.to(final.lse_all.dtype), 0.0)
        g_pos = -g_all  # loss = lse_all - lse_pos
    mod = backends.get(backend, qk.device, qk.dtype)
    dq, dr, dt = kernel_backward(mod, qk, rk, q_labels, r_labels, t, kmetric, offset, final,
                                 g_all, g_pos, g_yhat,
                                 need_q=need_q, need_r=need_r, need_t=need_t)
    dq = kernel_inputs.input_grad(q, dq, metric)
    dr = kernel_inputs.input_grad(r, dr, metric)
    return dq, None if dr is None else dr.to(r.dtype), dt
