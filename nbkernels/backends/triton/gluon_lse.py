"""The loss forward's main pass for sm_90 in Gluon: the Triton main pass's arithmetic with
each reference tile's wgmma running under the previous tile's softmax.

Variant "sm90_gluon" of kind "fwd_main" (``kernels.VARIANTS``): opt-in, since Gluon has no
interpreter and no CPU check runs it (``NBK_VARIANTS=sm90_gluon``, or
``variants.pinned``); tests/triton/test_gluon_main.py checks it against the fp64 oracle on
an sm_90 GPU, tests/test_gluon_fwd.py what the CPU can (the arguments it refuses and those
it hands the kernel; the compiled SASS, through ``bench/gluon_fwd.py``, which also writes
the latency model's estimate of each form).

It is the main pass of ``forward.lse_forward_passes`` (its ``main``), with the same
contract: it writes lse_all, lse_pos and the rows for the exact passes (``redo``: 1 both
sums, 2 the positives' only), and that function's exact passes, the Triton kernel's, then
recompute the flagged rows. The arithmetic is the Triton main pass's
(``kernel_fwd._fwd_lse_tile``): logits in natural units ``s = fma(q.r, c, col)`` with the
launcher's packed column terms and label ranks, the diagonal tile first (self pair
masked; it sets each row's anchor), then the other tiles under a lazy shift
(``exp2(fma(s, log2 e, -fl(m log2 e)))``, moved by whole powers of two when a tile's sum
passes 2^64), one exp2 per pair for both sums.

The pipeline: one CTA holds BLOCK_M query rows in shared memory (one warpgroup per 64
rows); the reference tiles and their packed terms stream through two shared slots by
cp.async. Iteration k waits for tile k + 1, requests tile k + 2 into the slot tile k
left (its wgmma done), issues tile k + 1's wgmma asynchronously, runs tile k's softmax
and waits for the wgmma before the back edge. Where tile k's terms are read from shared
memory (before or after that issue) decides whether ptxas keeps the exps under the MMA;
``FORMS`` holds each triton's choice.

In label order (the ORDERED forms, ``in_label_order``): the launcher sorts the queries
and the references by label (the batch: one sort, its excluded pair k, k still), so a
block of rows holds a few labels whose references fill a few consecutive tiles; those
are streamed first, with the label compare, the positives' sum and the excluded pair,
and the other tiles, nearly all, without them (8.7 instructions a pair against 10.9).
The outputs go to each row's original place (``order``). An excluded pair by position
between rows that are not the references (``ordered_ok``) takes the row-order form.

``why_not`` names what it does not take (the Triton main pass runs then): inputs other
than bf16 / fp16 rows of D = 128, an offset other than 0 with the self pair excluded,
fewer than two reference tiles.
"""
from typing import NamedTuple

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                              warpgroup_mma_wait)

from . import configs

# names that triton 3.6 and 3.7 give otherwise, with the same arguments: the 16-byte
# cp.async into shared memory, and the CTA barrier
async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
barrier = getattr(gl, "barrier", None) or gl.thread_barrier

D, BLOCK_N = 128, 128
LOG2E = gl.constexpr(1.4426950408889634)
LN2 = gl.constexpr(0.6931471805599453)
# the lazy shift's constants (``nbkernels.backends.triton.common``, fp32)
RESCALE = gl.constexpr(2.0 ** 64)
MAX_MOVE = gl.constexpr(125.0)
POS_FLOOR = gl.constexpr(2.0 ** -64)



class Form(NamedTuple):
    """A compiled form of the kernel: its row block and warps (one warpgroup per 64 rows),
    whether a tile's terms are read after the next wgmma's issue (AFTER), whether its
    reference rows are addressed from int64 tile bases (WIDE), and whether the rows and
    references come in label order (ORDERED: the positives' sum only in the tiles of the
    block's labels)."""
    block_m: int
    num_warps: int
    after: bool
    wide: bool
    ordered: bool = False

    @property
    def name(self):
        return (f"{self.block_m}x{BLOCK_N}w{self.num_warps}_"
                f"{'after' if self.after else 'before'}{'_wide' if self.wide else ''}"
                f"{'_ordered' if self.ordered else ''}")


# per triton (major, minor): the form the latency model has fastest there
# (bench/gluon_fwd.py, bench/results/gluon_fwd_sm90*.json; tests/test_gluon_fwd.py)
FORMS = {(3, 6): Form(128, 8, False, False, True), (3, 7): Form(128, 8, False, True, True),
         (3, 8): Form(128, 8, False, True, True), (3, 9): Form(64, 4, False, True, True)}
# the fastest in row order, for the arguments the ORDERED forms do not take (``ordered_ok``)
ROW_FORMS = {(3, 6): Form(128, 8, False, False), (3, 7): Form(128, 8, False, True),
             (3, 8): Form(128, 8, False, True), (3, 9): Form(128, 8, False, False)}
VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])


@gluon.jit
def _seq(k, lo, e):
    """The k-th reference tile streamed: the e tiles from lo first (the diagonal tile, or
    the tiles of the block's labels), then the others in order."""
    return gl.where(k < e, lo + k, k - e + gl.where(k - e >= lo, e, 0))


@gluon.jit
def _o_w(BLOCK_N: gl.constexpr):
    return gl.arange(0, BLOCK_N, layout=gl.BlockedLayout([1], [32], [gl.num_warps()], [0]))


@gluon.jit
def _request(r_s, w_s, r, pack, k, lo, e, M, s_rn, o_nl, o_d, BLOCK_N: gl.constexpr,
             D: gl.constexpr, WIDE: gl.constexpr):
    """cp.async of the k-th streamed tile's rows (zeros past M) and packed terms into
    slot k % 2 (terms: k % 3 in the AFTER form, which reads tile k - 2's later).
    WIDE: an int64 tile base and int32 tile-local offsets (any M); else int32 offsets
    from r (``why_not``: the rows' extent fits), which keeps fewer registers live."""
    i_n = _seq(k, lo, e) * BLOCK_N
    if WIDE:
        ptr = r + i_n.to(gl.int64) * s_rn + (o_nl[:, None] * s_rn + o_d[None, :])
        m_n = o_nl < M - i_n
    else:
        ptr = r + (i_n + o_nl)[:, None] * s_rn + o_d[None, :]
        m_n = i_n + o_nl < M
    async_load(r_s.index(k % 2), ptr, mask=m_n[:, None] & (o_d < D)[None, :])
    async_load(w_s.index(k % w_s.shape[0]), pack + i_n + _o_w(BLOCK_N))


@gluon.jit
def _issue(q_s, r_s, w_s, r, pack, k, lo, e, n, M, s_rn, o_nl, o_d, zero,
           BLOCK_N: gl.constexpr, D: gl.constexpr, WIDE: gl.constexpr):
    """Wait for tile k, request tile k + 1 into tile k - 1's slot, issue tile k's wgmma
    (async). Each thread fences its own copies (and the query tile's stores) for the
    wgmma's async proxy before the barrier; past it, every warp has also waited for tile
    k - 1's wgmma, so its slot is free."""
    async_copy.wait_group(0)
    fence_async_shared()
    barrier()
    if k + 1 < n:
        _request(r_s, w_s, r, pack, k + 1, lo, e, M, s_rn, o_nl, o_d, BLOCK_N, D, WIDE)
    async_copy.commit_group()
    return warpgroup_mma(q_s, r_s.index(k % 2).permute((1, 0)), zero, use_acc=False,
                         is_async=True)


@gluon.jit
def _terms(w_s, k, cols: gl.constexpr):
    """[BN] column terms (fp32, high bits) and label ranks (int32, low) of tile k."""
    w = w_s.index(k % w_s.shape[0]).load(cols)
    return (w >> 32).to(gl.int32).to(gl.float32, bitcast=True), w.to(gl.int32)


@gluon.jit
def _shift(b_m):
    """-fl(m log2 e), 0 for rows without an anchor (``common._shift``)."""
    return -(gl.where(b_m == float("-inf"), 0.0, b_m) * LOG2E)


@gluon.jit
def _logits(b_s, b_col, o_n, b_self, b_c, MASK: gl.constexpr):
    """[BM, BN] logits in natural units; MASK: each row's excluded reference (at column
    index ``b_self``) at -inf."""
    b_z = gl.fma(b_s, b_c, b_col[None, :])
    if MASK:
        b_z = gl.where(o_n[None, :] == b_self[:, None], float("-inf"), b_z)
    return b_z


@gluon.jit
def _first(b_s, b_col, b_b, o_n, b_self, b_a, b_c, DIAG: gl.constexpr):
    """The first tile (the diagonal one, or the first of the block's labels): the rows'
    anchors and both sums."""
    b_z = _logits(b_s, b_col, o_n, b_self, b_c, DIAG)
    b_m = gl.max(b_z, axis=1)
    b_p = gl.exp2(gl.fma(b_z, LOG2E, _shift(b_m)[:, None]))
    b_lp = gl.sum(gl.where(b_a[:, None] == b_b[None, :], b_p, 0.0), axis=1)
    return b_m, gl.sum(b_p, axis=1), b_lp


@gluon.jit
def _lazy(b_s, b_col, b_b, o_n, b_self, b_a, b_c, b_m, b_l, b_lp, POS: gl.constexpr,
          MASK: gl.constexpr):
    """A later tile under the row's shift, no per-pair max (``kernel_fwd._fwd_lse_tile``).
    POS: the tile may hold positives (else their sum is only rescaled); MASK: it may hold
    an excluded pair."""
    b_sh = _shift(b_m)
    b_p = gl.exp2(gl.fma(_logits(b_s, b_col, o_n, b_self, b_c, MASK), LOG2E, b_sh[:, None]))
    b_t = gl.sum(b_p, axis=1)
    if POS:
        b_lp = b_lp + gl.sum(gl.where(b_a[:, None] == b_b[None, :], b_p, 0.0), axis=1)
    b_k = gl.where(b_t > RESCALE, gl.minimum(gl.ceil(gl.log2(b_t)), MAX_MOVE), 0.0)
    b_m = gl.where(b_k > 0, b_m + b_k * LN2, b_m)
    b_f = gl.exp2(_shift(b_m) - b_sh)
    return b_m, (b_l + b_t) * b_f, b_lp * b_f


@gluon.jit
def _lse(b_m, b_l):
    """``common._lse``: b_m + (log2 b_l - d) ln 2, d the residue of fl(b_m log2 e)."""
    b_ms = gl.where(b_m == float("-inf"), 0.0, b_m)
    return b_m + (gl.log2(b_l) - gl.fma(b_ms, LOG2E, -(b_ms * LOG2E))) * LN2


@gluon.jit
def _step(q_s, r_s, w_s, r, pack, k, lo, e, n, M, s_rn, o_nl, o_d, zero, b_s, b_a, b_self, b_c,
          b_m, b_l, b_lp, cols: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
          WIDE: gl.constexpr, AFTER: gl.constexpr, POS: gl.constexpr, MASK: gl.constexpr):
    """Streamed tile k's softmax (``_lazy``) with tile k + 1's wgmma issued under it: the
    row state and tile k + 1's logits."""
    if not AFTER:
        b_col, b_b = _terms(w_s, k, cols)
    tok = _issue(q_s, r_s, w_s, r, pack, k + 1, lo, e, n, M, s_rn, o_nl, o_d, zero, BLOCK_N, D,
                 WIDE)
    if AFTER:
        b_col, b_b = _terms(w_s, k, cols)
    o_n = _seq(k, lo, e) * BLOCK_N + gl.arange(0, BLOCK_N, layout=cols)
    b_m, b_l, b_lp = _lazy(b_s, b_col, b_b, o_n, b_self, b_a, b_c, b_m, b_l, b_lp, POS, MASK)
    b_s = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
    return b_s, b_m, b_l, b_lp


@gluon.jit(do_not_specialize=["N", "M"])
def lse_main_sm90(q, r, q_labels, pack, scale, has_pos, lse_all, lse_pos, redo, order, span,
                  N, M, s_qn, s_rn, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  D: gl.constexpr, DIAG: gl.constexpr, AFTER: gl.constexpr, WIDE: gl.constexpr,
                  ORDERED: gl.constexpr):
    """DIAG: the pair i, i excluded (the batch, offset 0). ORDERED: the queries ``q`` (with
    ``q_labels``) and the references (``r``, ``pack``) come in label order (``in_label_order``;
    for the batch one order, the excluded pair still i, i), ``order`` the original row of
    each query (where the outputs go; ``has_pos`` is read there too), ``span`` each row
    block's first tile and count of the tiles holding its labels, which are streamed
    first with the positives' sum and the excluded pair; the other tiles carry neither.
    Else the rows in their order, the diagonal tile first."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[gl.num_warps(), 1], instr_shape=[16, BLOCK_N, 16])
    rows: gl.constexpr = gl.SliceLayout(1, mma)
    cols: gl.constexpr = gl.SliceLayout(0, mma)
    ld: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8],
                                        warps_per_cta=[gl.num_warps(), 1], order=[1, 0])
    i_m = gl.program_id(0) * BLOCK_M
    n = gl.cdiv(M, BLOCK_N)
    o_m = i_m + gl.arange(0, BLOCK_M, layout=rows)
    # the tiles streamed first: [lo, lo + e)
    if ORDERED:
        lo = gl.load(span + 2 * gl.program_id(0))
        e = gl.load(span + 2 * gl.program_id(0) + 1)
    else:
        # the tile that holds this block's diagonal (BLOCK_M <= BLOCK_N: one), else tile 0
        lo = i_m // BLOCK_N if DIAG else 0
        e = 1
    # each row's excluded reference (DIAG), by its column index
    b_self = o_m
    o_ml = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
    o_d = gl.arange(0, D, layout=gl.SliceLayout(0, ld))
    o_nl = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld))
    q_s = gl.allocate_shared_memory(
        q.dtype.element_ty, [BLOCK_M, D],
        gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], q.dtype.element_ty),
        gl.load(q + i_m.to(gl.int64) * s_qn + (o_ml[:, None] * s_qn + o_d[None, :]),
                mask=(o_ml < N - i_m)[:, None], other=0.0))
    r_s = gl.allocate_shared_memory(
        q.dtype.element_ty, [2, BLOCK_N, D],
        gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], q.dtype.element_ty))
    w_s = gl.allocate_shared_memory(gl.int64, [3 if AFTER else 2, BLOCK_N],
                                    gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    o_n = _seq(0, lo, e) * BLOCK_N + gl.arange(0, BLOCK_N, layout=cols)
    # label ranks are padded (``rows.padded``): no mask
    b_a = gl.load(q_labels + o_m)
    b_c = gl.load(scale)
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
    _request(r_s, w_s, r, pack, 0, lo, e, M, s_rn, o_nl, o_d, BLOCK_N, D, WIDE)
    async_copy.commit_group()
    tok = _issue(q_s, r_s, w_s, r, pack, 0, lo, e, n, M, s_rn, o_nl, o_d, zero, BLOCK_N, D, WIDE)
    b_s = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
    b_col, b_b = _terms(w_s, 0, cols)
    tok = _issue(q_s, r_s, w_s, r, pack, 1, lo, e, n, M, s_rn, o_nl, o_d, zero, BLOCK_N, D, WIDE)
    b_m, b_l, b_lp = _first(b_s, b_col, b_b, o_n, b_self, b_a, b_c, DIAG)
    b_s = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
    if ORDERED:
        # the tiles of the block's labels (the first of them done), then the others
        e1 = gl.maximum(e, 1)
        kp = gl.minimum(e1, n - 1)
        for k in range(1, kp):
            b_s, b_m, b_l, b_lp = _step(q_s, r_s, w_s, r, pack, k, lo, e, n, M, s_rn, o_nl, o_d,
                                        zero, b_s, b_a, b_self, b_c, b_m, b_l, b_lp, cols,
                                        BLOCK_N, D, WIDE, AFTER, True, DIAG)
        for k in range(kp, n - 1):
            b_s, b_m, b_l, b_lp = _step(q_s, r_s, w_s, r, pack, k, lo, e, n, M, s_rn, o_nl, o_d,
                                        zero, b_s, b_a, b_self, b_c, b_m, b_l, b_lp, cols,
                                        BLOCK_N, D, WIDE, AFTER, False, False)
        b_col, b_b = _terms(w_s, n - 1, cols)
        o_n = _seq(n - 1, lo, e) * BLOCK_N + gl.arange(0, BLOCK_N, layout=cols)
        if n - 1 < e1:
            b_m, b_l, b_lp = _lazy(b_s, b_col, b_b, o_n, b_self, b_a, b_c, b_m, b_l, b_lp, True,
                                   DIAG)
        else:
            b_m, b_l, b_lp = _lazy(b_s, b_col, b_b, o_n, b_self, b_a, b_c, b_m, b_l, b_lp,
                                   False, False)
    else:
        for k in range(1, n - 1):
            b_s, b_m, b_l, b_lp = _step(q_s, r_s, w_s, r, pack, k, lo, e, n, M, s_rn, o_nl, o_d,
                                        zero, b_s, b_a, b_self, b_c, b_m, b_l, b_lp, cols,
                                        BLOCK_N, D, WIDE, AFTER, True, False)
        b_col, b_b = _terms(w_s, n - 1, cols)
        # no mask here: o_n (the first tile's columns) is not read
        b_m, b_l, b_lp = _lazy(b_s, b_col, b_b, o_n, b_self, b_a, b_c, b_m, b_l, b_lp, True,
                               False)
    m_m = o_m < N
    # the outputs at the rows' own places
    o_out = gl.load(order + o_m, mask=m_m, other=0) if ORDERED else o_m
    gl.store(lse_all + o_out, _lse(b_m, b_l), mask=m_m)
    gl.store(lse_pos + o_out, _lse(b_m, b_lp), mask=m_m)
    # the exact passes' rows, as the Triton main pass flags them (``neighbor_fwd_kernel``):
    # 1 both sums again, 2 the positives' only
    b_has = gl.load(has_pos + o_out, mask=m_m, other=0) != 0
    b_all = ~(b_l >= POS_FLOOR) | (b_l == float("inf")) | (b_m == float("inf")) | \
        (b_m == float("-inf"))
    b_redo = gl.where(b_all, 1, gl.where((b_lp < POS_FLOOR) & b_has, 2, 0))
    gl.store(redo + o_out, b_redo.to(gl.int8), mask=m_m)


# the variant's jit function (one compile per form and dtype: N and M are not specialised)
KERNEL = lse_main_sm90


def form(version=VERSION):
    """The ``Form`` for triton ``version`` (the newest known beyond it)."""
    return FORMS.get(version) or FORMS[max(FORMS)]


def _taken(args, f):
    """The form that runs on ``args`` for ``f`` (None: ``form()``): an ORDERED one where it
    takes them (``ordered_ok``), else this triton's fastest in row order."""
    f = f or form()
    if f.ordered and not ordered_ok(args):
        return ROW_FORMS.get(VERSION) or ROW_FORMS[max(ROW_FORMS)]
    return f


def why_not(args, f=None):
    """Why the main pass in form ``f`` (None: ``form()``) cannot take these
    ``lse_forward_passes`` arguments; None if it can."""
    q, r = args["q"], args["r"]
    f = _taken(args, f)
    if q.dtype not in (torch.bfloat16, torch.float16) or args["D"] != D:
        return f"takes bf16 / fp16 rows of D = {D}, got {q.dtype} D = {args['D']}"
    if q.stride(1) != 1 or r.stride(1) != 1:
        return "takes rows with unit feature stride"
    if (r.stride(0) * r.element_size()) % 16 or r.data_ptr() % 16:
        # cp.async moves the reference rows 16 bytes at a time
        return "takes references whose rows start 16-byte aligned"
    if args["HAS_OFFSET"] and args["offset"] != 0:
        return "takes the batch's self pair (offset 0) only"
    if not f.wide and r.shape[0] * r.stride(0) >= 2 ** 31:
        return "takes references whose offsets fit in int32 in this form (wide=False)"
    if args["HAS_OFFSET"] and args["N"] > args["M"]:
        return "takes the batch's self pair with N <= M only"
    if f.block_m > BLOCK_N:
        return f"takes row blocks of at most {BLOCK_N} rows, got form {f.name}"
    if args["M"] < 2 * BLOCK_N:
        return f"needs two reference tiles (M >= {2 * BLOCK_N})"
    return None


def in_label_order(args, block_m):
    """The ORDERED form's inputs from ``lse_forward_passes``' arguments: the queries, their
    label ranks, the references and their packed terms in label order (stable sorts;
    padding kept; the batch's queries are its references, one sort), each query's
    original row (int32), and per block of ``block_m`` sorted queries the first reference
    tile of its labels and their count (int32 (blocks, 2): the tiles that hold references
    with a label from the block's first to its last)."""
    q, r, n, m = args["q"], args["r"], args["N"], args["M"]
    a, b, pack = args["q_labels"], args["r_labels"], args["r_pack"]
    b_sorted, perm_r = torch.sort(b[:m], stable=True)
    r_o = r[perm_r]
    if q is r and a is b:
        # the batch: one order, the pair k, k of the sorted rows excluded (``ordered_ok``)
        a_sorted, perm_q, q_o = b_sorted, perm_r, r_o
    else:
        a_sorted, perm_q = torch.sort(a[:n], stable=True)
        q_o = q[perm_q]
    a_o = torch.cat([a_sorted, a[n:]])       # the padding kept
    pack_o = torch.cat([pack[:m][perm_r], pack[m:]])
    first = a_sorted[::block_m].contiguous()
    last = a_sorted[torch.clamp(torch.arange(block_m - 1, n + block_m - 1, block_m,
                                             device=a.device), max=n - 1)]
    lo = torch.searchsorted(b_sorted, first) // BLOCK_N
    hi = -(-torch.searchsorted(b_sorted, last, right=True) // BLOCK_N)
    span = torch.stack([lo, (hi - lo).clamp_min(0)], 1).to(torch.int32).contiguous()
    return q_o, r_o, a_o, pack_o, perm_q.to(torch.int32), span


def ordered_ok(args):
    """Whether the ORDERED form takes these arguments: without an excluded pair, or for
    the batch (the rows are the references, with their labels), whose excluded pair k, k
    lies among the tiles of its row's label; an excluded pair by position between other
    rows need not."""
    return not args["HAS_OFFSET"] or (args["q"] is args["r"] and
                                      args.get("q_labels") is args.get("r_labels"))


def main_pass(args, grid, f=None):
    """``lse_forward_passes``' main pass (``main``): the Gluon kernel in form ``f`` (None:
    ``form()``) on its arguments, recorded in ``configs.LAUNCHED`` as kind "fwd_main"."""
    f = _taken(args, f)
    reason = why_not(args, f)
    if reason:
        raise ValueError(f"the Gluon main pass {reason}")
    q, r, a, pack = args["q"], args["r"], args["q_labels"], args["r_pack"]
    order = span = None
    if f.ordered:
        q, r, a, pack, order, span = in_label_order(args, f.block_m)
    lse_main_sm90[(triton.cdiv(args["N"], f.block_m),)](
        q, r, a, pack, args["scale"], args["has_pos"], args["lse_all"], args["lse_pos"],
        args["redo"], order, span, args["N"], args["M"], q.stride(0), r.stride(0),
        f.block_m, BLOCK_N, D, bool(args["HAS_OFFSET"]), f.after, f.wide, f.ordered,
        num_warps=f.num_warps)
    configs.LAUNCHED.setdefault(("fwd_main", str(q.dtype), D, (("FORM", f.name),)),
                                set()).add(f.name)
