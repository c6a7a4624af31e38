"""The loss forward's Gluon main pass for sm_90 (``nbkernels.backends.triton.gluon_lse``,
the opt-in variant "sm90_gluon" of kind "fwd_main"; Gluon has no interpreter, so only a
GPU runs it: tests/triton/test_gluon_main.py): what the CPU can check. The arguments it
refuses, with the reason; where the launcher takes it (opted in, on sm_90, not
interpreted); the form ``FORMS`` gives this triton is the one bench/gluon_fwd.py's
results JSON records as the latency model's fastest; and that form compiles for sm_90
without a spill, its dots on HGMMA, one exp2 per pair, and its simulated cycles per tile
within 10 % of the committed figure (regenerate the JSON with ``python
bench/gluon_fwd.py`` when a change is meant to move it); and it hands the kernel,
parameter by parameter, the launch arguments of the seam it plugs into
(``lse_forward_passes``' ``main``, itself checked under the interpreter in
tests/triton/test_triton_forward.py)."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench.sass import build  # noqa: E402

REASON = build.unavailable_reason()
if REASON:
    pytest.skip(f"static SASS model unavailable: {REASON}", allow_module_level=True)
try:
    import gluon_fwd as G  # noqa: E402

    from nbkernels.backends.triton import gluon_lse as L  # noqa: E402
except ImportError as e:  # a triton before Gluon
    pytest.skip(f"no Gluon in this triton: {e}", allow_module_level=True)


def _results():
    path = G.results_path()
    if not path.exists():
        pytest.skip(f"no {path.name} for triton {L.VERSION} (python bench/gluon_fwd.py)")
    return json.loads(path.read_text())


def _args(dtype=torch.bfloat16, n=4096, m=4096, d=128, offset=0, has_offset=True,
          transposed=False, r_stride=None):
    q = torch.empty(d, n, dtype=dtype, device="meta").t() if transposed else \
        torch.empty(n, d, dtype=dtype, device="meta")
    r = q if m == n else torch.empty(m, d, dtype=dtype, device="meta")
    if r_stride:
        r = torch.empty(m, r_stride, dtype=dtype, device="meta")[:, :d]
    return dict(q=q, r=r, N=n, M=m, D=d, offset=offset, HAS_OFFSET=has_offset)


@pytest.mark.parametrize("kw, why", [
    (dict(dtype=torch.float32), "bf16 / fp16 rows of D = 128"),
    (dict(d=64), "D = 128, got torch.bfloat16 D = 64"),
    (dict(transposed=True), "unit feature stride"),
    (dict(offset=3), "offset 0"),
    (dict(n=4096, m=2048), "N <= M"),
    (dict(n=100, m=200, has_offset=False), "two reference tiles"),
    (dict(r_stride=129), "16-byte aligned"),
])
def test_refuses_what_it_cannot_take(kw, why):
    assert L.why_not(_args()) is None
    assert L.why_not(_args(has_offset=False, n=4096, m=2048)) is None
    assert why in L.why_not(_args(**kw))
    with pytest.raises(ValueError, match="the Gluon main pass"):
        L.main_pass(_args(**kw), None)


def test_launcher_takes_it_where_chosen_and_it_takes_the_arguments(monkeypatch):
    """``kernels.main_pass``: the Gluon main pass where kind "fwd_main" chooses it (on
    sm_90, opted in: tests/test_variants.py) and it takes the arguments; else None, the
    Triton main pass (as on this CPU, even opted in)."""
    from nbkernels.backends import variants
    from nbkernels.backends.triton import kernels as tk
    monkeypatch.setenv("NBK_VARIANTS", "sm90_gluon")
    cpu = dict(_args(), q=torch.empty(4096, L.D, dtype=torch.bfloat16))
    assert tk.main_pass(cpu) is None
    gluon = next(v for v in tk.VARIANTS if v.name == "sm90_gluon")
    monkeypatch.setattr(variants, "capability", lambda device: (9, 0))
    choose = tk.choose
    monkeypatch.setattr(tk, "choose", lambda kind, device, precision=None: gluon
                        if kind == "fwd_main" else choose(kind, device, precision))
    assert tk.main_pass(_args()) is L.main_pass
    assert tk.main_pass(_args(dtype=torch.float32)) is None
    assert tk.main_pass(_args(offset=3)) is None


def test_narrow_form_refuses_offsets_past_int32():
    big = _args(n=256, m=2 ** 24, has_offset=False)
    narrow, wide = L.Form(128, 8, False, False), L.Form(128, 8, False, True)
    assert "int32" in L.why_not(big, narrow) and L.why_not(big, wide) is None


def test_runs_on_an_sm90_gpu_only():
    x = torch.zeros(256, 128, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="sm_90"):
        G.nca_rows(x, torch.zeros(256, dtype=torch.int64), 0.1)


def test_form_is_the_recorded_best():
    res = _results()
    assert L.form().name == res["best"] == res["chosen"]
    # and the fallback for arguments the ORDERED forms do not take: the best in row order
    row = min((r for r in res["forms"] if not r["form"].get("ordered")),
              key=lambda r: r["predicted_latency_model"]["time_s"])
    assert (L.ROW_FORMS.get(L.VERSION) or L.ROW_FORMS[max(L.ROW_FORMS)]).name == row["name"]
    # and the first of the forms bench/gpu_perf.py times
    import _gluon_rows
    assert _gluon_rows.candidates(1)[0][1] == L.form().name


def test_form_compiles_clean():
    from bench.sass import sass
    f = L.form()
    cubin, name, _, _ = G.compile_sm90(f)
    assert sass.resource_usage(cubin)[name]["local"] == 0
    got = G.modelled(f)
    assert "HGMMA" in got["loop"]
    # one exp2 per pair (64 per thread and tile) and the per-row rescale's
    assert got["exps_under_mma"][1] <= f.block_m * L.BLOCK_N / (32 * f.num_warps) + 2
    want = next(r for r in _results()["forms"] if r["name"] == f.name)
    assert got["cycles_per_tile"] <= 1.1 * want["cycles_per_tile"], (got, want)


def _recorded(monkeypatch, module, name):
    """Kernel ``module.name`` replaced by a recorder: the list of its launches, each
    (grid, {parameter name: argument}, keyword options); nothing runs."""
    calls = []
    names = [p.name for p in getattr(module, name).params]

    def launch(grid):
        return lambda *args, **kw: calls.append((grid, dict(zip(names, args)), kw))
    monkeypatch.setattr(module, name,
                        type("Kernel", (), {"__getitem__": lambda self, grid: launch(grid)})())
    return calls


def test_main_pass_hands_the_kernel_the_launchers_arguments(monkeypatch):
    """What ``main_pass`` passes the kernel, bound to its parameter names, against the
    launch arguments ``lse_forward_passes`` gives a main pass (bf16 rows, D = 128, the
    batch): the same tensors, sizes and strides, and the form's constants (a GPU is the
    first to run the kernel itself)."""
    from nbkernels import kernel_inputs
    from nbkernels.backends.triton import forward
    from nbkernels.backends.triton import kernels as tk
    # the arguments only: no Triton launch (the exact pass) on this machine
    monkeypatch.setattr(tk, "launch", lambda *args, **kw: None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, L.D, generator=g).to(torch.bfloat16)
    y = torch.randint(0, 7, (300,), generator=g)
    q, _, kmetric = kernel_inputs.prepare(x, x, "sqeuclidean")
    seen = {}
    forward.lse_forward_passes(q, q, y, y, torch.tensor(0.1), kmetric, 0, True, "ieee",
                               main=lambda args, grid: seen.update(args))
    calls = _recorded(monkeypatch, L, "lse_main_sm90")
    f = L.Form(128, 8, False, True)
    L.main_pass(seen, None, f)
    (grid, bound, kw), = calls
    assert grid == (3,) and kw == {"num_warps": 8}
    for name, key in (("q", "q"), ("r", "r"), ("q_labels", "q_labels"), ("pack", "r_pack"),
                      ("scale", "scale"), ("has_pos", "has_pos"), ("lse_all", "lse_all"),
                      ("lse_pos", "lse_pos"), ("redo", "redo")):
        assert bound[name] is seen[key], name
    assert (bound["N"], bound["M"], bound["s_qn"], bound["s_rn"]) == (300, 300, L.D, L.D)
    assert (bound["BLOCK_M"], bound["BLOCK_N"], bound["D"]) == (128, L.BLOCK_N, L.D)
    assert (bound["DIAG"], bound["AFTER"], bound["WIDE"]) == (True, False, True)
    # the packed terms are the launcher's: column term high, label rank low
    w = bound["pack"][:300]
    assert torch.equal((w & 0xFFFFFFFF).to(torch.int32), seen["r_labels"][:300])


def _lse_args(n, m, classes, batch, offset=None, seed=0):
    """The launch arguments ``lse_forward_passes`` hands a main pass (bf16, D = 128)."""
    from nbkernels import kernel_inputs
    from nbkernels.backends.triton import forward
    from nbkernels.backends.triton import kernels as tk
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L.D, generator=g).to(torch.bfloat16)
    y = torch.randint(0, classes, (n,), generator=g)
    r, ry = (x, y) if batch else (torch.randn(m, L.D, generator=g).to(torch.bfloat16),
                                  torch.randint(0, classes + 3, (m,), generator=g))
    q, rk, kmetric = kernel_inputs.prepare(x, r, "sqeuclidean")
    seen = {}
    old, tk.launch = tk.launch, (lambda *args, **kw: None)   # no Triton exact pass here
    try:
        forward.lse_forward_passes(q, rk, y, ry, torch.tensor(0.1), kmetric,
                                   0 if batch else offset, batch or offset is not None, "ieee",
                                   main=lambda args, grid: seen.update(args))
    finally:
        tk.launch = old
    return seen


@pytest.mark.parametrize("n, m, classes, batch, block_m", [
    (300, 300, 7, True, 128), (517, 517, 40, True, 64), (300, 650, 5, False, 128),
    (260, 1030, 90, False, 64), (129, 129, 1, True, 128)])
def test_label_order_streams_every_positive_and_excluded_pair_first(n, m, classes, batch,
                                                                    block_m):
    """The ORDERED form's inputs (``in_label_order``): the queries and references sorted
    by label (their padding kept), each query's original row, and per row block the tiles
    streamed first: every pair of a block's row with a reference of its label, and the
    batch's excluded pair k, k, lies in them (the kernel sums positives and masks only
    there); the others hold none."""
    args = _lse_args(n, m, classes, batch)
    q_o, r_o, a_o, pack_o, order, span = L.in_label_order(args, block_m)
    a, b, pack = args["q_labels"], args["r_labels"], args["r_pack"]
    perm_r = torch.sort(b[:m], stable=True).indices
    order = order.long()
    assert torch.equal(r_o, args["r"][perm_r]) and torch.equal(q_o, args["q"][order])
    assert (q_o is r_o) == batch
    assert torch.equal(a_o[:n], a[:n][order]) and torch.equal(a_o[n:], a[n:])
    assert bool((a_o[1:n] >= a_o[:n - 1]).all())
    assert torch.equal(pack_o[:m], pack[:m][perm_r]) and torch.equal(pack_o[m:], pack[m:])
    b_o = (pack_o[:m] & 0xFFFFFFFF).to(torch.int32)
    assert span.shape == (-(-n // block_m), 2) and span.dtype == torch.int32
    tiles = -(-m // L.BLOCK_N)
    for blk, (lo, e) in enumerate(span.tolist()):
        rows = torch.arange(blk * block_m, min(n, (blk + 1) * block_m))
        first = torch.zeros(tiles, dtype=torch.bool)
        first[lo:lo + e] = True
        pos = a_o[rows][:, None] == b_o[None, :]                  # (rows, references)
        if batch:
            pos[torch.arange(len(rows)), rows] = True               # the excluded pair
        ref_tiles = torch.nonzero(pos)[:, 1] // L.BLOCK_N
        assert bool(first[ref_tiles].all()), blk
        assert 0 <= lo and lo + e <= tiles


def test_ordered_form_takes_the_batch_or_no_excluded_pair():
    """An excluded pair by position between rows that are not the references (offset 0,
    other rows and labels) need not lie among its row's label's tiles: the ORDERED form
    is not taken there, the row-order form of the same fields is."""
    assert L.ordered_ok(_lse_args(300, 300, 7, True))
    assert L.ordered_ok(_lse_args(300, 650, 5, False))
    assert not L.ordered_ok(_lse_args(300, 650, 5, False, offset=0))


@pytest.mark.parametrize("batch", [True, False])
def test_ordered_main_pass_hands_the_kernel_sorted_rows(monkeypatch, batch):
    """What ``main_pass`` in an ORDERED form passes the kernel: ``in_label_order``'s
    tensors (the batch's queries the references themselves), the outputs and has-a-
    positive vector as the launcher gave them (the kernel writes at ``order``), and
    ORDERED; an offset between other rows falls back to the row-order form."""
    args = _lse_args(300, 300 if batch else 650, 7, batch)
    calls = _recorded(monkeypatch, L, "lse_main_sm90")
    f = L.Form(128, 8, False, False, True)
    L.main_pass(args, None, f)
    (grid, bound, kw), = calls
    q_o, r_o, a_o, pack_o, order, span = L.in_label_order(args, 128)
    assert grid == (3,) and kw == {"num_warps": 8} and bound["ORDERED"] is True
    for name, want in (("q", q_o), ("r", r_o), ("q_labels", a_o), ("pack", pack_o),
                       ("order", order), ("span", span)):
        assert torch.equal(bound[name], want), name
    assert (bound["q"] is bound["r"]) == batch
    for name in ("scale", "has_pos", "lse_all", "lse_pos", "redo"):
        assert bound[name] is args[name], name
    assert bound["DIAG"] is batch and (bound["s_qn"], bound["s_rn"]) == (L.D, L.D)
    calls.clear()
    L.main_pass(_lse_args(300, 650, 5, False, offset=0), None, f)
    (_, bound, _), = calls
    assert bound["ORDERED"] is False and bound["order"] is None and bound["span"] is None


# --- the class forward's Gluon main pass (``gluon_class``)

def _class_case(m=203, c=37, block_c=16, seed=0):
    """Class labels in label order (some outside [0, C): -1, as the launcher's), the class
    tiles' reference ranges (``forward._probs_fwd``'s tile_ptr)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.sort(torch.randint(-1, c, (m,), generator=g)).values.to(torch.int32)
    tiles = -(-c // block_c)
    bounds = torch.arange(tiles + 1, dtype=torch.int32) * block_c
    tile_ptr = torch.searchsorted(labels, bounds)
    tile_ptr[0], tile_ptr[-1] = 0, m
    return labels, tile_ptr


@pytest.mark.parametrize("m, c, block_c", [(203, 37, 16), (64, 5, 16), (517, 90, 32),
                                           (1, 3, 16)])
def test_class_one_hot_gives_the_class_mass(m, c, block_c):
    """The kernel's mass, emulated: per class tile and reference tile, p's columns in the
    kernel's permuted register order (zero past the tile's references) times the one-hot
    columns the launcher lays out (``gluon_class.one_hot``), summed over the tiles, is each
    row's mass per class of the tile, the direct one-hot sum; labels outside [0, C) and
    the padding weigh nothing."""
    from nbkernels.backends.triton import gluon_class as C
    labels, tile_ptr = _class_case(m, c, block_c)
    hot, hot_ptr = C.one_hot(labels, tile_ptr, block_c, m)
    # each class tile's first column over 8; H a multiple of 16 and a tile past the last
    assert hot.shape[1] % 16 == 0 and hot.shape[1] >= 8 * int(hot_ptr[-1]) + C.BLOCK_N
    # small integers: every sum exact, whatever its order
    p = torch.randint(1, 1000, (5, m), generator=torch.Generator().manual_seed(1)).double()
    for bn in sorted(set(C.TILE_N.values())):   # the reference tile widths it streams
        u = torch.arange(bn)
        for t in range(tile_ptr.shape[0] - 1):
            lo, hi, h_lo = int(tile_ptr[t]), int(tile_ptr[t + 1]), 8 * int(hot_ptr[t])
            got = torch.zeros(5, block_c, dtype=torch.float64)
            for k in range(-(-(hi - lo) // bn)):
                j = lo + k * bn + C._permuted(u)
                cols = torch.where(j < hi, p[:, j.clamp(max=m - 1)], 0.0)
                got += cols @ hot[:, h_lo + k * bn + u].double().T
            slot = labels[lo:hi].long() - t * block_c
            inside = (slot >= 0) & (slot < block_c)
            want = torch.zeros(5, block_c, dtype=torch.float64)
            want.index_add_(1, slot[inside], p[:, lo:hi][:, inside])
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_class_main_pass_hands_the_kernel_the_launchers_arguments(monkeypatch):
    """What ``gluon_class.main_pass`` passes the kernel, against the launch arguments
    ``_probs_fwd`` gives a main pass (bf16 rows, D = 128, the batch, self excluded); and
    the launcher takes it where kind "fwd_class_main" chooses it (opted in, sm_90), not
    for inputs it refuses."""
    from nbkernels.backends import variants
    from nbkernels.backends.triton import gluon_class as C
    from nbkernels.backends.triton import kernels as tk
    monkeypatch.setattr(tk, "launch", lambda *args, **kw: None)
    seen = {}
    monkeypatch.setattr(tk, "main_pass", lambda args, kind="fwd_main":
                        (lambda a, grid, order: seen.update(a, order=order))
                        if kind == "fwd_class_main" else None)
    from nbkernels.backends import triton as tb
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, C.D, generator=g).to(torch.bfloat16)
    y = torch.randint(0, 10, (300,), generator=g)
    tb.probs_forward(x, x, y, torch.tensor(0.1), 10, metric="sqeuclidean", offset=0)
    calls = _recorded(monkeypatch, C, "class_main_sm90")
    # the batch (self pair excluded: its queries streamed in the references' label order,
    # SELF 2), then self pairs at positions (1) and none (0)
    order = seen.pop("order")
    assert torch.equal(order, torch.argsort(y, stable=True))
    C.main_pass(seen, None, order=order)
    C.main_pass(seen, None)
    C.main_pass(dict(seen, self_pos=None), None)
    tiles = seen["tile_ptr"].shape[0] - 1
    for (grid, bound, kw), mode in zip(calls, (2, 1, 0)):
        assert grid == (3, tiles) and kw == {"num_warps": C.NUM_WARPS}
        for name in ("q", "r", "r_col", "tile_ptr", "scale", "mass", "tile_max", "tile_sum",
                     "redo"):
            assert bound[name] is seen[name], name
        assert bound["SELF"] == mode
        assert (bound["self_pos"] is seen["self_pos"]) == (mode >= 1)
        assert (bound["order"] is order) == (mode == 2)
        assert (bound["N"], bound["M"], bound["s_qn"]) == (300, 300, C.D)
        assert (bound["BM"], bound["BN"], bound["BC"]) == (C.BLOCK_M, C.TILE_N[mode],
                                                           seen["BLOCK_C"])
        hot, hot_ptr = C.one_hot(seen["r_labels"], seen["tile_ptr"], seen["BLOCK_C"], 300)
        assert torch.equal(bound["hot"], hot) and torch.equal(bound["hot_ptr"], hot_ptr)
        assert bound["H"] == hot.shape[1]
    # the references the kernel streams are the launcher's, in label order: with SELF 2 the
    # queries too (the kernel reads them from r)
    torch.testing.assert_close(seen["r"], x[order], rtol=0, atol=0)
    assert seen["mass"].shape[1] == tiles * seen["BLOCK_C"]
    # where the launcher takes it
    monkeypatch.undo()
    monkeypatch.setenv("NBK_VARIANTS", "sm90_gluon")
    gluon = next(v for v in tk.VARIANTS if v.kind == "fwd_class_main" and v.name == "sm90_gluon")
    monkeypatch.setattr(variants, "capability", lambda device: (9, 0))
    choose = tk.choose
    monkeypatch.setattr(tk, "choose", lambda kind, device, precision=None: gluon
                        if kind == "fwd_class_main" else choose(kind, device, precision))
    assert tk.main_pass(seen, "fwd_class_main") is C.main_pass
    assert tk.main_pass(dict(seen, BLOCK_C=64), "fwd_class_main") is None
    assert "class tiles" in C.why_not(dict(seen, BLOCK_C=64))
    assert "D = 128" in C.why_not(dict(seen, D=64))
    assert "bf16 / fp16" in C.why_not(dict(seen, q=seen["q"].float()))


@pytest.mark.parametrize("mode", [2, 1, 0])
def test_class_main_pass_compiles_clean(mode):
    """The class forward's Gluon main pass (bench/sass/gluon_class_probe.py's model of it),
    in each self-pair mode at its tile width: compiles for sm_90 under this triton (its
    p -> TF32 operand conversion asserted trivial, no shuffle) without local memory, its
    wgmma under 90% of the main loop's exps or more, about as few instructions in the
    batch's mode (2) as with no pair excluded, and within 10 % of the committed cycles per
    tile."""
    from bench.sass import gluon_class_probe as P
    from nbkernels.backends.triton import gluon_class as C
    path = P.results_path()
    if not path.exists():
        pytest.skip(f"no {path.name} for triton {L.VERSION} (bench/sass/gluon_class_probe.py)")
    got = P.modelled(C.BLOCK_M, C.TILE_N[mode], C.NUM_WARPS, mode)
    assert got["local_bytes"] == 0
    # the tile's pair exps (a thread's share, and its 2 rows' rescale factors): at least
    # 90% of them under the MMA
    pairs = C.BLOCK_M * C.TILE_N[mode] // (32 * C.NUM_WARPS)
    under, total = got["exps_under_mma"]
    assert total == pairs + 2 and under >= 0.9 * pairs, got["loop"]
    rows = json.loads(path.read_text())["rows"]
    want = next(r for r in rows if r["kernel"] and r["self_mode"] == mode)
    assert want["config"] == [C.BLOCK_M, C.TILE_N[mode], C.NUM_WARPS]
    assert got["cycles_per_tile"] <= 1.1 * want["cycles_per_tile"], (got, want)
    if mode == 2:   # as few instructions as with no pair excluded, give or take a few
        none = next(r for r in rows if r["kernel"] and r["self_mode"] == 0)
        assert got["warp_instrs_per_tile"] <= none["warp_instrs_per_tile"] + 32


def _schedule(lo, hi, i_m, bm, bn):
    """The class kernel's tile schedule with SELF == 2, step by step as ``class_main_sm90``
    writes it (its scalar arithmetic, in Python): [(tile, self mask, column mask)]."""
    n = -(-(hi - lo) // bn)
    k_a = e = 0
    if i_m < hi and i_m + bm > lo:
        k_a = (max(i_m, lo) - lo) // bn
        e = (min(i_m + bm, hi) - 1 - lo) // bn - k_a + 1

    def seq(k):
        return k_a + k if k < e else k - e + (e if k - e >= k_a else 0)
    if n == 0:
        return []
    steps = [(seq(0), True, True)] + [(seq(k), True, True) for k in (1, 2) if e > k]
    k0 = max(e, 1)
    steps += [(seq(k), False, False) for k in range(k0, n - 1)]
    if n - 1 >= k0:
        steps.append((seq(n - 1), False, True))
    return steps


def test_class_schedule_masks_what_needs_it():
    """The batch's schedule (SELF == 2; rows [i_m, i_m + BM) in label order): every tile of
    the class tile once; those holding a self pair or past the class tile's end (the last)
    streamed with their masks, the main loop's with none; at most 3 self tiles."""
    from nbkernels.backends.triton import gluon_class as C
    bm, bn = C.BLOCK_M, C.TILE_N[2]
    for lo in (0, 5, 64, 130, 1000):
        for size in (0, 1, 63, 64, 65, 200, 1037):
            hi = lo + size
            for i_m in range(0, 1300, 37):
                steps = _schedule(lo, hi, i_m, bm, bn)
                assert sorted(t for t, _, _ in steps) == list(range(-(-size // bn)))
                for t, self_mask, col_mask in steps:
                    a, b = lo + t * bn, lo + (t + 1) * bn
                    holds_self = a < i_m + bm and min(b, hi) > i_m
                    assert self_mask or not holds_self, (lo, hi, i_m, t)
                    assert col_mask or b <= hi, (lo, hi, i_m, t)
                assert sum(s for _, s, _ in steps[1:]) <= 2
