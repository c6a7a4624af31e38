"""torch.autograd.gradcheck in fp64 through every backend's backward."""
import pytest
import torch
from torch.autograd import gradcheck

import nbkernels
from nbkernels.autograd import ClassProbs, NeighborLSE
from helpers import make_batch

BACKENDS = ["reference", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine", "dot"])
def test_gradcheck_nca(small_blocks, backend, metric):
    x, y = make_batch(9, 4, 3, seed=1)
    r, ry = make_batch(8, 4, 3, seed=2)
    t = torch.tensor(0.8, dtype=torch.float64)
    args = [a.requires_grad_() for a in (x, r, t)]

    def f_self(x, t):
        return nbkernels.nca_loss(x, y, temperature=t, metric=metric, reduction="none",
                                  backend=backend)

    def f_cross(x, r, t):
        return nbkernels.nca_loss(x, y, ref_embeddings=r, ref_labels=ry, temperature=t,
                                  metric=metric, reduction="none", backend=backend)

    assert gradcheck(f_self, (args[0], args[2]))
    assert gradcheck(f_cross, tuple(args))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine", "dot"])
def test_gradcheck_soft_knn(small_blocks, backend, metric):
    x, _ = make_batch(7, 5, 3, seed=3)
    r, ry = make_batch(10, 5, 4, seed=4)
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    x.requires_grad_()
    r.requires_grad_()

    def f(x, r, t):
        return nbkernels.soft_knn_predict(x, r, ry, 4, temperature=t, metric=metric,
                                          backend=backend)

    assert gradcheck(f, (x, r, t))


@pytest.mark.parametrize("offset", [None, 0, 3, -2])
def test_gradcheck_functions_directly(small_blocks, offset):
    """The autograd Functions, both outputs, including rows without positives."""
    x, y = make_batch(8, 3, 4, seed=5)
    r, ry = make_batch(9, 3, 4, seed=6)
    t = torch.tensor(0.9, dtype=torch.float64)
    args = tuple(a.requires_grad_() for a in (x, r, t))

    def lse(x, r, t):
        a, p = NeighborLSE.apply(x, r, y, ry, t, "sqeuclidean", offset, "torch")
        return a, torch.where(torch.isinf(p), torch.zeros_like(p), p)

    def probs(x, r, t):
        return ClassProbs.apply(x, r, ry, t, 4, "dot", offset, "torch")

    assert gradcheck(lse, args)
    assert gradcheck(probs, args)
