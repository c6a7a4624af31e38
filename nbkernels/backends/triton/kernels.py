"""Triton kernels for the fused neighbor losses; the math is in ``reference.py``.

This module is what the launchers (``nbkernels.backends.triton``) and tests import: the two
kernels, from ``kernel_fwd.py`` and ``kernel_bwd.py``, the limits of ``common.py``, which
also holds the tile helpers both kernels call, and ``launch``, which takes each launch's
config from ``configs.py``.

Two kernels, each one body with ``tl.constexpr`` flags (metric, self-exclusion,
class output, accumulation dtype, dot precision). Logits are taken in log2 units:
log2(e)/T is folded into one scale and every exponential is one ``exp2``, as
FlashAttention does. The launcher passes the per-row terms that do not depend on the
pair, so that the loop does no per-pair work for them:

* ``r_col`` (M,): the column term ``-||r_j||^2 log2(e)/T`` for "sqeuclidean" (0 for
  "dot"), -inf for references at infinity (weight 0), so that the logit
  ``2 q.r log2(e)/T + column term`` is one FFMA per pair. The backward also takes
  ``q_col``, the same term of the queries.
* labels are int32 (the launcher ranks int64 labels densely, exactly): one compare
  per pair, not two. PACKED (the lse forward, fp32 accumulation): each reference's
  column term and label rank travel as one int64 (``r_pack``), one load for both.
* every per-row vector that a program streams (column terms, labels, the backward's
  row terms and flags) is padded by the launcher to a multiple of PAD with values that
  weigh nothing (column term -inf): its tile loads need no mask,
  and vectorise.
* self-exclusion (``offset``) is masked only in the reference tiles that meet the
  diagonal ``j = i + offset``: they are peeled out of the main loop as straight-line
  code (FlashAttention's causal split), so the main loop has no mask at all.

RESIDENT (D <= MAX_RESIDENT_D): the program's own rows (the query tile forward, the
dx-owner tile backward) are loaded once, [BLOCK, BLOCK_D >= D], before the loop, and
every logit tile is one ``tl.dot`` over the whole feature dim. Otherwise D is looped
in BLOCK_D chunks and both sides are reloaded per tile.

* ``neighbor_fwd_kernel``: a program owns BLOCK_M queries and streams BLOCK_N
  reference tiles with an online log-sum-exp. Without CLASS: one exp2 per pair; the
  positives' sum is taken from the same exponentials under the shared running max,
  and rows where it underflows get an exact second launch (POS_PASS), over their own
  labels' references only (the references in label order, gathered). With CLASS the
  grid has a second axis over BLOCK_C class tiles; references are pre-sorted by label,
  so the program for class tile ``c`` streams only the references whose labels fall in
  it (``tile_ptr``) and accumulates their mass with a one-hot ``tl.dot``; a lazy row
  shift as above, with an exact second launch for the rows it flags.
* ``neighbor_bwd_kernel``: recomputes each logit tile once and turns it into
  ``ds = dloss / dlogit`` with one exp2 per pair and direction (see its docstring).
  No atomics: every output element has exactly one writer per launch, and launches
  run in a fixed order, so gradients are bitwise deterministic.

Blocks: BLOCK_D / BLOCK_DX are chosen by the launcher from D; BLOCK_M / BLOCK_N /
BLOCK_OWN / BLOCK_OTHER, the warps and the stages come from one config per kernel
variant (``configs``: a table per architecture, dtype and D bucket, no
benchmarking; NBK_TRITON_AUTOTUNE=1 autotunes over GPU_*_CONFIGS instead). Under the
interpreter (TRITON_INTERPRET=1) NBK_TRITON_SIZES picks the GPU's limits and table
("gpu") or 16-wide tiles with a resident limit of 32 ("interpreter", the default), which
keep the tests fast and still exercise multi-block and both D paths.
All blocks are >= 16, the smallest ``tl.dot``.

fp16 gradient dot: ds is rounded to fp16 for the tensor-core dot, and |ds| <= |g| can
sit far below fp16's normal range (g ~ 1/N for a mean loss). With SCALE_DS the
launcher has multiplied the per-row weights of ds by powers of two that bring the
largest |ds| near 2^12 (per query row for dq, one for all rows otherwise), and passes
them in ``ds_scale``; the kernel divides after the dot, exactly.
"""
import contextlib
import functools
import importlib

import torch
import triton

from nbkernels.backends import variants

from . import configs
from .kernel_bwd import neighbor_bwd_kernel
from .common import (  # noqa: F401 (the launchers' and tests' names)
    INTERPRET, SIZES, SMALL, AUTOTUNE, PAD, POS_LOG2_LIMIT, ONE_EXP_LIMITS, ONE_EXP_MIN_ROWS,
    MAX_BLOCK_D,
    MAX_BLOCK_DX, MAX_RESIDENT_D, MAX_RESIDENT_D_BWD, MAX_BLOCK_C, NARROW_BLOCK_C,
    NARROWEST_BLOCK_C, class_block_cap,
    GPU_FWD_CONFIGS, GPU_BWD_CONFIGS, FWD_KEY, BWD_KEY, PRUNE, fits, resident_limit)
from .kernel_fwd import neighbor_fwd_kernel

# the compile-time flags of each kernel: with the dtype and D, a kernel variant
_FLAGS = ("SQEUCLID", "HAS_OFFSET", "CLASS", "POS_PASS", "PACKED", "REF_MAJOR", "SYMMETRIC",
          "FIXUP", "NEED_DX", "NEED_DT", "SCALE_DS", "RESIDENT", "PRECISION",
          "MASS_PRECISION", "BLOCK_C", "BLOCK_D", "BLOCK_DX", "OTHER_T", "AHEAD", "ONE_EXP")


# The kernel variants, in order of preference (``nbkernels.backends.variants``): an
# architecture-specific kernel is one entry in front of the generic one of its kind.
#
# "sm90_tf32_transposed", the backward of fp32 inputs with TF32 dots on sm_90: Hopper's
# warpgroup MMA takes 32-bit operands from shared memory only K-major, and the dx dot's
# K is the other side's rows, which are not contiguous in x. The generic kernel then
# loads each other-side tile through registers (a synchronous load, not cp.async) and
# stores it a second time, transposed, element by element, behind an extra barrier
# (compiled SASS, triton 3.9: 8 LDG.128, 8 STS.128, 32 STS and 4 BAR.SYNC per tile,
# where the 16-bit kernels pipeline their tiles with cp.async); the 32 transposed stores
# put 16 lanes on each of two banks, 16 wavefronts each (bench/sass/banks.py). With
# OTHER_T the launcher passes a transposed copy of the other side, [D, rows padded to
# PAD], and the dx dot takes its tile from there: both tiles are pipelined by 16-byte
# cp.async, with no shared-memory store and one barrier less (the latency model,
# bench/sass/latency.py: about half the generic kernel's time; predicted, not measured;
# the H200 timed the generic TF32 backward at 2.8x the bf16 one). The cost: a transposed
# copy of the other side (r for dq, q for dr and the batch kernel; D x rows, fp32) per
# backward, and twice the other side's tile in shared memory (``fits``). The arithmetic
# is the generic kernel's, element for element.
#
# It holds for the triton versions whose build of it the latency model has faster than
# the generic kernel's (``bench/sass/tf32_backward.py`` run under each,
# bench/results/tf32_backward_sm90*.json; best configs, N = M = 65536): the lse backward
# under 3.6 to 3.9 (D = 128, dq + dr + the batch kernel: 32.6 against 64.4 ms under 3.6,
# 33.4 against 56.0 under 3.9); the class backward from 3.7 (3.7: 28.3 against 65.0 ms,
# 3.9: 28.8 against 48.2), not under 3.6, whose build of the variant's class dq loop is
# the slower there (57.4 against 51.2 ms). Beyond 3.9 nothing is checked: the generic
# kernel.
_TF32_TRANSPOSED = dict(capability=((9, 0), (10, 0)), configs="sm90_tf32t",
                        precisions=("tf32", "tf32x3"), flags=(("OTHER_T", True),))
_TF32_TRANSPOSED_TRITON = {"bwd": ((3, 6), (3, 10)), "bwd_class": ((3, 7), (3, 10))}
#
# "sm90_fwd_ahead", the loss forward of 16-bit inputs on sm_90 under triton 3.6 and 3.7:
# the main loop issues each tile's dot before the softmax of the tile before it (flag
# AHEAD, ``neighbor_fwd_kernel``). Triton 3.6 and 3.7 then interleave the exps with the
# wgmma (64 of a tile's 66 MUFU.EX2 between its HGMMAs, compiled SASS); the plain loop
# waits for each tile's wgmma before its softmax. The latency model has 128 x 128 (8
# warps, 2 stages) at 3.49 against 3.72 ms under 3.6 and 3.49 against 3.78 under 3.7
# (predicted, not measured); at 3 stages, the table's config since the latency model
# chooses it, the loads hide without it and the gain shrinks to 3.09 against 3.11 ms
# (3.7: 3.10 against 3.12), within the model's error. It stays: the one Triton form whose
# exps run under the wgmma, and ``bench/gpu_perf.py`` times the forward both ways.
# Triton 3.8 compiles the same overlap for a loss (2 stages: 4.01 against 3.97 ms; 3:
# 3.60 against 3.26), 3.9 without it (4.74 against 4.55): the generic kernel there.
# fp32 inputs and D > 128 spill with it (48 B, triton 3.6) and keep the plain loop, as
# the FMA dots do.
_FWD_AHEAD = dict(capability=((9, 0), (10, 0)), triton=((3, 6), (3, 8)),
                  flags=(("AHEAD", True),))
#
# "sm90_gluon", kinds "fwd_main" and "fwd_class_main": the main passes of the loss and
# class forwards in Gluon (``gluon_lse``, ``gluon_class``, the modules named here,
# imported at the first launch), for 16-bit inputs with D = 128 (their ``why_not``;
# otherwise the Triton main pass runs), the exact passes Triton's. Each issues a tile's
# wgmma under the previous tile's softmax. The loss forward's (rows and references in
# label order: the positives' sum only in the tiles of a block's labels) is predicted at
# 2.26 ms against 3.09 for the Triton main pass under 3.6, 2.36 against 4.00 under 3.9
# (the latency model, N = M = 65536, bench/results/gluon_fwd_sm90*.json; not measured). Opt-in
# (NBK_VARIANTS=sm90_gluon) until a GPU has run tests/triton/test_gluon_main.py: Gluon has
# no interpreter. The class forward's (1000 classes, the batch's self pair excluded):
# 3.29 against 5.21 ms under 3.6 and 3.48 against 5.09 under 3.9 (bench/results/
# gluon_class_probe_sm90*.json, class_forward_sm90*.json). Each kind's generic entry (no
# kernel) is the Triton main pass.
_GLUON_MAIN = dict(capability=((9, 0), (10, 0)), triton=((3, 6), (3, 10)), opt_in=True,
                   interpreted=False)
VARIANTS = [
    variants.Variant("fwd_main", "sm90_gluon", "gluon_lse", **_GLUON_MAIN),
    variants.Variant("fwd_main", "generic", None),
    variants.Variant("fwd_class_main", "sm90_gluon", "gluon_class", **_GLUON_MAIN),
    variants.Variant("fwd_class_main", "generic", None),
    variants.Variant("fwd", "sm90_fwd_ahead", neighbor_fwd_kernel, **_FWD_AHEAD),
    variants.Variant("fwd", "generic", neighbor_fwd_kernel),
    variants.Variant("fwd_class", "generic", neighbor_fwd_kernel),
    *(v for kind in ("bwd", "bwd_class") for v in (
        variants.Variant(kind, "sm90_tf32_transposed", neighbor_bwd_kernel,
                         triton=_TF32_TRANSPOSED_TRITON[kind], **_TF32_TRANSPOSED),
        variants.Variant(kind, "generic", neighbor_bwd_kernel))),
]
TRITON_VERSION = configs.TRITON_VERSION


def choose(kind, device, precision=None):
    """The variant a launch of ``kind`` on ``device`` with dot ``precision`` runs."""
    return variants.choose(VARIANTS, kind, variants.capability(device), TRITON_VERSION,
                           precision, interpreted=torch.device(device).type != "cuda")


def variant_for(kind, capability, precision=None):
    """The variant a device of ``capability`` launches for ``kind`` at dot ``precision``
    (the SASS build and the first-call prediction compile what sm_90 runs)."""
    return variants.choose(VARIANTS, kind, capability, TRITON_VERSION, precision)


def kernel_for(kind, capability, precision=None):
    """The ``triton.jit`` function of ``variant_for``."""
    return variant_for(kind, capability, precision).kernel


@functools.cache
def _autotuned(jit, fwd):
    """``jit`` under Triton's autotuner (NBK_TRITON_AUTOTUNE=1), results cached on disk."""
    return triton.autotune(configs=GPU_FWD_CONFIGS if fwd else GPU_BWD_CONFIGS,
                           key=FWD_KEY if fwd else BWD_KEY, prune_configs_by=PRUNE,
                           cache_results=True)(jit)


def variant(kind, args):
    """The kernel variant a launch compiles: (kind, input dtype, D, its flags)."""
    return (kind, str(args["q"].dtype), args["D"],
            tuple((k, str(args[k])) for k in _FLAGS if k in args))


def launch(kind, grid, *, tune=True, chosen=None, **args):
    """Launch the forward (kind "fwd", "fwd_class") or backward ("bwd", "bwd_class")
    kernel variant ``chosen`` (default: what ``choose`` picks), with its flags and the
    config of ``configs.select``: ``grid(meta)`` gets the arguments and the config's block
    sizes. With NBK_TRITON_AUTOTUNE=1, launches with ``tune`` (the main passes; not the
    exact / fix-up passes, which would only repeat their main pass's choice) go through
    the autotuner instead."""
    if chosen is None:
        chosen = choose(kind, args["q"].device, args.get("PRECISION"))
    args = {**args, **dict(chosen.flags)}
    if AUTOTUNE and tune and not configs.overridden(kind):
        return _autotuned(chosen.kernel, kind.startswith("fwd"))[grid](**args)
    cfg, _ = configs.select(kind, args["q"].element_size(), args["D"], args["q"].device,
                            args.get("PRECISION"), chosen.configs)
    configs.LAUNCHED.setdefault(variant(kind, args), set()).add(str(cfg))
    return chosen.kernel[grid(dict(args, **cfg.kwargs))](
        **args, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@contextlib.contextmanager
def every_form():
    """Within: the symmetric backward launches its one-exp form at any batch size
    (``ONE_EXP_MIN_ROWS``), so that ``nbkernels.warmup``'s small batches compile every
    kernel a large one runs."""
    global ONE_EXP_MIN_ROWS
    saved, ONE_EXP_MIN_ROWS = ONE_EXP_MIN_ROWS, 0
    try:
        yield
    finally:
        ONE_EXP_MIN_ROWS = saved


def fixed_configs(fwd, bwd):
    """Run both kernels with one given config each (tests go through every GPU config)."""
    return configs.override(fwd, bwd)


def config(kind, element_size, d, device, precision=None):
    """The config a launch of ``kind`` would take (``configs.select``)."""
    return configs.select(kind, element_size, d, device, precision)[0]


def launch_main(kind, grid, args, main=None, **extra):
    """The main pass of forward ``kind`` ("fwd", "fwd_class") on its launch arguments
    ``args``: ``main(args, grid, **extra)`` where given, else the main-pass variant's
    (``main_pass``), else the Triton kernel's (``launch``, POS_PASS=False)."""
    main = main or main_pass(args, kind + "_main")
    if main is None:
        return launch(kind, grid, POS_PASS=False, **args)
    return main(args, grid, **extra)


def main_pass(args, kind="fwd_main"):
    """The main pass of the loss forward (``kind`` "fwd_main": ``forward.lse_forward_passes``'
    ``main``) or the class forward ("fwd_class_main") for launch arguments ``args``: the
    variant's, or None for the Triton kernel's (the generic entry, or a variant whose
    ``why_not`` refuses them)."""
    chosen = choose(kind, args["q"].device, args.get("PRECISION"))
    if chosen.kernel is None:
        return None
    module = importlib.import_module(f"{__package__}.{chosen.kernel}")
    return None if module.why_not(args) else module.main_pass
