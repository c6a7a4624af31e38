"""The seam for architecture variants (``nbkernels.backends.variants``): one function
chooses a backend's kernel from the device's compute capability and the triton version,
over the backend's table. Tests that launch the chosen kernels are in
tests/triton/test_triton_variants.py (interpreter) and tests/cuda (emulator)."""
import pytest
import torch

from nbkernels.backends import cuda as cuda_backend
from nbkernels.backends import variants

KINDS = ("fwd", "fwd_class", "bwd", "bwd_class")


def _table():
    return [
        variants.Variant("fwd", "sm100", "k100", capability=((10, 0), (11, 0))),
        variants.Variant("fwd", "sm90_new_triton", "k90new", capability=((9, 0), (10, 0)),
                         triton=((3, 8), (99, 0))),
        variants.Variant("fwd", "sm90", "k90", capability=((9, 0), (10, 0))),
        variants.Variant("fwd", "generic", "k"),
        variants.Variant("bwd", "generic", "kb"),
    ]


@pytest.mark.parametrize("cap, version, want", [
    ((8, 0), (3, 9), "generic"), ((8, 9), None, "generic"),
    ((9, 0), (3, 6), "sm90"), ((9, 0), (3, 7), "sm90"), ((9, 0), (3, 8), "sm90_new_triton"),
    ((9, 0), None, "sm90_new_triton"),   # a backend without triton: the range does not apply
    ((10, 0), (3, 6), "sm100"), ((12, 0), (3, 9), "generic")])
def test_choose_by_capability_and_triton_version(cap, version, want):
    assert variants.choose(_table(), "fwd", cap, version).name == want


def test_choose_fails_loudly_without_an_entry():
    with pytest.raises(LookupError, match="'fwd_class'.*capability"):
        variants.choose(_table(), "fwd_class", (9, 0), (3, 9))


def test_applicable_lists_every_variant_that_holds_in_order():
    names = [v.name for v in variants.applicable(_table(), "fwd", (9, 0), (3, 9))]
    assert names == ["sm90_new_triton", "sm90", "generic"]
    assert [v.name for v in variants.applicable(_table(), "bwd", (7, 5), (3, 6))] == ["generic"]


def test_pinned_and_registered_are_undone_on_exit():
    table = _table()
    toy = variants.Variant("fwd", "toy", "ktoy", capability=((9, 0), (9, 1)))
    with variants.registered(table, toy):
        assert variants.choose(table, "fwd", (9, 0), (3, 9)) is toy
        assert variants.choose(table, "fwd", (9, 1), (3, 9)).name == "sm90_new_triton"
        with variants.pinned(table, "fwd", "generic"):
            assert variants.choose(table, "fwd", (9, 0), (3, 9)).name == "generic"
            assert variants.choose(table, "bwd", (9, 0), (3, 9)).name == "generic"
        assert variants.choose(table, "fwd", (9, 0), (3, 9)) is toy
    assert toy not in table
    assert variants.choose(table, "fwd", (9, 0), (3, 9)).name == "sm90_new_triton"
    with variants.pinned(table, "fwd", "missing"), pytest.raises(LookupError, match="missing"):
        variants.choose(table, "fwd", (9, 0), (3, 9))


def test_capability_and_triton_version():
    assert variants.capability(torch.device("cpu")) == variants.EMULATED_CAPABILITY == (9, 0)
    if not torch.cuda.is_available():   # fake CUDA tensors on a CPU build: the portable kernels
        assert variants.capability(torch.device("cuda")) == variants.UNKNOWN
        assert variants.choose(_table(), "fwd", variants.UNKNOWN, (3, 9)).name == "generic"
    version = variants.triton_version()
    triton = pytest.importorskip("triton")
    assert version == tuple(int(x) for x in triton.__version__.split(".")[:2])


def test_every_backend_table_has_a_generic_kernel_for_every_kind():
    """Whatever the device, each kind has a kernel: the last entry of its kind holds
    everywhere."""
    tables = [cuda_backend.VARIANTS]
    try:
        from nbkernels.backends.triton import kernels as tk
    except ImportError:
        pass
    else:
        tables.append(tk.VARIANTS)
    for table in tables:
        for kind in KINDS:
            last = [v for v in table if v.kind == kind][-1]
            assert last.name == "generic" and last.capability == variants.ANY
            for cap in ((7, 0), (8, 0), (9, 0), (10, 0), (12, 1)):
                assert variants.choose(table, kind, cap, (3, 6)) is not None


def test_cuda_launchers_run_the_chosen_op(monkeypatch):
    """The CUDA backend reaches its ops only through the table: a variant registered in
    front, for the device's capability, is the op its launchers call; on another
    capability the generic op is."""
    calls = []
    monkeypatch.setattr(torch.ops.nbkernels, "cuda_toy_fwd", lambda *a: calls.append(a) or "toy",
                        raising=False)
    toy = variants.Variant("fwd", "toy", "cuda_toy_fwd", capability=((9, 0), (10, 0)))
    cpu = torch.device("cpu")
    with variants.registered(cuda_backend.VARIANTS, toy):
        assert cuda_backend._op("fwd", cpu)(1, 2) == "toy"
        monkeypatch.setattr(variants, "EMULATED_CAPABILITY", (8, 0))
        chosen = variants.choose(cuda_backend.VARIANTS, "fwd", variants.capability(cpu))
        assert chosen.kernel == "cuda_lse_fwd"
    assert calls == [(1, 2)]


def test_precision_ranges_and_flags():
    """A variant for some fp32 dot precisions only (the sm_90 TF32 backward) holds for
    those, and for a launch that names none; its flags are what the launcher sets."""
    tf32 = variants.Variant("bwd", "tf32_only", "kt", capability=((9, 0), (10, 0)),
                            precisions=("tf32", "tf32x3"), flags=(("OTHER_T", True),))
    table = [tf32, variants.Variant("bwd", "generic", "kb")]
    for precision, want in (("tf32", "tf32_only"), ("tf32x3", "tf32_only"), ("ieee", "generic"),
                            (None, "tf32_only")):
        assert variants.choose(table, "bwd", (9, 0), (3, 9), precision).name == want
    assert variants.choose(table, "bwd", (8, 0), (3, 9), "tf32").name == "generic"
    assert [v.name for v in variants.applicable(table, "bwd", (9, 0), None, "ieee")] == ["generic"]
    assert tf32.flag("OTHER_T") is True and table[1].flag("OTHER_T") is False
    assert table[1].flag("OTHER_T", None) is None


def test_triton_table_takes_the_transposed_tf32_backward_on_sm90_only():
    """The Triton table: fp32 inputs with TF32 dots (torch's allow_tf32, or tf32x3) take the
    transposed backward on sm_90; IEEE dots, 16-bit and fp64 inputs (precision "ieee") and
    other architectures the generic one; forwards are generic everywhere."""
    tk = pytest.importorskip("nbkernels.backends.triton.kernels")

    def choose(kind, cap, precision):   # under triton 3.9 (other versions: the next test)
        return variants.choose(tk.VARIANTS, kind, cap, (3, 9), precision)
    for kind in ("bwd", "bwd_class"):
        for precision in ("tf32", "tf32x3"):
            chosen = choose(kind, (9, 0), precision)
            assert chosen.name == "sm90_tf32_transposed" and chosen.flag("OTHER_T")
            assert chosen.configs == "sm90_tf32t"
            for cap in ((8, 0), (8, 9), (10, 0), (12, 0)):
                assert choose(kind, cap, precision).name == "generic"
        assert choose(kind, (9, 0), "ieee").name == "generic"
    for kind in ("fwd", "fwd_class"):
        assert choose(kind, (9, 0), "tf32").name == "generic"


def test_transposed_tf32_backward_holds_for_the_triton_versions_it_was_predicted_for():
    """The lse backward's variant holds under triton 3.6 to 3.9, the class backward's from
    3.7 (3.6's build of it is predicted slower than the generic kernel,
    bench/results/tf32_backward_sm90_triton36.json); outside, the generic kernel."""
    tk = pytest.importorskip("nbkernels.backends.triton.kernels")
    for kind, versions in (("bwd", [(3, 6), (3, 7), (3, 8), (3, 9)]),
                           ("bwd_class", [(3, 7), (3, 8), (3, 9)])):
        for version in [(3, 5), (3, 6), (3, 7), (3, 8), (3, 9), (3, 10), (4, 0)]:
            chosen = variants.choose(tk.VARIANTS, kind, (9, 0), version, "tf32")
            want = "sm90_tf32_transposed" if version in versions else "generic"
            assert chosen.name == want, (kind, version)


def test_ahead_forward_holds_under_triton_3_6_and_3_7_on_sm90():
    """The forward that issues each tile's dot ahead of the softmax: where its build
    overlaps the two for a predicted gain (sm_90, triton 3.6 and 3.7); generic elsewhere."""
    tk = pytest.importorskip("nbkernels.backends.triton.kernels")
    for cap in ((8, 0), (9, 0), (10, 0)):
        for version in [(3, 5), (3, 6), (3, 7), (3, 8), (3, 9)]:
            chosen = variants.choose(tk.VARIANTS, "fwd", cap, version, "ieee")
            want = "sm90_fwd_ahead" if cap == (9, 0) and version in [(3, 6), (3, 7)] \
                else "generic"
            assert chosen.name == want, (cap, version)
            assert chosen.flag("AHEAD") is (want != "generic")
    assert variants.choose(tk.VARIANTS, "fwd_class", (9, 0), (3, 6)).name == "generic"


def test_pinned_takes_several_kinds():
    table = _table() + [variants.Variant("fwd", "other", "k2"),
                        variants.Variant("bwd", "other", "kb2")]
    with variants.pinned(table, ("fwd", "bwd"), "other"):
        assert variants.choose(table, "fwd", (9, 0), (3, 9)).kernel == "k2"
        assert variants.choose(table, "bwd", (9, 0), (3, 9)).kernel == "kb2"
    assert variants.choose(table, "fwd", (9, 0), (3, 9)).name == "sm90_new_triton"
    assert variants.choose(table, "bwd", (9, 0), (3, 9)).name == "generic"
    assert not variants._pinned


def test_opt_in_variant_runs_only_where_named_or_pinned(monkeypatch):
    """An opt-in variant (a kernel no CPU check runs) is never the default: it is chosen
    where NBK_VARIANTS names it or a test pins it, and listed by ``applicable`` (what a
    GPU's tests run) all the same; one that the interpreter cannot run does not hold for
    an interpreted launch, named or not."""
    table = [variants.Variant("fwd", "gpu_only", "kg", capability=((9, 0), (10, 0)),
                              opt_in=True, interpreted=False)] + _table()
    monkeypatch.delenv("NBK_VARIANTS", raising=False)
    assert variants.choose(table, "fwd", (9, 0), (3, 9)).name == "sm90_new_triton"
    assert [v.name for v in variants.applicable(table, "fwd", (9, 0), (3, 9))][:2] == \
        ["gpu_only", "sm90_new_triton"]
    monkeypatch.setenv("NBK_VARIANTS", "other, gpu_only")
    assert variants.opted_in() == {"other", "gpu_only"}
    assert variants.choose(table, "fwd", (9, 0), (3, 9)).name == "gpu_only"
    assert variants.choose(table, "fwd", (8, 0), (3, 9)).name == "generic"
    interpreted = variants.choose(table, "fwd", (9, 0), (3, 9), interpreted=True)
    assert interpreted.name == "sm90_new_triton"
    assert "gpu_only" not in [v.name for v in variants.applicable(table, "fwd", (9, 0), (3, 9),
                                                                  interpreted=True)]
    monkeypatch.setenv("NBK_VARIANTS", "")
    with variants.pinned(table, "fwd", "gpu_only"):
        assert variants.choose(table, "fwd", (9, 0), (3, 9)).name == "gpu_only"


@pytest.mark.parametrize("kind, module", [("fwd_main", "gluon_lse"),
                                          ("fwd_class_main", "gluon_class")])
def test_triton_table_has_the_gluon_main_passes_opt_in_on_sm90(monkeypatch, kind, module):
    """Kinds "fwd_main" and "fwd_class_main" (the main passes of the loss and class
    forwards): the Triton kernel's by default; the Gluon one where opted in, on sm_90 under
    triton 3.6 to 3.9, and never interpreted."""
    tk = pytest.importorskip("nbkernels.backends.triton.kernels")
    monkeypatch.delenv("NBK_VARIANTS", raising=False)
    for version in [(3, 6), (3, 9)]:
        assert variants.choose(tk.VARIANTS, kind, (9, 0), version).kernel is None
    monkeypatch.setenv("NBK_VARIANTS", "sm90_gluon")
    for cap in ((8, 0), (9, 0), (10, 0)):
        for version in [(3, 5), (3, 6), (3, 9), (3, 10)]:
            chosen = variants.choose(tk.VARIANTS, kind, cap, version)
            want = "sm90_gluon" if cap == (9, 0) and (3, 6) <= version <= (3, 9) else "generic"
            assert chosen.name == want, (cap, version)
            assert chosen.kernel == (module if want == "sm90_gluon" else None)
    chosen = variants.choose(tk.VARIANTS, kind, (9, 0), (3, 9), interpreted=True)
    assert chosen.name == "generic"
    # the launcher's own choice on this machine's CPU tensors: the interpreter's, Triton's
    assert tk.choose(kind, torch.device("cpu")).name == "generic"
