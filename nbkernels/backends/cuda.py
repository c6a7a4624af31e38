"""CUDA backend: launchers over the compiled kernels of csrc/ (``torch.ops.nbkernels.cuda_*``).

Implements the launcher interface of ``nbkernels.backends`` (see its docstring), plus
``is_available``. The ops come from the extension ``nbkernels._C``, which setup.py builds
only where a CUDA toolkit and a CUDA build of torch are present (see ``BUILD_HINT``).
Their fake (meta) implementations are registered below, so the autograd Functions that
call these launchers compile under ``torch.compile(fullgraph=True)``.

The glue around the kernels is plain torch, as in the Triton backend: squared row norms
("sqeuclidean"), label sorting for the class distribution, the merge of class tiles, and
the reduction of per-row dT partial sums. Nothing is read on the host.

Precision: fp16 / bf16 products on tensor cores with fp32 accumulation; fp32 inputs as
3xTF32 on tensor cores (about fp32 accuracy, whatever ``torch.backends.cuda.matmul``
allows). fp64 inputs run on the ``torch`` backend instead, with a one-time warning: the
gateway (``nbkernels.backends.get``) decides that.
"""

import torch

from nbkernels._validation import BackendUnavailableError
from nbkernels.backends import class_tiles, variants
from nbkernels.backends.infinity import finite_rows, silent_rows, undefined_rows
from nbkernels.kernel_inputs import KERNEL_METRICS, symmetric_flag

try:
    from nbkernels import _C  # loading it registers torch.ops.nbkernels.cuda_*
    _IMPORT_ERROR = None
except ImportError as e:  # the package works without the extension; is_available says False
    _C = None
    _IMPORT_ERROR = e

METRICS = KERNEL_METRICS
CLASS_TILE = 32  # == nbk::kClassTile in csrc/cuda/neighbor_cuda.h (the op checks it)
BUILD_HINT = (
    "the CUDA extension nbkernels._C is not built. Build it from a source checkout on a "
    "machine with a CUDA toolkit (nvcc) and a CUDA build of torch: "
    "`FORCE_CUDA=1 pip install --no-build-isolation -e .` (or "
    "`python setup.py build_ext --inplace`); TORCH_CUDA_ARCH_LIST picks the GPU archs "
    "(default \"8.0;9.0\"). Or use backend='triton' or 'torch'.")


def is_available(device) -> bool:
    """True when the extension is built and ``device`` is a CUDA device torch can use."""
    device = torch.device(device)
    return _C is not None and device.type == "cuda" and torch.cuda.is_available()


# ---------------------------------------------------------------------------- helpers

def _check(q, metric):
    if q.dtype == torch.float64:  # nbkernels.backends.get sends fp64 to backend "torch"
        raise TypeError("backend 'cuda' has no float64 kernels: reach it through "
                        "nbkernels.backends.get, which runs float64 on backend 'torch'")
    _check_device(q, metric)


def _check_device(q, metric):
    if _C is None:
        raise BackendUnavailableError(f"backend 'cuda': {BUILD_HINT} (import error: {_IMPORT_ERROR})")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if q.device.type != "cuda":
        raise BackendUnavailableError(f"backend 'cuda' needs CUDA tensors, got {q.device}")


# The kernel variants (``nbkernels.backends.variants``): the ``torch.ops.nbkernels`` op
# each launch runs, in order of preference; an architecture-specific kernel is one entry
# in front of the generic one of its kind (its op and fake registered with the others).
VARIANTS = [
    variants.Variant("fwd", "generic", "cuda_lse_fwd"),
    variants.Variant("fwd_class", "generic", "cuda_class_fwd"),
    variants.Variant("bwd", "generic", "cuda_bwd"),
    variants.Variant("bwd_class", "generic", "cuda_bwd"),
]


def _op(kind, device):
    """The op of the variant that ``variants.choose`` picks for ``kind`` on ``device``."""
    chosen = variants.choose(VARIANTS, kind, variants.capability(device))
    return getattr(torch.ops.nbkernels, chosen.kernel)


def _sqnorms(q, r, metric, r_far=None):
    """fp32 ||q||^2 (N,) and ||r||^2 (M,) for "sqeuclidean"; empty for "dot".

    References at infinity (``r_far``, rows zeroed by ``finite_rows``) get ||r||^2 = inf:
    their logit (2 q.r - ||r||^2) / T is then -inf, weight 0, in every kernel.
    """
    if metric != "sqeuclidean":
        empty = q.new_empty(0, dtype=torch.float32)
        return empty, empty
    qn = q.float().square().sum(1)
    rn = qn if r is q else r.float().square().sum(1)
    return qn, rn if r_far is None else rn.masked_fill(r_far, float("inf"))


def _rows(x, dtype=torch.float32):
    """1-D row data as the kernels index it: contiguous, int64 labels or fp32 values."""
    return None if x is None else x.to(dtype).contiguous()


def _temp(temperature):
    return temperature.reshape(())


def _offset(offset):
    return (0 if offset is None else int(offset)), offset is not None


# ------------------------------------------------------------------------- launchers


def lse_forward(q, r, q_labels, r_labels, temperature, *, metric, offset, symmetric=False):
    """Shifted ``(lse_all, lse_pos)``, each (N,) fp32 (``symmetric`` is checked; these
    kernels have no symmetric form)."""
    _check(q, metric)
    symmetric_flag(symmetric, q, r, q_labels, r_labels, offset)
    q, r, q_far, r_far = finite_rows(q, r, metric)
    _, rn = _sqnorms(q, r, metric, r_far)
    lse_all, lse_pos = _op("fwd", q.device)(
        q, r, _rows(q_labels, torch.int64), _rows(r_labels, torch.int64), _temp(temperature),
        rn, metric == "sqeuclidean", *_offset(offset))
    return undefined_rows(lse_all, q_far), undefined_rows(lse_pos, q_far)


def probs_forward(q, r, r_labels, temperature, num_classes, *, metric, offset):
    """``(yhat, lse_all)``: class distribution (N, num_classes) and shifted lse (N,), fp32.

    Rows without any reference get yhat = NaN (as the reference) and lse_all = -inf. Labels
    outside ``[0, num_classes)`` count in lse_all but in no class.
    """
    _check(q, metric)
    q, r, q_far, r_far = finite_rows(q, r, metric)
    m, c = r.shape[0], int(num_classes)
    n_tiles = -(-c // CLASS_TILE)
    # references in label order; class tile t owns positions tile_ptr[t]:tile_ptr[t + 1]
    labels, perm = torch.sort(_rows(r_labels, torch.int64), stable=True)
    inner = torch.arange(1, n_tiles, device=q.device, dtype=torch.int64) * CLASS_TILE
    # labels outside [0, C) land in the first / last tile: they count in lse_all, not in yhat
    tile_ptr = torch.cat([labels.new_zeros(1), torch.searchsorted(labels, inner),
                          labels.new_full((1,), m)])
    _, rn = _sqnorms(q, r, metric, r_far)
    mass, tile_max, tile_sum = _op("fwd_class", q.device)(
        q, r, labels, perm, tile_ptr, _temp(temperature), rn, c, CLASS_TILE,
        metric == "sqeuclidean", *_offset(offset))
    # merge the class tiles (relative to the row's largest anchor: ``class_tiles``)
    scale, lse_all = class_tiles.merge(tile_max, tile_sum)
    yhat = mass * scale.repeat_interleave(CLASS_TILE, dim=1).narrow(1, 0, c)
    return undefined_rows(yhat, q_far), undefined_rows(lse_all, q_far)


def _backward(q, r, q_labels, r_labels, temperature, lse_all, lse_pos, g_all, g_pos, g_cls,
              delta, *, metric, offset, need_q, need_r, need_t):
    """Run the dq and / or dr kernels; reduce the per-row dT partial sums in torch."""
    q, r, q_far, r_far = finite_rows(q, r, metric)
    lse_all, lse_pos, g_all, g_pos, g_cls, delta = silent_rows(q_far, lse_all, lse_pos, g_all,
                                                               g_pos, g_cls, delta)
    # a sum without any finite term (lse -inf), e.g. a row whose only positive is at
    # infinity: the kernels' exp(s - lse) would meet -inf + inf; no term, no gradient
    no_all = lse_all == float("-inf")
    lse_all, g_all, g_cls, delta = silent_rows(no_all, lse_all, g_all, g_cls, delta)
    if lse_pos is not None:
        no_pos = lse_pos == float("-inf")
        lse_pos, g_pos = silent_rows(no_pos, lse_pos, g_pos)
    qn, rn = _sqnorms(q, r, metric, r_far)
    args = (q, r, _rows(q_labels, torch.int64), _rows(r_labels, torch.int64), _temp(temperature),
            qn, rn, _rows(lse_all), _rows(lse_pos), _rows(g_all), _rows(g_pos), g_cls,
            _rows(delta), metric == "sqeuclidean", *_offset(offset))
    # dT partial sums come from the dr kernel when it runs alone, else from the dq kernel
    t_from_r = need_t and need_r and not need_q
    t_from_q = need_t and not t_from_r
    dq = dr = part = None
    bwd = _op("bwd" if g_cls is None else "bwd_class", q.device)
    if need_q or t_from_q:
        dx, dt_part = bwd(*args, False, need_q, t_from_q)
        dq = dx if need_q else None
        part = dt_part if t_from_q else part
    if need_r or t_from_r:
        dx, dt_part = bwd(*args, True, need_r, t_from_r)
        dr = dx if need_r else None
        part = dt_part if t_from_r else part
    dt = None
    if need_t:
        # dT = -1/T sum_ij ds_ij logit_ij
        dt = -part.sum() / temperature
    return dq, dr, dt


def lse_backward(q, r, q_labels, r_labels, temperature, lse_all, lse_pos, g_all, g_pos, *,
                 metric, offset, need_q, need_r, need_t, symmetric=False):
    """``(dq, dr, dt)`` of ``sum(g_all * lse_all + g_pos * lse_pos)``; ``None`` where not needed.

    ``g_all`` or ``g_pos`` may be ``None`` (zero). ``symmetric`` is checked; dq and dr
    come back separately.
    """
    _check(q, metric)
    symmetric_flag(symmetric, q, r, q_labels, r_labels, offset)
    g_all = torch.zeros_like(lse_all) if g_all is None else g_all
    g_pos = torch.zeros_like(lse_pos) if g_pos is None else g_pos
    return _backward(q, r, q_labels, r_labels, temperature, lse_all, lse_pos, g_all, g_pos,
                     None, None, metric=metric, offset=offset, need_q=need_q, need_r=need_r,
                     need_t=need_t)


def probs_backward(q, r, r_labels, temperature, yhat, lse_all, g, *, metric, offset, need_q,
                   need_r, need_t):
    """``(dq, dr, dt)`` of ``sum(g * yhat)``; ``None`` where not needed."""
    _check(q, metric)
    g = g.to(torch.float32)
    # delta_i = sum_c G_ic yhat_ic
    delta = (g * yhat.to(torch.float32)).sum(1)
    return _backward(q, r, None, r_labels, temperature, lse_all, None, None, None, g, delta,
                     metric=metric, offset=offset, need_q=need_q, need_r=need_r, need_t=need_t)


# ------------------------------------------------------------- fake implementations


def _register_fakes():
    """Shapes and dtypes of the ops' outputs, for FakeTensor / torch.compile tracing."""
    @torch.library.register_fake("nbkernels::cuda_lse_fwd")
    def _(q, r, q_labels, r_labels, temperature, r_sqnorm, sqeuclidean, offset, has_offset):
        n = q.shape[0]
        return q.new_empty(n, dtype=torch.float32), q.new_empty(n, dtype=torch.float32)

    @torch.library.register_fake("nbkernels::cuda_class_fwd")
    def _(q, r, r_labels_sorted, perm, tile_ptr, temperature, r_sqnorm, num_classes, block_c,
          sqeuclidean, offset, has_offset):
        n, n_tiles = q.shape[0], -(-num_classes // block_c)
        return (q.new_empty(n, num_classes, dtype=torch.float32),
                q.new_empty(n, n_tiles, dtype=torch.float32),
                q.new_empty(n, n_tiles, dtype=torch.float32))

    @torch.library.register_fake("nbkernels::cuda_bwd")
    def _(q, r, q_labels, r_labels, temperature, q_sqnorm, r_sqnorm, lse_all, lse_pos, g_all,
          g_pos, g_cls, delta, sqeuclidean, offset, has_offset, ref_major, need_dx, need_dt):
        x = r if ref_major else q
        dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
        return dx, q.new_empty(x.shape[0] if need_dt else 0, dtype=torch.float32)


if _C is not None:
    _register_fakes()
