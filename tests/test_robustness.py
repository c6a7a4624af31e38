"""Exactness and robustness of the public API, each against an independent fp64 formula
written here (direct differences, no expansion, no nbkernels code):

* a float temperature is exact in fp64 for fp64 inputs (functions, modules, cache, the
  distributed losses);
* double backward: gradgradcheck for backend="reference", a clear error elsewhere;
* empty inputs, out-of-range prototype labels, autocast, expanded labels, inf semantics.

torch.compile of the API is in tests/test_compile_api.py.
"""
import warnings

import pytest
import torch
import torch.distributed as dist

import nbkernels
from helpers import make_batch

TEMPERATURES = [0.05, 0.1, 0.3]
METRICS = ["sqeuclidean", "cosine", "dot"]
F64 = (torch.float64, 1e-12, 1e-10)  # (dtype, atol, rtol) against the fp64 formula


# ------------------------------------------------------------ the independent formula


def formula_logits(q, r, t, metric, offset=None):
    """(N, M) fp64 logits by direct differences; the excluded pair is -inf.

    Points at infinity, as documented: "sqeuclidean" gives a query at infinity a NaN row
    (every distance is infinite), and cosine takes a row's limit direction.
    """
    q, r = q.double(), r.double()
    if metric == "cosine":
        def unit(x):
            far = torch.isinf(x).any(1, keepdim=True) & ~torch.isnan(x).any(1, keepdim=True)
            x = torch.where(far, torch.where(torch.isinf(x), torch.sign(x), 0.0), x)
            return x / x.norm(dim=1, keepdim=True)
        q, r = unit(q), unit(r)
    if metric == "sqeuclidean":
        s = -((q[:, None, :] - r[None, :, :]) ** 2).sum(-1) / t
        s = torch.where(torch.isinf(q).any(1, keepdim=True), float("nan"), s)
    else:
        s = (q[:, None, :] * r[None, :, :]).sum(-1) / t
        s = torch.where(s == float("inf"), float("nan"), s)
    if offset is not None:
        i = torch.arange(s.shape[0])[:, None]
        s = torch.where(torch.arange(s.shape[1])[None, :] == i + offset, float("-inf"), s)
    return s


def formula_loss_rows(q, r, a, b, t, metric, offset=None):
    """(loss rows (N,), rows with a positive (N,) bool)."""
    s = formula_logits(q, r, t, metric, offset)
    keep = s > float("-inf")
    pos = (a[:, None] == b[None, :]) & (keep | torch.isnan(s))
    if offset is not None:
        j = torch.arange(s.shape[1])[None, :]
        pos &= j != torch.arange(s.shape[0])[:, None] + offset
    valid = pos.any(1)

    def lse(mask):
        z = torch.where(mask | torch.isnan(s), s, float("-inf"))
        return torch.logsumexp(z, 1)

    rows = torch.where(valid, lse(torch.ones_like(pos)) - lse(pos), 0.0)
    rows = torch.where(torch.isnan(s).any(1), float("nan"), rows)
    return rows, valid


def formula_loss(q, r, a, b, t, metric, offset=None, reduction="mean"):
    rows, valid = formula_loss_rows(q, r, a, b, t, metric, offset)
    if reduction == "none":
        return rows
    return rows.sum() / (valid.sum().clamp_min(1) if reduction == "mean" else 1)


def formula_probs(q, r, b, t, c, metric, offset=None):
    p = torch.softmax(formula_logits(q, r, t, metric, offset), 1)
    return p @ torch.nn.functional.one_hot(b, c).double()


def _close(got, want, atol=F64[1], rtol=F64[2], what=""):
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


# ------------------------------------------------ 1. float temperature exact in fp64


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("t", TEMPERATURES)
def test_float_temperature_is_exact_in_fp64(t, backend, metric):
    x, y = make_batch(37, 19, 4, seed=1, scale=2.0)
    bank, by = make_batch(29, 19, 4, seed=2, scale=2.0)
    for temperature in (t, torch.tensor(t, dtype=torch.float64)):
        got = nbkernels.nca_loss(x, y, temperature=temperature, metric=metric, backend=backend)
        _close(got, formula_loss(x, x, y, y, t, metric, 0), what="batch loss")
        got = nbkernels.nca_loss(x, y, ref_embeddings=bank, ref_labels=by,
                                 temperature=temperature, metric=metric, backend=backend,
                                 reduction="none")
        _close(got, formula_loss(x, bank, y, by, t, metric, reduction="none"), what="bank")
        got = nbkernels.soft_knn_predict(x, bank, by, 4, temperature=temperature, metric=metric,
                                         backend=backend)
        _close(got, formula_probs(x, bank, by, t, 4, metric), what="soft_knn_predict")
        got = nbkernels.nca_loss(x, y, ref_embeddings=bank, ref_labels=by, chunk_size=8,
                                 temperature=temperature, metric=metric, backend=backend)
        _close(got, formula_loss(x, bank, y, by, t, metric), what="chunked")


@pytest.mark.parametrize("t", TEMPERATURES)
def test_modules_and_cache_are_exact_in_fp64(t):
    x, y = make_batch(37, 19, 4, seed=3)
    crit = nbkernels.NCALoss(temperature=t, learn_temperature=True, metric="sqeuclidean")
    assert crit.log_temperature.dtype == torch.float64
    _close(crit(x, y), formula_loss(x, x, y, y, t, "sqeuclidean", 0), what="NCALoss learned T")
    _close(nbkernels.NCALoss(temperature=t)(x, y), formula_loss(x, x, y, y, t, "sqeuclidean", 0))
    protos = make_batch(4, 19, 4, seed=4)[0]
    _close(nbkernels.PrototypeLoss(temperature=t, learn_temperature=True)(x, y, protos),
           formula_loss(x, protos, y, torch.arange(4), t, "sqeuclidean"), what="PrototypeLoss")
    cache = nbkernels.NeighborCache(64, 19, 4, temperature=t, dtype=torch.float64)
    bank, by = make_batch(29, 19, 4, seed=5)
    cache.push(bank, by)
    _close(cache.loss(x, y), formula_loss(x, bank, y, by, t, "cosine"), what="cache loss")
    _close(cache.predict(x), formula_probs(x, bank, by, t, 4, "cosine"), what="cache predict")


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("t", TEMPERATURES)
def test_distributed_losses_are_exact_in_fp64(one_rank_group, t):
    x, y = make_batch(23, 7, 3, seed=6)
    got = nbkernels.nca_loss(x, y, temperature=t, distributed=True)
    _close(got, formula_loss(x, x, y, y, t, "sqeuclidean", 0), what="distributed nca")
    cache = nbkernels.NeighborCache(32, 7, 3, temperature=t, dtype=torch.float64,
                                    distributed=True)
    bank, by = make_batch(11, 7, 3, seed=7)
    cache.push(bank, by)
    _close(cache.loss(x, y), formula_loss(x, bank, y, by, t, "cosine"), what="sharded cache")


# --------------------------------------------------------------- 2. double backward


def _outputs(metric):
    """(name, fn(x, t, backend)) for every differentiable output."""
    y = torch.tensor([0, 1, 0, 2, 1, 0, 2])
    bank, by = make_batch(5, 3, 3, seed=8)
    return [
        ("nca_loss", lambda x, t, be: nbkernels.nca_loss(x, y, temperature=t, metric=metric,
                                                         backend=be)),
        ("nca_loss refs", lambda x, t, be: nbkernels.nca_loss(
            x, y, ref_embeddings=bank, ref_labels=by, temperature=t, metric=metric, backend=be)),
        ("soft_knn_predict", lambda x, t, be: nbkernels.soft_knn_predict(
            x, bank, by, 3, temperature=t, metric=metric, backend=be)),
    ]


@pytest.mark.parametrize("metric", METRICS)
def test_reference_has_a_true_double_backward(metric):
    x = make_batch(7, 3, 3, seed=9)[0].requires_grad_()
    t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    for name, fn in _outputs(metric):
        assert torch.autograd.gradgradcheck(lambda x, t, fn=fn: fn(x, t, "reference"), (x, t)), name


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_fused_backends_refuse_double_backward(metric, chunk_size):
    x = make_batch(7, 3, 3, seed=9)[0].requires_grad_()
    t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 2])
    bank, by = make_batch(5, 3, 3, seed=8)
    outputs = _outputs(metric) + [("chunked", lambda x, t, be: nbkernels.nca_loss(
        x, y, ref_embeddings=bank, ref_labels=by, temperature=t, metric=metric, backend=be,
        chunk_size=chunk_size))]
    for name, fn in outputs:
        out = fn(x, t, "torch").sum()
        gx, gt = torch.autograd.grad(out, (x, t), create_graph=True)  # fine: first order
        want, want_t = torch.autograd.grad(fn(x, t, "reference").sum(), (x, t))
        _close(gx, want, what=f"{name} first-order dx")
        _close(gt, want_t, what=f"{name} first-order dT")
        with pytest.raises(RuntimeError, match=r'double backward.*backend="reference"'):
            torch.autograd.grad(gx.pow(2).sum(), x)


def test_create_graph_elsewhere_still_works():
    """A gradient penalty on another term: backward(create_graph=True) must not raise."""
    x = make_batch(7, 3, 3, seed=9)[0].requires_grad_()
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    emb = x @ w
    loss = nbkernels.nca_loss(emb, torch.tensor([0, 1, 0, 2, 1, 0, 2]), backend="torch")
    penalty = torch.autograd.grad(emb.square().sum(), x, create_graph=True)[0].square().sum()
    (loss + penalty).backward()
    assert torch.isfinite(w.grad).all()


# ------------------------------------------------------------------ 3. empty inputs


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_empty_inputs(backend):
    x, y = make_batch(5, 3, 2, seed=12)
    empty_x, empty_y = x[:0], y[:0]
    for q, qy, r, ry in ((empty_x, empty_y, x, y), (x, y, empty_x, empty_y),
                         (empty_x, empty_y, empty_x, empty_y)):
        q = q.clone().requires_grad_()
        loss = nbkernels.nca_loss(q, qy, ref_embeddings=r, ref_labels=ry, backend=backend)
        assert loss.item() == 0.0
        (gq,) = torch.autograd.grad(loss, q, allow_unused=True, materialize_grads=True)
        assert gq.shape == q.shape and not gq.any()
        rows = nbkernels.nca_loss(q, qy, ref_embeddings=r, ref_labels=ry, backend=backend,
                                  reduction="none")
        assert rows.shape == (q.shape[0],) and not rows.any()
    assert nbkernels.nca_loss(empty_x, empty_y, backend=backend).item() == 0.0
    probs = nbkernels.soft_knn_predict(empty_x, x, y, 2, backend=backend)
    assert probs.shape == (0, 2)


# -------------------------------------------------------- 4. prototype label range


def test_prototype_losses_refuse_labels_without_a_prototype():
    x, _ = make_batch(6, 4, 3, seed=13)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=3\).*\[0, 3\]"):
        nbkernels.PrototypeLoss(num_classes=3, dim=4)(x, torch.tensor([0, 1, 3, 0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=2\)"):
        nbkernels.prototype_loss(x, y, prototypes=torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"labels must only hold labels that prototype_labels "
                                         r"holds, got \[2\]"):
        nbkernels.prototype_loss(x, y, prototypes=torch.randn(2, 4, dtype=torch.float64),
                                 prototype_labels=torch.tensor([0, 1]))
    # labels the prototypes do have are fine, in any order
    loss = nbkernels.prototype_loss(x, y, prototypes=torch.randn(3, 4, dtype=torch.float64),
                                    prototype_labels=torch.tensor([2, 0, 1]))
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------- 5. autocast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_autocast_does_not_lower_accumulation(dtype, backend):
    x, y = make_batch(300, 64, 10, seed=14, dtype=torch.float32)
    bank, by = make_batch(257, 64, 10, seed=15, dtype=torch.float32)
    want = formula_loss(x, bank, y, by, 0.5, "sqeuclidean")
    with torch.autocast("cpu", dtype=dtype):
        got = nbkernels.nca_loss(x, y, ref_embeddings=bank, ref_labels=by, temperature=0.5,
                                 backend=backend)
        probs = nbkernels.soft_knn_predict(x, bank, by, 10, temperature=0.5, backend=backend)
    assert got.dtype == torch.float32 and probs.dtype == torch.float32
    # fp32 accumulation: about 1e-6 relative (a bf16 matmul gave 1.5e-3)
    _close(got, want, atol=0, rtol=2e-5, what="loss under autocast")
    _close(probs, formula_probs(x, bank, by, 0.5, 10, "sqeuclidean"), atol=2e-5, rtol=0)


# --------------------------------------------------------------- 6. expanded labels


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_expanded_labels_give_no_internal_warning(backend):
    x, _ = make_batch(8, 3, 2, seed=16)
    y = torch.tensor([1]).expand(8)  # stride 0
    bank, _ = make_batch(5, 3, 2, seed=17)
    by = torch.tensor([0, 1]).repeat_interleave(4)[::2].expand(4)[:4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = nbkernels.nca_loss(x, y, backend=backend)
        nbkernels.nca_loss(x, y, ref_embeddings=bank[:4], ref_labels=by, backend=backend)
        nbkernels.prototype_loss(x, y, backend=backend)
        nbkernels.soft_knn_predict(x, bank[:4], by, 2, backend=backend)
    _close(got, formula_loss(x, x, y.contiguous(), y.contiguous(), 0.1, "sqeuclidean", 0))


# ------------------------------------------------------------------ 7. inf and NaN


def _loss_and_grad(x, y, metric, backend, refs=None, reduction="none"):
    x = x.clone().requires_grad_()
    kw = {} if refs is None else dict(ref_embeddings=refs[0], ref_labels=refs[1])
    rows = nbkernels.nca_loss(x, y, temperature=0.5, metric=metric, backend=backend,
                              reduction=reduction, **kw)
    # upstream 1 on defined rows, 0 on the undefined ones
    (g,) = torch.autograd.grad(torch.nan_to_num(rows, nan=0.0).sum(), x)
    return rows.detach(), g


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_inf_touches_only_rows_whose_value_is_undefined(backend, metric):
    x, y = make_batch(40, 6, 3, seed=18)
    x[7, 2] = float("inf")
    rows, g = _loss_and_grad(x, y, metric, backend)
    want = formula_loss(x, x, y, y, 0.5, metric, 0, reduction="none")
    _close(rows, want, what="rows")
    undefined = torch.isnan(rows).nonzero().flatten().tolist()
    assert undefined == ([7] if metric == "sqeuclidean" else []), undefined
    assert torch.isfinite(g).all()
    assert not g[7].any()  # no gradient for a point at infinity
    # the other rows: exactly as without row 7 (sqeuclidean: weight 0 for it)
    if metric == "sqeuclidean":
        keep = torch.arange(40) != 7
        drop = formula_loss(x[keep], x[keep], y[keep], y[keep], 0.5, metric, 0,
                            reduction="none")
        _close(rows[keep], drop, what="rows without the point at infinity")
        _, g_drop = _loss_and_grad(x[keep], y[keep], metric, "reference")
        _close(g[keep], g_drop, what="gradients without the point at infinity")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_reference_at_infinity_has_weight_zero(backend):
    q, qy = make_batch(9, 5, 3, seed=19)
    bank, by = make_batch(7, 5, 3, seed=20)
    bank[3, 1] = -float("inf")
    rows, g = _loss_and_grad(q, qy, "sqeuclidean", backend, (bank, by))
    keep = torch.arange(7) != 3
    _close(rows, formula_loss(q, bank[keep], qy, by[keep], 0.5, "sqeuclidean",
                              reduction="none"))
    _, g_drop = _loss_and_grad(q, qy, "sqeuclidean", "reference", (bank[keep], by[keep]))
    _close(g, g_drop)
    probs = nbkernels.soft_knn_predict(q, bank, by, 3, temperature=0.5, backend=backend)
    _close(probs, formula_probs(q, bank[keep], by[keep], 0.5, 3, "sqeuclidean"))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_dot_follows_the_direct_formula(backend):
    q, qy = make_batch(9, 5, 3, seed=21)
    bank, by = make_batch(7, 5, 3, seed=22)
    bank[2] = 0.0
    bank[2, 0] = float("inf")  # logit +inf where q_0 > 0, -inf where q_0 < 0
    rows = nbkernels.nca_loss(q, qy, ref_embeddings=bank, ref_labels=by, temperature=0.5,
                              metric="dot", backend=backend, reduction="none")
    want = formula_loss(q, bank, qy, by, 0.5, "dot", reduction="none")
    _close(rows, want)
    assert torch.equal(torch.isnan(rows), q[:, 0] > 0)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_nan_in_is_nan_out(backend, metric):
    x, y = make_batch(11, 4, 3, seed=23)
    x[4, 1] = float("nan")
    assert torch.isnan(nbkernels.nca_loss(x, y, metric=metric, backend=backend))
    assert torch.isnan(nbkernels.soft_knn_predict(x[:3], x, y, 3, metric=metric,
                                                  backend=backend)).all()


# ------------------------------------------------------------------- 8. cache dtype


def test_cache_warns_once_on_a_lossy_cast():
    cache = nbkernels.NeighborCache(16, 4, 3)  # fp32 memory
    x, y = make_batch(5, 4, 3, seed=24)  # fp64
    with pytest.warns(UserWarning, match="float64 are stored in the cache's torch.float32"):
        cache.push(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.push(x, y)  # once only
        cache.push(x.half(), y)  # fp16 fits in fp32: no warning
    assert cache.memory.dtype == torch.float32 and len(cache) == 15


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_positives_only_at_infinity_count_as_none(backend, chunk_size):
    """sqeuclidean: a reference at infinity has weight 0, so a query whose only positives
    sit there has no positive: loss 0, left out of the mean, as if the point were absent
    (the loss was +inf and the mean inf)."""
    x, y = make_batch(30, 5, 3, seed=21)
    bank, bank_y = make_batch(25, 5, 3, seed=22)
    y[4] = 7                      # query 4's class: one reference only, at infinity
    bank_y[11] = 7
    bank[11, 0] = float("inf")
    kw = dict(ref_embeddings=bank, ref_labels=bank_y, temperature=0.5, backend=backend,
              chunk_size=chunk_size)
    rows = nbkernels.nca_loss(x, y, reduction="none", **kw)
    assert rows[4] == 0 and torch.isfinite(rows).all()
    keep = torch.arange(25) != 11
    absent = nbkernels.nca_loss(x, y, ref_embeddings=bank[keep], ref_labels=bank_y[keep],
                                temperature=0.5, backend=backend, reduction="none")
    _close(rows, absent, what="rows")
    mean = nbkernels.nca_loss(x, y, reduction="mean", **kw)
    _close(mean, absent.sum() / (absent != 0).sum(), what="mean over the rows with a positive")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_fp16_rows_far_apart_stay_finite(backend):
    """fp16 rows at +-6e4 (finite; their distances are not): the centring by the queries'
    mean put rows at -1.2e5, past fp16's range, and they came out as points at infinity
    (NaN losses, NaN class rows). Now centred on the midpoint of the rows' range: the loss
    rows and soft_knn_predict against the fp64 formula (fp16 outputs: a few of its ulps)."""
    x = torch.tensor([[6e4, 0.0], [6e4, 1.0], [-6e4, 0.0], [-6e4, 1.0], [-6e4, 2.0],
                      [-6e4, 3.0]], dtype=torch.float16)
    y = torch.tensor([0, 0, 1, 1, 1, 1])
    t = 1e9
    got = nbkernels.nca_loss(x, y, temperature=t, backend=backend, reduction="none")
    want = formula_loss(x, x, y, y, t, "sqeuclidean", offset=0, reduction="none")
    _close(got, want, atol=2e-7, rtol=0.0, what="loss rows")
    probs = nbkernels.soft_knn_predict(x, x, y, 2, temperature=t, backend=backend,
                                       exclude_self=True)
    _close(probs, formula_probs(x, x, y, t, 2, "sqeuclidean", offset=0), atol=2e-3, rtol=0.0,
           what="soft_knn_predict")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_a_class_without_weight_has_probability_zero(backend, dtype):
    """A class whose only reference is the query's excluded self pair, and one far beyond
    what the dtype can weigh (the fp64 formula's 6.7e-79, below fp32's range; in fp64
    exp(-180) is kept): exactly the formula's value, not the floor exp(-87) / exp(-708)
    that the torch backend's exps clamp their arguments to."""
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=dtype)
    y = torch.tensor([0, 1, 1])
    got = nbkernels.soft_knn_predict(x, x, y, 2, backend=backend, exclude_self=True)
    assert got[0, 0].item() == 0.0 and got[0, 1].item() == 1.0
    q, r = torch.zeros(1, 2, dtype=dtype), torch.tensor([[0.0, 0.0], [3.0, 0.0]], dtype=dtype)
    ry = torch.tensor([0, 1])
    got = nbkernels.soft_knn_predict(q, r, ry, 2, temperature=0.05, backend=backend)
    want = formula_probs(q, r, ry, 0.05, 2, "sqeuclidean")
    _close(got, want.to(dtype), atol=0.0, rtol=1e-12 if dtype == torch.float64 else 1e-6,
           what="far class")


def test_fp16_references_beyond_range_of_the_queries_centre_are_refused():
    """The references are shifted by the queries' centre and rounded to their dtype: fp16
    references 7e4 from it would come out as points at infinity (weight 0, the loss 0 on
    every row where the formula gives 0.37 and 1.16): refused, naming what to pass."""
    g = torch.Generator().manual_seed(0)
    q = (3e4 + torch.randn(8, 4, generator=g)).half()
    r = (-4e4 + torch.randn(16, 4, generator=g)).half()
    ql, rl = torch.randint(0, 2, (8,), generator=g), torch.randint(0, 2, (16,), generator=g)
    with pytest.raises(ValueError, match=r"references must lie within torch.float16's range"):
        nbkernels.nca_loss(q, ql, ref_embeddings=r, ref_labels=rl, temperature=1e6,
                           backend="torch")
    # within range of the centre: scored as the formula (fp16 output)
    r = (2e4 + torch.randn(16, 4, generator=g)).half()
    got = nbkernels.nca_loss(q, ql, ref_embeddings=r, ref_labels=rl, temperature=1e6,
                             backend="torch", reduction="none")
    want = formula_loss(q, r, ql, rl, 1e6, "sqeuclidean", reduction="none")
    _close(got, want, atol=2e-3, rtol=2e-3, what="loss rows")
