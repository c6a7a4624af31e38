"""Shared-memory bank conflicts from the PTX (bench/sass/banks.py): the wavefront count of
access patterns whose cost is known by hand, the evaluation of lane addresses through a
PTX chain, the matching to SASS, and on compiled kernels the conflict that the TF32
backward's transposed tile store has and its sm_90 variant does not."""
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.sass import banks, build, latency, sass  # noqa: E402

LANE = np.arange(32)


@pytest.mark.parametrize("addr, width, expected", [
    (4 * LANE, 4, 1),                        # consecutive words: one per bank
    (128 * LANE, 4, 32),                     # one bank, 32 distinct words
    (np.zeros(32, int), 4, 1),               # one word: a broadcast
    (8 * (LANE // 2), 4, 1),                 # pairs of lanes share a word, 16 banks
    (4 * (LANE % 16) + 256 * (LANE // 16), 4, 2),   # two words in each of 16 banks
    (16 * LANE, 16, 4),                      # 512 contiguous bytes: 4 wavefronts
    # a broadcast still returns 32 lanes x 8 (16) bytes: 2 (4) wavefronts
    (np.zeros(32, int), 8, 2),
    (np.zeros(32, int), 16, 4),
    (8 * LANE, 8, 2),                        # 256 contiguous bytes
    # 16-byte rows of a [32, 128 B] tile, column 0 of each row: 8 rows share 4 banks
    (128 * LANE, 16, 32),
    # the same rows with the 128-byte swizzle (chunk ^= row % 8): 4 wavefronts
    (128 * LANE + 16 * (LANE % 8), 16, 4),
    # ldmatrix.x4 rows of an unswizzled tile, 128-byte pitch: each 8-lane phase (one
    # matrix) on the same 4 banks, 8 words each (the whole warp's 32 lanes spread over
    # all 32 banks: counted per phase, not per warp)
    (128 * (LANE % 8) + 16 * (LANE // 8), 16, 32),
    # 8-byte accesses by half-warps: lanes l and l + 16 on one word pair, distinct words
    # within each half: conflict-free, 2 wavefronts
    (8 * (LANE % 16), 8, 2),
    # 8-byte, each half-warp's 16 lanes 256 bytes apart: 2 banks, 16 words each, twice
    (256 * (LANE % 16), 8, 32),
    # the generic TF32 backward's transposed store (triton 3.9, 128 x 64, 8 warps):
    # lanes 2k and 2k+1 at 1024 k and 1024 k + 576 bytes, banks 0 and 16 only
    (1024 * (LANE // 2) + 576 * (LANE % 2), 4, 16),
])
def test_wavefronts(addr, width, expected):
    assert banks.wavefronts(np.asarray(addr), width) == expected


PTX = r"""
.visible .entry k(
	.param .u32 k_param_0
)
{
	mov.u32 	%r1, %tid.x;
	ld.param.u32 	%r20, [k_param_0];
	mov.b32 	%r2, global_smem;
	shl.b32 	%r3, %r1, 7;
	and.b32 	%r4, %r1, 7;
	shl.b32 	%r5, %r4, 4;
	xor.b32 	%r6, %r3, %r5;
	add.s32 	%r7, %r2, %r6;
	shl.b32 	%r8, %r1, 2;
	add.s32 	%r9, %r2, %r8;
	add.s32 	%r10, %r9, %r20;
	ld.global.v2.b32 	{ %r11, %r21 }, [ %rd1 + 0 ];
	add.s32 	%r12, %r2, %r11;
	mul.lo.s32 	%r13, %r1, 132;
	add.s32 	%r14, %r2, %r13;
	setp.lt.u32 	%p1, %r1, 16;
	selp.b32 	%r15, 0, 64, %p1;
	add.s32 	%r16, %r9, %r15;
	sub.s32 	%r22, %r1, 16;
	setp.lt.s32 	%p3, %r22, 0;
	shl.b32 	%r23, %r1, 7;
	selp.b32 	%r24, %r23, %r8, %p3;
	add.s32 	%r25, %r2, %r24;
	setp.eq.s32 	%p4, %r22, -1;
	selp.b32 	%r26, 124, 0, %p4;
	add.s32 	%r27, %r9, %r26;
$L__BB0_1:                              // =>This Inner Loop Header
	st.shared.b32 	[%r9+4096], %r1;
	ld.shared.v4.b32 	{%r30, %r31, %r32, %r33}, [%r7+8192];
	st.shared.b32 	[%r10], %r1;
	ld.shared.b32 	%r34, [%r12];
	st.shared.b32 	[%r14+128], %r1;
	ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r40, %r41, %r42, %r43}, [%r7];
	ld.shared.b32 	%r35, [%r16];
	st.shared.b32 	[%r25], %r1;
	ld.shared.b32 	%r36, [%r27];
	@%p2 bra 	$L__BB0_1;
	ret;
}
"""


def test_lane_addresses_through_a_ptx_chain():
    ptx = banks.Ptx(PTX)
    assert len(ptx.loops()) == 1
    lo, hi = ptx.loops()[0]
    acc = banks.accesses(ptx, lo, hi, num_warps=2)
    assert acc == [
        ("STS", 4, 32, 4096, 1.0),        # consecutive words
        ("LDS", 16, 32, 8192, 4.0),       # swizzled 16-byte rows
        ("STS", 4, 32, 0, 1.0),           # + a parameter, the same for every lane
        ("LDS", 4, 32, 0, None),          # an address loaded from memory (a vector's part)
        ("STS", 4, 32, 128, 1.0),         # a row stride of 33 words: no conflict
        ("LDSM", 16, 32, 0, 4.0),         # ldmatrix .x4 on the swizzled rows
        # lanes 16-31 64 bytes on: 2 words in banks 0-15; warp 1 (threads 32-63), all
        # 64 bytes on, has none: the mean over the CTA's warps
        ("LDS", 4, 32, 0, 1.5),
        # tid - 16 < 0 as a signed compare: lanes 0-15 of warp 0 at 128-byte rows (16 on
        # bank 0), the rest consecutive words; warp 1 consecutive words
        ("STS", 4, 32, 0, (16 + 1) / 2),
        # tid - 16 == -1 (a negative immediate) for thread 15 only: moved 124 bytes on, to
        # bank 14 beside lane 14's word, 2 words on that bank in warp 0
        ("LDS", 4, 32, 0, (2 + 1) / 2),
    ]


def test_sass_accesses_take_their_ptx_twins(tmp_path):
    cubin = tmp_path / "k-0123456789ab.cubin"
    cubin.write_bytes(b"not a cubin")
    cubin.with_suffix(".ptx").write_text(PTX)
    assert banks.ptx_path(cubin) == cubin.with_suffix(".ptx")

    def ins(addr, op, args):
        return sass.Instr(addr, "", op, args)
    loop = [ins(0x10, "STS", "[R2+0x1000], R1"),         # [%r9+4096]
            ins(0x20, "FFMA", "R3, R3, R3, R3"),
            ins(0x30, "LDS.128", "R4, [R7+UR4+0x2000]"),  # [%r7+8192]
            ins(0x40, "STS", "[R5+0x80], R1"),           # [%r14+128]
            ins(0x50, "LDSM.16.M88.4", "R8, [R7]"),
            # the PTX loop has 4 loads of 4 bytes at offset 0 (unknown, 1.5, 1.5, ...) and
            # the SASS one at 0 and one at 0x40 (a folded constant): counts differ, the
            # leftovers disagree: neither gets a count
            ins(0x60, "LDS", "R9, [R6]"),
            ins(0x70, "LDS", "R10, [R6+0x40]"),
            # 4-byte stores at offset 0: 2 in the PTX (1.0 and 8.5), 1 in the SASS: the
            # leftovers disagree; at 0x10 none in the PTX
            ins(0x80, "STS", "[R8+0x10], R1")]
    waves, summary = banks.for_loop(cubin, loop, num_warps=2)
    assert waves == {0x10: 1.0, 0x30: 4.0, 0x40: 1.0, 0x50: 4.0}
    assert summary == dict(ptx=True, sass_accesses=7, matched=4, conflicted=0)
    # once the leftovers agree, an unmatched access takes their count
    agree = PTX.replace("st.shared.b32 	[%r25], %r1;", "st.shared.b32 	[%r9], %r1;")
    cubin.with_suffix(".ptx").write_text(agree)
    waves, summary = banks.for_loop(cubin, loop, num_warps=2)
    assert waves[0x80] == 1.0 and summary["matched"] == 5
    other = tmp_path / "other.cubin"
    other.write_bytes(b"x")
    assert banks.for_loop(other, loop, 2) == ({}, dict(ptx=False, sass_accesses=7, matched=0,
                                                       conflicted=0))


def test_conflicted_access_holds_the_shared_memory_pipe():
    # 8 stores, then a load whose result the next instruction waits for: the load queues
    # behind the stores' wavefronts
    def chain(wavefronts):
        sts = latency.Op("STS", "STS", "", 1, 7, 7, 0, 0.0, 128 * wavefronts)
        lds = latency.Op("LDS", "LDS", "", 1, 0, 7, 0, 0.0, 128)
        use = latency.Op("FFMA", "FFMA", "", 1, 7, 7, 0b1, 0.0, 0)
        return latency.simulate([sts] * 8 + [lds, use], num_warps=1)
    assert chain(1) == 8 + latency.LATENCY["LDS"] + 1
    assert chain(16) == 8 * 16 + latency.LATENCY["LDS"] + 1


REASON = build.unavailable_reason()


@pytest.mark.skipif(bool(REASON), reason=f"static SASS model unavailable: {REASON}")
def test_tf32_backward_transposed_store_conflicts():
    """The generic TF32 dq kernel stores each fp32 tile a second time, transposed, 4 bytes
    per lane with 16 lanes on each of 2 banks; the sm_90 variant (OTHER_T) reads the
    transposed copy with cp.async and stores nothing."""
    from nbkernels.backends.triton import kernels as tk
    cfg = next(c for c in tk.GPU_BWD_CONFIGS if build._config_tuple(c, "bwd") == (128, 64, 8, 2))
    seen = {}
    for name in ("generic", "sm90_tf32_transposed"):
        variant = next(v for v in tk.VARIANTS if v.kind == "bwd" and v.name == name)
        vals = build._launch_values("bwd", "fp32", "sqeuclidean", False, False, 128, 64)
        vals = build._fill_unknown(variant.kernel, build.with_variant(vals, variant))
        c = build.compile_triton(variant.kernel, vals, cfg.num_warps, cfg.num_stages,
                                 f"banks_tf32_dq_{name}")
        func, _ = latency.disassemble(c.cubin)[c.name]
        main = sass.main_loop(func, cfg.num_warps)
        loop = [i for i in func.instrs if main.start <= i.addr <= main.end]
        waves, summary = banks.for_loop(c.cubin, loop, cfg.num_warps)
        stores = [waves.get(i.addr) for i in loop if i.base == "STS"]
        seen[name] = (stores, summary)
    stores, summary = seen["generic"]
    assert summary["ptx"] and summary["matched"] >= len(stores) > 0
    assert stores.count(16.0) == 32            # the transposed copy: 32 stores per tile
    assert all(w in (4.0, 16.0) for w in stores)
    stores, summary = seen["sm90_tf32_transposed"]
    assert stores == [] and summary["conflicted"] == 0
