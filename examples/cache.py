"""A softmax classifier trained with a ``NeighborCache`` loss, and the cache as a second
opinion at inference ("A Simple Cache Model for Image Recognition").

    pip install -e ".[demo]"
    python examples/cache.py                         # digits, a few seconds on 2 CPU cores
    python examples/cache.py --steps 100 --weight 0.5

Training: cross-entropy of a linear head on the embedding, plus ``--cache-weight`` times
the cache loss: each batch is scored against the embeddings of recent batches held in the
cache (a soft-kNN loss), then pushed into it. Inference: a cache filled with every
training embedding gives a class distribution per test sample, and
``cache.predict(z, model_probs=softmax, weight=w)`` mixes it with the classifier's:
``(1 - w) * softmax + w * cache``. The script prints the test accuracy of the classifier
alone, of the cache alone and of the mix, before and after training.
"""
import time

import torch
from torch import nn
from torch.nn import functional as F

import nbkernels
from _digits import data as load_data, log_now, parser, update


class Net(nn.Module):
    """MLP embedding and a linear softmax head: ``forward`` returns (embedding, logits)."""

    def __init__(self, in_dim, hidden, dim, num_classes):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        z = self.embed(x)
        return z, self.head(z)


@torch.no_grad()
def accuracies(model, data, args):
    """Test accuracy of the classifier, of a cache of every training embedding, and of the mix."""
    model.eval()
    z_train, _ = model(data.x_train)
    z_test, logits = model(data.x_test)
    model.train()
    memory = nbkernels.NeighborCache(len(z_train), z_train.shape[1], data.num_classes,
                                     temperature=args.temperature)
    memory.push(z_train, data.y_train)
    softmax = logits.softmax(1)
    probs = {"classifier": softmax, "cache": memory.predict(z_test),
             f"classifier + cache (weight {args.weight:g})": memory.predict(z_test, model_probs=softmax,
                                                                          weight=args.weight)}
    return {name: (p.argmax(1) == data.y_test).double().mean().item() for name, p in probs.items()}


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--batch-size", type=int, default=64, help="default: %(default)s")
    p.add_argument("--cache-size", type=int, default=512, help="slots of the training cache (default: %(default)s)")
    p.add_argument("--cache-weight", type=float, default=1.0,
                   help="weight of the cache loss next to the cross-entropy (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.05,
                   help="cache temperature, cosine metric (default: %(default)s)")
    p.add_argument("--weight", type=float, default=0.5,
                   help="share of the cache in the second opinion at inference (default: %(default)s)")
    args = p.parse_args(argv)

    data = load_data(args)
    torch.manual_seed(args.seed)
    model = Net(data.x_train.shape[1], args.hidden, args.dim, data.num_classes)
    cache = nbkernels.NeighborCache(args.cache_size, args.dim, data.num_classes, temperature=args.temperature)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    print(f"digits: {len(data.y_train)} train / {len(data.y_test)} test, {data.num_classes} classes; "
          f"cross-entropy + {args.cache_weight:g} x cache loss ({args.cache_size} slots, cosine, "
          f"T={args.temperature:g}), batches of {args.batch_size}, {args.steps} steps")

    before = accuracies(model, data, args)
    start = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(len(data.y_train), (args.batch_size,), generator=g)
        x, y = data.x_train[idx], data.y_train[idx]
        z, logits = model(x)
        ce = F.cross_entropy(logits, y)
        cache_loss = cache(z, y)  # against the cache's content (0 while empty), then push z
        loss = ce + args.cache_weight * cache_loss
        update(opt, loss)
        if log_now(step, args.steps):
            print(f"step {step:4d}  cross-entropy {ce.item():.4f}  cache loss {cache_loss.item():.4f}")
    seconds = time.perf_counter() - start
    after = accuracies(model, data, args)
    print(f"trained in {seconds:.1f} s; test accuracy before -> after training (chance "
          f"{1 / data.num_classes:.3f}):")
    for name in after:
        print(f"  {name + ':':34s} {before[name]:.3f} -> {after[name]:.3f}")


if __name__ == "__main__":
    main()
