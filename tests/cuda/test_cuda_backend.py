"""backend="cuda" against the reference and the Triton backend, on every output and gradient.

GPU only, run by bench/gpu_check.sh after it builds the extension::

    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace
    NBK_TEST_DEVICE=cuda python -m pytest tests/cuda

or on a CPU, slowly, with the kernels' source emulated (emulation.py; no GPU, no nvcc)::

    NBK_CUDA_EMULATE=1 python -m pytest tests/cuda

Otherwise the module is skipped (the CPU suite checks the build in
tests/test_cuda_build.py); with NBK_TEST_DEVICE=cuda a missing extension fails every test
with the build instructions. Shapes are odd on purpose: partial query blocks (64 rows),
partial reference tiles (64), several feature chunks and dx slices (128 features for
fp16 / bf16, 64 for fp32), class tiles of 32.
"""
import os

import pytest
import torch

EMULATE = os.environ.get("NBK_CUDA_EMULATE") == "1"
if not EMULATE and (os.environ.get("NBK_TEST_DEVICE", "cpu") != "cuda"
                    or not torch.cuda.is_available()):
    pytest.skip("GPU only: NBK_TEST_DEVICE=cuda with a CUDA device (bench/gpu_check.sh), or "
                "NBK_CUDA_EMULATE=1", allow_module_level=True)

from cuda_helpers import HELPERS

import nbkernels

gpu_only = pytest.mark.skipif(EMULATE, reason="needs a GPU (or too slow emulated)")


@pytest.fixture(scope="module")
def cb():
    """The cuda backend module; fails (not skips) when the extension is not built."""
    from nbkernels.backends import cuda as cuda_backend
    if not EMULATE:
        assert cuda_backend.is_available("cuda"), cuda_backend.BUILD_HINT
        yield cuda_backend
        return
    import emulation
    with pytest.MonkeyPatch.context() as mp:
        emulation.install(mp, cuda_backend)
        yield cuda_backend


@pytest.fixture(scope="module")
def h():
    return HELPERS


# (dtype, atol, rtol) for lse / yhat and every gradient, against the fp64 reference on the
# same rounded inputs. fp32 runs as 3xTF32 (about fp32 accuracy); fp16 / bf16 round ds to
# the input dtype for the gradient product and return gradients in that dtype (as Triton).
TOLS = [
    (torch.float32, 2e-4, 2e-5),
    (torch.float16, 2e-2, 1e-2),
    (torch.bfloat16, 1.5e-1, 5e-2),
]
METRICS = ["sqeuclidean", "dot"]
DEV = HELPERS.device
OFFSETS = [None, 0, 3, -2]
F32 = (2e-4, 2e-5)


def upstream_lse(case, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = case.q.shape[0]
    return [torch.randn(n, generator=g, dtype=torch.float64).float().to(DEV) for _ in range(2)]


def upstream_probs(case, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(case.q.shape[0], case.c, generator=g, dtype=torch.float64).float().to(DEV)


def run_lse(mod, case, metric, offset, g_all, g_pos, need=(True, True, True)):
    lse_all, lse_pos = mod.lse_forward(case.q, case.r, case.a, case.b, case.t, metric=metric,
                                       offset=offset)
    grads = mod.lse_backward(case.q, case.r, case.a, case.b, case.t, lse_all, lse_pos, g_all,
                             g_pos, metric=metric, offset=offset, need_q=need[0],
                             need_r=need[1], need_t=need[2])
    return (lse_all, lse_pos, *grads)


def run_probs(mod, case, metric, offset, g, need=(True, True, True)):
    yhat, lse_all = mod.probs_forward(case.q, case.r, case.b, case.t, case.c, metric=metric,
                                      offset=offset)
    grads = mod.probs_backward(case.q, case.r, case.b, case.t, yhat, lse_all, g, metric=metric,
                               offset=offset, need_q=need[0], need_r=need[1], need_t=need[2])
    return (yhat, lse_all, *grads)


def check_lse(cb, h, case, metric, offset, atol, rtol):
    g_all, g_pos = upstream_lse(case)
    ref_all, ref_pos, *_ = h.ref_lse(case, metric, offset, g_all, g_pos)
    # rows without a term: -inf lse, and autograd gives no gradient there
    g_all = torch.where(torch.isinf(ref_all), 0.0, g_all)
    g_pos = torch.where(torch.isinf(ref_pos), 0.0, g_pos)
    ref_all, ref_pos, rdq, rdr, rdt = h.ref_lse(case, metric, offset, g_all, g_pos)
    lse_all, lse_pos, dq, dr, dt = run_lse(cb, case, metric, offset, g_all, g_pos)
    assert lse_all.dtype == lse_pos.dtype == torch.float32
    assert (dq.dtype, dr.dtype, dt.dtype) == (case.q.dtype, case.r.dtype, case.t.dtype)
    shift = h.row_shift(case, metric)
    h.close(lse_all + shift, ref_all, atol, rtol, msg="lse_all")
    h.close(lse_pos + shift, ref_pos, atol, rtol, msg="lse_pos")
    for name, got, want in (("dq", dq, rdq), ("dr", dr, rdr), ("dt", dt, rdt)):
        h.close(got, want, atol, rtol, msg=name)
    return lse_all, lse_pos, dq, dr, dt


def check_probs(cb, h, case, metric, offset, atol, rtol):
    g = upstream_probs(case)
    ref_y, ref_lse, rdq, rdr, rdt = h.ref_probs(case, metric, offset, g)
    yhat, lse_all, dq, dr, dt = run_probs(cb, case, metric, offset, g)
    assert yhat.dtype == lse_all.dtype == torch.float32 and yhat.shape == (case.q.shape[0], case.c)
    h.close(yhat, ref_y, atol, rtol, msg="yhat")
    h.close(lse_all + h.row_shift(case, metric), ref_lse, atol, rtol, msg="lse_all")
    for name, got, want in (("dq", dq, rdq), ("dr", dr, rdr), ("dt", dt, rdt)):
        h.close(got, want, atol, rtol, msg=name)
    return yhat, lse_all, dq, dr, dt


# ------------------------------------------------------------------------ lse


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype, atol, rtol", TOLS)
def test_lse_matches_reference(cb, h, dtype, atol, rtol, metric, offset):
    check_lse(cb, h, h.make_case(dtype=dtype), metric, offset, atol, rtol)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n, m, d", [(1, 1, 1), (1, 29, 3), (37, 1, 5), (64, 64, 16),
                                     (65, 130, 33), (130, 70, 64), (70, 130, 65), (100, 90, 130),
                                     (45, 67, 259)])
@pytest.mark.parametrize("dtype, atol, rtol", TOLS[:2])
def test_lse_shapes(cb, h, dtype, atol, rtol, n, m, d, metric):
    # D = 65 / 130 / 259: several feature chunks and dx slices; N, M = 1: no term at offset 0
    check_lse(cb, h, h.make_case(n=n, m=m, d=d, dtype=dtype, scale=0.5), metric, 0, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", TOLS)
def test_lse_many_blocks(cb, h, dtype, atol, rtol):
    n, m = (140, 200) if EMULATE else (777, 1029)
    case = h.make_case(n=n, m=m, d=128, c=20, dtype=dtype, scale=0.2, temperature=0.3)
    check_lse(cb, h, case, "sqeuclidean", 5, atol, rtol)


def test_lse_label_extremes(cb, h):
    n, m = 19, 23
    case = h.make_case(n=n, m=m, q_labels=torch.arange(n), r_labels=torch.arange(n, n + m))
    _, lse_pos, *_ = check_lse(cb, h, case, "dot", None, *F32)
    assert torch.isneginf(lse_pos).all()
    zeros = torch.zeros(n, dtype=torch.int64)
    case = h.make_case(n=n, m=n, q_labels=zeros, r_labels=zeros)
    lse_all, lse_pos, *_ = check_lse(cb, h, case, "sqeuclidean", 0, *F32)
    torch.testing.assert_close(lse_pos, lse_all, atol=1e-5, rtol=1e-6)


def test_lse_upstream_on_rows_without_terms_contributes_zero(cb, h):
    for n, m in ((11, 13), (1, 1)):
        a = torch.tensor([9, 9, 9] + [0, 1] * 4)[:n]
        case = h.make_case(n=n, m=m, c=2, q_labels=a)
        la, lp = cb.lse_forward(case.q, case.r, case.a, case.b, case.t, metric="sqeuclidean",
                                offset=0)
        g_all, g_pos = upstream_lse(case)
        clean = (torch.where(torch.isinf(la), 0.0, g_all), torch.where(torch.isinf(lp), 0.0, g_pos))
        dirty = (torch.where(torch.isinf(la), 1e30, g_all),
                 torch.where(torch.isinf(lp), float("inf"), g_pos))
        grads = [cb.lse_backward(case.q, case.r, case.a, case.b, case.t, la, lp, *g,
                                 metric="sqeuclidean", offset=0, need_q=True, need_r=True,
                                 need_t=True) for g in (dirty, clean)]
        for got, want in zip(*grads):
            assert torch.equal(got, want) and torch.isfinite(got).all()


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True), (True, False, True)])
def test_lse_need_flags(cb, h, need):
    case = h.make_case()
    g_all, g_pos = upstream_lse(case)
    g_pos = torch.zeros_like(g_pos)
    full = run_lse(cb, case, "sqeuclidean", 0, g_all, g_pos)[2:]
    part = run_lse(cb, case, "sqeuclidean", 0, g_all, g_pos, need=need)[2:]
    for wanted, got, want in zip(need, part, full):
        if wanted:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        else:
            assert got is None


def test_lse_strided_inputs_and_int32_labels(cb, h):
    for dtype, atol, rtol in TOLS[:2]:
        case = h.make_case(n=37, m=29, d=19, dtype=dtype)
        wide = torch.zeros(37, 38, dtype=dtype, device=DEV)
        wide[:, ::2] = case.q
        case.q = wide[:, ::2]
        case.r = case.r.T.contiguous().T
        case.a, case.b = case.a.to(torch.int32), case.b.to(torch.int32)
        assert not case.q.is_contiguous() and not case.r.is_contiguous()
        for metric in METRICS:
            check_lse(cb, h, case, metric, 3, atol, rtol)


# ---------------------------------------------------------------------- probs


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype, atol, rtol", TOLS)
def test_probs_matches_reference(cb, h, dtype, atol, rtol, metric, offset):
    check_probs(cb, h, h.make_case(dtype=dtype), metric, offset, atol, rtol)


@pytest.mark.parametrize("c", [1, 31, 33, 100, 4096])
def test_probs_class_tiles(cb, h, c):
    n, m = 70, 150
    g = torch.Generator().manual_seed(3)
    b = torch.randint(0, c, (m,), generator=g)
    b[:3] = torch.tensor([0, c - 1, c // 2])
    case = h.make_case(n=n, m=m, d=40, c=c, r_labels=b, scale=0.3)
    yhat, *_ = check_probs(cb, h, case, "sqeuclidean", 0, *F32)
    torch.testing.assert_close(yhat.sum(1), torch.ones_like(yhat[:, 0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n, m, d", [(1, 1, 1), (1, 29, 33), (37, 1, 3), (65, 130, 130)])
def test_probs_shapes(cb, h, n, m, d):
    check_probs(cb, h, h.make_case(n=n, m=m, d=d, scale=0.5), "dot", None, *F32)


def test_probs_row_without_references(cb, h):
    case = h.make_case(n=1, m=1, d=4, c=3)
    yhat, lse_all = cb.probs_forward(case.q, case.r, case.b, case.t, 3, metric="sqeuclidean",
                                     offset=0)
    assert torch.isneginf(lse_all).all() and torch.isnan(yhat).all()
    g = torch.full((1, 3), 5.0, device=DEV)
    for grad in cb.probs_backward(case.q, case.r, case.b, case.t, yhat, lse_all, g,
                                  metric="sqeuclidean", offset=0, need_q=True, need_r=True,
                                  need_t=True):
        assert torch.equal(grad, torch.zeros_like(grad))


# ------------------------------------------------------- against the Triton backend


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 5e-4, 1e-4),
                                               (torch.bfloat16, 2e-1, 1e-1)])
@gpu_only
def test_matches_triton(cb, h, dtype, atol, rtol):
    tb = pytest.importorskip("nbkernels.backends.triton")
    if not tb.is_available("cuda"):
        pytest.skip("triton cannot run here")
    case = h.make_case(n=300, m=517, d=96, c=11, dtype=dtype, scale=0.3, temperature=0.2)
    g_all, g_pos = upstream_lse(case)
    gp = upstream_probs(case)
    for got, want in ((run_lse(cb, case, "sqeuclidean", 1, g_all, g_pos),
                       run_lse(tb, case, "sqeuclidean", 1, g_all, g_pos)),
                      (run_probs(cb, case, "dot", None, gp), run_probs(tb, case, "dot", None, gp))):
        for k, (a, b) in enumerate(zip(got, want)):
            h.close(a, b.to(a.dtype), atol, rtol, msg=f"output #{k}")


# ------------------------------------------------------------------ public API


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine", "dot"])
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 2e-4, 2e-5),
                                               (torch.bfloat16, 1.5e-1, 5e-2)])
def test_public_api(cb, h, dtype, atol, rtol, metric):
    case = h.make_case(n=45, m=33, d=24, c=4, dtype=dtype, scale=0.5)

    def grads(backend):
        x = case.q.detach().clone().requires_grad_()
        ref = case.r.detach().clone().requires_grad_()
        t = case.t.detach().clone().requires_grad_()
        outs = [nbkernels.nca_loss(x, case.a, temperature=t, metric=metric, backend=backend),
                nbkernels.nca_loss(x, case.a, ref_embeddings=ref, ref_labels=case.b,
                                   temperature=t, metric=metric, backend=backend),
                nbkernels.soft_knn_predict(x, ref, case.b, 4, temperature=t, metric=metric,
                                           exclude_self=False, backend=backend)]
        total = outs[0] + outs[1] + (outs[2] * torch.linspace(-1, 1, outs[2].numel(),
                                                              device=DEV).view_as(outs[2])).sum()
        return [o.detach() for o in outs] + list(torch.autograd.grad(total, (x, ref, t)))

    for k, (got, want) in enumerate(zip(grads("cuda"), grads("reference"))):
        h.close(got.double(), want.double(), atol, rtol, msg=f"output #{k}")


def test_fp64_falls_back_to_torch(cb, h):
    case = h.make_case(dtype=torch.float64)
    cb._warned_fp64 = False
    with pytest.warns(UserWarning, match="float64"):
        got = nbkernels.nca_loss(case.q, case.a, temperature=case.t, backend="cuda")
    want = nbkernels.nca_loss(case.q, case.a, temperature=case.t, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


# --------------------------------------------------------- determinism, compile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(cb, h, dtype):
    n, m = (130, 150) if EMULATE else (1000, 1100)
    case = h.make_case(n=n, m=m, d=128, c=50, dtype=dtype, scale=0.2, temperature=0.1)
    g_all, g_pos = upstream_lse(case)
    gp = upstream_probs(case)
    for fn in (lambda: run_lse(cb, case, "sqeuclidean", 0, g_all, g_pos),
               lambda: run_probs(cb, case, "dot", None, gp)):
        first = fn()
        for _ in range(2):
            for a, b in zip(fn(), first):
                assert torch.equal(a, b)


@gpu_only
def test_compile_fullgraph(cb, h):
    case = h.make_case(n=9, m=7, d=5, c=3)

    def loss(q, r, t):
        lse_all, lse_pos = cb.lse_forward(q, r, case.a, case.b, t, metric="sqeuclidean", offset=0)
        yhat, _ = cb.probs_forward(q, r, case.b, t, 3, metric="dot", offset=None)
        return (lse_all - lse_pos).sum() + yhat.sum()

    want = loss(case.q, case.r, case.t)
    got = torch.compile(loss, fullgraph=True)(case.q, case.r, case.t)
    torch.testing.assert_close(got, want)


def test_fake_matches_real(cb, h):
    case = h.make_case(n=9, m=7, d=5, c=3)
    q, r, a, b, t = case.q, case.r, case.a, case.b, case.t
    n, m = q.shape[0], r.shape[0]
    qn, rn = q.square().sum(1), r.square().sum(1)
    lse, g = torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    labels, perm = torch.sort(b)
    tile_ptr = torch.tensor([0, m], device=DEV)
    gc = torch.randn(n, 3, device=DEV)
    ops = torch.ops.nbkernels
    cases = [
        (ops.cuda_lse_fwd, (q, r, a, b, t, rn, True, 0, True)),
        (ops.cuda_class_fwd, (q, r, labels, perm, tile_ptr, t, rn, 3, cb.CLASS_TILE, False, 0,
                              False)),
        (ops.cuda_bwd, (q, r, a, b, t, qn, rn, lse, lse, g, g, None, None, True, 2, True, False,
                        True, True)),
        (ops.cuda_bwd, (q, r, None, b, t, qn, rn, lse, None, None, None, gc, g, False, 0, False,
                        True, True, False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))
