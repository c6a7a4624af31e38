"""The demo's outputs: ``metrics.json``, ``report.md``, ``tsne.png`` and ``training.png``."""
from __future__ import annotations

import json

import numpy as np

from nbkernels.diagnostics import plot_history

__all__ = ["COLUMNS", "plot_training", "plot_tsne", "write_metrics", "write_report"]

NEIGHBOR_LOSSES = ("nca", "prototype", "cache")
# (metrics key, table header, format); None values print as "—".
COLUMNS = [
    ("soft_knn_acc", "soft-kNN acc", "{:.3f}"),
    ("knn_acc", "5-NN acc", "{:.3f}"),
    ("classifier_acc", "classifier acc", "{:.3f}"),
    ("cache_opinion_acc", "classifier + cache acc", "{:.3f}"),
    ("silhouette", "silhouette ↑", "{:.3f}"),
    ("intra_inter_ratio", "intra/inter dist ↓", "{:.3f}"),
    ("train_seconds", "train s", "{:.1f}"),
]


def _cell(value, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def metrics_table(rows: dict[str, dict]) -> str:
    """Markdown table, one row per loss."""
    head = "| loss | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    body = ["| " + name + " | " + " | ".join(_cell(m.get(k), f) for k, _, f in COLUMNS) + " |"
            for name, m in rows.items()]
    return "\n".join([head, rule, *body])


def write_metrics(path: str, payload: dict) -> None:
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2, allow_nan=False, default=_jsonable)
        fh.write("\n")


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def clustering_verdict(losses: dict[str, dict]) -> str:
    """One sentence on whether softmax or the neighbor losses cluster better, from the numbers."""
    if "softmax" not in losses:
        return "Softmax was not trained in this run, so there is no softmax-vs-neighbors comparison."
    neighbors = {n: m for n, m in losses.items() if n in NEIGHBOR_LOSSES}
    if not neighbors:
        return "No neighbor loss was trained in this run, so there is no softmax-vs-neighbors comparison."
    sm = losses["softmax"]
    better_sil = [n for n, m in neighbors.items() if m["silhouette"] > sm["silhouette"]]
    better_ratio = [n for n, m in neighbors.items() if m["intra_inter_ratio"] < sm["intra_inter_ratio"]]
    k = len(neighbors)

    def who(names):
        return ", ".join(names) if names else "none"

    text = (f"Silhouette: softmax {sm['silhouette']:.3f}; neighbor losses with a higher score: "
            f"{who(better_sil)} ({len(better_sil)} of {k}). Intra/inter distance ratio: softmax "
            f"{sm['intra_inter_ratio']:.3f}; neighbor losses with a lower (tighter) ratio: "
            f"{who(better_ratio)} ({len(better_ratio)} of {k}). ")
    if not better_sil and not better_ratio:
        text += "**On this data softmax clusters better than every neighbor loss, on both measures.**"
    elif len(better_sil) == k and len(better_ratio) == k:
        text += "**On this data every neighbor loss clusters better than softmax, on both measures.**"
    else:
        text += "**The comparison is mixed on this data: neither family wins on both measures for every loss.**"
    return text


def chance_status(name: str, m: dict) -> str:
    """The chance-check cell: ``ok``, an explained expected deviation, or a warning.

    A first loss below chance is expected for the in-batch prototype loss (each query is
    part of its own class mean, so it starts nearer to its own prototype) and for the
    neighbor losses when the inputs already separate the classes; a first loss above
    chance is never expected.
    """
    if m["chance_ok"] is None:
        return "not checked"
    if m["chance_ok"]:
        return "ok"
    if m["first_loss"] < m["chance_loss"]:
        if name == "prototype":
            return "below chance, expected: each query is part of its own class mean"
        if name in NEIGHBOR_LOSSES:
            return "below chance, expected when the inputs already separate the classes (see raw-input kNN)"
    return "**far from chance**: see the findings below"


def write_report(path: str, payload: dict, overfit: dict, findings: dict[str, list[str]],
                 command: str) -> None:
    """``report.md``: setup, sanity checks, the metrics table, monitor findings."""
    cfg, data = payload["config"], payload["data"]
    losses = payload["losses"]
    lines = [
        "# nbkernels demo: softmax vs. neighbor losses",
        "",
        f"Command: `{command}`  ",
        f"Device: {payload['device']}; total time {payload['seconds']:.1f} s; "
        f"torch {payload['versions']['torch']}, nbkernels {payload['versions']['nbkernels']}.",
        "",
        f"Data: {data['source']}: {data['train']} train / {data['test']} test samples, "
        f"{data['features']} features, {data['classes']} classes (fixed stratified split, standardised).",
        "",
        f"Budget, identical for every loss: the same MLP ({data['features']} → {cfg['hidden']} → "
        f"{cfg['hidden']} → {cfg['embedding_dim']}, ReLU) from the same initial weights (seed "
        f"{cfg['seed']}), {cfg['steps']} Adam steps at lr {cfg['lr']:g}, the same class-balanced batches "
        f"({cfg['classes_per_batch']} classes × {cfg['samples_per_class']} samples). Neighbor losses and "
        f"the cache use the cosine metric at temperature {cfg['temperature']:g}; the cache holds "
        f"{cfg['cache_size']} embeddings; softmax+cache adds the cache loss to the cross-entropy.",
        "",
        "## Results (test set)",
        "",
        metrics_table(losses),
        "",
        "Embeddings are judged in the cosine geometry (L2-normalised) for every loss. soft-kNN and 5-NN use "
        "the training embeddings as references. *classifier + cache* mixes the softmax head's "
        "probabilities half-and-half with a `NeighborCache` holding every training embedding. "
        "Silhouette (higher is better) and the ratio of mean intra-class to mean inter-class distance "
        "(lower is better) measure how tightly the test embeddings cluster.",
        "",
    ]
    if "raw_input" in payload:
        raw = payload["raw_input"]
        lines += [f"Reference, the standardised inputs without any network: soft-kNN {raw['soft_knn_acc']:.3f}, "
                  f"5-NN {raw['knn_acc']:.3f}, silhouette {raw['silhouette']:.3f}, "
                  f"intra/inter {raw['intra_inter_ratio']:.3f}.", ""]
    lines += [clustering_verdict(losses), "", "![t-SNE of the test embeddings](tsne.png)", ""]
    lines += ["## Training health", "",
              "First, the overfit check: can each loss drive one class-balanced batch to near zero "
              "(Adam, lr 1e-3)? Then the chance check: the first training loss against an untrained "
              "model's expected loss (log K for softmax, -log(n_pos/(n-1)) for nca, log(#classes) for "
              "prototypes, the nca formula against the cache's labels for the cache).", "",
              "| loss | overfit check | loss start → end (steps) | first loss | chance level | chance check |",
              "|---|---|---|---:|---:|---|"]
    for name, m in losses.items():
        o = overfit[name]
        lines.append(f"| {name} | {'pass' if o.passed else '**FAIL**'} | {o.initial_loss:.3f} → "
                     f"{o.final_loss:.3f} ({o.steps}) | {m['first_loss']:.3f} | {m['chance_loss']:.3f} | "
                     f"{chance_status(name, m)} |")
    lines += ["", "Monitor findings (`TrainingMonitor.diagnose()`):", ""]
    for name, found in findings.items():
        if found:
            lines += [f"- **{name}**:"] + [f"  - {f}" for f in found]
        else:
            lines.append(f"- **{name}**: none (healthy)")
    lines += ["", "A first loss far *below* chance is expected for neighbor losses when the inputs already "
              "separate the classes: an untrained network keeps that structure, and at a low temperature "
              "its neighbours are far from uniform (compare the raw-input kNN accuracy above). A first loss "
              "far *above* chance, or one that stays at chance, is the warning sign.", "",
              "![training curves](training.png)", ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


def plot_tsne(path: str, panels: dict[str, np.ndarray], labels: np.ndarray, class_names: list[str],
              seed: int, max_iter: int) -> None:
    """One t-SNE panel per loss, on the same test points, coloured by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for ax, (name, emb) in zip(axes.flat, panels.items()):
        perplexity = min(30.0, (len(emb) - 1) / 3)
        # PCA init needs 2 dimensions; 1-feature inputs or --embedding-dim 1 start at random.
        init = "pca" if min(emb.shape) >= 2 else "random"
        xy = TSNE(n_components=2, perplexity=perplexity, init=init, random_state=seed,
                  max_iter=max_iter).fit_transform(emb)
        ax.scatter(xy[:, 0], xy[:, 1], c=labels % cmap.N, cmap=cmap, vmin=0, vmax=cmap.N - 1, s=7)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if len(class_names) <= 20:
        handles = [plt.Line2D([], [], marker="o", ls="", color=cmap(i % cmap.N), label=n)
                   for i, n in enumerate(class_names)]
        fig.legend(handles=handles, loc="lower center", ncol=min(10, len(class_names)), fontsize=8,
                   frameon=False)
    fig.suptitle("t-SNE of the test embeddings (cosine, L2-normalised), coloured by class")
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(path: str, monitors: dict) -> None:
    """The monitors' curves; losses divided by their chance level to share one axis."""
    import matplotlib.pyplot as plt

    fig = plot_history(monitors)
    fig.suptitle("training health (TrainingMonitor): losses divided by their chance level")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
