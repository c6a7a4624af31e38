"""Semantics of the public functions: reductions, invalid rows, NaN, extreme
temperatures, prototypes, backend selection."""
import math

import pytest
import torch

import nbkernels
from nbkernels import BackendUnavailableError
from helpers import make_batch

BACKENDS = ["reference", "torch"]


def _brute_force(x, y, t):
    """The loss of the background notes, written as a loop over queries."""
    losses = []
    for i in range(x.shape[0]):
        others = [j for j in range(x.shape[0]) if j != i]
        d = ((x[i] - x[others]) ** 2).sum(1)
        p = torch.softmax(-d / t, 0)
        yhat = p[y[others] == y[i]].sum()
        losses.append(-torch.log(yhat) if (y[others] == y[i]).any() else torch.tensor(0.0).double())
    return torch.stack(losses)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_loop_formula(backend):
    x, y = make_batch(15, 4, 3, seed=2)
    y[0] = 7  # a query with no positive: loss 0, not counted by "mean"
    want = _brute_force(x, y, 0.5)
    got = nbkernels.nca_loss(x, y, temperature=0.5, reduction="none", backend=backend)
    torch.testing.assert_close(got, want)
    assert got[0] == 0
    n_valid = sum(int((y == y[i]).sum()) > 1 for i in range(15))
    assert n_valid < 15
    torch.testing.assert_close(nbkernels.nca_loss(x, y, temperature=0.5, backend=backend),
                               want.sum() / n_valid)
    torch.testing.assert_close(
        nbkernels.nca_loss(x, y, temperature=0.5, reduction="sum", backend=backend), want.sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_valid_query_gives_differentiable_zero(backend):
    x, _ = make_batch(6, 3, 2)
    x.requires_grad_()
    y = torch.arange(6)  # all distinct: nobody has a positive
    loss = nbkernels.nca_loss(x, y, backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_row_batch(backend):
    x = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    loss = nbkernels.nca_loss(x, torch.tensor([0]), backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["query", "reference", "temperature"])
def test_nan_in_gives_nan_out(backend, where):
    x, y = make_batch(8, 3, 2)
    r, ry = make_batch(5, 3, 2, seed=1)
    t = torch.tensor(0.1, dtype=torch.float64)
    if where == "query":
        x[3, 1] = float("nan")
    elif where == "reference":
        r[2, 0] = float("nan")
    x.requires_grad_()
    kw = dict(ref_embeddings=r, ref_labels=ry, backend=backend)
    if where == "temperature":
        # a NaN temperature is rejected up front
        with pytest.raises(ValueError, match="temperature"):
            nbkernels.nca_loss(x, y, temperature=float("nan"), **kw)
        return
    loss = nbkernels.nca_loss(x, y, temperature=t, **kw)
    assert torch.isnan(loss)
    assert torch.isnan(nbkernels.soft_knn_predict(x, r, ry, 2, backend=backend)).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_query_without_positive_is_not_hidden(backend):
    x, y = make_batch(6, 3, 2)
    y[0] = 5  # no positive
    x[0, 0] = float("nan")
    assert torch.isnan(nbkernels.nca_loss(x, y, reduction="none", backend=backend)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_temperature_stays_finite(backend, dtype):
    # squared distances in the thousands at T = 1e-4: logits around -1e7
    x, y = make_batch(24, 8, 3, dtype=dtype, seed=4, scale=15.0)
    x.requires_grad_()
    loss = nbkernels.nca_loss(x, y, temperature=1e-4, backend=backend)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert torch.isfinite(x.grad).all()
    probs = nbkernels.soft_knn_predict(x, x, y, 3, temperature=1e-4, exclude_self=True,
                                       backend=backend)
    torch.testing.assert_close(probs.sum(1), torch.ones(24, dtype=dtype))


def test_extreme_temperature_backends_agree():
    x, y = make_batch(30, 6, 3, seed=7, scale=10.0)
    a = nbkernels.nca_loss(x, y, temperature=1e-4, reduction="none", backend="reference")
    b = nbkernels.nca_loss(x, y, temperature=1e-4, reduction="none", backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_knn_rows_sum_to_one(backend):
    x, _ = make_batch(11, 4, 3)
    r, ry = make_batch(13, 4, 5, seed=3)
    p = nbkernels.soft_knn_predict(x, r, ry, 6, backend=backend)
    assert p.shape == (11, 6)
    torch.testing.assert_close(p.sum(1), torch.ones(11, dtype=torch.float64))
    assert (p[:, 5] == 0).all() or (ry == 5).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_prototype_loss_uses_class_means(backend, metric):
    x, _ = make_batch(12, 5, 3, seed=9)
    y = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 2, 0, 2, 2])
    x.requires_grad_()
    loss = nbkernels.prototype_loss(x, y, metric=metric, temperature=0.3, backend=backend)
    means = torch.stack([x[y == c].mean(0) for c in range(3)])
    want = nbkernels.nca_loss(x, y, ref_embeddings=means, ref_labels=torch.arange(3),
                              metric=metric, temperature=0.3, backend="reference")
    torch.testing.assert_close(loss, want)
    g1, = torch.autograd.grad(loss, x)
    g2, = torch.autograd.grad(want, x)
    torch.testing.assert_close(g1, g2)  # the means are differentiable


@pytest.mark.parametrize("backend", BACKENDS)
def test_prototype_loss_with_learned_prototypes(backend):
    x, y = make_batch(10, 4, 5, seed=1)
    protos = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    loss = nbkernels.prototype_loss(x, y, prototypes=protos, backend=backend)
    want = nbkernels.nca_loss(x, y, ref_embeddings=protos, ref_labels=torch.arange(5),
                              backend="reference")
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert protos.grad.abs().sum() > 0


def test_temperature_tensor_receives_gradient():
    x, y = make_batch(10, 4, 2)
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    nbkernels.nca_loss(x, y, temperature=t, backend="torch").backward()
    t2 = t.detach().clone().requires_grad_()
    nbkernels.nca_loss(x, y, temperature=t2, backend="reference").backward()
    torch.testing.assert_close(t.grad, t2.grad)


def test_mixed_dtypes_are_promoted():
    x, y = make_batch(6, 3, 2, dtype=torch.float32)
    r, ry = make_batch(5, 3, 2, seed=2)
    loss = nbkernels.nca_loss(x, y, ref_embeddings=r, ref_labels=ry, backend="torch")
    assert loss.dtype == torch.float64


def test_backend_from_environment(monkeypatch):
    x, y = make_batch(6, 3, 2)
    monkeypatch.setenv("NBKERNELS_BACKEND", "reference")
    a = nbkernels.nca_loss(x, y)
    monkeypatch.setenv("NBKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="NBKERNELS_BACKEND"):
        nbkernels.nca_loss(x, y)
    monkeypatch.delenv("NBKERNELS_BACKEND")
    torch.testing.assert_close(a, nbkernels.nca_loss(x, y))
    # set but empty (export NBKERNELS_BACKEND=) is unset: "auto" picks as without it
    monkeypatch.setenv("NBKERNELS_BACKEND", "")
    assert nbkernels.backends.resolve("auto", x.device) == "torch"
    torch.testing.assert_close(a, nbkernels.nca_loss(x, y))
    # an explicit backend= wins over the environment
    monkeypatch.setenv("NBKERNELS_BACKEND", "bogus")
    torch.testing.assert_close(a, nbkernels.nca_loss(x, y, backend="torch"))


def test_unavailable_backends_raise_clearly(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, y = make_batch(6, 3, 2)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        nbkernels.nca_loss(x, y, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        nbkernels.nca_loss(x, y, backend="triton")


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.4.0", True), ("3.6.0", "2.3.5", False), ("3.7.1", "2.4.6", False),
    ("3.9.0", "2.4.6", False)])
def test_triton_interpreter_numpy_mismatch_is_named(monkeypatch, triton_version,
                                                    numpy_version, broken):
    pytest.importorskip("triton")
    import numpy

    from nbkernels.backends import triton as triton_backend
    monkeypatch.setattr(triton_backend.triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    problem = triton_backend.interpreter_problem()
    if not broken:
        assert problem is None
        return
    assert f"triton {triton_version}" in problem and "numpy<2.4" in problem
    # under the interpreter, backend="triton" on CPU says why it cannot run
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, y = make_batch(6, 3, 2)
    with pytest.raises(BackendUnavailableError, match=r"NumPy 2\.4.*numpy<2\.4"):
        nbkernels.nca_loss(x, y, backend="triton")


def test_class_tile_is_narrow_only_where_references_fill_it():
    pytest.importorskip("triton")
    from nbkernels.backends.triton import kernels as tk
    wide, narrow, narrowest = tk.MAX_BLOCK_C, tk.NARROW_BLOCK_C, tk.NARROWEST_BLOCK_C
    assert narrowest <= narrow < wide
    # a bank of many references per class: the narrowest tile from 20 per class on
    assert tk.class_block_cap(100, 65536) == tk.class_block_cap(100, 2000) == narrowest
    assert tk.class_block_cap(100, 1999) == tk.class_block_cap(100, 1000) == narrow
    # prototypes or proxies (a few references per class): the wide one
    assert tk.class_block_cap(100, 100) == tk.class_block_cap(100, 999) == wide


def test_half_precision_loss_keeps_precision():
    x, y = make_batch(40, 16, 4, seed=3, scale=0.3)
    want = nbkernels.nca_loss(x, y, temperature=0.05, backend="reference")
    got = nbkernels.nca_loss(x.half(), y, temperature=0.05, backend="torch")
    assert got.dtype == torch.float16
    assert math.isclose(got.item(), want.item(), rel_tol=5e-3)


@pytest.mark.parametrize("dtype,n,centre", [(torch.float16, 4000, 20.0),
                                            (torch.bfloat16, 3000, 25.0)])
def test_class_means_sum_in_the_accumulation_dtype(dtype, n, centre):
    """In-batch class means: 4000 fp16 rows near 20 sum past fp16's 65504 (the loss was inf),
    3000 bf16 rows near 25 rounded the sum (0.75 where 0.695 is right), and fp16 counts
    above 2048 were rounded. Sums and counts are fp32, the means cast once."""
    from nbkernels.functional import class_means
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g) * 0.5 + centre
    y = torch.zeros(n, dtype=torch.long)
    y[:100] = 1
    xl = x.to(dtype)
    means, classes = class_means(xl, y)
    want = torch.stack([xl[y == c].double().mean(0) for c in (0, 1)])
    assert means.dtype == dtype and torch.isfinite(means).all()
    torch.testing.assert_close(means.double(), want, rtol=0, atol=float(torch.finfo(dtype).eps) * centre)
    loss = nbkernels.prototype_loss(xl, y, temperature=1.0)
    ref = nbkernels.prototype_loss(xl.double(), y, temperature=1.0)
    assert torch.isfinite(loss) and abs(float(loss) - float(ref)) < 0.02
