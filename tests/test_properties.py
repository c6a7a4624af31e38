"""Property tests (hypothesis): the fused backend equals the reference on random
shapes, labels, metrics and temperatures; invariances of the loss."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nbkernels
import nbkernels.backends.torch_blocked as blocked

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 24))
    m = draw(st.integers(1, 24))
    d = draw(st.integers(1, 9))
    classes = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    r = torch.randn(m, d, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, classes, (n,), generator=g)
    ry = torch.randint(0, classes, (m,), generator=g)
    t = draw(st.sampled_from([0.01, 0.3, 2.0]))
    metric = draw(st.sampled_from(["sqeuclidean", "cosine", "dot"]))
    blocks = (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    return x, y, r, ry, t, metric, blocks


@SETTINGS
@given(problems())
def test_torch_backend_equals_reference(problem):
    x, y, r, ry, t, metric, blocks = problem
    old = blocked.BLOCK_M, blocked.BLOCK_N, blocked.BLOCK_SYM
    blocked.BLOCK_M, blocked.BLOCK_N = blocks
    blocked.BLOCK_SYM = blocks[0]
    try:
        for refs in (None, (r, ry)):
            kw = dict(temperature=t, metric=metric, reduction="none")
            if refs is not None:
                kw.update(ref_embeddings=refs[0], ref_labels=refs[1])
            xs = [x.clone().requires_grad_() for _ in range(2)]
            out = [nbkernels.nca_loss(xi, y, backend=b, **kw) for xi, b in
                   zip(xs, ["reference", "torch"])]
            torch.testing.assert_close(out[1], out[0], rtol=1e-7, atol=1e-8)
            grads = [torch.autograd.grad(o.sum(), xi)[0] for o, xi in zip(out, xs)]
            torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-8)
        p = nbkernels.soft_knn_predict(x, r, ry, 6, temperature=t, metric=metric, backend="torch")
        q = nbkernels.soft_knn_predict(x, r, ry, 6, temperature=t, metric=metric,
                                       backend="reference")
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)
    finally:
        blocked.BLOCK_M, blocked.BLOCK_N, blocked.BLOCK_SYM = old


@SETTINGS
@given(problems())
def test_loss_invariances(problem):
    x, y, r, ry, t, metric, _ = problem
    kw = dict(ref_embeddings=r, ref_labels=ry, temperature=t, metric=metric, reduction="none",
              backend="torch")
    base = nbkernels.nca_loss(x, y, **kw)
    assert (base >= -1e-9).all()  # -log of a probability
    # relabelling classes by a permutation changes nothing
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    kw_perm = dict(kw, ref_labels=perm[ry])
    torch.testing.assert_close(nbkernels.nca_loss(x, perm[y], **kw_perm), base)
    # shuffling the references changes nothing
    order = torch.randperm(r.shape[0], generator=torch.Generator().manual_seed(2))
    kw_shuf = dict(kw, ref_embeddings=r[order], ref_labels=ry[order])
    torch.testing.assert_close(nbkernels.nca_loss(x, y, **kw_shuf), base)
    if metric == "sqeuclidean":
        # translation invariance of distances
        shift = torch.randn(x.shape[1], dtype=torch.float64)
        kw_t = dict(kw, ref_embeddings=r + shift)
        torch.testing.assert_close(nbkernels.nca_loss(x + shift, y, **kw_t), base,
                                   rtol=1e-6, atol=1e-6)
