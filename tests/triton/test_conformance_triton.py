"""The conformance suite (tests/conformance/) on backend "triton": on the CPU through Triton's
interpreter (``TRITON_INTERPRET=1``; no bf16 there), or on a GPU with
``NBK_TEST_DEVICE=cuda`` (bf16 included). Launchers run with ``precision="ieee"``; the
tf32 paths are in test_triton_specific.py."""
import os

import pytest
import torch

from conformance import *  # noqa: F401,F403 (the tests, their fixtures and parametrization)
from conformance import Capabilities
from nbkernels.backends.triton import kernels as tk

DEVICE = os.environ.get("NBK_TEST_DEVICE", "cpu")
CAPS = Capabilities(
    # with the GPU's sizes, D > MAX_RESIDENT_D (256) for the forward's D-chunked path
    tile_shapes=() if tk.SMALL else ((23, 19, 300, 0),),
    name="triton", device=DEVICE, precision=True, emulated=DEVICE == "cpu",
    dtypes=(torch.float64, torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE == "cuda"
                                                            else ()),
    large=(40, 50, 33) if DEVICE == "cpu" else (777, 1029, 128))


@pytest.fixture
def backend(tb):
    return tb
