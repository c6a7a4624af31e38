"""CPU benchmarks of nca_loss forward+backward (issue 2, "Performance").

Two benchmarks, each writing one file under bench/results/:

* ``test_compare`` -> ``cpu_compare.json``: N=16384, D=128, 100 classes, fp32, T=0.1,
  sqeuclidean; nbkernels "torch" side by side with pytorch-metric-learning, the
  materialized formula, torch.compile of the plain formula and pykeops.
  The target: nbkernels takes <= 1/2 the time and <= 1/10 the peak extra memory of PML.
* ``test_scaling`` -> ``cpu_scaling.json``: N = 1k..32k for nbkernels "torch", PML and
  compile; a case whose predicted memory exceeds the limit is recorded as skipped.

Each case: one warm-up call (at full size for compile, whose first call is its compile,
else at N=256), one call measured for peak extra memory (``_harness.cpu_peak_extra``),
then pytest-benchmark rounds, as many as fit a time budget (at least 1). A provider whose
one call already exceeds that budget (pykeops at N=16384) is timed by that one call.

Environment: NBK_BENCH_QUICK=1 or --quick (small N), NBK_BENCH_PROVIDERS=a,b (subset),
NBK_BENCH_CPU_N (size of test_compare), NBK_BENCH_MEM_GB (memory limit, default 18),
NBK_BENCH_MAX_CALL_S (skip a case whose call, extrapolated as N^2 from the provider's
previous size, would exceed this; default 300).
"""
import os
import time

import pytest
import torch

import _harness as H
import _providers as P

D, CLASSES, T = 128, 100, 0.1
COMPARE = ["nbkernels-torch", "pml", "reference", "compile", "pykeops"]
SCALING = ["nbkernels-torch", "pml", "compile"]
SCALING_N = [1024, 2048, 4096, 8192, 16384, 32768]
QUICK_SCALING_N = [256, 512, 1024]
WARMUP_N = 256
CALL_RATE = {}  # provider -> seconds per pair (N*N) of its last measured call


def max_call_s():
    return float(os.environ.get("NBK_BENCH_MAX_CALL_S", "300"))


def _selected(providers):
    only = os.environ.get("NBK_BENCH_PROVIDERS")
    return [p for p in providers if not only or p in only.split(",")]


def run_case(benchmark, sink, memory_model, provider, n, *, round_budget_s, max_rounds):
    """Measure one provider at one size and add its record to ``sink``."""
    dtype = torch.float32
    case = dict(bench="nca_loss", mode="fwdbwd", provider=provider, n=n, m=n, d=D,
                classes=CLASSES, dtype="float32", temperature=T, metric="sqeuclidean")
    benchmark.group = f"nca_loss fwd+bwd N={n} D={D} fp32"
    reason = P.unavailable(provider, torch.device("cpu"))
    predicted = memory_model.predict(provider, "fwdbwd", dtype, n, n)
    if reason is None and predicted > H.cpu_memory_limit():
        reason = (f"OOM/skipped: predicted {H.fmt_bytes(predicted)} > limit "
                  f"{H.fmt_bytes(H.cpu_memory_limit())}")
    predicted_s = CALL_RATE.get(provider, 0.0) * n * n
    if reason is None and predicted_s > max_call_s():
        reason = (f"skipped: predicted {predicted_s:.0f} s per call > NBK_BENCH_MAX_CALL_S "
                  f"({max_call_s():.0f} s)")
    if reason:
        sink.add(**case, status="skipped", reason=reason, predicted_bytes=predicted)
        pytest.skip(reason)

    # Warm-up: thread pools, codegen (pykeops), compilation (compile, at the real shape).
    warm_n = n if provider == "compile" else min(n, WARMUP_N)
    wx, wl = H.nca_inputs(warm_n, D, CLASSES, dtype, "cpu", seed=1)
    t0 = time.perf_counter()
    try:
        P.nca_fn(provider, wx, wl, T)().backward()
    except Exception as e:
        sink.add(**case, status="error", reason=f"{type(e).__name__}: {e}"[:500])
        raise
    first_call_s = time.perf_counter() - t0
    del wx, wl

    x, labels = H.nca_inputs(n, D, CLASSES, dtype, "cpu")
    fn = P.nca_fn(provider, x, labels, T)

    def zero_grad():
        x.grad = None

    def step():
        fn().backward()

    zero_grad()
    t0 = time.perf_counter()
    peak, mem_method = H.cpu_peak_extra(step)
    mem_call_s = time.perf_counter() - t0
    memory_model.observe(provider, "fwdbwd", dtype, n, n, peak)
    CALL_RATE[provider] = mem_call_s / (n * n)

    benchmark.extra_info.update(provider=provider, n=n, peak_extra_bytes=peak)
    st = None
    if mem_call_s <= round_budget_s:
        rounds = max(1, min(max_rounds, int(round_budget_s / max(mem_call_s, 1e-6))))
        benchmark.pedantic(step, setup=zero_grad, rounds=rounds, warmup_rounds=0, iterations=1)
        st = benchmark.stats.stats if benchmark.stats else None
    if st is not None:
        timing = dict(median=st.median, min=st.min, max=st.max, rounds=st.rounds,
                      method="pytest-benchmark")
    else:
        # A call longer than the whole round budget (pykeops: minutes) is timed once: the
        # memory call above, which ran after the warm-up like any round would.
        timing = dict(median=mem_call_s, min=mem_call_s, max=mem_call_s, rounds=1,
                      method="single call (the memory-measured one)")
    extra = {}
    if provider == "compile":
        extra["compile_s"] = max(0.0, first_call_s - timing["median"])
    elif provider == "pykeops":
        extra["codegen_s"] = first_call_s  # at N=WARMUP_N: the C++ build, cached on disk
    sink.add(**case, status="ok", reason=None, time_s=timing, peak_extra_bytes=peak,
             mem_method=mem_method, input_bytes=H.tensor_bytes(x, labels),
             predicted_bytes=predicted, first_call_s=first_call_s, first_call_n=warm_n, **extra)
    H.log(f"{provider} N={n}: median {timing['median']:.3f} s over {timing['rounds']} rounds, "
          f"peak extra {H.fmt_bytes(peak)}")


def _compare_n(quick):
    return int(os.environ.get("NBK_BENCH_CPU_N", 1024 if quick else 16384))


@pytest.mark.parametrize("provider", _selected(COMPARE))
def test_compare(provider, benchmark, quick, result_file, memory_model):
    sink = result_file("cpu_compare", "cpu")
    run_case(benchmark, sink, memory_model, provider, _compare_n(quick),
             round_budget_s=5 if quick else 40, max_rounds=3 if quick else 5)


def pytest_generate_tests(metafunc):
    # Sizes ascend per provider, so each prediction extrapolates the previous measurement.
    if metafunc.function.__name__ == "test_scaling":
        from conftest import is_quick
        sizes = QUICK_SCALING_N if is_quick(metafunc.config) else SCALING_N
        metafunc.parametrize("provider,n", [(p, n) for p in _selected(SCALING) for n in sizes])


def test_scaling(provider, n, benchmark, quick, result_file, memory_model):
    sink = result_file("cpu_scaling", "cpu")
    run_case(benchmark, sink, memory_model, provider, n,
             round_budget_s=3 if quick else 15, max_rounds=3)
