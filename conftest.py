"""Repository-wide pytest setup: registers tests/subsuites.py, so that ``python -m pytest``
also runs the Triton interpreter suite and the CUDA emulator suite, each in its own process."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

pytest_plugins = ["subsuites"]
