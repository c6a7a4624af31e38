"""Shared pieces of the Triton kernels (``kernels`` describes them): limits,
autotune configs and keys, constants and the tile helpers both kernels call."""
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The block limits and tile configs: the GPU's ("gpu"), or small ones that keep the
# interpreter fast ("interpreter", its default). NBK_TRITON_SIZES=gpu under the
# interpreter runs the kernels exactly as a GPU launches them.
SIZES = os.environ.get("NBK_TRITON_SIZES") or ("interpreter" if INTERPRET else "gpu")
if SIZES not in ("gpu", "interpreter"):
    raise ValueError(f"NBK_TRITON_SIZES must be 'gpu' or 'interpreter', got {SIZES!r}")
SMALL = SIZES == "interpreter"
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Floors of the positives' sum under the shared shift (neighbor_fwd_kernel): 2^-64, 2^-960
POS_FLOOR_F32 = tl.constexpr(2.0 ** -64)
POS_FLOOR_F64 = tl.constexpr(2.0 ** -960)
# A tile's sum above this moves the forward's row shift (neighbor_fwd_kernel): 2^64, 2^512
RESCALE_F32 = tl.constexpr(2.0 ** 64)
RESCALE_F64 = tl.constexpr(2.0 ** 512)
# The largest move of the shift at once, in log2 units: the rescale factor stays a normal
# number (the GPU's ex2.approx.ftz flushes anything below 2^-126 to 0, which would wipe
# the row's sums). One binade below the edge: the factor is exp2 of the float difference
# of the two shifts, which passes k by up to 1.5 ulp of the shift (a move of 126 gave
# exp2(-126.00001) = 0 on an N = 200, T = 1e-3 batch), so k = 125 stays normal while
# |shift| < 2^23, logits within 5.8e6 of the anchor in natural units.
MAX_MOVE_F32 = tl.constexpr(125.0)
MAX_MOVE_F64 = tl.constexpr(1021.0)
# The same limits in log2 units, for the backward's one-exp positives (launcher side)
POS_LOG2_LIMIT = {"fp32": 64.0, "fp64": 960.0}
# The symmetric backward's one exp2 per pair (launcher: ``rows.one_exp_rows``), per
# accumulation dtype, in log2 units: the shared reference R sits ABOVE the smallest row
# normalizer, so that an exp2 flushed to 0 drops only terms below 2^(ABOVE - 126) of
# their row (2^(ABOVE - 1022) fp64); the rows' normalizers may spread over at most
# SPREAD, so that no exp2 passes 2^(SPREAD - ABOVE + 1); the per-row weights, scaled by
# one power of two, must be 0 or lie within 2^+-WEIGHT (normal numbers), and the
# kernel's sums of them stay below 2^SUMS. Otherwise the two-exp kernel runs.
ONE_EXP_LIMITS = {"fp32": dict(above=16.0, spread=140.0, weight=125.0, sums=120.0),
                  "fp64": dict(above=16.0, spread=1000.0, weight=1020.0, sums=1016.0)}
# Below this many rows the symmetric backward runs the two-exp kernel alone: the one-exp
# form's launcher test (some 40 small device ops, tens of microseconds of launches) costs
# more than the exps it saves: N^2 of them, N^2 / 2^32 ms at an H200's exp-unit peak
# (1.03 ms at N = 65536; 0.06 ms at this threshold).
# Under the interpreter's sizes every batch takes both forms, as GPU batches above it do.
ONE_EXP_MIN_ROWS = 0 if SMALL else 16384

# Feature-dim chunk of the logit dot when not resident, and widest dq / dr slice.
MAX_BLOCK_D = 16 if SMALL else 64
MAX_BLOCK_DX = 64 if SMALL else 128
# Largest D whose own tile is held for the whole loop (forward / backward).
MAX_RESIDENT_D = 32 if SMALL else 256
MAX_RESIDENT_D_BWD = 32 if SMALL else 128


def resident_limit(kind, element_size, precision=None):
    """The largest D whose own tile a kernel holds for the whole loop (``kind``: "fwd",
    "fwd_class", "bwd", "bwd_class"). None for the lse kernels with fp32 IEEE dots:
    their dots are FMA loops, and a resident [BLOCK, D] fp32 tile spills at every GPU
    config (compiled SASS, bench/sass/table.py), while chunks of MAX_BLOCK_D do not."""
    if element_size == 4 and precision == "ieee" and kind in ("fwd", "bwd"):
        return 0
    return MAX_RESIDENT_D_BWD if kind.startswith("bwd") else MAX_RESIDENT_D


# Class tile width of the class-distribution forward (one-hot dot of [BN, BC]): 16 or 32
# while the references fill the class tiles (``class_block_cap``), else 64.
MAX_BLOCK_C = 16 if SMALL else 64
NARROW_BLOCK_C = 16 if SMALL else 32
NARROWEST_BLOCK_C = 16


def class_block_cap(c, m):
    """The widest class tile for C classes over M references.

    A class tile's references end in a part-filled reference tile, which wastes about
    C BLOCK_N / (2 BLOCK_C M) of the pairs. A narrower tile shrinks the [BM, BC] mass and
    the one-hot beside the logit tile, and the mass dot's tensor time with them: 64 -> 32
    cut 27.8 -> 23.3 instructions per pair (predicted from compiled SASS, triton 3.9,
    bf16 128 x 64; triton 3.6: 42.2 -> 27.7), 32 -> 16 a further 14% of the cycles per
    tile in the latency model (bf16, self excluded: 3293 -> 2821). Each is taken where
    the waste stays at 10% or less: 16 for M >= 20 C, 32 for M >= 10 C; prototypes
    (M ~ C) keep 64.
    """
    if 20 * c <= m:
        return NARROWEST_BLOCK_C
    return NARROW_BLOCK_C if 10 * c <= m else MAX_BLOCK_C
# Streamed per-row vectors are padded to a multiple of this (>= every BLOCK_N / OTHER).
PAD = 128

# The configs the autotuner picks from when NBK_TRITON_AUTOTUNE=1 (also run one by one by
# the GPU-sized tests); configs.TABLE holds the one each variant runs by default.
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


def fits(config, elem, block_d, cls=False, block_t=0):
    """Whether a config suits the kernel: its tiles (the own tile plus ``num_stages``
    other tiles of [rows, block_d] elements of ``elem`` bytes, and with the backward's
    OTHER_T as many transposed tiles of [block_t, rows]) fit in 200 KB of sm_90's 227 KB
    of shared memory (fp32 at 128 x 128 with 3 stages does not), and, for the class
    forward (``cls``), its [BM, BN] tile is at most 128 x 64: a class tile's references
    end in a part-filled reference tile, which a 128-wide tile makes twice as wasteful
    (prototypes, one reference tile per class tile, would compute half their pairs for
    nothing), and beside the [BM, BLOCK_C] class mass a 128 x 128 tile spills under
    triton 3.6 (56 B, bf16, 3 stages); under 3.9 it does not, and is predicted 6% faster
    per useful pair at 1000 classes over 65536 references (latency model, 3671 against
    2069 cycles a tile, fill 0.91 against 0.96)."""
    kw = config.kwargs
    own = kw.get("BLOCK_M", kw.get("BLOCK_OWN"))
    other = kw.get("BLOCK_N", kw.get("BLOCK_OTHER"))
    if cls and own * other > 128 * 64:
        return False
    stages = max(config.num_stages, 1)
    return (own * block_d + stages * other * (block_d + block_t)) * elem <= 200 * 1024


def _prune(configs, named_args, **kwargs):
    """The autotuner's early prune: the configs that ``fits`` (at least one)."""
    args = {**named_args, **kwargs}
    q = args.get("q")
    elem = q.element_size() if hasattr(q, "element_size") else 2
    cls = bool(args.get("CLASS")) and "BLOCK_M" in configs[0].kwargs  # the class forward
    block_t = args.get("BLOCK_DX", 0) if args.get("OTHER_T") else 0
    keep = [c for c in configs if fits(c, elem, args.get("BLOCK_D", 64), cls, block_t)]
    return keep or configs[-1:]


# Triton's autotuner over GPU_*_CONFIGS for the main launches, opt-in (a first call then
# compiles and times every config of every variant; results cached on disk): else one
# config per variant from configs.TABLE, no benchmarking.
AUTOTUNE = os.environ.get("NBK_TRITON_AUTOTUNE", "0") == "1" and not INTERPRET
PRUNE = {"early_config_prune": _prune}
# Autotuning keys: power-of-two buckets of (N, M, D) and every flag that changes the kernel;
# the tensor dtypes join the key (and fix ACC, MASS_PRECISION; SCALE_DS with ONE_EXP), D_KEY fixes
# BLOCK_D, BLOCK_DX and RESIDENT.
FWD_KEY = ["N_KEY", "M_KEY", "D_KEY", "SQEUCLID", "HAS_OFFSET", "CLASS", "POS_PASS",
           "PRECISION", "BLOCK_C", "AHEAD"]
BWD_KEY = ["N_KEY", "M_KEY", "D_KEY", "SQEUCLID", "HAS_OFFSET", "CLASS", "REF_MAJOR",
           "SYMMETRIC", "FIXUP", "NEED_DX", "NEED_DT", "PRECISION", "OTHER_T", "ONE_EXP"]
# Integers that vary per call and gain nothing from specialization (== 1, % 16): one
# compiled kernel for every size. Strides and D stay specialized.
FWD_NO_SPECIALIZE = ["N", "M", "offset", "N_KEY", "M_KEY", "D_KEY"]
BWD_NO_SPECIALIZE = FWD_NO_SPECIALIZE + ["C"]


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
    """[B] the launcher's per-row logit terms -||x||^2/T (0 for "dot"); -inf for
    rows at infinity and for padding. MASKED: ``o`` may leave the padded vector."""
    if MASKED:
        return tl.load(r_col + o, mask=m, other=float("-inf")).to(ACC)
    else:
        return tl.load(r_col + o).to(ACC)


@triton.jit
def _gather_index(order, i_t, hi, BLOCK: tl.constexpr):
    """[B] the rows at label-order positions [i_t, i_t + B) below hi (``order``: their
    indices, int64; 0 past hi) and their mask."""
    o_s = i_t + tl.arange(0, BLOCK)
    m_j = o_s < hi
    return tl.load(order + o_s, mask=m_j, other=0).to(tl.int64), m_j


@triton.jit
def _gathered_pairs(b_x, x, y, y_labels, y_col, o_x, m_x, b_xl, b_j, m_j, D, offset, s_xn, s_xd,
                    s_yn, s_yd, HAS_OFFSET: tl.constexpr, Y_QUERIES: tl.constexpr,
                    RESIDENT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr):
    """The pairs of the rows o_x (labels b_xl) with gathered rows b_j (``_gather_index``):
    x.y [BX, BY] and the y tile (as ``_rows_dot``), y's column terms (-inf past the
    range) and the positives: same label, o_x a real row, and not the excluded pair
    (j = o + offset, or o = j + offset where the y rows are the queries: Y_QUERIES)."""
    b_xy, b_yt = _rows_dot(b_x, x, y=y, o_x=o_x, m_x=m_x, o_y=b_j, m_y=m_j, D=D, s_xn=s_xn,
                           s_xd=s_xd, s_yn=s_yn, s_yd=s_yd, RESIDENT=RESIDENT, ACC=ACC,
                           PRECISION=PRECISION, BLOCK_X=BLOCK_X, BLOCK_Y=BLOCK_Y,
                           BLOCK_D=BLOCK_D)
    b_yn = _col_term(y_col, b_j, m_j, True, ACC)
    m_pos = (b_xl[:, None] == tl.load(y_labels + b_j, mask=m_j, other=-2)[None, :]) & \
        m_x[:, None]
    if HAS_OFFSET:
        if Y_QUERIES:
            m_pos = m_pos & (o_x[:, None] != b_j[None, :] + offset)
        else:
            m_pos = m_pos & (b_j[None, :] != o_x[:, None] + offset)
    return b_xy, b_yt, b_yn, m_pos


@triton.jit
def _diagonal(i_x, i_y, offset, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr):
    """[BX, BY] mask of the pairs j = i + offset of a tile that meets the diagonal, from
    int32 tile-local indices (one compare per pair; the tile's shift fits in int32)."""
    shift = (i_x + offset - i_y).to(tl.int32)
    return tl.arange(0, BLOCK_Y)[None, :] == tl.arange(0, BLOCK_X)[:, None] + shift


@triton.jit
def _exp(b_s, b_shift):
    """exp(s - m) as one FFMA and one exp2: ``exp2(fma(s, log2 e, shift))``, shift = -fl(m log2 e).

    Logits stay in natural units, so that the forward's row maximum and the lse it
    writes are logit values themselves; the fused multiply-add takes the product
    s log2(e) exactly, so a logit equal to m gives exp2 of the rounding residue of
    fl(m log2 e), a common per-row factor that ``_lse`` (forward) and the launcher's
    weights (backward) take out again, exactly.
    """
    return tl.math.exp2(tl.fma(b_s, _log2e(b_s), b_shift))


@triton.jit
def _log2e(like):
    """log2(e) in the dtype of ``like``, for the fused multiply-adds: tl.fma takes a Python
    float operand as fp32 under triton 3.6 to 3.8 (an fp64 kernel's PTX then has
    0d3FF7154760000000 in place of 0d3FF71547652B82FE), which left fp64 results off by
    ~1e-8 relative; a constant of the operand's dtype keeps every digit in each version."""
    return tl.full((), LOG2E, like.dtype)


@triton.jit
def _residue(b_ms):
    """d = b_ms log2 e - fl(b_ms log2 e), exactly (one fma), for finite anchors b_ms."""
    return tl.fma(b_ms, _log2e(b_ms), -(b_ms * LOG2E))


@triton.jit
def _shift(b_m):
    """[BM] the ``_exp`` shift of row anchors b_m (natural units): -fl(b_m log2 e), 0 for
    rows without an anchor yet (b_m = -inf: their terms then stay exp2(-inf) = 0)."""
    return -(tl.where(b_m == float("-inf"), 0.0, b_m) * LOG2E)


@triton.jit
def _lse(b_m, b_l):
    """log sum_j exp(s_j) from a row state: the anchor b_m (natural units) and the sum
    b_l of exp2(fma(s, log2 e, -fl(b_m log2 e))) (``_exp`` under ``_shift(b_m)``).

    b_m + (log2 b_l - d) ln 2, with d = b_m log2 e - fl(b_m log2 e) taken exactly (fma):
    a row dominated by one logit within a few units of the anchor gets that logit back
    bit for bit. b_m = -inf (no term): -inf.
    """
    b_ms = tl.where(b_m == float("-inf"), 0.0, b_m)
    return b_m + (tl.log2(b_l) - _residue(b_ms)) * LN2


@triton.jit
def _online_lse(b_m, b_l, b_s):
    """One step of an online log-sum-exp over the rows of b_s [BM, BN] (natural units).

    State: the running max b_m, the rows' anchor, and the sum b_l of their terms under
    ``_shift(b_m)``; ``_lse`` finishes it. Returns the new max and sum, the tile's
    exponentials and the rescale factor of the old sum. tl.max may drop NaN; b_l still
    turns NaN through exp2.
    """
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    b_sh = _shift(b_mn)
    # the old sum was taken under _shift(b_m) (b_m = -inf before any term: factor 0)
    b_alpha = tl.math.exp2(b_m * LOG2E + b_sh)
    # [BM, BN] the one exponential of each pair
    b_p = _exp(b_s, b_sh[:, None])
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
