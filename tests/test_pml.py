"""An outside oracle: pytorch-metric-learning's NCALoss."""
import pytest
import torch

import nbkernels

from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.distances import LpDistance


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("temperature", [0.05, 0.5, 2.0])
def test_agrees_with_pytorch_metric_learning(backend, temperature):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64) * 0.5
    y = torch.arange(64) % 8  # every query has positives, so both means agree
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    pml = pml_losses.NCALoss(softmax_scale=1.0 / temperature,
                             distance=LpDistance(normalize_embeddings=False, p=2, power=2))
    want = pml(x1, y)
    got = nbkernels.nca_loss(x2, y, temperature=temperature, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    want.backward()
    got.backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("softmax_scale", [1.0, 4.0, 20.0])
def test_pml_default_normalized_is_cosine_at_half_inverse_scale(softmax_scale):
    """PML's NCALoss normalises by default: exp(-s ||u_i - u_j||^2) with ||u - v||^2 = 2 - 2 cos,
    which is nbkernels' metric="cosine" at temperature 1 / (2 s); T = 0.5 for PML's s = 1."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 12, generator=g, dtype=torch.float64) * 3.0
    y = torch.arange(48) % 6
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    want = pml_losses.NCALoss(softmax_scale=softmax_scale)(x1, y)  # default LpDistance: normalised
    got = nbkernels.nca_loss(x2, y, metric="cosine", temperature=1.0 / (2.0 * softmax_scale))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    want.backward()
    got.backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-8)
