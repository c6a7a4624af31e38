"""``torch.autograd.Function``s behind the public API.

* :class:`NeighborLSE` returns ``(lse_all, lse_pos)``, the two row log-sum-exps.
* :class:`ClassProbs` returns ``yhat``, the label-weighted vote of the softmax.

Both are differentiable with respect to the queries, the references and a tensor
temperature, and run one of the fused backends (``"torch"``, ``"triton"``, ``"cuda"``).
They do no input validation: use :mod:`nbkernels.functional` for that. Row statistics
come back in the accumulation dtype (fp32, or fp64 for fp64 inputs), as in
FlashAttention, so that a loss formed from them keeps its precision in half precision.

Example::

    T = torch.tensor(0.1)
    lse_all, lse_pos = NeighborLSE.apply(x, None, y, None, T, "sqeuclidean", 0, "torch")
    loss = (lse_all - lse_pos).mean()

For the batch against itself pass ``r=None`` (and ``r_labels=None``): the references
are then the queries, and the gradient of both roles goes to ``q`` (Dynamo does not
trace one tensor passed twice to an ``autograd.Function``). The rows are prepared by
``nbkernels.kernel_inputs``: ``"cosine"`` normalizes them and hands the kernels ``"dot"``
(the backward applies the normalization's Jacobian); ``"sqeuclidean"`` centres them on
the queries' mean.
"""
from __future__ import annotations

import functools

import torch

from nbkernels import backends, kernel_inputs
from nbkernels._validation import acc_dtype


_SECOND_ORDER = (
    "nbkernels: {what} has no double backward: its gradient is computed by fused kernels "
    "and is not itself differentiable. For gradients of gradients (gradient penalties, "
    "Hessian-vector products) use backend=\"reference\"{hint}, which materializes the N x M "
    "logits and is differentiated by autograd twice.")


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on the gradients of a fused backward, whose own backward raises.

    Applied when the backward runs with ``create_graph=True``: the first derivative is
    exact, and differentiating it again fails loudly instead of silently returning a
    partial (wrong) second derivative.
    """

    @staticmethod
    def forward(ctx, message, n_anchors, *tensors):
        ctx.message = message
        return tuple(t.view_as(t) for t in tensors[n_anchors:])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def fused_backward(describe):
    """Decorate an ``autograd.Function.backward`` that runs fused launchers.

    The launchers run under ``no_grad`` and outside autocast; when the backward is
    recorded (``create_graph=True``) its gradients are linked to the saved inputs through
    :class:`_FirstOrderOnly`, so that a second differentiation raises a clear error.
    ``describe(ctx)`` returns ``(what, hint)`` for the message.
    """
    def wrap(backward):
        @functools.wraps(backward)
        def run(ctx, *grads):
            recording = torch.is_grad_enabled()
            with torch.no_grad():
                out = backward(ctx, *grads)
            present = [g for g in out if isinstance(g, torch.Tensor)]
            if not (recording and present):
                return out
            anchors = [t for t in ctx.saved_tensors if t.requires_grad]
            what, hint = describe(ctx)
            linked = iter(_FirstOrderOnly.apply(_SECOND_ORDER.format(what=what, hint=hint),
                                                len(anchors), *anchors, *present))
            return tuple(next(linked) if isinstance(g, torch.Tensor) else g for g in out)

        return run

    return wrap


def _describe(ctx):
    return f"backend={ctx.backend!r}", ""


def _input_grads(ctx, q, r, dq, dr):
    dq = kernel_inputs.input_grad(q, dq, ctx.metric)
    dr = kernel_inputs.input_grad(r, dr, ctx.metric)
    return (None if dq is None else dq.to(q.dtype)), (None if dr is None else dr.to(r.dtype))


def kernel_t(ctx, temperature, dtype):
    """``temperature`` cast for the kernels (``kernel_inputs.kernel_temperature``, to the
    accumulation ``dtype``); ``ctx`` keeps its own dtype for :func:`caller_dt`."""
    ctx.t_dtype = temperature.dtype
    return kernel_inputs.kernel_temperature(temperature, dtype)


def caller_dt(ctx, dt):
    """dT in the dtype of the temperature the caller passed (:func:`kernel_t`)."""
    return None if dt is None else dt.to(ctx.t_dtype)


def _setup(ctx, q, r, temperature, metric, offset, backend):
    """Forward set-up shared by the Functions: ``r=None`` stands for ``q`` (the batch).
    Returns ``(r, qk, rk, kernel metric, accumulation dtype, kernel temperature)``."""
    ctx.batch = r is None
    r = q if ctx.batch else r
    qk, rk, kmetric = kernel_inputs.prepare(q, r, metric)
    ctx.metric, ctx.kmetric, ctx.offset, ctx.backend = metric, kmetric, offset, backend
    acc = acc_dtype(q.dtype)
    return r, qk, rk, kmetric, acc, kernel_t(ctx, temperature, acc)


def batch_grads(batch, dq, dr):
    """``r=None`` (``batch``: the references are the queries): the gradients of both roles
    go to ``q``. Shared with the streamed Functions (``nbkernels.streaming``)."""
    if not batch:
        return dq, dr
    return (dq if dr is None else dr if dq is None else dq + dr.to(dq.dtype)), None


def is_empty(*sizes):
    """Whether some size is 0, for the shortcuts on empty inputs. A size unknown while
    compiling (class means: one row per class present) counts as non-empty: the
    launchers handle empty inputs themselves at run time."""
    try:
        from torch.fx.experimental.symbolic_shapes import guard_or_false
    except ImportError:  # older torch: sizes are known
        return any(n == 0 for n in sizes)
    return any(guard_or_false(n == 0) for n in sizes)


def _empty(q, r):
    return is_empty(q.shape[0], r.shape[0])


class NeighborLSE(torch.autograd.Function):
    """``(lse_all, lse_pos) = NeighborLSE.apply(q, r, q_labels, r_labels, T, metric, offset, backend)``.

    q: (N, D), r: (M, D) floating, same dtype, or ``r=None`` (with ``r_labels=None``) for
    the batch against itself; labels int64 (N,), (M,); T: 0-dim floating tensor of any dtype
    (cast once to the accumulation dtype, ``kernel_inputs.kernel_temperature``; its gradient
    comes back in its own dtype);
    metric: "sqeuclidean" | "cosine" | "dot"; offset: None or int (query i skips
    reference i + offset); backend: "torch" | "triton" | "cuda" | "reference". Returns two (N,)
    tensors in the accumulation dtype; ``lse_pos`` is -inf on rows with no positive.
    """

    @staticmethod
    def forward(ctx, q, r, q_labels, r_labels, temperature, metric="sqeuclidean", offset=None,
                backend="torch"):
        with torch.autocast(q.device.type, enabled=False):
            return NeighborLSE._forward(ctx, q, r, q_labels, r_labels, temperature, metric,
                                        offset, backend)

    @staticmethod
    def _forward(ctx, q, r, q_labels, r_labels, temperature, metric, offset, backend):
        r_labels = q_labels if r is None else r_labels
        r, qk, rk, kmetric, acc, temperature = _setup(ctx, q, r, temperature, metric, offset,
                                                      backend)
        ctx.symmetric = kernel_inputs.symmetric(qk, rk, q_labels, r_labels, offset)
        shifted = True
        if _empty(q, r):
            lse_all = torch.full((q.shape[0],), float("-inf"), dtype=acc, device=q.device)
            lse_pos = lse_all.clone()
        else:
            mod = backends.get(backend, qk.device, qk.dtype)
            lse_all, lse_pos = mod.lse_forward(
                qk, rk, q_labels, r_labels, temperature, metric=kmetric, offset=offset,
                symmetric=ctx.symmetric)
            # the reference's values are whole (its SHIFTED is False)
            shifted = getattr(mod, "SHIFTED", True)
        ctx.save_for_backward(q, r, qk, rk, q_labels, r_labels, temperature, lse_all, lse_pos)
        # the fused backends leave out the row constant -||q||^2 / T under "sqeuclidean";
        # add it back
        if kmetric == "sqeuclidean" and shifted:
            shift = kernel_inputs.row_shift(qk, temperature, kmetric)
            return lse_all - shift, lse_pos - shift
        return lse_all.clone(), lse_pos.clone()

    @staticmethod
    @fused_backward(_describe)
    def backward(ctx, g_all, g_pos):
        q, r, qk, rk, q_labels, r_labels, temperature, lse_all, lse_pos = ctx.saved_tensors
        need_q, need_r, _, _, need_t = ctx.needs_input_grad[:5]
        need_r = need_r or (ctx.batch and need_q)
        if _empty(q, r) or not (need_q or need_r or need_t):
            return (None,) * 8
        g_all = torch.zeros_like(lse_all) if g_all is None else g_all
        g_pos = torch.zeros_like(lse_pos) if g_pos is None else g_pos
        dq, dr, dt = backends.get(ctx.backend, qk.device, qk.dtype).lse_backward(
            qk, rk, q_labels, r_labels, temperature, lse_all, lse_pos, g_all, g_pos,
            metric=ctx.kmetric, offset=ctx.offset, need_q=need_q, need_r=need_r, need_t=need_t,
            symmetric=ctx.symmetric)
        dq, dr = _input_grads(ctx, q, r, dq, dr)
        dt = caller_dt(ctx, dt)
        dq, dr = batch_grads(ctx.batch, dq, dr)
        return dq, dr, None, None, dt, None, None, None


class ClassProbs(torch.autograd.Function):
    """``yhat = ClassProbs.apply(q, r, r_labels, T, num_classes, metric, offset, backend)``.

    Returns yhat (N, num_classes) in the accumulation dtype: ``yhat_ic`` is the softmax
    mass of the references labelled ``c``. Arguments as in :class:`NeighborLSE`
    (``r=None``: the references are the queries).
    """

    @staticmethod
    def forward(ctx, q, r, r_labels, temperature, num_classes, metric="sqeuclidean", offset=None,
                backend="torch"):
        with torch.autocast(q.device.type, enabled=False):
            return ClassProbs._forward(ctx, q, r, r_labels, temperature, num_classes, metric,
                                       offset, backend)

    @staticmethod
    def _forward(ctx, q, r, r_labels, temperature, num_classes, metric, offset, backend):
        r, qk, rk, kmetric, acc, temperature = _setup(ctx, q, r, temperature, metric, offset,
                                                      backend)
        if _empty(q, r):
            yhat = torch.full((q.shape[0], num_classes), float("nan"), dtype=acc, device=q.device)
            lse_all = torch.full((q.shape[0],), float("-inf"), dtype=acc, device=q.device)
        else:
            yhat, lse_all = backends.get(backend, qk.device, qk.dtype).probs_forward(
                qk, rk, r_labels, temperature, num_classes, metric=kmetric, offset=offset)
        ctx.save_for_backward(q, r, qk, rk, r_labels, temperature, yhat, lse_all)
        return yhat.clone()

    @staticmethod
    @fused_backward(_describe)
    def backward(ctx, g):
        q, r, qk, rk, r_labels, temperature, yhat, lse_all = ctx.saved_tensors
        need_q, need_r, _, need_t = ctx.needs_input_grad[:4]
        need_r = need_r or (ctx.batch and need_q)
        if _empty(q, r) or not (need_q or need_r or need_t):
            return (None,) * 8
        dq, dr, dt = backends.get(ctx.backend, qk.device, qk.dtype).probs_backward(
            qk, rk, r_labels, temperature, yhat, lse_all, g, metric=ctx.kmetric,
            offset=ctx.offset, need_q=need_q, need_r=need_r, need_t=need_t)
        dq, dr = _input_grads(ctx, q, r, dq, dr)
        dt = caller_dt(ctx, dt)
        dq, dr = batch_grads(ctx.batch, dq, dr)
        return dq, dr, None, dt, None, None, None, None
