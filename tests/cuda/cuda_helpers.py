"""Helpers of tests/cuda (GPU only; see test_cuda_backend.py for how to run them).

The cases and the oracle are shared with tests/triton (tests/launcher_cases.py). Not a conftest.py: a second
``conftest`` module would replace tests/conftest.py in ``sys.modules`` and break its
``from conftest import ...`` users.
"""
import os
import types

import launcher_cases as cases

# NBK_CUDA_EMULATE=1: the ops run emulated on CPU tensors (see emulation.py)
EMULATED = os.environ.get("NBK_CUDA_EMULATE") == "1"
DEVICE = "cpu" if EMULATED else "cuda"


def make_case(*args, **kwargs):
    return cases.make_case(DEVICE, *args, **kwargs)


HELPERS = types.SimpleNamespace(make_case=make_case, ref_lse=cases.ref_lse,
                                ref_probs=cases.ref_probs, row_shift=cases.row_shift,
                                close=cases.close, acc_dtype=cases.acc_dtype,
                                device=DEVICE, emulated=EMULATED)
