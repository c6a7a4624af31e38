"""Triton backend tests. They run in their own process, since triton reads
TRITON_INTERPRET once, when it is imported::

    TRITON_INTERPRET=1 python -m pytest tests/triton        # CPU, Triton interpreter
    NBK_TEST_DEVICE=cuda python -m pytest tests/triton      # GPU; adds bf16

Under the interpreter the GPU's arithmetic is modelled (``device_numerics.py``:
ex2.approx.ftz, log2 under flush-to-zero, div.full, fused multiply-adds, and dots whose
every element is computed alike, TF32 inputs cut to 10 bits); NBK_DEVICE_NUMERICS=0
turns that off.

On a GPU the kernels run with one fixed config (NBK_TRITON_AUTOTUNE=0, set here unless
already set, before the backend is imported): autotuning would benchmark every config
for every new shape bucket. ``test_triton_configs.py`` runs each tuned config instead.

The oracle is ``nbkernels.backends.reference`` on the same (rounded) inputs upcast to
fp64, differentiated by autograd: the tolerance tables then bound each kernel's own
error, not the sum of its error and an fp32 oracle's.
"""
import functools
import os
import types

import pytest
import torch

import device_numerics
import launcher_cases as cases

# before the triton backend is imported (the tb fixture), which reads it
os.environ.setdefault("NBK_TRITON_AUTOTUNE", "0")
DEVICE = os.environ.get("NBK_TEST_DEVICE", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "nightly: long numerics runs, deselected unless "
                            "NBK_NIGHTLY=1 (bench/gpu_check.sh sets it on a GPU)")
    # the interpreter evaluates both sides of tl.where: log(0), 0 * inf in masked lanes
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")
    # triton 3.6's interpreter converts 1-element arrays with int() (NumPy < 2.4 warns)
    config.addinivalue_line("filterwarnings",
                            "ignore:Conversion of an array with ndim > 0:DeprecationWarning")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise pytest.UsageError(
            "tests/triton on CPU need the Triton interpreter, set before triton is imported: "
            "TRITON_INTERPRET=1 python -m pytest tests/triton (or NBK_TEST_DEVICE=cuda on a GPU); "
            f"TRITON_INTERPRET is {os.environ.get('TRITON_INTERPRET')!r}")
    if DEVICE not in ("cpu", "cuda"):
        raise pytest.UsageError(f"NBK_TEST_DEVICE must be 'cpu' or 'cuda', got {DEVICE!r}")
    if DEVICE == "cpu":
        from nbkernels.backends import triton as triton_backend
        problem = triton_backend.interpreter_problem()
        if problem:
            raise pytest.UsageError(f"tests/triton cannot run here: {problem}")
        if os.environ.get(device_numerics.ENV, "1") != "0":
            # the GPU's exp2 / log2 / division / dot arithmetic (device_numerics.py)
            device_numerics.install()
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("NBK_TEST_DEVICE=cuda but torch sees no CUDA device")
    expect = os.environ.get("NBK_EXPECT_TRITON")
    if expect:
        import triton
        if not triton.__version__.startswith(expect + "."):
            raise pytest.UsageError(f"NBK_EXPECT_TRITON={expect} but triton {triton.__version__} "
                                    f"is imported (from {os.path.dirname(triton.__file__)})")


def pytest_report_header(config):
    import numpy
    import triton
    return (f"triton {triton.__version__} ({os.path.dirname(triton.__file__)}), numpy "
            f"{numpy.__version__}, NBK_TRITON_SIZES={os.environ.get('NBK_TRITON_SIZES', '-')}")


def pytest_collection_modifyitems(config, items):
    """Deselect the ``nightly`` tests unless NBK_NIGHTLY=1."""
    if os.environ.get("NBK_NIGHTLY") == "1":
        return
    keep = [item for item in items if item.get_closest_marker("nightly") is None]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


@pytest.fixture(scope="session")
def tb():
    """The triton backend module (imported here, after the configure-time checks)."""
    from nbkernels.backends import triton as triton_backend
    return triton_backend


@pytest.fixture(scope="session")
def h():
    """Shared helpers: make_case, ref_lse, ref_probs, row_shift, close, acc_dtype."""
    return types.SimpleNamespace(make_case=functools.partial(cases.make_case, DEVICE),
                                 ref_lse=cases.ref_lse, ref_probs=cases.ref_probs,
                                 row_shift=cases.row_shift, close=cases.close,
                                 acc_dtype=cases.acc_dtype, device=DEVICE)
