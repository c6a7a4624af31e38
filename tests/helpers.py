"""Shared test helpers (fixtures live in conftest.py)."""
import torch

# (dtype, atol, rtol) against the reference run in fp64 on the same (rounded) inputs:
# the tolerance covers fp32 accumulation and the rounding of outputs and gradients
# to the input dtype.
TOLERANCES = [
    (torch.float64, 1e-10, 1e-9),
    (torch.float32, 2e-4, 2e-4),
    (torch.float16, 2e-2, 2e-2),
    (torch.bfloat16, 1e-1, 5e-2),
]


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
