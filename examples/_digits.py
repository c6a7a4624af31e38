"""What examples/train_nca.py and examples/cache.py share: the options of the network and
the data, and scikit-learn's digits split and standardised as in ``python -m nbkernels.demo``."""
import argparse

import torch

from nbkernels.demo.data import load_digits, split


def parser(doc, steps=300):
    """An argument parser with --steps, --train-size, --dim, --hidden, --lr and --seed."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=steps, help="training steps (default: %(default)s)")
    p.add_argument("--train-size", type=int, default=None,
                   help="use only this many training samples (default: all 1347)")
    p.add_argument("--dim", type=int, default=32, help="embedding size (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=128, help="hidden width (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    return p


def data(args):
    """The digits, the training set cut to ``--train-size``; one torch thread (a tiny model
    runs fastest on one thread of a small CPU)."""
    torch.set_num_threads(1)
    d = split(*load_digits())
    if args.train_size is not None:
        d.x_train, d.y_train = d.x_train[:args.train_size], d.y_train[:args.train_size]
    return d


def update(opt, loss):
    """One optimizer step on ``loss``."""
    opt.zero_grad()
    loss.backward()
    opt.step()


def log_now(step, steps):
    """Whether to print at ``step``: five times in a run, and at its last step."""
    return step % max(1, steps // 5) == 0 or step == steps - 1
