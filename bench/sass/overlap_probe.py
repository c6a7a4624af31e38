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
* ``tma_ws``: the same with ``tl.range(..., warp_specialize=True)``.

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
         "tma_ws": (tma, {"WS": True})}


def probe(name, block_n=128, num_warps=8, num_stages=3):
    import torch
    fn, extra = FORMS[name]
    bf16 = torch.empty(0, dtype=torch.bfloat16, device="meta")
    f32 = torch.empty(0, dtype=torch.float32, device="meta")
    values = dict(q=bf16, r=bf16, out=f32, M=65536, BLOCK_M=128, BLOCK_N=block_n, D=128, **extra)
    c = build.compile_triton(fn, values, num_warps, num_stages,
                             f"probe_{name}_128x{block_n}w{num_warps}s{num_stages}")
    func, hi = latency.disassemble(c.cubin)[c.name]
    ops = latency.body(func, hi, num_warps, 1)
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
    tags = [t for t, _ in seq]
    waits = [i for i, t in enumerate(tags) if t.startswith("WAIT")]
    last_mma = max((i for i, t in enumerate(tags) if t == "HGMMA"), default=None)
    # overlapped: a wait that keeps MMA in flight, or exps between the chain and its wait
    overlapped = any(tags[i] != "WAIT(0x0)" for i in waits) or any(
        "MUFU" in tags[last_mma:i] for i in waits if last_mma is not None and i > last_mma)
    return dict(form=name, config=f"128x{block_n} w{num_warps} s{num_stages}",
                loop=" | ".join(f"{t} x{n}" for t, n in seq), mma_overlaps_exps=overlapped,
                cycles_per_iter=latency.simulate(ops, num_warps))


def main():
    why = build.unavailable_reason()
    if why:
        sys.exit(f"cannot compile for sm_90 here: {why}")
    rows = []
    for name in FORMS:
        try:
            rows.append(probe(name))
        except Exception as e:  # a form this triton cannot compile is a result too
            rows.append(dict(form=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
        print(json.dumps(rows[-1]), flush=True)
    OUT.write_text(json.dumps(dict(env=report.env(), what=__doc__.split("\n\n")[0],
                                   rows=rows), indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
