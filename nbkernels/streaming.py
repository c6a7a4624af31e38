"""References in chunks: banks larger than device memory, streamed from the host.

:func:`iter_chunks` hands out a bank chunk by chunk on the queries' device. A bank on the
same device is sliced (no copy). A bank on the CPU while the queries are on a GPU is
copied chunk by chunk on a side CUDA stream, the copy of chunk k+1 running while the
kernels work on chunk k; at most two chunks are on the device at once, so
``chunk_size`` bounds the device memory: about ``2 * chunk_size * D`` elements plus
the kernels' O(N) state. Pin the bank (``bank.pin_memory()``) so that the copies are
truly asynchronous; an unpinned bank still gives the same result, with copies that
do not overlap.

:class:`StreamedLSE` and :class:`StreamedProbs` are the chunked counterparts of
``NeighborLSE`` and ``ClassProbs``: the forward merges the chunks' partial states
(:mod:`nbkernels.partials`), the backward streams the bank again and computes each
chunk's gradient with the final merged normalizers. Gradients reach the queries,
the bank (copied back to its device, chunk by chunk) and a tensor temperature.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from nbkernels import backends
from nbkernels import kernel_inputs as K
from nbkernels import partials as P
from nbkernels.autograd import batch_grads, caller_dt, fused_backward, kernel_t


def _describe(ctx):
    return (f"the chunked / streamed path (backend={ctx.spec.backend!r})",
            " without chunk_size and with the references on the queries' device")


# 65536 rows of 128 fp32 features are 32 MiB: large enough to keep the kernels busy, small
# enough that two in flight are negligible next to a device's memory.
DEFAULT_CHUNK_SIZE = 65536


def iter_chunks(r, r_labels, chunk_size, device, dtype):
    """Yield ``(start, r[start:start + chunk_size], labels)`` on ``device`` in ``dtype``.

    From a CPU bank to a CUDA device, each chunk's copy is issued on a side stream one
    chunk ahead, and the compute stream waits on its event before using it.
    """
    m = r.shape[0]
    starts = range(0, m, chunk_size)
    if r.device == device:
        for j0 in starts:
            yield j0, r[j0:j0 + chunk_size].to(dtype), r_labels[j0:j0 + chunk_size]
        return
    copy_stream = torch.cuda.Stream(device=device)
    compute_stream = torch.cuda.current_stream(device)

    def fetch(j0):
        with torch.cuda.stream(copy_stream):
            rc = r[j0:j0 + chunk_size].to(device, non_blocking=True)
            lc = r_labels[j0:j0 + chunk_size].to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(copy_stream)
        return rc, lc, done

    nxt = fetch(0) if m else None
    try:
        for j0 in starts:
            rc, lc, done = nxt
            compute_stream.wait_event(done)
            # allocated on the copy stream, used on the compute stream: tell the allocator
            rc.record_stream(compute_stream)
            lc.record_stream(compute_stream)
            if j0 + chunk_size < m:
                nxt = fetch(j0 + chunk_size)  # overlaps with the work on this chunk
            yield j0, rc.to(dtype), lc
    finally:
        # the host may overwrite the bank (a cache push) once we return
        copy_stream.synchronize()


class Spec(NamedTuple):
    """What a chunked call computes. ``offset`` is global (query i skips reference i + offset)."""

    metric: str
    offset: int | None
    backend: str
    chunk_size: int
    num_classes: int | None = None


def forward_chunks(mod, qk, q_labels, r, r_labels, t, prep, spec, dtype):
    """The merged Partials of kernel queries ``qk`` against every chunk of ``r`` (each
    prepared by ``kernel_inputs.prepare_refs(chunk, prep)``)."""
    part = None
    kmetric = prep.kmetric
    for j0, rc, lc in iter_chunks(r, r_labels, spec.chunk_size, qk.device, dtype):
        rk = K.prepare_refs(rc, prep)
        p = P.kernel_partials(mod, qk, rk, q_labels, lc, t, kmetric,
                              P.local_offset(spec.offset, j0), spec.num_classes)
        part = p if part is None else P.merge(part, p)
    if part is None:
        part = P.empty_partials(qk.shape[0], spec.num_classes, q_labels is not None,
                                qk.dtype, qk.device)
    return part


def backward_chunks(mod, qk, q_labels, r, r_labels, t, prep, spec, dtype, final,
                    g_all, g_pos, g_yhat, need_q, need_r, need_t):
    """``(dqk, dr, dt)``: dqk w.r.t. the kernel queries (acc dtype), dr w.r.t. ``r`` (on
    r's device, r's dtype, the row preparation's Jacobian applied), dt (0-dim) or None."""
    dqk = dt = None
    dr = torch.zeros_like(r) if need_r else None
    for j0, rc, lc in iter_chunks(r, r_labels, spec.chunk_size, qk.device, dtype):
        rk = K.prepare_refs(rc, prep)
        dq_c, dr_c, dt_c = P.kernel_backward(
            mod, qk, rk, q_labels, lc, t, prep.kmetric, P.local_offset(spec.offset, j0), final,
            g_all, g_pos, g_yhat, need_q=need_q, need_r=need_r, need_t=need_t)
        dqk, dt = P.add(dqk, dq_c), P.add(dt, dt_c)
        if need_r and dr_c is not None:
            dr[j0:j0 + rc.shape[0]].copy_(K.input_grad(rc, dr_c, prep.metric))
    return dqk, dr, dt


def query_grad(q, dqk, metric):
    if dqk is None:
        return torch.zeros_like(q)
    return K.input_grad(q, dqk, metric).to(q.dtype)


def _batch(q, r):
    """``r=None`` stands for ``q`` itself (Dynamo does not trace one tensor passed twice)."""
    return r is None, (q if r is None else r)



class StreamedLSE(torch.autograd.Function):
    """``(lse_all, lse_pos, positives) = StreamedLSE.apply(q, r, q_labels, r_labels, T, spec)``.

    As ``NeighborLSE`` (same lse values, up to rounding), over the chunks of ``r``, which
    may sit on the CPU while ``q`` is on a GPU. ``positives`` (N,) int64 counts each
    query's positives (not differentiable). ``r`` may have another floating dtype than
    ``q``: chunks are converted to q's dtype on the device. ``r=None`` (with
    ``r_labels=None``): the references are the queries themselves.
    """

    @staticmethod
    def forward(ctx, q, r, q_labels, r_labels, temperature, spec):
        ctx.batch, r = _batch(q, r)
        temperature = kernel_t(ctx, temperature, K.acc_dtype(q.dtype))
        r_labels = q_labels if ctx.batch else r_labels
        mod = backends.get(spec.backend, q.device, q.dtype)
        qk, prep = K.prepare_queries(q, spec.metric)
        part = forward_chunks(mod, qk, q_labels, r, r_labels, temperature, prep,
                              spec._replace(num_classes=None), q.dtype)
        ctx.save_for_backward(q, None if ctx.batch else r, qk, q_labels, r_labels, temperature,
                              part.lse_all, part.lse_pos, part.positives)
        ctx.spec, ctx.prep = spec._replace(num_classes=None), prep
        ctx.mark_non_differentiable(part.positives)
        shift = P.row_shift(mod, qk, temperature, prep.kmetric)
        return part.lse_all - shift, part.lse_pos - shift, part.positives

    @staticmethod
    @fused_backward(_describe)
    def backward(ctx, g_all, g_pos, _):
        q, r, qk, q_labels, r_labels, t, lse_all, lse_pos, positives = ctx.saved_tensors
        r = q if ctx.batch else r
        need_q, need_r, _, _, need_t = ctx.needs_input_grad[:5]
        need_r = need_r or (ctx.batch and need_q)
        final = P.Partials(lse_all, lse_pos, positives)
        mod = backends.get(ctx.spec.backend, q.device, q.dtype)
        dqk, dr, dt = backward_chunks(mod, qk, q_labels, r, r_labels, t, ctx.prep, ctx.spec,
                                      q.dtype, final, g_all, g_pos, None, need_q, need_r, need_t)
        dq = query_grad(q, dqk, ctx.spec.metric) if need_q else None
        dq, dr = batch_grads(ctx.batch, dq, dr)
        dt = caller_dt(ctx, dt)
        return dq, dr, None, None, dt, None


class StreamedProbs(torch.autograd.Function):
    """``yhat = StreamedProbs.apply(q, r, r_labels, T, spec)``: as ``ClassProbs`` over the
    chunks of ``r`` (``spec.num_classes`` set); yhat (N, C) in the accumulation dtype.
    ``r=None``: the references are the queries themselves (labels ``r_labels``)."""

    @staticmethod
    def forward(ctx, q, r, r_labels, temperature, spec):
        ctx.batch, r = _batch(q, r)
        temperature = kernel_t(ctx, temperature, K.acc_dtype(q.dtype))
        mod = backends.get(spec.backend, q.device, q.dtype)
        qk, prep = K.prepare_queries(q, spec.metric)
        part = forward_chunks(mod, qk, None, r, r_labels, temperature, prep, spec, q.dtype)
        ctx.save_for_backward(q, None if ctx.batch else r, qk, r_labels, temperature,
                              part.lse_all, part.yhat)
        ctx.spec, ctx.prep = spec, prep
        return part.yhat.clone()

    @staticmethod
    @fused_backward(_describe)
    def backward(ctx, g):
        q, r, qk, r_labels, t, lse_all, yhat = ctx.saved_tensors
        r = q if ctx.batch else r
        need_q, need_r, _, need_t = ctx.needs_input_grad[:4]
        need_r = need_r or (ctx.batch and need_q)
        final = P.Partials(lse_all, yhat=yhat)
        mod = backends.get(ctx.spec.backend, q.device, q.dtype)
        dqk, dr, dt = backward_chunks(mod, qk, None, r, r_labels, t,
                                      ctx.prep, ctx.spec, q.dtype, final, None, None, g,
                                      need_q, need_r, need_t)
        dq = query_grad(q, dqk, ctx.spec.metric) if need_q else None
        dq, dr = batch_grads(ctx.batch, dq, dr)
        dt = caller_dt(ctx, dt)
        return dq, dr, None, dt, None
