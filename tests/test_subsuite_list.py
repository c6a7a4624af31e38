"""The sub-suites ``python -m pytest`` runs (tests/subsuites.py): the oldest triton's run
exists exactly where NBK_OLDEST_TRITON names an install, and runs under it."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _module():
    spec = importlib.util.spec_from_file_location("nbk_subsuites", HERE / "subsuites.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_oldest_triton_suite_only_where_an_install_is_named(monkeypatch, tmp_path):
    mod = _module()
    monkeypatch.delenv(mod.OLDEST, raising=False)
    assert mod.subsuites() == mod.SUBSUITES
    monkeypatch.setenv(mod.OLDEST, str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    extra = [s for s in mod.subsuites() if s not in mod.SUBSUITES]
    assert len(extra) == 1
    name, directory, env, _ = extra[0]
    assert directory == "tests/triton" and env["NBK_TRITON_SIZES"] == "gpu"
    # the install first on the path, the caller's path kept; tests/triton/conftest.py
    # refuses to run under any other triton than the one expected
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path.resolve()), "/elsewhere"]
    assert env["NBK_EXPECT_TRITON"] == "3.6" and env["TRITON_INTERPRET"] == "1"


def test_triton_suite_refuses_another_triton_than_expected():
    """NBK_EXPECT_TRITON names the version the run is for: another one stops it."""
    triton = pytest.importorskip("triton")
    other = "3.6" if not triton.__version__.startswith("3.6.") else "3.9"
    env = {k: v for k, v in os.environ.items() if k != "NBK_TEST_DEVICE"}
    env.update(TRITON_INTERPRET="1", NBK_EXPECT_TRITON=other)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only",
                          "-p", "no:cacheprovider", "tests/triton"],
                         cwd=HERE.parent, env=env, capture_output=True, text=True)
    assert out.returncode == 4, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"NBK_EXPECT_TRITON={other} but triton {triton.__version__}" in out.stdout + out.stderr
