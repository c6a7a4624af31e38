"""The demo's data: scikit-learn's bundled digits, or a user's ``.npz`` with ``x`` and ``y``.

Both go through the same fixed, stratified train/test split and are standardised with
the training set's per-feature mean and standard deviation.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DataError", "DemoData", "check_split", "load_digits", "load_npz", "split"]

# The split does not follow --seed: every seed sees the same test set, so that runs
# with different seeds are comparable.
SPLIT_SEED = 0


class DataError(ValueError):
    """The data cannot be used; the message says what is wrong and how to fix it."""


@dataclass
class DemoData:
    """Standardised float32 features and int64 labels ``0..num_classes-1``, on the CPU."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    class_names: list[str]
    source: str

    def describe(self) -> dict:
        return {"source": self.source, "train": int(self.x_train.shape[0]), "test": int(self.x_test.shape[0]),
                "features": int(self.x_train.shape[1]), "classes": self.num_classes}


def load_digits() -> tuple[np.ndarray, np.ndarray, str]:
    """scikit-learn's 1797 8x8 digit images (shipped with the package, no download)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    return bunch.data.astype(np.float32), bunch.target, "scikit-learn digits (8x8 images, bundled)"


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Read ``x`` (N, ...) numeric features and ``y`` (N,) class labels from an ``.npz``.

    Images (N, H, W, ...) are flattened to (N, H*W*...). Labels may be ints, strings or
    integral floats; they are mapped to ``0..C-1`` in sorted order.

    Raises:
        DataError: the file is missing or unreadable, lacks ``x`` or ``y``, or holds
            arrays of the wrong shape, type or content.
    """
    hint = "write one with numpy.savez(path, x=features, y=labels)"
    if not os.path.isfile(path):
        raise DataError(f"--data {path!r}: no such file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"--data {path!r} is not a readable .npz archive ({err}); {hint}") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"--data {path!r} holds a single array, not an .npz archive with arrays "
                        f"'x' and 'y'; {hint}")
    with archive:
        missing = [k for k in ("x", "y") if k not in archive.files]
        if missing:
            raise DataError(f"--data {path!r} lacks array(s) {missing}; it has {archive.files}; {hint}")
        try:
            x, y = archive["x"], archive["y"]
        except ValueError as err:  # object arrays need pickle, which is refused on purpose
            raise DataError(f"--data {path!r}: x and y must be plain numeric/string arrays ({err})") from err
    if x.dtype.kind not in "biuf":
        raise DataError(f"--data {path!r}: x must be numeric, got dtype {x.dtype}")
    if x.ndim < 2:
        raise DataError(f"--data {path!r}: x must have shape (N, features) or (N, H, W, ...), "
                        f"got shape {x.shape}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"--data {path!r}: y must be 1-D (N,) class labels, got shape {y.shape}; "
                        "one-hot labels can be converted with y.argmax(1)")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"--data {path!r}: x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] == 0:
        raise DataError(f"--data {path!r}: x and y have 0 rows (x of shape {x.shape}); the demo needs "
                        "samples: at least 2 of each of at least 2 classes")
    features = int(np.prod(x.shape[1:]))
    if features == 0:
        raise DataError(f"--data {path!r}: x has 0 features per sample (shape {x.shape}); the network needs "
                        "at least 1 feature: x must have shape (N, features) with features >= 1")
    if y.dtype.kind not in "biufUS":
        raise DataError(f"--data {path!r}: y must hold class labels (ints or strings), got dtype {y.dtype}")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and np.array_equal(y, np.round(y))):
        raise DataError(f"--data {path!r}: y holds non-integer floats; it must be class labels, "
                        "not regression targets")
    x = x.reshape(x.shape[0], features).astype(np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(1).sum())
        raise DataError(f"--data {path!r}: x holds NaN or inf in {bad} row(s); drop or impute them first")
    return x, y, f"{os.path.basename(path)} (user data)"


def split(x: np.ndarray, y: np.ndarray, source: str, *, test_size: float = 0.25) -> DemoData:
    """Fixed stratified split, labels mapped to ``0..C-1``, features standardised.

    The split is checked against what the later stages need (see ``check_split``), so
    that data too small for the evaluation fails here, before any training.

    Raises:
        DataError: no features, fewer than two classes, a class with a single sample, or
            a split too small for the evaluation (see ``check_split``).
    """
    from sklearn.model_selection import train_test_split

    if x.ndim != 2 or x.shape[1] < 1:
        raise DataError(f"{source}: x must have shape (N, features) with features >= 1, got shape {x.shape}")
    names, y_idx = np.unique(y, return_inverse=True)
    counts = np.bincount(y_idx)
    if len(names) < 2:
        raise DataError(f"{source}: need at least 2 classes, got {len(names)}")
    if counts.min() < 2:
        rare = [str(names[i]) for i in np.flatnonzero(counts < 2)][:5]
        raise DataError(f"{source}: every class needs at least 2 samples for a stratified split; "
                        f"class(es) {rare} have 1")
    try:
        x_tr, x_te, y_tr, y_te = train_test_split(x, y_idx, test_size=test_size, stratify=y_idx,
                                                  random_state=SPLIT_SEED)
    except ValueError as err:
        raise DataError(f"{source}: cannot split {len(y)} samples of {len(names)} classes with "
                        f"--test-size {test_size} ({err})") from err
    check_split(y_tr, y_te, [str(n) for n in names], source, test_size=test_size)
    mean = x_tr.mean(0)
    # Constant features (the digits' border pixels) keep scale 1 rather than divide by 0.
    std = np.where(x_tr.std(0) > 1e-6, x_tr.std(0), 1.0)

    def t(a):
        return torch.from_numpy(((a - mean) / std).astype(np.float32))

    return DemoData(x_train=t(x_tr), y_train=torch.from_numpy(y_tr.astype(np.int64)),
                    x_test=t(x_te), y_test=torch.from_numpy(y_te.astype(np.int64)),
                    num_classes=len(names), class_names=[str(n) for n in names], source=source)


def check_split(y_train: np.ndarray, y_test: np.ndarray, class_names: list[str], source: str, *,
                test_size: float) -> None:
    """Check a split against what training and evaluation need, before any training.

    ``y_train`` and ``y_test`` hold class indices ``0..len(class_names)-1``.

    * every class in both splits: the class-balanced batches of training (and of the
      test loss) draw from every class;
    * at least ``KNN_K`` training rows: the k-NN accuracy uses the training embeddings
      as the neighbours of each test row;
    * at least one test row more than there are classes: the silhouette score needs
      ``2 <= classes <= test rows - 1``, and the intra-class distance needs a class with
      two test rows. This also covers t-SNE of the test rows (perplexity > 0 needs 2).

    Raises:
        DataError: one message naming every unmet need and what to change.
    """
    from .evaluate import KNN_K

    n_tr, n_te, n_cls = len(y_train), len(y_test), len(class_names)
    problems, grow_train, grow_test = [], False, False
    for part, labels, n_part in (("training", y_train, n_tr), ("test", y_test, n_te)):
        missing = [class_names[i] for i in np.flatnonzero(np.bincount(labels, minlength=n_cls) == 0)]
        if missing:
            use = "training batches" if part == "training" else "test-loss batches"
            problems.append(f"class(es) {missing[:5]}{' ...' if len(missing) > 5 else ''} have no row in the "
                            f"{part} split of {n_part} rows; the class-balanced {use} need every class")
            grow_train |= part == "training"
            grow_test |= part == "test"
    if n_tr < KNN_K:
        problems.append(f"the training split has {n_tr} rows; the {KNN_K}-NN evaluation needs at least "
                        f"{KNN_K}, as the neighbours of each test row")
        grow_train = True
    if n_te < n_cls + 1:
        problems.append(f"the test split has {n_te} rows of {n_cls} classes; the silhouette score and the "
                        f"intra/inter-class distance ratio need at least {n_cls + 1} (one more than the "
                        "classes, so that some class has 2 test rows)")
        grow_test = True
    if not problems:
        return
    if grow_train and grow_test:
        hint = "use more data"
    else:
        hint = f"use more data or a {'smaller' if grow_train else 'larger'} --test-size"
    raise DataError(f"{source}: {n_tr + n_te} samples split with --test-size {test_size}: "
                    f"{'; '.join(problems)}: {hint}")
