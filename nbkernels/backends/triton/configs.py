"""One tile config per Triton kernel variant, read by the launchers with no benchmarking.

A first call then compiles each kernel it launches once, whatever N and M are (sizes are
not specialised), instead of compiling and timing every autotune config of every variant.

``TABLE`` maps (architecture, kernel, dtype class, feature-dim bucket) to a config
``(BLOCK_OWN, BLOCK_OTHER, num_warps, num_stages)`` and the source of the choice:

* kernel: ``"fwd"`` (the lse forward, both passes), ``"fwd_class"`` (the class
  forward), ``"bwd"`` (the lse backward: dq, dr and the symmetric batch kernel, both
  passes), ``"bwd_class"`` (the class backward);
* dtype class: ``"16"`` (bf16, fp16), ``"32"`` (fp32 with TF32 dots: tensor cores),
  ``"32ieee"`` (fp32 with IEEE dots, torch's default: FMA loops, no tensor cores), ``"64"``;
* D bucket: ``"128"`` (D <= 128), ``"256"`` (128 < D <= 256) and ``"chunked"`` (D beyond
  the kernel's resident limit, ``common.resident_limit``: 256 forward, 128
  backward, none for the lse kernels with fp32 IEEE dots, where D is looped in chunks of
  64).

A kernel variant with configs of its own (``kernels.VARIANTS``: its ``configs``) has
entries under that key in place of the architecture: "sm90_tf32t", the sm_90 TF32
backward, chosen by the latency model (``bench/sass/tf32_backward.py``).

Only Hopper (sm_90) has entries, chosen from the compiled SASS by ``bench/sass/table.py``
(``bench/results/config_table_sm90.json``; predicted, not measured, until a GPU run times
them): for each entry, every GPU config whose tiles fit sm_90's shared memory is compiled
in every flavour the entry serves, at a D of its bucket, and the best predicted by the
latency model (``bench/sass/latency.py``, the simulated main loop) of those where no
flavour spills and every dot runs on HGMMA is kept (each entry names its
source; ``SPILL_ALLOWANCE`` and ``NO_HGMMA`` list where no config qualifies). The
choice is made under triton 3.9; ``TABLE_BY_TRITON`` holds the choices of the same rule
under each older supported triton where they differ (a config that spills there, or
another predicted faster: those compilers schedule and allocate registers differently;
``table``).
Any other architecture takes ``fallback``: the widest of 64 x 64, 32 x 32 and 16 x 16
(4 warps, 2 stages) whose tiles fit in 96 KB, the shared memory of the smallest current
parts. The interpreter's small sizes (``NBK_TRITON_SIZES=interpreter``) use 16 x 16.

``NBK_TRITON_AUTOTUNE=1`` turns on Triton's autotuner for the main launches instead
(every config of ``GPU_*_CONFIGS`` that fits, results cached on disk across processes,
``common``); ``override`` pins one config pair (tests).
"""
import contextlib

import triton

from nbkernels.backends import variants

from . import common as tc

SASS = ("SASS latency model: best predicted of the GPU configs that fit, with no flavour "
        "spilling and every dot on HGMMA (bench/sass/table.py, "
        "bench/results/config_table_sm90.json)")
SASS64 = ("SASS model: the widest GPU config that fits and does not spill (fp64 dots have no "
          "tensor-core prediction; bench/sass/table.py)")
LEAST = ("SASS model: every GPU config that fits spills here; the least stack "
         "(bench/sass/table.py)")
IEEE = ("SASS model, fp32 IEEE dots (FMA loops): best predicted of the configs with no spill "
        "(bench/sass/table.py)")

TF32T = ("latency model: the fastest predicted GPU config of the transposed TF32 backward with "
         "no flavour spilling (bench/sass/tf32_backward.py, bench/results/tf32_backward_sm90.json)")

TABLE = {
    # --- lse forward
    ("sm90", "fwd", "16", "128"): ((128, 128, 8, 3), SASS),
    ("sm90", "fwd", "16", "256"): ((128, 128, 8, 2), SASS),
    ("sm90", "fwd", "16", "chunked"): ((128, 128, 8, 3), SASS),
    ("sm90", "fwd", "32", "128"): ((128, 128, 8, 2), SASS),
    ("sm90", "fwd", "32", "256"): ((64, 64, 4, 2), SASS),
    ("sm90", "fwd", "32", "chunked"): ((128, 128, 8, 2), SASS),
    ("sm90", "fwd", "32ieee", "chunked"): ((64, 32, 4, 3), IEEE),
    ("sm90", "fwd", "64", "128"): ((64, 32, 4, 3), SASS64),
    ("sm90", "fwd", "64", "256"): ((32, 32, 4, 2), SASS64),
    ("sm90", "fwd", "64", "chunked"): ((32, 32, 4, 2), SASS64),
    # --- class forward (a [BM, BN] tile beside the class mass)
    ("sm90", "fwd_class", "16", "128"): ((128, 64, 8, 3), SASS),
    ("sm90", "fwd_class", "16", "256"): ((128, 64, 8, 3), SASS),
    ("sm90", "fwd_class", "16", "chunked"): ((64, 64, 4, 2), SASS),
    ("sm90", "fwd_class", "32", "128"): ((128, 64, 8, 3), SASS),
    ("sm90", "fwd_class", "32", "256"): ((64, 64, 4, 2), SASS),
    ("sm90", "fwd_class", "32", "chunked"): ((128, 64, 8, 3), SASS),
    ("sm90", "fwd_class", "32ieee", "128"): ((32, 32, 4, 2), IEEE),
    ("sm90", "fwd_class", "32ieee", "256"): ((32, 32, 4, 2), IEEE),
    ("sm90", "fwd_class", "32ieee", "chunked"): ((128, 64, 8, 3), IEEE),
    ("sm90", "fwd_class", "64", "128"): ((64, 64, 4, 2), SASS64),
    ("sm90", "fwd_class", "64", "256"): ((32, 32, 4, 2), SASS64),
    ("sm90", "fwd_class", "64", "chunked"): ((32, 32, 4, 2), SASS64),
    # --- lse backward (dq, dr, symmetric)
    ("sm90", "bwd", "16", "128"): ((64, 64, 4, 3), SASS),
    ("sm90", "bwd", "16", "chunked"): ((128, 64, 8, 2), SASS),
    ("sm90", "bwd", "32", "128"): ((128, 64, 8, 2), SASS),
    ("sm90", "bwd", "32", "chunked"): ((128, 32, 8, 2), SASS),
    ("sm90", "bwd", "32ieee", "chunked"): ((32, 32, 4, 2), IEEE),
    ("sm90", "bwd", "64", "128"): ((32, 32, 4, 2), LEAST),
    ("sm90", "bwd", "64", "chunked"): ((32, 32, 4, 2), LEAST),
    # --- class backward (the gathered G tile beside ds)
    ("sm90", "bwd_class", "16", "128"): ((64, 32, 4, 3), SASS),
    ("sm90", "bwd_class", "16", "chunked"): ((128, 64, 8, 2), SASS),
    ("sm90", "bwd_class", "32", "128"): ((128, 32, 8, 2), SASS),
    ("sm90", "bwd_class", "32", "chunked"): ((32, 32, 4, 2), LEAST),
    ("sm90", "bwd_class", "32ieee", "128"): ((32, 32, 4, 2), IEEE),
    ("sm90", "bwd_class", "32ieee", "chunked"): ((128, 32, 8, 2), LEAST),
    ("sm90", "bwd_class", "64", "128"): ((32, 32, 4, 2), LEAST),
    ("sm90", "bwd_class", "64", "chunked"): ((32, 32, 4, 2), LEAST),
    # --- the sm_90 TF32 backward that reads the other side transposed (kernels.VARIANTS,
    # "sm90_tf32_transposed"; its tiles count twice in shared memory, ``fits``)
    ("sm90_tf32t", "bwd", "32", "128"): ((128, 32, 8, 2), TF32T),
    ("sm90_tf32t", "bwd", "32", "chunked"): ((128, 32, 8, 2), TF32T),
    ("sm90_tf32t", "bwd_class", "32", "128"): ((128, 32, 8, 2), TF32T),
    ("sm90_tf32t", "bwd_class", "32", "chunked"): ((128, 32, 8, 2), TF32T),
}
# What the compiled entries may do that the rest may not (checked by tests/test_sass.py):
# stack bytes of the entries where every config spills (fp64 backward: the fp64 dx
# accumulator and the resident tile; the class backward's gathered G tile beside ds), and
# the one TF32 entry whose least-spilling config is too narrow for warpgroup MMA (32
# rows: mma.sync instead of HGMMA, no spill).
SPILL_ALLOWANCE = {
    ("bwd", "64", "128"): 104,
    ("bwd", "64", "chunked"): 208,
    ("bwd_class", "32ieee", "chunked"): 56,
    ("bwd_class", "64", "128"): 120,
    ("bwd_class", "64", "chunked"): 296,
}
NO_HGMMA = {("bwd_class", "32", "chunked")}
# The same kernels compiled by an older triton are scheduled and allocate registers
# differently: under each supported version every entry above is chosen again by the same
# rule (``bench/sass/table.py --fix``, run under that triton:
# bench/results/config_table_sm90_triton<version>.json), and where that choice is not
# TABLE's (TABLE's spills there, beyond its allowance, or leaves HGMMA: ``_fixed``; or
# another config is predicted faster there: ``_ranked``) it takes TABLE's place, with the
# stack allowed where every config of the entry spills (and HGMMA excused where the one
# config that does not spill leaves it). Filled from those runs; ``table``,
# ``spill_allowance`` and ``no_hgmma`` merge them.
#
# Under 3.6 to 3.8 the TF32 forward at 128 < D <= 256 spills 8 B at 64 x 64 (2 spill
# instructions in its main loop); the one config that does not spill, 32 x 32, is too
# narrow for warpgroup MMA and is predicted 2.9x slower (latency model, triton 3.6: 36.8
# against 12.5 ms). The rule keeps it; a GPU run should decide between the two.


def _by_triton(version, broken):
    """The source of a TABLE_BY_TRITON entry: the rule's choice under triton ``version``,
    where TABLE's own entry breaks the rule (``broken``) or another config is predicted
    faster (or, fp64 / IEEE dots, wider) there."""
    why = ("TABLE's entry breaks the rule there" if broken else
           "another config predicted faster or wider there than TABLE's")
    return (f"SASS model under triton {version}: {why}; the rule's choice under that version "
            f"(bench/sass/table.py --fix, bench/results/config_table_sm90_triton"
            f"{version.replace('.', '')}.json)")


def _fixed(version):
    return _by_triton(version, True)


def _ranked(version):
    return _by_triton(version, False)


TABLE_BY_TRITON = {
    (3, 6): {
        ("sm90", "bwd", "16", "128"): ((128, 64, 8, 2), _ranked("3.6")),
        ("sm90", "bwd", "32", "128"): ((128, 32, 8, 2), _fixed("3.6")),
        ("sm90", "bwd", "32ieee", "chunked"): ((64, 32, 4, 2), _fixed("3.6")),
        ("sm90", "bwd_class", "16", "128"): ((128, 64, 8, 2), _ranked("3.6")),
        ("sm90", "bwd_class", "32", "chunked"): ((64, 32, 4, 3), _ranked("3.6")),
        ("sm90", "bwd_class", "32ieee", "chunked"): ((64, 32, 4, 2), _ranked("3.6")),
        ("sm90", "fwd", "16", "256"): ((128, 64, 8, 3), _ranked("3.6")),
        ("sm90", "fwd", "32", "256"): ((32, 32, 4, 2), _fixed("3.6")),
        ("sm90", "fwd", "32ieee", "chunked"): ((128, 64, 8, 3), _ranked("3.6")),
        ("sm90", "fwd", "64", "128"): ((32, 32, 4, 2), _fixed("3.6")),
        ("sm90", "fwd_class", "16", "chunked"): ((128, 64, 8, 2), _ranked("3.6")),
        ("sm90", "fwd_class", "32", "256"): ((64, 32, 4, 3), _fixed("3.6")),
        ("sm90", "fwd_class", "32ieee", "128"): ((64, 32, 4, 3), _ranked("3.6")),
        ("sm90", "fwd_class", "64", "chunked"): ((128, 64, 8, 2), _ranked("3.6")),
    },
    (3, 7): {
        ("sm90", "bwd", "16", "chunked"): ((64, 64, 4, 2), _ranked("3.7")),
        ("sm90", "bwd", "32", "128"): ((128, 32, 8, 2), _fixed("3.7")),
        ("sm90", "bwd_class", "16", "128"): ((128, 64, 8, 2), _ranked("3.7")),
        ("sm90", "bwd_class", "32", "128"): ((32, 32, 4, 2), _fixed("3.7")),
        ("sm90", "fwd", "32", "256"): ((32, 32, 4, 2), _fixed("3.7")),
        ("sm90", "fwd", "32ieee", "chunked"): ((64, 64, 4, 2), _ranked("3.7")),
        ("sm90", "fwd", "64", "128"): ((32, 32, 4, 2), _fixed("3.7")),
        ("sm90", "fwd_class", "16", "chunked"): ((128, 64, 8, 2), _ranked("3.7")),
        ("sm90", "fwd_class", "32ieee", "128"): ((64, 32, 4, 3), _ranked("3.7")),
    },
    (3, 8): {
        ("sm90", "bwd", "32", "128"): ((128, 32, 8, 2), _fixed("3.8")),
        ("sm90", "bwd_class", "16", "128"): ((64, 64, 4, 3), _ranked("3.8")),
        ("sm90", "fwd", "16", "256"): ((128, 64, 8, 3), _ranked("3.8")),
        ("sm90", "fwd", "32", "256"): ((32, 32, 4, 2), _fixed("3.8")),
        ("sm90", "fwd", "64", "chunked"): ((64, 64, 4, 2), _ranked("3.8")),
        ("sm90", "fwd_class", "64", "chunked"): ((128, 64, 8, 3), _ranked("3.8")),
    },
}
SPILL_ALLOWANCE_BY_TRITON = {
    (3, 6): {("bwd", "32ieee", "chunked"): 24, ("bwd", "64", "128"): 112,
             ("bwd_class", "32ieee", "128"): 720},
    (3, 7): {("bwd", "32ieee", "chunked"): 16, ("bwd_class", "32ieee", "128"): 16},
    (3, 8): {("bwd", "32ieee", "chunked"): 8},
}
NO_HGMMA_BY_TRITON = {
    (3, 6): {("fwd", "32", "256")},
    (3, 7): {("bwd_class", "32", "128"), ("fwd", "32", "256")},
    (3, 8): {("fwd", "32", "256")},
}
KERNELS = ("fwd", "fwd_class", "bwd", "bwd_class")
FALLBACK = [(64, 64, 4, 2), (32, 32, 4, 2), (16, 16, 4, 2)]
FALLBACK_SMEM = 96 * 1024

_override = {}
# (kernel, dtype class, D, flags...) -> the configs launched, for tests' bookkeeping
LAUNCHED = {}


def arch(device):
    """"sm90" for compute capability 9.x, else "other" (CPU under the interpreter stands
    in for sm_90, ``variants.capability``: the GPU sizes take sm90's table, the
    interpreter's own sizes 16 x 16)."""
    major, _ = variants.capability(device)
    return "sm90" if major == 9 else "other"


def dtype_class(element_size, precision=None):
    """"16", "32" (TF32 dots), "32ieee" (fp32 IEEE dots) or "64"."""
    if element_size == 4 and precision == "ieee":
        return "32ieee"
    return {2: "16", 4: "32", 8: "64"}[element_size]


def d_bucket(kernel, d, element_size=2, precision=None):
    """"128", "256" or "chunked" (D beyond the resident limit, ``common``)."""
    if d > tc.resident_limit(kernel, element_size, precision):
        return "chunked"
    return "128" if d <= 128 else "256"


def _block_d(kernel, d, element_size=2, precision=None):
    """The feature width of the tiles in shared memory (the launchers' BLOCK_D)."""
    if d_bucket(kernel, d, element_size, precision) == "chunked":
        return tc.MAX_BLOCK_D
    return max(16, triton.next_power_of_2(d))


def _check_tiles(cfg):
    """A config's tiles may not pass PAD: the launchers pad the per-row vectors the kernels
    stream unmasked (column terms, labels, weights) to a multiple of PAD only."""
    tiles = {k: v for k, v in cfg.kwargs.items() if k.startswith("BLOCK_") and k != "BLOCK_D"}
    big = {k: v for k, v in tiles.items() if v > tc.PAD}
    if big:
        raise ValueError(f"config tiles must be at most PAD = {tc.PAD} (the per-row vectors are "
                         f"padded to a multiple of it), got {big}")
    return cfg


def _config(own, other, warps, stages, kernel):
    names = ("BLOCK_M", "BLOCK_N") if kernel.startswith("fwd") else ("BLOCK_OWN", "BLOCK_OTHER")
    return _check_tiles(triton.Config(dict(zip(names, (own, other))), num_warps=warps,
                                      num_stages=stages))


# the installed triton's (major, minor), read once (kernels.choose goes by it too)
TRITON_VERSION = variants.triton_version()


def _version(triton_version):
    return tuple(triton_version or TRITON_VERSION or ())[:2]


def table(triton_version=None):
    """``TABLE`` as triton ``triton_version`` ((major, minor); default: the installed one)
    launches it: with that version's entries of ``TABLE_BY_TRITON`` in place."""
    return {**TABLE, **TABLE_BY_TRITON.get(_version(triton_version), {})}


def spill_allowance(triton_version=None):
    """``SPILL_ALLOWANCE`` under triton ``triton_version`` (``SPILL_ALLOWANCE_BY_TRITON``)."""
    return {**SPILL_ALLOWANCE, **SPILL_ALLOWANCE_BY_TRITON.get(_version(triton_version), {})}


def no_hgmma(triton_version=None):
    """``NO_HGMMA`` under triton ``triton_version`` (``NO_HGMMA_BY_TRITON``)."""
    return NO_HGMMA | NO_HGMMA_BY_TRITON.get(_version(triton_version), set())


def fallback(kernel, element_size, d, precision=None):
    """The safe config of an architecture without entries (see the module docstring)."""
    block_d = _block_d(kernel, d, element_size, precision)
    for own, other, warps, stages in FALLBACK:
        if (own + stages * other) * block_d * element_size <= FALLBACK_SMEM:
            return (own, other, warps, stages)
    return FALLBACK[-1]


def select(kernel, element_size, d, device, precision=None, arch_key=None):
    """(triton.Config, source) of ``kernel`` for inputs of ``element_size`` bytes, feature
    dim ``d`` and fp32 dot ``precision`` ("ieee", "tf32", "tf32x3") on ``device``; a
    kernel variant with its own entries names them by ``arch_key`` (default: the
    device's architecture)."""
    if kernel in _override:
        return _override[kernel], "override"
    if tc.SMALL:
        return _config(16, 16, 4, 2, kernel), "interpreter sizes"
    key = (arch_key or arch(device), kernel, dtype_class(element_size, precision),
           d_bucket(kernel, d, element_size, precision))
    found = TABLE_BY_TRITON.get(_version(None), {}).get(key) or TABLE.get(key)
    if found:
        entry, source = found
        return _config(*entry, kernel), source
    return _config(*fallback(kernel, element_size, d, precision), kernel), "fallback"


def overridden(kernel):
    return kernel in _override


@contextlib.contextmanager
def override(fwd=None, bwd=None):
    """Pin the forward kernels to config ``fwd`` and the backward ones to ``bwd``."""
    pins = {kernel: fwd if kernel.startswith("fwd") else bwd for kernel in KERNELS}
    pins = {kernel: _check_tiles(cfg) for kernel, cfg in pins.items() if cfg is not None}
    saved = dict(_override)
    _override.update(pins)
    try:
        yield
    finally:
        _override.clear()
        _override.update(saved)
