"""Triton backend: the launchers of the fused kernels.

The package, in the order of a call:

* ``__init__``: the launcher interface of ``nbkernels.backends`` (below);
* ``forward`` / ``backward``: the custom ops they wrap, and the per-row terms they
  prepare (``rows``: label ranks, column terms, exp shifts) and hand the kernels;
* ``args``: the arguments every launch passes; ``kernels``: the two kernels' front,
  ``launch``, which takes each launch's config from ``configs`` (a table per
  architecture, dtype and feature-dim bucket);
* ``kernel_fwd`` / ``kernel_bwd``: the two ``@triton.jit`` kernels; ``common``: their
  limits, constants and tile helpers.

Implements the launcher interface of ``nbkernels.backends`` (see its docstring),
plus ``precision`` for fp32 inputs and ``is_available``. Each launcher is a thin
wrapper over a ``torch.library.custom_op`` (``nbkernels::triton_*``) with a fake
implementation, so the autograd Functions that call them compile under
``torch.compile(fullgraph=True)`` without graph breaks. Custom ops take no ``None``
offset and return no ``None`` gradient: the wrappers encode ``offset`` as
``(offset, has_offset)`` and turn the empty placeholder gradients back into ``None``.

No launcher reads a device value on the host: the kernels load the logit scale
(``rows.logit_scale``, from the temperature on the device) and every reduction
after a kernel stays on the device. Launches run under the inputs'
CUDA device (``torch.cuda.device``), whatever the current device is.

Importing this module imports triton; with ``TRITON_INTERPRET=1`` set before that
import the kernels run on CPU tensors through the Triton interpreter.
"""
import os
import re

import torch

from nbkernels.kernel_inputs import KERNEL_METRICS, symmetric_flag

try:
    import triton

    from . import kernels as tk
    from . import rows as tr
    # the custom ops (registered on import) and what diagnostics read
    from .backward import lse_backward_rows  # noqa: F401
    from .forward import lse_forward_passes  # noqa: F401
except ImportError:  # the package works without triton; is_available says False
    triton = None

METRICS = KERNEL_METRICS
PRECISIONS = ("ieee", "tf32", "tf32x3")


def is_available(device) -> bool:
    """True when triton imports and can run on ``device``: CUDA, or CPU under the interpreter."""
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    # the kernels were decorated for the interpreter only if the variable was set at import
    return (device.type == "cpu" and tk.INTERPRET and os.environ.get("TRITON_INTERPRET") == "1"
            and interpreter_problem() is None)


def _version(text):
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


def interpreter_problem():
    """Why the Triton interpreter cannot run the kernels with the installed packages, or None.

    Triton 3.6's interpreter turns each scalar argument into a 1-element array and calls
    ``int()`` on it (loop bounds, indices), which NumPy 2.4 made an error; triton 3.7
    fixed it.
    """
    import numpy
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"the interpreter of triton {triton.__version__} calls int() on 1-element "
                f"arrays, an error since NumPy 2.4 (numpy {numpy.__version__} is installed): "
                "pip install 'numpy<2.4', or triton >= 3.7")
    return None


# ---------------------------------------------------------------------------- helpers


def _check(metric, precision):
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be None or one of {PRECISIONS}, got {precision!r}")


@torch.compiler.assume_constant_result
def _default_precision():
    """"tf32" when torch allows TF32 matmuls, else "ieee".

    Read once per trace under torch.compile (a constant, not a guard). Newer torch
    raises on reading ``allow_tf32`` once ``fp32_precision`` was set: read that first.
    """
    matmul = torch.backends.cuda.matmul
    fp32_precision = getattr(matmul, "fp32_precision", "none")
    if fp32_precision != "none":
        return "tf32" if fp32_precision == "tf32" else "ieee"
    return "tf32" if matmul.allow_tf32 else "ieee"


# ------------------------------------------------------------------------- launchers


def _none_unless(t, need):
    return t if need else None


def lse_forward(q, r, q_labels, r_labels, temperature, *, metric, offset, symmetric=False,
                precision=None):
    """Shifted ``(lse_all, lse_pos)``, each (N,) in the accumulation dtype (``symmetric``
    is checked; the forward has no symmetric kernel)."""
    _check(metric, precision)
    symmetric_flag(symmetric, q, r, q_labels, r_labels, offset)
    precision = precision or _default_precision()
    return torch.ops.nbkernels.triton_lse_fwd(q, r, q_labels, r_labels, temperature, metric,
                                              offset or 0, offset is not None, precision)


def lse_backward(q, r, q_labels, r_labels, temperature, lse_all, lse_pos, g_all, g_pos, *,
                 metric, offset, need_q, need_r, need_t, symmetric=False, precision=None):
    """``(dq, dr, dt)`` of ``sum(g_all * lse_all + g_pos * lse_pos)``; ``None`` where not needed.

    ``g_all`` or ``g_pos`` may be ``None`` (zero). ``symmetric`` (the batch loss: ``q is
    r``, one label vector): one kernel, ``dq`` is the whole gradient and ``dr`` is ``None``.
    """
    _check(metric, precision)
    precision = precision or _default_precision()
    acc = tr.acc_dtype(q.dtype)
    g_all = torch.zeros_like(lse_all, dtype=acc) if g_all is None else g_all
    g_pos = torch.zeros_like(lse_pos, dtype=acc) if g_pos is None else g_pos
    sym = symmetric_flag(symmetric, q, r, q_labels, r_labels, offset)
    dq, dr, dt = torch.ops.nbkernels.triton_lse_bwd(
        q, r, q_labels, r_labels, temperature, lse_all, lse_pos, g_all, g_pos, metric,
        offset or 0, offset is not None, sym, need_q, need_r, need_t, precision)
    return (_none_unless(dq, need_q or (sym and need_r)), _none_unless(dr, need_r and not sym),
            _none_unless(dt, need_t))


def probs_forward(q, r, r_labels, temperature, num_classes, *, metric, offset, precision=None):
    """``(yhat, lse_all)``: class distribution (N, num_classes) and shifted lse (N,), acc dtype.

    Rows without any reference get yhat = NaN (as the reference) and lse_all = -inf. Labels
    outside ``[0, num_classes)`` count in lse_all but in no class.
    """
    _check(metric, precision)
    precision = precision or _default_precision()
    return torch.ops.nbkernels.triton_probs_fwd(q, r, r_labels, temperature, int(num_classes),
                                                metric, offset or 0, offset is not None,
                                                precision)


def probs_backward(q, r, r_labels, temperature, yhat, lse_all, g, *, metric, offset, need_q,
                   need_r, need_t, precision=None):
    """``(dq, dr, dt)`` of ``sum(g * yhat)``; ``None`` where not needed."""
    _check(metric, precision)
    precision = precision or _default_precision()
    dq, dr, dt = torch.ops.nbkernels.triton_probs_bwd(
        q, r, r_labels, temperature, yhat, lse_all, g, metric, offset or 0,
        offset is not None, need_q, need_r, need_t, precision)
    return _none_unless(dq, need_q), _none_unless(dr, need_r), _none_unless(dt, need_t)
