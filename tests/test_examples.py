"""examples/: each script runs at a tiny size in its own process and learns.

train_nca.py and cache.py train on scikit-learn's digits (demo dependencies);
ddp_nca.py runs two processes under torchrun (Gloo) and also checks, after its first
step, that DDP's gradients equal single-process training on the concatenated batch.
"""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import sklearn  # noqa: F401  (demo dependencies, installed with the test extra)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120
CHANCE = 0.1  # 10 classes in every example


def _run(args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=TIMEOUT_S,
                         env=env, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _before_after(text, label):
    """The two numbers of a line ``<label> ... <before> -> <after>``."""
    m = re.search(re.escape(label) + r"[^\n]*?([\d.]+) -> ([\d.]+)", text)
    assert m, f"no '{label} ... a -> b' line in:\n{text}"
    return float(m.group(1)), float(m.group(2))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_nca_learns():
    out = _run(["examples/train_nca.py", "--steps", "60", "--train-size", "600"])
    loss_before, loss_after = _before_after(out, "test NCA loss:")
    acc_before, acc_after = _before_after(out, "test soft-kNN accuracy:")
    assert loss_after < 0.5 * loss_before, out
    assert acc_after > acc_before and acc_after > CHANCE + 0.6, out


def test_cache_example_learns_and_gives_a_second_opinion():
    out = _run(["examples/cache.py", "--steps", "60", "--train-size", "600"])
    for label in ("classifier:", "cache:", "classifier + cache"):
        before, after = _before_after(out, label)
        assert after > CHANCE + 0.5, (label, out)
    clf_before, clf_after = _before_after(out, "classifier:")
    assert clf_after > clf_before + 0.3, out


def test_ddp_example_learns_and_matches_single_process():
    """examples/ddp_nca.py under torchrun: exact DDP gradients after step 0, then learning."""
    out = _run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", "examples/ddp_nca.py", "--steps", "40",
                "--eval-size", "500"])
    assert "every parameter gradient equal single-process" in out
    loss_before, loss_after = _before_after(out, "global NCA loss:")
    acc_before, acc_after = _before_after(out, "soft-kNN accuracy")
    assert loss_after < 0.7 * loss_before, out
    assert acc_after > acc_before + 0.1 and acc_after > CHANCE + 0.4, out
