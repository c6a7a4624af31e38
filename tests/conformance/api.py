"""Public-API tests: ``nca_loss``, ``soft_knn_predict`` and ``prototype_loss`` with
``backend=<name>`` (through ``nbkernels.autograd``) against the same functions written
on the fp64 oracle."""
import functools
import warnings

import pytest
import torch

import nbkernels
from helpers import assert_match
from helpers import run as api_run
import launcher_cases as cases

from .harness import API_METRICS, F32, F64, INF, NAN, TOL
from .oracle import _inf_as_nan, oracle_rows

def api_nca(x, t, r=None, *, backend, y, ry=None, metric, reduction="none"):
    """nbkernels.nca_loss, or for backend=None the oracle; without r the batch loss."""
    if backend is not None:
        refs = {} if r is None else dict(ref_embeddings=r, ref_labels=ry)
        return nbkernels.nca_loss(x, y, temperature=t, metric=metric, reduction=reduction,
                                  backend=backend, **refs)
    r, ry, offset = (x, y, 0) if r is None else (r, ry, None)
    lse_all, lse_pos, _, valid = oracle_rows(x, r, y, ry, t, 0, metric, offset)
    undefined = torch.where(torch.isnan(lse_all), lse_all, torch.zeros_like(lse_all))
    loss = torch.where(valid, lse_all - lse_pos, undefined)
    if reduction == "none":
        return loss
    return loss.sum() / (valid.sum().clamp_min(1) if reduction == "mean" else 1)


def api_knn(x, t, r, *, backend, ry, c, metric, exclude_self=False):
    if backend is not None:
        return nbkernels.soft_knn_predict(x, r, ry, c, temperature=t, metric=metric,
                                          exclude_self=exclude_self, backend=backend)
    return oracle_rows(x, r, None, ry, t, c, metric, 0 if exclude_self else None)[2]


def api_proto(x, t, p=None, *, backend, y, metric):
    """prototype_loss with learned prototypes p (labels arange), or the class means."""
    if backend is not None:
        return nbkernels.prototype_loss(x, y, prototypes=p, temperature=t, metric=metric,
                                        reduction="none", backend=backend)
    if p is None:
        classes = torch.unique(y)
        member = (classes[:, None] == y[None, :]).double()
        p, py = (member @ x) / member.sum(1, keepdim=True), classes
    else:
        py = torch.arange(p.shape[0], device=p.device)
    return api_nca(x, t, p, backend=None, y=y, ry=py, metric=metric)


def api_data(caps, dtype, n=15, m=13, d=6, c=4, seed=5):
    """(x, y, r, ry, p, t, c): queries, references, prototypes (c, d) and T, in ``dtype``
    (T in its accumulation dtype), drawn in fp64 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    x, r, p = (torch.randn(k, d, generator=g, dtype=F64).to(caps.device, dtype)
               for k in (n, m, c))
    y, ry = (torch.randint(0, c, (k,), generator=g).to(caps.device) for k in (n, m))
    t = torch.tensor(0.3, dtype=cases.acc_dtype(dtype), device=caps.device)
    return x, y, r, ry, p, t, c


def api_cases(data, metric):
    """[(name, fn(*tensors, backend), tensors)] for every public function."""
    x, y, r, ry, p, t, c = data
    return [
        ("nca_batch", functools.partial(api_nca, y=y, metric=metric), [x, t]),
        ("nca_refs", functools.partial(api_nca, y=y, ry=ry, metric=metric), [x, t, r]),
        ("knn", functools.partial(api_knn, ry=ry, c=c, metric=metric), [x, t, r]),
        ("knn_exclude_self", functools.partial(api_knn, ry=y, c=c, metric=metric,
                                               exclude_self=True), [x, t, x.clone()]),
        ("proto_means", functools.partial(api_proto, y=y, metric=metric), [x, t]),
        ("proto_learned", functools.partial(api_proto, y=y, metric=metric), [x, t, p]),
    ]


def check_api(fn, tensors, backend, atol, rtol, what):
    """Output and gradients (of a random projection) of ``fn`` on ``backend`` against the
    oracle on the same rounded inputs in fp64."""
    want = api_run(fn, [x.double() for x in tensors], None)
    got = api_run(fn, tensors, backend)
    assert got[0].dtype == tensors[0].dtype
    assert [g.dtype for g in got[1:]] == [x.dtype for x in tensors]
    assert_match(got, want, atol, rtol, what=what)
    return got


@pytest.mark.parametrize("metric", API_METRICS)
def test_api_matches_oracle(caps, api_backend, dtype_tol, metric):
    dtype, atol, rtol = dtype_tol
    for name, fn, tensors in api_cases(api_data(caps, dtype), metric):
        check_api(fn, tensors, api_backend, atol, rtol, f"{name} {metric}")


def _fp64_runs(caps, monkeypatch):
    """A context for fp64 inputs: backends that fall back to "torch" must warn."""
    if caps.fp64 != "fallback":
        return warnings.catch_warnings()
    from nbkernels import backends
    monkeypatch.setattr(backends, "_warned", set())
    return pytest.warns(UserWarning, match="float64")


def test_api_gradcheck_fp64(caps, api_backend, monkeypatch):
    x, y, r, ry, p, t, c = api_data(caps, F64, n=6, m=5, d=3, c=3)
    fns = [(functools.partial(api_nca, y=y, metric="sqeuclidean"), [x, t]),
           (functools.partial(api_nca, y=y, ry=ry, metric="cosine"), [x, t, r]),
           (functools.partial(api_knn, ry=ry, c=c, metric="dot"), [x, t, r]),
           (functools.partial(api_knn, ry=ry, c=c, metric="sqeuclidean"), [x, t, r]),
           (functools.partial(api_proto, y=y, metric="sqeuclidean"), [x, t, p])]
    with _fp64_runs(caps, monkeypatch):
        for fn, tensors in fns:
            leaves = [a.detach().clone().requires_grad_() for a in tensors]
            assert torch.autograd.gradcheck(functools.partial(fn, backend=api_backend), leaves,
                                            fast_mode=caps.emulated)


@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_api_float_temperature_fp64(caps, api_backend, kind):
    # a float T with fp64 inputs is exact in fp64 (not rounded through fp32)
    x, y, r, ry, _, _, c = api_data(caps, F64)
    atol, rtol = TOL[F64]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fp64 fallback warning
        for temperature in (0.05, 0.1, 0.3):
            t = temperature if kind == "float" else torch.tensor(temperature, dtype=F64,
                                                                  device=caps.device)
            exact = torch.tensor(temperature, dtype=F64, device=caps.device)
            for fn in (functools.partial(api_nca, y=y, ry=ry, metric="sqeuclidean"),
                       functools.partial(api_knn, ry=ry, c=c, metric="cosine")):
                torch.testing.assert_close(fn(x, t, r, backend=api_backend),
                                           fn(x, exact, r, backend=None), atol=atol, rtol=rtol)


@pytest.mark.parametrize("n, m", [(0, 5), (4, 0)])
def test_api_empty(caps, api_backend, n, m):
    # nca_loss: a differentiable 0 for "mean" / "sum", (N,) zeros for "none" (no row has a
    # positive); soft_knn_predict: (0, C) without queries, a ValueError without references.
    # Gradients: zeros (or None). Every backend, "reference" included, must give exactly this.
    x, y, r, ry, _, t, c = api_data(caps, caps.exact, n=n, m=m)
    for reduction in ("mean", "sum", "none"):
        q, refs, temp = (a.clone().requires_grad_() for a in (x, r, t))
        runs = [(nbkernels.nca_loss(q, y, ref_embeddings=refs, ref_labels=ry, temperature=temp,
                                    reduction=reduction, backend=api_backend), [q, refs, temp])]
        if n == 0:  # the batch loss too
            runs.append((nbkernels.nca_loss(q, y, temperature=temp, reduction=reduction,
                                            backend=api_backend), [q, temp]))
        for out, leaves in runs:
            assert out.shape == ((n,) if reduction == "none" else ()) and out.dtype == caps.exact
            assert not out.any()
            assert out.requires_grad, f"{reduction}: an empty loss must stay differentiable"
            for leaf, g in zip(leaves, torch.autograd.grad(out.sum(), leaves, allow_unused=True)):
                assert g is None or (g.shape == leaf.shape and not g.any())
    if n == 0:
        q = x.clone().requires_grad_()
        yhat = nbkernels.soft_knn_predict(q, r, ry, c, temperature=t, backend=api_backend)
        assert yhat.shape == (0, c) and yhat.dtype == caps.exact
    else:
        with pytest.raises(ValueError, match="ref_embeddings"):
            nbkernels.soft_knn_predict(x, r, ry, c, temperature=t, backend=api_backend)


@pytest.mark.parametrize("where", ["query", "reference"])
@pytest.mark.parametrize("metric", API_METRICS)
def test_api_nan(caps, api_backend, metric, where):
    # a NaN entry makes every output it enters NaN, never a finite number
    x, y, r, ry, _, t, c = api_data(caps, caps.exact)
    (x if where == "query" else r)[3, 1] = NAN
    atol, rtol = TOL[caps.exact]
    for name, fn, tensors in api_cases((x, y, r, ry, None, t, c), metric)[1:3]:
        with torch.no_grad():
            got = fn(*tensors, backend=api_backend)
            want = fn(*[a.double() for a in tensors], backend=None)
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, equal_nan=True)
        rows = torch.isnan(got).reshape(got.shape[0], -1)
        assert rows.all(1).equal(rows.any(1)), f"{name}: a row only partly NaN"
        assert rows.any(1).sum() == (1 if where == "query" else got.shape[0])


@pytest.mark.parametrize("where", ["query", "reference"])
@pytest.mark.parametrize("metric", API_METRICS)
def test_api_points_at_infinity(caps, api_backend, metric, where):
    # a row with infinite entries (and no NaN): see the oracle and reference's docstring
    x, y, r, ry, _, t, c = api_data(caps, caps.exact)
    target = x if where == "query" else r
    target[3, 1], target[3, 4] = INF, -INF
    atol, rtol = TOL[caps.exact]
    for name, fn, tensors in api_cases((x, y, r, ry, None, t, c), metric)[:3]:
        if name == "nca_batch" and where == "reference":
            continue  # no reference but the batch
        what = f"{name} {metric} {where} at infinity"
        if metric == "dot":  # gradients through infinite entries may be NaN
            as_nan = caps.fp32_dot_inf_is_nan and tensors[0].dtype == F32
            with torch.no_grad():
                got = fn(*tensors, backend=api_backend)
                want = fn(*[(_inf_as_nan(a) if as_nan else a).double() for a in tensors],
                          backend=None)
            torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, equal_nan=True,
                                       msg=lambda m, what=what: f"{what}: {m}")
            continue
        got = check_api(fn, tensors, api_backend, atol, rtol, what)
        assert all(torch.isfinite(g).all() for g in got[1:]), what
        far = got[1] if where == "query" else got[3]   # tensors: x, t, r
        assert not far[3].any(), f"{what}: gradient at the point at infinity"
        rows = torch.isnan(got[0]).reshape(got[0].shape[0], -1).any(1)
        undefined = metric == "sqeuclidean" and where == "query"
        assert rows.tolist() == [undefined and i == 3 for i in range(rows.shape[0])], what


DOUBLE_BACKWARD = r'double backward.*backend="reference"'


@pytest.mark.parametrize("output", ["nca_loss", "soft_knn_predict"])
@pytest.mark.parametrize("metric", API_METRICS)
def test_api_double_backward(caps, api_backend, metric, output):
    # backend="reference" is differentiable twice; a fused backend's first derivative
    # (create_graph=True: e.g. a gradient penalty) is fine, differentiating it again raises
    dtype = F64 if api_backend == "reference" else F32
    x, y, r, ry, _, t, c = api_data(caps, dtype, n=5, m=4, d=3, c=3)
    if output == "nca_loss":
        fn, tensors = functools.partial(api_nca, y=y, metric=metric), [x, t]
    else:
        fn, tensors = functools.partial(api_knn, ry=ry, c=c, metric=metric), [x, t, r]
    leaves = [a.detach().clone().requires_grad_() for a in tensors]
    fn = functools.partial(fn, backend=api_backend)
    if api_backend == "reference":
        assert torch.autograd.gradgradcheck(fn, leaves)
        return
    out = fn(*leaves)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
    grads = torch.autograd.grad((out.reshape(-1) * weight).sum(), leaves, create_graph=True)
    assert all(torch.isfinite(g).all() for g in grads)
    penalty = sum(g.square().sum() for g in grads)
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD) as error:
        torch.autograd.grad(penalty, leaves)
    assert "double backward" in str(error.value)
    assert 'backend="reference"' in str(error.value)
