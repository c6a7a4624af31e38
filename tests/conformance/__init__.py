"""The conformance suite: one set of tests that every fused backend must pass.

A plain package, not a conftest: a thin test module binds it to one backend by defining

* ``CAPS``, a :class:`Capabilities` (the backend's name, device, dtypes, ...), and
* a ``backend`` fixture that returns the launcher module, ready to run,

then ``from conformance import *`` (the tests, the ``caps`` / ``launch`` fixtures and the
``pytest_generate_tests`` hook that parametrizes them from ``CAPS``). The bindings are
tests/test_conformance_torch.py, tests/triton/test_conformance_triton.py and
tests/cuda/test_conformance_cuda.py.

Two levels are checked: the launchers (``lse_forward``, ``lse_backward``,
``probs_forward``, ``probs_backward``; see ``nbkernels.backends``) and the public API
(``nca_loss``, ``soft_knn_predict``, ``prototype_loss`` with ``backend=<name>``, through
``nbkernels.autograd``). The oracle (``oracle.py``) is written independently of
``nbkernels.backends.reference``: the direct differences ``-||q_i - r_j||^2 / T`` (or the
dot products) in fp64, a masked logsumexp, ``yhat`` by a one-hot matmul, and gradients by
autograd on that formula, on the same (rounded) inputs as the backend. Non-finite inputs
follow the spec in ``reference``'s docstring, implemented here on its own.

The package by concern: ``harness`` (tolerances, shapes, capabilities, parametrization,
fixtures), ``oracle`` (the fp64 formula), ``launchers`` (launcher-level tests), ``api``
(public-API tests), ``oracle_self`` (the oracle against ``reference``, bound once).
"""
from . import api, launchers
from .api import *  # noqa: F401,F403
from .harness import TOL, Capabilities, Launchers, caps, launch, pytest_generate_tests  # noqa: F401
from .launchers import *  # noqa: F401,F403
from .launchers import check_lse, check_probs  # noqa: F401
from .oracle import oracle_lse, oracle_probs, upstream_lse, upstream_probs  # noqa: F401
from .oracle_self import test_reference_matches_oracle  # noqa: F401

# what ``from conformance import *`` binds to a backend: the fixtures, the hook and every
# launcher- and API-level test (the oracle's own check is bound once, by name)
__all__ = ["Capabilities", "caps", "launch", "pytest_generate_tests",
           *[name for module in (launchers, api) for name in vars(module)
             if name.startswith("test_")]]
