"""The optional CUDA extension nbkernels._C (csrc/). The package metadata lives in
pyproject.toml; this file only adds the extension, built where a CUDA toolkit and a CUDA
build of torch are present, or when FORCE_CUDA=1 is set. Without it the package works and
backend="cuda" is unavailable.

    FORCE_CUDA=1 pip install --no-build-isolation -e .     # needs torch at build time
    TORCH_CUDA_ARCH_LIST="9.0" python setup.py build_ext --inplace   # one arch, quicker

TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" (A100, H100/H200). MAX_JOBS caps the parallel
ninja jobs.
"""
import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _skip(reason):
    print(f"nbkernels: skipping the CUDA extension ({reason}); backend='cuda' will be "
          "unavailable. Set FORCE_CUDA=1 to build it anyway.")
    return [], {}


def cuda_extension():
    """``(ext_modules, cmdclass)`` for nbkernels._C, or empty ones when it cannot be built."""
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:  # e.g. an isolated build environment without torch
        return _skip(f"torch is not importable at build time: {e}")
    if not force:
        if torch.version.cuda is None:
            return _skip(f"torch {torch.__version__} is a CPU-only build")
        if CUDA_HOME is None:
            return _skip("no CUDA toolkit found (set CUDA_HOME)")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    print("nbkernels: building the CUDA extension for TORCH_CUDA_ARCH_LIST="
          f"{os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources = ["csrc/neighbor.cpp"] + sorted(
        os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
    ext = CUDAExtension(
        name="nbkernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
