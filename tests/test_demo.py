"""python -m nbkernels.demo: end-to-end on a small budget, reproducibility, options, data errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sklearn  # noqa: F401  (demo dependencies: installed by .ci/run)
import matplotlib  # noqa: F401
import tqdm  # noqa: F401

from nbkernels.demo.cli import build_parser, main
from nbkernels.demo.data import load_digits, split
from nbkernels.demo.train import LOSSES, Config, train

PNG = b"\x89PNG\r\n\x1a\n"
METRIC_KEYS = {"knn_acc", "soft_knn_acc", "classifier_acc", "cache_opinion_acc", "silhouette",
               "intra_inter_ratio", "train_seconds"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_demo_end_to_end_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--quick", "--steps", "40", "--log-every", "10", "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    assert "wrote report.md" in capsys.readouterr().out
    for name in ("tsne.png", "training.png"):
        assert (out / name).read_bytes()[:8] == PNG
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"].startswith("cpu") and metrics["seconds"] > 0
    assert list(metrics["losses"]) == list(LOSSES)
    for name, m in metrics["losses"].items():
        assert METRIC_KEYS <= set(m)
        # 40 steps on digits: every embedding is far above the 10% of guessing
        assert 0.5 < m["soft_knn_acc"] <= 1 and 0.5 < m["knn_acc"] <= 1
        assert -1 <= m["silhouette"] <= 1 and 0 < m["intra_inter_ratio"] < 1
        assert m["overfit_passed"] is True
        has_head = name in ("softmax", "softmax+cache")
        assert (m["classifier_acc"] is not None) == has_head
        assert (m["cache_opinion_acc"] is not None) == has_head
    report = (out / "report.md").read_text()
    assert "| loss | soft-kNN acc | 5-NN acc |" in report
    for name in LOSSES:
        assert f"| {name} |" in report
    assert "tsne.png" in report and "training.png" in report


def test_same_seed_same_training_on_digits():
    data = split(*load_digits())
    cfg = Config(steps=12, log_every=4, seed=3)
    for name in ("nca", "softmax+cache"):
        a, b = train(name, data, cfg, "cpu"), train(name, data, cfg, "cpu")
        assert a.monitor.series("train_loss") == b.monitor.series("train_loss")
        assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    seeded_3 = train("nca", data, cfg, "cpu")
    seeded_4 = train("nca", data, Config(steps=12, log_every=4, seed=4), "cpu")
    assert seeded_4.monitor.series("train_loss") != seeded_3.monitor.series("train_loss")


def test_user_npz_data(tmp_path):
    g = np.random.default_rng(0)
    y = np.repeat(np.array(["cat", "dog", "owl"]), 40)
    x = g.normal(size=(120, 4, 3)) + (np.arange(120) // 40)[:, None, None] * 2.0  # images, flattened
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    out = tmp_path / "out"
    assert main(["--data", str(tmp_path / "mine.npz"), "--losses", "nca,softmax", "--steps", "15",
                 "--samples-per-class", "4", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == {"source": "mine.npz (user data)", "train": 90, "test": 30, "features": 12,
                               "classes": 3}
    assert list(metrics["losses"]) == ["nca", "softmax"]
    assert metrics["config"]["classes_per_batch"] == 3  # capped at the 3 classes


def _bad_npz(tmp_path, kind):
    path = tmp_path / f"{kind}.npz"
    x, y = np.zeros((20, 3)), np.repeat([0, 1], 10)
    if kind == "text":
        path.write_text("not an archive")
    elif kind == "npy":
        np.save(tmp_path / "arr.npy", x)
        os.replace(tmp_path / "arr.npy", path)
    elif kind == "no_y":
        np.savez(path, x=x, labels=y)
    elif kind == "x_1d":
        np.savez(path, x=np.zeros(20), y=y)
    elif kind == "length":
        np.savez(path, x=x, y=y[:-1])
    elif kind == "float_y":
        np.savez(path, x=x, y=np.linspace(0, 1, 20))
    elif kind == "nan_x":
        x[3, 1] = np.nan
        np.savez(path, x=x, y=y)
    elif kind == "one_class":
        np.savez(path, x=x, y=np.zeros(20, dtype=int))
    elif kind == "singleton":
        np.savez(path, x=x, y=np.r_[np.zeros(19, dtype=int), 1])
    return str(path)


@pytest.mark.parametrize("argv, fragment", [
    (["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    (["--lr", "-1"], "argument --lr: expected a positive finite number, got -1"),
    (["--temperature", "nan"], "argument --temperature: expected a positive finite number"),
    (["--losses", "softmax,bogus"], "unknown: bogus"),
    (["--test-size", "1.5"], "argument --test-size: expected a number in (0, 1), got 1.5"),
    (["--samples-per-class", "1"], "argument --samples-per-class: must be at least 2"),
    (["--device", "tpu"], "argument --device"),
    (["--seed", "x"], "argument --seed: expected an integer >= 0, got 'x'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--data", "/nonexistent/file.npz"], "no such file"),
] + ([(["--device", "cuda"], "CUDA is not available")] if not torch.cuda.is_available() else []))
def test_bad_options_exit_with_a_clear_error(argv, fragment, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(argv + ["--out", str(tmp_path / "o"), "--no-progress"])
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("kind, fragment", [
    ("text", "is not a readable .npz archive"),
    ("npy", "holds a single array, not an .npz archive"),
    ("no_y", "lacks array(s) ['y']; it has ['x', 'labels']"),
    ("x_1d", "x must have shape (N, features)"),
    ("length", "x and y must have the same length, got 20 and 19"),
    ("float_y", "y holds non-integer floats"),
    ("nan_x", "x holds NaN or inf in 1 row(s)"),
    ("one_class", "need at least 2 classes, got 1"),
    ("singleton", "every class needs at least 2 samples"),
])
def test_malformed_data_file_is_reported(kind, fragment, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["--data", _bad_npz(tmp_path, kind), "--out", str(tmp_path / "o"), "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and fragment in err


def test_help_documents_every_option():
    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text
        assert action.help and len(action.help) > 10, action.option_strings
    result = subprocess.run([sys.executable, "-m", "nbkernels.demo", "--help"], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0 and "--quick" in result.stdout and "metrics.json" in result.stdout


def test_chance_check_cell_explains_expected_deviations():
    from nbkernels.demo.report import chance_status

    def row(first, chance, ok):
        return {"first_loss": first, "chance_loss": chance, "chance_ok": ok}

    assert chance_status("nca", row(2.3, 2.4, True)) == "ok"
    assert chance_status("prototype", row(0.93, 2.30, False)) == \
        "below chance, expected: each query is part of its own class mean"
    assert chance_status("cache", row(0.5, 2.3, False)).startswith("below chance, expected when")
    for name, first in (("softmax", 0.5), ("prototype", 9.0), ("nca", 9.0)):
        assert chance_status(name, row(first, 2.3, False)).startswith("**far from chance**")
    assert chance_status("softmax", row(2.3, 2.3, None)) == "not checked"


def _small_npz(tmp_path, kind):
    """Data that passes the file checks but is too small for training or evaluation."""
    g = np.random.default_rng(0)
    path = tmp_path / f"{kind}.npz"
    if kind == "8_samples":  # --test-size 0.5: 4 training rows for the 5-NN evaluation
        np.savez(path, x=g.normal(size=(8, 3)), y=np.repeat([0, 1], 4))
    elif kind == "12_samples_3_classes":  # 3 test rows of 3 classes: no silhouette
        np.savez(path, x=g.normal(size=(12, 3)), y=np.repeat([0, 1, 2], 4))
    elif kind == "0_features":
        np.savez(path, x=np.zeros((20, 0)), y=np.repeat([0, 1], 10))
    elif kind == "0_rows":
        np.savez(path, x=np.zeros((0, 3)), y=np.zeros(0, dtype=int))
    elif kind == "class_not_in_train":  # --test-size 0.9: the stratified split leaves class 0 out of training
        np.savez(path, x=g.normal(size=(202, 3)), y=np.r_[np.zeros(2, dtype=int), np.ones(200, dtype=int)])
    return str(path)


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the demo gets as far as training."""
    import nbkernels.demo.run as run

    def refuse(*args, **kwargs):
        raise AssertionError("the demo started training on data it should have refused")

    for name in ("run_demo", "overfit_check", "train"):
        monkeypatch.setattr(run, name, refuse)


# kind of small data: (extra options, what the error message says)
TOO_SMALL = {
    "8_samples": (["--test-size", "0.5"],
                  "8 samples split with --test-size 0.5: the training split has 4 rows; the 5-NN evaluation "
                  "needs at least 5, as the neighbours of each test row"),
    "12_samples_3_classes": ([], "12 samples split with --test-size 0.25: the test split has 3 rows of 3 "
                                 "classes; the silhouette score"),
    "0_features": ([], "x has 0 features per sample (shape (20, 0)); the network needs at least 1 feature"),
    "0_rows": ([], "x and y have 0 rows (x of shape (0, 3))"),
    "class_not_in_train": (["--test-size", "0.9"], "class(es) ['0'] have no row in the training split of 20 rows"),
}


@pytest.mark.parametrize("kind", list(TOO_SMALL))
def test_data_too_small_is_refused_before_training(kind, capsys, tmp_path, no_training):
    import time

    extra, fragment = TOO_SMALL[kind]
    start = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        main(["--data", _small_npz(tmp_path, kind), "--quick", "--out", str(tmp_path / "o"), "--no-progress",
              "--device", "cpu"] + extra)
    assert time.perf_counter() - start < 2.0
    assert info.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # usage, then the one-line message
    assert last.startswith("python -m nbkernels.demo: error: ") and fragment in last
    if kind == "8_samples":
        assert err.rstrip().endswith("use more data or a smaller --test-size")
    if kind == "12_samples_3_classes":
        assert "need at least 4" in err and err.rstrip().endswith("use more data or a larger --test-size")
    assert not (tmp_path / "o").exists()


def test_smallest_split_that_passes_the_checks_runs_end_to_end(tmp_path):
    """The minimums are enough: 9 samples of 3 classes at --test-size 0.4 split into 5 training rows
    (the 5-NN's neighbours) and 4 test rows (one more than the classes). One feature and a
    1-dimensional embedding also exercise t-SNE below its PCA initialisation's 2 dimensions and a
    collapsed embedding (every test point the same direction: intra/inter ratio 0/0)."""
    g = np.random.default_rng(0)
    np.savez(tmp_path / "tiny.npz", x=g.normal(size=(9, 1)), y=np.repeat(["a", "b", "c"], 3))
    out = tmp_path / "out"
    assert main(["--data", str(tmp_path / "tiny.npz"), "--test-size", "0.4", "--steps", "3", "--log-every", "1",
                 "--losses", "nca,softmax+cache", "--embedding-dim", "1", "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == {"source": "tiny.npz (user data)", "train": 5, "test": 4, "features": 1,
                               "classes": 3}
    assert (out / "tsne.png").read_bytes()[:8] == PNG
    for m in metrics["losses"].values():
        assert 0 <= m["intra_inter_ratio"] < float("inf") and -1 <= m["silhouette"] <= 1
    with pytest.raises(ValueError, match="the test split has 3 rows of 3 classes"):
        split(np.zeros((9, 1)), np.repeat([0, 1, 2], 3), "tiny", test_size=0.3)
