"""The Triton backend's kernel variants (``kernels.VARIANTS``, chosen by
``nbkernels.backends.variants``): every variant that holds for this device passes the fp64
oracle when pinned, and a toy variant registered through the seam is launched exactly where
its capability range holds (the interpreter stands in for sm_90)."""
import pytest
import torch

from conformance import TOL, Launchers, check_lse, check_probs
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
