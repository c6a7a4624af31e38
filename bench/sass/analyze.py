"""One row of the static model per compiled kernel: resources, occupancy, loop mix, pipes.

``analyze_variant`` (Triton, the anchor) and ``analyze_cuda`` (csrc/cuda/*.cu) return
plain dicts, the records of bench/results/sass_sm90.json. All numbers are *predicted from
compiled SASS* for H100 SXM (model.py), at N = M = 65536, D = 128.
"""
import re

from . import build, model, sass

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


def hbm_bytes_per_pair(kind, dtype, n=build.N, m=build.M, d=build.D):
    """Bytes a kernel moves at least once (inputs read once, outputs written once) per pair."""
    e = BYTES[dtype]
    if kind == "anchor":
        return 4 * n * d * e / (n * m)              # q, k, v, out of one head
    if kind == "fwd":
        return ((n + m) * (d * e + 8) + 8 * n) / (n * m)
    return ((n + m) * (d * e + 8) + 16 * n + n * d * e) / (n * m)   # + dx


def _row(v, compiled, usage, mix, spill_bytes=None, extra=None):
    smem = compiled.shared + usage["shared_static"]
    occ = model.occupancy(usage["regs"], smem, v.num_warps)
    pairs = v.block_m * v.block_n
    row = dict(name=v.name, kind=v.kind, dtype=v.dtype, metric=v.metric, cls=v.cls,
               ref_major=v.ref_major, config=v.config, block_m=v.block_m, block_n=v.block_n,
               block_d=v.block_d, num_warps=v.num_warps, num_stages=v.num_stages,
               pairs_per_iter=pairs, regs=usage["regs"], stack_bytes=usage["stack"],
               local_bytes=usage["local"], smem_bytes=smem, **occ)
    spill_instrs = mix.spill_instrs if mix else 0
    row["spill_instrs"] = spill_instrs
    row["spills"] = bool(usage["local"] or spill_instrs or (spill_bytes and any(spill_bytes)))
    if spill_bytes is not None:
        row["ptxas_spill_store_load_bytes"] = list(spill_bytes)
    if extra:
        row.update(extra)
    if mix is None:
        row["error"] = "no loop found in the SASS"
        return row
    row.update(per_pair=mix.per_pair, classes=mix.classes, shapes=mix.shapes,
               tensor_flop_per_pair=mix.tensor_flop_per_pair, loop_instrs=mix.loop_instrs,
               inner_loops=mix.inner_loops, inner_trips=mix.inner_trips,
               opcodes_per_pair={k: round(x, 4) for k, x in list(mix.opcodes.items())[:24]})
    tflop = sum(mix.tensor_flop_per_pair.values())
    row["flop_per_pair"] = v.flop_per_pair
    # programs that each cover a pair (dx slices that recompute the logits): time x passes
    row["passes"] = v.passes
    row["tensor_flop_ratio"] = tflop * v.passes / v.flop_per_pair if v.flop_per_pair else None
    hbm_kind = v.kind if v.kind in ("fwd", "anchor") else "bwd"
    if v.kind == "cuda":
        hbm_kind = "fwd" if "_fwd_" in v.name else "bwd"
    cycles = model.pipes(mix.per_pair, mix.tensor_flop_per_pair,
                         hbm_bytes_per_pair(hbm_kind, v.dtype) / v.passes)
    cycles = {k: c * v.passes for k, c in cycles.items()}
    row["cycles_per_pair"] = cycles
    row["predicted"] = model.predict(cycles, v.flop_per_pair)
    return row


def analyze_variant(v):
    """Compile (memoised) and analyse one Triton variant (or the anchor)."""
    c = build.compile_variant(v)
    usage = sass.resource_usage(c.cubin)[c.name]
    func = sass.disassemble(c.cubin)[c.name]
    mix = sass.loop_mix(func, v.num_warps, v.block_m * v.block_n, v.inner_trips)
    return _row(v, c, usage, mix)


# ------------------------------------------------------------------------------ CUDA


def cuda_trips(func, dtype):
    """Trip counts of the inner loops of a csrc kernel's main loop, from tile.cuh at D = 128.

    tile_dot's chunk loop (the loop holding other loops) runs ceil(D / kChunk) times; its
    k-step loop (HMMA, ``#pragma unroll 2``) kChunk / kStep / 2 times; a load_chunk loop
    ROWS * kChunk / (16 B / element) / kThreads times, the first one in tile_dot (the
    own rows) not at all when D fits one chunk. The scalar fallback of load_chunk (a
    branch the 16-byte-aligned case skips) is counted too: an overcount of LDG and integer
    ops in those loops.
    """
    e = BYTES[dtype]
    step, chunk = (8, 64) if dtype == "fp32" else (16, 128)
    n_chunks = -(-build.D // chunk)
    load = -(-64 * (chunk * e // 16) // 128)

    def trips(lp, index, parent):
        if lp.children:
            return n_chunks
        if sass.loop_ops(func, lp)["HMMA"]:
            return chunk // step // 2
        in_tile_dot = any(not c.children and sass.loop_ops(func, c)["HMMA"] for c in parent.children)
        return 0 if in_tile_dot and index == 0 and n_chunks == 1 else load
    return trips


def _cuda_variant(demangled):
    """Variant fields from a demangled csrc kernel name (tile.cuh: kBM = 64, kBN = 64, 4 warps)."""
    m = re.search(r"(neighbor_(fwd|bwd)_kernel)<nbk::(\w+)(?:<(true|false)>)?, (true|false), "
                  r"(true|false)(?:, (true|false))?>", demangled)
    if not m:
        return None
    kind = m.group(2)
    dtype = "fp32" if m.group(3) == "TF32" else ("bf16" if m.group(4) == "true" else "fp16")
    sq, cls = m.group(5) == "true", m.group(6) == "true"
    # the backward's own rows: the queries (dq) or, kRm, the references (dr)
    side = {None: "", "false": "_dq", "true": "_dr"}[m.group(7)]
    chunk = 64 if dtype == "fp32" else 128      # P::kChunk, the D step of tile_dot
    name = (f"cuda_{kind}{side}_{dtype}_{'sqeuclidean' if sq else 'dot'}"
            f"{'_class' if cls else ''}_64x64w4")
    # the backward grid has one program per kChunk slice of dx, each recomputing the logits
    passes = -(-build.D // chunk) if kind == "bwd" else 1
    return build.Variant(name=name, kind="cuda", dtype=dtype,
                         metric="sqeuclidean" if sq else "dot", cls=cls,
                         ref_major=None, block_m=64, block_n=64, block_d=chunk, num_warps=4,
                         num_stages=1, config="64x64 w4", passes=passes,
                         flop_per_pair=2 * build.D if kind == "fwd" else 4 * build.D)


def analyze_cuda(src):
    """Rows for every kernel instantiated in one csrc/cuda/*.cu (raises if nvcc fails)."""
    cubin, log = build.compile_cuda(src)
    usage = sass.resource_usage(cubin)
    funcs = sass.disassemble(cubin)
    spills = sass.ptxas_spills(log)
    rows = []
    for name, func in funcs.items():
        v = _cuda_variant(build.demangle(name))
        if v is None or name not in usage:
            continue
        c = build.Compiled(cubin=cubin, name=name, shared=0, num_warps=v.num_warps)
        mix = sass.loop_mix(func, v.num_warps, v.block_m * v.block_n, cuda_trips(func, v.dtype))
        rows.append(_row(v, c, usage[name], mix, spill_bytes=spills.get(name),
                         extra={"source": str(src.relative_to(build.ROOT)) if hasattr(src, "relative_to")
                                else str(src), "symbol": build.demangle(name)}))
    return rows


def calibrate(rows, anchor):
    """Add the calibrated prediction: raw x (anchor measured / anchor predicted)."""
    from . import anchor_fa2
    factor = anchor_fa2.MEASURED_TFLOPS / anchor["predicted"]["overlap"]["tflops"]
    for r in rows:
        p = r.get("predicted")
        if p:
            p["calibrated_tflops"] = p["overlap"]["tflops"] * factor
            p["calibrated_pct_bf16_peak"] = p["overlap"]["pct_bf16_peak"] * factor
    return factor


def fwd_bwd_rows(rows):
    """Forward + both backward kernels per (dtype, metric, class), best config each."""
    best = {}
    for r in rows:
        if r["kind"] not in ("fwd", "bwd") or not r.get("predicted"):
            continue
        key = (r["kind"], r["ref_major"], r["dtype"], r["metric"], r["cls"])
        t = r["predicted"]["overlap"]["time_s"]
        if key not in best or t < best[key]["predicted"]["overlap"]["time_s"]:
            best[key] = r
    out = []
    for (kind, rm, dtype, metric, cls), f in sorted(best.items(), key=lambda kv: str(kv[0])):
        if kind != "fwd":
            continue
        dq, dr = best.get(("bwd", False, dtype, metric, cls)), best.get(("bwd", True, dtype, metric, cls))
        if dq and dr:
            out.append(_sum_row([f, dq, dr], dtype, metric, cls))
        # the batch loss: forward + the one symmetric backward kernel
        sym = best.get(("bwd", "sym", dtype, metric, cls))
        if sym:
            row = _sum_row([f, sym], dtype, metric, cls)
            out.append(dict(row, name=row["name"] + "_batch", symmetric=True))
    return out


def _sum_row(parts, dtype, metric, cls):
    n_m = build.N * build.M
    flop = 8 * build.D * n_m
    res = {}
    for bound in ("overlap", "no_overlap"):
        t = sum(p["predicted"][bound]["time_s"] for p in parts)
        res[bound] = {"time_s": t, "tflops": flop / t / 1e12,
                      "pct_bf16_peak": 100 * flop / t / 1e12 / model.BF16_PEAK_TFLOPS}
    t_cal = sum(n_m * p["flop_per_pair"] / (p["predicted"]["calibrated_tflops"] * 1e12)
                for p in parts if "calibrated_tflops" in p["predicted"])
    if t_cal:
        res["calibrated_tflops"] = flop / t_cal / 1e12
        res["calibrated_pct_bf16_peak"] = 100 * res["calibrated_tflops"] / model.BF16_PEAK_TFLOPS
    return dict(name=f"fwd+bwd_{dtype}_{metric}{'_class' if cls else ''}", kind="fwd+bwd",
                dtype=dtype, metric=metric, cls=cls, parts=[p["name"] for p in parts],
                predicted=res)

