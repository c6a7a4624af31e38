"""Shared fixtures. The Triton interpreter tests live in tests/triton and run in their
own process (see README): they need TRITON_INTERPRET=1 before triton is imported."""
import os

import pytest
import torch

import nbkernels.backends.torch as torch_backend

collect_ignore = []
if os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("NBK_TEST_DEVICE", "cpu") == "cpu":
    # run separately: TRITON_INTERPRET=1 python -m pytest tests/triton
    collect_ignore.append("triton")

# (dtype, atol, rtol) against the reference run in fp64 on the same (rounded) inputs:
# the tolerance covers fp32 accumulation and the rounding of outputs and gradients
# to the input dtype.
TOLERANCES = [
    (torch.float64, 1e-10, 1e-9),
    (torch.float32, 2e-4, 2e-4),
    (torch.float16, 2e-2, 2e-2),
    (torch.bfloat16, 1e-1, 5e-2),
]


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny odd tile sizes so that every tiling edge case shows up on small inputs."""
    monkeypatch.setattr(torch_backend, "BLOCK_M", 5)
    monkeypatch.setattr(torch_backend, "BLOCK_N", 7)
    monkeypatch.setattr(torch_backend, "BLOCK_SYM", 6)


def make_batch(n, d, classes, *, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def run(fn, tensors, backend):
    """Evaluate ``fn(*leaves, backend=...)`` and the gradients of a random projection of
    its output w.r.t. every floating leaf. Returns [output, grad, grad, ...]."""
    leaves = [t.detach().clone().requires_grad_(t.dtype.is_floating_point) for t in tensors]
    out = fn(*leaves, backend=backend)
    g = torch.Generator().manual_seed(123)
    weight = torch.rand(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    floats = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad((out * weight).sum(), floats, allow_unused=True)
    grads = [torch.zeros_like(f) if gr is None else gr for f, gr in zip(floats, grads)]
    return [out.detach()] + [gr.detach() for gr in grads]


def assert_match(got, want, atol, rtol, what=""):
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, equal_nan=True,
                                   msg=lambda m: f"{what} output #{k}: {m}")
