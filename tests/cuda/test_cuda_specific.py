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


def test_reference_gradients_recompute_the_forwards_logits(cb):  # noqa: F811
    """The dr kernel holds the references as its own rows: its fp32 dots (three TF32
    passes) add the two correction products in the forward's order, so its logits are the
    forward's to the last bit. At T = 1e-4, with positives ~100 away in squared distance,
    a logit off by an ulp is off by 2/T ulps, and p = exp(s - lse) by as much: dr was 6e-3
    of its largest entry off (dT, which that kernel gives when q needs none, 1.3e-3).
    Against the fp64 formula's autograd."""
    g = torch.Generator().manual_seed(0)
    k, per = 15, 3
    near = torch.randn(60 - k * per, 3, generator=g, dtype=torch.float64) * 0.3
    centre = torch.nn.functional.normalize(torch.randn(k, 3, generator=g, dtype=torch.float64),
                                           dim=1)
    far = (centre * 10).repeat_interleave(per, 0) + torch.randn(k * per, 3, generator=g,
                                                                dtype=torch.float64) * 0.3
    labels = torch.cat([torch.arange(near.shape[0]) + 1000, torch.arange(k).repeat_interleave(per)])
    labels[:k] = torch.arange(k)
    perm = torch.randperm(60, generator=g)
    x, labels = torch.cat([near, far])[perm], labels[perm]
    x = x - x[:25].mean(0)          # centred, as kernel_inputs centres sqeuclidean rows
    q, r, a, b = x[:25], x[25:], labels[:25], labels[25:]
    w = torch.randn(25, generator=g, dtype=torch.float64)
    t = 1e-4
    q64, r64, t64 = (v.clone().requires_grad_() for v in (q, r, torch.tensor(t, dtype=torch.float64)))
    s = -((q64[:, None] - r64[None]) ** 2).sum(-1) / t64
    lp = torch.logsumexp(s.masked_fill(a[:, None] != b[None, :], float("-inf")), 1)
    ok = torch.isfinite(lp)
    want = torch.autograd.grad((w * torch.logsumexp(s, 1)).sum() - (w[ok] * lp[ok]).sum(),
                               (r64, t64))
    qd, rd, ad, bd = (v.to(DEV) for v in (q.float(), r.float(), a, b))
    td, wd = torch.tensor(t, device=DEV), w.float().to(DEV)
    la, lpos = cb.lse_forward(qd, rd, ad, bd, td, metric="sqeuclidean", offset=None)
    _, dr, dt = cb.lse_backward(qd, rd, ad, bd, td, la, lpos, wd, -wd, metric="sqeuclidean",
                                offset=None, need_q=False, need_r=True, need_t=True)
    err = (dr.double().cpu() - want[0]).abs().max() / want[0].abs().max()
    assert err < 1e-6, f"dr: {float(err):.2g} of its largest entry"
    assert abs(float(dt) / float(want[1]) - 1) < 1e-5, (float(dt), float(want[1]))
