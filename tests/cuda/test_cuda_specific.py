"""What only the cuda backend has: its registered ops (schemas and fake kernels), its fp64
fallback to backend "torch", agreement with the triton backend and torch.compile on a GPU.
Run as described in cuda_helpers.py."""
import pytest
import torch

from cuda_helpers import HELPERS, RUNNABLE, SKIP_REASON, cb, gpu_only  # noqa: F401 (fixture)

if not RUNNABLE:
    pytest.skip(SKIP_REASON, allow_module_level=True)

import nbkernels  # noqa: E402
from conformance import Launchers, upstream_lse, upstream_probs  # noqa: E402

DEV = HELPERS.device


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 5e-4, 1e-4),
                                               (torch.bfloat16, 2e-1, 1e-1)])
@gpu_only
def test_matches_triton(cb, dtype, atol, rtol):  # noqa: F811
    tb = pytest.importorskip("nbkernels.backends.triton")
    if not tb.is_available("cuda"):
        pytest.skip("triton cannot run here")
    case = HELPERS.make_case(n=300, m=517, d=96, c=11, dtype=dtype, scale=0.3, temperature=0.2)
    g_all, g_pos = upstream_lse(case)
    gp = upstream_probs(case)
    ours, theirs = Launchers(cb), Launchers(tb, precision="ieee")
    for got, want in ((ours.lse(case, "sqeuclidean", 1, g_all, g_pos),
                       theirs.lse(case, "sqeuclidean", 1, g_all, g_pos)),
                      (ours.probs(case, "dot", None, gp), theirs.probs(case, "dot", None, gp))):
        for k, (a, b) in enumerate(zip(got, want)):
            HELPERS.close(a, b.to(a.dtype), atol, rtol, msg=f"output #{k}")


def test_fp64_falls_back_to_torch(cb, monkeypatch):  # noqa: F811
    """The gateway (nbkernels.backends.get) runs fp64 on backend "torch", with a warning;
    the cuda launchers themselves refuse fp64."""
    from nbkernels import backends
    case = HELPERS.make_case(dtype=torch.float64)
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(UserWarning, match="float64"):
        assert backends.get("cuda", case.q.device, torch.float64) is backends.get(
            "torch", case.q.device, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        cb.lse_forward(case.q, case.q, case.a, case.a, case.t, metric="dot", offset=None)
    monkeypatch.setattr(backends, "_warned", set())  # warned once per process: again here
    with pytest.warns(UserWarning, match="float64"):
        got = nbkernels.nca_loss(case.q, case.a, temperature=case.t, backend="cuda")
    want = nbkernels.nca_loss(case.q, case.a, temperature=case.t, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@gpu_only
def test_compile_fullgraph(cb):  # noqa: F811
    case = HELPERS.make_case(n=9, m=7, d=5, c=3)

    def loss(q, r, t):
        lse_all, lse_pos = cb.lse_forward(q, r, case.a, case.b, t, metric="sqeuclidean", offset=0)
        yhat, _ = cb.probs_forward(q, r, case.b, t, 3, metric="dot", offset=None)
        return (lse_all - lse_pos).sum() + yhat.sum()

    want = loss(case.q, case.r, case.t)
    got = torch.compile(loss, fullgraph=True)(case.q, case.r, case.t)
    torch.testing.assert_close(got, want)


def test_fake_matches_real(cb):  # noqa: F811
    case = HELPERS.make_case(n=9, m=7, d=5, c=3)
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
