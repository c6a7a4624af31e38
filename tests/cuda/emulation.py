"""Build and load the host emulation of the CUDA ops, for tests only.

``NBK_CUDA_EMULATE=1 python -m pytest tests/cuda`` runs the kernels' own source
(csrc/cuda/*.cu) on CPU tensors: g++ compiles it against tests/cuda/emulator.h and
csrc/neighbor.cpp with NBK_HOST_EMULATION, links them into one library, and
``torch.ops.load_library`` registers the same ``nbkernels::cuda_*`` ops for the CPU. It is
slow (every warp collective switches fibers) and checks logic, not speed or PTX; the
library is cached by a hash of the sources.
"""
import glob
import hashlib
import os
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"


def cuda_include():
    """The include folder of a local CUDA toolkit (for cuda_fp16.h / cuda_bf16.h)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in filter(None, homes):
        for sub in ("include", "targets/x86_64-linux/include"):
            if (Path(home) / sub / "cuda_fp16.h").exists():
                return Path(home) / sub
    return None


def _sources():
    return sorted([*CSRC.rglob("*.cu"), *CSRC.rglob("*.cuh"), *CSRC.rglob("*.h"),
                   CSRC / "neighbor.cpp", HERE / "emulator.h", Path(__file__)])


def _run(cmd):
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} ... failed:\n{res.stderr[-6000:]}")


def build():
    """Path of the emulated library, compiled on first use."""
    include = cuda_include()
    if include is None:
        raise RuntimeError("no CUDA toolkit headers (cuda_fp16.h) found; set CUDA_HOME")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in _sources())).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"nbk_emulator_{digest}"
    lib = out / "libnbk_emulated.so"
    if lib.exists():
        return lib
    out.mkdir(parents=True, exist_ok=True)
    kernels = out / "kernels.cpp"
    kernels.write_text("".join(f'#include "{p}"\n' for p in sorted(CSRC.glob("cuda/*.cu"))))
    torch_inc = Path(torch.__file__).parent / "include"
    common = ["g++", "-c", "-std=c++20", "-O1", "-fPIC", "-w"]
    jobs = [
        [*common, str(kernels), "-o", str(out / "kernels.o"), "-include", str(HERE / "emulator.h"),
         f"-I{HERE}", f"-I{CSRC / 'cuda'}", f"-I{include}"],
        [*common, str(CSRC / "neighbor.cpp"), "-o", str(out / "binding.o"), "-DNBK_HOST_EMULATION",
         f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}", f"-I{torch_inc}",
         f"-I{torch_inc / 'torch' / 'csrc' / 'api' / 'include'}",
         f"-I{sysconfig.get_paths()['include']}"],
    ]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in jobs]
    for cmd, proc in zip(jobs, procs):
        _, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"emulator build failed: {' '.join(cmd[:5])}\n{err[-6000:]}")
    tmp = out / f"tmp_{os.getpid()}.so"
    _run(["g++", "-shared", "-o", str(tmp), str(out / "kernels.o"), str(out / "binding.o"),
          f"-L{torch_inc.parent / 'lib'}", "-lc10", "-ltorch_cpu", "-ltorch"])
    tmp.replace(lib)
    return lib


def install(monkeypatch, cuda_backend):
    """Load the emulated ops and let ``cuda_backend`` run them on CPU tensors."""
    if not hasattr(torch.ops.nbkernels, "cuda_lse_fwd"):
        torch.ops.load_library(str(build()))
        if cuda_backend._C is None:  # the real extension would have registered them
            cuda_backend._register_fakes()
    monkeypatch.setattr(cuda_backend, "_C", "emulated")
    monkeypatch.setattr(cuda_backend, "is_available", lambda device: True)

    def check(q, metric):
        if metric not in cuda_backend.METRICS:
            raise ValueError(f"metric must be one of {cuda_backend.METRICS}, got {metric!r}")

    monkeypatch.setattr(cuda_backend, "_check_device", check)
