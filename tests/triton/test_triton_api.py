"""The public API with backend="triton" against backend="reference"."""
import pytest
import torch

import nbkernels

# (dtype, atol, rtol) for the loss / probabilities and the gradients
TOLS = [(torch.float64, 1e-10, 1e-10), (torch.float32, 2e-4, 2e-5)]


def _inputs(h, dtype, n=23, m=17, d=6, c=4):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).to(h.device)
    y = torch.randint(0, c, (n,), generator=g).to(h.device)
    ref = torch.randn(m, d, generator=g, dtype=torch.float64).to(dtype).to(h.device)
    ref_y = torch.randint(0, c, (m,), generator=g).to(h.device)
    t = torch.tensor(0.3, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                     device=h.device)
    return x, y, ref, ref_y, t


def _grads(fn, tensors):
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    out = fn(*leaves)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
    grads = torch.autograd.grad((out.reshape(-1) * weight).sum(), leaves)
    return out.detach(), grads


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine", "dot"])
@pytest.mark.parametrize("dtype, atol, rtol", TOLS)
def test_nca_loss(h, dtype, atol, rtol, metric):
    x, y, ref, ref_y, t = _inputs(h, dtype)
    for refs in ((), (ref,)):
        def loss(x, t, *refs, backend):
            kw = dict(ref_embeddings=refs[0], ref_labels=ref_y) if refs else {}
            return nbkernels.nca_loss(x, y, temperature=t, metric=metric, reduction="none",
                                      backend=backend, **kw)

        want, want_g = _grads(lambda *a: loss(*a, backend="reference"), (x, t, *refs))
        got, got_g = _grads(lambda *a: loss(*a, backend="triton"), (x, t, *refs))
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
        for a, b in zip(got_g, want_g):
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("dtype, atol, rtol", TOLS)
def test_soft_knn_predict(h, dtype, atol, rtol, exclude_self):
    x, _, ref, ref_y, t = _inputs(h, dtype, n=17)

    def probs(x, ref, t, backend):
        return nbkernels.soft_knn_predict(x, ref, ref_y, 4, temperature=t, metric="sqeuclidean",
                                          exclude_self=exclude_self, backend=backend)

    want, want_g = _grads(lambda *a: probs(*a, "reference"), (x, ref, t))
    got, got_g = _grads(lambda *a: probs(*a, "triton"), (x, ref, t))
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def test_prototype_loss(h):
    x, y, _, _, t = _inputs(h, torch.float64)
    protos = torch.randn(4, 6, dtype=torch.float64, device=h.device)

    def loss(x, p, t, backend):
        return nbkernels.prototype_loss(x, y, prototypes=p, temperature=t, metric="cosine",
                                        backend=backend)

    want, want_g = _grads(lambda *a: loss(*a, "reference"), (x, protos, t))
    got, got_g = _grads(lambda *a: loss(*a, "triton"), (x, protos, t))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_neighbor_cache(h):
    x, y, ref, ref_y, _ = _inputs(h, torch.float64)
    caches = {b: nbkernels.NeighborCache(12, 6, 4, backend=b, dtype=torch.float64,
                                         device=h.device) for b in ("reference", "triton")}
    for c in caches.values():
        with pytest.warns(UserWarning, match="last 12 rows"):
            c.push(ref, ref_y)  # 17 rows into 12 slots: keeps the last 12
    want, want_g = _grads(lambda q: caches["reference"].loss(q, y), (x,))
    got, got_g = _grads(lambda q: caches["triton"].loss(q, y), (x,))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got_g[0], want_g[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(caches["triton"].predict(x), caches["reference"].predict(x),
                               atol=1e-10, rtol=1e-10)
