"""Triton backend: launchers for the kernels in ``triton_kernels.py``.

Implements the launcher interface of ``nbkernels.backends`` (see its docstring),
plus ``precision`` for fp32 inputs and ``is_available``. Each launcher is a thin
wrapper over a ``torch.library.custom_op`` (``nbkernels::triton_*``) with a fake
implementation, so the autograd Functions that call them compile under
``torch.compile(fullgraph=True)`` without graph breaks. Custom ops take no ``None``
offset and return no ``None`` gradient: the wrappers encode ``offset`` as
``(offset, has_offset)`` and turn the empty placeholder gradients back into ``None``.

No launcher reads a device value on the host: the kernels load the logit scale
(``triton_rows.logit_scale``, from the temperature on the device) and every reduction
after a kernel stays on the device. Launches run under the inputs'
CUDA device (``torch.cuda.device``), whatever the current device is.

Importing this module imports triton; with ``TRITON_INTERPRET=1`` set before that
import the kernels run on CPU tensors through the Triton interpreter.
"""
import contextlib
import os
import re

import torch

from nbkernels.backends.infinity import finite_rows, silent_rows, undefined_rows

try:
    import triton
    import triton.language as tl

    from . import triton_kernels as tk
    from . import triton_rows as tr
except ImportError:  # the package works without triton; is_available says False
    triton = None

METRICS = ("sqeuclidean", "dot")
PRECISIONS = ("ieee", "tf32", "tf32x3")


def is_available(device) -> bool:
    """True when triton imports and can run on ``device``: CUDA, or CPU under the interpreter."""
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    # the kernels were decorated for the interpreter only if the variable was set at import
    return (device.type == "cpu" and tk.INTERPRET and os.environ.get("TRITON_INTERPRET") == "1"
            and interpreter_problem() is None)


def _version(text):
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


def interpreter_problem():
    """Why the Triton interpreter cannot run the kernels with the installed packages, or None.

    Triton 3.6's interpreter turns each scalar argument into a 1-element array and calls
    ``int()`` on it (loop bounds, indices), which NumPy 2.4 made an error; triton 3.7
    fixed it.
    """
    import numpy
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"the interpreter of triton {triton.__version__} calls int() on 1-element "
                f"arrays, an error since NumPy 2.4 (numpy {numpy.__version__} is installed): "
                "pip install 'numpy<2.4', or triton >= 3.7")
    return None


# ---------------------------------------------------------------------------- helpers


def _acc(x):
    return tr.acc_dtype(x.dtype)


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check(metric, precision):
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be None or one of {PRECISIONS}, got {precision!r}")


@torch.compiler.assume_constant_result
def _default_precision():
    """"tf32" when torch allows TF32 matmuls, else "ieee".

    Read once per trace under torch.compile (a constant, not a guard). Newer torch
    raises on reading ``allow_tf32`` once ``fp32_precision`` was set: read that first.
    """
    matmul = torch.backends.cuda.matmul
    fp32_precision = getattr(matmul, "fp32_precision", "none")
    if fp32_precision != "none":
        return "tf32" if fp32_precision == "tf32" else "ieee"
    return "tf32" if matmul.allow_tf32 else "ieee"


def _dot_precision(dtype, precision):
    """input_precision for the logit dot: only fp32 inputs have a choice."""
    if dtype != torch.float32:
        return "ieee"
    return precision


def _block(n, cap):
    """Power of two >= n (and >= 16, the smallest tl.dot), at most cap."""
    return max(16, min(triton.next_power_of_2(max(n, 1)), cap))


def _on_device(x):
    """Context of x's CUDA device for a launch (triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _ds_scales(gmax):
    """fp16 ds scales from a bound gmax (N,) >= |ds| per query row: (per row, for all rows).

    Powers of two 2^(12 - ceil(log2 gmax)): scaled |ds| stays <= 2^12 (2^13 for the class
    ds, bounded by 2 gmax; fp16 tops out near 2^16) and the small terms stay above its
    normal floor. Computed on the device; rows with gmax = 0 get a large finite scale
    (their ds is 0), NaN stays NaN.
    """
    e = torch.ceil(torch.log2(gmax.float().clamp_min(2.0 ** -100)))
    row = torch.exp2(12 - e)
    top = torch.exp2(12 - e.amax()).reshape(1) if e.numel() else row.new_ones(1)
    return row, top


def _feature_blocks(d, max_resident):
    """(RESIDENT, BLOCK_D, BLOCK_DX): the own tile held whole for D <= max_resident."""
    if d <= max_resident:
        b = _block(d, max_resident)
        return True, b, b
    return False, _block(d, tk.MAX_BLOCK_D), _block(d, tk.MAX_BLOCK_DX)


def _resident_limit(kind, q, precision):
    return tk.resident_limit(kind, q.element_size(), _dot_precision(q.dtype, precision))


def _common(q, r, temperature, metric, offset, has_offset, precision, kind):
    """Kernel arguments shared by every launch of ``kind`` ("fwd", "fwd_class", "bwd",
    "bwd_class")."""
    n, d = q.shape
    m = r.shape[0]
    resident, block_d, _ = _feature_blocks(d, _resident_limit(kind, q, precision))
    return dict(q=q, r=r, scale=tr.logit_scale(temperature, metric, _acc(q)), N=n, M=m, D=d,
                offset=offset,
                s_qn=q.stride(0), s_qd=q.stride(1), s_rm=r.stride(0), s_rd=r.stride(1),
                N_KEY=triton.next_power_of_2(max(n, 1)), M_KEY=triton.next_power_of_2(max(m, 1)),
                D_KEY=triton.next_power_of_2(max(d, 1)),
                SQEUCLID=metric == "sqeuclidean", HAS_OFFSET=has_offset, RESIDENT=resident,
                ACC=_tl_acc(q.dtype), PRECISION=_dot_precision(q.dtype, precision),
                BLOCK_D=block_d)


# ------------------------------------------------------------------------ custom ops


def lse_forward_passes(q, r, q_labels, r_labels, temperature, metric, offset, has_offset,
                       precision, r_far=None, trace=None):
    """The lse forward's two launches on kernel inputs (rows at infinity zeroed and, for
    the references, flagged in ``r_far``: ``infinity.finite_rows``): ``(lse_all, lse_pos)``.

    ``trace``: a dict to fill with the intermediates, for diagnostics
    (bench/gpu_diagnose.py): the main pass's lse values, anchor and sums (``main_*``),
    the rows it flagged (``redo``) and the has-a-positive mask.
    """
    n = q.shape[0]
    acc = tr.acc_dtype(q.dtype)
    lse_all = torch.empty(n, dtype=acc, device=q.device)
    lse_pos = torch.empty(n, dtype=acc, device=q.device)
    if n == 0:
        return lse_all, lse_pos
    a, b = tr.label_ranks(q_labels, r_labels)
    has_pos = tr.has_positive(a[:n], b[:r.shape[0]], offset if has_offset else None)
    # the rows for the exact pass (written by the main pass)
    redo = torch.empty(n, dtype=torch.int8, device=q.device)
    r_col = tr.columns(q, r, r_far, metric, temperature)[1]
    packed = acc == torch.float32
    state = None if trace is None else torch.empty(3, n, dtype=acc, device=q.device)
    args = dict(q_labels=a, r_labels=b, r_col=r_col, PACKED=packed,
                r_pack=tr.packed(b, r_col) if packed else None, perm=None, tile_ptr=None,
                lse_all=lse_all, lse_pos=lse_pos, has_pos=has_pos, redo=redo, mass=None,
                tile_max=None, tile_sum=None, row_state=state, CLASS=False,
                MASS_PRECISION="ieee", BLOCK_C=16,
                **_common(q, r, temperature, metric, offset, has_offset, precision, "fwd"))
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), 1)  # noqa: E731
    with _on_device(q):
        tk.launch("fwd", grid, POS_PASS=False, **args)
        if trace is not None:
            trace.update(main_lse_all=lse_all.clone(), main_lse_pos=lse_pos.clone(),
                         main_anchor=state[0], main_sum=state[1], main_pos_sum=state[2],
                         redo=redo.clone(), has_pos=has_pos.clone())
        # the exact pass takes the flagged rows first: its programs past them skip
        order = torch.argsort((redo == 0).to(torch.int8), stable=True).to(torch.int32)
        tk.launch("fwd", grid, tune=False, POS_PASS=True,
                  **dict(args, perm=order, row_state=None))
    return lse_all, lse_pos


@torch.library.custom_op("nbkernels::triton_lse_fwd", mutates_args=())
def _lse_fwd(q: torch.Tensor, r: torch.Tensor, q_labels: torch.Tensor, r_labels: torch.Tensor,
             temperature: torch.Tensor, metric: str, offset: int, has_offset: bool,
             precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    q, r, q_far, r_far = finite_rows(q, r, metric)
    lse_all, lse_pos = lse_forward_passes(q, r, q_labels, r_labels, temperature, metric, offset,
                                          has_offset, precision, r_far)
    return undefined_rows(lse_all, q_far), undefined_rows(lse_pos, q_far)


@_lse_fwd.register_fake
def _(q, r, q_labels, r_labels, temperature, metric, offset, has_offset, precision):
    acc = tr.acc_dtype(q.dtype)
    return q.new_empty(q.shape[0], dtype=acc), q.new_empty(q.shape[0], dtype=acc)


@torch.library.custom_op("nbkernels::triton_probs_fwd", mutates_args=())
def _probs_fwd(q: torch.Tensor, r: torch.Tensor, r_labels: torch.Tensor,
               temperature: torch.Tensor, num_classes: int, metric: str, offset: int,
               has_offset: bool, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    n, m, c = q.shape[0], r.shape[0], num_classes
    acc = tr.acc_dtype(q.dtype)
    q, r, q_far, r_far = finite_rows(q, r, metric)
    block_c, n_tiles = _class_tiles(c, m)
    # references in label order; class tile t owns perm[tile_ptr[t]:tile_ptr[t + 1]]
    labels, perm = torch.sort(r_labels.contiguous(), stable=True)
    bounds = torch.arange(n_tiles + 1, device=q.device, dtype=labels.dtype) * block_c
    tile_ptr = torch.searchsorted(labels, bounds)
    # labels outside [0, C) land in the first / last tile: they count in lse_all, not in yhat
    # (with C = 0, one tile holds every reference)
    tile_ptr[0] = 0
    tile_ptr[-1] = m
    # every column written, those >= C (padding of the last tile) cut off below
    mass = torch.empty(n, n_tiles * block_c, dtype=acc, device=q.device)
    tile_max = torch.empty(n, n_tiles, dtype=acc, device=q.device)
    tile_sum = torch.empty(n, n_tiles, dtype=acc, device=q.device)
    if n > 0:
        with _on_device(q):
            # the references themselves in label order: every tile is a contiguous block
            r_sorted = r[perm]
            r_col = tr.columns(q, r_sorted, None if r_far is None else r_far[perm], metric,
                             temperature)[1]
            tk.launch(
                "fwd_class", lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), n_tiles),
                q_labels=None, r_labels=tr.class_labels(labels, c), r_col=r_col, r_pack=None,
                PACKED=False, perm=perm if has_offset else None, tile_ptr=tile_ptr,
                lse_all=None, lse_pos=None, has_pos=None, redo=None, row_state=None, mass=mass,
                tile_max=tile_max, tile_sum=tile_sum, CLASS=True, POS_PASS=False,
                # p in [0, 1]: tf32 would cost 1e-3 of yhat; a hi + lo split of p in two TF32 dots
                # ("tf32x2" in the kernel) is near fp32, and the one-hot is exact
                MASS_PRECISION="ieee" if acc == torch.float64 else "tf32x2", BLOCK_C=block_c,
                **_common(q, r_sorted, temperature, metric, offset, has_offset, precision,
                          "fwd_class"))
    # merge class tiles: lse_all = logsumexp_t(max_t + log sum_t), yhat = mass_t exp(max_t - lse_all)
    # (an empty tile has max -inf: scale 0; a row without references: lse -inf, yhat NaN)
    lse_all = torch.logsumexp(tile_max + tile_sum.log(), dim=1)
    scale = torch.exp(tile_max - lse_all[:, None])
    mass.view(n, n_tiles, block_c).mul_(scale[:, :, None])
    # contiguous: the fake returns a plain (N, C) tensor
    return undefined_rows(mass[:, :c].contiguous(), q_far), undefined_rows(lse_all, q_far)


def _class_tiles(c, m):
    """(BLOCK_C, number of class tiles): at least one tile, so that C = 0 still has lse_all."""
    block_c = _block(c, tk.class_block_cap(c, m))
    return block_c, max(1, triton.cdiv(c, block_c))


@_probs_fwd.register_fake
def _(q, r, r_labels, temperature, num_classes, metric, offset, has_offset, precision):
    acc = tr.acc_dtype(q.dtype)
    return (q.new_empty(q.shape[0], num_classes, dtype=acc),
            q.new_empty(q.shape[0], dtype=acc))


def lse_backward_rows(lse_all, lse_pos, g_all, g_pos):
    """Per query row: (main pass, fix-up pass, flags) of the one-exp lse backward.

    Each pass is (row_shift, w_neg, w_pos) in the kernel's terms (see
    ``neighbor_bwd_kernel`` and ``triton_rows.exp_shift``). Main: p+ = p exp(lse_all -
    lse_pos), exact while that gap is at most 2^64 (fp32; 2^960 fp64); w_pos is formed
    as (g_all + g_pos) + g_pos expm1(gap), in fp64, so that a loss row (g_pos = -g_all)
    whose positives hold nearly all the mass keeps its small weight. Rows beyond the gap
    limit (``flags``, int8) get their positives' term from the fix-up pass with their
    own shift. Rows without terms (lse_all -inf) and without positives (lse_pos -inf)
    carry no weight; NaN stays NaN.
    """
    limit = tk.POS_LOG2_LIMIT["fp64" if lse_all.dtype == torch.float64 else "fp32"]
    none = lse_all == float("-inf")
    no_pos = lse_pos == float("-inf")
    gap = lse_all.double() - lse_pos.double()
    flag = (gap * tr.LOG2E > limit) & torch.logical_not(no_pos)
    off = flag | no_pos
    g_all = torch.where(none, 0.0, g_all)
    g_main = torch.where(off, 0.0, g_pos).double()
    w_pos = (g_all.double() + g_main + g_main * torch.expm1(torch.where(off, 0.0, gap)))
    w_pos = w_pos.to(g_all.dtype)
    shift, corr = tr.exp_shift(lse_all)
    main = (shift, g_all * corr, w_pos * corr)
    shift_pos, corr_pos = tr.exp_shift(lse_pos)
    fix = (torch.where(flag, shift_pos, float("-inf")), torch.zeros_like(g_all),
           torch.where(flag, g_pos, 0.0) * corr_pos)
    return main, fix, flag.to(torch.int8)


def _scaled(rows, scale):
    """The weights of ``rows`` (row_shift, w_neg, w_pos | g_cls) times the fp16 ds scale."""
    if scale is None:
        return rows
    shift, *weights = rows
    return (shift, *(None if w is None else w * (scale if w.dim() == 1 else scale[:, None])
                     for w in weights))


def _backward(q, r, labels, temperature, passes, gmax, num_classes, metric, offset,
              has_offset, need_q, need_r, need_t, precision, r_far, symmetric):
    """Launch the dq / dr (or, ``symmetric``, the one batch) kernels; reduce dT in torch.

    ``passes``: [(row_shift, w_neg, w_pos, g_cls), flags] per pass (main, then an optional
    fix-up with flags). ``gmax`` (N,) bounds |ds| per query row, given for fp16 inputs
    only (ds scaling). Gradients accumulate in the accumulation dtype and are cast once.
    """
    n, d = q.shape
    m = r.shape[0]
    acc = tr.acc_dtype(q.dtype)
    q_col, r_col = tr.columns(q, r, r_far, metric, temperature)
    if symmetric:
        q_col = r_col  # one set of rows: references at infinity have weight 0 both ways
    kind = "bwd_class" if passes[0][0][3] is not None else "bwd"
    resident, _, block_dx = _feature_blocks(d, _resident_limit(kind, q, precision))
    # fp16 only: bf16 has fp32's exponent range, fp32 / fp64 do not round ds
    row_scale, top_scale = _ds_scales(gmax) if gmax is not None else (None, None)
    common = dict(q_labels=labels[0], r_labels=labels[1], r_col=r_col, q_col=q_col,
                  C=num_classes, SCALE_DS=gmax is not None, BLOCK_DX=block_dx,
                  **_common(q, r, temperature, metric, offset, has_offset, precision, kind))
    # dT partial sums come from the dr kernel when it runs alone, else from the dq kernel
    t_from_r = need_t and need_r and not need_q and not symmetric
    kernels = []
    if symmetric and (need_q or need_r):
        kernels.append(("sym", n, True, need_t))
    else:
        if need_q or (need_t and not t_from_r):
            kernels.append(("dq", n, need_q, need_t and not t_from_r))
        if need_r:
            kernels.append(("dr", m, True, t_from_r))
    out = {"dq": None, "dr": None}
    part = None
    for mode, n_own, need_dx, need_dt in kernels:
        if n_own == 0:
            continue
        scale = row_scale if mode == "dq" else None if top_scale is None else top_scale.expand(n)
        dx = torch.empty(n_own, d, dtype=acc, device=q.device) if need_dx else None
        dt_part = torch.empty(n_own, dtype=acc, device=q.device) if need_dt else None
        n_dx = max(1, triton.cdiv(d, block_dx)) if need_dx and not resident else 1
        grid = (lambda meta, n_own=n_own, n_dx=n_dx: (triton.cdiv(n_own, meta["BLOCK_OWN"]), n_dx))
        for fixup, ((shift, w_neg, w_pos, g_cls), flags) in enumerate(passes):
            shift, w_neg, w_pos, g_cls = _scaled((shift, w_neg, w_pos, g_cls), scale)
            shift, w_neg, w_pos, flags = (None if x is None else tr.padded(x, 0)
                                          for x in (shift, w_neg, w_pos, flags))
            with _on_device(q):
                tk.launch(
                    kind, grid, tune=not fixup,
                    row_shift=shift, w_neg=w_neg, w_pos=w_pos, g_cls=g_cls, flags=flags,
                    s_gn=0 if g_cls is None else g_cls.stride(0),
                    s_gc=0 if g_cls is None else g_cls.stride(1), CLASS=g_cls is not None,
                    ds_scale=(row_scale if mode == "dq" else top_scale),
                    dx=dx, dt_part=dt_part, s_xn=d if need_dx else 0, s_xd=1 if need_dx else 0,
                    REF_MAJOR=mode == "dr", SYMMETRIC=mode == "sym", FIXUP=bool(fixup),
                    NEED_DX=need_dx, NEED_DT=need_dt, **common)
        if need_dx:
            out["dr" if mode == "dr" else "dq"] = dx.to(q.dtype)
        if need_dt:
            part = dt_part
    # empty sides (N or M = 0) launch nothing: their gradient is empty
    dq = (out["dq"] if out["dq"] is not None else torch.zeros_like(q)) \
        if need_q or (symmetric and need_r) else q.new_empty(0)
    dr = (out["dr"] if out["dr"] is not None else torch.zeros_like(r)) \
        if need_r and not symmetric else r.new_empty(0)
    if need_t:
        # dT = -1/T sum_ij ds_ij logit_ij
        total = part.sum() if part is not None else torch.zeros((), dtype=acc, device=q.device)
        dt = (-total / temperature.to(acc)).to(temperature.dtype)
    else:
        dt = temperature.new_empty(0)
    return dq, dr, dt


def _fake_grads(q, r, temperature, need_q, need_r, need_t, symmetric=False):
    return (q.new_empty(q.shape if need_q or (symmetric and need_r) else (0,)),
            r.new_empty(r.shape if need_r and not symmetric else (0,)),
            temperature.new_empty(() if need_t else (0,)))


def _symmetric(q, r, q_labels, r_labels, offset):
    """The batch loss (``r is q``, one label vector, self excluded or not): one kernel
    gives the whole gradient from the symmetric logits."""
    return q is r and q_labels is r_labels and (offset is None or offset == 0)


@torch.library.custom_op("nbkernels::triton_lse_bwd", mutates_args=())
def _lse_bwd(q: torch.Tensor, r: torch.Tensor, q_labels: torch.Tensor, r_labels: torch.Tensor,
             temperature: torch.Tensor, lse_all: torch.Tensor, lse_pos: torch.Tensor,
             g_all: torch.Tensor, g_pos: torch.Tensor, metric: str, offset: int,
             has_offset: bool, symmetric: bool, need_q: bool, need_r: bool, need_t: bool,
             precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if symmetric:
        r, r_labels = q, q_labels
    q, r, q_far, r_far = finite_rows(q, r, metric)
    acc = tr.acc_dtype(q.dtype)
    lse_all, lse_pos, g_all, g_pos = (x.contiguous().to(acc) for x in silent_rows(
        q_far, lse_all, lse_pos, g_all, g_pos))
    gmax = None
    if q.dtype == torch.float16:
        # |ds_ij| <= |g_all_i| + |g_pos_i|, counting only the terms a row has
        gmax = (torch.where(lse_all == float("-inf"), 0.0, g_all.float().abs())
                + torch.where(lse_pos == float("-inf"), 0.0, g_pos.float().abs()))
    main, fix, flags = lse_backward_rows(lse_all, lse_pos, g_all, g_pos)
    passes = [((*main, None), None), ((*fix, None), flags)]
    return _backward(q, r, tr.label_ranks(q_labels, r_labels), temperature, passes, gmax, 0,
                     metric, offset, has_offset, need_q, need_r, need_t, precision, r_far,
                     symmetric)


@_lse_bwd.register_fake
def _(q, r, q_labels, r_labels, temperature, lse_all, lse_pos, g_all, g_pos, metric, offset,
      has_offset, symmetric, need_q, need_r, need_t, precision):
    return _fake_grads(q, r, temperature, need_q, need_r, need_t, symmetric)


@torch.library.custom_op("nbkernels::triton_probs_bwd", mutates_args=())
def _probs_bwd(q: torch.Tensor, r: torch.Tensor, r_labels: torch.Tensor,
               temperature: torch.Tensor, yhat: torch.Tensor, lse_all: torch.Tensor,
               g: torch.Tensor, metric: str, offset: int, has_offset: bool, need_q: bool,
               need_r: bool, need_t: bool,
               precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = tr.acc_dtype(q.dtype)
    q, r, q_far, r_far = finite_rows(q, r, metric)
    yhat, lse_all, g = silent_rows(q_far, yhat, lse_all, g)
    lse_all, g = lse_all.contiguous().to(acc), g.to(acc)
    # delta_i = sum_c G_ic yhat_ic
    delta = (g * yhat.to(acc)).sum(1)
    gmax = None
    if q.dtype == torch.float16:
        # |ds_ij| <= 2 max_c |G_ic| (rows without a term have no ds)
        gmax = g.float().abs().amax(1) if g.shape[1] else lse_all.new_zeros(g.shape[0])
        gmax = torch.where(lse_all == float("-inf"), 0.0, gmax)
    none = lse_all == float("-inf")
    shift, corr = tr.exp_shift(lse_all)
    passes = [((shift, torch.where(none, 0.0, delta) * corr, None, g * corr[:, None]), None)]
    c = g.shape[1]
    labels = (None, tr.class_labels(r_labels, c))
    return _backward(q, r, labels, temperature, passes, gmax, c, metric, offset, has_offset,
                     need_q, need_r, need_t, precision, r_far, False)


@_probs_bwd.register_fake
def _(q, r, r_labels, temperature, yhat, lse_all, g, metric, offset, has_offset, need_q,
      need_r, need_t, precision):
    return _fake_grads(q, r, temperature, need_q, need_r, need_t)


# ------------------------------------------------------------------------- launchers


def _none_unless(t, need):
    return t if need else None


def lse_forward(q, r, q_labels, r_labels, temperature, *, metric, offset, precision=None):
    """Shifted ``(lse_all, lse_pos)``, each (N,) in the accumulation dtype."""
    _check(metric, precision)
    precision = precision or _default_precision()
    return torch.ops.nbkernels.triton_lse_fwd(q, r, q_labels, r_labels, temperature, metric,
                                              offset or 0, offset is not None, precision)


def lse_backward(q, r, q_labels, r_labels, temperature, lse_all, lse_pos, g_all, g_pos, *,
                 metric, offset, need_q, need_r, need_t, precision=None):
    """``(dq, dr, dt)`` of ``sum(g_all * lse_all + g_pos * lse_pos)``; ``None`` where not needed.

    ``g_all`` or ``g_pos`` may be ``None`` (zero). For the batch loss (``q is r``, one
    label vector) ``dq`` is the whole gradient and ``dr`` is ``None``.
    """
    _check(metric, precision)
    precision = precision or _default_precision()
    acc = tr.acc_dtype(q.dtype)
    g_all = torch.zeros_like(lse_all, dtype=acc) if g_all is None else g_all
    g_pos = torch.zeros_like(lse_pos, dtype=acc) if g_pos is None else g_pos
    sym = _symmetric(q, r, q_labels, r_labels, offset)
    dq, dr, dt = torch.ops.nbkernels.triton_lse_bwd(
        q, r, q_labels, r_labels, temperature, lse_all, lse_pos, g_all, g_pos, metric,
        offset or 0, offset is not None, sym, need_q, need_r, need_t, precision)
    return (_none_unless(dq, need_q or (sym and need_r)), _none_unless(dr, need_r and not sym),
            _none_unless(dt, need_t))


def probs_forward(q, r, r_labels, temperature, num_classes, *, metric, offset, precision=None):
    """``(yhat, lse_all)``: class distribution (N, num_classes) and shifted lse (N,), acc dtype.

    Rows without any reference get yhat = NaN (as the reference) and lse_all = -inf. Labels
    outside ``[0, num_classes)`` count in lse_all but in no class.
    """
    _check(metric, precision)
    precision = precision or _default_precision()
    return torch.ops.nbkernels.triton_probs_fwd(q, r, r_labels, temperature, int(num_classes),
                                                metric, offset or 0, offset is not None,
                                                precision)


def probs_backward(q, r, r_labels, temperature, yhat, lse_all, g, *, metric, offset, need_q,
                   need_r, need_t, precision=None):
    """``(dq, dr, dt)`` of ``sum(g * yhat)``; ``None`` where not needed."""
    _check(metric, precision)
    precision = precision or _default_precision()
    dq, dr, dt = torch.ops.nbkernels.triton_probs_bwd(
        q, r, r_labels, temperature, yhat, lse_all, g, metric, offset or 0,
        offset is not None, need_q, need_r, need_t, precision)
    return _none_unless(dq, need_q), _none_unless(dr, need_r), _none_unless(dt, need_t)
