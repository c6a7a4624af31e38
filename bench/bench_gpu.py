"""GPU benchmarks (issue 3, "Benchmarks"): nca_loss forward, backward, forward+backward and
soft_knn_predict, nbkernels against the materialized reference, PML, torch.compile of the
plain formula, FlexAttention and pykeops, side by side in one run.

Grid: N = M in {4096, 16384, 65536, 262144}, D in {64, 128, 256}, 1000 classes, fp32 (tf32
allowed) and bf16. The whole grid does not fit the ~3 minutes gpu_check.sh gives it, so
cases run most important first (``gpu_cases``; the target shape N=65536, D=128 leads) and:

* D = 128 gets every N and every provider; D = 64 and 256 get nbkernels at every N
  (soft_knn_predict at N = 65536) and FlexAttention at N = 65536;
* a provider whose predicted memory exceeds 85% of the free GPU memory is recorded as
  "skipped: OOM predicted" (``_harness.MemoryModel``); a real OOM is recorded as "oom";
* each provider has a time budget (NBK_GPU_BUDGET_<PROVIDER> seconds, defaults below) and
  a case predicted to overrun it is skipped; NBK_BENCH_DEADLINE (unix time) stops all.

Every skip is a record with its reason. Times are CUDA-event medians (``cuda_time``);
"bwd" is derived as fwdbwd - fwd. Memory is torch's peak allocation beyond what was
allocated before the call (inputs; for fwdbwd this includes the input's gradient,
stored separately as ``grad_bytes``). TFLOP/s counts 2*N*M*D (fwd), 6*N*M*D (bwd) and
8*N*M*D (fwdbwd); the fraction is of the card's dense peak (``PEAK_TFLOPS``).

Results: <results>/gpu_<gpu name>.json. NBK_BENCH_QUICK=1 / --quick: N <= 4096.
NBK_GPU_CASES=target: the target shape (N = 65536, D = 128) alone, nbkernels against
FlexAttention, torch.compile and the SDPA flash anchor (``_providers``).
NBK_GPU_BENCH_DEVICE=cpu runs the same code on CPU at quick sizes, to check the plumbing.
"""
import collections
import gc
import os
import re
import time

import pytest
import torch

import _harness as H
import _providers as P

CLASSES, T = 1000, 0.1
N_ORDER = {"full": [65536, 16384, 262144, 4096], "quick": [4096, 1024], "dry": [512, 256]}
OTHER_D = {"full": [64, 256], "quick": [64], "dry": [32]}
BUDGET_S = {"nbkernels-triton": 70, "nbkernels-cuda": 15, "flex": 50, "compile": 40,
            "reference": 10, "pml": 10, "pykeops": 20, "sdpa-flash": 10}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

# Dense (no sparsity) tensor-core peaks in TFLOP/s, from NVIDIA's datasheets, which print
# the rate "with sparsity" (marked *); dense is half of it. H100 SXM5: BF16 1,979*, TF32 989*
# -> 989.4, 494.7 (FP32 non-tensor 67). H100 PCIe: 1,513*, 756* -> 756.5, 378 (FP32 51).
# H100 NVL and H200 NVL: 1,671*, 835* -> 835.5, 417.5 (FP32 60). H200 SXM: the H100 SXM's
# GH100 rates, 989.4 and 494.7. Checked in order; the first pattern that matches wins.
PEAK_TFLOPS = [
    (r"H100.*PCIe", {"bfloat16": 756.5, "tf32": 378.0, "ieee": 51.2}),
    (r"H[12]00.*NVL", {"bfloat16": 835.5, "tf32": 417.5, "ieee": 60.0}),
    (r"H100", {"bfloat16": 989.4, "tf32": 494.7, "ieee": 66.9}),
    (r"H200", {"bfloat16": 989.4, "tf32": 494.7, "ieee": 66.9}),
]


def _device():
    return torch.device(os.environ.get("NBK_GPU_BENCH_DEVICE", "cuda"))


DEVICE = _device()
if DEVICE.type == "cuda":
    # "fp32" means fp32 storage with TF32 matmuls, as PyTorch users get with this setting.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device")

SPENT = collections.defaultdict(float)      # provider -> wall seconds used so far
CASE_RATE = {}                              # provider, dtype, bench -> case seconds per N*M*D


def peak_tflops(name, dtype):
    precision = "tf32" if dtype == "float32" else dtype
    for pattern, peaks in PEAK_TFLOPS:
        if name and re.search(pattern, name):
            return peaks[precision]
    return None


def slug(text):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


_SINK_NAME = []


def sink_name():
    """gpu_<gpu name>, e.g. gpu_nvidia_h100_80gb_hbm3 (gpu_cpu for the CPU dry run)."""
    if not _SINK_NAME:
        name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else DEVICE.type
        _SINK_NAME.append(f"gpu_{slug(name)}")
    return _SINK_NAME[0]


def gpu_cases(size):
    """(bench, provider, n, d, dtype) in the order they run: what the targets need first.

    nbkernels over the D=128 sizes, then FlexAttention and compile at the target shape,
    then nbkernels at D=64/256, then the materializing competitors, pykeops, flex at
    D=64/256. The deadline and the per-provider budgets cut from the end.
    """
    ns, dt = N_ORDER[size], list(DTYPES)
    ours = "nbkernels-triton" if DEVICE.type == "cuda" else "nbkernels-torch"  # dry run: CPU
    main = [(n, 128) for n in ns]
    other = [(n, d) for n in ns for d in OTHER_D[size]]

    def cases(bench, providers, shapes):
        return [(bench, p, n, d, t) for p in providers for n, d in shapes for t in dt]

    if os.environ.get("NBK_GPU_CASES") == "target":
        # the target shape alone, against every fused competitor (bench/gpu_check.sh)
        return (cases("nca_loss", [ours], main[:1])
                + cases("nca_loss", ["flex", "compile", "sdpa-flash"], main[:1])
                + cases("soft_knn_predict", [ours, "compile"], main[:1]))
    return (cases("nca_loss", [ours, "nbkernels-cuda"], main)
            + cases("nca_loss", ["sdpa-flash"], main[:1])
            + cases("soft_knn_predict", [ours, "nbkernels-cuda"], main)
            + cases("nca_loss", ["flex", "compile"], main[:1])
            + cases("nca_loss", [ours], other)
            + cases("soft_knn_predict", [ours], other[: len(OTHER_D[size])])
            + cases("nca_loss", ["reference", "pml"], main)
            + cases("nca_loss", ["compile", "flex"], main[1:])
            + cases("soft_knn_predict", ["compile", "reference"], main)
            + cases("nca_loss", ["pykeops"], main)
            + cases("nca_loss", ["flex"], other[: len(OTHER_D[size])]))


def pytest_generate_tests(metafunc):
    from conftest import is_quick
    size = "dry" if DEVICE.type != "cuda" else "quick" if is_quick(metafunc.config) else "full"
    metafunc.parametrize("bench,provider,n,d,dtype", gpu_cases(size))


# ----------------------------------------------------------------------------- measuring
def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _time(fn, setup=None):
    if DEVICE.type == "cuda":
        return H.cuda_time(fn, setup=setup)
    samples = []
    for _ in range(3):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return {"median": samples[1], "min": samples[0], "max": samples[-1], "rounds": 3,
            "method": "perf_counter"}


def _peak(fn):
    if DEVICE.type == "cuda":
        return H.cuda_peak_extra(fn, DEVICE)
    return H.cpu_peak_extra(fn)


def _free_bytes():
    if DEVICE.type == "cuda":
        # Blocks cached by torch's allocator are free for the next case too.
        cached = torch.cuda.memory_reserved(DEVICE) - torch.cuda.memory_allocated(DEVICE)
        return int(0.85 * (torch.cuda.mem_get_info(DEVICE)[0] + cached))
    return H.cpu_memory_limit()


def _skip_reason(provider, bench, mode, n, d, dtype, memory_model):
    """Why this case cannot or should not run, or None."""
    reason = P.unavailable(provider, DEVICE)
    if reason:
        return reason
    if provider == "pykeops" and dtype == "bfloat16":
        return "pykeops has no bfloat16"
    if provider == "sdpa-flash" and dtype != "bfloat16":
        return "sdpa-flash: the FlashAttention backend takes 16-bit inputs only"
    deadline = float(os.environ.get("NBK_BENCH_DEADLINE", "inf"))
    if time.time() > deadline:
        return "stage deadline (NBK_BENCH_DEADLINE) reached"
    budget = float(os.environ.get(f"NBK_GPU_BUDGET_{slug(provider).upper()}",
                                  BUDGET_S.get(provider, 20)))
    left = budget - SPENT[provider]
    rate = CASE_RATE.get((provider, dtype, bench))
    predicted_s = rate * n * n * d if rate else 0.0
    if left <= 0 or predicted_s > left:
        return (f"time budget of {provider} ({budget:.0f} s; {left:.0f} s left, "
                f"case predicted {predicted_s:.0f} s)")
    predicted = memory_model.predict(provider, f"{bench}/{mode}", dtype, n, n)
    if predicted > _free_bytes():
        return (f"OOM predicted ({H.fmt_bytes(predicted)} > 85% of free "
                f"{H.fmt_bytes(_free_bytes() / 0.85)})")
    return None


def _is_oom(e):
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(e, oom_type) or "out of memory" in str(e).lower()


def _record(sink, case, mode, timing, peak, mem_method, flops, **extra):
    tf = flops / timing["median"] / 1e12 if timing and timing["median"] > 0 else None
    peak_tf = peak_tflops(sink.env.get("gpu_name"), case["dtype"])
    return sink.add(**case, mode=mode, status="ok", reason=None, time_s=timing,
                    peak_extra_bytes=peak, mem_method=mem_method, flops=flops, tflops=tf,
                    peak_tflops=peak_tf, peak_fraction=tf / peak_tf if tf and peak_tf else None,
                    **extra)


def _run(provider, bench, n, d, dtype, result_file, memory_model, measure):
    """Shared skeleton: skip logic, OOM and error recording, time accounting."""
    sink = result_file(sink_name(), DEVICE)
    case = dict(bench=bench, provider=provider, n=n, m=n, d=d, classes=CLASSES, dtype=dtype,
                precision="tf32" if dtype == "float32" and DEVICE.type == "cuda" else None,
                temperature=T, metric="sqeuclidean")
    mode = "fwdbwd" if bench == "nca_loss" else "fwd"
    reason = _skip_reason(provider, bench, mode, n, d, dtype, memory_model)
    if reason:
        sink.add(**case, mode=mode, status="skipped", reason=reason)
        pytest.skip(reason)
    t0 = time.time()
    try:
        measure(sink, case)
    except Exception as e:
        oom = _is_oom(e)
        unavailable = type(e).__name__ == "BackendUnavailableError"
        sink.add(**case, mode=mode,
                 status="oom" if oom else "unavailable" if unavailable else "error",
                 reason=f"{type(e).__name__}: {e}"[:500])
        gc.collect()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        if oom or not provider.startswith("nbkernels-t"):
            pytest.skip(f"{provider}: {'OOM' if oom else type(e).__name__}: {str(e)[:200]}")
        raise
    finally:
        SPENT[provider] += time.time() - t0


# ----------------------------------------------------------------------------- benchmarks
def test_gpu(bench, provider, n, d, dtype, result_file, memory_model):
    measure = measure_nca if bench == "nca_loss" else measure_knn
    _run(provider, bench, n, d, dtype, result_file, memory_model,
         lambda sink, case: measure(provider, n, d, dtype, memory_model, sink, case))


def measure_nca(provider, n, d, dtype, memory_model, sink, case):
    x, labels = H.nca_inputs(n, d, CLASSES, DTYPES[dtype], DEVICE)
    t0 = time.perf_counter()
    fn = P.nca_fn(provider, x, labels, T, dynamic=True)
    _sync()
    setup_s = time.perf_counter() - t0   # flex: the two block masks

    def zero_grad():
        x.grad = None

    def step():
        fn().backward()

    t0 = time.perf_counter()
    step()
    _sync()
    first_call_s = time.perf_counter() - t0
    zero_grad()
    fwd_peak, method = _peak(fn)
    fwd = _time(fn)
    zero_grad()
    fb_peak, _ = _peak(step)
    grad_bytes = H.tensor_bytes(x.grad)
    fb = _time(step, setup=zero_grad)
    memory_model.observe(provider, "nca_loss/fwdbwd", dtype, n, n, fb_peak)
    # A case costs about 8 fwd+bwd calls: warm-up, memory, and >= 3 timed of each mode.
    CASE_RATE[(provider, dtype, "nca_loss")] = 8 * fb["median"] / (n * n * d)
    nmd = n * n * d
    extra = dict(first_call_s=first_call_s, setup_s=setup_s,
                 input_bytes=H.tensor_bytes(x, labels))
    _record(sink, case, "fwd", fwd, fwd_peak, method, 2 * nmd, **extra)
    _record(sink, case, "fwdbwd", fb, fb_peak, method, 8 * nmd, grad_bytes=grad_bytes,
            **extra)
    bwd_s = max(fb["median"] - fwd["median"], 1e-9)
    _record(sink, case, "bwd", dict(median=bwd_s, rounds=fb["rounds"],
                                    method="derived: fwdbwd - fwd"),
            None, None, 6 * nmd, **extra)
    H.log(f"nca {provider} N={n} D={d} {dtype}: fwd {fwd['median'] * 1e3:.2f} ms, "
          f"fwdbwd {fb['median'] * 1e3:.2f} ms, peak {H.fmt_bytes(fb_peak)}")


def measure_knn(provider, n, d, dtype, memory_model, sink, case):
    q, _ = H.nca_inputs(n, d, CLASSES, DTYPES[dtype], DEVICE, seed=0)
    r, r_labels = H.nca_inputs(n, d, CLASSES, DTYPES[dtype], DEVICE, seed=1)
    q, r = q.detach(), r.detach()
    fn = P.knn_fn(provider, q, r, r_labels, CLASSES, T, dynamic=True)

    @torch.no_grad()
    def call():
        return fn()

    t0 = time.perf_counter()
    call()
    _sync()
    first_call_s = time.perf_counter() - t0
    peak, method = _peak(call)
    timing = _time(call)
    memory_model.observe(provider, "soft_knn_predict/fwd", dtype, n, n, peak)
    CASE_RATE[(provider, dtype, "soft_knn_predict")] = 6 * timing["median"] / (n * n * d)
    _record(sink, case, "fwd", timing, peak, method, 2 * n * n * d,
            first_call_s=first_call_s, input_bytes=H.tensor_bytes(q, r, r_labels),
            output_bytes=n * CLASSES * q.element_size())
    H.log(f"knn {provider} N={n} D={d} {dtype}: {timing['median'] * 1e3:.2f} ms, "
          f"peak {H.fmt_bytes(peak)}")
