"""Command line of ``python -m nbkernels.demo``."""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys

from .train import LOSSES, Config

__all__ = ["build_parser", "main"]

QUICK_STEPS = 200
DEFAULT_STEPS = 1500

DESCRIPTION = """\
Train one small embedding network with five losses (softmax, nca, prototype, cache,
softmax+cache) under identical budgets and seeds, then compare the learned
representations on the test set: soft-kNN and 5-NN accuracy, classifier accuracy with
and without the cache as a second opinion, silhouette, intra/inter-class distance
ratio and training time. Training health is monitored throughout (overfit check on
one batch, chance-level check, gradient norms, dead ReLUs, NaN/inf).

Writes report.md, metrics.json, tsne.png and training.png into --out.
"""

EPILOG = """\
examples:
  python -m nbkernels.demo                       # digits, about 1-3 minutes on 2 CPU cores
  python -m nbkernels.demo --quick               # under a minute
  python -m nbkernels.demo --data mine.npz --out runs/mine
  python -m nbkernels.demo --losses softmax,nca --steps 500 --seed 1

--data expects numpy.savez(path, x=features, y=labels): x of shape (N, features) or
(N, H, W, ...), y of shape (N,) with integer or string class labels.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value}")
    return value


def _losses(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in LOSSES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(LOSSES)}, "
                                         f"got {text!r}" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return names


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(prog="python -m nbkernels.demo", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", metavar="DIR", default="./nbkernels-demo",
                   help="directory for report.md, metrics.json, tsne.png, training.png "
                        "(created if missing; default: %(default)s)")
    p.add_argument("--data", metavar="FILE.npz", default=None,
                   help="use your own data: an .npz with arrays x (N, features) and y (N,) "
                        "(default: scikit-learn's bundled digits, no download)")
    p.add_argument("--quick", action="store_true",
                   help=f"small budget for a smoke run: {QUICK_STEPS} steps per loss and a short t-SNE "
                        "(under a minute on 2 CPU cores); --steps still overrides the step count")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help=f"training steps (batches) per loss, the same for every loss "
                        f"(default: {DEFAULT_STEPS}, or {QUICK_STEPS} with --quick)")
    p.add_argument("--losses", type=_losses, default=LOSSES, metavar="LIST",
                   help=f"comma-separated losses to train (default: {','.join(LOSSES)})")
    p.add_argument("--seed", type=_non_negative_int, default=d.seed,
                   help="seed of the initial weights, the batches and t-SNE; a seed reproduces a run "
                        "(the train/test split is fixed for all seeds; default: %(default)s)")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=_non_negative_int, default=1,
                   help="CPU threads for torch and for scikit-learn's OpenMP/BLAS (t-SNE, kNN). The model "
                        "is tiny, so one thread avoids synchronisation overhead, which is large on a busy "
                        "machine; 0 keeps the libraries' defaults (default: %(default)s)")
    p.add_argument("--lr", type=_positive_float, default=d.lr, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--temperature", type=_positive_float, default=d.temperature,
                   help="softmax temperature of the neighbor losses, the cache and soft-kNN "
                        "(cosine metric; default: %(default)s)")
    p.add_argument("--classes-per-batch", type=_positive_int, default=d.classes_per_batch,
                   help="distinct classes per batch, capped at the number of classes (default: %(default)s)")
    p.add_argument("--samples-per-class", type=_positive_int, default=d.samples_per_class,
                   help="samples of each class per batch, at least 2 so that every query has a "
                        "neighbor of its class (default: %(default)s)")
    p.add_argument("--embedding-dim", type=_positive_int, default=d.embedding_dim,
                   help="embedding size (default: %(default)s)")
    p.add_argument("--hidden", type=_positive_int, default=d.hidden, help="hidden layer width (default: %(default)s)")
    p.add_argument("--cache-size", type=_positive_int, default=d.cache_size,
                   help="slots of the NeighborCache used in training (default: %(default)s)")
    p.add_argument("--test-size", type=_fraction, default=0.25,
                   help="fraction of the data held out for testing (default: %(default)s)")
    p.add_argument("--log-every", type=_positive_int, default=d.log_every,
                   help="steps between TrainingMonitor records (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or log lines on stderr")
    return p


def _device(parser, text):
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        parser.error(f"argument --device: expected a torch device such as cpu or cuda, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"argument --device: {text!r} requested but CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"argument --device: {text!r} requested but only {torch.cuda.device_count()} "
                         "CUDA device(s) exist")
    elif device.type != "cpu":
        parser.error(f"argument --device: expected cpu or cuda[:N], got {text!r}")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.samples_per_class < 2:
        parser.error("argument --samples-per-class: must be at least 2: with 1 sample per class no query "
                     "has a neighbor of its own class, and the neighbor losses get no signal")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"argument --out: {args.out!r} exists and is not a directory")
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as err:
        parser.error(f"the demo needs scikit-learn, matplotlib and tqdm ({err}); "
                     "install them with: pip install scikit-learn matplotlib tqdm")
    device = _device(parser, args.device)

    import torch
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    from .data import DataError, load_digits, load_npz, split
    from .run import run_demo

    try:
        data = split(*(load_npz(args.data) if args.data else load_digits()), test_size=args.test_size)
    except DataError as err:
        parser.error(str(err))
    cfg = Config(
        steps=args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS),
        lr=args.lr, temperature=args.temperature,
        classes_per_batch=min(args.classes_per_batch, data.num_classes),
        samples_per_class=args.samples_per_class, embedding_dim=args.embedding_dim, hidden=args.hidden,
        cache_size=args.cache_size, log_every=args.log_every,
        overfit_steps=150 if args.quick else 300, tsne_iter=500 if args.quick else 1000,
        seed=args.seed, losses=args.losses,
    )
    command = "python -m nbkernels.demo" + "".join(" " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    limits = threadpool_limits(args.threads) if args.threads else None  # OpenMP/BLAS of t-SNE, kNN
    torch_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        payload = run_demo(data, cfg, args.out, device, progress=not args.no_progress, command=command)
    finally:
        if limits is not None:
            limits.restore_original_limits()
        torch.set_num_threads(torch_threads)
    print(f"wrote report.md, metrics.json, tsne.png, training.png to {args.out} "
          f"({payload['seconds']:.1f} s on {payload['device']})")
    from .report import metrics_table

    print(metrics_table(payload["losses"]))
    return 0
