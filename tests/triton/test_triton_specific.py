"""What only the triton backend has: the ``precision`` of fp32 logit dots (tf32, tf32x3)
and its default, which follows torch's matmul setting; launchers that take C = 0."""
import pytest
import torch

from conformance import TOL, Launchers, check_probs, upstream_lse


def test_fp32_dot_precisions(tb, h):
    # tf32 / tf32x3 change only the logit dot of fp32 inputs; the interpreter computes all
    # of them in fp32, a GPU rounds tf32 operands to 10 mantissa bits
    case = h.make_case(dtype=torch.float32)
    g_all, g_pos = upstream_lse(case)
    exact = Launchers(tb, precision="ieee").lse(case, "dot", None, g_all, g_pos)[2:]
    for precision, atol, rtol in (("tf32x3", 2e-4, 2e-5), ("tf32", 5e-2, 2e-2)):
        got = Launchers(tb, precision=precision).lse(case, "dot", None, g_all, g_pos)[2:]
        for x, y in zip(got, exact):
            torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="torch without the fp32_precision API")
def test_default_precision_follows_torch(tb):
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        for setting, want in (("tf32", "tf32"), ("ieee", "ieee")):
            matmul.fp32_precision = setting
            assert tb._default_precision() == want
    finally:
        matmul.fp32_precision = saved


def test_bad_precision(tb, h):
    case = h.make_case(n=3, m=3)
    with pytest.raises(ValueError, match="precision"):
        tb.lse_forward(case.q, case.r, case.a, case.b, case.t, metric="dot", offset=None,
                       precision="fp8")


def test_no_classes(tb, h):
    # C = 0 (the API asks for C >= 1): yhat is empty, lse_all still sums every reference
    zeros = torch.zeros(11, dtype=torch.int64)
    case = h.make_case(n=9, m=11, d=5, c=0, dtype=torch.float64, q_labels=zeros[:9],
                       r_labels=zeros)
    yhat, _, *grads = check_probs(Launchers(tb, precision="ieee"), case, "dot", None,
                                  *TOL[torch.float64])
    assert yhat.shape == (9, 0)
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


def test_class_forward_redoes_rows_whose_anchor_lagged(tb, h, monkeypatch):
    """The class forward's main pass keeps each row's first-tile anchor (no per-pair max)
    where its logit dot is an MMA (16-bit inputs here): a later reference tile whose
    logits pass it by more than 128 binades overflows, and the row must be redone
    exactly. Here class 0's references in label order start with far ones (a whole first
    tile and more) and end with near ones: every query's main pass overflows, the exact
    pass runs for it, and yhat and lse_all match the fp64 oracle. fp64 (FMA logit dots)
    takes each tile's max in its main pass and flags nothing."""
    from nbkernels.backends.triton import kernels as tk
    from conformance import oracle_probs
    import types
    n, far, near, d = 5, 150, 40, 4
    g = torch.Generator().manual_seed(3)
    q = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.1
    r = torch.cat([torch.randn(far, d, generator=g, dtype=torch.float64) * 0.1 + 3.0,
                   torch.randn(near, d, generator=g, dtype=torch.float64) * 0.1,
                   torch.randn(30, d, generator=g, dtype=torch.float64) * 0.1 + 1.0])
    b = torch.cat([torch.zeros(far + near, dtype=torch.int64), torch.ones(30, dtype=torch.int64)])
    t = 0.02   # far logits ~ -9 D / T = -1800, near ~ 0: 2600 binades apart
    flagged = []
    launch = tk.launch

    def spy(kind, grid, **args):
        if kind == "fwd_class" and args.get("POS_PASS"):
            flagged.append(int(args["redo"].sum()))
        return launch(kind, grid, **args)
    monkeypatch.setattr(tk, "launch", spy)
    for dtype, atol in ((torch.float16, 1e-3), (torch.float64, 1e-9)):
        case = types.SimpleNamespace(q=q.to(h.device, dtype), r=r.to(h.device, dtype),
                                     a=torch.zeros(n, dtype=torch.int64, device=h.device),
                                     b=b.to(h.device), c=2,
                                     t=torch.tensor(t, dtype=dtype, device=h.device))
        yhat, lse_all = tb.probs_forward(case.q, case.r, case.b, case.t, 2, metric="sqeuclidean",
                                         offset=None, precision="ieee")
        gc = torch.zeros(n, 2, dtype=torch.float64)
        want = oracle_probs(case, "sqeuclidean", None, gc)
        assert torch.isfinite(yhat).all() and torch.isfinite(lse_all).all()
        torch.testing.assert_close(yhat.double().cpu(), want[0].cpu(), atol=atol, rtol=atol)
        shift = h.row_shift(case, "sqeuclidean")
        torch.testing.assert_close((lse_all + shift).double().cpu(), want[1].cpu(), atol=atol,
                                   rtol=atol)
    assert flagged == [n, 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_class_forward_vectors_cover_its_unmasked_tiles(tb, h, monkeypatch, dtype):
    """The class forward's reference tiles start wherever a class tile does and load the
    column terms and labels unmasked: both vectors must run a whole tile (PAD, the widest)
    past M, with -inf and -1 there, and the columns past a class tile (the next class
    tile's references, or that padding) must weigh nothing. M = PAD here, the case
    without the ordinary padding; 100 classes, the references of class 2 (sorted 0 to
    44) in one class tile and those of 70 and 99 in later ones, so that the first tile's
    last reference tile reaches into the next class tile's references and the last
    one's runs past M whatever BLOCK_N; self pairs excluded."""
    from nbkernels.backends.triton import kernels as tk
    m = tk.PAD
    seen = []
    launch = tk.launch

    def spy(kind, grid, **args):
        if kind == "fwd_class":
            seen.append((args["r_col"].cpu(), args["r_labels"].cpu(), args["tile_ptr"].cpu()))
        return launch(kind, grid, **args)
    monkeypatch.setattr(tk, "launch", spy)
    labels = torch.cat([torch.full((45,), 2), torch.full((41,), 99), torch.full((m - 86,), 70)])
    case = h.make_case(n=m, m=m, d=5, c=100, dtype=dtype, r_labels=labels,
                       q_labels=labels.roll(7))
    check_probs(Launchers(tb, precision="ieee"), case, "sqeuclidean", 0, *TOL[dtype])
    assert seen
    for col, lab, ptr in seen:
        # the premise (class tiles 16 or 64 wide): references [0, 45) in one class tile,
        # the rest in later ones, the last starting at an odd reference and ending at M
        spans = [(a, b) for a, b in zip(ptr[:-1].tolist(), ptr[1:].tolist()) if b > a]
        assert spans[0] == (0, 45) and len(spans) >= 2
        assert spans[-1][1] == m and (m - spans[-1][0]) % 2 == 1
        assert col.shape[0] >= m + tk.PAD and lab.shape[0] >= m + tk.PAD
        assert (col[m:] == float("-inf")).all() and (lab[m:] == -1).all()
        assert torch.isfinite(col[:m]).all() and (lab[:m] >= 0).all()
