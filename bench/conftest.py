"""Benchmark options and fixtures. Benchmarks never run in the test suite (see pytest.ini).

``--quick`` (or NBK_BENCH_QUICK=1) shrinks every size so the whole file runs in about a
minute; its results go to $TMPDIR/nbkernels-bench-quick unless NBK_BENCH_RESULTS is set,
so that they never land in bench/results/ and so never in the README tables. The same
holds for the CPU dry run of bench_gpu.py (NBK_GPU_BENCH_DEVICE=cpu).
"""
import os
import tempfile
from pathlib import Path

import pytest
import torch

import _harness as H


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False,
                     help="small sizes, for checking the benchmark code (also NBK_BENCH_QUICK=1)")


def is_quick(config):
    return config.getoption("--quick") or os.environ.get("NBK_BENCH_QUICK", "") not in ("", "0")


@pytest.fixture(scope="session")
def quick(request):
    return is_quick(request.config)


def pytest_configure(config):
    dry = os.environ.get("NBK_GPU_BENCH_DEVICE", "cuda") != "cuda"
    if (is_quick(config) or dry) and "NBK_BENCH_RESULTS" not in os.environ:
        os.environ["NBK_BENCH_RESULTS"] = str(Path(tempfile.gettempdir()) / "nbkernels-bench-quick")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def memory_model():
    return H.MemoryModel()


@pytest.fixture(scope="session")
def result_file():
    """``result_file(name, device)`` -> the session's ResultFile ``<results>/<name>.json``."""
    files = {}

    def get(name, device):
        if name not in files:
            env = dict(H.env_info(device), inputs=H.NCA_INPUTS)
            files[name] = H.ResultFile(H.results_dir() / f"{name}.json", env)
            H.log(f"writing {files[name].path}")
        return files[name]

    return get
