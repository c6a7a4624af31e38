"""The conformance suite (tests/conformance/) on backend "cuda": the kernels' source emulated
on the CPU (``NBK_CUDA_EMULATE=1``), or a real GPU (``NBK_TEST_DEVICE=cuda``); see
cuda_helpers.py. fp64 inputs fall back to backend "torch" with a warning, so the launcher
tests run fp32 / fp16 / bf16, and fp64 only through the public API. Odd shapes cross the
kernels' tiles: query blocks and reference tiles of 64, feature chunks and dx slices of
128 (fp16 / bf16) or 64 (fp32) features, class tiles of 32.
"""
import pytest
import torch

from cuda_helpers import DEVICE, EMULATED, RUNNABLE, SKIP_REASON, cb  # noqa: F401 (fixture)

if not RUNNABLE:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from conformance import *  # noqa: E402,F401,F403 (the tests, their fixtures and parametrization)
from conformance import Capabilities  # noqa: E402

CAPS = Capabilities(
    name="cuda", device=DEVICE, fp64="fallback", emulated=EMULATED, fp32_dot_inf_is_nan=True,
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    shape_dtypes=(torch.float32, torch.float16),
    tile_shapes=((64, 64, 16, 0), (65, 130, 33, 0), (130, 70, 64, 0), (70, 130, 65, 0),
                 (100, 90, 130, 0), (45, 67, 259, 0)),
    large=(140, 200, 128) if EMULATED else (777, 1029, 128))


@pytest.fixture(scope="module")
def backend(cb):  # noqa: F811
    return cb
