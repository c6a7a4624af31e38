"""Public functions: neighbor losses and the soft-kNN class distribution.

All of them compute, for queries q_i (labels a_i) against references r_j (labels b_j),
``logit_ij = sim(q_i, r_j) / T`` followed by a softmax over j, without ever holding
the N x M matrix (except ``backend="reference"``). See ``nbkernels.backends.reference``
for the math.

Scale-out options (keyword-only): ``chunk_size`` splits the references into chunks whose
partial results are merged exactly (``nbkernels.partials``); references on the CPU while
the queries are on a GPU are streamed chunk by chunk (``nbkernels.streaming``).
``distributed=True`` makes the batch losses global over a torch.distributed process group
(``nbkernels.distributed``).
"""
from __future__ import annotations

import torch

from nbkernels import _validation as check
from nbkernels import kernel_inputs
from nbkernels import backends
from nbkernels import distributed as dist_
from nbkernels.autograd import ClassProbs, NeighborLSE
from nbkernels.backends import reference
from nbkernels.partials import has_positive, positive_counts  # noqa: F401 (re-exported)
from nbkernels.streaming import DEFAULT_CHUNK_SIZE, Spec, StreamedLSE, StreamedProbs

__all__ = ["class_means", "nca_loss", "positive_counts", "prototype_loss", "soft_knn_predict"]


def _common(temperature, metric, backend, device, dtype):
    """Checked (temperature tensor, backend name); a float temperature is made in the
    accumulation dtype of ``dtype`` (fp64 inputs: an exact fp64 T)."""
    check.choice("metric", metric, kernel_inputs.METRICS)
    t = check.temperature(temperature, device, check.acc_dtype(dtype))
    return t, backends.resolve(backend, device)


def _promote(*xs):
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return [x.to(dtype) for x in xs]


def _lse(q, r, q_labels, r_labels, t, metric, offset, backend):
    if backend == "reference":
        return reference.neighbor_lse(q, r, q_labels, r_labels, t, metric=metric, offset=offset)
    if r is q and r_labels is q_labels:  # the batch against itself
        r = r_labels = None
    return NeighborLSE.apply(q, r, q_labels, r_labels, t, metric, offset, backend)


def _scale_types(chunk_size, distributed, group):
    """The scale-out options' types and values (no process group needed yet: modules are
    built before it); returns ``chunk_size`` as a Python int (or None)."""
    if chunk_size is not None:
        chunk_size = check.integer("chunk_size", chunk_size, low=1)
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be a bool, got {type(distributed).__name__}")
    if group is not None and not distributed:
        raise ValueError("group was given with distributed=False: pass distributed=True")
    return chunk_size


def _scale_options(chunk_size, distributed, group):
    """Check the scale-out options, and the process group for ``distributed``; returns
    ``chunk_size`` as a Python int (or None)."""
    chunk_size = _scale_types(chunk_size, distributed, group)
    if distributed:
        dist_.require(group)
    return chunk_size


def bank_device(name, refs, labels_name, ref_labels, queries):
    """References may sit on the queries' device, or on the CPU while the queries are on
    a GPU (they are then streamed). Their labels sit with them."""
    check.same_device(**{name: refs, labels_name: ref_labels})
    if refs.device != queries.device and not (refs.device.type == "cpu"
                                              and queries.device.type == "cuda"):
        raise ValueError(f"{name} must be on the queries' device {queries.device}, or on the CPU "
                         f"while the queries are on a CUDA device, got {refs.device}")


def _streamed(q, r, chunk_size):
    return chunk_size is not None or r.device != q.device


def _neighbor_lse(q, r, q_labels, r_labels, t, metric, offset, backend, chunk_size):
    """``(lse_all, lse_pos, valid)``, chunked when asked or when ``r`` is on another device."""
    if _streamed(q, r, chunk_size):
        spec = Spec(metric, offset, backend, chunk_size or DEFAULT_CHUNK_SIZE)
        batch = r is q and r_labels is q_labels  # one tensor once: Dynamo traces it
        lse_all, lse_pos, _ = StreamedLSE.apply(q, None if batch else r, q_labels,
                                                None if batch else r_labels, t, spec)
    else:
        lse_all, lse_pos = _lse(q, r, q_labels, r_labels, t, metric, offset, backend)
    return lse_all, lse_pos, has_positive(lse_pos)


def _reduce(loss, valid, reduction, dtype):
    if reduction == "none":
        return loss.to(dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(dtype)
    return (total / valid.sum().clamp_min(1)).to(dtype)


def _global_reduce(loss, valid, reduction, dtype, group):
    """As ``_reduce`` over the rows of every rank: the same value on every rank, whose
    gradient w.r.t. the local rows is world_size times theirs (``distributed.global_sum``)."""
    if reduction == "none":
        return loss.to(dtype)
    acc = loss.dtype
    total, count = dist_.global_sum(torch.stack([loss.sum(), valid.sum().to(acc)]), group)
    if reduction == "sum":
        return total.to(dtype)
    return (total / count.clamp_min(1)).to(dtype)


def _loss_from_lse(lse_all, lse_pos, valid):
    # A query with no positive has loss 0; NaN must survive on every row.
    zero_or_nan = torch.where(torch.isnan(lse_all), lse_all, torch.zeros_like(lse_all))
    return torch.where(valid, lse_all - lse_pos, zero_or_nan)


def nca_loss(embeddings, labels, *, ref_embeddings=None, ref_labels=None, temperature=0.1,
             metric="sqeuclidean", reduction="mean", backend="auto", chunk_size=None,
             distributed=False, group=None):
    """Soft-kNN / NCA loss ``-log sum_{j: b_j = a_i} p_ij``.

    Args:
        embeddings: (N, D) float queries. labels: (N,) integer labels.
        ref_embeddings, ref_labels: optional (M, D) and (M,) references. Without them the
            batch is scored against itself and the pair j == i is excluded. They may sit on
            the CPU (ideally pinned) while the embeddings are on a GPU: they are then
            streamed in chunks of ``chunk_size`` rows.
        temperature: float or 0-dim tensor > 0 (a tensor that requires grad gets a gradient).
        metric: "sqeuclidean" (-||q - r||^2), "cosine" or "dot".
        reduction: "mean" over the queries that have a positive (0 if none), "sum", or
            "none" for an (N,) tensor with 0 at queries without a positive.
        backend: "auto" (NBKERNELS_BACKEND, else "triton" on CUDA and "torch" on CPU),
            "reference", "torch", "triton" or "cuda".
        chunk_size: None (one pass), or the number of references per chunk: partial results
            of the chunks are merged exactly, and at most two chunks of a streamed bank are
            on the device at once. Default for a streamed bank: 65536.
        distributed: the global batch is the concatenation of every rank's ``embeddings``
            (local sizes may differ). Each rank scores its rows against the gathered global
            batch (gathered with gradient; its own rows are skipped through its global
            offset). "mean" and "sum" return the global loss, the same on every rank; its
            gradient w.r.t. this rank's rows is ``world_size`` times the single-process
            gradient of those rows, so that DDP's gradient averaging yields exactly the
            single-process parameter gradients. "none" returns this rank's rows, with their
            exact gradient. With ``ref_embeddings`` the references are used as given on
            each rank (replicated, e.g. proxies) and only the queries are global.
            Every rank must make the same call and back-propagate through it.
        group: the process group (default: the world); needs ``distributed=True``.

    Returns the loss in the embeddings' dtype, promoted with the references' where they
    differ (``torch.promote_types``). Raises TypeError/ValueError on bad input,
    RuntimeError for ``distributed=True`` without an initialised process group.

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
    check.same_device(embeddings=embeddings, labels=labels)
    if ref_embeddings is not None:
        check.embeddings("ref_embeddings", ref_embeddings)
        check.labels("ref_labels", ref_labels, ref_embeddings.shape[0], "ref_embeddings")
        check.same_dim("ref_embeddings", ref_embeddings, "embeddings", embeddings)
        bank_device("ref_embeddings", ref_embeddings, "ref_labels", ref_labels, embeddings)
    chunk_size = _scale_options(chunk_size, distributed, group)
    dtype = embeddings.dtype if ref_embeddings is None else torch.promote_types(
        embeddings.dtype, ref_embeddings.dtype)
    t, backend = _common(temperature, metric, backend, embeddings.device, dtype)
    # contiguous: internal ops (searchsorted, the kernels) index labels with unit stride
    q_labels = labels.long().contiguous()
    if ref_embeddings is None:
        q, r, r_labels, offset = embeddings, embeddings, q_labels, 0
        if distributed:
            rank, _ = dist_.require(group)
            sizes = dist_.gather_sizes(q.shape[0], q.device, group)
            r = dist_.gather_rows(embeddings, group, sizes)
            r_labels = dist_.gather_rows(q_labels, group, sizes)
            offset = sum(sizes[:rank])
    else:
        r, r_labels, offset = ref_embeddings, ref_labels.long().contiguous(), None
        if _streamed(embeddings, r, chunk_size):  # chunks are cast on the device
            q = embeddings.to(torch.promote_types(embeddings.dtype, r.dtype))
        else:
            q, r = _promote(embeddings, r)
    lse_all, lse_pos, valid = _neighbor_lse(q, r, q_labels, r_labels, t, metric, offset, backend,
                                            chunk_size)
    loss = _loss_from_lse(lse_all, lse_pos, valid)
    if distributed:
        return _global_reduce(loss, valid, reduction, q.dtype, group)
    return _reduce(loss, valid, reduction, q.dtype)


def class_means(embeddings, labels):
    """Per-class means of the rows: ``(means (C, D), classes (C,))`` for the C classes present.

    Sums and counts are taken in the accumulation dtype (fp32 for 16-bit inputs, which
    overflow or round there: 4000 rows near 20 pass fp16's 65504) and the means cast to
    the input dtype once.
    """
    classes, inverse = torch.unique(labels, return_inverse=True)
    if labels.shape[0] > 0:  # a size that compilers cannot infer: 1 <= C <= N
        torch._check(classes.shape[0] >= 1)
        torch._check(classes.shape[0] <= labels.shape[0])
    acc = check.acc_dtype(embeddings.dtype)
    sums = torch.zeros(classes.shape[0], embeddings.shape[1], dtype=acc,
                       device=embeddings.device).index_add(0, inverse, embeddings.to(acc))
    counts = torch.bincount(inverse, minlength=classes.shape[0]).to(acc)
    return (sums / counts[:, None]).to(embeddings.dtype), classes


def global_class_means(embeddings, labels, group=None):
    """:func:`class_means` of the global batch (every rank's rows): the same on every rank.

    The labels are gathered; the per-class sums are all-reduced with gradient.
    """
    all_labels = dist_.gather_rows(labels, group)
    classes, counts = torch.unique(all_labels, return_counts=True)
    acc = check.acc_dtype(embeddings.dtype)  # as class_means: sum in it, cast once
    sums = torch.zeros(classes.shape[0], embeddings.shape[1], dtype=acc,
                       device=embeddings.device)
    sums = sums.index_add(0, torch.searchsorted(classes, labels), embeddings.to(acc))
    sums = dist_.all_reduce_sum(sums, group)
    return (sums / counts.to(acc)[:, None]).to(embeddings.dtype), classes


def prototype_loss(embeddings, labels, *, prototypes=None, prototype_labels=None,
                   temperature=0.1, metric="sqeuclidean", reduction="mean", backend="auto",
                   distributed=False, group=None):
    """Prototype loss: the NCA loss against one reference per class.

    Args:
        embeddings: (N, D) float queries. labels: (N,) integer labels.
        prototypes: optional (C, D) references, e.g. a learned ``nn.Parameter`` (ProxyNCA).
            Without them, each class present in the batch is represented by the mean of its
            rows (the query included); the means are differentiable.
        prototype_labels: (C,) labels of the prototypes; default ``arange(C)``.
        temperature, metric, reduction, backend: as in :func:`nca_loss`.
        distributed, group: as in :func:`nca_loss`: the loss of the global batch, the same
            on every rank, with gradients scaled for DDP. The class means are those of the
            global batch (per-class sums all-reduced with gradient); given prototypes are
            taken as replicated (e.g. a DDP parameter).

    Example::

        proxies = torch.nn.Parameter(torch.randn(num_classes, 128))
        loss = nbkernels.prototype_loss(x, y, prototypes=proxies, metric="cosine")
    """
    check.embeddings("embeddings", embeddings)
    check.labels("labels", labels, embeddings.shape[0], "embeddings")
    _scale_options(None, distributed, group)
    if prototypes is None:
        if prototype_labels is not None:
            raise ValueError("prototype_labels was given without prototypes: pass both, "
                             "or prototypes alone")
        check.same_device(embeddings=embeddings, labels=labels)
        means = global_class_means if distributed else class_means
        prototypes, prototype_labels = means(embeddings, labels.long(),
                                             *((group,) if distributed else ()))
    else:
        check.embeddings("prototypes", prototypes)
        check.same_dim("prototypes", prototypes, "embeddings", embeddings)
        check.same_device(labels=labels, prototypes=prototypes)
        if prototype_labels is None:
            # one prototype per class: a label without its prototype would silently drop
            # its rows from the loss
            check.label_range("labels", labels, prototypes.shape[0])
            prototype_labels = torch.arange(prototypes.shape[0], device=prototypes.device)
        else:
            check.labels("prototype_labels", prototype_labels, prototypes.shape[0], "prototypes")
            check.same_device(labels=labels, prototype_labels=prototype_labels)
            check.labels_among("labels", labels, "prototype_labels", prototype_labels)
    return nca_loss(embeddings, labels, ref_embeddings=prototypes, ref_labels=prototype_labels,
                    temperature=temperature, metric=metric, reduction=reduction, backend=backend,
                    distributed=distributed, group=group)


def soft_knn_predict(queries, ref_embeddings, ref_labels, num_classes, *, temperature=0.1,
                     metric="sqeuclidean", exclude_self=False, backend="auto", chunk_size=None):
    """Soft-kNN class distribution ``yhat_ic = sum_{j: b_j = c} p_ij``.

    Args:
        queries: (N, D). ref_embeddings: (M, D), M >= 1. ref_labels: (M,) in [0, num_classes).
            The references may sit on the CPU (ideally pinned) while the queries are on a
            GPU: they are then streamed in chunks.
        num_classes: number of classes C.
        exclude_self: drop the pair j == i (the references are the queries); needs N == M.
        temperature, metric, backend, chunk_size: as in :func:`nca_loss`.

    Returns (N, C) in the queries' dtype, promoted with the references' where they differ
    (``torch.promote_types``); every row sums to 1.

    Example::

        probs = nbkernels.soft_knn_predict(test_x, train_x, train_y, 10, temperature=0.05)
        pred = probs.argmax(1)
    """
    check.embeddings("queries", queries)
    check.embeddings("ref_embeddings", ref_embeddings)
    check.labels("ref_labels", ref_labels, ref_embeddings.shape[0], "ref_embeddings")
    check.same_dim("ref_embeddings", ref_embeddings, "queries", queries)
    bank_device("ref_embeddings", ref_embeddings, "ref_labels", ref_labels, queries)
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
    chunk_size = _scale_options(chunk_size, False, None)
    t, backend = _common(temperature, metric, backend, queries.device,
                         torch.promote_types(queries.dtype, ref_embeddings.dtype))
    offset = 0 if exclude_self else None
    r_labels = ref_labels.long().contiguous()
    if _streamed(queries, ref_embeddings, chunk_size):
        q = queries.to(torch.promote_types(queries.dtype, ref_embeddings.dtype))
        spec = Spec(metric, offset, backend, chunk_size or DEFAULT_CHUNK_SIZE, num_classes)
        r = None if ref_embeddings is q else ref_embeddings  # one tensor once: see StreamedProbs
        return StreamedProbs.apply(q, r, r_labels, t, spec).to(q.dtype)
    q, r = _promote(queries, ref_embeddings)
    if backend == "reference":
        return reference.class_probs(q, r, r_labels, t, num_classes, metric=metric, offset=offset)
    yhat = ClassProbs.apply(q, None if r is q else r, r_labels, t, num_classes, metric, offset,
                            backend)
    return yhat.to(q.dtype)
