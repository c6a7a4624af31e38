"""Public functions: neighbor losses and the soft-kNN class distribution.

All of them compute, for queries q_i (labels a_i) against references r_j (labels b_j),
``logit_ij = sim(q_i, r_j) / T`` followed by a softmax over j, without ever holding
the N x M matrix (except ``backend="reference"``). See ``nbkernels.backends.reference``
for the math.
"""
from __future__ import annotations

import torch

from nbkernels import _validation as check
from nbkernels.autograd import ClassProbs, NeighborLSE
from nbkernels.backends import reference


def _common(temperature, metric, backend, device):
    check.choice("metric", metric, check.METRICS)
    t = check.temperature(temperature, device)
    return t, check.backend(backend, device)


def _promote(*xs):
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return [x.to(dtype) for x in xs]


def _lse(q, r, q_labels, r_labels, t, metric, offset, backend):
    if backend == "reference":
        return reference.neighbor_lse(q, r, q_labels, r_labels, t, metric=metric, offset=offset)
    return NeighborLSE.apply(q, r, q_labels, r_labels, t, metric, offset, backend)


def positive_counts(q_labels, r_labels, offset=None):
    """Number of positives of each query, from the labels alone (no N x M work)."""
    ordered = torch.sort(r_labels).values
    count = (torch.searchsorted(ordered, q_labels, right=True)
             - torch.searchsorted(ordered, q_labels, right=False))
    if offset is not None:
        j = torch.arange(q_labels.shape[0], device=q_labels.device) + offset
        inside = (j >= 0) & (j < r_labels.shape[0])
        same = r_labels[j.clamp(0, max(r_labels.shape[0] - 1, 0))] == q_labels
        count = count - (inside & same).to(count.dtype)
    return count


def _reduce(loss, valid, reduction, dtype):
    if reduction == "none":
        return loss.to(dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(dtype)
    return (total / valid.sum().clamp_min(1)).to(dtype)


def _loss_from_lse(lse_all, lse_pos, valid):
    # A query with no positive has loss 0; NaN must survive on every row.
    zero_or_nan = torch.where(torch.isnan(lse_all), lse_all, torch.zeros_like(lse_all))
    return torch.where(valid, lse_all - lse_pos, zero_or_nan)


def nca_loss(embeddings, labels, *, ref_embeddings=None, ref_labels=None, temperature=0.1,
             metric="sqeuclidean", reduction="mean", backend="auto"):
    """Soft-kNN / NCA loss ``-log sum_{j: b_j = a_i} p_ij``.

    Args:
        embeddings: (N, D) float queries. labels: (N,) integer labels.
        ref_embeddings, ref_labels: optional (M, D) and (M,) references. Without them the
            batch is scored against itself and the pair j == i is excluded.
        temperature: float or 0-dim tensor > 0 (a tensor that requires grad gets a gradient).
        metric: "sqeuclidean" (-||q - r||^2), "cosine" or "dot".
        reduction: "mean" over the queries that have a positive (0 if none), "sum", or
            "none" for an (N,) tensor with 0 at queries without a positive.
        backend: "auto" (NBKERNELS_BACKEND, else "triton" on CUDA and "torch" on CPU),
            "reference", "torch", "triton" or "cuda".

    Returns the loss in the embeddings' dtype. Raises TypeError/ValueError on bad input.

    Example::

        x = model(images)                        # (N, D)
        loss = nbkernels.nca_loss(x, y, temperature=0.1)
        loss.backward()
    """
    check.embeddings("embeddings", embeddings)
    check.labels("labels", labels, embeddings.shape[0], "embeddings")
    if (ref_embeddings is None) != (ref_labels is None):
        given = "ref_embeddings" if ref_labels is None else "ref_labels"
        missing = "ref_labels" if ref_labels is None else "ref_embeddings"
        raise ValueError(f"{given} was given without {missing}: pass both or neither")
    check.choice("reduction", reduction, check.REDUCTIONS)
    if ref_embeddings is None:
        r, r_labels, offset = embeddings, labels, 0
        q = embeddings
    else:
        check.embeddings("ref_embeddings", ref_embeddings)
        check.labels("ref_labels", ref_labels, ref_embeddings.shape[0], "ref_embeddings")
        check.same_dim("ref_embeddings", ref_embeddings, "embeddings", embeddings)
        check.same_device(embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings,
                          ref_labels=ref_labels)
        q, r = _promote(embeddings, ref_embeddings)
        r_labels, offset = ref_labels, None
    check.same_device(embeddings=embeddings, labels=labels)
    t, backend = _common(temperature, metric, backend, embeddings.device)
    q_labels = labels.long()
    r_labels = q_labels if ref_embeddings is None else r_labels.long()
    lse_all, lse_pos = _lse(q, r, q_labels, r_labels, t, metric, offset, backend)
    valid = positive_counts(q_labels, r_labels, offset) > 0
    return _reduce(_loss_from_lse(lse_all, lse_pos, valid), valid, reduction, q.dtype)


def class_means(embeddings, labels):
    """Per-class means of the rows: ``(means (C, D), classes (C,))`` for the C classes present."""
    classes, inverse = torch.unique(labels, return_inverse=True)
    sums = torch.zeros(classes.shape[0], embeddings.shape[1], dtype=embeddings.dtype,
                       device=embeddings.device).index_add(0, inverse, embeddings)
    counts = torch.bincount(inverse, minlength=classes.shape[0]).to(embeddings.dtype)
    return sums / counts[:, None], classes


def prototype_loss(embeddings, labels, *, prototypes=None, prototype_labels=None,
                   temperature=0.1, metric="sqeuclidean", reduction="mean", backend="auto"):
    """Prototype loss: the NCA loss against one reference per class.

    Args:
        embeddings: (N, D) float queries. labels: (N,) integer labels.
        prototypes: optional (C, D) references, e.g. a learned ``nn.Parameter`` (ProxyNCA).
            Without them, each class present in the batch is represented by the mean of its
            rows (the query included); the means are differentiable.
        prototype_labels: (C,) labels of the prototypes; default ``arange(C)``.
        temperature, metric, reduction, backend: as in :func:`nca_loss`.

    Example::

        proxies = torch.nn.Parameter(torch.randn(num_classes, 128))
        loss = nbkernels.prototype_loss(x, y, prototypes=proxies, metric="cosine")
    """
    check.embeddings("embeddings", embeddings)
    check.labels("labels", labels, embeddings.shape[0], "embeddings")
    if prototypes is None:
        if prototype_labels is not None:
            raise ValueError("prototype_labels was given without prototypes: pass both, "
                             "or prototypes alone")
        check.same_device(embeddings=embeddings, labels=labels)
        prototypes, prototype_labels = class_means(embeddings, labels.long())
    else:
        check.embeddings("prototypes", prototypes)
        check.same_dim("prototypes", prototypes, "embeddings", embeddings)
        if prototype_labels is None:
            prototype_labels = torch.arange(prototypes.shape[0], device=prototypes.device)
        check.labels("prototype_labels", prototype_labels, prototypes.shape[0], "prototypes")
    return nca_loss(embeddings, labels, ref_embeddings=prototypes, ref_labels=prototype_labels,
                    temperature=temperature, metric=metric, reduction=reduction, backend=backend)


def soft_knn_predict(queries, ref_embeddings, ref_labels, num_classes, *, temperature=0.1,
                     metric="sqeuclidean", exclude_self=False, backend="auto"):
    """Soft-kNN class distribution ``yhat_ic = sum_{j: b_j = c} p_ij``.

    Args:
        queries: (N, D). ref_embeddings: (M, D), M >= 1. ref_labels: (M,) in [0, num_classes).
        num_classes: number of classes C.
        exclude_self: drop the pair j == i (the references are the queries); needs N == M.
        temperature, metric, backend: as in :func:`nca_loss`.

    Returns (N, C) in the queries' dtype; every row sums to 1.

    Example::

        probs = nbkernels.soft_knn_predict(test_x, train_x, train_y, 10, temperature=0.05)
        pred = probs.argmax(1)
    """
    check.embeddings("queries", queries)
    check.embeddings("ref_embeddings", ref_embeddings)
    check.labels("ref_labels", ref_labels, ref_embeddings.shape[0], "ref_embeddings")
    check.same_dim("ref_embeddings", ref_embeddings, "queries", queries)
    check.same_device(queries=queries, ref_embeddings=ref_embeddings, ref_labels=ref_labels)
    check.num_classes(num_classes)
    check.label_range("ref_labels", ref_labels, num_classes)
    if not isinstance(exclude_self, bool):
        raise TypeError(f"exclude_self must be a bool, got {type(exclude_self).__name__}")
    if exclude_self and queries.shape[0] != ref_embeddings.shape[0]:
        raise ValueError(f"exclude_self=True needs as many queries as references, got "
                         f"N={queries.shape[0]} and M={ref_embeddings.shape[0]}")
    min_refs = 2 if exclude_self else 1
    if ref_embeddings.shape[0] < min_refs:
        raise ValueError(f"ref_embeddings must hold at least {min_refs} row(s) so that every "
                         f"query has a neighbour, got {ref_embeddings.shape[0]}")
    t, backend = _common(temperature, metric, backend, queries.device)
    q, r = _promote(queries, ref_embeddings)
    offset = 0 if exclude_self else None
    r_labels = ref_labels.long()
    if backend == "reference":
        return reference.class_probs(q, r, r_labels, t, num_classes, metric=metric, offset=offset)
    yhat = ClassProbs.apply(q, r, r_labels, t, num_classes, metric, offset, backend)
    return yhat.to(q.dtype)
