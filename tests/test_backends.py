"""Every fused backend against the reference: every output and every gradient
(queries, references, temperature), over metrics, shapes, exclusions and dtypes."""
import pytest
import torch

import nbkernels
from helpers import TOLERANCES, assert_match, make_batch, run

METRICS = ["sqeuclidean", "cosine", "dot"]
BACKENDS = ["torch"]

# (N, M, D, classes): N=1, N=2, odd D, M != N, one class, all distinct labels
SHAPES = [(1, 1, 3, 2), (2, 2, 5, 2), (13, 13, 19, 3), (23, 17, 7, 4), (11, 11, 6, 1),
          (9, 9, 4, 1000), (37, 29, 33, 5)]


def _nca_self(x, t, *, backend, y, metric, reduction="none"):
    return nbkernels.nca_loss(x, y, temperature=t, metric=metric, reduction=reduction,
                              backend=backend)


def _nca_cross(x, r, t, *, backend, y, ry, metric, reduction="none"):
    return nbkernels.nca_loss(x, y, ref_embeddings=r, ref_labels=ry, temperature=t,
                              metric=metric, reduction=reduction, backend=backend)


def _knn(x, r, t, *, backend, ry, c, metric, exclude_self=False):
    return nbkernels.soft_knn_predict(x, r, ry, c, temperature=t, metric=metric,
                                      exclude_self=exclude_self, backend=backend)


def _case(fn, tensors, backend, dtype, atol, rtol, **kw):
    want = run(lambda *a, backend: fn(*a, backend=backend, **kw),
               [t.double() for t in tensors], "reference")
    got = run(lambda *a, backend: fn(*a, backend=backend, **kw),
              [t.to(dtype) for t in tensors], backend)
    assert got[0].dtype == dtype and all(g.dtype == t.dtype for g, t in
                                         zip(got[1:], [t.to(dtype) for t in tensors]))
    assert_match(got, want, atol, rtol, what=f"{fn.__name__} {kw.get('metric')}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", SHAPES)
def test_nca_self_matches_reference(small_blocks, backend, metric, shape):
    n, _, d, c = shape
    x, y = make_batch(n, d, c, seed=n)
    t = torch.tensor(0.7, dtype=torch.float64)
    _case(_nca_self, [x, t], backend, torch.float64, 1e-10, 1e-9, y=y, metric=metric)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", SHAPES)
def test_nca_cross_and_knn_match_reference(small_blocks, backend, metric, shape):
    n, m, d, c = shape
    x, y = make_batch(n, d, c, seed=n)
    r, ry = make_batch(m, d, c, seed=m + 100)
    t = torch.tensor(0.4, dtype=torch.float64)
    _case(_nca_cross, [x, r, t], backend, torch.float64, 1e-10, 1e-9, y=y, ry=ry, metric=metric)
    _case(_knn, [x, r, t], backend, torch.float64, 1e-10, 1e-9, ry=ry, c=c, metric=metric)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_knn_exclude_self_matches_reference(small_blocks, backend, metric):
    x, y = make_batch(19, 11, 4, seed=3)
    t = torch.tensor(0.3, dtype=torch.float64)
    _case(_knn, [x, x.clone(), t], backend, torch.float64, 1e-10, 1e-9, ry=y, c=4, metric=metric,
          exclude_self=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("metric", METRICS)
def test_dtypes(small_blocks, backend, dtype, atol, rtol, metric):
    x, y = make_batch(21, 9, 3, seed=5, scale=0.5)
    r, ry = make_batch(17, 9, 3, seed=6, scale=0.5)
    t = torch.tensor(0.5, dtype=torch.float64)
    _case(_nca_self, [x, t], backend, dtype, atol, rtol, y=y, metric=metric)
    _case(_nca_cross, [x, r, t], backend, dtype, atol, rtol, y=y, ry=ry, metric=metric)
    _case(_knn, [x, r, t], backend, dtype, atol, rtol, ry=ry, c=3, metric=metric)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [-3, 0, 2, 40])
def test_lse_function_with_offset(small_blocks, backend, offset):
    """The autograd Function directly, with the global-index exclusion i + offset."""
    from nbkernels.autograd import NeighborLSE
    from nbkernels.backends import reference
    x, y = make_batch(12, 5, 3, seed=8)
    r, ry = make_batch(15, 5, 3, seed=9)
    t = torch.tensor(0.6, dtype=torch.float64)

    def fused(x, r, t, backend):
        a, p = NeighborLSE.apply(x, r, y, ry, t, "sqeuclidean", offset, backend)
        return torch.stack([a, torch.where(torch.isinf(p), torch.zeros_like(p), p)])

    def ref(x, r, t, backend):
        a, p = reference.neighbor_lse(x, r, y, ry, t, offset=offset)
        return torch.stack([a, torch.where(torch.isinf(p), torch.zeros_like(p), p)])

    want = run(ref, [x, r, t], None)
    got = run(fused, [x, r, t], backend)
    assert_match(got, want, 1e-10, 1e-9)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_lse_function_values_on_each_launcher(backend):
    """NeighborLSE returns whole log-sum-exps whatever the launcher: the fused ones leave
    out the row constant ||q||^2 / T under "sqeuclidean", the reference does not (its
    values were shifted by ||q - centre||^2 / T once too often). Against the dense fp64
    formula, batch with the self pair excluded."""
    from nbkernels.autograd import NeighborLSE
    x, y = make_batch(9, 4, 3, seed=3)
    t = torch.tensor(0.5, dtype=torch.float64)
    s = -torch.cdist(x, x).pow(2) / t
    s.fill_diagonal_(float("-inf"))
    pos = (y[:, None] == y[None, :]) & ~torch.eye(9, dtype=torch.bool)
    want_all = torch.logsumexp(s, 1)
    want_pos = torch.logsumexp(s.masked_fill(~pos, float("-inf")), 1)
    got_all, got_pos = NeighborLSE.apply(x, None, y, None, t, "sqeuclidean", 0, backend)
    torch.testing.assert_close(got_all, want_all, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_pos, want_pos, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_blocks_match_reference(backend):
    """Inputs larger than one default tile, with the default tile sizes."""
    x, y = make_batch(300, 16, 7, seed=11)
    r, ry = make_batch(1100, 16, 7, seed=12)
    t = torch.tensor(0.5, dtype=torch.float64)
    _case(_nca_cross, [x, r, t], backend, torch.float64, 1e-10, 1e-9, y=y, ry=ry,
          metric="sqeuclidean")
    _case(_knn, [x, r, t], backend, torch.float64, 1e-10, 1e-9, ry=ry, c=7, metric="dot")
