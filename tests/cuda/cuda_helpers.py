"""Helpers of tests/cuda: how the cuda backend is readied, on a GPU or emulated.

On a GPU, after building the extension (bench/gpu_check.sh does both)::

    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace
    NBK_TEST_DEVICE=cuda python -m pytest tests/cuda

or on a CPU, slowly, with the kernels' source emulated (emulation.py; no GPU, no nvcc)::

    NBK_CUDA_EMULATE=1 python -m pytest tests/cuda

Otherwise the modules skip (the CPU suite checks the build in tests/test_cuda_build.py);
with NBK_TEST_DEVICE=cuda a missing extension fails every test with the build
instructions. The cases are shared with tests/triton (tests/launcher_cases.py). Not a
conftest.py: a second ``conftest`` module would replace tests/conftest.py in
``sys.modules`` and break its ``from conftest import ...`` users.
"""
import functools
import os
import types

import pytest
import torch

import launcher_cases as cases

# NBK_CUDA_EMULATE=1: the ops run emulated on CPU tensors (see emulation.py)
EMULATED = os.environ.get("NBK_CUDA_EMULATE") == "1"
DEVICE = "cpu" if EMULATED else "cuda"
RUNNABLE = EMULATED or (os.environ.get("NBK_TEST_DEVICE", "cpu") == "cuda"
                        and torch.cuda.is_available())
SKIP_REASON = ("GPU only: NBK_TEST_DEVICE=cuda with a CUDA device (bench/gpu_check.sh), or "
               "NBK_CUDA_EMULATE=1")

gpu_only = pytest.mark.skipif(EMULATED, reason="needs a GPU (or too slow emulated)")


@pytest.fixture(scope="module")
def cb():
    """The cuda backend module; fails (not skips) when the extension is not built."""
    from nbkernels.backends import cuda as cuda_backend
    if not EMULATED:
        assert cuda_backend.is_available("cuda"), cuda_backend.BUILD_HINT
        yield cuda_backend
        return
    import emulation
    with pytest.MonkeyPatch.context() as mp:
        emulation.install(mp, cuda_backend)
        yield cuda_backend


HELPERS = types.SimpleNamespace(make_case=functools.partial(cases.make_case, DEVICE),
                                close=cases.close, device=DEVICE, emulated=EMULATED)
