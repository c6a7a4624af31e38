"""Embeddings far from the origin: squared distances must not lose precision.

Every backend expands ||q - r||^2 = ||q||^2 - 2 q.r + ||r||^2, which cancels
catastrophically when the rows share a large mean (ReLU features, unnormalized
backbones). The rows are centred on the queries' mean first (``nbkernels.kernel_inputs``;
the reference backend does the same), so the loss and its gradients match a formula built
from the differences q - r themselves, in fp64, on the same rounded inputs, at offsets from
1e1 to 1e4 and in every dtype.
"""
import pytest
import torch

import nbkernels

# (dtype, rtol): relative to the largest loss row / gradient entry of the case
TOLERANCES = [(torch.float64, 1e-10), (torch.float32, 2e-4), (torch.float16, 2e-2),
              (torch.bfloat16, 6e-2)]
BACKENDS = ["reference", "torch"]


def direct_fp64(x, y, temperature, r=None, b=None):
    """Loss rows and gradients from -||q - r||^2 / T taken from the differences, in fp64."""
    q = x.detach().double().requires_grad_()
    batch = r is None
    rr = q if batch else r.detach().double().requires_grad_()
    b = y if batch else b
    s = -(q[:, None, :] - rr[None, :, :]).square().sum(-1) / temperature
    if batch:
        s = s.masked_fill(torch.eye(q.shape[0], dtype=torch.bool), float("-inf"))
    pos = y[:, None] == b[None, :]
    if batch:
        pos &= ~torch.eye(q.shape[0], dtype=torch.bool)
    valid = pos.any(1)
    lse_pos = torch.logsumexp(s.masked_fill(~pos, float("-inf")), 1)
    loss = torch.where(valid, torch.logsumexp(s, 1) - torch.where(valid, lse_pos, 0.0), 0.0)
    grads = torch.autograd.grad(loss.sum(), (q,) if batch else (q, rr))
    return loss.detach(), grads


def _close(got, want, rtol, what):
    err = float((got.double() - want).abs().max())
    scale = float(want.abs().max().clamp_min(1.0))
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:.0e} x {scale:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,rtol", TOLERANCES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("offset", [1e1, 1e2, 1e3, 1e4])
@pytest.mark.parametrize("form", ["batch", "cross"])
def test_far_from_the_origin(backend, dtype, rtol, offset, form):
    g = torch.Generator().manual_seed(1)
    x = (offset + 0.1 * torch.randn(64, 16, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, 4, (64,), generator=g)
    kw, refs = {}, None
    if form == "cross":
        r = (offset + 0.1 * torch.randn(50, 16, generator=g, dtype=torch.float64)).to(dtype)
        b = torch.randint(0, 4, (50,), generator=g)
        refs = (r, b)
    temperature = 0.01 if dtype in (torch.float64, torch.float32) else 0.1
    want_loss, want_grads = direct_fp64(x, y, temperature, *(refs or ()))
    leaves = [x.clone().requires_grad_()]
    if refs is not None:
        leaves.append(refs[0].clone().requires_grad_())
        kw = dict(ref_embeddings=leaves[1], ref_labels=refs[1])
    loss = nbkernels.nca_loss(leaves[0], y, temperature=temperature, reduction="none",
                              backend=backend, **kw)
    grads = torch.autograd.grad(loss.sum(), leaves)
    _close(loss, want_loss, rtol, "loss rows")
    for name, got, want in zip(("d/dq", "d/dr"), grads, want_grads):
        _close(got, want, rtol, name)


def test_fp32_example_of_the_report():
    """50 + 0.1 randn(64, 16), T = 0.01: fp32 gave 5.191 where fp64 gives 5.217."""
    g = torch.Generator().manual_seed(0)
    x = 50 + 0.1 * torch.randn(64, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (64,), generator=g)
    want = nbkernels.nca_loss(x, y, temperature=0.01, reduction="none")
    got = nbkernels.nca_loss(x.float(), y, temperature=0.01, reduction="none")
    direct, _ = direct_fp64(x.float(), y, 0.01)
    assert float((got.double() - direct).abs().max()) < 1e-3
    assert float((want - direct).abs().max()) < 1e-3  # fp64: the fp32 rounding of x only
