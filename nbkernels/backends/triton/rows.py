"""The per-row vectors the Triton launchers (``forward``, ``backward``) hand the kernels: dense
label ranks, the has-a-positive mask, the column terms, and their padding and packing."""
import torch

from nbkernels._validation import acc_dtype

from . import common
from . import kernels as tk

LOG2E = common.LOG2E.value  # the kernels' constant, as a Python float


def label_ranks(q_labels, r_labels, order=False):
    """int32 dense ranks of both label vectors (equal labels, equal ranks), for the
    kernels' one-compare positives test. Exact for any int64 labels; no host sync.
    ``order``: a third value, for one label vector (``r_labels is q_labels``) its rows in
    label order (the sort that ranks them, stable; ``label_order`` takes it), else None."""
    same = r_labels is q_labels
    both = q_labels if same else torch.cat([q_labels, r_labels])
    s, idx = torch.sort(both, stable=True)
    new = torch.ones(s.shape, dtype=torch.int32, device=s.device)
    new[1:] = (s[1:] != s[:-1]).to(torch.int32)
    ranks = torch.empty_like(new).scatter_(0, idx, torch.cumsum(new, 0, dtype=torch.int32))
    if same:
        ranks = padded(ranks, -2)
        out = ranks, ranks
    else:
        n = q_labels.shape[0]
        out = padded(ranks[:n], -2), padded(ranks[n:], -2)
    return (*out, idx if same else None) if order else out


def label_order(b, ranks, order=None):
    """(the rows of label ranks ``b`` in label order (M,) int32, the range of each label
    rank there: [ptr[v], ptr[v + 1]) (ranks + 2,) for ranks 0..``ranks``); no host sync.
    ``order``: that order where the caller has it already (``label_ranks``)."""
    if order is None:
        order = torch.argsort(b, stable=True)
    ptr = torch.searchsorted(b[order], torch.arange(ranks + 2, device=b.device, dtype=b.dtype))
    return order.to(torch.int32), ptr


def has_positive(a, b, offset):
    """int8 (N,): 1 where some reference other than the excluded pair j = i + offset
    shares query i's label rank (``label_ranks``, >= 1). Counted by a scatter into
    N + M + 1 bins, so it needs no host sync."""
    count = torch.zeros(a.shape[0] + b.shape[0] + 1, dtype=torch.int32, device=a.device)
    count.scatter_add_(0, b.long(), torch.ones_like(b))
    has = count[a.long()]
    if offset is not None and b.shape[0] > 0:
        j = torch.arange(a.shape[0], device=a.device) + offset
        inside = (j >= 0) & (j < b.shape[0])
        has = has - (inside & (b[j.clamp(0, b.shape[0] - 1)] == a)).to(has.dtype)
    return (has > 0).to(torch.int8)


def padded(x, value, tail=False):
    """x (L,) padded with ``value`` to a multiple of ``PAD``: the kernels stream per-row
    vectors in unmasked tiles (padding weighs nothing: column term -inf, label rank -2 or
    class label -1, weight 0).
    ``tail``: PAD more, for tiles that start at any row (the class forward's)."""
    extra = -x.shape[0] % tk.PAD + (tk.PAD if tail else 0)
    return torch.cat([x, x.new_full((extra,), value)]) if extra else x


def transposed(x):
    """x (L, D) as a [D, L padded to a multiple of PAD] copy, zeros in the padding: the
    other side of the backward's OTHER_T variant, whose tiles then load unmasked along
    the rows (which the padded column terms weigh at 0) and vectorise."""
    n, d = x.shape
    out = x.new_zeros(d, n + (-n % tk.PAD))
    out[:, :n] = x.t()
    return out


def packed(labels, col):
    """One int64 per row: the bits of the fp32 column term high, the int32 label low (both
    padded alike), for the lse forward's one load per reference."""
    return (col.view(torch.int32).to(torch.int64) << 32) | (labels.to(torch.int64) & 0xFFFFFFFF)


def class_labels(labels, num_classes, tail=False):
    """int32 class labels for the kernels, -1 for labels outside [0, num_classes)
    (``padded``, with ``tail``)."""
    inside = (labels >= 0) & (labels < num_classes)
    return padded(torch.where(inside, labels, -1).to(torch.int32), -1, tail)


def logit_scale(temperature, metric):
    """The kernels' 0-dim logit scale c: s = fma(q.r, c, column term), c = 2/T
    ("sqeuclidean") or 1/T ("dot"); also the factor of their dx."""
    return (2.0 if metric == "sqeuclidean" else 1.0) / temperature.reshape(())


def column(x, far, metric, temperature, tail=False):
    """The kernels' per-row logit term -||x||^2/T of rows ``x`` in the accumulation dtype,
    padded (``padded``, with ``tail``) with -inf: zeros for "dot"; -inf at the rows flagged
    in ``far`` (references at infinity under "sqeuclidean": weight 0, their rows zeroed)."""
    acc = acc_dtype(x.dtype)
    if metric != "sqeuclidean":
        col = torch.zeros(x.shape[0], dtype=acc, device=x.device)
    else:
        col = -x.to(acc).pow(2).sum(1) / temperature
    if far is not None:
        col = col.masked_fill(far, float("-inf"))
    return padded(col, float("-inf"), tail)


def columns(q, r, r_far, metric, temperature):
    """(q_col, r_col): ``column`` of the queries and of the references (computed once
    when ``r is q`` and no reference is at infinity)."""
    q_col = column(q, None, metric, temperature)
    if r is q and r_far is None:
        return q_col, q_col
    return q_col, column(r, r_far, metric, temperature)


def _product_error(a, b, p):
    """a * b - p exactly, for p = fl(a * b) (b a 0-dim constant): fp32 through fp64,
    where the product is exact; fp64 by Dekker's split."""
    if a.dtype != torch.float64:
        return (a.double() * b.double() - p.double()).to(a.dtype)
    split = 134217729.0  # 2^27 + 1

    def halves(x):
        c = split * x
        hi = c - (c - x)
        return hi, x - hi

    a_hi, a_lo = halves(a)
    b_hi, b_lo = halves(b)
    return ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def exp_shift(lse):
    """(shift, corr) per row: the kernels' ``_exp(u, shift) * corr`` is exp(u - lse).

    shift = -fl(lse log2 e) in the accumulation dtype (as the kernels round it) and
    corr = 2^-d with d = lse log2 e - fl(lse log2 e), the exact rounding residue: a
    logit u equal to lse then gets exp2(d) 2^-d = 1, however large u is. Rows with
    lse = +-inf get shift 0 and corr 1 (the caller weighs them out); NaN stays NaN.
    """
    fin = torch.isfinite(lse)
    log2e = torch.tensor(LOG2E, dtype=lse.dtype, device=lse.device)
    x = torch.where(fin, lse, 0.0)
    x_l = x * log2e
    shift = torch.where(fin, -x_l, torch.where(torch.isnan(lse), lse, 0.0))
    return shift, torch.exp2(-_product_error(x, log2e, x_l))


def one_exp_rows(col, lse, shift, w_neg, w_pos, grow=None):
    """The symmetric backward's one exp2 per pair: (sym_w, ok, scale).

    The symmetric kernel's tile of own rows k and other rows j gives, from one logit
    u_kj = c x_k.x_j + n_j (n: ``column``), ds_kj = exp2(u L + shift_k) w_k and
    ds_jk = exp2(u' L + shift_j) w_j with u' = u + n_k - n_j (``neighbor_bwd_kernel``;
    shift, w_neg / w_pos: the main pass's row terms, w the one of the pair's label
    test). With g_i = n_i L - shift_i, a row's log2 normalizer, both are

        e_kj A_k B_k  and  e_kj A_k B_j,   e_kj = exp2(u L + s_k),

    where s_k = fl(n_k L - R) is the kernel's own-row shift, A_k = 2^(n_k L - R - s_k)
    its exact rounding residue, and B_i = 2^(R - g_i) w_i (positive and negative weight)
    are computed here in fp64: one exp2 per pair, and a sum ds_kj + ds_jk that is one
    FFMA and one multiply. The factors are exact up to a few ulps, and ds_jk then takes
    the exponent u + n_k - n_j exactly where the two-exp kernel rounds its own logit
    c x_k.x_j + n_k: the two forms differ by that rounding (ulp(|u|) in the exponent,
    1e-3 relative at |u| ~ 1e4 in fp32), each as close to the exact term as the logit's
    own rounding lets it be. R, common to
    all rows, sits ``ONE_EXP_LIMITS["above"]`` above the smallest g of a row with terms:
    e_kj <= 2^(g_k - R + 1), and a term flushed to 0 (exp2 below 2^-126) is one of
    size below 2^(above - 126) in its row.

    ``scale`` ((1,), a power of two 2^k): every B carries it and the kernel divides its
    sums by it (SCALE_DS), so that tiny upstream gradients, or a mean over many rows,
    keep their weights normal. ``grow`` (a 0-dim tensor): a bound on the factor by which
    the kernel's sums grow past the largest weight (the dx sum: 2 max|x| (N + 1); dT:
    the largest |logit|); k is then centred between every nonzero B staying a normal
    number and every sum staying below 2^``sums``. None: k = 0 (fp16, whose ds scale
    already bounds its weights for the 16-bit rounding).

    ``ok`` (int32 (1,), computed on the device: no host sync) is 1 when every row with
    terms has its g within ``spread`` of the others, such a k exists, and nothing is NaN
    or +inf; else the launcher's two-exp kernel runs. ``sym_w``: [4, rows padded] in the
    accumulation dtype: s (-inf at rows without terms, rows at infinity and padding:
    e = 0 there), A (1), B_neg, B_pos (0).
    """
    n = lse.shape[0]
    acc = shift.dtype
    dev = lse.device
    lim = tk.ONE_EXP_LIMITS["fp64" if acc == torch.float64 else "fp32"]
    log2e = torch.tensor(LOG2E, dtype=acc, device=dev).double()
    nl = col[:n].double() * log2e          # exact for fp32 columns
    g = nl - shift.double()
    has = torch.isfinite(g) & torch.isfinite(lse)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=dev)

    def extreme(x, fn, empty):
        return fn(x) if x.numel() else empty

    g_min = extreme(torch.where(has, g, inf), torch.amin, inf)
    g_max = extreme(torch.where(has, g, -inf), torch.amax, -inf)
    r = g_min + lim["above"]
    s = torch.where(has, nl - r, -inf)
    s_acc = s.to(acc)
    a = torch.where(has, torch.exp2(s - s_acc.double()), 1.0)
    factor = torch.exp2(torch.where(has, r - g, 0.0))
    b = torch.stack([torch.where(has & (w != 0), factor * w.double(), 0.0)
                     for w in (w_neg, w_pos)])
    bad = torch.isnan(lse) | (lse == float("inf")) | torch.isnan(w_neg) | torch.isnan(w_pos)
    bad = bad.any() | ~torch.isfinite(b).all()
    # log2 of the smallest and largest nonzero |B|, and of the largest |w| (the sums' scale)
    big = b.abs().nan_to_num(0.0)
    log_b_lo = torch.log2(extreme(torch.where(big > 0, big, inf), torch.amin, inf))
    log_b_hi = torch.log2(extreme(big, torch.amax, inf.new_zeros(())))
    w_all = torch.stack([w_neg, w_pos]).double().abs().nan_to_num(0.0)
    log_w = torch.log2(extreme(torch.where(has, w_all, 0.0), torch.amax, inf.new_zeros(())))
    k_lo = -lim["weight"] - log_b_lo
    k_hi = lim["weight"] - log_b_hi
    if grow is None:
        k = torch.zeros((), dtype=torch.float64, device=dev)
    else:
        k_hi = torch.minimum(k_hi, lim["sums"] - torch.log2(grow.double().clamp_min(1.0)) - log_w)
        # centred: as far from the weights' underflow as from the sums' overflow, and a
        # power of two the accumulation dtype holds as a normal number
        k = torch.floor((k_lo.clamp_min(-lim["weight"]) + k_hi.clamp_max(lim["weight"])) / 2)
        k = torch.where(torch.isfinite(k), k, 0.0).clamp(-lim["weight"], lim["weight"])
    fits = (k_lo <= k) & (k <= k_hi) | (log_b_hi == -inf)   # no nonzero weight: any k
    scale = torch.exp2(k)
    ok = (g_max - g_min <= lim["spread"]) & torch.isfinite(g_min) & ~bad & fits
    rows = [padded(s_acc, float("-inf")), padded(a.to(acc), 1.0),
            *(padded((x * scale).to(acc), 0.0) for x in b)]
    return (torch.stack(rows).contiguous(), ok.to(torch.int32).reshape(1),
            scale.to(acc).reshape(1))
