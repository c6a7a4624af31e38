"""The backward custom ops of the Triton backend (``nbkernels::triton_lse_bwd``,
``nbkernels::triton_probs_bwd``): the per-row shifts and weights of ds, and the dq / dr /
symmetric launches."""
import torch
import triton

from nbkernels.backends.fake import fake_grads
from nbkernels.backends.infinity import finite_rows, silent_rows

from . import kernels as tk
from . import rows as tr
from .args import _common, _feature_blocks, _on_device, _resident_limit


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


def lse_backward_rows(lse_all, lse_pos, g_all, g_pos):
    """Per query row: (main pass, fix-up pass, flags) of the one-exp lse backward.

    Each pass is (row_shift, w_neg, w_pos) in the kernel's terms (see
    ``neighbor_bwd_kernel`` and ``rows.exp_shift``). Main: p+ = p exp(lse_all -
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


def _sums_growth(x, col, c):
    """A bound on how far the symmetric kernel's sums grow past its largest weight
    (``rows.one_exp_rows``): a row's ds sum (its own terms and every other row's toward
    it) by N + 1, its dx sum by 2 max|x| (N + 1), dT by the largest |logit|,
    c max|x|^2 + 2 max|column term|."""
    n = x.shape[0]
    x2 = x.to(c.dtype).pow(2).sum(1).amax() if n else c.new_zeros(())
    fin = torch.isfinite(col)
    top = torch.where(fin, col.abs(), 0.0).amax() if col.numel() else c.new_zeros(())
    return torch.maximum((n + 1) * torch.clamp_min(2 * x2.sqrt(), 1.0), c * x2 + 2 * top)


def _symmetric_forms(two, x, col, lse, rows, gmax, top_scale, c):
    """The symmetric main pass's launches, from the two-exp kernel's arguments ``two``:
    that kernel alone below ONE_EXP_MIN_ROWS (a zero flag and a placeholder for the rows
    it does not read, so that it is the same compiled kernel as beside the one-exp form:
    a None would specialise it); else both forms, of which the device-side test of
    ``rows.one_exp_rows`` lets one work, the one-exp form last (what the tests see of a
    run is its output). Its weights carry a power of two of their own (fp16: the ds
    scale's, which bounds ds for its rounding)."""
    if x.shape[0] < tk.ONE_EXP_MIN_ROWS:
        return [dict(two, one_exp=torch.zeros(1, dtype=torch.int32, device=x.device),
                     sym_w=torch.zeros(1, dtype=col.dtype, device=x.device))]
    sym_w, ok, s_w = tr.one_exp_rows(col, lse, *rows,
                                     None if gmax is not None else _sums_growth(x, col, c))
    two = dict(two, sym_w=sym_w, one_exp=ok, s_sw=sym_w.stride(0))
    return [two, dict(two, ONE_EXP=True, SCALE_DS=True,
                      ds_scale=s_w if top_scale is None else s_w * top_scale)]


def _fixup_rows(mode, labels, flags, n, m):
    """The fix-up launch's rows (``neighbor_bwd_kernel``, FIXUP: the positives' terms of
    the flagged queries): its own rows grouped by label (dq: the flagged ones first, the
    others' programs skip), the other side in label order and each label's range there;
    no host sync."""
    a, b = labels[0][:n], labels[1][:m]
    own, other = (b, a) if mode == "dr" else (a, a if mode == "sym" else b)
    if mode == "dq":
        own = torch.where(flags[:n] != 0, a, n + m + 1)
    # one label vector: its order from the ranking sort (``label_ranks``)
    order, ptr = tr.label_order(other, n + m, labels[2] if len(labels) > 2 else None)
    own_perm = order if mode == "sym" else torch.argsort(own, stable=True).to(torch.int32)
    return dict(own_perm=own_perm, other_order=order, label_ptr=ptr)


def _backward(q, r, labels, temperature, passes, gmax, num_classes, metric, offset,
              has_offset, need_q, need_r, need_t, precision, r_far, symmetric, lse=None):
    """Launch the dq / dr (or, ``symmetric``, the one batch) kernels; reduce dT in torch.

    ``passes``: [(row_shift, w_neg, w_pos, g_cls), flags] per pass (main, then an optional
    fix-up with flags). ``gmax`` (N,) bounds |ds| per query row, given for fp16 inputs
    only (ds scaling). Gradients accumulate in the accumulation dtype and are cast once.
    ``symmetric``: the main pass is two launches, the kernel with one exp2 per pair
    (ONE_EXP) and the one with two, of which the device-side test of
    ``rows.one_exp_rows`` (on ``lse``, the rows' lse_all) lets exactly one work.
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
                  C=num_classes, BLOCK_DX=block_dx,
                  **_common(q, r, temperature, metric, offset, has_offset, precision, kind))
    chosen = tk.choose(kind, q.device, common["PRECISION"])
    # OTHER_T (kernels.VARIANTS): the other side's transposed copy, made once per side and
    # only for a launch that computes dx (a dT-only launch does no dx dot)
    copies = {}

    def other_t(x, need_dx):
        if not (chosen.flag("OTHER_T") and need_dx):
            return None, 0
        if id(x) not in copies:
            copies[id(x)] = tr.transposed(x)
        return copies[id(x)], copies[id(x)].stride(0)
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
        # the other side: q for dr, r for dq and the symmetric kernel (where r is q)
        y_t, s_yt = other_t(q if mode == "dr" else r, need_dx)
        sides = dict(q_t=y_t, r_t=None, s_qt=s_yt, s_rt=0) if mode == "dr" else \
            dict(q_t=None, r_t=y_t, s_qt=0, s_rt=s_yt)
        for fixup, ((shift, w_neg, w_pos, g_cls), flags) in enumerate(passes):
            shift, w_neg, w_pos, g_cls = _scaled((shift, w_neg, w_pos, g_cls), scale)
            forms = [dict(sym_w=None, one_exp=None, s_sw=0, ONE_EXP=False,
                          SCALE_DS=gmax is not None,
                          ds_scale=row_scale if mode == "dq" else top_scale)]
            if mode == "sym" and not fixup:
                forms = _symmetric_forms(forms[0], q, q_col, lse, (shift, w_neg, w_pos), gmax,
                                         top_scale, common["scale"])
            gather = dict(own_perm=None, other_order=None, label_ptr=None)
            if fixup:
                gather = _fixup_rows(mode, labels, flags, n, m)
            shift, w_neg, w_pos, flags = (None if x is None else tr.padded(x, 0)
                                          for x in (shift, w_neg, w_pos, flags))
            for form in forms:
                with _on_device(q):
                    tk.launch(
                        kind, grid, tune=not fixup and form is forms[-1], chosen=chosen, **sides,
                        **form, **gather,
                        row_shift=shift, w_neg=w_neg, w_pos=w_pos, g_cls=g_cls, flags=flags,
                        s_gn=0 if g_cls is None else g_cls.stride(0),
                        s_gc=0 if g_cls is None else g_cls.stride(1), CLASS=g_cls is not None,
                        dx=dx, dt_part=dt_part, s_xn=d if need_dx else 0,
                        s_xd=1 if need_dx else 0, REF_MAJOR=mode == "dr",
                        SYMMETRIC=mode == "sym", FIXUP=bool(fixup), NEED_DX=need_dx,
                        NEED_DT=need_dt, **common)
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
        dt = -total / temperature
    else:
        dt = temperature.new_empty(0)
    return dq, dr, dt


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
    return _backward(q, r, tr.label_ranks(q_labels, r_labels, order=True), temperature, passes,
                     gmax, 0, metric, offset, has_offset, need_q, need_r, need_t, precision,
                     r_far, symmetric, lse=lse_all)


@_lse_bwd.register_fake
def _(q, r, q_labels, r_labels, temperature, lse_all, lse_pos, g_all, g_pos, metric, offset,
      has_offset, symmetric, need_q, need_r, need_t, precision):
    return fake_grads(q, r, temperature, need_q, need_r, need_t, symmetric)


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
    return fake_grads(q, r, temperature, need_q, need_r, need_t)
