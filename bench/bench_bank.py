"""Reference banks (issue 5): the memory and throughput of queries against a large bank.

Two benchmarks, each writing one file under bench/results/:

* ``test_cpu_bank`` -> ``cpu_bank.json``: ``nca_loss`` forward+backward of N=128 queries
  (with gradient) against a 1M x 128 fp32 bank (detached, 1000 classes), T=0.1, on CPU:
  "streamed" (backend torch, ``chunk_size=65536``), "fused" (backend torch, one pass)
  and "materialized" (backend reference, the N x M formula). Peak extra memory is the
  resident-set growth above the inputs (``_harness.cpu_peak_extra``); time is
  pytest-benchmark rounds within a budget.
* ``test_gpu_bank`` -> ``gpu_bank.json`` (needs CUDA): 4096 queries against a 4M x 128 fp32
  bank, "on-device" (the bank in GPU memory, one pass) against "streamed" (the bank pinned
  in host memory, chunks of 65536 rows copied on a side stream while the previous chunk
  computes). Forward (soft_knn_predict, no grad) and nca_loss forward+backward: time,
  bank rows per second, host-to-device GB/s, peak GPU memory beyond the inputs.

Environment: NBK_BENCH_QUICK=1 / --quick (small M), NBK_BENCH_BANK_M, NBK_BENCH_BANK_N,
NBK_BENCH_CHUNK (chunk size), NBK_BENCH_MEM_GB (a materialized case predicted above it is
recorded as skipped), NBK_GPU_BENCH_DEVICE=cpu (run test_gpu_bank's code on CPU, tiny).
"""
import os
import time

import pytest
import torch

import _harness as H
import nbkernels

D, CLASSES, T = 128, 1000, 0.1
CPU_PROVIDERS = ["streamed", "fused", "materialized"]
GPU_PROVIDERS = ["on-device", "streamed"]


def _int_env(name, default):
    return int(os.environ.get(name, default))


def _chunk(m=None):
    """65536 rows (32 MiB at D=128 fp32); an eighth of a quick bank, so that it streams."""
    return _int_env("NBK_BENCH_CHUNK", 65536 if m is None or m >= 1 << 19 else m // 8)


def _bank(m, device, seed=1, pin=False):
    x, labels = H.nca_inputs(m, D, CLASSES, torch.float32, "cpu", seed=seed)
    x = x.detach()
    if pin:
        x, labels = x.pin_memory(), labels.pin_memory()
    return x.to(device), labels.to(device)


@pytest.fixture(scope="module")
def cpu_bank(quick):
    m = _int_env("NBK_BENCH_BANK_M", 1 << 16 if quick else 1 << 20)
    return _bank(m, "cpu")


def _loss_fn(provider, q, q_labels, bank, bank_labels, chunk):
    backend = "reference" if provider == "materialized" else "torch"
    chunk_size = chunk if provider == "streamed" else None

    def fn():
        return nbkernels.nca_loss(q, q_labels, ref_embeddings=bank, ref_labels=bank_labels,
                                  temperature=T, backend=backend, chunk_size=chunk_size)
    return fn


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_cpu_bank(provider, cpu_bank, benchmark, quick, result_file, memory_model):
    sink = result_file("cpu_bank", "cpu")
    bank, bank_labels = cpu_bank
    n, m = _int_env("NBK_BENCH_BANK_N", 64 if quick else 128), bank.shape[0]
    chunk = _chunk(m) if provider == "streamed" else None
    case = dict(bench="bank_nca_loss", mode="fwdbwd", provider=provider, n=n, m=m, d=D,
                classes=CLASSES, dtype="float32", temperature=T, metric="sqeuclidean",
                chunk_size=chunk, bank_bytes=H.tensor_bytes(bank, bank_labels))
    benchmark.group = f"bank nca_loss fwd+bwd N={n} M={m} D={D} fp32"
    predicted = memory_model.predict("reference" if provider == "materialized" else
                                     "nbkernels", "fwdbwd", torch.float32, n, m)
    if predicted > H.cpu_memory_limit():
        reason = (f"OOM/skipped: predicted {H.fmt_bytes(predicted)} > limit "
                  f"{H.fmt_bytes(H.cpu_memory_limit())}")
        sink.add(**case, status="skipped", reason=reason, predicted_bytes=predicted)
        pytest.skip(reason)
    q, q_labels = H.nca_inputs(n, D, CLASSES, torch.float32, "cpu", seed=2)
    fn = _loss_fn(provider, q, q_labels, bank, bank_labels, chunk)

    def zero_grad():
        q.grad = None

    def step():
        fn().backward()

    wq, wl = H.nca_inputs(8, D, CLASSES, torch.float32, "cpu", seed=3)  # warm-up, small
    _loss_fn(provider, wq, wl, bank[:4096], bank_labels[:4096], chunk and 1024)().backward()
    peak, method = H.cpu_peak_extra(step)
    zero_grad()
    t0 = time.perf_counter()
    step()
    call_s = time.perf_counter() - t0
    zero_grad()
    rounds = max(1, min(3, int((10 if quick else 60) / call_s)))
    benchmark.pedantic(step, setup=zero_grad, rounds=rounds, warmup_rounds=0, iterations=1)
    st = benchmark.stats.stats
    timing = dict(median=st.median, min=st.min, max=st.max, rounds=st.rounds,
                  method="pytest-benchmark")
    benchmark.extra_info.update(provider=provider, n=n, m=m, peak_extra_bytes=peak)
    sink.add(**case, status="ok", reason=None, time_s=timing, peak_extra_bytes=peak,
             mem_method=method, predicted_bytes=predicted,
             input_bytes=H.tensor_bytes(q, q_labels, bank, bank_labels),
             refs_per_s=m / timing["median"])
    H.log(f"bank {provider} N={n} M={m}: median {timing['median']:.3f} s, "
          f"peak extra {H.fmt_bytes(peak)}")


# ----------------------------------------------------------------------------- GPU


def _gpu_device():
    return torch.device(os.environ.get("NBK_GPU_BENCH_DEVICE", "cuda"))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.fixture(scope="module")
def gpu_banks(quick):
    device = _gpu_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device (NBK_GPU_BENCH_DEVICE=cpu runs this code on CPU, tiny)")
    dry = device.type != "cuda"
    m = _int_env("NBK_BENCH_BANK_M", 1 << 14 if dry else 1 << 18 if quick else 1 << 22)
    host = _bank(m, "cpu", pin=not dry)
    return device, host, (host[0].to(device), host[1].to(device))


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
def test_gpu_bank(provider, mode, gpu_banks, quick, result_file):
    device, host, on_device = gpu_banks
    dry = device.type != "cuda"
    bank, bank_labels = host if provider == "streamed" else on_device
    n, m = _int_env("NBK_BENCH_BANK_N", 256 if dry else 1024 if quick else 4096), bank.shape[0]
    chunk = _chunk(m)
    chunk = chunk if provider == "streamed" else None
    sink = result_file("gpu_bank", device)
    q, q_labels = H.nca_inputs(n, D, CLASSES, torch.float32, device, seed=2)
    case = dict(bench="bank", mode=mode, provider=provider, n=n, m=m, d=D, classes=CLASSES,
                dtype="float32", temperature=T, metric="sqeuclidean", chunk_size=chunk,
                bank_device=str(bank.device), bank_pinned=bool(bank.is_pinned()) if
                bank.device.type == "cpu" and not dry else False,
                precision="tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee")

    if mode == "fwd":
        @torch.no_grad()
        def call():
            return nbkernels.soft_knn_predict(q, bank, bank_labels, CLASSES, temperature=T,
                                              chunk_size=chunk)
        setup = None
    else:
        def call():
            nbkernels.nca_loss(q, q_labels, ref_embeddings=bank, ref_labels=bank_labels,
                               temperature=T, chunk_size=chunk).backward()

        def setup():
            q.grad = None

    call()  # warm-up: kernels compiled, pinned staging and streams set up
    _sync(device)
    if device.type == "cuda":
        peak, method = H.cuda_peak_extra(call, device)
        timing = H.cuda_time(call, setup=setup, budget_s=2.0, max_reps=10)
    else:
        peak, method = H.cpu_peak_extra(call)
        t0 = time.perf_counter()
        call()
        s = time.perf_counter() - t0
        timing = dict(median=s, min=s, max=s, rounds=1, method="perf_counter")
    passes = 1 if mode == "fwd" else 2  # the backward streams the bank again
    moved = passes * H.tensor_bytes(bank, bank_labels) if provider == "streamed" else 0
    sink.add(**case, status="ok", reason=None, time_s=timing, peak_extra_bytes=peak,
             mem_method=method, bank_bytes=H.tensor_bytes(bank, bank_labels),
             refs_per_s=m / timing["median"],
             h2d_gb_per_s=moved / timing["median"] / 1e9 if moved else None)
    H.log(f"gpu bank {provider} {mode} N={n} M={m}: {timing['median'] * 1e3:.1f} ms, "
          f"peak {H.fmt_bytes(peak)}")
