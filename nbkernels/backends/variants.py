"""The seam for architecture variants: which kernel a fused backend launches, chosen from
the device's compute capability and the triton version by one function, ``choose``, over
the backend's table.

Each backend keeps one table, a list of :class:`Variant` in order of preference
(``nbkernels.backends.triton.kernels.VARIANTS``, ``nbkernels.backends.cuda.VARIANTS``); the
first entry whose kind matches and whose capability and triton ranges hold is launched.
Every table ends with a "generic" entry per kind that holds everywhere. An sm_90-only
kernel (TMA loads, warp specialization) is then one entry in front of the generic one,
``Variant("fwd", "sm90_tma", kernel, capability=((9, 0), (10, 0)))``, plus its kernel
file: the launchers, the config table (``configs``: its ``configs`` key), the SASS build
(``bench/sass/build.py`` compiles what ``choose`` picks for sm_90) and the tests
(``applicable``) follow from the entry.

The interpreter (TRITON_INTERPRET=1) and the CUDA emulator run on the CPU and stand in for
the GPU whose tile configs they run: a CPU device reports ``EMULATED_CAPABILITY`` (sm_90).
"""
import contextlib
import dataclasses
import os
import re
from typing import Any, Optional

import torch

EMULATED_CAPABILITY = (9, 0)
UNKNOWN = (0, 0)
ANY = ((0, 0), (1 << 30, 0))


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel of a backend's table.

    kind: the launch it serves ("fwd", "fwd_class", "bwd", "bwd_class"). name: its name in
    bookkeeping and test ids. kernel: what the launcher runs (a ``triton.jit`` function,
    or the name of a ``torch.ops.nbkernels`` op). capability: [lo, hi) compute
    capabilities. triton: [lo, hi) triton versions as (major, minor); ``None`` for a
    backend that does not use triton. configs: the architecture key of its tile configs
    (``triton.configs.TABLE``); ``None``: the device's. precisions: the dot precisions of
    fp32 inputs it serves ("tf32", "tf32x3", "ieee"; what a launch passes as
    ``PRECISION``, "ieee" for every other dtype); ``None``: all. flags: the compile-time
    flags a launch of it sets, as (name, value) pairs. opt_in: launched only when pinned
    or named in the environment variable NBK_VARIANTS (comma-separated names), for a
    kernel that no CPU check runs. interpreted: whether it runs under the interpreter
    (Gluon kernels do not): where the launch is interpreted, it does not hold.
    """
    kind: str
    name: str
    kernel: Any
    capability: tuple = ANY
    triton: Optional[tuple] = None
    configs: Optional[str] = None
    precisions: Optional[tuple] = None
    flags: tuple = ()
    opt_in: bool = False
    interpreted: bool = True

    def holds(self, capability, triton_version=None, precision=None, interpreted=False):
        """Whether it serves a launch on ``capability`` with ``triton_version`` and dot
        ``precision`` (``interpreted``: on the CPU, through the interpreter or emulator);
        a version or precision of None is not checked."""
        if interpreted and not self.interpreted:
            return False
        lo, hi = self.capability
        if not lo <= tuple(capability) < hi:
            return False
        if not (self.precisions is None or precision is None or precision in self.precisions):
            return False
        if self.triton is None or triton_version is None:
            return True
        lo, hi = self.triton
        return lo <= tuple(triton_version) < hi

    def flag(self, name, default=False):
        """The value this variant sets for compile-time flag ``name``."""
        return dict(self.flags).get(name, default)


def capability(device):
    """The compute capability (major, minor) the kernels for ``device`` are chosen by. A
    CUDA device that cannot be queried (fake tensors traced on a CPU-only build of torch)
    reports ``UNKNOWN``: only the portable ("generic") kernels hold for it."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return UNKNOWN
        return tuple(torch.cuda.get_device_capability(device))
    return EMULATED_CAPABILITY


def triton_version():
    """The installed triton's (major, minor), or None without triton."""
    try:
        import triton
    except ImportError:
        return None
    major, minor = re.match(r"(\d+)\.(\d+)", triton.__version__).groups()
    return int(major), int(minor)


_pinned = {}


def opted_in():
    """The opt-in variants' names in NBK_VARIANTS (comma-separated)."""
    return {n.strip() for n in os.environ.get("NBK_VARIANTS", "").split(",") if n.strip()}


def choose(table, kind, capability, triton_version=None, precision=None, interpreted=False):
    """The first variant of ``table`` for ``kind`` that holds for ``capability``,
    ``triton_version``, ``precision`` and ``interpreted`` (a pinned one first:
    ``pinned``; an opt-in one only where pinned or named in NBK_VARIANTS)."""
    name = _pinned.get((id(table), kind))
    names = opted_in()
    for v in table:
        if v.kind == kind and (v.name == name if name else
                               (not v.opt_in or v.name in names)
                               and v.holds(capability, triton_version, precision,
                                           interpreted)):
            return v
    raise LookupError(f"no {kind!r} kernel for compute capability {capability}, "
                      f"triton {triton_version} and precision {precision!r} "
                      f"(and pinned {name!r})")


def applicable(table, kind, capability, triton_version=None, precision=None,
               interpreted=False):
    """Every variant of ``table`` for ``kind`` that holds, opt-in ones included: what
    tests run on a device."""
    return [v for v in table
            if v.kind == kind and v.holds(capability, triton_version, precision, interpreted)]


@contextlib.contextmanager
def pinned(table, kind, name):
    """Launch variant ``name`` for ``kind`` (one kind, or a tuple of kinds) from ``table``
    while inside (tests run each applicable variant, not only the preferred one)."""
    keys = [(id(table), k) for k in ((kind,) if isinstance(kind, str) else kind)]
    saved = {key: _pinned.get(key) for key in keys}
    _pinned.update((key, name) for key in keys)
    try:
        yield
    finally:
        for key, was in saved.items():
            if was is None:
                _pinned.pop(key, None)
            else:
                _pinned[key] = was


@contextlib.contextmanager
def registered(table, variant):
    """``variant`` in front of ``table`` while inside (a variant under test, not yet an
    entry of the table)."""
    table.insert(0, variant)
    try:
        yield variant
    finally:
        table.remove(variant)
