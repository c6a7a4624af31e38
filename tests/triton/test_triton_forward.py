"""The lse forward's row shift (``kernels.neighbor_fwd_kernel``) against the fp64
oracle of tests/conformance/. The first reference tile sets each row's shift and later tiles
keep it without a per-pair max, moving it only when a tile's sum passes 2^64 (fp32;
2^512 fp64); a shift that lags so far that a term overflows, or a first tile with no
term, sends the row to the exact pass (flagged in ``redo``). The references come in
blocks of 128 (whole tiles under the interpreter's 16 and a GPU's 128), each block
farther from the queries than the next, so every later block sits far above the shift
the first tile set.
"""
import math
import types

import pytest
import torch

import launcher_cases as cases
from conformance import oracle_lse, upstream_lse
from conformance.oracle import oracle_rows

TOL = {torch.float64: 1e-9, torch.float32: 2e-5}


class Flags(list):
    order = None


@pytest.fixture
def flagged(monkeypatch):
    """The rows flagged for the exact pass (int8 (N,) padded: 1 both sums, 2 the
    positives' only) by each main-pass launch of the lse forward."""
    from nbkernels.backends.triton import kernels as tk
    seen, run = Flags(), tk.neighbor_fwd_kernel.run

    def spy(*args, **kw):
        if kw.get("POS_PASS"):
            # the exact pass: its row order beside the flags it reads
            seen.order = kw["perm"].clone()
        out = run(*args, **kw)
        if not kw.get("POS_PASS") and not kw.get("CLASS"):
            seen.append(kw["redo"].clone())
        return out
    monkeypatch.setattr(tk.neighbor_fwd_kernel, "run", spy)
    return seen


def _layout(h, gaps_sq, dtype, n=9, d=3, seed=0):
    """Queries near the origin; a block of 128 references at squared distance ~g for each
    g of gaps_sq (inf: at infinity), then 44 references near the queries."""
    g = torch.Generator().manual_seed(seed)
    m = 128 * len(gaps_sq) + 44
    q = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.3
    r = torch.randn(m, d, generator=g, dtype=torch.float64) * 0.3
    for i, gap in enumerate(gaps_sq):
        r[128 * i:128 * (i + 1), 0] += math.sqrt(gap)
    a = torch.randint(0, 3, (n,), generator=g)
    b = torch.randint(0, 3, (m,), generator=g)
    return types.SimpleNamespace(q=q.to(h.device, dtype), r=r.to(h.device, dtype),
                                 a=a.to(h.device), b=b.to(h.device),
                                 t=torch.tensor(1.0, dtype=dtype, device=h.device), c=3)


def _check(tb, h, case, offset=None, tol=None):
    want, _ = oracle_lse(case, "sqeuclidean", offset, *upstream_lse(case))
    got = tb.lse_forward(case.q, case.r, case.a, case.b, case.t, metric="sqeuclidean",
                         offset=offset, precision="ieee")
    shift = h.row_shift(case, "sqeuclidean")
    tol = tol or TOL[case.q.dtype]
    for name, x, y in (("lse_all", got[0] + shift, want[0]),
                       ("lse_pos", got[1] + shift, want[1])):
        h.close(x, y, tol, tol, msg=lambda m, name=name: f"{name}: {m}")
    return want


# squared-distance steps of 70 at T = 1 are ~2^101 each: the sum passes 2^64 at every
# step, and without moving the shift two steps (2^202) would overflow fp32
@pytest.mark.parametrize("dtype, gaps_sq, exact_pass", [
    (torch.float32, [140.0, 70.0], False),    # the shift moves twice; no row flagged
    (torch.float32, [120.0], True),           # one step of ~2^173: overflow, exact pass
    (torch.float64, [840.0, 420.0], False),   # steps of ~2^606 past fp64's 2^512
    (torch.float32, [float("inf")], True),    # a first tile without a term
    (torch.float64, [float("inf")], True),
])
def test_row_shift(tb, h, flagged, dtype, gaps_sq, exact_pass):
    case = _layout(h, gaps_sq, dtype)
    _check(tb, h, case)
    assert int(flagged[-1].sum()) == (case.q.shape[0] if exact_pass else 0), flagged


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [False, True])
def test_rows_without_a_positive_skip_the_exact_pass(tb, h, flagged, dtype, batch):
    """lse_pos = -inf is exact from the main pass where no reference shares the row's
    label (the launcher's count, less the excluded pair): such rows are not flagged,
    and rows whose positives do underflow still are."""
    case = _layout(h, [], dtype)
    dev = case.a.device
    if batch:
        # the references are the queries, the self pair excluded: rows 0 and 1 hold
        # labels no other row has; row 4's one positive is row 5, and row 5's is row 4
        case.r = case.q
        case.a = case.b = torch.tensor([7, 8, 0, 0, 1, 1, 2, 2, 0], device=dev)
        moved, none, under = 5, [0, 1], 4
    else:
        # rows 0-3: a label no reference has; row 5: one positive, reference 0
        case.b = torch.zeros_like(case.b)
        case.b[0] = 1
        case.a = torch.tensor([5, 5, 5, 5, 0, 1, 0, 0, 0], device=dev)
        moved, none, under = 0, [0, 1, 2, 3], 5
    offset = 0 if batch else None
    want = _check(tb, h, case, offset)
    assert torch.isneginf(want[1]).nonzero().flatten().tolist() == none
    assert torch.isfinite(want[0]).all()
    assert int(flagged[-1].sum()) == 0, flagged
    # move that one positive ~2^1300 below the row's nearest reference (T = 1), past both
    # floors: its row goes to the exact pass (in the batch, the moved row may too: its
    # own logits now spread over more than 2^64), the rows without a positive still not
    far = case.r.clone()
    far[moved, 0] += 30.0
    case.r = far
    if batch:
        case.q = far
    _check(tb, h, case, offset)
    # the positives' sum only (2): the exact pass redoes it over row 4's label alone
    assert flagged[-1][under] == 2 and not flagged[-1][none].any(), flagged
    # the exact pass takes the flagged rows first, then the others, each in row order
    rows = torch.arange(case.q.shape[0], device=dev)
    redo = flagged[-1][:case.q.shape[0]] != 0
    assert flagged.order.tolist() == rows[redo].tolist() + rows[~redo].tolist()


@pytest.mark.parametrize("dtype, gap_sq", [(torch.float32, 150.0), (torch.float64, 900.0)])
@pytest.mark.parametrize("batch", [False, True])
def test_positives_only_blocks(tb, h, flagged, dtype, gap_sq, batch):
    """Rows whose positives all sit far below their nearest reference (more than 2^64 in
    fp32, 2^960 in fp64, at T = 1) are flagged 2, and the exact pass redoes only their
    lse_pos, in blocks of their own over their labels' references (in label order,
    gathered). 40 labels, each with one row near the origin and a cluster of 4 rows at
    squared distance gap_sq in its own direction; 30 more near rows with labels of their
    own. The near rows of the 40 labels are flagged 2 (several blocks of rows under the
    interpreter's tiles), and every lse matches the fp64 oracle. Across batches the
    queries are those near rows and the references the rest (each of the 30 then has
    one near positive)."""
    case, offset, far = cases.far_positives(h.device, dtype, gap_sq, batch)
    # the far rows' logits and row shifts reach gap_sq / T in magnitude: a few of their
    # ulps on top of the usual tolerance
    _check(tb, h, case, offset, TOL[dtype] + 8 * torch.finfo(dtype).eps * gap_sq)
    # exactly those rows are flagged 2 (in the batch, rows of a far cluster whose first
    # tile holds none of their cluster overflow past the lagging shift: 1, both sums)
    n = case.q.shape[0]
    redo = flagged[-1][:n].cpu()
    assert torch.equal(redo == 2, far), redo
    # the exact pass's order: the rows flagged 1, then those flagged 2 by label, then the
    # others, each in row order
    rows = torch.arange(n)
    by_label = rows[redo == 2][torch.argsort(case.a.cpu()[redo == 2], stable=True)]
    assert flagged.order.cpu().tolist() == (rows[redo == 1].tolist() + by_label.tolist()
                                            + rows[redo == 0].tolist())


# what the Gluon main pass (``gluon_lse``) reads from the launch arguments, and writes
MAIN_PASS_ARGS = {"q", "r", "q_labels", "r_pack", "scale", "has_pos", "N", "M", "D", "offset",
                  "HAS_OFFSET", "lse_all", "lse_pos", "redo"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize("flag", [1, 2, 0])
def test_main_pass_seam(tb, h, dtype, flag):
    """``lse_forward_passes``' ``main``: a main pass in place of the Triton kernel's (the
    Gluon one of ``gluon_lse``) writes lse_all, lse_pos and redo, and the exact pass
    recomputes what it flags from the inputs alone. One that writes garbage and flags
    every row 1 must still give the fp64 oracle's lse on every row; flagged 2, lse_pos
    is recomputed and lse_all kept (written right here); flagged 0, both are kept (the
    exact pass touches no other row)."""
    case = _layout(h, [70.0], dtype, n=11)
    want = oracle_rows(case.q, case.r, case.a, case.b, case.t, 0, "dot", None)
    seen = {}

    def garbage(args, grid):
        seen.update(args)
        args["lse_all"].copy_(want[0]) if flag == 2 else args["lse_all"].fill_(123.0)
        args["lse_pos"].fill_(-7.0)
        args["redo"].fill_(flag)
    got = tb.lse_forward_passes(case.q, case.r, case.a, case.b, case.t, "dot", 0, False,
                                "ieee", main=garbage)
    assert MAIN_PASS_ARGS <= seen.keys()
    # 16-bit inputs get the packed column terms and labels the Gluon kernel loads
    assert (seen["r_pack"] is not None) == (dtype != torch.float64)
    if not flag:
        assert (got[0] == 123.0).all() and (got[1] == -7.0).all()
        return
    tol = TOL[h.acc_dtype(dtype)]
    for name, x, y in (("lse_all", got[0], want[0]), ("lse_pos", got[1], want[1])):
        h.close(x, y, tol, tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("flag", [1, 0])
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "cross"])
def test_class_main_pass_seam(tb, h, monkeypatch, flag, batch):
    """The class forward's main pass (kind "fwd_class_main", ``kernels.main_pass``; the
    Gluon one of ``gluon_class`` where opted in) in place of the Triton kernel's: it gets
    the launch arguments and, for the batch (``r is q``, the pair i = i excluded), the
    references' label order. One that writes garbage and flags every row and class tile
    must still give the fp64 oracle's yhat and lse_all on every row (the Triton exact
    pass recomputes them); flagged 0, what it wrote is kept."""
    from nbkernels.backends.triton import kernels as tk
    case = h.make_case(n=37, m=37 if batch else 41, d=5, c=3, dtype=torch.float32)
    if batch:
        case.r, case.b = case.q, case.a
    offset = 0 if batch else None
    seen = {}

    def garbage(args, grid, order):
        seen.update(args, order=order)
        # consistent garbage: each tile's sum its masses' (5 in each of its BLOCK_C columns)
        args["mass"].fill_(5.0)
        args["tile_max"].fill_(0.0)
        args["tile_sum"].fill_(5.0 * args["BLOCK_C"])
        args["redo"].fill_(flag)
    main_pass = tk.main_pass
    monkeypatch.setattr(tk, "main_pass", lambda args, kind="fwd_main":
                        garbage if kind == "fwd_class_main" else main_pass(args, kind))
    yhat, lse_all = tb.probs_forward(case.q, case.r, case.b, case.t, case.c, metric="dot",
                                     offset=offset, precision="ieee")
    assert {"q", "r", "r_col", "r_labels", "self_pos", "tile_ptr", "mass", "tile_max",
            "tile_sum", "redo", "BLOCK_C"} <= seen.keys()
    if batch:   # the label order the launcher sorted the references into
        assert torch.equal(seen["order"], torch.argsort(case.b, stable=True))
        torch.testing.assert_close(seen["r"], case.q[seen["order"]], rtol=0, atol=0)
    else:
        assert seen["order"] is None and seen["self_pos"] is None
    if not flag:   # every class tile's sum 5 BLOCK_C at max 0: yhat = 1 / (BLOCK_C tiles)
        total = seen["tile_max"].shape[1] * seen["BLOCK_C"]
        h.close(lse_all, torch.full_like(lse_all, math.log(5.0 * total)), 1e-6, 1e-6)
        h.close(yhat, torch.full_like(yhat, 1.0 / total), 1e-6, 1e-6)
        return
    want = oracle_rows(case.q.double(), case.r.double(), None, case.b, case.t.double(),
                       case.c, "dot", offset)
    tol = TOL[torch.float32]
    h.close(yhat, want[2].to(yhat), tol, tol, msg=lambda m: f"yhat: {m}")
    h.close(lse_all, want[0].to(lse_all), tol, tol, msg=lambda m: f"lse_all: {m}")


@pytest.mark.parametrize("temperature", [0.1, 0.05])
def test_class_tile_whose_first_tile_has_no_term(tb, h, temperature):
    """A class tile whose first reference tile holds only references at infinity (more
    than any BLOCK_N), then references whose terms all underflow under no shift (far
    from every query, low T): the main pass finds no anchor there and a sum of 0, which
    must send the row to the exact pass, not leave the class tile empty (16-bit inputs,
    the main pass with the lazy shift). Every row and class against the fp64 oracle."""
    dtype = torch.float16 if h.device == "cpu" else torch.bfloat16
    d = 8
    inf = torch.zeros(130, d, dtype=torch.float64)
    inf[:, 0] = float("inf")
    far = torch.zeros(20, d, dtype=torch.float64)
    far[:, 0], far[:, 1] = 10.0, torch.linspace(0.0, 1.0, 20)
    r = torch.cat([inf, far]).to(h.device, dtype)
    b = torch.cat([torch.zeros(130, dtype=torch.int64), torch.arange(20) % 2 + 1]).to(h.device)
    q = (torch.randn(7, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
         * 0.1).to(h.device, dtype)
    t = torch.tensor(temperature, dtype=torch.float32, device=h.device)
    yhat, lse_all = tb.probs_forward(q, r, b, t, 3, metric="sqeuclidean", offset=None)
    want = oracle_rows(q.double(), r.double(), None, b, t.double(), 3, "sqeuclidean", None)
    shift = cases.row_shift(types.SimpleNamespace(q=q, t=t), "sqeuclidean")
    # fp32 logits of magnitude |r|^2 / T: a few of their ulps, absolute on lse_all and
    # relative on yhat (before the fix: NaN rows)
    atol = 8 * torch.finfo(torch.float32).eps * float(far.square().sum(1).max()) / temperature
    h.close(yhat, want[2].to(yhat), atol, 0.0, msg=lambda m: f"yhat: {m}")
    h.close(lse_all + shift, want[0].to(lse_all), atol, 0.0, msg=lambda m: f"lse_all: {m}")


def test_class_probabilities_keep_their_precision_at_large_logits(tb, h):
    """The class tiles are merged relative to the row's largest anchor (``class_tiles``),
    not through lse_all = logsumexp(tile_max + log tile_sum), which rounds at the size of
    the logits: with logits near 1e4, exact in fp32 ("dot", D = 1, dyadic values), yhat
    was off by eps |logit| (4e-6) and its rows did not sum to 1. Every entry now within a
    few ulps of the fp64 oracle (of 1, the largest entry) and every row sums to 1 as
    closely."""
    q = torch.tensor([[100.0], [100.0], [-37.5]], device=h.device)
    r = torch.tensor([[100.0], [100.125], [99.875], [100.25], [99.5], [100.0]], device=h.device)
    b = torch.tensor([0, 1, 2, 0, 1, 2], device=h.device)
    eps = torch.finfo(torch.float32).eps
    for temperature in (1.0, 0.25):
        t = torch.tensor(temperature, device=h.device)
        yhat, _ = tb.probs_forward(q, r, b, t, 3, metric="dot", offset=None, precision="ieee")
        want = oracle_rows(q.double(), r.double(), None, b, t.double(), 3, "dot", None)[2]
        h.close(yhat, want.to(yhat), 8 * eps, 8 * eps,
                msg=lambda m: f"T={temperature} yhat: {m}")
        h.close(yhat.double().sum(1), torch.ones(3, dtype=torch.float64, device=h.device),
                4 * eps, 0.0, msg=lambda m: f"T={temperature} row sums: {m}")


def test_class_gradient_of_the_row_sums_is_zero(tb, h):
    """Each row of yhat sums to 1 (every label in [0, C)), so the gradient of sum(yhat) is
    0: the class backward's delta = sum_c g_c yhat_c cancels each pair's g_c = 1 only as
    closely as the forward's rows sum to 1. fp32, "dot", logits of a few hundred (T =
    0.05): before the class tiles were merged from their anchors and masses the rows were
    off by eps |logit| and dq by hundreds of ulps of |r| / T; now within a few."""
    g = torch.Generator().manual_seed(4)
    n, m, d, c = 45, 130, 8, 7
    q, r = (torch.randn(k, d, generator=g) * 3 for k in (n, m))
    b = torch.randint(0, c, (m,), generator=g)
    q, r, b = q.to(h.device), r.to(h.device), b.to(h.device)
    t = torch.tensor(0.05, device=h.device)
    yhat, lse_all = tb.probs_forward(q, r, b, t, c, metric="dot", offset=None, precision="ieee")
    dq, dr, _ = tb.probs_backward(q, r, b, t, yhat, lse_all, torch.ones_like(yhat),
                                  metric="dot", offset=None, need_q=True, need_r=True,
                                  need_t=False, precision="ieee")
    eps = torch.finfo(torch.float32).eps
    for name, grad, other in (("dq", dq, r), ("dr", dr, q)):
        bound = 16 * eps * other.abs().max().item() / t.item()
        assert grad.abs().max().item() <= bound, \
            f"{name}: {grad.abs().max().item():.3g} against {bound:.3g} (the gradient is 0)"
