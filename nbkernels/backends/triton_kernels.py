"""Triton kernels for the fused neighbor losses; the math is in ``reference.py``.

Two kernels, each one body with ``tl.constexpr`` flags (metric, self-exclusion,
class output, accumulation dtype, dot precision). Logits are taken in log2 units:
log2(e)/T is folded into one scale and every exponential is one ``exp2``, as
FlashAttention does. The launcher passes the per-row terms that do not depend on the
pair, so that the loop does no per-pair work for them:

* ``r_col`` (M,): the column term ``-||r_j||^2 log2(e)/T`` for "sqeuclidean" (0 for
  "dot"), -inf for references at infinity (weight 0), so that the logit
  ``2 q.r log2(e)/T + column term`` is one FFMA per pair. The backward also takes
  ``q_col``, the same term of the queries.
* labels are int32 (the launcher ranks int64 labels densely, exactly): one compare
  per pair, not two. PACKED (the lse forward, fp32 accumulation): each reference's
  column term and label rank travel as one int64 (``r_pack``), one load for both.
* every per-row vector that a program streams (column terms, labels, the backward's
  row terms and flags) is padded by the launcher to a multiple of PAD with values that
  weigh nothing (column term -inf): its tile loads need no mask,
  and vectorise.
* self-exclusion (``offset``) is masked only in the reference tiles that meet the
  diagonal ``j = i + offset``: they are peeled out of the main loop as straight-line
  code (FlashAttention's causal split), so the main loop has no mask at all.

RESIDENT (D <= MAX_RESIDENT_D): the program's own rows (the query tile forward, the
dx-owner tile backward) are loaded once, [BLOCK, BLOCK_D >= D], before the loop, and
every logit tile is one ``tl.dot`` over the whole feature dim. Otherwise D is looped
in BLOCK_D chunks and both sides are reloaded per tile.

* ``neighbor_fwd_kernel``: a program owns BLOCK_M queries and streams BLOCK_N
  reference tiles with an online log-sum-exp. Without CLASS: one exp2 per pair; the
  positives' sum is taken from the same exponentials under the shared running max,
  and rows where it underflows get an exact second launch (POS_PASS). With CLASS the
  grid has a second axis over BLOCK_C class tiles; references are pre-sorted by label,
  so the program for class tile ``c`` streams only the references whose labels fall in
  it (``tile_ptr``) and accumulates their mass with a one-hot ``tl.dot``.
* ``neighbor_bwd_kernel``: recomputes each logit tile once and turns it into
  ``ds = dloss / dlogit`` with one exp2 per pair and direction (see its docstring).
  No atomics: every output element has exactly one writer per launch, and launches
  run in a fixed order, so gradients are bitwise deterministic.

Blocks: BLOCK_D / BLOCK_DX are chosen by the launcher from D; BLOCK_M / BLOCK_N /
BLOCK_OWN / BLOCK_OTHER are autotuned on power-of-two buckets of (N, M, D), the input
dtype and the flags that change the kernel. Under the interpreter (TRITON_INTERPRET=1)
a single 16-wide config keeps the tests fast and still exercises multi-block paths,
and the resident limit is 32 so that tests reach both paths; NBK_TRITON_AUTOTUNE=0
(read at import) fixes the smallest GPU config, for tests that must not autotune.
All blocks are >= 16, the smallest ``tl.dot``.

fp16 gradient dot: ds is rounded to fp16 for the tensor-core dot, and |ds| <= |g| can
sit far below fp16's normal range (g ~ 1/N for a mean loss). With SCALE_DS the
launcher has multiplied the per-row weights of ds by powers of two that bring the
largest |ds| near 2^12 (per query row for dq, one for all rows otherwise), and passes
them in ``ds_scale``; the kernel divides after the dot, exactly.
"""
import contextlib
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Floors of the positives' sum under the shared max (neighbor_fwd_kernel): 2^-64, 2^-960
POS_FLOOR_F32 = tl.constexpr(2.0 ** -64)
POS_FLOOR_F64 = tl.constexpr(2.0 ** -960)
# A tile's sum above this moves the forward's row shift (neighbor_fwd_kernel): 2^64, 2^512
RESCALE_F32 = tl.constexpr(2.0 ** 64)
RESCALE_F64 = tl.constexpr(2.0 ** 512)
# The same limits in log2 units, for the backward's one-exp positives (launcher side)
POS_LOG2_LIMIT = {"fp32": 64.0, "fp64": 960.0}

# Feature-dim chunk of the logit dot when not resident, and widest dq / dr slice.
MAX_BLOCK_D = 16 if INTERPRET else 64
MAX_BLOCK_DX = 64 if INTERPRET else 128
# Largest D whose own tile is held for the whole loop (forward / backward).
MAX_RESIDENT_D = 32 if INTERPRET else 256
MAX_RESIDENT_D_BWD = 32 if INTERPRET else 128
# Class tile width of the class-distribution forward (one-hot dot of [BN, BC]): at most 32
# while the references fill the class tiles (``class_block_cap``), else 64.
MAX_BLOCK_C = 16 if INTERPRET else 64
NARROW_BLOCK_C = 16 if INTERPRET else 32


def class_block_cap(c, m):
    """The widest class tile for C classes over M references.

    A class tile's references end in a part-filled reference tile, which wastes about
    C BLOCK_N / (2 BLOCK_C M) of the pairs. The narrow tile halves the [BM, BC] mass and
    the one-hot beside the logit tile (predicted from compiled SASS, triton 3.9, bf16
    128 x 64: 27.8 -> 23.3 instructions per pair; triton 3.6: 42.2 -> 27.7), and is
    taken where that waste stays small, M >= 10 C; prototypes (M ~ C) keep 64.
    """
    return NARROW_BLOCK_C if 10 * c <= m else MAX_BLOCK_C
# Streamed per-row vectors are padded to a multiple of this (>= every BLOCK_N / OTHER).
PAD = 128

# The configs a GPU autotunes over (also run one by one by the GPU tests).
GPU_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2),
                         (64, 64, 4, 2), (64, 32, 4, 3), (32, 32, 4, 2)]
]
GPU_BWD_CONFIGS = [
    triton.Config({"BLOCK_OWN": bo, "BLOCK_OTHER": bt}, num_warps=w, num_stages=s)
    for bo, bt, w, s in [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2),
                         (64, 32, 4, 2), (64, 32, 4, 3), (32, 32, 4, 2)]
]


def fits(config, elem, block_d, cls=False):
    """Whether a config suits the kernel: its tiles (the own tile plus ``num_stages``
    other tiles of [rows, block_d] elements of ``elem`` bytes) fit in 200 KB of sm_90's
    227 KB of shared memory (fp32 at 128 x 128 with 3 stages does not), and, for the
    class forward (``cls``), its [BM, BN] tile is at most 128 x 64: beside the
    [BM, BLOCK_C] class mass a 128 x 128 tile spills (456 B in the compiled SASS) and is
    predicted no faster."""
    kw = config.kwargs
    own = kw.get("BLOCK_M", kw.get("BLOCK_OWN"))
    other = kw.get("BLOCK_N", kw.get("BLOCK_OTHER"))
    if cls and own * other > 128 * 64:
        return False
    return (own + max(config.num_stages, 1) * other) * block_d * elem <= 200 * 1024


def _prune(configs, named_args, **kwargs):
    """The autotuner's early prune: the configs that ``fits`` (at least one)."""
    args = {**named_args, **kwargs}
    q = args.get("q")
    elem = q.element_size() if hasattr(q, "element_size") else 2
    cls = bool(args.get("CLASS")) and "BLOCK_M" in configs[0].kwargs  # the class forward
    keep = [c for c in configs if fits(c, elem, args.get("BLOCK_D", 64), cls)]
    return keep or configs[-1:]


if INTERPRET:
    FWD_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})]
    BWD_CONFIGS = [triton.Config({"BLOCK_OWN": 16, "BLOCK_OTHER": 16})]
elif os.environ.get("NBK_TRITON_AUTOTUNE", "1") == "0":
    # one config: no benchmarking; the smallest fits every dtype's shared memory
    FWD_CONFIGS, BWD_CONFIGS = GPU_FWD_CONFIGS[-1:], GPU_BWD_CONFIGS[-1:]
else:
    FWD_CONFIGS, BWD_CONFIGS = GPU_FWD_CONFIGS, GPU_BWD_CONFIGS
PRUNE = {"early_config_prune": _prune}
# Tuning keys: power-of-two buckets of (N, M, D) and every flag that changes the kernel;
# the tensor dtypes join the key (and fix ACC, MASS_PRECISION, SCALE_DS), D_KEY fixes
# BLOCK_D, BLOCK_DX and RESIDENT.
FWD_KEY = ["N_KEY", "M_KEY", "D_KEY", "SQEUCLID", "HAS_OFFSET", "CLASS", "POS_PASS",
           "PRECISION", "BLOCK_C"]
BWD_KEY = ["N_KEY", "M_KEY", "D_KEY", "SQEUCLID", "HAS_OFFSET", "CLASS", "REF_MAJOR",
           "SYMMETRIC", "FIXUP", "NEED_DX", "NEED_DT", "PRECISION"]
# Integers that vary per call and gain nothing from specialization (== 1, % 16): one
# compiled kernel for every size. Strides and D stay specialized.
FWD_NO_SPECIALIZE = ["N", "M", "offset", "N_KEY", "M_KEY", "D_KEY"]
BWD_NO_SPECIALIZE = FWD_NO_SPECIALIZE + ["C"]


@contextlib.contextmanager
def fixed_configs(fwd, bwd):
    """Run both kernels with one given config each (tests go through every GPU config)."""
    saved = neighbor_fwd_kernel.configs, neighbor_bwd_kernel.configs
    neighbor_fwd_kernel.configs, neighbor_bwd_kernel.configs = [fwd], [bwd]
    try:
        yield
    finally:
        neighbor_fwd_kernel.configs, neighbor_bwd_kernel.configs = saved


@triton.jit
def _load_rows(x, o, m, D, s_n, s_d, BLOCK_D: tl.constexpr):
    """[B, BLOCK_D] rows ``o`` of x (zeros outside ``m`` and beyond D)."""
    o_k = tl.arange(0, BLOCK_D)
    return tl.load(x + o[:, None] * s_n + o_k[None, :] * s_d,
                   mask=m[:, None] & (o_k < D)[None, :], other=0)


@triton.jit
def _rows_dot(b_x, x, y, o_x, m_x, o_y, m_y, D, s_xn, s_xd, s_yn, s_yd,
              RESIDENT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr):
    """x_i . y_j, [BX, BY] in ACC, and the y tile [BY, BLOCK_D] (RESIDENT only).

    RESIDENT: b_x [BX, BLOCK_D >= D] is the caller's resident tile and y is loaded once
    over the whole feature dim. Else D is looped in BLOCK_D chunks of both sides (the
    returned y tile is then its last chunk, unused by callers).
    """
    if RESIDENT:
        b_y = _load_rows(y, o_y, m_y, D, s_yn, s_yd, BLOCK_D)
        b_xy = tl.dot(b_x, tl.trans(b_y), input_precision=PRECISION, out_dtype=ACC)
    else:
        b_xy = tl.zeros([BLOCK_X, BLOCK_Y], dtype=ACC)
        for i_k in range(0, D, BLOCK_D):
            o_k = i_k + tl.arange(0, BLOCK_D)
            m_k = o_k < D
            b_xc = tl.load(x + o_x[:, None] * s_xn + o_k[None, :] * s_xd,
                           mask=m_x[:, None] & m_k[None, :], other=0)
            b_yc = tl.load(y + o_y[None, :] * s_yn + o_k[:, None] * s_yd,
                           mask=m_y[None, :] & m_k[:, None], other=0)
            b_xy = tl.dot(b_xc, b_yc, b_xy, input_precision=PRECISION, out_dtype=ACC)
        b_y = tl.zeros([BLOCK_Y, BLOCK_D], dtype=b_x.dtype)
    return b_xy, b_y


@triton.jit
def _col_term(r_col, o, m, MASKED: tl.constexpr, ACC: tl.constexpr):
    """[B] the launcher's per-row logit terms -||x||^2 log2(e)/T (0 for "dot"); -inf for
    rows at infinity and for padding. MASKED: ``o`` may leave the padded vector."""
    if MASKED:
        return tl.load(r_col + o, mask=m, other=float("-inf")).to(ACC)
    else:
        return tl.load(r_col + o).to(ACC)


@triton.jit
def _diagonal(i_x, i_y, offset, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr):
    """[BX, BY] mask of the pairs j = i + offset of a tile that meets the diagonal, from
    int32 tile-local indices (one compare per pair; the tile's shift fits in int32)."""
    shift = (i_x + offset - i_y).to(tl.int32)
    return tl.arange(0, BLOCK_Y)[None, :] == tl.arange(0, BLOCK_X)[:, None] + shift


@triton.jit
def _online_lse2(b_m, b_l, b_s):
    """One step of an online log2-sum-exp2 over the rows of b_s [BM, BN] (log2 units).

    Returns the new running max and sum, the tile's exp2(s - max) and the rescale
    factor of the old sum. tl.max may drop NaN; b_l still turns NaN through exp2.
    """
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    # all terms so far masked (-inf): shift by 0 so that exp2 sees -inf, not NaN
    b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)
    b_alpha = tl.math.exp2(b_m - b_ms)
    # [BM, BN] the one exponential of each pair
    b_p = tl.math.exp2(b_s - b_ms[:, None])
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    return b_mn, b_l, b_p, b_alpha


@triton.constexpr_function
def _peeled(HAS_OFFSET, BLOCK_X, BLOCK_Y):
    """How many BLOCK_Y tiles the diagonal of BLOCK_X rows can meet (0 without offset)."""
    return (BLOCK_X // BLOCK_Y + 1 if BLOCK_X >= BLOCK_Y else 2) if HAS_OFFSET else 0


@triton.jit
def _diagonal_tiles(i_x, shift, hi, HAS_OFFSET: tl.constexpr, BLOCK_X: tl.constexpr,
                    BLOCK_Y: tl.constexpr):
    """[t_lo, t_hi): the BLOCK_Y tiles of [0, hi) that hold a column i + shift of the rows
    [i_x, i_x + BX); empty without offset. At most ``_peeled`` tiles."""
    if HAS_OFFSET:
        c0 = tl.minimum(tl.maximum(i_x + shift, 0), hi)
        c1 = tl.minimum(tl.maximum(i_x + shift + BLOCK_X, 0), hi)
        t_lo = c0 // BLOCK_Y
        t_hi = tl.where(c1 > c0, tl.cdiv(c1, BLOCK_Y), t_lo)
    else:
        t_lo = hi * 0
        t_hi = t_lo
    return t_lo, t_hi


@triton.jit
def _fwd_lse_tile(b_m, b_l, b_mp, b_lp, b_q, b_a, q, r, r_labels, r_col, r_pack, i_n, i_m0, o_m,
                  m_m, hi, D, offset, s_qn, s_qd, s_rm, s_rd, b_c, DIAG: tl.constexpr,
                  FIRST: tl.constexpr, POS_PASS: tl.constexpr, PACKED: tl.constexpr,
                  RESIDENT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One reference tile [i_n, i_n + BN) of the lse forward: (shift, sum, positives'
    shift, positives' sum), updated. DIAG: the tile may meet the diagonal (masked).

    Main pass: FIRST sets the row shift b_m to the tile's max; later tiles keep it fixed
    (no per-pair max) and only move it, by a power of two applied to both sums, when a
    tile's sum passes RESCALE: the shift stays within log2(BN) + 1 of the running max. A
    term that overflows before that (the shift lagging by >= 128) makes the sum inf, and
    the row is flagged for the exact pass. POS_PASS: the exact pass, each sum with its own
    running max (b_m, b_l and b_mp, b_lp).
    """
    # tile-local int32 row offsets from tile base pointers: 32-bit address math per element
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < hi - i_n
    b_qr, _ = _rows_dot(b_q, q, r + i_n * s_rm, o_m, m_m, o_n, m_n, D, s_qn, s_qd, s_rm, s_rd,
                        RESIDENT=RESIDENT, ACC=ACC, PRECISION=PRECISION,
                        BLOCK_X=BLOCK_M, BLOCK_Y=BLOCK_N, BLOCK_D=BLOCK_D)
    # [BN] column terms and labels (padded: no mask)
    if PACKED:
        # one int64 per reference: the fp32 column term's bits high, the label rank low
        b_w = tl.load(r_pack + i_n + o_n)
        b_b = b_w.to(tl.int32)
        b_col = (b_w >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        b_b = tl.load(r_labels + i_n + o_n)
        b_col = _col_term(r_col + i_n, o_n, m_n, False, ACC)
    b_s = b_qr * b_c + b_col[None, :]
    if DIAG:
        if POS_PASS:
            # rows o_m in the launcher's order: the pairs j = o_m + offset, anywhere
            m_self = (i_n + o_n)[None, :] == o_m[:, None] + offset
        else:
            m_self = _diagonal(i_m0, i_n, offset, BLOCK_M, BLOCK_N)
        b_s = tl.where(m_self, float("-inf"), b_s)
    m_pos = b_a[:, None] == b_b[None, :]
    if POS_PASS:
        b_m, b_l, _, _ = _online_lse2(b_m, b_l, b_s)
        b_mp, b_lp, _, _ = _online_lse2(b_mp, b_lp, tl.where(m_pos, b_s, float("-inf")))
    elif FIRST:
        # a row whose first tile is all masked gets shift -inf: its sums turn inf / NaN,
        # and it is flagged
        b_m = tl.max(b_s, 1)
        # [BM, BN] the one exponential of each pair
        b_p = tl.math.exp2(b_s - b_m[:, None])
        b_l = tl.sum(b_p, 1)
        b_lp = tl.sum(tl.where(m_pos, b_p, 0.0), 1)
    else:
        b_p = tl.math.exp2(b_s - b_m[:, None])
        b_t = tl.sum(b_p, 1)
        b_tp = tl.sum(tl.where(m_pos, b_p, 0.0), 1)
        # [BM] lazy shift: k = 0 unless the tile's sum passed RESCALE
        RESCALE: tl.constexpr = RESCALE_F64 if ACC == tl.float64 else RESCALE_F32
        b_k = tl.where(b_t > RESCALE, tl.math.ceil(tl.log2(b_t)), 0.0)
        b_sc = tl.math.exp2(-b_k)
        b_l = (b_l + b_t) * b_sc
        b_lp = (b_lp + b_tp) * b_sc
        b_m = b_m + b_k
    return b_m, b_l, b_mp, b_lp


@triton.autotune(configs=FWD_CONFIGS, key=FWD_KEY, prune_configs_by=PRUNE)
@triton.jit(do_not_specialize=FWD_NO_SPECIALIZE)
def neighbor_fwd_kernel(q, r, q_labels, r_labels, temperature, r_col, r_pack, perm, tile_ptr,
                        lse_all, lse_pos, redo, mass, tile_max, tile_sum,
                        N, M, D, offset, s_qn, s_qd, s_rm, s_rd,
                        N_KEY, M_KEY, D_KEY,
                        SQEUCLID: tl.constexpr, HAS_OFFSET: tl.constexpr,
                        CLASS: tl.constexpr, POS_PASS: tl.constexpr, PACKED: tl.constexpr,
                        RESIDENT: tl.constexpr,
                        ACC: tl.constexpr, PRECISION: tl.constexpr, MASS_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """Online log-sum-exps (CLASS=False) or per-class-tile mass (CLASS=True).

    Logit tile, log2 units: ``s = q.r c + colterm`` with c = (2 or 1) log2(e)/T and the
    column term of ``_col_term`` (the row constant -||q||^2/T is left out: shifted lse).

    CLASS=False writes lse_all, lse_pos (N,) with one exp2 per pair: the positives' sum
    uses the same exponentials under the shared row shift (``_fwd_lse_tile``: set by the
    first tile, moved only by powers of two). That sum is exact unless positives
    underflow against the shift (extreme T: they sit far below the nearest negative).
    ``redo`` (N,) int8 comes in as the launcher's has-a-positive mask and goes out as the
    rows for the exact pass: those with a positive whose sum ends below POS_FLOOR, and
    those whose total is not a normal number (no term, an overflow past a lagging shift,
    NaN). A second launch with POS_PASS=True recomputes both sums of the flagged rows
    only, each with its own running max; it takes the rows in the order of ``perm``
    (the launcher puts the flagged ones first), and programs without a flagged row skip
    the loop, so its cost is that of ceil(flagged / BLOCK_M) blocks.
    Terms lost to underflow are each below 2^-126 of the shift (fp32), so a sum >=
    POS_FLOOR = 2^-64 is exact to 2^-31 relative for M < 2^31; fp64: 2^-1022 and 2^-960.

    CLASS=True reads the references in label order (the launcher sorts r, r_col and
    r_labels; perm holds their original indices, for the self-pair mask; tile_ptr: the
    references of class tile c are rows tile_ptr[c]:tile_ptr[c+1]) and writes mass
    (N, n_tiles * BLOCK_C), every column (those >= C are cut off by the launcher),
    relative to tile_max, plus tile_max (natural units) and tile_sum (N, n_tiles).
    """
    i_m = tl.program_id(0).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N
    if POS_PASS:
        # the exact pass takes its rows in the launcher's order (``perm``: the flagged
        # rows first), so that only the first few programs find one
        o_m = tl.load(perm + o_m, mask=m_m, other=0).to(tl.int64)
    b_it = LOG2E / tl.load(temperature).to(ACC)
    b_c = 2 * b_it if SQEUCLID else b_it
    b_q = tl.zeros([BLOCK_M, BLOCK_D], dtype=q.dtype.element_ty)
    if RESIDENT:
        b_q = _load_rows(q, o_m, m_m, D, s_qn, s_qd, BLOCK_D)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    b_l = tl.zeros([BLOCK_M], dtype=ACC)
    if CLASS:
        i_c = tl.program_id(1).to(tl.int64)
        o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        lo = tl.load(tile_ptr + i_c)
        hi = tl.load(tile_ptr + i_c + 1)
        b_y = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    else:
        lo = 0
        hi = M
        # [BM]
        b_a = tl.load(q_labels + o_m, mask=m_m, other=0)
        b_lp = tl.zeros([BLOCK_M], dtype=ACC)
        b_mp = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
        if POS_PASS:
            b_redo = tl.load(redo + o_m, mask=m_m, other=0)
            # no flagged row in this block: no reference tile at all
            hi = tl.where(tl.max(b_redo, 0) > 0, M, 0)
    if CLASS:
        for i_n in range(lo, hi, BLOCK_N):
            # r, r_col and r_labels arrive in label order: tile-local offsets, no gather
            o_n = tl.arange(0, BLOCK_N)
            m_n = o_n < hi - i_n
            b_qr, _ = _rows_dot(b_q, q, r + i_n * s_rm, o_m, m_m, o_n, m_n, D, s_qn, s_qd, s_rm,
                                s_rd, RESIDENT=RESIDENT, ACC=ACC, PRECISION=PRECISION,
                                BLOCK_X=BLOCK_M, BLOCK_Y=BLOCK_N, BLOCK_D=BLOCK_D)
            b_s = b_qr * b_c + _col_term(r_col + i_n, o_n, m_n, True, ACC)[None, :]
            if HAS_OFFSET:
                # [BN] original index of the references: the diagonal can be anywhere
                o_r = tl.load(perm + i_n + o_n, mask=m_n, other=-1)
                b_s = tl.where(o_r[None, :] == o_m[:, None] + offset, float("-inf"), b_s)
            b_m, b_l, b_p, b_alpha = _online_lse2(b_m, b_l, b_s)
            # [BN] sorted labels (-1: in no class)
            b_b = tl.load(r_labels + i_n + o_n, mask=m_n, other=-1)
            # [BN, BC] one-hot; mass_ic = sum_{b_j=c} exp2(s_ij - max_i), rescaled like b_l
            b_hot = (b_b[:, None] == o_c[None, :]).to(ACC)
            b_y = b_y * b_alpha[:, None]
            if MASS_PRECISION == "tf32x2":
                # p = hi + lo, hi truncated to TF32's 10 mantissa bits and lo the exact rest:
                # the one-hot is exact in TF32, so two TF32 dots carry p to 2^-21 relative,
                # as 3xTF32 would (its third product, lo x lo of the one-hot, is 0)
                b_hi = (b_p.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
                b_y = tl.dot(b_hi, b_hot, b_y, input_precision="tf32", out_dtype=ACC)
                b_y = tl.dot(b_p - b_hi, b_hot, b_y, input_precision="tf32", out_dtype=ACC)
            else:
                b_y = tl.dot(b_p, b_hot, b_y, input_precision=MASS_PRECISION, out_dtype=ACC)
    elif POS_PASS:
        # rows in any order: every tile with the general self-pair mask
        for i_n in range(0, hi, BLOCK_N):
            b_m, b_l, b_mp, b_lp = _fwd_lse_tile(
                b_m, b_l, b_mp, b_lp, b_q, b_a, q, r, r_labels, r_col, r_pack, i_n,
                i_m * BLOCK_M, o_m, m_m, hi, D, offset, s_qn, s_qd, s_rm, s_rd, b_c, HAS_OFFSET,
                False, True, PACKED, RESIDENT, ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        # the first tile (the first one that meets the diagonal, else tile 0) sets the row
        # shift; the other diagonal tiles follow, unrolled (straight-line code), then the
        # main loop over the rest, which has no mask and no per-pair max at all
        n_t = tl.cdiv(hi, BLOCK_N)
        t_lo, t_hi = _diagonal_tiles(i_m * BLOCK_M, offset, hi, HAS_OFFSET, BLOCK_M, BLOCK_N)
        n_diag = t_hi - t_lo
        # the tiles [e_lo, e_lo + e_n) are peeled off the main loop
        e_lo = tl.where(n_diag > 0, t_lo, 0)
        e_n = tl.where(n_diag > 0, n_diag, tl.minimum(n_t, 1))
        if n_t > 0:
            b_m, b_l, b_mp, b_lp = _fwd_lse_tile(
                b_m, b_l, b_mp, b_lp, b_q, b_a, q, r, r_labels, r_col, r_pack, e_lo * BLOCK_N,
                i_m * BLOCK_M, o_m, m_m, hi, D, offset, s_qn, s_qd, s_rm, s_rd, b_c, HAS_OFFSET,
                True, POS_PASS, PACKED, RESIDENT, ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        for k in tl.static_range(1, _peeled(HAS_OFFSET, BLOCK_M, BLOCK_N)):
            if k < n_diag:
                b_m, b_l, b_mp, b_lp = _fwd_lse_tile(
                    b_m, b_l, b_mp, b_lp, b_q, b_a, q, r, r_labels, r_col, r_pack,
                    (t_lo + k) * BLOCK_N, i_m * BLOCK_M, o_m, m_m, hi, D, offset, s_qn, s_qd,
                    s_rm, s_rd, b_c, True, False, POS_PASS, PACKED, RESIDENT, ACC, PRECISION,
                    BLOCK_M, BLOCK_N, BLOCK_D)
        for t in range(0, n_t - e_n):
            i_n = (t + tl.where(t >= e_lo, e_n, 0)) * BLOCK_N
            b_m, b_l, b_mp, b_lp = _fwd_lse_tile(
                b_m, b_l, b_mp, b_lp, b_q, b_a, q, r, r_labels, r_col, r_pack, i_n,
                i_m * BLOCK_M, o_m, m_m, hi, D, offset, s_qn, s_qd, s_rm, s_rd, b_c, False,
                False, POS_PASS, PACKED, RESIDENT, ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    if CLASS:
        n_tiles = tl.num_programs(1)
        tl.store(mass + o_m[:, None] * (n_tiles * BLOCK_C) + o_c[None, :], b_y,
                 mask=m_m[:, None])
        tl.store(tile_max + o_m * n_tiles + i_c, b_m * LN2, mask=m_m)
        tl.store(tile_sum + o_m * n_tiles + i_c, b_l, mask=m_m)
    elif POS_PASS:
        # no term: max -inf and sum 0 give -inf; back to natural units
        m_out = m_m & (b_redo != 0)
        tl.store(lse_all + o_m, (b_m + tl.log2(b_l)) * LN2, mask=m_out)
        tl.store(lse_pos + o_m, (b_mp + tl.log2(b_lp)) * LN2, mask=m_out)
    else:
        tl.store(lse_all + o_m, (b_m + tl.log2(b_l)) * LN2, mask=m_m)
        tl.store(lse_pos + o_m, (b_m + tl.log2(b_lp)) * LN2, mask=m_m)
        # exact second pass for: positives underflowed against the shift (in a row that
        # has a positive: the launcher's count in ``redo``; a row without one has b_lp
        # = 0 exactly, and lse_pos = -inf is already exact); a sum that is not a normal
        # number (0: no term; inf: the shift lagged; NaN: a first tile all masked, +inf
        # logits or NaN inputs, which stay NaN there); a shift of +inf
        b_has = tl.load(redo + o_m, mask=m_m, other=0) != 0
        FLOOR: tl.constexpr = POS_FLOOR_F64 if ACC == tl.float64 else POS_FLOOR_F32
        b_redo = ((b_lp < FLOOR) & b_has) | ~(b_l >= FLOOR)
        b_redo = b_redo | (b_l == float("inf")) | (b_m == float("inf"))
        tl.store(redo + o_m, b_redo.to(tl.int8), mask=m_m)


@triton.jit
def _ds_dir(b_u, b_pos, b_shift, b_wneg, b_wpos, FIXUP: tl.constexpr):
    """ds of one direction: exp2(u + shift) * (w_pos where positive, else w_neg).

    FIXUP (positives only, shifted by lse_pos): the negatives' exp2 may overflow, so
    they are selected out after the product rather than weighted by 0.
    """
    if FIXUP:
        return tl.where(b_pos, tl.math.exp2(b_u + b_shift) * b_wpos, 0.0)
    else:
        return tl.math.exp2(b_u + b_shift) * tl.where(b_pos, b_wpos, b_wneg)


@triton.jit
def _bwd_tile(b_acc, b_sum, b_dt, i_t, i_o0, b_x, x, y, s_x, s_xk, s_y, s_yk, y_labels, y_col,
              row_shift, w_neg, w_pos, flags, g_cls, s_gn, s_gc, b_xn, b_xl, b_sh, b_wn, b_wp,
              b_fl, o_own, m_own, o_dx, m_dx, n_other, D, offset, b_c, b_it,
              DIAG: tl.constexpr, SQEUCLID: tl.constexpr, CLASS: tl.constexpr,
              REF_MAJOR: tl.constexpr, SYMMETRIC: tl.constexpr, FIXUP: tl.constexpr,
              NEED_DX: tl.constexpr, NEED_DT: tl.constexpr, RESIDENT: tl.constexpr,
              ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_OWN: tl.constexpr,
              BLOCK_OTHER: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DX: tl.constexpr):
    """One other-side tile [i_t, i_t + BOTHER) of ``neighbor_bwd_kernel``: the dx
    accumulator, the row sums of ds and the dT partial sums, updated. DIAG: the tile meets
    the diagonal, whose pairs get ds = 0. Own-side terms (b_x*, b_sh, b_w*, b_fl) come
    from the caller; the other side's are loaded here from the padded vectors."""
    # tile-local int32 row offsets from tile base pointers: 32-bit address math per element
    o_t = tl.arange(0, BLOCK_OTHER)
    m_t = o_t < n_other - i_t
    run = True
    if FIXUP:
        if REF_MAJOR or SYMMETRIC:
            b_tf = tl.load(flags + i_t + o_t)
            if SYMMETRIC:
                run = (tl.max(b_tf, 0) > 0) | (tl.max(b_fl, 0) > 0)
            else:
                run = tl.max(b_tf, 0) > 0
    if run:
        y_t = y + i_t * s_y
        b_xy, b_yt = _rows_dot(b_x, x, y_t, o_own, m_own, o_t, m_t, D, s_x, s_xk, s_y, s_yk,
                               RESIDENT=RESIDENT, ACC=ACC, PRECISION=PRECISION,
                               BLOCK_X=BLOCK_OWN, BLOCK_Y=BLOCK_OTHER, BLOCK_D=BLOCK_D)
        b_v = b_xy * b_c
        # [BOTHER] the other rows' terms (padded vectors: no mask)
        b_yn = _col_term(y_col + i_t, o_t, m_t, False, ACC)
        if not CLASS:
            b_yl = tl.load(y_labels + i_t + o_t)
            m_pos = b_xl[:, None] == b_yl[None, :]
        elif not REF_MAJOR:
            b_yl = tl.load(y_labels + i_t + o_t)
        if REF_MAJOR:
            # [BOTHER] query rows' terms; u = v + own reference norm term
            b_u = b_v + b_xn[:, None]
            b_sht = tl.load(row_shift + i_t + o_t).to(ACC)
            b_wnt = tl.load(w_neg + i_t + o_t).to(ACC)
            if CLASS:
                m_g = m_own & (b_xl >= 0)
                # [BOWN, BOTHER] G_{i, b_j} of query i (other) and reference j (own)
                b_g = tl.load(g_cls + (i_t + o_t)[None, :] * s_gn
                              + b_xl.to(tl.int64)[:, None] * s_gc,
                              mask=m_g[:, None] & m_t[None, :], other=0).to(ACC)
                b_ds = tl.math.exp2(b_u + b_sht[None, :]) * (b_g - b_wnt[None, :])
            else:
                b_wpt = tl.load(w_pos + i_t + o_t).to(ACC)
                b_ds = _ds_dir(b_u, m_pos, b_sht[None, :], b_wnt[None, :], b_wpt[None, :], FIXUP)
        else:
            b_u = b_v + b_yn[None, :]
            if CLASS:
                m_g = m_t & (b_yl >= 0)
                # [BOWN, BOTHER] G_{i, b_j}, gathered (labels in no class: 0)
                b_g = tl.load(g_cls + o_own[:, None] * s_gn + b_yl.to(tl.int64)[None, :] * s_gc,
                              mask=m_own[:, None] & m_g[None, :], other=0).to(ACC)
                b_ds = tl.math.exp2(b_u + b_sh[:, None]) * (b_g - b_wn[:, None])
            else:
                b_ds = _ds_dir(b_u, m_pos, b_sh[:, None], b_wn[:, None], b_wp[:, None], FIXUP)
            if SYMMETRIC:
                # the same pairs with the other rows as queries: ds_jk, k the reference
                b_sht = tl.load(row_shift + i_t + o_t).to(ACC)
                b_wnt = tl.load(w_neg + i_t + o_t).to(ACC)
                b_wpt = tl.load(w_pos + i_t + o_t).to(ACC)
                b_dsj = _ds_dir(b_v + b_xn[:, None], m_pos, b_sht[None, :], b_wnt[None, :],
                                b_wpt[None, :], FIXUP)
        if DIAG:
            if REF_MAJOR:
                # own rows are the references: j = i + offset, i in the other tile
                m_d = tl.trans(_diagonal(i_t, i_o0, offset, BLOCK_OTHER, BLOCK_OWN))
            else:
                m_d = _diagonal(i_o0, i_t, offset, BLOCK_OWN, BLOCK_OTHER)
            b_ds = tl.where(m_d, 0.0, b_ds)
            if SYMMETRIC:
                b_dsj = tl.where(m_d, 0.0, b_dsj)
        if NEED_DT:
            # true logit, natural units: u + the query's own norm term, times ln 2
            if REF_MAJOR:
                b_z = (b_u + b_yn[None, :]) * LN2
            else:
                b_z = (b_u + b_xn[:, None]) * LN2
            # ds = 0 wherever the logit is -inf (masked, or underflow): keep 0 * -inf out
            b_dt += tl.sum(tl.where(b_ds != 0, b_ds * b_z, 0), 1)
        if SYMMETRIC:
            b_ds = b_ds + b_dsj
        if NEED_DX:
            if not RESIDENT:
                # [BOTHER, BDX]
                b_yt = tl.load(y_t + o_t[:, None] * s_y + o_dx[None, :] * s_yk,
                               mask=m_t[:, None] & m_dx[None, :], other=0)
            # 16-bit inputs: ds rounded to their dtype for the tensor-core dot
            b_dsr = b_ds.to(b_yt.dtype)
            if SQEUCLID:
                b_sum += tl.sum(b_dsr.to(ACC), 1)
            b_acc = tl.dot(b_dsr, b_yt, b_acc, input_precision=PRECISION, out_dtype=ACC)
    return b_acc, b_sum, b_dt


@triton.autotune(configs=BWD_CONFIGS, key=BWD_KEY, prune_configs_by=PRUNE)
@triton.jit(do_not_specialize=BWD_NO_SPECIALIZE)
def neighbor_bwd_kernel(q, r, q_labels, r_labels, temperature, r_col, q_col, row_shift,
                        w_neg, w_pos, flags, g_cls, ds_scale, dx, dt_part,
                        N, M, D, C, offset, s_qn, s_qd, s_rm, s_rd, s_gn, s_gc, s_xn, s_xd,
                        N_KEY, M_KEY, D_KEY,
                        SQEUCLID: tl.constexpr, HAS_OFFSET: tl.constexpr, CLASS: tl.constexpr,
                        REF_MAJOR: tl.constexpr, SYMMETRIC: tl.constexpr, FIXUP: tl.constexpr,
                        NEED_DX: tl.constexpr, NEED_DT: tl.constexpr, SCALE_DS: tl.constexpr,
                        RESIDENT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_OWN: tl.constexpr, BLOCK_OTHER: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_DX: tl.constexpr):
    """dq (REF_MAJOR=False), dr (REF_MAJOR=True) or, SYMMETRIC, the whole batch gradient.

    A program owns BLOCK_OWN rows of x (q, or r) and the feature slice BLOCK_DX of dx
    (all of it when RESIDENT), and streams the other side y in BLOCK_OTHER tiles. Each
    tile is computed once, in the program's orientation [own, other], in log2 units:
    ``u = x.y c + (reference norm term)``, and per query row i the launcher passes a
    shift and two weights, so that

        ds_ij = exp2(u_ij + row_shift_i) * (w_pos_i if b_j = a_i else w_neg_i)

    is one exp2 and no per-pair branch. Main pass: row_shift = -lse_all log2(e),
    w_neg = g_all, w_pos = g_all + g_pos exp(lse_all - lse_pos), since
    p+_ij = p_ij exp(lse_all_i - lse_pos_i). That factor is exact while
    (lse_all - lse_pos) log2(e) <= 64 (fp32; 960 fp64): the positives that matter then
    sit above 2^-126 of the shared shift. Rows beyond (extreme T) are ``flags``; their
    main-pass w_pos is g_all, and a FIXUP launch adds their positives' term with its own
    shift (row_shift = -lse_pos log2(e), w_neg = 0, w_pos = g_pos; -inf / 0 elsewhere),
    skipping every tile without a flagged row, and accumulating into dx and dt_part.
    dx is written in ACC and cast by the launcher, so the two passes round once.

    CLASS: ds_ij = p_ij (G_{i,b_j} - delta_i), with G gathered from g_cls and delta in
    w_neg (p from row_shift as above); one pass.

    SYMMETRIC (the batch loss, r is q, one label vector): one launch instead of a dq
    and a dr launch. The logits are symmetric, z_ij = z_ji, so the tile of own rows k
    against other rows j gives both ds_kj (k as the query) and ds_jk (j as the query)
    from one dot, and dx_k = 2/T sum_j (ds_kj + ds_jk)(x_j - x_k): half the dots of
    the two-kernel backward, two exp2 per pair. Chosen over a shared recompute with an
    ordered (semaphore) accumulation of the other side because it needs neither a
    second pass over dq nor any inter-program waiting, and it is the common case.

    "dot": dx = 1/T sum ds y; "sqeuclidean": dx = 2/T (sum ds y - x sum ds).
    dt_part[own] = sum_other ds * logit (own as the query, or as the reference when
    REF_MAJOR), written by the slice-0 programs only. SCALE_DS: the weights carry the
    powers of two of ``ds_scale``: per own row (dq), or one (1,) for dr / SYMMETRIC.
    """
    i_o = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1).to(tl.int64)
    o_own = i_o * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    o_dx = i_d * BLOCK_DX + tl.arange(0, BLOCK_DX)
    m_dx = o_dx < D
    b_it = LOG2E / tl.load(temperature).to(ACC)
    b_c = 2 * b_it if SQEUCLID else b_it
    if REF_MAJOR:
        n_own, n_other = M, N
        x, s_x, s_xk, x_labels, x_col = r, s_rm, s_rd, r_labels, r_col
        y, s_y, s_yk, y_labels, y_col = q, s_qn, s_qd, q_labels, q_col
    else:
        n_own, n_other = N, M
        x, s_x, s_xk, x_labels, x_col = q, s_qn, s_qd, q_labels, q_col
        y, s_y, s_yk, y_labels, y_col = r, s_rm, s_rd, r_labels, r_col
    m_own = o_own < n_own
    b_x = tl.zeros([BLOCK_OWN, BLOCK_D], dtype=x.dtype.element_ty)
    if RESIDENT:
        b_x = _load_rows(x, o_own, m_own, D, s_x, s_xk, BLOCK_D)
    # [BOWN] per-row terms of the own rows
    b_xn = _col_term(x_col + o_own, 0, m_own, True, ACC)
    if REF_MAJOR or not CLASS:  # class dq needs only the references' labels
        b_xl = tl.load(x_labels + o_own, mask=m_own, other=-1)
    if not REF_MAJOR:
        b_sh = tl.load(row_shift + o_own, mask=m_own, other=0).to(ACC)
        b_wn = tl.load(w_neg + o_own, mask=m_own, other=0).to(ACC)
        if not CLASS:
            b_wp = tl.load(w_pos + o_own, mask=m_own, other=0).to(ACC)
    if not (REF_MAJOR or not CLASS):
        b_xl = tl.zeros([BLOCK_OWN], dtype=tl.int32)
    if REF_MAJOR:  # the query rows' terms are the other side's
        b_sh = tl.zeros([BLOCK_OWN], dtype=ACC)
        b_wn = b_sh
    if REF_MAJOR or CLASS:
        b_wp = tl.zeros([BLOCK_OWN], dtype=ACC)
    hi = n_other
    b_fl = tl.zeros([BLOCK_OWN], dtype=tl.int8)
    if FIXUP:
        if not REF_MAJOR:
            # the own rows are queries: none flagged, nothing to add
            b_fl = tl.load(flags + o_own, mask=m_own, other=0)
            if not SYMMETRIC:
                hi = tl.where(tl.max(b_fl, 0) > 0, n_other, 0)
    b_acc = tl.zeros([BLOCK_OWN, BLOCK_DX], dtype=ACC)
    b_sum = tl.zeros([BLOCK_OWN], dtype=ACC)
    b_dt = tl.zeros([BLOCK_OWN], dtype=ACC)
    # the other side's tiles that meet the diagonal first, unrolled (straight-line code),
    # then the main loop over the others, which has no mask at all. Own rows o, other
    # rows t: the excluded pairs are t = o + offset (own queries) or t = o - offset.
    i_o0 = i_o * BLOCK_OWN
    t_lo, t_hi = _diagonal_tiles(i_o0, -offset if REF_MAJOR else offset, hi, HAS_OFFSET,
                                 BLOCK_OWN, BLOCK_OTHER)
    for k in tl.static_range(_peeled(HAS_OFFSET, BLOCK_OWN, BLOCK_OTHER)):
        if t_lo + k < t_hi:
            b_acc, b_sum, b_dt = _bwd_tile(
                b_acc, b_sum, b_dt, (t_lo + k) * BLOCK_OTHER, i_o0, b_x, x, y, s_x, s_xk, s_y,
                s_yk, y_labels, y_col, row_shift, w_neg, w_pos, flags, g_cls, s_gn, s_gc,
                b_xn, b_xl, b_sh, b_wn, b_wp, b_fl, o_own, m_own, o_dx, m_dx, n_other, D, offset,
                b_c, b_it, True, SQEUCLID, CLASS, REF_MAJOR, SYMMETRIC, FIXUP, NEED_DX, NEED_DT,
                RESIDENT, ACC, PRECISION, BLOCK_OWN, BLOCK_OTHER, BLOCK_D, BLOCK_DX)
    n_diag = t_hi - t_lo
    for t in range(0, tl.cdiv(hi, BLOCK_OTHER) - n_diag):
        i_t = (t + tl.where(t >= t_lo, n_diag, 0)) * BLOCK_OTHER
        b_acc, b_sum, b_dt = _bwd_tile(
            b_acc, b_sum, b_dt, i_t, i_o0, b_x, x, y, s_x, s_xk, s_y, s_yk, y_labels, y_col,
            row_shift, w_neg, w_pos, flags, g_cls, s_gn, s_gc, b_xn, b_xl, b_sh, b_wn, b_wp,
            b_fl, o_own, m_own, o_dx, m_dx, n_other, D, offset, b_c, b_it, False, SQEUCLID,
            CLASS, REF_MAJOR, SYMMETRIC, FIXUP, NEED_DX, NEED_DT, RESIDENT, ACC, PRECISION,
            BLOCK_OWN, BLOCK_OTHER, BLOCK_D, BLOCK_DX)
    if SCALE_DS:
        if REF_MAJOR or SYMMETRIC:
            b_sc = tl.zeros([BLOCK_OWN], dtype=ACC) + tl.load(ds_scale).to(ACC)
        else:
            b_sc = tl.load(ds_scale + o_own, mask=m_own, other=1).to(ACC)
        b_acc = b_acc / b_sc[:, None]
        b_sum = b_sum / b_sc
        b_dt = b_dt / b_sc
    if NEED_DX:
        if SQEUCLID:
            # [BOWN, BDX]
            b_xs = tl.load(x + o_own[:, None] * s_x + o_dx[None, :] * s_xk,
                           mask=m_own[:, None] & m_dx[None, :], other=0).to(ACC)
            b_acc = 2 * (b_acc - b_xs * b_sum[:, None]) * (b_it * LN2)
        else:
            b_acc = b_acc * (b_it * LN2)
        p_dx = dx + o_own[:, None] * s_xn + o_dx[None, :] * s_xd
        m_out = m_own[:, None] & m_dx[None, :]
        if FIXUP:
            b_acc += tl.load(p_dx, mask=m_out, other=0)
        tl.store(p_dx, b_acc.to(dx.dtype.element_ty), mask=m_out)
    if NEED_DT:  # compile-time flag, then a runtime test: kept as two ifs
        if i_d == 0:
            if FIXUP:
                b_dt += tl.load(dt_part + o_own, mask=m_own, other=0)
            tl.store(dt_part + o_own, b_dt, mask=m_own)
