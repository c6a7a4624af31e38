"""Can Triton, on sm_90, overlap the logits' wgmma with the softmax of the previous tile?

    python bench/sass/overlap_probe.py    # writes bench/results/overlap_probe_sm90.json

Compiles minimal forms of our forward's main loop (q tile resident, one dot per reference
tile, exp2 and a row sum) for sm_90 and reads, in the main loop's SASS, where the wait on
the warpgroup MMA (``WARPGROUP.DEPBAR.LE gsb0, k``) sits: right after the HGMMA chain with
k = 0 (the MMA serialised with the exps), or after exps / with k > 0 (overlapped). Forms:

* ``plain``: the dot of tile j, then its softmax;
* ``ahead``: the dot of tile j + 1 issued before the softmax of tile j (its result
  loop-carried), the software pipelining FlashAttention-3 does by hand;
* ``tma``: the reference tiles through device-side tensor descriptors (TMA, mbarriers);
* ``tma_ws``: the same with ``tl.range(..., warp_specialize=True)``;
* ``gluon_ahead`` / ``gluon_carried``: the "ahead" form written in Gluon, where the wgmma is issued async and
  waited for explicitly (one warpgroup, 64 x 128 tiles, a 3-buffer cp.async ring): the
  next tile's wgmma is issued, this tile's exps run, and the wgmma is waited for before
  the back edge. ``gluon_carried`` instead carries the in-flight wgmma across the back
  edge and waits with one group left at the top of the next iteration. Their ptxas
  advisories are recorded: ptxas serializes a wgmma pipeline whose accumulator registers
  other instructions touch while it is in flight, as the loop's copy of the carried
  accumulator does (advisory C7514).

*Compiled, not run*: what the compiler emits, for deciding how a v4 forward can be built.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench.sass import build, latency, report  # noqa: E402

OUT = ROOT / "bench" / "results" / "overlap_probe_sm90.json"


@triton.jit
def _query_tile(q, BLOCK_M: tl.constexpr, D: tl.constexpr):
    """The program's rows, feature offsets, resident query tile [BM, D] and row sums."""
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, D)
    b_q = tl.load(q + o_m[:, None] * D + o_d[None, :])
    return o_m, o_d, b_q, tl.zeros([BLOCK_M], dtype=tl.float32)


@triton.jit
def plain(q, r, out, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    o_m, o_d, b_q, b_l = _query_tile(q, BLOCK_M, D)
    for i_n in range(0, M, BLOCK_N):
        o_n = i_n + tl.arange(0, BLOCK_N)
        b_s = tl.dot(b_q, tl.trans(tl.load(r + o_n[:, None] * D + o_d[None, :])))
        b_l += tl.sum(tl.math.exp2(b_s), 1)
    tl.store(out + o_m, b_l)


@triton.jit
def ahead(q, r, out, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    o_m, o_d, b_q, b_l = _query_tile(q, BLOCK_M, D)
    o_n = tl.arange(0, BLOCK_N)
    b_next = tl.dot(b_q, tl.trans(tl.load(r + o_n[:, None] * D + o_d[None, :])))
    for i_n in range(BLOCK_N, M, BLOCK_N):
        b_s = b_next
        o_n = i_n + tl.arange(0, BLOCK_N)
        b_next = tl.dot(b_q, tl.trans(tl.load(r + o_n[:, None] * D + o_d[None, :])))
        b_l += tl.sum(tl.math.exp2(b_s), 1)
    b_l += tl.sum(tl.math.exp2(b_next), 1)
    tl.store(out + o_m, b_l)


@triton.jit
def tma(q, r, out, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
        WS: tl.constexpr):
    i_m = tl.program_id(0)
    q_desc = tl.make_tensor_descriptor(q, shape=[M, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    r_desc = tl.make_tensor_descriptor(r, shape=[M, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    b_q = q_desc.load([i_m * BLOCK_M, 0])
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    for i_n in tl.range(0, M, BLOCK_N, warp_specialize=WS):
        b_s = tl.dot(b_q, tl.trans(r_desc.load([i_n, 0])))
        b_l += tl.sum(tl.math.exp2(b_s), 1)
    tl.store(out + i_m * BLOCK_M + tl.arange(0, BLOCK_M), b_l)


FORMS = {"plain": (plain, {}), "ahead": (ahead, {}), "tma": (tma, {"WS": False}),
         "tma_ws": (tma, {"WS": True}), "gluon_ahead": (None, {"CARRY": False}),
         "gluon_carried": (None, {"CARRY": True})}


def _gluon_kernel():
    """The "ahead" form in Gluon (``_gluon_probe.gluon_ahead``): one warpgroup, the
    reference tiles through a cp.async ring of STAGES buffers, the next tile's wgmma
    issued async before the current tile's exps; CARRY: waited for with one group left at
    the top of the next iteration, else before the back edge."""
    from bench.sass import _gluon_probe
    return _gluon_probe.gluon_ahead


def _compile(name, values, num_warps, num_stages):
    """(cubin path, kernel name, dynamic shared bytes) of form ``name``."""
    if FORMS[name][0] is not None:
        c = build.compile_triton(FORMS[name][0], values, num_warps, num_stages,
                                 f"probe_{name}_{values['BLOCK_M']}x{values['BLOCK_N']}"
                                 f"w{num_warps}s{num_stages}")
        return c.cubin, c.name, c.shared
    from triton.experimental.gluon._runtime import GluonASTSource
    fn = _gluon_kernel()
    src, _ = build.ast_source(fn, values)
    k = triton.compile(GluonASTSource(fn, src.signature, src.constants, src.attrs),
                       target=build._target(), options=dict(num_warps=num_warps))
    path = build.cache_dir() / f"probe_{name}_{values['BLOCK_M']}x{values['BLOCK_N']}.cubin"
    path.write_bytes(k.asm["cubin"])
    _ADVICE[name] = _ptxas_advice(k.asm["ptx"])
    return path, k.metadata.name, int(k.metadata.shared)


_ADVICE = {}


def _ptxas_advice(ptx):
    """ptxas's performance advisories (``(C75..)`` lines of ``-v``) on ``ptx`` for sm_90a,
    with the newest bundled ptxas that reads it: why a wgmma pipeline is serialized."""
    import subprocess
    import tempfile
    for tool in ("ptxas-blackwell", "ptxas"):
        exe = build.tool(tool)
        if not exe:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "k.ptx"
            src.write_text(ptx)
            out = subprocess.run([exe, "-arch=sm_90a", "-v", str(src), "-o", str(src) + ".cubin"],
                                 capture_output=True, text=True)
        if out.returncode == 0:
            return [line.split("info    : ", 1)[-1] for line in out.stderr.splitlines()
                    if "(C75" in line]
    return None


def _loop(ops):
    """The loop's MMA / exp / barrier / wait order, runs collapsed: [[tag, count]]."""
    seq = []
    for o in ops:
        tag = {"HGMMA": "HGMMA", "MUFU": "MUFU", "BAR": "BAR"}.get(o.base)
        if o.base == "WARPGROUP" and "DEPBAR" in o.op:
            tag = f"WAIT({o.args.split(',')[-1].strip()})"
        if tag:
            if seq and seq[-1][0] == tag:
                seq[-1][1] += 1
            else:
                seq.append([tag, 1])
    return seq


def exps_under_mma(seq):
    """(exps issued between an MMA chain's first instruction and its wait, exps in all) of
    a loop order ``seq`` (``_loop``); a wait that keeps MMA in flight covers what follows
    it too. The MMA overlaps the exps when a good share of them sits under it."""
    under, total, first, open_ = 0, 0, None, False
    for i, (t, n) in enumerate(seq):
        if t == "MUFU":
            total += n
            under += n if (first is not None or open_) else 0
        elif t == "HGMMA" and first is None:
            first = i
        elif t.startswith("WAIT"):
            open_ = t != "WAIT(0x0)"
            first = None
    return under, total


def _overlapped(seq, share=0.25):
    under, total = exps_under_mma(seq)
    return total > 0 and under >= share * total


def probe(name, block_m=128, block_n=128, num_warps=8, num_stages=3):
    import torch
    bf16 = torch.empty(0, dtype=torch.bfloat16, device="meta")
    f32 = torch.empty(0, dtype=torch.float32, device="meta")
    values = dict(q=bf16, r=bf16, out=f32, M=65536, BLOCK_M=block_m, BLOCK_N=block_n, D=128,
                  **FORMS[name][1])
    if FORMS[name][0] is None:
        values["STAGES"] = num_stages
    cubin, fn_name, shared = _compile(name, values, num_warps, num_stages)
    sim = latency.simulate_cubin(cubin, fn_name, shared, num_warps)
    ops, ctas, cycles = sim.ops, sim.ctas_per_sm, sim.cycles_per_iter
    seq = _loop(ops)
    return dict(form=name, config=f"{block_m}x{block_n} w{num_warps} s{num_stages}",
                regs=sim.regs, ctas_per_sm=ctas,
                loop=" | ".join(f"{t} x{n}" for t, n in seq),
                exps_under_mma=exps_under_mma(seq), mma_overlaps_exps=_overlapped(seq),
                cycles_per_iter=cycles, cycles_per_pair=cycles / (ctas * block_m * block_n),
                **({"ptxas_advice": _ADVICE[name]} if name in _ADVICE else {}))


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    why = build.unavailable_reason()
    if why:
        sys.exit(f"cannot compile for sm_90 here: {why}")
    rows = []
    # the Triton forms at our forward's config, and the plain one also at the Gluon forms'
    # (one warpgroup, 64 x 128, two CTAs per SM), the like-for-like comparison
    runs = [(name, (128, 128, 8, 3)) for name in FORMS if not name.startswith("gluon")]
    runs += [(name, (64, 128, 4, 3)) for name in ("plain", "gluon_ahead", "gluon_carried")]
    for name, cfg in runs:
        try:
            rows.append(probe(name, *cfg))
        except Exception as e:  # a form this triton cannot compile is a result too
            rows.append(dict(form=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(dict(env=report.env(), what=__doc__.split("\n\n")[0],
                                              rows=rows), indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
