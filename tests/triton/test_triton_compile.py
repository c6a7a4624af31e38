"""The launchers as torch.library custom ops: fake implementations and torch.compile."""
import pytest
import torch


def _case(h):
    return h.make_case(n=9, m=7, d=5, c=3, dtype=torch.float32)


def test_compile_fullgraph(tb, h):
    case = _case(h)

    def loss(q, r, t):
        lse_all, lse_pos = tb.lse_forward(q, r, case.a, case.b, t, metric="sqeuclidean", offset=0)
        return (lse_all - lse_pos).sum()

    want = loss(case.q, case.r, case.t)
    got = torch.compile(loss, fullgraph=True)(case.q, case.r, case.t)
    torch.testing.assert_close(got, want)


def _op_args(case):
    """Positional arguments of each nbkernels::triton_* op, as the launchers pass them."""
    q, r, a, b, t = case.q, case.r, case.a, case.b, case.t
    lse = torch.randn(q.shape[0], device=q.device)
    g = torch.randn(q.shape[0], device=q.device)
    yhat = torch.softmax(torch.randn(q.shape[0], case.c, device=q.device), 1)
    gc = torch.randn(q.shape[0], case.c, device=q.device)
    return {
        "triton_lse_fwd": (q, r, a, b, t, "sqeuclidean", 0, True, "ieee"),
        "triton_probs_fwd": (q, r, b, t, case.c, "dot", 0, False, "ieee"),
        "triton_lse_bwd": (q, r, a, b, t, lse, lse, g, g, "sqeuclidean", 2, True, False, True, False,
                           True, "ieee"),
        # the batch loss's one symmetric kernel (r is q, one label vector)
        "triton_lse_bwd_sym": (q, q, a, a, t, lse, lse, g, g, "sqeuclidean", 0, True, True, True,
                               True, True, "ieee"),
        "triton_probs_bwd": (q, r, b, t, yhat, lse, gc, "dot", 0, False, False, True, True, "ieee"),
    }


@pytest.mark.parametrize("name", ["triton_lse_fwd", "triton_probs_fwd", "triton_lse_bwd",
                                  "triton_lse_bwd_sym", "triton_probs_bwd"])
def test_fake_matches_real(tb, h, name):
    # schema, fake (meta) implementation and registration checks of torch.library
    args = _op_args(_case(h))[name]
    op = name.removesuffix("_sym")
    torch.library.opcheck(getattr(torch.ops.nbkernels, op).default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_training_step_equals_eager(h, compiler):
    """The public API with backend="triton", forward and backward, under
    torch.compile(fullgraph=True): loss and parameter gradients equal eager ones."""
    import nbkernels

    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):   # weights independent of earlier tests
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 4).to(h.device)
    x = torch.randn(21, 6, generator=g).to(h.device)
    y = torch.randint(0, 3, (21,), generator=g).to(h.device)

    def step(x, y):
        emb = model(x)
        return (nbkernels.nca_loss(emb, y, temperature=0.5, backend="triton")
                + nbkernels.prototype_loss(emb, y, metric="cosine", backend="triton")
                + nbkernels.soft_knn_predict(emb, emb, y, 3, exclude_self=True,
                                             backend="triton")[:, 0].sum())

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend=compiler)):
        model.zero_grad()
        loss = fn(x, y)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    # inductor fuses and reassociates the fp32 work around the kernels (the linear layer,
    # the normalization, the class means): a few ulps of the largest gradient (~10 here,
    # seen up to 2e-5 across weight seeds)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5 * max(1.0, want.abs().max().item()),
                                   rtol=1e-5)
