"""The conformance suite (tests/conformance/) on backend "torch", on the CPU, with tiny odd
tiles (the ``small_blocks`` fixture) so that every tiling edge shows up on small inputs.

The public-API tests run on backend="reference" too, and the reference's own functions are
checked against the suite's oracle here (once, not per fused backend).
"""
import pytest
import torch

import nbkernels.backends.torch as torch_backend
from conformance import *  # noqa: F401,F403 (the tests, their fixtures and parametrization)
from conformance import Capabilities, test_reference_matches_oracle  # noqa: F401

CAPS = Capabilities(name="torch", device="cpu",
                    dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16),
                    large=(60, 70, 40), api_backends=("reference", "torch"), loose_labels=False)


@pytest.fixture
def backend(small_blocks):
    return torch_backend
