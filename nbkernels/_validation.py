"""Checks at the public boundary. Every message names the argument, what was
expected and what was given."""
from __future__ import annotations

import math
import numbers
import struct

import torch

REDUCTIONS = ("mean", "sum", "none")


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


def integer(name, value, low=None):
    """Return ``value`` as a Python int: an int or NumPy integer (``numbers.Integral``),
    never a bool, and ``>= low`` when ``low`` is given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def real(name, value, low=None, high=None):
    """Return ``value`` as a Python float: a real number (int, float, NumPy scalar; not a
    bool), finite, and in ``[low, high]`` for the bounds given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range
        value = math.inf if value > 0 else -math.inf
    if math.isnan(value) or (low is not None and value < low) or (high is not None and value > high):
        span = (f"in [{low}, {high}]" if low is not None and high is not None
                else f">= {low}" if low is not None else f"<= {high}" if high is not None
                else "not NaN")
        raise ValueError(f"{name} must be a number {span}, got {value!r}")
    return value


def num_classes(value):
    """Return ``num_classes`` as a Python int >= 1 (an int or NumPy integer, not a bool)."""
    return integer("num_classes", value, low=1)


SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes


def seed(value, name="seed", *, optional=False):
    """Return a seed for ``torch.Generator.manual_seed`` as a Python int (or None when
    ``optional``): an int or NumPy integer, not a bool, in [-2**63, 2**64 - 1]."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, "
                        f"got {type(value).__name__} {value!r}")
    value = int(value)
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [-2**63, 2**64 - 1] (the seeds "
                         f"torch.Generator.manual_seed takes), got {value}")
    return value


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


def _short(x):
    return f"{x:.2g}".replace("e+", "e")


def temperature_range(dtype):
    """``(low, high)``: the temperatures valid with accumulation dtype ``dtype``: normal
    numbers of that dtype (then 1/T is finite there too)."""
    info = torch.finfo(dtype)
    return info.tiny, info.max


def _inputs_of(dtype):
    if dtype == torch.float32:
        return "float16/bfloat16/float32 inputs (accumulated in float32)"
    if dtype == torch.float64:
        return "float64 inputs (accumulated in float64)"
    return f"inputs accumulated in {str(dtype).replace('torch.', '')}"


def _rounded(value, dtype):
    """The Python float ``value`` rounded to ``dtype`` (inf beyond its range)."""
    if dtype == torch.float64:
        return value
    if dtype == torch.float32:
        try:
            return struct.unpack("f", struct.pack("f", value))[0]
        except OverflowError:
            return math.copysign(math.inf, value)
    return torch.tensor(value, dtype=torch.float64).to(dtype).item()


_T_TYPES = ("temperature must be a float (or any real number: int, NumPy scalar) "
            "or a 0-dim floating tensor")


def kernel_temperature(t, dtype):
    """The temperature tensor ``t`` as every backend takes it: in the accumulation dtype
    ``dtype``. A differentiable cast (autograd returns its gradient in ``t``'s own dtype),
    the only one: :func:`temperature` makes the public API's T with it, and the autograd
    Functions apply it for callers that reach them directly (a no-op on a T made here)."""
    return t.to(dtype)


def temperature(value, device, dtype=None):
    """Return the temperature as a 0-dim tensor on ``device``.

    ``dtype`` is the accumulation dtype of the inputs (fp64 for fp64 inputs, so that
    T = 0.1 is exact there; fp32 for fp16/bf16/fp32 inputs). T, made in that dtype, must
    be finite, > 0 and a normal number (then 1/T is finite too): in
    [1.2e-38, 3.4e38] for fp32, [2.2e-308, 1.8e308] for fp64. ``None`` (a constructor:
    the inputs are not known yet) checks against fp64, the widest, and returns fp64.

    The result is what every backend receives (``nbkernels.backends``: the temperature in
    the accumulation dtype), made by :func:`kernel_temperature`, the one cast. A real number (int,
    float, NumPy scalar; not a bool) becomes a tensor of ``dtype``; a 0-dim floating tensor
    is cast to ``dtype`` differentiably (its gradient comes back in its own dtype) and
    checked as cast (without a host sync on accelerators, see :func:`device_check`).
    """
    acc = torch.float64 if dtype is None else dtype
    low, high = temperature_range(acc)
    span = f"in [{_short(low)}, {_short(high)}] for {_inputs_of(acc)}"
    if isinstance(value, bool):
        raise TypeError(f"{_T_TYPES}, got bool")
    if isinstance(value, numbers.Real):
        try:
            v = float(value)
        except OverflowError:  # an int beyond the float range
            raise ValueError(f"temperature must be {span}, got an int of "
                             f"{len(str(abs(value)))} digits") from None
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"temperature must be finite and > 0, got {value}")
        made = _rounded(v, acc)
        if not low <= made <= high:
            raise ValueError(f"temperature must be {span}, got {v!r}")
        # torch.full writes on the device: no blocking host-to-device copy
        return torch.full((), made, dtype=acc, device=device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{_T_TYPES}, got {type(value).__name__}")
    if value.dim() != 0:
        raise ValueError(f"temperature must be a 0-dim tensor, got shape {tuple(value.shape)}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"temperature must be a floating tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"temperature must be on the embeddings' device {device}, got {value.device}")
    message = f"temperature must be finite and > 0, and {span}"
    t = value.detach()
    made = kernel_temperature(value, acc)  # in range implies finite and > 0; NaN fails
    ok = (made.detach() >= low) & (made.detach() <= high)

    def detail():
        got = t.item()
        if not (math.isfinite(got) and got > 0):
            return f"temperature must be finite and > 0, got {got}"
        return f"temperature must be {span}, got {got!r} (a {str(t.dtype).replace('torch.', '')} tensor)"

    device_check(ok, message, detail)
    return made
