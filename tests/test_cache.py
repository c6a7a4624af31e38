"""NeighborCache: push order, overwrite, loss before push, predict, state_dict."""
import pytest
import torch

import nbkernels


def _batch(n, dim=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_push_order_and_overwrite():
    cache = nbkernels.NeighborCache(5, 2, 10)
    assert len(cache) == 0
    rows = torch.arange(14, dtype=torch.float32)[:, None].repeat(1, 2)
    labels = torch.arange(14) % 10
    cache.push(rows[:3], labels[:3])
    assert len(cache) == 3 and int(cache.ptr) == 3
    assert torch.equal(cache.memory[:3, 0], torch.tensor([0.0, 1.0, 2.0]))
    cache.push(rows[3:7], labels[3:7])  # wraps: slots 3, 4, 0, 1
    assert len(cache) == 5 and int(cache.ptr) == 2
    assert torch.equal(cache.memory[:, 0], torch.tensor([5.0, 6.0, 2.0, 3.0, 4.0]))
    assert torch.equal(cache.labels, torch.tensor([5, 6, 2, 3, 4]))


def test_batch_larger_than_cache_keeps_last_rows():
    cache = nbkernels.NeighborCache(4, 1, 10)
    rows = torch.arange(7, dtype=torch.float32)[:, None]
    with pytest.warns(UserWarning, match="only its last 4 rows"):
        cache.push(rows, torch.arange(7))
    assert sorted(cache.memory[:, 0].tolist()) == [3.0, 4.0, 5.0, 6.0]
    assert len(cache) == 4
    # chronological order is kept: the next push overwrites the oldest (3.0)
    cache.push(torch.tensor([[9.0]]), torch.tensor([9]))
    assert sorted(cache.memory[:, 0].tolist()) == [4.0, 5.0, 6.0, 9.0]


def test_forward_scores_then_pushes():
    cache = nbkernels.NeighborCache(16, 4, 3, temperature=0.2)
    x, y = _batch(6)
    x.requires_grad_()
    loss = cache(x, y)  # empty cache: zero with a gradient path
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert len(cache) == 6 and not cache.memory.requires_grad

    x2, y2 = _batch(5, seed=1)
    x2.requires_grad_()
    want = nbkernels.nca_loss(x2, y2, ref_embeddings=x.detach(), ref_labels=y, metric="cosine",
                              temperature=0.2, backend="reference")
    loss = cache(x2, y2)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert x2.grad.abs().sum() > 0
    assert len(cache) == 11


def test_gradients_reach_queries_only():
    cache = nbkernels.NeighborCache(8, 4, 3)
    x, y = _batch(6)
    x.requires_grad_()
    cache(x, y)
    x3, y3 = _batch(4, seed=3)
    x3.requires_grad_()
    loss = cache(x3, y3)
    loss.backward()
    assert x.grad is None  # the first batch was detached when pushed


def test_predict_and_second_opinion():
    cache = nbkernels.NeighborCache(32, 4, 3, temperature=0.5)
    ref, ry = _batch(20)
    cache.push(ref, ry)
    q, _ = _batch(7, seed=5)
    probs = cache.predict(q)
    want = nbkernels.soft_knn_predict(q, ref, ry, 3, temperature=0.5, metric="cosine",
                                      backend="reference")
    torch.testing.assert_close(probs, want)
    model_probs = torch.softmax(torch.randn(7, 3), 1)
    mixed = cache.predict(q, model_probs=model_probs, weight=0.3)
    torch.testing.assert_close(mixed, 0.7 * model_probs + 0.3 * want)
    torch.testing.assert_close(mixed.sum(1), torch.ones(7))


def test_predict_on_empty_cache_raises():
    with pytest.raises(RuntimeError, match="filled cache"):
        nbkernels.NeighborCache(4, 2, 2).predict(torch.randn(1, 2))


def test_state_dict_round_trip_is_exact():
    cache = nbkernels.NeighborCache(6, 3, 4)
    x, y = _batch(9, dim=3, classes=4)
    cache.push(x[:5], y[:5])
    cache.push(x[5:], y[5:])  # wraps around
    other = nbkernels.NeighborCache(6, 3, 4)
    other.load_state_dict(cache.state_dict())
    for name in ("memory", "labels", "ptr", "filled"):
        assert torch.equal(getattr(other, name), getattr(cache, name))
    q, qy = _batch(3, dim=3, classes=4, seed=9)
    assert torch.equal(other.loss(q, qy), cache.loss(q, qy))
    # both continue identically
    cache.push(q, qy)
    other.push(q, qy)
    assert torch.equal(other.memory, cache.memory)


def test_reset():
    cache = nbkernels.NeighborCache(4, 2, 2)
    cache.push(torch.randn(3, 2), torch.tensor([0, 1, 1]))
    cache.reset()
    assert len(cache) == 0 and int(cache.ptr) == 0 and (cache.labels == -1).all()


def test_nan_batch_is_refused_and_the_cache_stays_clean():
    cache = nbkernels.NeighborCache(8, 4, 3)
    cache.push(*_batch(3, seed=1))
    x, y = _batch(6)
    for bad in (float("nan"), float("inf")):
        x[0, 0] = bad
        with pytest.raises(ValueError, match="must be finite.*rows \\[0\\]"):
            cache(x, y)
        with pytest.raises(ValueError, match="nothing was pushed"):
            cache.push(x, y)
    assert len(cache) == 3 and int(cache.ptr) == 3
    x2, y2 = _batch(6, seed=2)
    assert torch.isfinite(cache(x2, y2))  # nothing poisoned the cache
    # NaN queries are scored, never pushed: NaN comes out
    x[0, 0] = float("nan")
    assert torch.isnan(cache.loss(x, y))


def test_numpy_scalars_are_numbers():
    """size, dim, num_classes and predict's weight accept NumPy ints and floats."""
    import numpy as np
    cache = nbkernels.NeighborCache(np.int64(8), np.int64(4), np.int64(3), backend="torch")
    cache.push(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    probs = cache.predict(torch.randn(2, 4), model_probs=torch.full((2, 3), 1 / 3),
                          weight=np.float32(0.3))
    assert probs.shape == (2, 3)


def test_learned_temperature_survives_the_push():
    """A learned (tensor) temperature and embeddings without grad: the loss's backward
    reads the cache content of the forward, which the push right after overwrites
    ("modified by an inplace operation" before the content was snapshotted for it)."""
    g = torch.Generator().manual_seed(0)
    t = torch.nn.Parameter(torch.tensor(0.3))
    cache = nbkernels.NeighborCache(16, 4, 3, temperature=t, backend="torch")
    cache.push(torch.randn(16, 4, generator=g), torch.arange(16) % 3)
    x, y = torch.randn(8, 4, generator=g), torch.arange(8) % 3
    memory, labels = cache.memory.clone(), cache.labels.clone()
    loss = cache(x, y)            # loss against the content, then x is pushed
    loss.backward()
    t2 = t.detach().clone().requires_grad_()
    want = nbkernels.nca_loss(x, y, ref_embeddings=memory, ref_labels=labels, temperature=t2,
                              metric=cache.metric, backend="torch")
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(t.grad, t2.grad)


def test_rows_beyond_the_memory_dtype_are_refused():
    """A finite row that the memory's dtype cannot hold (7e4 into fp16, 1e39 into fp32)
    would be stored as inf and drop out of every later loss and prediction: refused,
    naming the rows, nothing written; in range, the same batch is kept."""
    for dtype, big, src in ((torch.float16, 7e4, torch.float32),
                            (torch.float32, 1e39, torch.float64)):
        cache = nbkernels.NeighborCache(8, 2, 2, dtype=dtype)
        x = torch.tensor([[0.0, 1.0], [big, 0.0], [1.0, 0.0]], dtype=src)
        y = torch.tensor([0, 1, 0])
        with pytest.raises(ValueError, match=r"fit its .* memory.*rows \[1\]"):
            cache.push(x, y)
        assert len(cache) == 0
        x[1, 0] = 2.0
        with pytest.warns(UserWarning, match="rounded"):
            cache.push(x, y)
        assert len(cache) == 3 and bool(torch.isfinite(cache.memory[:3]).all())


def test_model_probs_must_be_floating():
    """Integer or bool model probabilities would turn the cache's into 0 or 1 in the mix."""
    cache = nbkernels.NeighborCache(8, 4, 3)
    cache.push(*_batch(6, seed=1))
    x, _ = _batch(2, seed=2)
    for probs in (torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.bool)):
        with pytest.raises(TypeError, match="model_probs must be a floating tensor"):
            cache.predict(x, model_probs=probs)
