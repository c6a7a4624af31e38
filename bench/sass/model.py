"""Occupancy on sm_90 and a pipe model of H100 SXM: cycles per pair, predicted TFLOP/s.

Everything here is *predicted from compiled SASS*: per-pair instruction counts of the main
loop (sass.py) divided by per-SM rates. Rates (per SM per clock, H100 SXM5, dense):

* tensor: 4096 FLOP/clk for 16-bit inputs (bf16 / fp16), 2048 for TF32 (989.4 and
  494.7 TFLOP/s at 132 SMs x 1.83 GHz: NVIDIA H100 Tensor Core GPU datasheet and the
  Hopper architecture whitepaper), 8192 for fp8;
* MUFU (exp2, rcp, lg2, ...): 16 thread-ops/clk (4 SM sub-partitions x 4 lanes; CUDA C++
  Programming Guide, "Arithmetic Instructions" throughput table, cc 9.0);
* FP32 (FFMA, FMUL, FADD and, in this model, FMNMX / FSEL / FSETP): 128 thread-ops/clk;
* issue: 4 warp-instructions/clk (one per sub-partition) = 128 thread-instructions/clk,
  every instruction counted, tensor and memory ones included;
* HBM3: 3.35 TB/s for the bytes a kernel must move at least once (inputs read, outputs
  written), spread over its pairs: a bound, nearly always far below the others here.

Predicted cycles per pair = the largest pipe ("perfect overlap", a lower bound on time);
the sum of the pipes is the "no overlap" bound. Neither models latency, shared-memory
bandwidth or occupancy: occupancy is reported beside them, since with one 8-warp CTA per
SM little latency hides.
"""
import math

SMS = 132
CLOCK_HZ = 1.83e9
HBM_BYTES_S = 3.35e12
BF16_PEAK_TFLOPS = SMS * CLOCK_HZ * 4096 / 1e12   # 989.4
TENSOR_RATE = {"BF16": 4096, "F16": 4096, "TF32": 2048, "E4M3": 8192, "E5M2": 8192, "S8": 8192}
MUFU_RATE = 16
FP32_RATE = 128
ISSUE_RATE = 4 * 32

# sm_90 limits (CUDA C++ Programming Guide, "Compute Capabilities", table for 9.0)
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256          # registers, per warp
MAX_REGS_PER_THREAD = 255
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 227 * 1024
SMEM_RESERVED_PER_BLOCK = 1024    # the runtime's per-block reservation (cc >= 8.0)
WARPS_PER_SM = 64
CTAS_PER_SM = 32


def occupancy(regs, smem_bytes, num_warps):
    """CTAs per SM, active warps and the limiting resource, for sm_90.

    ``smem_bytes`` is what the kernel uses per block (dynamic + static); the runtime adds
    1 KB per block.
    """
    per_warp = math.ceil(max(regs, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // per_warp) // num_warps
    block = smem_bytes + SMEM_RESERVED_PER_BLOCK
    by_smem = SMEM_PER_SM // block if smem_bytes <= SMEM_PER_BLOCK else 0
    by_warps = WARPS_PER_SM // num_warps
    limits = {"registers": by_regs, "shared memory": by_smem, "warps": by_warps,
              "CTAs": CTAS_PER_SM}
    ctas = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "registers"))
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * num_warps,
            "occupancy": ctas * num_warps / WARPS_PER_SM, "limiter": limiter}


def pipes(per_pair, tensor_flop_per_pair, hbm_bytes_per_pair=0.0):
    """Cycles per pair (per SM) on each pipe."""
    fp32 = per_pair["fp32_mul_add_fma"] + per_pair["fp32_sel_setp"] + per_pair["fp32_mnmx"]
    bytes_per_clk = HBM_BYTES_S / (SMS * CLOCK_HZ)
    return {
        "tensor": sum(f / TENSOR_RATE.get(ty, 4096) for ty, f in tensor_flop_per_pair.items()),
        "mufu": (per_pair["mufu_ex2"] + per_pair["mufu_other"]) / MUFU_RATE,
        "fp32": fp32 / FP32_RATE,
        "issue": per_pair["all"] / ISSUE_RATE,
        "hbm": hbm_bytes_per_pair / bytes_per_clk,
    }


def at_clock(point):
    """What a prediction (cycles at CLOCK_HZ) is multiplied by for a point timed with its
    SM clock sampled (``sm_clock_mhz``: bench/gpu_perf.sh's clocks.csv): 1 without one."""
    mhz = point.get("sm_clock_mhz")
    return CLOCK_HZ / (1e6 * mhz) if mhz else 1.0


def predict(cycles, flop_per_pair, n=65536, m=65536):
    """Predicted time and TFLOP/s at n x m pairs, for the max (overlap) and sum bounds."""
    out = {}
    for bound, cyc in (("overlap", max(cycles.values())), ("no_overlap", sum(cycles.values()))):
        t = n * m * cyc / (SMS * CLOCK_HZ)
        tflops = n * m * flop_per_pair / t / 1e12 if t else float("inf")
        out[bound] = {"cycles_per_pair": cyc, "time_s": t, "tflops": tflops,
                      "pct_bf16_peak": 100 * tflops / BF16_PEAK_TFLOPS}
    out["bound_by"] = max(cycles, key=cycles.get)
    return out
