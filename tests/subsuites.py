"""``python -m pytest`` runs all three suites: the main one and, each in its own process,
the Triton interpreter suite (twice: with the interpreter's small tiles, and with the
GPU's block limits and configs; a third time, GPU-sized, under the oldest supported
triton where NBK_OLDEST_TRITON names an install of it) and the CUDA emulator suite.

``tests/triton`` needs ``TRITON_INTERPRET=1`` before triton is imported and ``tests/cuda``
needs ``NBK_CUDA_EMULATE=1``, so neither can run inside the main pytest process. This
plugin (registered by the repository's root ``conftest.py``) adds one test item per
sub-suite that runs ``python -m pytest -q <dir>`` in a subprocess with its variables set.
The item fails when the subprocess exits non-zero (exit code 5, "no tests collected",
included) and shows the tail of its output; the terminal summary lists the result line
of every suite.

The items exist only when this file's directory is collected as a whole (``python -m
pytest`` from the root, or ``python -m pytest tests``), not for ``python -m pytest
tests/test_foo.py``, and only when none of ``TRITON_INTERPRET``, ``NBK_CUDA_EMULATE``
and ``NBK_TEST_DEVICE`` is set (those select a suite explicitly). Select or deselect
them like any test: ``-k "not suite"`` runs the main suite alone.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# (item name, directory, environment variables set for it, what it is)
SUBSUITES = [
    ("test_triton_interpreter_suite", "tests/triton",
     {"TRITON_INTERPRET": "1", "NBK_TRITON_SIZES": "interpreter"},
     "Triton kernels through the Triton interpreter"),
    ("test_triton_gpu_sizes_suite", "tests/triton",
     {"TRITON_INTERPRET": "1", "NBK_TRITON_SIZES": "gpu"},
     "Triton kernels through the interpreter with the GPU's block limits and configs"),
    ("test_cuda_emulator_suite", "tests/cuda", {"NBK_CUDA_EMULATE": "1"},
     "CUDA kernels' source through the CPU emulator"),
]
# An install of the oldest supported triton (3.6, with NumPy < 2.4 for its interpreter),
# made by ``pip install --no-deps --target DIR triton==3.6.0 "numpy<2.4"`` (.ci/run does):
# with NBK_OLDEST_TRITON=DIR the GPU-sized interpreter suite runs once more under it.
# Triton versions differ where it matters (3.6 to 3.8 compile tl.fma's Python-float
# operand as fp32, which an fp64 kernel must not pass them), and the GPU image runs 3.6.
OLDEST = "NBK_OLDEST_TRITON"


def subsuites():
    """SUBSUITES, and the oldest triton's run where NBK_OLDEST_TRITON names its install."""
    where = os.environ.get(OLDEST)
    if not where:
        return SUBSUITES
    path = os.pathsep.join(filter(None, (str(Path(where).resolve()),
                                         os.environ.get("PYTHONPATH"))))
    return SUBSUITES + [
        ("test_triton_oldest_triton_suite", "tests/triton",
         {"TRITON_INTERPRET": "1", "NBK_TRITON_SIZES": "gpu", "NBK_EXPECT_TRITON": "3.6",
          "PYTHONPATH": path},
         f"the GPU-sized interpreter suite under triton 3.6, installed in {where}")]
SELECTORS = ("TRITON_INTERPRET", "NBK_CUDA_EMULATE", "NBK_TEST_DEVICE")
TIMEOUT_S = 30 * 60  # per sub-suite; today each takes a few minutes on 2 CPU cores
TAIL_LINES = 60
# the last line of `pytest -q`: "812 passed, 3 skipped in 101.2s", "no tests ran in 0.1s"
SUMMARY = re.compile(r"^=*\s*(\d+ \w+.* in [\d.]+s.*|no tests ran.*)$")

_results: dict[str, str] = {}  # item name -> the sub-suite's summary line, for the report


def active() -> bool:
    return not any(os.environ.get(name) for name in SELECTORS)


def pytest_collect_file(file_path: Path, parent):
    if active() and file_path.resolve() == Path(__file__).resolve():
        return SubsuiteFile.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(session, config, items):
    """The sub-suites run last, after the main suite's progress has been shown."""
    items.sort(key=lambda item: isinstance(item, SubsuiteItem))


class SubsuiteFile(pytest.File):
    def collect(self):
        for name, directory, env, what in subsuites():
            yield SubsuiteItem.from_parent(self, name=name, directory=directory, env=env, what=what)


class SubsuiteFailed(Exception):
    pass


class SubsuiteItem(pytest.Item):
    def __init__(self, *, directory: str, env: dict, what: str, **kw):
        super().__init__(**kw)
        self.directory, self.env, self.what = directory, env, what
        self.var = " ".join(f"{k}={v}" for k, v in env.items())

    def label(self) -> str:
        return f"{self.directory} ({self.var}, {self.what})"

    def runtest(self):
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", self.directory]
        env = dict(os.environ, **self.env)
        live = self.config.getoption("capture") == "no"  # -s: show the output as it comes
        lines: list[str] = []
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        try:
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if live:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if time.monotonic() - start > TIMEOUT_S:
                    proc.kill()
                    lines.append(f"killed: still running after {TIMEOUT_S} s")
                    break
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        summary = next((s for s in reversed(lines) if SUMMARY.match(s.strip())), None)
        summary = SUMMARY.match(summary.strip()).group(1) if summary else f"exit code {rc}, no summary line"
        _results[self.name] = summary
        if rc != 0:
            why = "collected no tests (exit code 5)" if rc == 5 else f"exit code {rc}"
            tail = "\n".join(lines[-TAIL_LINES:])
            raise SubsuiteFailed(f"{self.var} python -m pytest -q {self.directory}: {why}\n"
                                 f"last {min(TAIL_LINES, len(lines))} lines of its output:\n{tail}")

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, SubsuiteFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.directory} with {self.var}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _results:
        return
    sub = {name for name, *_ in subsuites()}
    counts = {}
    for key in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
        n = sum(1 for r in terminalreporter.stats.get(key, []) if not _is_sub(r, sub))
        if n:
            counts[key] = n
    main = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no tests ran"
    terminalreporter.section("nbkernels test suites")
    terminalreporter.write_line(f"tests (main suite): {main}")
    for name, directory, env, _ in subsuites():
        if name in _results:
            flags = " ".join(f"{k}={v}" for k, v in env.items())
            terminalreporter.write_line(f"{directory} ({flags}): {_results[name]}")


def _is_sub(report, names) -> bool:
    return report.nodeid.split("::")[-1] in names and "subsuites.py" in report.nodeid
