"""Exact losses over several processes, on torch.distributed (NCCL on GPUs, Gloo on CPU).

Two patterns, both exact (see the README section "Several devices"):

* **Gathered batch** (``nca_loss(..., distributed=True)``, ``prototype_loss``): every
  rank's local batch is gathered *with* gradient (:func:`gather_rows`, local sizes may
  differ); each rank scores its local queries against the global batch, skipping its
  own rows through its global offset. The returned value is the global loss on every
  rank (:func:`global_sum`), and its gradient w.r.t. the local part is ``world_size``
  times the single-process one, which DDP's averaging turns into single-process
  parameter gradients.
* **Sharded references** (``NeighborCache(..., distributed=True)``, :class:`ShardedLSE`,
  :class:`ShardedProbs`): the queries of every rank are gathered, each rank computes
  their partial states against its own shard, and :func:`merge_across_ranks` combines
  the states (an all-reduce MAX of the maxima, then one all-reduce SUM of the rescaled
  sums, positive counts and class mass). The backward runs on each shard with the final
  normalizers and reduce-scatters the query gradients back to their owners.

Every collective is called in the same order on every rank: call these functions (and
backward through their results) on all ranks of the group, as DDP training does.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from nbkernels import backends
from nbkernels import kernel_inputs as K
from nbkernels import partials as P
from nbkernels import streaming as S
from nbkernels.autograd import caller_dt, fused_backward, kernel_t


def _describe(ctx):
    return f"the sharded cache path (backend={ctx.spec.backend!r})", " on an unsharded NeighborCache"


def require(group=None):
    """``(rank, world_size)`` in ``group``; RuntimeError without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up its environment), "
            "or pass distributed=False")
    return dist.get_rank(group), dist.get_world_size(group)


def gather_sizes(n, device, group=None):
    """The local row counts of every rank, as a list of ints (one small all_gather)."""
    world = dist.get_world_size(group)
    mine = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in torch.cat(sizes).tolist()]


def _pad(x, rows):
    if x.shape[0] == rows:
        return x.contiguous()
    return torch.cat([x, x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))])


def _all_gather_padded(x, sizes, group):
    """Concatenation over ranks of tensors with ``sizes[k]`` rows (padded to the largest)."""
    rows = max(sizes)
    padded = _pad(x, rows)
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


def _reduce_scatter_padded(x, sizes, group):
    """This rank's rows of the sum over ranks of ``x`` (rows laid out as ``sizes``)."""
    rank, rows = dist.get_rank(group), max(sizes)
    pieces = [_pad(piece, rows) for piece in torch.split(x, sizes)]
    out = torch.empty_like(pieces[0])
    dist.reduce_scatter(out, pieces, group=group)
    return out[:sizes[rank]]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _all_gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, g):
        # every rank's copy of the gathered rows fed its own loss: the sum reaches the owner
        return _reduce_scatter_padded(g.contiguous(), ctx.sizes, ctx.group), None, None


def gather_rows(x, group=None, sizes=None):
    """``cat`` over ranks of each rank's ``x`` (n_k, ...), n_k free; differentiable.

    The backward sends every rank's gradient of the gathered rows to their owner
    (a reduce-scatter). ``sizes`` (from :func:`gather_sizes`) saves one collective.
    """
    sizes = gather_sizes(x.shape[0], x.device, group) if sizes is None else sizes
    if x.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(x, sizes, group)
    return _all_gather_padded(x, sizes, group)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        # y = sum_k x_k on every rank, each feeding its own loss: dx = sum over ranks of dy
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def all_reduce_sum(x, group=None):
    """The sum over ranks of ``x`` on every rank, differentiable (the backward all-reduces)."""
    return _AllReduceSum.apply(x, group)


class _GlobalSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts).sum(0)  # rank order: the same bits on every rank

    @staticmethod
    def backward(ctx, g):
        # DDP convention: every rank back-propagates the same g; the all-reduce of the
        # upstream gradients would give world * g, so no collective is needed
        return g * ctx.world, None


def global_sum(x, group=None):
    """The sum over ranks of ``x`` (summed in rank order, so bitwise equal on every rank).

    Its gradient w.r.t. the local ``x`` is ``world_size * g``: the gradient of the global
    sum when every rank back-propagates the same ``g`` (as every rank does with the same
    loss value); DDP's averaging over ranks then restores ``g``.
    """
    return _GlobalSum.apply(x, group)


# ---------------------------------------------------------------- the sharded references


def merge_across_ranks(part, group=None):
    """Merge the :class:`~nbkernels.partials.Partials` that every rank holds for the same
    queries over its own references: the state of the union of the shards.

    Two all-reduces: MAX of the per-row maxima (lse_all, lse_pos), then SUM of
    ``[exp(lse_all - M), exp(lse_pos - M+), positives, yhat * exp(lse_all - M)]``.
    """
    with_loss, with_yhat = part.lse_pos is not None, part.yhat is not None
    lse = torch.stack([part.lse_all, part.lse_pos]) if with_loss else part.lse_all[None]
    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    w = torch.exp(lse - m)  # [1 or 2, N]
    cols = [w.T]
    if with_loss:
        cols.append(part.positives.to(w.dtype)[:, None])
    if with_yhat:
        cols.append(torch.where(w[0][:, None] == 0, 0.0, w[0][:, None] * part.yhat))
    packed = torch.cat(cols, 1)  # [N, 1 or 2 (+1) (+C)]
    dist.all_reduce(packed, group=group)
    total = packed[:, :w.shape[0]].T
    lse = m + torch.log(total)
    return P.Partials(
        lse[0],
        lse[1] if with_loss else None,
        packed[:, 2].round().long() if with_loss else None,
        packed[:, -part.yhat.shape[1]:] / total[0][:, None] if with_yhat else None)


def _sharded_forward(ctx, q, r, q_labels, r_labels, t, spec, group):
    """Gather the queries, merge their states over every rank's shard ``r``; own rows out."""
    rank, _ = require(group)
    t = kernel_t(ctx, t, K.acc_dtype(q.dtype))
    sizes = gather_sizes(q.shape[0], q.device, group)
    q_all = _all_gather_padded(q, sizes, group)
    labels_all = None if q_labels is None else _all_gather_padded(q_labels, sizes, group)
    mod = backends.get(spec.backend, q.device, q.dtype)
    # the same centre on every rank (the gathered queries'): states merge across ranks
    qk, prep = K.prepare_queries(q_all, spec.metric)
    part = S.forward_chunks(mod, qk, labels_all, r, r_labels, t, prep, spec, q.dtype)
    final = merge_across_ranks(part, group)
    lo = sum(sizes[:rank])
    own = slice(lo, lo + q.shape[0])
    ctx.sizes, ctx.group, ctx.spec, ctx.prep, ctx.own = sizes, group, spec, prep, own
    fields = [f for f in final if f is not None]
    ctx.save_for_backward(q_all, qk, labels_all, r, r_labels, t, *fields)
    return final, own, mod, qk


def _sharded_backward(ctx, g_all, g_pos, g_yhat, need_q, need_t):
    """This rank's (dq, dT): every rank's upstream rows are gathered, each shard gives its
    share of every row's gradient (final normalizers), the owners receive the sums."""
    q_all, qk, labels_all, r, r_labels, t, *fields = ctx.saved_tensors
    if labels_all is not None:
        final = P.Partials(*fields)
    else:
        final = P.Partials(fields[0], yhat=fields[1])
    sizes, group, acc = ctx.sizes, ctx.group, fields[0].dtype
    # (rows, width): a rank with no rows too (reshape(0, -1) is ambiguous)
    own = [g.to(acc).unsqueeze(1) if g.dim() == 1 else g.to(acc)
           for g in (g_all, g_pos, g_yhat) if g is not None]
    full = torch.split(_all_gather_padded(torch.cat(own, 1), sizes, group),
                       [g.shape[1] for g in own], 1)
    if g_yhat is None:
        g_all, g_pos, g_yhat = full[0][:, 0], full[1][:, 0], None
    else:
        g_all, g_pos, g_yhat = None, None, full[0]
    # with a tensor temperature, one block of rows per rank: dT of each rank's own loss
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    blocks = [slice(lo, lo + n) for lo, n in zip(starts, sizes)] if need_t else [slice(None)]
    dq = torch.zeros_like(qk, dtype=acc)
    dts = []
    mod = backends.get(ctx.spec.backend, qk.device, q_all.dtype)
    for rows in blocks:
        def pick(x, rows=rows):
            return None if x is None else x[rows]

        dq_b, _, dt_b = S.backward_chunks(
            mod, qk[rows], pick(labels_all), r, r_labels, t,
            ctx.prep, ctx.spec, q_all.dtype, P.Partials(*[pick(f) for f in final]),
            pick(g_all), pick(g_pos), pick(g_yhat), need_q, False, need_t)
        if dq_b is not None:
            dq[rows] += dq_b
        dts.append(torch.zeros((), dtype=acc, device=qk.device) if dt_b is None else dt_b)
    dq_own = None
    if need_q:
        dq_own = _reduce_scatter_padded(S.query_grad(q_all, dq, ctx.spec.metric), sizes, group)
    dt = None
    if need_t:
        per_rank = torch.stack(dts)
        dist.all_reduce(per_rank, group=group)
        dt = caller_dt(ctx, per_rank[dist.get_rank(group)])
    return dq_own, dt


class ShardedLSE(torch.autograd.Function):
    """``(lse_all, lse_pos, positives) = ShardedLSE.apply(q, r, q_labels, r_labels, T, spec,
    group)``.

    Local queries ``q`` (n_rank, D) against the union over ranks of the shards ``r``
    (each rank passes its own; it may sit on the CPU). Values as ``NeighborLSE`` on the
    union; gradients reach ``q`` and a tensor temperature (not the shards).
    """

    @staticmethod
    def forward(ctx, q, r, q_labels, r_labels, temperature, spec, group):
        final, own, mod, qk = _sharded_forward(ctx, q, r, q_labels, r_labels, temperature,
                                               spec._replace(num_classes=None), group)
        positives = final.positives[own]
        ctx.mark_non_differentiable(positives)
        shift = P.row_shift(mod, qk[own], temperature, ctx.prep.kmetric)
        return final.lse_all[own] - shift, final.lse_pos[own] - shift, positives

    @staticmethod
    @fused_backward(_describe)
    def backward(ctx, g_all, g_pos, _):
        need_q, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        lse = ctx.saved_tensors[6]
        n = ctx.own.stop - ctx.own.start
        g_all = lse.new_zeros(n) if g_all is None else g_all
        g_pos = lse.new_zeros(n) if g_pos is None else g_pos
        dq, dt = _sharded_backward(ctx, g_all, g_pos, None, need_q, need_t)
        return dq, None, None, None, dt, None, None


class ShardedProbs(torch.autograd.Function):
    """``yhat = ShardedProbs.apply(q, r, r_labels, T, spec, group)``: ``ClassProbs`` of the
    local queries against the union of the shards (``spec.num_classes`` set)."""

    @staticmethod
    def forward(ctx, q, r, r_labels, temperature, spec, group):
        final, own, _, _ = _sharded_forward(ctx, q, r, None, r_labels, temperature, spec, group)
        return final.yhat[own].clone()

    @staticmethod
    @fused_backward(_describe)
    def backward(ctx, g):
        need_q, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        dq, dt = _sharded_backward(ctx, None, None, g, need_q, need_t)
        return dq, None, None, dt, None, None
