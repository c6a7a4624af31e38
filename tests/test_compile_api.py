"""torch.compile of the public API: a fullgraph-compiled training step equals eager, the
chunked losses compile fullgraph against themselves, the cache compiles with graph
breaks (not under fullgraph), and the torch backend's custom ops pass opcheck."""
import pytest
import torch

import nbkernels
from helpers import make_batch


def _train_step(backend):
    def step(model, x, y):
        loss = nbkernels.nca_loss(model(x), y, temperature=0.5, backend=backend)
        loss = loss + nbkernels.prototype_loss(model(x), y, backend=backend)
        return loss
    return step


@pytest.mark.parametrize("backend, compiler", [("torch", "inductor"), ("auto", "aot_eager"),
                                               ("reference", "aot_eager")])
def test_fullgraph_compiled_training_step_equals_eager(backend, compiler):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    x, y = torch.randn(21, 6), torch.randint(0, 3, (21,))
    step = _train_step(backend)
    _assert_compiled_equals_eager(step, model, x, y, fullgraph=True, backend=compiler)


def _step_results(fn, model, x, y):
    """The loss and every parameter gradient of one step ``fn(model, x, y).backward()``."""
    model.zero_grad()
    loss = fn(model, x, y)
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]


def _assert_compiled_equals_eager(step, model, x, y, **compile_kw):
    want = _step_results(step, model, x, y)
    got = _step_results(torch.compile(step, **compile_kw), model, x, y)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


CHUNKED_STEPS = {
    "nca batch": lambda e, y: nbkernels.nca_loss(e, y, temperature=0.5, chunk_size=4),
    "nca against itself as a bank": lambda e, y: nbkernels.nca_loss(
        e, y, ref_embeddings=e, ref_labels=y, temperature=0.5, chunk_size=4),
    "soft_knn_predict against itself": lambda e, y: nbkernels.soft_knn_predict(
        e, e, y, 3, temperature=0.5, chunk_size=4).square().sum(),
}


@pytest.mark.parametrize("name", list(CHUNKED_STEPS))
def test_fullgraph_chunked_against_itself(name):
    """A chunked call that scores a tensor against itself passed it twice to one
    autograd.Function, which Dynamo refuses ("duplicate tensor input"): the streamed
    Functions take r=None for it, as NeighborLSE does."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    x, y = torch.randn(13, 6), torch.randint(0, 3, (13,))
    fn = CHUNKED_STEPS[name]

    def step(model, x, y):
        return fn(model(x), y)

    _assert_compiled_equals_eager(step, model, x, y, fullgraph=True, backend="aot_eager")


def test_cache_compiles_with_graph_breaks_not_fullgraph():
    """NeighborCache reads its fill state (ptr, filled) on the host: a step that calls it
    compiles with graph breaks (torch.compile's default) and equals eager; under
    fullgraph=True it does not compile (the README says so)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    x, y = torch.randn(13, 6), torch.randint(0, 3, (13,))

    def run(compiled):
        cache = nbkernels.NeighborCache(32, 4, 3, temperature=0.5, metric="cosine")
        cache.push(torch.randn(20, 4, generator=torch.Generator().manual_seed(1)),
                   torch.arange(20) % 3)

        def step(model, x, y):
            return cache(model(x), y)
        return _step_results(torch.compile(step, backend="aot_eager") if compiled else step,
                             model, x, y)

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    cache = nbkernels.NeighborCache(32, 4, 3, temperature=0.5)
    cache.push(torch.randn(20, 4), torch.arange(20) % 3)
    with pytest.raises(Exception, match="(?i)graph break|unsupported|data-dependent|item"):
        torch.compile(lambda e, y: cache(e, y), fullgraph=True, backend="aot_eager")(
            model(x), y)


def test_torch_backend_ops_pass_opcheck():
    from nbkernels.backends import torch as tb  # noqa: F401  (registers the ops)
    q, y = make_batch(9, 5, 3, seed=10, dtype=torch.float32)
    r, b = make_batch(7, 5, 3, seed=11, dtype=torch.float32)
    t = torch.tensor(0.5)
    ops = torch.ops.nbkernels
    la, lp = ops.torch_lse_fwd(q, r, y, b, t, "sqeuclidean", 2, False)
    yhat, ly = ops.torch_probs_fwd(q, r, b, t, 3, "dot", None)
    cases = [
        (ops.torch_lse_fwd, (q, r, y, b, t, "sqeuclidean", 2, False)),
        (ops.torch_lse_fwd, (q, q, y, y, t, "dot", 0, True)),
        (ops.torch_probs_fwd, (q, r, b, t, 3, "dot", None)),
        (ops.torch_lse_bwd, (q, r, y, b, t, la, lp, torch.ones(9), -torch.ones(9), "sqeuclidean",
                             2, False, True, True, True)),
        (ops.torch_lse_bwd, (q, q, y, y, t, la, lp, torch.ones(9), -torch.ones(9), "dot", 0,
                             True, True, True, False)),
        (ops.torch_probs_bwd, (q, r, b, t, yhat, ly, torch.ones(9, 3), "dot", None, False, True,
                               True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))
