"""Train a small embedding network with the NCA (soft-kNN) loss, in one process.

    pip install -e ".[demo]"
    python examples/train_nca.py                     # digits, a few seconds on 2 CPU cores
    python examples/train_nca.py --steps 1000 --temperature 0.05

The data are scikit-learn's bundled digits (8x8 images, no download), split and
standardised as in ``python -m nbkernels.demo``. Batches come from
``nbkernels.ClassBalancedBatchSampler`` (every query has positives in its batch), the loss
is ``nbkernels.NCALoss`` with the cosine metric, and the embedding is judged before and
after training by the NCA loss of the test set against itself and by the soft-kNN
accuracy of the test set against the training set (``nbkernels.soft_knn_predict``).
"""
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nbkernels
from _digits import data as load_data, log_now, parser, update


def make_model(in_dim, hidden, dim, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))


@torch.no_grad()
def evaluate(model, criterion, data):
    """(test NCA loss, soft-kNN test accuracy) of the embedding ``model``."""
    model.eval()
    z_train, z_test = model(data.x_train), model(data.x_test)
    loss = criterion(z_test, data.y_test).item()
    probs = nbkernels.soft_knn_predict(z_test, z_train, data.y_train, data.num_classes,
                                       temperature=float(criterion.temperature), metric=criterion.metric)
    model.train()
    return loss, (probs.argmax(1) == data.y_test).double().mean().item()


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--classes-per-batch", type=int, default=10, help="default: %(default)s")
    p.add_argument("--samples-per-class", type=int, default=8, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.1, help="default: %(default)s")
    p.add_argument("--metric", default="cosine", choices=["cosine", "sqeuclidean", "dot"],
                   help="default: %(default)s")
    args = p.parse_args(argv)

    data = load_data(args)
    model = make_model(data.x_train.shape[1], args.hidden, args.dim, args.seed)
    criterion = nbkernels.NCALoss(temperature=args.temperature, metric=args.metric)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sampler = nbkernels.ClassBalancedBatchSampler(data.y_train, args.classes_per_batch, args.samples_per_class,
                                                  num_batches=args.steps, seed=args.seed)
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_sampler=sampler)
    print(f"digits: {len(data.y_train)} train / {len(data.y_test)} test, {data.num_classes} classes; "
          f"NCALoss(metric={args.metric!r}, temperature={args.temperature}), batches of "
          f"{args.classes_per_batch} classes x {args.samples_per_class} samples, {args.steps} steps")

    loss_before, acc_before = evaluate(model, criterion, data)
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        loss = criterion(model(x), y)
        update(opt, loss)
        if log_now(step, args.steps):
            print(f"step {step:4d}  batch loss {loss.item():.4f}")
    seconds = time.perf_counter() - start
    loss_after, acc_after = evaluate(model, criterion, data)
    print(f"trained in {seconds:.1f} s")
    print(f"test NCA loss:          {loss_before:.4f} -> {loss_after:.4f}")
    print(f"test soft-kNN accuracy: {acc_before:.3f} -> {acc_after:.3f} (chance {1 / data.num_classes:.3f})")


if __name__ == "__main__":
    main()
