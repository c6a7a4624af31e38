"""chunk_size and streamed banks: the chunked result equals the single-shot one.

Equality is to fp64 rounding, not bitwise: the chunks' partial states are merged in
another order than the single-shot pass accumulates its tiles (a few ulps, atol 1e-12).
Every output and gradient is also compared with backend="reference".
On a CUDA machine (NBK_TEST_DEVICE=cuda) the last test streams a CPU bank to the GPU.
"""
import functools
import os

import pytest
import torch

import nbkernels
from helpers import TOLERANCES, assert_match, make_batch, run

BACKENDS = ["torch", "reference"]
METRICS = ["sqeuclidean", "cosine", "dot"]
CHUNKS = [1, 4, 7, 40]  # M = 23: none divides it; 40 > M is one chunk
EXACT = dict(atol=1e-12, rtol=1e-12)  # fp64 rounding
DEVICE = os.environ.get("NBK_TEST_DEVICE", "cpu")


def _bank(dtype=torch.float64, seed=1):
    q, qy = make_batch(9, 6, 3, dtype=dtype, seed=seed)
    r, ry = make_batch(23, 6, 3, dtype=dtype, seed=seed + 1)
    qy[0] = 7  # no positive in the bank
    return q, qy, r, ry, torch.tensor(0.4, dtype=dtype)


def _nca(chunk, metric, reduction="none"):
    def fn(q, r, t, *, qy, ry, backend):
        return nbkernels.nca_loss(q, qy, ref_embeddings=r, ref_labels=ry, temperature=t,
                                  metric=metric, reduction=reduction, backend=backend,
                                  chunk_size=chunk)
    return fn


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_loss_chunked_equals_single_shot(backend, metric, chunk):
    q, qy, r, ry, t = _bank()
    for reduction in ("none", "mean"):
        def loss(*leaves, backend, chunk_size, reduction=reduction):
            return _nca(chunk_size, metric, reduction)(*leaves, qy=qy, ry=ry, backend=backend)

        got = run(functools.partial(loss, chunk_size=chunk), [q, r, t], backend)
        one = run(functools.partial(loss, chunk_size=None), [q, r, t], backend)
        ref = run(functools.partial(loss, chunk_size=None), [q, r, t], "reference")
        assert_match(got, one, **EXACT, what=f"{reduction} vs single shot")
        assert_match(got, ref, 1e-10, 1e-9, what=f"{reduction} vs reference")


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
def test_bank_loss_chunked_dtypes(dtype, atol, rtol):
    q, qy, r, ry, t = _bank(dtype)
    got = run(functools.partial(_nca(5, "sqeuclidean"), qy=qy, ry=ry), [q, r, t], "torch")
    leaves = [a.double() for a in (q, r, t)]
    ref = run(functools.partial(_nca(None, "sqeuclidean"), qy=qy, ry=ry), leaves, "reference")
    assert got[0].dtype == dtype
    assert_match(got, ref, atol, rtol, what=str(dtype))


@pytest.mark.parametrize("chunk", [1, 6, 11])
@pytest.mark.parametrize("metric", METRICS)
def test_batch_loss_chunked_uses_global_offset(metric, chunk):
    x, y = make_batch(17, 4, 3, seed=5)
    t = torch.tensor(0.3, dtype=torch.float64)

    def fn(x, t, *, backend, chunk_size):
        return nbkernels.nca_loss(x, y, temperature=t, metric=metric, reduction="sum",
                                  backend=backend, chunk_size=chunk_size)

    got = run(functools.partial(fn, chunk_size=chunk), [x, t], "torch")
    one = run(functools.partial(fn, chunk_size=None), [x, t], "torch")
    ref = run(functools.partial(fn, chunk_size=None), [x, t], "reference")
    assert_match(got, one, **EXACT, what="vs single shot")
    assert_match(got, ref, 1e-10, 1e-9, what="vs reference")


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_knn_chunked_equals_single_shot(backend, metric, exclude_self):
    q, _, r, ry, t = _bank()
    if exclude_self:
        q = r

    def fn(q, r, t, *, backend, chunk_size):
        return nbkernels.soft_knn_predict(q, r, ry, 4, temperature=t, metric=metric,
                                          exclude_self=exclude_self, backend=backend,
                                          chunk_size=chunk_size)

    for chunk in (3, 10):
        got = run(functools.partial(fn, chunk_size=chunk), [q, r, t], backend)
        one = run(functools.partial(fn, chunk_size=None), [q, r, t], backend)
        ref = run(functools.partial(fn, chunk_size=None), [q, r, t], "reference")
        assert_match(got, one, **EXACT, what=f"chunk {chunk} vs single shot")
        assert_match(got, ref, 1e-10, 1e-9, what=f"chunk {chunk} vs reference")


def test_mixed_dtypes_stream_in_the_promoted_dtype():
    q, qy, r, ry, _ = _bank()
    got = nbkernels.nca_loss(q.float(), qy, ref_embeddings=r, ref_labels=ry, chunk_size=5)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, nbkernels.nca_loss(q.float().double(), qy, ref_embeddings=r,
                                                       ref_labels=ry, backend="reference"))


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_chunked_cache_equals_cache(metric):
    kw = dict(temperature=0.3, metric=metric, dtype=torch.float64)
    chunked = nbkernels.NeighborCache(13, 4, 3, chunk_size=5, **kw)
    whole = nbkernels.NeighborCache(13, 4, 3, **kw)
    for step in range(3):  # the third push wraps around
        x, y = make_batch(6, 4, 3, seed=10 + step)
        xa, xb = (x.clone().requires_grad_() for _ in range(2))
        la, lb = chunked(xa, y), whole(xb, y)  # loss, then push: backward after the push
        la.backward()
        lb.backward()
        torch.testing.assert_close(la, lb, **EXACT)
        torch.testing.assert_close(xa.grad, xb.grad, **EXACT)
    q, _ = make_batch(5, 4, 3, seed=30)
    torch.testing.assert_close(chunked.predict(q), whole.predict(q), **EXACT)


def test_scale_options_are_validated():
    q, qy, r, ry, _ = _bank()
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        nbkernels.nca_loss(q, qy, ref_embeddings=r, ref_labels=ry, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        nbkernels.soft_knn_predict(q, r, ry, 3, chunk_size=2.0)
    with pytest.raises(ValueError, match="ref_embeddings must be on the queries' device"):
        nbkernels.nca_loss(q, qy, ref_embeddings=r.to("meta"), ref_labels=ry.to("meta"))
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        nbkernels.soft_knn_predict(q, r, ry.to("meta"), 3)
    with pytest.raises(ValueError, match="group was given with distributed=False"):
        nbkernels.nca_loss(q, qy, group=object())


@pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(),
                    reason="streams a CPU bank to a GPU: NBK_TEST_DEVICE=cuda on a CUDA machine")
@pytest.mark.parametrize("metric", METRICS)
def test_cpu_bank_streams_to_gpu(metric):
    q, qy, r, ry, _ = _bank(torch.float32)
    r, ry = r.pin_memory(), ry.pin_memory()
    qc = q.cuda().requires_grad_()
    rc = r.clone().requires_grad_()
    loss = nbkernels.nca_loss(qc, qy.cuda(), ref_embeddings=rc, ref_labels=ry,
                              temperature=0.4, metric=metric, chunk_size=5)
    loss.backward()
    q2, r2 = q.double().requires_grad_(), r.double().requires_grad_()
    want = nbkernels.nca_loss(q2, qy, ref_embeddings=r2, ref_labels=ry, temperature=0.4,
                              metric=metric, backend="reference")
    want.backward()
    torch.testing.assert_close(loss.double().cpu(), want, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(qc.grad.double().cpu(), q2.grad, atol=2e-4, rtol=2e-4)
    assert rc.grad.device.type == "cpu"
    torch.testing.assert_close(rc.grad.double(), r2.grad, atol=2e-4, rtol=2e-4)
    probs = nbkernels.soft_knn_predict(qc, r, ry, 3, temperature=0.4, metric=metric,
                                       chunk_size=7)
    torch.testing.assert_close(probs.double().cpu(), nbkernels.soft_knn_predict(
        q.double(), r.double(), ry, 3, temperature=0.4, metric=metric, backend="reference"),
        atol=2e-4, rtol=2e-4)
