"""The launchers' Triton config table (nbkernels/backends/triton/configs.py): one config per
kernel variant, no benchmarking by default, every entry fitting the hardware.

Needs triton importable (no kernel runs here); the launches themselves are checked under
the interpreter (tests/triton/test_triton_configs.py) and the compiled entries in
tests/test_sass.py.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from nbkernels.backends.triton import common  # noqa: E402
from nbkernels.backends.triton import configs as tc  # noqa: E402
from nbkernels.backends.triton import kernels as tk  # noqa: E402

# dtype class -> (element size, fp32 dot precision)
CLASSES = {"16": (2, None), "32": (4, "tf32"), "32ieee": (4, "ieee"), "64": (8, None)}
DIMS = (16, 100, 128, 129, 200, 256, 257, 300)


def _reachable():
    """Every (kernel, dtype class, D bucket) a launch can ask for, and a D for each."""
    out = {}
    for kernel in tc.KERNELS:
        for dclass, (elem, prec) in CLASSES.items():
            assert tc.dtype_class(elem, prec) == dclass
            for d in DIMS:
                out.setdefault((kernel, dclass, tc.d_bucket(kernel, d, elem, prec)), d)
    return out


def _variants_with_configs():
    """The variants with table entries of their own (under their ``configs`` key)."""
    return [v for v in tk.VARIANTS if v.configs is not None]


def test_every_variant_has_an_sm90_entry_and_every_entry_is_used():
    reachable = _reachable()
    want = {("sm90",) + k for k in reachable}
    # a variant with its own key: an entry for each (kernel, dtype class, bucket) it serves
    for v in _variants_with_configs():
        dclasses = {tc.dtype_class(4, p) for p in v.precisions}
        want |= {(v.configs, kernel, dclass, bucket) for kernel, dclass, bucket in reachable
                 if kernel == v.kind and dclass in dclasses}
    assert want == set(tc.TABLE)


def _block_t(arch, kernel, d, elem, prec):
    """The transposed tile width the variant of ``arch`` adds per stage (``fits``)."""
    v = next((v for v in _variants_with_configs() if (v.configs, v.kind) == (arch, kernel)),
             None)
    if v is None or not v.flag("OTHER_T"):
        return 0
    resident = d <= common.resident_limit(kernel, elem, prec)
    return max(16, triton.next_power_of_2(d)) if resident else common.MAX_BLOCK_DX


def test_buckets_follow_the_resident_limits():
    assert tc.d_bucket("fwd", 128) == "128" and tc.d_bucket("fwd", 129) == "256"
    assert tc.d_bucket("fwd", common.MAX_RESIDENT_D + 1) == "chunked"
    assert tc.d_bucket("bwd", common.MAX_RESIDENT_D_BWD + 1) == "chunked"
    # fp32 IEEE dots are FMA loops: the lse kernels always loop D in chunks
    assert tc.d_bucket("fwd", 16, 4, "ieee") == tc.d_bucket("bwd", 16, 4, "ieee") == "chunked"
    assert tc.d_bucket("fwd_class", 16, 4, "ieee") == "128"


# every entry: TABLE's, and each triton version's replacements
ENTRIES = [(None, key, entry) for key, entry in sorted(tc.TABLE.items())] + [
    (version, key, entry) for version, entries in sorted(tc.TABLE_BY_TRITON.items())
    for key, entry in sorted(entries.items())]


@pytest.mark.parametrize("version,key,entry", ENTRIES,
                         ids=lambda x: "-".join(map(str, x)) if isinstance(x, tuple) else None)
def test_entry_fits_and_is_a_gpu_config(version, key, entry):
    arch, kernel, dclass, bucket = key
    (own, other, warps, stages), source = entry
    cfg = tc._config(own, other, warps, stages, kernel)
    elem, prec = CLASSES[dclass]
    d = _reachable()[kernel, dclass, bucket]
    assert tk.fits(cfg, elem, tc._block_d(kernel, d, elem, prec), kernel == "fwd_class",
                   _block_t(arch, kernel, d, elem, prec))
    # every table config is one of the GPU configs, which the GPU-sized interpreter suite
    # runs one by one (test_every_gpu_config)
    pool = tk.GPU_FWD_CONFIGS if kernel.startswith("fwd") else tk.GPU_BWD_CONFIGS
    assert str(cfg) in {str(c) for c in pool}
    assert source


@pytest.mark.parametrize("kernel", tc.KERNELS)
@pytest.mark.parametrize("dclass", list(CLASSES))
@pytest.mark.parametrize("d", DIMS)
def test_fallback_fits_small_shared_memory(kernel, dclass, d):
    elem, prec = CLASSES[dclass]
    own, other, warps, stages = tc.fallback(kernel, elem, d, prec)
    block_d = tc._block_d(kernel, d, elem, prec)
    assert (own + stages * other) * block_d * elem <= tc.FALLBACK_SMEM


def test_version_entries_replace_table_entries():
    """A triton version's entries replace entries of TABLE with other configs, and name
    the version whose run of bench/sass/table.py --fix chose them; its stack allowances
    are for entries of TABLE."""
    for version, entries in tc.TABLE_BY_TRITON.items():
        assert version in {(3, 6), (3, 7), (3, 8)}, version
        for key, (cfg, source) in entries.items():
            assert key in tc.TABLE and cfg != tc.TABLE[key][0], key
            assert f"triton {version[0]}.{version[1]}" in source, source
        merged = tc.table(version)
        assert set(merged) == set(tc.TABLE)
        assert all(merged[k] == e for k, e in entries.items())
    for version, allowance in tc.SPILL_ALLOWANCE_BY_TRITON.items():
        assert {("sm90",) + k for k in allowance} <= set(tc.TABLE)
        assert tc.spill_allowance(version) == {**tc.SPILL_ALLOWANCE, **allowance}
    for version, excused in tc.NO_HGMMA_BY_TRITON.items():
        assert {("sm90",) + k for k in excused} <= set(tc.TABLE)
        assert all(k[1] in ("16", "32") for k in excused)
        assert tc.no_hgmma(version) == tc.NO_HGMMA | excused


def test_select_takes_the_installed_triton_entries(monkeypatch):
    if common.SMALL:
        pytest.skip("NBK_TRITON_SIZES=interpreter pins 16 x 16")
    cpu = torch.device("cpu")
    monkeypatch.setattr(tc, "arch", lambda device: "sm90")
    key = ("sm90", "fwd", "16", "128")
    other = next(c for c in [(64, 64, 4, 2), (64, 32, 4, 3)] if c != tc.TABLE[key][0])
    monkeypatch.setattr(tc, "TABLE_BY_TRITON", {(3, 6): {key: (other, "under triton 3.6")}})
    for version, want in [((3, 6), other), ((3, 9), tc.TABLE[key][0])]:
        monkeypatch.setattr(tc, "TRITON_VERSION", version)
        cfg, _ = tc.select("fwd", 2, 128, cpu)
        assert (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps,
                cfg.num_stages) == want


def test_select_reads_the_table_and_falls_back(monkeypatch):
    if common.SMALL:
        pytest.skip("NBK_TRITON_SIZES=interpreter pins 16 x 16")
    cpu = torch.device("cpu")
    monkeypatch.setattr(tc, "arch", lambda device: "sm90")
    cfg, source = tc.select("fwd", 2, 128, cpu)
    entry, want = tc.table()["sm90", "fwd", "16", "128"]
    assert (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]) == entry[:2]
    assert source == want
    monkeypatch.setattr(tc, "arch", lambda device: "other")
    cfg, source = tc.select("bwd", 4, 128, cpu)
    assert source == "fallback"
    assert (cfg.kwargs["BLOCK_OWN"], cfg.kwargs["BLOCK_OTHER"]) == tc.fallback("bwd", 4, 128)[:2]
    with tc.override(fwd=tk.GPU_FWD_CONFIGS[-1]):
        assert tc.select("fwd", 2, 128, cpu) == (tk.GPU_FWD_CONFIGS[-1], "override")
        assert tc.select("bwd", 2, 128, cpu)[1] == "fallback"
    assert tc.select("fwd", 2, 128, cpu)[1] == "fallback"


def test_sizes_are_not_specialised():
    """One compile per variant whatever N and M are: the size arguments are runtime ints
    (in every kernel of the variant table)."""
    jits = {id(v.kernel): v.kernel for v in tk.VARIANTS if not isinstance(v.kernel, str)}
    for jit in jits.values():
        if jit is None:   # kind "fwd_main"'s generic entry: the forward kernel's main pass
            continue
        free = {p.name for p in jit.params if p.do_not_specialize}
        assert {"N", "M", "offset"} <= free
    # a variant named by its module (the Gluon main pass; its offset is a flag)
    for v in tk.VARIANTS:
        if isinstance(v.kernel, str):
            module = importlib.import_module(f"nbkernels.backends.triton.{v.kernel}")
            assert {"N", "M"} <= {p.name for p in module.KERNEL.params if p.do_not_specialize}


def test_autotune_is_opt_in_and_cacheable():
    code = "from nbkernels.backends.triton import common as c; print(c.AUTOTUNE)"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",
                                                             "NBK_TRITON_AUTOTUNE")}
    out = [subprocess.run([sys.executable, "-c", code], env=dict(env, **extra), text=True,
                          capture_output=True, check=True).stdout.strip()
           for extra in ({}, {"NBK_TRITON_AUTOTUNE": "0"}, {"NBK_TRITON_AUTOTUNE": "1"})]
    assert out == ["False", "False", "True"]
    # triton's disk cache of autotune results refuses configs with a pre_hook
    assert all(c.pre_hook is None for c in tk.GPU_FWD_CONFIGS + tk.GPU_BWD_CONFIGS)


def test_autotuned_kernels_cache_their_results():
    for kind in ("fwd", "bwd"):
        tuner = tk._autotuned(tk.choose(kind, torch.device("cpu")).kernel, kind == "fwd")
        assert tuner.cache_results or os.environ.get("TRITON_INTERPRET") == "1"
        assert len(tuner.configs) == len(tk.GPU_FWD_CONFIGS if kind == "fwd"
                                         else tk.GPU_BWD_CONFIGS)


def test_tiles_beyond_pad_are_refused():
    """The launchers pad per-row vectors to a multiple of PAD, which the kernels stream
    unmasked: a tile wider than PAD would read past them (a 128 x 256 forward gave a
    relative error of 53 on 48 rows). Such a config is refused where configs are built
    or pinned, before any launch."""
    configs = tc
    wide = 2 * common.PAD
    with pytest.raises(ValueError, match=r"at most PAD = 128.*'BLOCK_N': 256"):
        configs._config(128, wide, 8, 3, "fwd")
    with pytest.raises(ValueError, match=r"at most PAD = 128.*'BLOCK_OWN': 256"):
        configs._config(wide, 64, 8, 2, "bwd")
    ok = configs._config(common.PAD, common.PAD, 8, 3, "fwd")
    bad = triton.Config({"BLOCK_OWN": 64, "BLOCK_OTHER": wide}, num_warps=4, num_stages=2)
    before = {k: configs.overridden(k) for k in configs.KERNELS}
    with pytest.raises(ValueError, match="at most PAD"):
        with configs.override(ok, bad):
            pass
    assert {k: configs.overridden(k) for k in configs.KERNELS} == before


def test_entries_are_the_recorded_choices():
    """TABLE holds what bench/sass/table.py chose under triton 3.9 and TABLE_BY_TRITON
    what its --fix runs chose under each older version where that differs
    (bench/results/config_table_sm90*.json): an entry edited by hand, or a run left
    uncommitted, fails here."""
    import json
    from pathlib import Path
    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    run = json.loads((results / "config_table_sm90.json").read_text())
    assert run["triton"].startswith("3.9.")
    chosen = {("sm90", e["kernel"], e["dtype_class"], e["bucket"]): tuple(e["chosen"])
              for e in run["entries"]}
    assert chosen == {k: tuple(e[0]) for k, e in tc.TABLE.items() if k[0] == "sm90"}
    for version, entries in tc.TABLE_BY_TRITON.items():
        run = json.loads((results / f"config_table_sm90_triton{version[0]}{version[1]}.json")
                         .read_text())
        assert run["triton"].startswith(f"{version[0]}.{version[1]}.")
        replaced = {("sm90", e["kernel"], e["dtype_class"], e["bucket"]): tuple(e["chosen"])
                    for e in run["entries"] if tuple(e["chosen"]) != tuple(e["table"])}
        assert replaced == {k: tuple(e[0]) for k, e in entries.items()}, version
        assert all(tuple(e["table"]) == tuple(tc.TABLE[("sm90", e["kernel"], e["dtype_class"],
                                                          e["bucket"])][0])
                   for e in run["entries"]), version
