"""Backends: one module per implementation of the same algorithm, and the one gateway to them.

Everything above the backends (``autograd``, ``partials``, ``streaming``,
``distributed``, ``cache``, ``functional``) reaches one through this module:

* ``NAMES`` the backends, ``CHOICES`` what ``backend=`` takes ("auto" too);
* :func:`resolve` turns "auto" (and ``NBKERNELS_BACKEND``) into a name that can run on
  a device, or raises ``BackendUnavailableError`` saying why one cannot;
* :func:`get` returns the launcher set of a backend for inputs of a device and dtype;
  where a backend has no kernels for a dtype (``cuda`` and fp64) it returns the one that
  runs them instead (``torch``), with a warning: that decision is made here only.

``reference`` materializes N x M and is differentiated by autograd: the oracle; its
launchers (``reference.py``) run the same interface, so that every chunked and
distributed path also runs with it. Every fused backend (``torch``, ``triton``,
``cuda``) is a module exposing four plain launchers that take and return tensors.
``nbkernels.autograd`` wraps them in ``torch.autograd.Function``s. Common conventions:

* ``q`` (N, D) and ``r`` (M, D) share one floating dtype and device, any strides.
* ``metric`` is ``"sqeuclidean"`` or ``"dot"``. Cosine reaches the launchers as
  ``"dot"`` on rows that ``nbkernels.kernel_inputs`` has already normalized (and
  "sqeuclidean" rows centred).
* ``temperature`` is a 0-dim tensor on the device in the accumulation dtype, made so by
  ``kernel_inputs.kernel_temperature`` (the one cast: the public API's checks and the
  autograd Functions apply it); never read on the host. ``dt`` comes back in that dtype.
* ``offset`` is ``None`` (no exclusion) or an int: query ``i`` skips reference ``i + offset``.
* Accumulation is fp32, fp64 for fp64 inputs. Returned row statistics use that dtype.
* lse values are *shifted*: for "sqeuclidean" they are computed from
  ``(2 q.r - ||r||^2) / T`` (the row constant ``-||q||^2/T`` is left out). Rows
  without any term hold ``-inf``. These (lse_all, lse_pos, class mass) are mergeable
  partial states: two chunks of references combine with ``logaddexp``.
* Gradients are those of the *true* logits (the row constant included); each is
  returned in its input's dtype, or ``None`` when its ``need_*`` flag is false.
  ``symmetric=True`` (the batch loss: ``r is q``, one label vector, offset None or 0;
  decided once per call by ``kernel_inputs.symmetric``, checked by the launchers) lets a
  launcher score the symmetric logits once and return the summed gradient as ``dq`` and
  ``None`` as ``dr``: autograd adds the two anyway. Without it (the default) every
  launcher computes dq and dr separately, whatever the inputs.

Launchers::

    lse_forward(q, r, q_labels, r_labels, temperature, *, metric, offset, symmetric=False)
        -> (lse_all, lse_pos)
    lse_backward(q, r, q_labels, r_labels, temperature, lse_all, lse_pos, g_all, g_pos,
                 *, metric, offset, need_q, need_r, need_t, symmetric=False) -> (dq, dr, dt)
    probs_forward(q, r, r_labels, temperature, num_classes, *, metric, offset)
        -> (yhat, lse_all)
    probs_backward(q, r, r_labels, temperature, yhat, lse_all, g,
                   *, metric, offset, need_q, need_r, need_t) -> (dq, dr, dt)
"""

import os
import warnings

# not "import torch": the name would shadow this package's module ``torch`` (the backend)
import torch as _torch

from nbkernels._validation import BackendUnavailableError, choice

NAMES = ("reference", "torch", "triton", "cuda")
CHOICES = ("auto",) + NAMES
ENV = "NBKERNELS_BACKEND"


def _module(name):
    """A backend's launcher module. Plain imports, so that Dynamo traces the dispatch;
    ``triton`` and ``cuda`` load on first use only (triton, the compiled extension)."""
    if name == "torch":
        from nbkernels.backends import torch as module
    elif name == "triton":
        from nbkernels.backends import triton as module
    elif name == "cuda":
        from nbkernels.backends import cuda as module
    elif name == "reference":
        from nbkernels.backends import reference as module
    else:
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}")
    return module


def unavailable(name, device):
    """None when backend ``name`` can run on ``device``, else why not (a sentence)."""
    if name in ("reference", "torch"):
        return None
    if name == "triton":
        try:
            module = _module("triton")
        except ImportError as e:
            return f"triton is not importable ({e})"
        if module.is_available(device):
            return None
        why = ("it needs the triton package and a CUDA device, or TRITON_INTERPRET=1 set "
               "before triton is imported for CPU tensors")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and module.triton:
            problem = module.interpreter_problem()
            why += f"; {problem}" if problem else ""
        return why
    module = _module("cuda")
    if module.is_available(device):
        return None
    return ("it needs CUDA tensors and the compiled extension nbkernels._C, built by "
            "installing from source on a machine with a CUDA toolkit and a CUDA build of torch "
            "(FORCE_CUDA=1 pip install -e .); or use backend='triton' or 'torch'")


def resolve(value, device):
    """The backend that ``backend=value`` names on ``device``: "auto" takes
    ``NBKERNELS_BACKEND`` if set and not empty, else "triton" for CUDA tensors when it can run, else
    "torch". Raises ``ValueError`` for an unknown name and ``BackendUnavailableError``
    when the named backend cannot run on ``device``."""
    choice("backend", value, CHOICES)
    if value == "auto":
        # set but empty (``export NBKERNELS_BACKEND=``) is unset
        value = os.environ.get(ENV) or "auto"
        if value not in CHOICES:
            raise ValueError(f"environment variable {ENV} must be one of {CHOICES}, "
                             f"got {value!r}")
    if value == "auto":
        return "triton" if device.type == "cuda" and unavailable("triton", device) is None \
            else "torch"
    why = unavailable(value, device)
    if why:
        raise BackendUnavailableError(f"backend {value!r} cannot run on {device}: {why}")
    return value


_warned = set()


def get(name, device, dtype):
    """The launcher set of backend ``name`` (resolved) for inputs on ``device`` of
    ``dtype``: the module itself, or the backend that runs what it cannot (``cuda`` has
    no fp64 kernels: fp64 inputs run on ``torch``, with a warning once per process)."""
    if name == "cuda" and dtype == _torch.float64:
        if "cuda-fp64" not in _warned:
            _warned.add("cuda-fp64")
            warnings.warn("backend 'cuda' has no float64 kernels (they use tensor cores): "
                          "float64 inputs run on backend 'torch' instead", UserWarning,
                          stacklevel=3)
        name = "torch"
    return _module(name)
