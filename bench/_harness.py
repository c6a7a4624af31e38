"""Shared benchmark plumbing: environment, inputs, peak memory, timing, result files.

A result file is ``bench/results/<name>.json``::

    {"schema": 1, "name": ..., "env": {...}, "records": [{..., "env": {...}}, ...]}

It is rewritten after every record, so a run that is killed midway keeps what it measured.
``bench/report.py`` turns the files into the tables of ``bench/README.md``.
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SCHEMA = 1
GiB = 1 << 30


# ----------------------------------------------------------------------------- environment
def _git(*args):
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info(device):
    """Where and with what a number was measured: one dict, stored with every record."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    # the tracked files changed from the commit, bench/results/ aside: results written by
    # an earlier step of the same session do not make the code that measures dirty
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                 ":(exclude)bench/results")
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD") or "none (no commit yet)",
        "git_dirty": bool(dirty),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": _meminfo("MemTotal"),
        "device": str(device),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(device)
        env.update(gpu_name=p.name, gpu_memory_bytes=p.total_memory, gpu_sms=p.multi_processor_count,
                   cuda=torch.version.cuda, allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return env


def device_label(env):
    return env.get("gpu_name") or f"{env['cpu_model']} ({env['cpu_cores']} cores)"


def _meminfo(key):
    try:
        for line in open("/proc/meminfo"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------- inputs
# what ``nca_inputs`` draws, in every result file that times them: how many rows the
# Triton forward's exact pass redoes depends on it (bench/sass/second_passes.py)
NCA_INPUTS = "rows 0.1 N(0, 1) (bench/_harness.nca_inputs), labels uniform"


def nca_inputs(n, d, classes, dtype, device, seed=0):
    """Embeddings (n, d) with requires_grad and int64 labels in [0, classes), seeded.

    The scale keeps squared distances near 2*d*0.01, so logits at T=0.1 are O(d/5):
    softmaxes are neither one-hot nor uniform.
    """
    g = torch.Generator().manual_seed(seed)
    x = (0.1 * torch.randn(n, d, generator=g)).to(device=device, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, classes, (n,), generator=g).to(device)
    return x, labels


def tensor_bytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


# ----------------------------------------------------------------------------- CPU peak memory
_LIBC = None


def _malloc_trim():
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_extra(fn):
    """Run ``fn()`` once; return ``(peak extra bytes, method)``: RSS growth at its peak.

    Why this measures "extra memory beyond the inputs":
    * torch's CPU allocator hands freed blocks straight back to glibc (no caching).
      glibc unmaps chunks above its mmap threshold (at most 32 MiB) at once and keeps
      smaller freed heap, which ``malloc_trim(0)`` returns. After ``gc.collect()`` and
      the trim, the resident set is the live data: interpreter, libraries, inputs.
    * Writing "5" to /proc/self/clear_refs (Linux >= 4.0) resets VmHWM, the kernel's
      exact high-water mark of the resident set, to the current RSS. VmHWM after the
      call minus RSS before it is the largest growth during the call, however brief.
    * RSS counts pages touched, i.e. physical memory, what an out-of-memory kill is
      about. Gradients created by the call (N x D) are part of it, as for a user.
    One warm-up call comes first (harness callers do it), so one-time costs such as
    thread pools, compilation or code generation are not charged to the call. Where
    clear_refs is not writable (other kernels), a 1 ms RSS sampler stands in and can
    miss peaks shorter than that: the method is stored with the number.
    """
    gc.collect()
    _malloc_trim()
    base = _status_kib("VmRSS")
    if _reset_hwm():
        fn()
        return (_status_kib("VmHWM") - base) * 1024, "VmHWM-after-clear_refs"
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _status_kib("VmRSS"))
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    return (max(peak[0], _status_kib("VmRSS")) - base) * 1024, "VmRSS-sampled-1ms"


def cpu_memory_limit():
    """Bytes a single case may be predicted to use: NBK_BENCH_MEM_GB (default 18) or 80% free."""
    limit = float(os.environ.get("NBK_BENCH_MEM_GB", "18")) * GiB
    avail = _meminfo("MemAvailable")
    return min(limit, 0.8 * avail) if avail else limit


# ----------------------------------------------------------------------------- GPU memory and time
def cuda_peak_extra(fn, device):
    """Run ``fn()`` once; peak bytes allocated by torch during it beyond what was allocated
    before (the inputs). Memory allocated outside torch's allocator (pykeops) is not seen."""
    torch.cuda.synchronize(device)
    gc.collect()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base, "cuda.max_memory_allocated"


def cuda_time(fn, setup=None, budget_s=0.3, max_reps=50, min_reps=3):
    """Median, min, max seconds of ``fn()`` by CUDA events, one event pair per call.

    Like triton.testing.do_bench (which the issue allows too), but with the repetition
    count chosen from a time budget, so that a 1 s call is not repeated a hundred times.
    ``setup`` (untimed) runs before each call, e.g. to drop gradients.
    """
    samples = []
    reps = max_reps
    for i in range(max_reps):
        if setup:
            setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
        if i == 0:
            reps = max(min_reps, min(max_reps, int(budget_s / max(samples[0], 1e-6))))
        if len(samples) >= reps:
            break
    samples.sort()
    return {"median": samples[len(samples) // 2], "min": samples[0], "max": samples[-1],
            "rounds": len(samples), "method": "cuda-events"}


# ----------------------------------------------------------------------------- GPU clocks
# what bench/gpu_perf.sh samples with nvidia-smi while the timings run (clocks.csv)
CLOCK_QUERY = "timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu"


def read_clocks(path):
    """[(unix s, SM MHz, memory MHz, W, deg C)] of an nvidia-smi sample file (``--query-gpu=
    CLOCK_QUERY --format=csv,noheader,nounits``; its local-time stamps, read on the machine
    that wrote them); lines that do not parse (a cut last line, "[N/A]") are left out."""
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        f = [v.strip() for v in line.split(",")]
        try:
            t = datetime.datetime.strptime(f[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            out.append((t, *map(float, f[1:5])))
        except (ValueError, IndexError):
            continue
    return out


def clocks_during(samples, t0, t1):
    """The samples taken in [t0, t1] (unix s): their median SM and memory clocks (MHz), the
    largest power (W) and their count; None without one."""
    inside = [s for s in samples if t0 <= s[0] <= t1]
    if not inside:
        return None
    med = lambda k: sorted(s[k] for s in inside)[len(inside) // 2]  # noqa: E731
    return {"sm_clock_mhz": med(1), "mem_clock_mhz": med(2),
            "power_w_max": max(s[3] for s in inside), "clock_samples": len(inside)}


def annotate_clocks(result_path, clocks_path):
    """Add to each timed record of a result file the clocks sampled while it was timed
    (its ``time_s["t_unix"]`` window): the model's clock is an assumption, this is the
    GPU's. Returns how many records gained them."""
    samples = read_clocks(clocks_path)
    if not samples or not Path(result_path).exists():
        return 0
    data = json.loads(Path(result_path).read_text())
    n = 0
    for rec in data["records"]:
        timing = rec.get("time_s")
        window = timing.get("t_unix") if isinstance(timing, dict) else None
        got = clocks_during(samples, *window) if window else None
        if got:
            rec.update(got)
            n += 1
    tmp = Path(result_path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, result_path)
    return n


def timed(fn, dry, setup=None, budget_s=0.3, max_reps=20):
    """Seconds of ``fn()`` after one untimed call (compiles, autotunes, caches): on a GPU
    by ``cuda_time``, with the unix-time window of its timing (``t_unix``, which
    ``annotate_clocks`` matches the sampled clocks to); ``dry``: one CPU call timed (the
    interpreter compiles nothing)."""
    if setup:
        setup()
    if dry:
        t0 = time.perf_counter()
        fn()
        s = time.perf_counter() - t0
        return {"median": s, "min": s, "max": s, "rounds": 1, "method": "dry (cpu, interpreter)"}
    fn()
    torch.cuda.synchronize()
    t0 = time.time()
    timing = cuda_time(fn, setup=setup, budget_s=budget_s, max_reps=max_reps)
    return dict(timing, t_unix=[t0, time.time()])


# ----------------------------------------------------------------------------- memory model
# Bytes per element of the N x M matrix that a materializing provider needs for one
# forward+backward, fp32. Starting values from the CPU table (PML ~5 GB and the
# materialized formula ~7 GB at N=16384, i.e. ~19 and ~26 bytes) with a margin; compile is
# a guess. Each measurement replaces the guess for the same provider (see MemoryModel).
PER_PAIR_BYTES = {"pml": 24.0, "reference": 32.0, "compile": 16.0, "flex": 0.0,
                  "pykeops": 0.0}


class MemoryModel:
    """Predicts a case's peak extra memory from the last measured size of the same kind.

    Materializing providers grow as N*M; the fused ones as N. The prediction is
    ``bytes per pair * N * M``, per pair being 1.25 x the last measurement of the same
    provider, mode and dtype, else the guess above: running the sizes in increasing
    order turns guesses into measurements.
    """

    def __init__(self):
        self.per_pair = {}

    def key(self, provider, mode, dtype):
        return (provider, mode, str(dtype))

    def predict(self, provider, mode, dtype, n, m):
        if provider.startswith("nbkernels") or provider not in PER_PAIR_BYTES:
            return 0
        scale = 1.0 if mode.endswith("fwdbwd") else 0.6
        guess = PER_PAIR_BYTES[provider] * scale
        got = self.per_pair.get(self.key(provider, mode, dtype))
        return int((got if got is not None else guess) * n * m)

    def observe(self, provider, mode, dtype, n, m, peak_bytes):
        if provider in PER_PAIR_BYTES and PER_PAIR_BYTES[provider] > 0 and n * m >= 1 << 20:
            self.per_pair[self.key(provider, mode, dtype)] = 1.25 * peak_bytes / (n * m)


# ----------------------------------------------------------------------------- results
def results_dir():
    """NBK_BENCH_RESULTS, else bench/results (quick runs default elsewhere, see conftest)."""
    return Path(os.environ.get("NBK_BENCH_RESULTS", BENCH_DIR / "results"))


class ResultFile:
    """Records of one benchmark run, rewritten atomically after each ``add``."""

    def __init__(self, path, env):
        self.path = Path(path)
        self.env = env
        self.records = []

    def add(self, **record):
        record["env"] = self.env
        self.records.append(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        data = {"schema": SCHEMA, "name": self.path.stem, "env": self.env, "records": self.records}
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)
        return record


def fmt_bytes(b):
    if b is None:
        return "-"
    for unit, k in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(b) >= k:
            return f"{b / k:.2f} {unit}"
    return f"{b} B"


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
