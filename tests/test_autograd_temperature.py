"""The autograd Functions called directly take a temperature tensor of any floating dtype:
they cast it to the accumulation dtype once (``kernel_inputs.kernel_temperature``), as
the public API does, and return dT in the caller's dtype. Results equal those of the same
call with the temperature already cast, bit for bit."""
import pytest
import torch

from nbkernels.autograd import ClassProbs, NeighborLSE
from nbkernels.kernel_inputs import kernel_temperature
from nbkernels.streaming import Spec, StreamedLSE, StreamedProbs

T_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _inputs(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(13, 6, generator=g, dtype=torch.float64).to(dtype)
    r = torch.randn(9, 6, generator=g, dtype=torch.float64).to(dtype)
    return x, r, torch.randint(0, 3, (13,), generator=g), torch.randint(0, 3, (9,), generator=g)


def _both(fn, t_dtype, acc):
    """fn(T) with T of ``t_dtype`` and with the same T cast first: outputs and dT of each."""
    out = []
    for cast in (False, True):
        t = torch.tensor(0.37, dtype=t_dtype, requires_grad=True)
        arg = kernel_temperature(t, acc) if cast else t
        res = fn(arg)
        res = res if isinstance(res, tuple) else (res,)
        loss = sum(torch.where(torch.isfinite(o), o, 0.0).sum() for o in res)
        (dt,) = torch.autograd.grad(loss, t)
        out.append((res, dt))
    return out


@pytest.mark.parametrize("t_dtype", T_DTYPES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float64])
def test_functions_cast_the_temperature_once(x_dtype, t_dtype):
    x, r, a, b = _inputs(x_dtype)
    acc = torch.float64 if x_dtype == torch.float64 else torch.float32
    calls = {
        "lse": lambda t: NeighborLSE.apply(x, None, a, None, t, "sqeuclidean", 0, "torch"),
        "lse_cross": lambda t: NeighborLSE.apply(x, r, a, b, t, "cosine", None, "torch"),
        "probs": lambda t: ClassProbs.apply(x, r, b, t, 3, "dot", None, "torch"),
        "streamed": lambda t: StreamedLSE.apply(x, r, a, b, t,
                                                Spec("sqeuclidean", None, "torch", 4))[:2],
        "streamed_probs": lambda t: StreamedProbs.apply(x, None, a, t,
                                                        Spec("dot", 0, "torch", 5, 3)),
    }
    for name, fn in calls.items():
        (got, dt), (want, dt_want) = _both(fn, t_dtype, acc)
        for g_, w_ in zip(got, want):
            assert torch.equal(g_, w_), name
        assert dt.dtype == t_dtype and torch.equal(dt, dt_want), name
