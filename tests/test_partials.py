"""The low-level partials API: chunk states merge exactly, finish into the loss and yhat,
and the per-chunk backward with the final normalizers gives the single-shot gradients."""
import pytest
import torch

import nbkernels
from nbkernels import partials as P
from helpers import assert_match, make_batch

BACKENDS = ["torch", "reference"]
METRICS = ["sqeuclidean", "cosine", "dot"]
# (dtype, atol, rtol) against the reference run in fp64 on the same rounded inputs
TOLERANCES = [(torch.float64, 1e-10, 1e-9), (torch.float32, 2e-4, 2e-4)]
CHUNK = 4  # does not divide N = 15


def _chunks(n, c=CHUNK):
    return [(j, min(j + c, n)) for j in range(0, n, c)]


def _inputs(dtype, seed=0):
    x, y = make_batch(15, 5, 3, dtype=dtype, seed=seed)
    y[0] = 9  # no positive anywhere
    return x, y, torch.tensor(0.6, dtype=torch.float64).to(dtype)


def _reference_loss(x, y, t, metric):
    leaves = [a.detach().double().requires_grad_() for a in (x, t)]
    loss = nbkernels.nca_loss(leaves[0], y, temperature=leaves[1], metric=metric,
                              reduction="none", backend="reference")
    return loss, leaves


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_loss_from_chunks_with_global_offset(backend, metric, dtype, atol, rtol):
    x, y, t = _inputs(dtype)
    parts = [P.chunk_partials(x, x[a:b], y, y[a:b], t, metric=metric, offset=0, start=a,
                              backend=backend) for a, b in _chunks(15)]
    final = P.merge(*parts[::-1])  # any order
    rows, valid = P.finish_loss(final)
    want, (xr, tr) = _reference_loss(x, y, t, metric)
    assert_match([rows], [want.detach()], atol, rtol, "loss rows")
    assert not valid[0] and valid[1:].any()
    assert torch.equal(final.positives, P.positive_counts(y, y, 0))

    g = torch.rand(15, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dx = torch.zeros(15, 5, dtype=torch.float64)
    dt = 0.0
    for a, b in _chunks(15):
        dq, dr, dtc = P.chunk_backward(x, x[a:b], y, y[a:b], t, final, g_loss=g.to(rows.dtype),
                                       metric=metric, offset=0, start=a, backend=backend,
                                       need_t=True)
        dx += dq.double()
        dx[a:b] += dr.double()  # x is both the queries and the references
        dt = dt + dtc.double()
    want_dx, want_dt = torch.autograd.grad((want * g).sum(), [xr, tr])
    assert_match([dx, dt], [want_dx, want_dt], atol, rtol, "gradients")


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_class_mass_from_chunks(backend, metric, dtype, atol, rtol):
    q, _ = make_batch(7, 5, 3, dtype=dtype, seed=3)
    r, ry = make_batch(18, 5, 4, dtype=dtype, seed=4)
    t = torch.tensor(0.5, dtype=dtype)
    c = 5
    parts = [P.chunk_partials(q, r[a:b], None, ry[a:b], t, num_classes=4, metric=metric,
                              backend=backend) for a, b in _chunks(18, c)]
    final = P.merge(*parts)
    leaves = [a.detach().double().requires_grad_() for a in (q, r)]
    want = nbkernels.soft_knn_predict(*leaves, ry, 4, temperature=0.5, metric=metric,
                                      backend="reference")
    assert_match([P.finish_yhat(final)], [want.detach()], atol, rtol, "yhat")

    g = torch.rand(7, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dq = torch.zeros(7, 5, dtype=torch.float64)
    dr = torch.zeros(18, 5, dtype=torch.float64)
    for a, b in _chunks(18, c):
        dq_c, dr_c, _ = P.chunk_backward(q, r[a:b], None, ry[a:b], t, final,
                                         g_yhat=g.to(final.yhat.dtype), metric=metric,
                                         backend=backend)
        dq += dq_c.double()
        dr[a:b] = dr_c.double()
    want_dq, want_dr = torch.autograd.grad((want * g).sum(), leaves)
    assert_match([dq, dr], [want_dq, want_dr], atol, rtol, "gradients")


def test_merge_is_exact_in_any_grouping():
    x, y, t = _inputs(torch.float64)
    parts = [P.chunk_partials(x, x[a:b], y, y[a:b], t, num_classes=10, offset=0, start=a)
             for a, b in _chunks(15, 3)]
    one = P.merge(*parts)
    tree = P.merge(P.merge(parts[0], parts[3]), P.merge(parts[4], P.merge(parts[2], parts[1])))
    whole = P.chunk_partials(x, x, y, y, t, num_classes=10, offset=0)
    for a, b, c in zip(one, tree, whole):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.double(), c.double(), rtol=1e-12, atol=1e-12)


def test_chunk_without_terms_merges_as_identity():
    x, y, t = _inputs(torch.float64)
    # chunk holding only row 2: query 2 excludes it and has no term there (lse -inf, yhat NaN)
    lonely = P.chunk_partials(x, x[2:3], y, y[2:3], t, num_classes=10, offset=0, start=2)
    assert lonely.lse_all[2] == float("-inf")
    rest = [P.chunk_partials(x, x[a:b], y, y[a:b], t, num_classes=10, offset=0, start=a)
            for a, b in ((0, 2), (3, 15))]
    final = P.merge(lonely, *rest)
    assert torch.isfinite(final.yhat).all()
    torch.testing.assert_close(final.yhat.sum(1), torch.ones(15, dtype=torch.float64))
    empty = P.empty_partials(15, 10, True, torch.float64, x.device)
    for a, b in zip(P.merge(final, empty), final):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_low_level_api_validates():
    x, y, t = _inputs(torch.float64)
    with pytest.raises(ValueError, match="metric"):
        P.chunk_partials(x, x, y, y, t, metric="l1")
    with pytest.raises(ValueError, match="at least one"):
        P.merge()
    # labels, classes, start and offset name the argument and what was expected
    n = x.shape[0]
    bad = [(dict(q_labels=y.double()), TypeError, "q_labels must have an integer dtype"),
           (dict(q_labels=y[:2]), ValueError, f"q_labels must have shape \\({n},\\)"),
           (dict(r=x[:3]), ValueError, "r_labels must have shape \\(3,\\)"),
           (dict(q_labels=None, num_classes=int(y.max())), ValueError,
            "r_labels must lie in \\[0, num_classes="),
           (dict(q_labels=None, num_classes=0), ValueError, "num_classes must be >= 1"),
           (dict(q_labels=None, r_labels=y - 1, num_classes=int(y.max()) + 1), ValueError,
            "r_labels must lie in"),
           (dict(offset=0, start=0.5), TypeError, "start must be an int"),
           (dict(offset=0, start=-1), ValueError, "start must be >= 0"),
           (dict(offset=0.0), TypeError, "offset must be an int")]
    for kw, exc, match in bad:
        args = dict(q=x, r=x, q_labels=y, r_labels=y, temperature=t) | kw
        with pytest.raises(exc, match=match):
            P.chunk_partials(args.pop("q"), args.pop("r"), args.pop("q_labels"),
                             args.pop("r_labels"), args.pop("temperature"), **args)
    final = P.chunk_partials(x, x, y, y, t, offset=0)
    with pytest.raises(TypeError, match="start must be an int"):
        P.chunk_backward(x, x, y, y, t, final, g_loss=torch.ones(n, dtype=x.dtype), offset=0,
                         start=0.5)
