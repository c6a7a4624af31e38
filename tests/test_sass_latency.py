"""The latency-aware SASS estimate (bench/sass/latency.py): its reading of the control bits
and the semantics of its simulation, on instruction streams whose timing is known by hand,
then on a compiled forward kernel (where the static SASS model can run)."""
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.sass import build, latency  # noqa: E402

NONE = 7  # no scoreboard


def op(base="FFMA", stall=1, wbar=NONE, rbar=NONE, wait=0, tensor=0.0, name=None, args=""):
    return latency.Op(base, name or base, args, stall, wbar, rbar, wait, tensor, 0)


def word(stall, yld, wbar, rbar, wait, reuse):
    c = stall | yld << 4 | wbar << 5 | rbar << 8 | wait << 11 | reuse << 17
    return c << 41


def test_control_bits():
    # an sm_90 "@!PT LDS RZ, [RZ]" as nvdisasm -hex prints it: stall 1, yield, no scoreboard
    assert latency.control(0x000FE20000000800) == (1, 1, NONE, NONE, 0, 0)
    for fields in ((5, 0, 2, NONE, 0b000101, 0), (15, 1, NONE, 3, 0b111111, 0b1010)):
        assert latency.control(word(*fields) | 0x1234) == fields


def test_one_warp_runs_its_stalls():
    # 10 instructions of stall 4: one iteration every 40 cycles
    assert latency.simulate([op(stall=4)] * 10, num_warps=1) == 40


def test_warps_of_different_schedulers_run_in_parallel():
    assert latency.simulate([op(stall=4)] * 10, num_warps=4) == 40


def test_two_warps_share_a_scheduler_issue_slot():
    # warps 0 and 4 sit on sub-partition 0: stall 1 each, one issue per cycle there
    assert latency.simulate([op(stall=1)] * 10, num_warps=5) == 20
    # with stall 2 they interleave into the gaps: still one iteration per 20 cycles
    assert latency.simulate([op(stall=2)] * 10, num_warps=5) == 20


def test_scoreboard_wait_exposes_latency():
    # MUFU sets scoreboard 0 (latency LATENCY["MUFU"]); the next instruction waits on it
    chain = [op("MUFU", stall=1, wbar=0), op(stall=1, wait=0b1)]
    per_iter = latency.simulate(chain, num_warps=1)
    assert per_iter == latency.LATENCY["MUFU"] + 1
    # without the wait the two issue back to back (but the MUFU pipe takes 8 cycles)
    assert latency.simulate([chain[0], op(stall=1)], num_warps=1) == latency.MUFU_CYCLES


def test_mufu_pipe_is_shared_per_scheduler():
    # two warps on one sub-partition, 4 MUFU each: 8 MUFU x 8 cycles per iteration
    assert latency.simulate([op("MUFU", stall=1)] * 4, num_warps=5) == 8 * latency.MUFU_CYCLES


def test_cta_barrier_holds_every_warp():
    # every warp runs 10 instructions of stall 3, then BAR.SYNC: 30 cycles, + the barrier;
    # with two warps per scheduler the second passes it one cycle later
    body = [op(stall=3)] * 10 + [op("BAR", stall=1, name="BAR.SYNC.DEFER_BLOCKING")]
    alone = latency.simulate(body, num_warps=1)
    together = latency.simulate(body, num_warps=8)
    assert 30 <= alone <= 33 and alone <= together <= alone + 2
    # a barrier no warp of the CTA can pass alone: one warp per scheduler waiting on
    # scoreboard 0 (a 30-cycle LDS) holds the other three at the barrier
    slow = [op("LDS", stall=1, wbar=0), op(stall=1, wait=0b1)] + body[-1:]
    assert latency.simulate(slow, num_warps=4) >= latency.LATENCY["LDS"]


def test_tensor_cores_are_shared_by_the_sm():
    # each warp issues an HGMMA of 100 tensor cycles and waits for it: 8 warps, 800 cycles
    body = [op("HGMMA", tensor=100.0, args="gsb0"),
            op("WARPGROUP", name="WARPGROUP.DEPBAR.LE", args="gsb0, 0x0")]
    per_iter = latency.simulate(body, num_warps=8)
    assert 800 <= per_iter <= 800 + latency.HGMMA_LATENCY + 2
    # a depbar that keeps one group outstanding lets the next MMA queue behind: no idle pipe
    keep = [body[0], replace(body[1], args="gsb0, 0x1")]
    assert latency.simulate(keep, num_warps=8) == 800


def test_predict_counts_waves():
    # 264 tiles on 132 SMs, 1 CTA each: 2 waves; 265 tiles: 3
    two = latency.predict(1000, 10, 264, 1, 1e12)
    three = latency.predict(1000, 10, 265, 1, 1e12)
    assert two["waves"] == 2 and three["waves"] == 3
    assert three["time_s"] == pytest.approx(1.5 * two["time_s"])


REASON = build.unavailable_reason()


@pytest.mark.skipif(bool(REASON), reason=f"static SASS model unavailable: {REASON}")
def test_forward_kernel_simulates_above_its_bounds():
    """The bf16 forward at its first GPU config: the simulated iteration is no faster than
    its issue slots or its tensor-core time, and its main loop holds HGMMA and MUFU."""
    from nbkernels.backends.triton import kernels as tk
    v = next(v for v in build.variants(dtypes=("bf16",), metrics=("sqeuclidean",),
                                       classes=(False,), kinds=("fwd",), configs=[0]))
    assert tk.GPU_FWD_CONFIGS[0].num_warps == v.num_warps
    c = build.compile_variant(v)
    func, hi = latency.disassemble(c.cubin)[c.name]
    ops = latency.body(func, hi, v.num_warps, v.inner_trips)
    bases = {o.base for o in ops}
    assert {"HGMMA", "MUFU"} <= bases
    assert all(0 <= o.stall <= 15 for o in ops) and any(o.wait for o in ops)
    cycles = latency.simulate(ops, v.num_warps)
    assert cycles >= len(ops) * v.num_warps / 4
    assert cycles >= sum(o.tensor for o in ops) * v.num_warps


def test_wgmma_operand_bytes():
    # SS: A and B from shared memory (one descriptor operand); RS: A from registers.
    # Per warp: a quarter of the warpgroup instruction's bytes.
    from bench.sass import sass
    ss = sass.Instr(0, "", "HGMMA.64x128x16.F32.BF16", "R24, gdesc[UR16], R24")
    rs = sass.Instr(0, "", "HGMMA.64x128x16.F32.BF16", "R24, R120, gdesc[UR8], R24, gsb0")
    tf32 = sass.Instr(0, "", "HGMMA.64x64x8.F32.TF32", "R24, gdesc[UR16], R24")
    assert latency._smem_bytes(ss) == (64 * 16 + 128 * 16) * 2 / 4
    assert latency._smem_bytes(rs) == 128 * 16 * 2 / 4
    assert latency._smem_bytes(tf32) == (64 * 8 + 64 * 8) * 4 / 4
    # a tile of MMAs whose operands take longer to stream than to multiply waits on them
    slow = [op("HGMMA", tensor=10.0, args="gsb0"),
            op("WARPGROUP", name="WARPGROUP.DEPBAR.LE", args="gsb0, 0x0")]
    slow[0] = replace(slow[0], smem_bytes=128 * 40)
    assert latency.simulate(slow, num_warps=1) >= 40


def test_points_from_a_gpu_perf_run(tmp_path):
    """bench/gpu_perf.py's records become measured points: each pinned bf16 forward, and
    each batch backward as fwd+bwd less the forward of the same config; dry runs, other
    dtypes and failed rows give none, and points already there are not added twice."""
    import json

    from bench.sass import latency_report as L

    def rec(mode, fwd, bwd, ms, dtype="bfloat16", status="ok", **kw):
        return dict(name="nbkernels-triton", mode=mode, dtype=dtype, status=status,
                    fwd_config=fwd, bwd_config=bwd, time_s={"median": ms / 1e3}, **kw)
    perf = dict(env=dict(git_commit="0123456789abcdef", git_dirty=False, gpu_name="NVIDIA H200",
                         triton="3.6.0", inputs="rows N(0, 0.3^2)"),
                records=[rec("fwd", [128, 128, 8, 2], [128, 64, 8, 2], 5.0, sm_clock_mhz=1755.0),
                         rec("fwd", [128, 64, 4, 3], [128, 64, 8, 2], 4.0),
                         rec("fwdbwd", [128, 128, 8, 2], [64, 64, 4, 3], 20.0,
                             sm_clock_mhz=1620.0),
                         rec("fwdbwd", [64, 64, 4, 2], [64, 64, 4, 2], 30.0),   # no fwd of it
                         rec("fwd", [64, 64, 4, 2], [128, 64, 8, 2], 9.0, dtype="float32"),
                         rec("fwd", [32, 32, 4, 2], [128, 64, 8, 2], 9.0, status="skipped"),
                         # the symmetric backward's forms: one exp2 per pair, two, both
                         rec("fwdbwd", [128, 64, 4, 3], [128, 64, 8, 2], 12.0, sym_one_exp=[1],
                             inputs="unit-norm rows"),
                         rec("fwdbwd", [128, 64, 4, 3], [64, 64, 4, 2], 14.0, sym_one_exp=[0]),
                         rec("fwdbwd", [128, 64, 4, 3], [32, 32, 4, 2], 19.0,
                             sym_one_exp=[0, 1])])
    points = L.points_from_perf(perf)
    got = {p["variants"][0]: round(p["measured_ms"], 9) for p in points}
    assert got == {"fwd_bf16_sqeuclidean_128x128w8s2": 5.0,
                   "fwd_bf16_sqeuclidean_128x64w4s3": 4.0,
                   "bwd_sym_bf16_sqeuclidean_64x64w4s3": 15.0,
                   "bwd_sym_bf16_sqeuclidean_128x64w8s2": 8.0,
                   "bwd_sym_bf16_sqeuclidean_64x64w4s2_twoexp": 10.0}
    assert any("unit-norm rows" in p["what"] for p in points)
    # the SM clock sampled while a row was timed goes with its point (a backward's: the
    # fwd+bwd row's), and the prediction is made at that clock
    clocks = {p["variants"][0]: p.get("sm_clock_mhz") for p in points}
    assert clocks["fwd_bf16_sqeuclidean_128x128w8s2"] == 1755.0
    assert clocks["bwd_sym_bf16_sqeuclidean_64x64w4s3"] == 1620.0
    assert clocks["fwd_bf16_sqeuclidean_128x64w4s3"] is None
    from bench.sass import model
    assert model.at_clock({}) == 1.0
    assert model.at_clock({"sm_clock_mhz": 1830.0}) == pytest.approx(1.0)
    assert model.at_clock({"sm_clock_mhz": 1980.0}) == pytest.approx(1830 / 1980)
    assert {p["commit"] for p in points} == {"0123456"}
    # the inputs timed go with every point (the exact pass's share depends on them)
    assert {p["inputs"] for p in points} == {"rows N(0, 0.3^2)"}
    # the triton the GPU ran, which --triton 3.6=PATH compiles the point with
    assert {p["triton"] for p in points} == {"3.6.0"} and L._minor("3.6.0") == "3.6"
    assert L.points_from_perf(dict(perf, env=dict(perf["env"], dry=True))) == []
    path, perf_path = tmp_path / "points.json", tmp_path / "gpu_perf.json"
    path.write_text(json.dumps({"points": []}))
    perf_path.write_text(json.dumps(perf))
    assert len(L.add_points(perf_path, path)) == 5
    assert L.add_points(perf_path, path) == []
    assert len(json.loads(path.read_text())["points"]) == 5


def test_shared_memory_widths():
    from bench.sass import sass

    def ins(op):
        return sass.Instr(0, "", op, "R0, [R1]")
    assert latency._smem_bytes(ins("LDSM.16.M88.4")) == 512
    assert latency._smem_bytes(ins("LDSM.16.MT88.2")) == 256
    assert latency._smem_bytes(ins("LDS")) == 128
    assert latency._smem_bytes(ins("LDS.U8")) == 32
    assert latency._smem_bytes(ins("STS.64")) == 256
    assert latency._smem_bytes(ins("LDS.128")) == 512
    # a cp.async writes what it loads into shared memory: 32 lanes x its width
    assert latency._smem_bytes(ins("LDGSTS.E.BYPASS.128")) == 512
    assert latency._smem_bytes(ins("LDGSTS.E.64")) == 256
    assert latency._smem_bytes(ins("LDGSTS.E")) == 128
    assert latency._smem_bytes(ins("LDG.E.128")) == 0


def test_a_scoreboard_waits_for_its_slowest_producer():
    # an LDS (30 cycles) then a MUFU (20) set scoreboard 0; the wait frees with the later
    chain = [op("LDS", stall=1, wbar=0), op("MUFU", stall=1, wbar=0), op(stall=1, wait=0b1)]
    assert latency.simulate(chain, num_warps=1) == latency.LATENCY["LDS"] + 1


def test_second_passes_of_the_measured_commit():
    """bench/sass/second_passes.py: the measured commit's exact pass (the forward) runs
    its flagged rows' blocks, its fix-up pass (the backward) every tile holding a flagged
    row (either side for the symmetric kernel); each point's prediction under each
    candidate input is its main kernel's plus that share of the pass's full grid."""
    import json
    import math

    from bench.sass import second_passes as S
    assert S.grid_share("fwd", 0.25, 128) == 0.25
    assert S.grid_share("bwd", 0.0, 64) == 0.0
    assert S.grid_share("bwd", 0.01, 64) == pytest.approx(1 - 0.99 ** 64)
    assert S.grid_share("bwd_sym", 0.01, 64) == pytest.approx(1 - 0.99 ** 128)
    data = json.loads(S.OUT.read_text())
    assert len(data["points"]) == 6
    assert [name for name, _ in S.INPUTS] == list(data["flagged_rows"])
    for p in data["points"]:
        assert p["main"] in p["kernels"] and p["second"] in p["kernels"]
        assert p["second"].endswith("_pospass" if p["main"].startswith("fwd") else "_fixup")
        for i in p["inputs"]:
            want = p["main_ms"] + i["grid_share"] * p["second_full_grid_ms"]
            assert i["predicted_ms"] == pytest.approx(want)
            assert i["ratio"] == pytest.approx(p["measured_ms"] / want)
        # no flagged row: the main kernel alone, the check's ratio
        assert p["inputs"][0]["flagged_rows"] == 0 and p["inputs"][0]["grid_share"] == 0
    # the flag rule on the candidate inputs: none at N(0, 0.1^2), some at the others
    shares = list(data["flagged_rows"].values())
    assert shares[0] == 0 < shares[1] < shares[2] < 1 and not any(map(math.isnan, shares))
