"""Checks at the public boundary. Every message names the argument, what was
expected and what was given."""
from __future__ import annotations

import math
import os

import torch

METRICS = ("sqeuclidean", "cosine", "dot")
REDUCTIONS = ("mean", "sum", "none")
BACKEND_NAMES = ("auto", "reference", "torch", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not built, no GPU, no Triton)."""


def embeddings(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), "
                        f"got {x.dtype}")


def labels(name, y, n, of):
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer labels, got {type(y).__name__}")
    if y.dtype == torch.bool or y.dtype.is_floating_point or y.dtype.is_complex:
        raise TypeError(f"{name} must have an integer dtype, got {y.dtype}")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match {of}, got {tuple(y.shape)}")


def device_check(ok, message, detail=None):
    """Raise ``ValueError`` unless the 0-dim bool tensor ``ok`` holds.

    On the CPU the error is immediate, with ``detail()`` (the values seen) when given.
    On accelerators, and while compiling, there is no host sync: the check fires
    asynchronously with ``message``, as ``torch._assert_async`` does.
    """
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(detail() if detail is not None else message)
    else:
        torch._assert_async(ok, message)


def label_range(name, y, num_classes):
    """``y`` in [0, num_classes), without a host sync on accelerators."""
    if y.numel() == 0:
        return
    message = f"{name} must lie in [0, num_classes={num_classes})"
    device_check(((y >= 0) & (y < num_classes)).all(), message,
                 lambda: f"{message}, got values in [{int(y.min())}, {int(y.max())}]")


def labels_among(name, y, known_name, known):
    """Every value of ``y`` occurs in ``known``, without a host sync on accelerators."""
    if y.numel() == 0:
        return
    message = f"{name} must only hold labels that {known_name} holds"

    def detail():
        missing = torch.unique(y[~torch.isin(y, known)])
        return f"{message}, got {missing[:8].tolist()} that {known_name} lacks"

    device_check(torch.isin(y, known).all(), message, detail)


def num_classes(value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"num_classes must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"num_classes must be >= 1, got {value}")


def same_dim(name, x, ref_name, r):
    if x.shape[1] != r.shape[1]:
        raise ValueError(f"{name} must have the feature dimension of {ref_name} "
                         f"({r.shape[1]}), got {x.shape[1]}")


def same_device(**tensors):
    devices = {k: v.device for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def choice(name, value, options):
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {options}, got {type(value).__name__}")
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def acc_dtype(dtype):
    """The accumulation dtype of inputs of ``dtype``: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def temperature(value, device, dtype=torch.float32):
    """Return the temperature as a 0-dim tensor on ``device``.

    A Python number becomes a tensor of ``dtype`` (pass the accumulation dtype of the
    inputs: fp64 for fp64 inputs, so that T = 0.1 is exact there); a tensor keeps its own.
    """
    if isinstance(value, bool):
        raise TypeError("temperature must be a float or a 0-dim tensor, got bool")
    if isinstance(value, (int, float)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"temperature must be finite and > 0, got {value}")
        # torch.full writes on the device: no blocking host-to-device copy
        return torch.full((), float(value), dtype=dtype, device=device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"temperature must be a float or a 0-dim tensor, got {type(value).__name__}")
    if value.dim() != 0:
        raise ValueError(f"temperature must be a 0-dim tensor, got shape {tuple(value.shape)}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"temperature must be a floating tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"temperature must be on the embeddings' device {device}, got {value.device}")
    message = "temperature must be finite and > 0"
    device_check(torch.isfinite(value) & (value > 0), message,
                 lambda: f"{message}, got {value.item()}")
    return value


def backend(value, device):
    """Resolve ``backend`` (and ``NBKERNELS_BACKEND`` for "auto") to a concrete name."""
    choice("backend", value, BACKEND_NAMES)
    if value == "auto":
        env = os.environ.get("NBKERNELS_BACKEND", "auto")
        if env not in BACKEND_NAMES:
            raise ValueError(f"environment variable NBKERNELS_BACKEND must be one of "
                             f"{BACKEND_NAMES}, got {env!r}")
        value = env
    if value == "auto":
        return "triton" if device.type == "cuda" and _triton_ok(device) else "torch"
    if value == "triton" and not _triton_ok(device):
        raise BackendUnavailableError(
            f"backend 'triton' cannot run on {device}: it needs the triton package and a CUDA "
            "device, or TRITON_INTERPRET=1 set before triton is imported for CPU tensors"
            + _triton_problem(device))
    if value == "cuda" and not _cuda_ok(device):
        raise BackendUnavailableError(
            f"backend 'cuda' cannot run on {device}: it needs CUDA tensors and the compiled "
            "extension nbkernels._C, built by installing from source on a machine with a CUDA "
            "toolkit and a CUDA build of torch (FORCE_CUDA=1 pip install -e .); "
            "or use backend='triton' or 'torch'")
    return value


def _cuda_ok(device):
    try:
        from nbkernels.backends import cuda as cuda_backend
    except ImportError:
        return False
    return cuda_backend.is_available(device)


def _triton_problem(device):
    """"; <why the interpreter cannot run>" for CPU tensors under it, else ""."""
    if device.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
        return ""
    try:
        from nbkernels.backends import triton as triton_backend
        problem = triton_backend.interpreter_problem() if triton_backend.triton else None
    except ImportError:
        return ""
    return f"; {problem}" if problem else ""


def _triton_ok(device):
    try:
        from nbkernels.backends import triton as triton_backend
    except ImportError:
        return False
    return triton_backend.is_available(device)
