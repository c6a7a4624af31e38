"""The CUDA sources compile on a CPU-only machine, and the package works without them.

* Every csrc/**/*.cu compiles with ``nvcc -c`` for sm_80 and sm_90 against CUDA's own
  headers (no torch headers), so the kernels never rot. Device code is compiled at
  ``-Xcicc -O1 -Xptxas -O1`` here: front end, PTX and SASS are all generated, in seconds
  rather than minutes; NBK_NVCC_FULL_OPT=1 compiles at the real build's -O3.
* csrc/neighbor.cpp (the torch binding) compiles against the installed torch, CPU builds
  included: it uses no c10/cuda header.
* The extension links against the installed torch and imports; every launcher of
  nbkernels/backends/cuda.py traces on fake CUDA tensors (schemas, fake implementations,
  glue). Nothing runs on a GPU here: tests/cuda does that, through bench/gpu_check.sh.
* Without the extension: ``is_available`` is False, backend="cuda" raises
  BackendUnavailableError saying how to build it, and setup.py skips the extension.

Skipped only where nvcc (or g++, or libcudart_static) is absent.
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import nbkernels
from nbkernels._validation import BackendUnavailableError
from nbkernels.backends import cuda as cuda_backend

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.rglob("*.cu"))
ARCHS = ("80", "90")
# torch's cpp_extension nvcc flags, so that the kernels compile here as in the real build
NVCC_FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-D__CUDA_NO_HALF2_OPERATORS__", f"-I{CSRC}"]
DEVICE_OPT = [] if os.environ.get("NBK_NVCC_FULL_OPT") == "1" else ["-Xcicc", "-O1",
                                                                    "-Xptxas", "-O1"]


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    path = Path(home) / "bin" / "nvcc"
    return str(path) if path.exists() else None


def _cudart_static():
    """libcudart_static.a of some local CUDA toolkit, or None."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in filter(None, homes):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
            lib = Path(home) / sub / "libcudart_static.a"
            if lib.exists():
                return lib
    return None


NVCC = _nvcc()
GXX = shutil.which("g++")
TORCH_INCLUDE = Path(torch.__file__).parent / "include"
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME)")
needs_gxx = pytest.mark.skipif(GXX is None, reason="g++ not found")


def _run(cmd):
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    return res.returncode, res.stdout + res.stderr


def _nvcc_job(src, arch, out):
    return _run([NVCC, "-c", str(src), "-o", str(out), "-Xcompiler", "-fPIC",
                 f"-gencode=arch=compute_{arch},code=sm_{arch}", *NVCC_FLAGS, *DEVICE_OPT])


def _binding_job(out):
    # the flags torch's cpp_extension uses for C++ sources (C++20 since torch 2.10)
    return _run([GXX, "-c", str(CSRC / "neighbor.cpp"), "-o", str(out), "-std=c++20", "-O0",
                 "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
                 f"-I{TORCH_INCLUDE}", f"-I{TORCH_INCLUDE / 'torch' / 'csrc' / 'api' / 'include'}",
                 f"-I{sysconfig.get_paths()['include']}"])


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Objects of every .cu for each arch and of the binding, compiled once, in parallel.

    Returns {key: (object path, returncode, log)}; key is (source, arch) or "binding".
    """
    out = tmp_path_factory.mktemp("nbk_build")
    jobs = {}
    if NVCC:
        for src in CU_FILES:
            for arch in ARCHS:
                jobs[src, arch] = (out / f"{src.stem}_sm{arch}.o", _nvcc_job)
    if GXX:
        jobs["binding"] = (out / "neighbor.o", None)
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        futures = {key: pool.submit(_binding_job, obj) if key == "binding" else
                   pool.submit(fn, key[0], key[1], obj) for key, (obj, fn) in jobs.items()}
        return {key: (jobs[key][0], *fut.result()) for key, fut in futures.items()}


def test_sources_exist_and_kernels_are_torch_free():
    assert CU_FILES, "no csrc/**/*.cu found"
    for path in [*CU_FILES, *CSRC.rglob("*.cuh"), *CSRC.rglob("*.h")]:
        text = path.read_text()
        for banned in ("<torch/", "<ATen/", "<c10/"):
            assert banned not in text, f"{path.relative_to(ROOT)} includes a torch header {banned}"


@needs_nvcc
def test_cu_files_compile_for_sm80_and_sm90(build):
    failures = [f"{key[0].relative_to(ROOT)} sm_{key[1]}:\n{log}"
                for key, (_, rc, log) in build.items() if key != "binding" and rc]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)


@needs_gxx
def test_binding_compiles_against_installed_torch(build):
    _, rc, log = build["binding"]
    assert rc == 0, log[-4000:]


LOAD_CHECK = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
import nbkernels.backends.cuda as cb
assert cb._C is not None, cb._IMPORT_ERROR
for name in ("cuda_lse_fwd", "cuda_class_fwd", "cuda_bwd"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nbkernels::{name}", "CUDA"), name
# the launchers' glue and the fake implementations, traced on fake CUDA tensors
with FakeTensorMode():
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        q, r = torch.empty(9, 5, device="cuda", dtype=dt), torch.empty(7, 5, device="cuda", dtype=dt)
        a = torch.zeros(9, dtype=torch.int64, device="cuda")
        b = torch.zeros(7, dtype=torch.int32, device="cuda")
        t = torch.tensor(0.1, device="cuda")
        la, lp = cb.lse_forward(q, r, a, b, t, metric="sqeuclidean", offset=0)
        y, ly = cb.probs_forward(q, r, b, t, 100, metric="dot", offset=None)
        assert la.shape == lp.shape == ly.shape == (9,) and y.shape == (9, 100), (la.shape, y.shape)
        dq, dr, dt_ = cb.lse_backward(q, r, a, b, t, la, lp, la, None, metric="sqeuclidean",
                                      offset=0, need_q=True, need_r=True, need_t=True)
        assert dq.shape == q.shape and dr.shape == r.shape and dq.dtype == dt and dt_.shape == ()
        dq, dr, dt_ = cb.probs_backward(q, r, b, t, y, ly, y, metric="dot", offset=None,
                                        need_q=False, need_r=True, need_t=True)
        assert dq is None and dr.shape == r.shape and dt_.shape == ()
print("ok")
"""


@needs_nvcc
@needs_gxx
@pytest.mark.skipif(_cudart_static() is None, reason="libcudart_static.a not found")
def test_extension_links_and_registers_on_cpu_torch(build, tmp_path):
    """Link nbkernels._C from the sm_80 objects against the installed torch (CPU builds too),
    import it, and trace every launcher on fake CUDA tensors: schemas, CUDA registrations,
    fake implementations and the torch glue of nbkernels/backends/cuda.py."""
    objs = [build["binding"]] + [build[src, "80"] for src in CU_FILES]
    if any(rc for _, rc, _ in objs):
        pytest.skip("an object failed to compile (reported by the compile tests)")
    pkg = tmp_path / "nbkernels"
    shutil.copytree(ROOT / "nbkernels", pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    lib = pkg / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    torch_lib = TORCH_INCLUDE.parent / "lib"
    rc, log = _run([GXX, "-shared", "-o", str(lib), *(str(o) for o, _, _ in objs),
                    f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch", str(_cudart_static()),
                    "-ldl", "-lrt", "-lpthread"])
    assert rc == 0, log[-4000:]
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    res = subprocess.run([sys.executable, "-c", LOAD_CHECK], check=False, cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-4000:]


@pytest.mark.skipif(cuda_backend._C is not None, reason="the extension is built here")
def test_backend_unavailable_without_extension():
    assert not cuda_backend.is_available("cpu")
    assert not cuda_backend.is_available("cuda")
    x = torch.randn(6, 3)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(BackendUnavailableError, match="FORCE_CUDA"):
        nbkernels.nca_loss(x, y, backend="cuda")
    # called directly, the launchers say how to build the extension
    t = torch.tensor(0.1)
    with pytest.raises(BackendUnavailableError, match="build_ext --inplace"):
        cuda_backend.lse_forward(x, x, y, y, t, metric="dot", offset=0)
    # auto never picks an unbuilt backend
    torch.testing.assert_close(nbkernels.nca_loss(x, y, backend="auto"),
                               nbkernels.nca_loss(x, y, backend="reference"))


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch")
def test_setup_skips_the_extension_on_cpu_torch():
    env = {k: v for k, v in os.environ.items() if k != "FORCE_CUDA"}
    res = subprocess.run([sys.executable, "setup.py", "--name"], check=False, cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "skipping the CUDA extension" in res.stdout
    assert "nbkernels" in res.stdout.splitlines()[-1]
