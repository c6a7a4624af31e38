"""The suite's set-up: tolerances, shapes, a backend's :class:`Capabilities`, the hook that
parametrizes the tests from a binding's ``CAPS``, and the ``caps`` / ``launch`` fixtures."""
import dataclasses
import functools

import pytest
import torch

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16

# (dtype, atol, rtol) for every output and gradient, against the fp64 oracle on the same
# rounded inputs. fp32: dT sums N*M terms ds * logit of both signs (seen: 1e-4 on
# |dT| ~ 10). fp16 / bf16: the kernels round ds to the input dtype for the gradient
# products and return gradients in that dtype (seen in fp16: 1.1e-2 on |grad| ~ 25; bf16
# has 3 fewer mantissa bits).
TOLERANCES = [
    (F64, 1e-10, 1e-10),
    (F32, 2e-4, 2e-5),
    (F16, 2e-2, 1e-2),
    (BF16, 1.5e-1, 5e-2),
]
TOL = {dtype: (atol, rtol) for dtype, atol, rtol in TOLERANCES}

METRICS = ["sqeuclidean", "dot"]          # the launchers' metrics
API_METRICS = ["sqeuclidean", "cosine", "dot"]
OFFSETS = [None, 0, 3, -2]
ALL = (True, True, True)
NAN, INF = float("nan"), float("inf")

# (n, m, d, offset): N or M = 1, D = 1, odd sizes, several feature chunks (33, 130);
# N = M = 1 with offset 0 has no term at all
SHAPES = [(1, 1, 1, 0), (1, 1, 3, None), (1, 29, 3, 0), (37, 1, 5, 0), (16, 16, 5, None),
          (17, 40, 5, 0), (21, 18, 33, 0), (21, 18, 130, None), (37, 29, 19, 3)]


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend claims; the suite parametrizes and checks accordingly.

    name: ``backend=`` for the public API. device: where its tensors live.
    dtypes: the dtypes its launchers run (their own kernels). fp64: "native", or
    "fallback" (fp64 inputs run on backend "torch", with a warning). precision: the
    launchers take ``precision=`` (the suite passes "ieee"). deterministic: two runs are
    bitwise equal. shape_dtypes: the dtypes of the shape tests (default: the most exact).
    tile_shapes: extra (n, m, d, offset) that cross this backend's tile edges.
    large: (n, m, d) spanning many tiles. api_backends: the ``backend=`` values of the
    public-API tests (default: ``(name,)``). loose_labels: probs_forward takes labels
    outside [0, C) (they count in lse_all, in no class). emulated: run by an
    interpreter or emulator (slow): gradcheck runs in fast mode. fp32_dot_inf_is_nan: see
    below.
    """
    name: str
    device: str
    dtypes: tuple
    fp64: str = "native"
    precision: bool = False
    deterministic: bool = True
    shape_dtypes: tuple = ()
    tile_shapes: tuple = ()
    large: tuple = (60, 70, 40)
    api_backends: tuple = ()
    loose_labels: bool = True
    emulated: bool = False
    # fp32 as 3xTF32 splits each entry into a high and a low part: inf - inf = NaN, so under
    # "dot" an infinite entry acts as NaN (documented for backend "cuda")
    fp32_dot_inf_is_nan: bool = False

    @property
    def exact(self):
        """The most exact dtype the launchers run themselves."""
        return F64 if F64 in self.dtypes else F32


def _tols(dtypes):
    """The (dtype, atol, rtol) rows of TOLERANCES for ``dtypes``, as pytest params."""
    return [pytest.param((d, a, r), id=str(d).removeprefix("torch.")) for d, a, r in TOLERANCES
            if d in dtypes]


def pytest_generate_tests(metafunc):
    """Parametrize from the binding module's ``CAPS``: ``dtype_tol`` over its dtypes,
    ``shape_tol`` over its shape dtypes, ``exact_tol`` over fp64 / fp32, ``coarse_tol`` over
    fp32 and its least precise dtype, ``shape`` over SHAPES and its tile shapes,
    ``api_backend`` over its public-API backends."""
    caps = getattr(metafunc.module, "CAPS", None)
    if caps is None:
        return
    names = metafunc.fixturenames
    for arg, dtypes in (("dtype_tol", caps.dtypes),
                        ("shape_tol", caps.shape_dtypes or (caps.exact,)),
                        ("exact_tol", [d for d in caps.dtypes if d in (F64, F32)]),
                        ("coarse_tol", [F32, caps.dtypes[-1]])):
        if arg in names:
            metafunc.parametrize(arg, _tols(dtypes))
    if "shape" in names:
        shapes = SHAPES + list(caps.tile_shapes)
        metafunc.parametrize("shape", shapes, ids=["x".join(map(str, s)) for s in shapes])
    if "api_backend" in names:
        metafunc.parametrize("api_backend", caps.api_backends or (caps.name,))


@pytest.fixture
def caps(request, backend):
    """The binding's CAPS; requests ``backend``, which readies it (e.g. the emulator)."""
    return request.module.CAPS


class Launchers:
    """A backend's launchers with its extra keyword arguments bound (``precision``)."""

    def __init__(self, module, **extra):
        self.module, self.extra = module, extra

    def __getattr__(self, name):
        return functools.partial(getattr(self.module, name), **self.extra)

    def lse(self, case, metric, offset, g_all, g_pos, need=ALL, symmetric=False):
        """(lse_all, lse_pos, dq, dr, dt), the lse shifted as the launchers return it."""
        lse_all, lse_pos = self.lse_forward(case.q, case.r, case.a, case.b, case.t,
                                            metric=metric, offset=offset, symmetric=symmetric)
        grads = self.lse_backward(case.q, case.r, case.a, case.b, case.t, lse_all, lse_pos,
                                  g_all, g_pos, metric=metric, offset=offset, need_q=need[0],
                                  need_r=need[1], need_t=need[2], symmetric=symmetric)
        return (lse_all, lse_pos, *grads)

    def probs(self, case, metric, offset, g, need=ALL):
        """(yhat, lse_all, dq, dr, dt)."""
        yhat, lse_all = self.probs_forward(case.q, case.r, case.b, case.t, case.c,
                                           metric=metric, offset=offset)
        grads = self.probs_backward(case.q, case.r, case.b, case.t, yhat, lse_all, g,
                                    metric=metric, offset=offset, need_q=need[0],
                                    need_r=need[1], need_t=need[2])
        return (yhat, lse_all, *grads)


@pytest.fixture
def launch(backend, caps):
    return Launchers(backend, **({"precision": "ieee"} if caps.precision else {}))
