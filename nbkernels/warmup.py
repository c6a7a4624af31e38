"""``nbkernels.warmup``: compile the kernels a training run will use before its first step.

The Triton kernels compile on first use, one variant per input dtype, feature dim, metric
and form (a few seconds each on a cold cache). ``warmup`` runs each requested form once,
forward and backward, on a few rows of the given dtype and dim, so that those compiles
happen up front, and reports what ran and how long it took. Sizes do not matter: the
kernels are not specialised on N or M, so a warmed variant serves every batch size.

Triton keeps compiled kernels on disk (``~/.triton/cache``, or ``TRITON_CACHE_DIR``), so
a later process on the same machine compiles nothing. On a cluster whose nodes share a
filesystem, point ``TRITON_CACHE_DIR`` at a shared folder to compile once for all of them.
"""
from __future__ import annotations

import contextlib
import time

import torch

from nbkernels import _validation as check
from nbkernels import kernel_inputs
from nbkernels import functional

FORMS = ("batch", "cross", "prototype", "predict")


def _triton_kernels():
    """The Triton backend's kernel module, or None without triton."""
    try:  # triton is optional: loaded here only, where it is needed
        from nbkernels.backends.triton import kernels
    except ImportError:  # no triton: nothing to compile
        return None
    return kernels


def _launched():
    kernels = _triton_kernels()
    return {} if kernels is None else dict(kernels.configs.LAUNCHED)


def _every_form():
    """The batch loss's backward in both its forms at warm-up's few rows (a large batch
    runs one with one exp2 per pair, which small ones skip: kernels.ONE_EXP_MIN_ROWS)."""
    kernels = _triton_kernels()
    return contextlib.nullcontext() if kernels is None else kernels.every_form()


def _run_form(form, dtype, dim, metric, device, num_classes, backend):
    g = torch.Generator().manual_seed(0)
    c = max(2, num_classes)
    x = torch.randn(4, dim, generator=g).to(device, dtype).requires_grad_()
    y = torch.arange(4) % 2
    y = y.to(device)
    kw = dict(temperature=0.1, metric=metric, backend=backend)
    if form == "batch":
        functional.nca_loss(x, y, **kw).backward()
    elif form == "cross":
        r = torch.randn(6, dim, generator=g).to(device, dtype).requires_grad_()
        functional.nca_loss(x, y, ref_embeddings=r, ref_labels=(torch.arange(6) % 2).to(device),
                           **kw).backward()
    elif form == "prototype":
        functional.prototype_loss(x, y, **kw).backward()
    elif form == "predict":
        # the class forward's tile width depends on C and on whether M >= 10 C
        m = 10 * c
        r = torch.randn(m, dim, generator=g).to(device, dtype)
        labels = (torch.arange(m) % c).to(device)
        functional.soft_knn_predict(x.detach(), r, labels, c, temperature=0.1, metric=metric,
                                   backend=backend)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warmup(dtype=torch.float32, dim=128, *, metric="sqeuclidean", forms=("batch",),
           num_classes=10, device="cuda", backend="auto", verbose=True):
    """Compile the kernels of ``forms`` for inputs of ``dtype`` and feature dim ``dim``.

    Args:
        dtype: the embeddings' dtype (fp32, fp16, bf16, fp64).
        dim: the feature dim D.
        metric: "sqeuclidean", "cosine" or "dot".
        forms: any of "batch" (``nca_loss`` of the batch against itself), "cross"
            (``nca_loss`` against other references: banks, ``NeighborCache``), "prototype"
            (``prototype_loss``), "predict" (``soft_knn_predict``); forward and backward.
        num_classes: C for "predict" (the class kernels' tile width depends on it).
        device, backend: as for the losses; only backend "triton" compiles anything.
        verbose: print one line per form.

    Returns a list of dicts: form, seconds, and the kernel variants launched for the first
    time in this process (``kernels``; empty once warm, or for backends that compile
    nothing). Raises ``ValueError`` for an unknown form.

    Example::

        nbkernels.warmup(torch.bfloat16, 128, metric="cosine", forms=("batch", "predict"),
                         num_classes=1000)
    """
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        raise ValueError(f"forms must be among {FORMS}, got {unknown}")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"dtype must be a floating dtype (fp16, bf16, fp32, fp64), got {dtype}")
    check.choice("metric", metric, kernel_inputs.METRICS)
    device = torch.device(device)
    out = []
    for form in forms:
        before = _launched()
        t0 = time.perf_counter()
        with _every_form():
            _run_form(form, dtype, dim, metric, device, num_classes, backend)
        seconds = time.perf_counter() - t0
        new = [k for k in _launched() if k not in before]
        out.append(dict(form=form, seconds=seconds, kernels=[_describe(k) for k in new]))
        if verbose:
            print(f"nbkernels.warmup: {form} ({str(dtype).removeprefix('torch.')}, D={dim}, "
                  f"{metric}) {seconds:.2f} s, "
                  f"{len(new)} kernel variant(s) compiled or loaded: "
                  + (", ".join(_describe(k) for k in new) or "none"))
    return out


def _describe(key):
    kind, dtype, d, flags = key
    on = [name.lower() for name, value in flags if value == "True" and name not in ("RESIDENT",)]
    return f"{kind}[{dtype.removeprefix('torch.')}, D={d}{', ' if on else ''}{', '.join(on)}]"
