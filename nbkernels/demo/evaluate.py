"""Test-set metrics of a trained embedding, all in the cosine geometry.

Every model is judged on L2-normalised embeddings: the softmax model's embedding scale
grows freely during training, and a scale-free comparison is the fair one. The
neighbor losses are trained with the cosine metric for the same reason.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

import nbkernels

__all__ = ["embed", "embedding_metrics", "evaluate"]

KNN_K = 5
CACHE_OPINION_WEIGHT = 0.5


@torch.no_grad()
def embed(model, x: torch.Tensor, device, chunk: int = 4096):
    """``(embeddings, logits or None)`` of ``x`` in eval mode, computed in chunks."""
    model.eval()
    zs, ls = [], []
    for i in range(0, x.shape[0], chunk):
        z, logits = model(x[i:i + chunk].to(device))
        zs.append(z)
        if logits is not None:
            ls.append(logits)
    return torch.cat(zs), (torch.cat(ls) if ls else None)


def embedding_metrics(z_train, y_train, z_test, y_test, num_classes: int, temperature: float) -> dict:
    """Metrics that need only embeddings (so they also apply to the raw input).

    * ``soft_knn_acc``: argmax of ``nbkernels.soft_knn_predict`` (cosine, the training
      temperature) with every training embedding as a reference;
    * ``knn_acc``: majority vote of the 5 nearest training embeddings (cosine);
    * ``silhouette``: scikit-learn's silhouette score of the test embeddings (cosine),
      in [-1, 1], higher is better clustered;
    * ``intra_inter_ratio``: mean cosine distance between test points of the same class
      over the mean between points of different classes; lower is tighter. 1.0 (no
      separation) when every test embedding points the same way (a collapsed embedding,
      e.g. with ``embedding_dim`` 1), where both means are 0.

    The test set needs ``2 <= classes <= rows - 1`` and the training set ``KNN_K`` rows;
    ``data.check_split`` checks that before training.
    """
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import KNeighborsClassifier

    z_train = z_train.float()
    z_test = z_test.float()
    probs = nbkernels.soft_knn_predict(z_test, z_train, y_train.to(z_train.device), num_classes,
                                       temperature=temperature, metric="cosine")
    soft_acc = (probs.argmax(1).cpu() == y_test.cpu()).double().mean().item()
    tr, te = z_train.cpu().numpy(), z_test.cpu().numpy()
    y_tr, y_te = y_train.cpu().numpy(), y_test.cpu().numpy()
    knn = KNeighborsClassifier(n_neighbors=KNN_K, metric="cosine", algorithm="brute").fit(tr, y_tr)
    u = F.normalize(z_test.cpu().double(), dim=1)
    dist = (1.0 - u @ u.T).clamp_min(0.0)
    same = torch.from_numpy(y_te[:, None] == y_te[None, :])
    off_diag = ~torch.eye(len(y_te), dtype=torch.bool)
    intra, inter = dist[same & off_diag].mean(), dist[~same].mean()
    return {
        "soft_knn_acc": soft_acc,
        "knn_acc": float(knn.score(te, y_te)),
        "silhouette": float(silhouette_score(te, y_te, metric="cosine")),
        "intra_inter_ratio": float(intra / inter) if inter > 0 else 1.0,
    }


def evaluate(result, data, cfg, device) -> tuple[dict, np.ndarray]:
    """Metrics of one trained objective, and its normalised test embeddings (for t-SNE).

    Softmax models also get ``classifier_acc`` (the head's argmax) and
    ``cache_opinion_acc``: the head's softmax mixed half-and-half with a
    ``NeighborCache`` holding every training embedding (``predict(..., model_probs=)``).
    Other models get ``None`` there.
    """
    z_train, _ = embed(result.model, data.x_train, device)
    z_test, logits = embed(result.model, data.x_test, device)
    metrics = embedding_metrics(z_train, data.y_train, z_test, data.y_test, data.num_classes, cfg.temperature)
    y_test = data.y_test.to(device)
    metrics["classifier_acc"] = metrics["cache_opinion_acc"] = None
    if logits is not None:
        model_probs = logits.float().softmax(1)
        metrics["classifier_acc"] = (model_probs.argmax(1) == y_test).double().mean().item()
        cache = nbkernels.NeighborCache(z_train.shape[0], z_train.shape[1], data.num_classes,
                                        temperature=cfg.temperature, metric="cosine", device=device)
        cache.push(z_train.float(), data.y_train.to(device))
        mixed = cache.predict(z_test.float(), model_probs=model_probs, weight=CACHE_OPINION_WEIGHT)
        metrics["cache_opinion_acc"] = (mixed.argmax(1) == y_test).double().mean().item()
    return metrics, F.normalize(z_test.float(), dim=1).cpu().numpy()
