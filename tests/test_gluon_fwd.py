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
          transposed=False):
    q = torch.empty(d, n, dtype=dtype, device="meta").t() if transposed else \
        torch.empty(n, d, dtype=dtype, device="meta")
    return dict(q=q, r=q if m == n else torch.empty(m, d, dtype=dtype, device="meta"),
                N=n, M=m, D=d, offset=offset, HAS_OFFSET=has_offset)


@pytest.mark.parametrize("kw, why", [
    (dict(dtype=torch.float32), "bf16 / fp16 rows of D = 128"),
    (dict(d=64), "D = 128, got torch.bfloat16 D = 64"),
    (dict(transposed=True), "unit feature stride"),
    (dict(offset=3), "offset 0"),
    (dict(n=4096, m=2048), "N <= M"),
    (dict(n=100, m=200, has_offset=False), "two reference tiles"),
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
    calls = []
    names = [p.name for p in L.lse_main_sm90.params]

    def launch(grid):
        return lambda *args, **kw: calls.append((grid, dict(zip(names, args)), kw))
    monkeypatch.setattr(L, "lse_main_sm90",
                        type("Kernel", (), {"__getitem__": lambda self, grid: launch(grid)})())
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


def test_class_probe_compiles_clean():
    """bench/sass/gluon_class_probe.py's class forward loop, 128 x 64 with 8 warps: compiles
    for sm_90 under this triton (its p -> TF32 operand conversion asserted trivial, no
    shuffle) without local memory, its wgmma under every exp of the tile, and within 10 %
    of the committed cycles per tile."""
    from bench.sass import gluon_class_probe as P
    path = P.results_path()
    if not path.exists():
        pytest.skip(f"no {path.name} for triton {L.VERSION} (bench/sass/gluon_class_probe.py)")
    got = P.modelled(128, 64, 8)
    assert got["local_bytes"] == 0
    under, total = got["exps_under_mma"]
    assert under == total > 0, got["loop"]
    want = next(r for r in json.loads(path.read_text())["rows"] if r["config"] == [128, 64, 8])
    assert got["cycles_per_tile"] <= 1.1 * want["cycles_per_tile"], (got, want)
