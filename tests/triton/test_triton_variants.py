"""The Triton backend's kernel variants (``kernels.VARIANTS``, chosen by
``nbkernels.backends.variants``): every variant that holds for this device passes the fp64
oracle when pinned, and a toy variant registered through the seam is launched exactly where
its capability range holds (the interpreter stands in for sm_90)."""
import types

import pytest
import torch

from conformance import (TOL, Launchers, check_lse, check_probs, oracle_lse, upstream_lse,
                         upstream_probs)
from nbkernels.backends import variants
from nbkernels.backends.triton import kernels as tk

KIND_CHECK = {"fwd": check_lse, "bwd": check_lse, "fwd_class": check_probs,
              "bwd_class": check_probs}


@pytest.mark.parametrize("kind, name", [
    (v.kind, v.name) for kind in KIND_CHECK
    for v in variants.applicable(tk.VARIANTS, kind, variants.EMULATED_CAPABILITY,
                                 tk.TRITON_VERSION)])
def test_each_applicable_variant_matches_oracle(tb, h, kind, name):
    cap = variants.capability(torch.device(h.device))
    if name not in [v.name for v in variants.applicable(tk.VARIANTS, kind, cap,
                                                         tk.TRITON_VERSION)]:
        pytest.skip(f"variant {name!r} does not hold for compute capability {cap}")
    atol, rtol = TOL[torch.float32]
    case = h.make_case(n=23, m=19, d=7, c=4, dtype=torch.float32, scale=0.5, temperature=0.3)
    with variants.pinned(tk.VARIANTS, kind, name):
        for metric, offset in (("sqeuclidean", 0), ("dot", None)):
            KIND_CHECK[kind](Launchers(tb, precision="ieee"), case, metric, offset, atol, rtol)


class _Toy:
    """A toy kernel: the generic forward kernel, recording each launch."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches += 1
            return tk.neighbor_fwd_kernel[grid](*args, **kwargs)
        return run


def test_toy_variant_is_selected_by_capability(tb, h, monkeypatch):
    if h.device != "cpu":
        pytest.skip("the emulated capability is the interpreter's")
    toy = _Toy()
    entry = variants.Variant("fwd", "toy_sm90", toy, capability=((9, 0), (10, 0)),
                             triton=((3, 6), (99, 0)))
    atol, rtol = TOL[torch.float64]
    case = h.make_case(n=21, m=18, d=5, c=3, dtype=torch.float64)
    launch = Launchers(tb, precision="ieee")
    with variants.registered(tk.VARIANTS, entry):
        check_lse(launch, case, "sqeuclidean", 0, atol, rtol)
        on_sm90 = toy.launches
        monkeypatch.setattr(variants, "EMULATED_CAPABILITY", (8, 0))
        check_lse(launch, case, "sqeuclidean", 0, atol, rtol)
    assert on_sm90 >= 1 and toy.launches == on_sm90


# --- the sm_90 TF32 backward that takes the other side from a transposed copy (OTHER_T)

TRANSPOSED = "sm90_tf32_transposed"


def _pinned_backward(name):
    """Both backward kinds pinned to variant ``name``."""
    return variants.pinned(tk.VARIANTS, ("bwd", "bwd_class"), name)


def _batch(case):
    """The batch loss's case: the references are the queries (``symmetric``)."""
    return types.SimpleNamespace(**dict(vars(case), r=case.q, b=case.a))


def _every_backward(tb, case, precision):
    """The gradients of every backward kernel the variant serves: the cross lse (dq and dr
    kernels), the batch lse (the symmetric kernel) and the class distribution (dq, dr)."""
    launch = Launchers(tb, precision=precision)
    g_all, g_pos = upstream_lse(case)
    out = list(launch.lse(case, "sqeuclidean", None, g_all, g_pos)[2:])
    out += [x for x in launch.lse(_batch(case), "sqeuclidean", 0, g_all, g_pos,
                                  symmetric=True)[2:] if x is not None]
    out += list(launch.probs(case, "dot", None, upstream_probs(case))[2:])
    return out


def _launched_other_t():
    """{OTHER_T value of each backward variant launched since the last clear}."""
    from nbkernels.backends.triton import configs as tc
    return {dict(flags).get("OTHER_T", "False") for kind, _, _, flags in tc.LAUNCHED
            if kind.startswith("bwd")}


def test_transposed_backward_batch_matches_oracle(tb, h):
    """The symmetric batch kernel with OTHER_T (the applicable-variant test above runs the
    cross and class kernels) against the fp64 oracle, fp32 IEEE dots, across tile edges."""
    atol, rtol = TOL[torch.float32]
    for n in (21, 45):
        case = _batch(h.make_case(n=n, m=n, d=7, c=4, dtype=torch.float32, scale=0.5,
                                  temperature=0.4))
        want, (g_all, g_pos) = oracle_lse(case, "sqeuclidean", 0, *upstream_lse(case))
        with _pinned_backward(TRANSPOSED):
            got = Launchers(tb, precision="ieee").lse(case, "sqeuclidean", 0, g_all, g_pos,
                                                      symmetric=True)
        assert got[3] is None
        torch.testing.assert_close(got[2].double(), want[2] + want[3], atol=atol, rtol=rtol)
        torch.testing.assert_close(got[4].double(), want[4], atol=atol, rtol=rtol)


def test_tf32_backward_takes_the_transposed_variant(tb, h):
    """On sm_90 (the interpreter stands in) fp32 inputs with TF32 dots launch the
    transposed backward (the class backward's only where this triton has it:
    tests/test_variants.py checks which versions); IEEE dots and 16-bit inputs the
    generic one."""
    from nbkernels.backends.triton import configs as tc
    cap = variants.capability(torch.device(h.device))
    if TRANSPOSED not in [v.name for v in variants.applicable(tk.VARIANTS, "bwd", cap)]:
        pytest.skip(f"no {TRANSPOSED} on compute capability {cap}")
    # the lse kernels' launches, and the class kernels', with TF32 dots
    tf32 = {str(variants.choose(tk.VARIANTS, kind, cap, tk.TRITON_VERSION, "tf32").name
                == TRANSPOSED) for kind in ("bwd", "bwd_class")}
    assert "True" in tf32
    for dtype, precision, want in ((torch.float32, "tf32", tf32),
                                   (torch.float32, "tf32x3", tf32),
                                   (torch.float32, "ieee", {"False"}),
                                   (torch.float16, None, {"False"})):
        tc.LAUNCHED.clear()
        _every_backward(tb, h.make_case(n=19, m=17, d=6, c=3, dtype=dtype), precision)
        assert _launched_other_t() == want, (dtype, precision)


def test_transposed_tf32_backward_is_the_generic_arithmetic(tb, h):
    """At TF32 (the interpreter cuts dot inputs to 10 bits as the GPU does) the transposed
    backward gives the generic kernel's gradients bit for bit: the dx dot gets the same
    values, from another copy. And both stay within TF32's error of the fp64 oracle."""
    from nbkernels.backends.triton import configs as tc
    case = h.make_case(n=37, m=29, d=19, c=5, dtype=torch.float32, scale=0.5, temperature=0.5)
    # the same tiles for both (the variant has configs of its own)
    same = tc.select("bwd", 4, 19, torch.device(h.device), "tf32")[0]
    with tk.fixed_configs(None, same), _pinned_backward("generic"):
        generic = _every_backward(tb, case, "tf32")
    with tk.fixed_configs(None, same), _pinned_backward(TRANSPOSED):
        transposed = _every_backward(tb, case, "tf32")
    assert len(generic) == len(transposed) == 8
    for x, y in zip(transposed, generic):
        assert torch.equal(x, y)
    g_all, g_pos = upstream_lse(case)
    want, _ = oracle_lse(case, "sqeuclidean", None, g_all, g_pos)
    for x, y in zip(transposed[:3], want[2:]):
        torch.testing.assert_close(x.double(), y, atol=5e-2, rtol=2e-2)


if tk.SIZES == "gpu":
    # every GPU backward config (the GPU, or the interpreter with NBK_TRITON_SIZES=gpu): two
    # 128-row tiles, D resident (128) and in chunks with two dx slices (130)
    _N, _M = (300, 293) if torch.cuda.is_available() else (150, 143)

    @pytest.mark.parametrize("d", [128, 130])
    @pytest.mark.parametrize("i", range(len(tk.GPU_BWD_CONFIGS)))
    def test_transposed_backward_in_every_gpu_config(tb, h, i, d):
        """The transposed backward in GPU config i: bit for bit the generic kernel's at TF32,
        and with IEEE dots within fp32 tolerance of the fp64 oracle (cross lse, class)."""
        cfg = tk.GPU_BWD_CONFIGS[i]
        case = h.make_case(n=_N, m=_M, d=d, c=7, dtype=torch.float32, scale=0.25,
                           temperature=0.7)
        with tk.fixed_configs(None, cfg), _pinned_backward("generic"):
            generic = _every_backward(tb, case, "tf32")
        with tk.fixed_configs(None, cfg), _pinned_backward(TRANSPOSED):
            transposed = _every_backward(tb, case, "tf32")
            atol, rtol = TOL[torch.float32]
            check_lse(Launchers(tb, precision="ieee"), case, "sqeuclidean", None, atol, rtol)
            check_probs(Launchers(tb, precision="ieee"), case, "dot", None, atol, rtol)
        for x, y in zip(transposed, generic):
            assert torch.equal(x, y)


# --- the sm_90 forward that issues each tile's dot ahead of the softmax (AHEAD)

AHEAD = "sm90_fwd_ahead"


def _forwards(tb, cases, cfg):
    """The lse forward's (lse_all, lse_pos) of each (case, metric, offset), in config cfg
    (None: the table's), by the generic kernel and by the ahead variant."""
    out = {}
    for name in ("generic", AHEAD):
        with tk.fixed_configs(cfg, None), variants.pinned(tk.VARIANTS, "fwd", name):
            launch = Launchers(tb, precision="ieee")
            out[name] = [t for case, metric, offset in cases
                         for t in launch.lse_forward(case.q, case.r, case.a, case.b, case.t,
                                                     metric=metric, offset=offset,
                                                     symmetric=offset == 0)]
    return out["generic"], out[AHEAD]


def _ahead_cases(h, n, m, d):
    """fp16 (the interpreter has no bf16): the batch (the diagonal tiles peeled off the
    main loop) and the cross form, whose M leaves the main loop 0, 1, 2 or many tiles."""
    batch = h.make_case(n=n, m=n, d=d, c=5, dtype=torch.float16, scale=0.5, temperature=0.3)
    batch = types.SimpleNamespace(**dict(vars(batch), r=batch.q, b=batch.a))
    out = [(batch, "sqeuclidean", 0)]
    for mm in m:
        out.append((h.make_case(n=n, m=mm, d=d, c=5, dtype=torch.float16, scale=0.5,
                                temperature=0.3), "dot", None))
    return out


def test_ahead_forward_is_the_generic_arithmetic(tb, h):
    """The ahead forward gives the generic kernel's lse bit for bit (the same operations
    in another order), for every count of main-loop tiles, and both the fp64 oracle's."""
    from nbkernels.backends.triton import configs as tc
    block_n = tc.select("fwd", 2, 24, torch.device(h.device))[0].kwargs["BLOCK_N"]
    cases = _ahead_cases(h, 37, [block_n - 3, block_n + 5, 2 * block_n + 1, 5 * block_n + 2],
                         24)
    generic, ahead = _forwards(tb, cases, None)
    assert len(generic) == len(ahead) == 2 * len(cases)
    for x, y in zip(ahead, generic):
        assert torch.equal(x, y)
    atol, rtol = TOL[torch.float16]
    with variants.pinned(tk.VARIANTS, "fwd", AHEAD):
        for case, metric, offset in cases[1:]:
            check_lse(Launchers(tb, precision="ieee"), case, metric, offset, atol, rtol)


def test_ahead_forward_leaves_other_inputs_alone(tb, h):
    """fp32 and fp64 inputs, and 16-bit ones with D > 128, keep the plain loop under the
    flag: the same compiled arithmetic, so the same bits."""
    for dtype, d in ((torch.float32, 9), (torch.float64, 9), (torch.float16, 200)):
        case = h.make_case(n=29, m=61, d=d, c=3, dtype=dtype, scale=0.5, temperature=0.4)
        generic, ahead = _forwards(tb, [(case, "sqeuclidean", None)], None)
        for x, y in zip(ahead, generic):
            assert torch.equal(x, y)


if tk.SIZES == "gpu":
    @pytest.mark.parametrize("i", range(len(tk.GPU_FWD_CONFIGS)))
    def test_ahead_forward_in_every_gpu_config(tb, h, i):
        """Every GPU forward config, D = 128 (resident): bit for bit the generic kernel."""
        cfg = tk.GPU_FWD_CONFIGS[i]
        bn = cfg.kwargs["BLOCK_N"]
        generic, ahead = _forwards(tb, _ahead_cases(h, 131, [bn + 7, 3 * bn - 1], 128), cfg)
        for x, y in zip(ahead, generic):
            assert torch.equal(x, y)
