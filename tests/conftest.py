"""Shared fixtures. The Triton interpreter tests live in tests/triton and run in their
own process (see README): they need TRITON_INTERPRET=1 before triton is imported."""
import os

import pytest

import nbkernels.backends.torch_blocked as blocked

collect_ignore = []
if os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("NBK_TEST_DEVICE", "cpu") == "cpu":
    # run separately: TRITON_INTERPRET=1 python -m pytest tests/triton
    collect_ignore.append("triton")
if os.environ.get("NBK_TEST_DEVICE", "cpu") != "cuda" and os.environ.get("NBK_CUDA_EMULATE") != "1":
    # run separately: NBK_CUDA_EMULATE=1 python -m pytest tests/cuda (kernels emulated on CPU)
    collect_ignore.append("cuda")


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny odd tile sizes so that every tiling edge case shows up on small inputs."""
    monkeypatch.setattr(blocked, "BLOCK_M", 5)
    monkeypatch.setattr(blocked, "BLOCK_N", 7)
    monkeypatch.setattr(blocked, "BLOCK_SYM", 6)
