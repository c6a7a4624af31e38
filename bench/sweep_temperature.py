"""Temperature x metric sweep of the NCA loss on scikit-learn's digits.

For every (metric, temperature) point a fresh MLP (the same initial weights, seed 0) is
trained with ``nbkernels.nca_loss`` for ``--steps`` Adam steps on the same
class-balanced batches; the script records the first batch loss, the final test soft-kNN
accuracy (training set as references, the same metric and temperature) and the scale of
the untrained embeddings. Metrics: ``cosine``; ``sqeuclidean`` on the raw embeddings;
``sqeuclidean`` on L2-normalised embeddings (``||u - v||^2 = 2 - 2 cos``: cosine at twice
the temperature). It also records the loss of random N(0, 1) embeddings under each
metric, the scale effect the README explains.

    python bench/sweep_temperature.py            # about a minute on 2 CPU cores
    # -> bench/results/temperature_sweep.json
    python bench/sweep_temperature.py --table    # the README's table, from that file
"""
import argparse
import json
import math
import os
import platform
import time

import torch
from torch import nn
from torch.nn import functional as F

import nbkernels
from nbkernels.demo.data import load_digits, split

TEMPERATURES = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]
METRICS = {  # name: (nca_loss metric, L2-normalise the embeddings first)
    "cosine": ("cosine", False),
    "sqeuclidean": ("sqeuclidean", False),
    "sqeuclidean_normalized": ("sqeuclidean", True),
}
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "temperature_sweep.json")


def make_model(in_dim, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_dim, 128), nn.ReLU(), nn.Linear(128, 32))


def run_point(data, metric, normalize, t, args):
    model = make_model(data.x_train.shape[1], args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sampler = nbkernels.ClassBalancedBatchSampler(data.y_train, 10, 8, num_batches=args.steps, seed=args.seed)

    def embed(x):
        z = model(x)
        return F.normalize(z, dim=1) if normalize else z

    losses = []
    for idx in sampler:
        loss = nbkernels.nca_loss(embed(data.x_train[idx]), data.y_train[idx], temperature=t, metric=metric)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        probs = nbkernels.soft_knn_predict(embed(data.x_test), embed(data.x_train), data.y_train,
                                           data.num_classes, temperature=t, metric=metric)
    acc = (probs.argmax(1) == data.y_test).double().mean().item()
    return {"first_loss": losses[0], "final_loss": sum(losses[-10:]) / min(10, len(losses)),
            "soft_knn_acc": acc, "finite": all(math.isfinite(v) for v in losses)}


def random_embedding_losses(seed):
    """nca_loss of randn(512, 64) embeddings, 10 balanced classes, defaults vs cosine."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=g)
    y = torch.arange(512) % 10
    out = {"shape": [512, 64], "classes": 10, "log_classes": math.log(10),
           "mean_sq_distance": float(torch.cdist(x, x).pow(2).sum() / (512 * 511))}
    for metric, t in (("sqeuclidean", 0.1), ("sqeuclidean", 128.0), ("cosine", 0.1), ("cosine", 0.5)):
        out[f"{metric}_T{t:g}"] = float(nbkernels.nca_loss(x, y, temperature=t, metric=metric))
    return out


def markdown_table(payload):
    """First batch loss / final test soft-kNN accuracy per temperature (rows) and metric."""
    names = list(METRICS)
    cells = {(p["temperature"], p["metric"]): p for p in payload["points"]}
    temps = list(dict.fromkeys(p["temperature"] for p in payload["points"]))
    lines = ["| T | " + " | ".join(f"{n}: first loss / acc" for n in names) + " |",
             "|---:|" + "---:|" * len(names)]
    for t in temps:
        lines.append(f"| {t:g} | " + " | ".join(
            f"{cells[t, n]['first_loss']:.2f} / {cells[t, n]['soft_knn_acc']:.3f}" for n in names) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=OUT)
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = p.parse_args()
    if args.table:
        with open(args.out) as fh:
            print(markdown_table(json.load(fh)))
        return
    torch.set_num_threads(1)
    data = split(*load_digits())
    start = time.perf_counter()
    with torch.no_grad():
        z = make_model(data.x_train.shape[1], args.seed)(data.x_train[:512])
        init_scale = {"dim": z.shape[1], "mean_sq_norm": float(z.pow(2).sum(1).mean()),
                      "mean_sq_distance": float(torch.cdist(z, z).pow(2).sum() / (512 * 511))}
    points = []
    for name, (metric, normalize) in METRICS.items():
        for t in TEMPERATURES:
            res = run_point(data, metric, normalize, t, args)
            points.append({"metric": name, "temperature": t, **res})
            print(f"{name:24s} T={t:<6g} first loss {res['first_loss']:8.3f}  "
                  f"soft-kNN acc {res['soft_knn_acc']:.3f}")
    payload = {
        "what": "NCA loss on digits: final test soft-kNN accuracy and first batch loss per metric x temperature",
        "setup": {"data": data.describe(), "model": "MLP 64-128-32 ReLU, seed 0", "optimizer": "Adam lr 1e-3",
                  "steps": args.steps, "batch": "10 classes x 8 samples (ClassBalancedBatchSampler)",
                  "seed": args.seed, "loss_chance_level": -math.log(7 / 79)},
        "untrained_embedding_scale": init_scale,
        "points": points,
        "random_embeddings": random_embedding_losses(args.seed),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": 1, "python": platform.python_version(), "torch": torch.__version__},
        "seconds": time.perf_counter() - start,
    }
    with open(args.out, "w") as fh:
        json.dump(payload, fh, indent=2)
        fh.write("\n")
    print(f"wrote {args.out} ({payload['seconds']:.0f} s)")
    print(markdown_table(payload))


if __name__ == "__main__":
    main()
