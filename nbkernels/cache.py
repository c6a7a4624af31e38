"""The cache model of "A Simple Cache Model for Image Recognition", used in training.

A circular memory of detached past embeddings and their labels. Each query scores
every filled slot, a softmax follows, and the label-weighted vote is the cache's
class distribution; ``-log`` of the true class's mass is the loss.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from nbkernels import _validation as check
from nbkernels import functional as F


class NeighborCache(nn.Module):
    """A circular cache of ``size`` embeddings of dimension ``dim``.

    Args:
        size: number of slots (>= 1). dim: embedding dimension. num_classes: C.
        temperature: T of the softmax (the paper's scale is 1/T). metric: as in ``nca_loss``.
        backend: as in ``nca_loss``. dtype, device: of the memory (default float32, CPU).

    ``memory``, ``labels``, ``ptr`` (next slot to write) and ``filled`` are buffers, so a
    state_dict round-trips the cache exactly.

    Example::

        cache = nbkernels.NeighborCache(4096, 128, num_classes=10)
        loss = cache(model(x), y)   # loss against the cache, then x is pushed
        probs = cache.predict(model(x_test), model_probs=softmax_out, weight=0.3)
    """

    def __init__(self, size, dim, num_classes, *, temperature=0.05, metric="cosine",
                 backend="auto", dtype=torch.float32, device=None):
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        check.num_classes(num_classes)
        check.choice("metric", metric, check.METRICS)
        check.choice("backend", backend, check.BACKEND_NAMES)
        check.temperature(temperature, torch.device("cpu"))
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.size, self.dim, self.num_classes = size, dim, num_classes
        self.temperature, self.metric, self.backend = temperature, metric, backend
        self.register_buffer("memory", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long, device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long, device=device))

    def __len__(self):
        return int(self.filled)

    def extra_repr(self):
        return (f"size={self.size}, dim={self.dim}, num_classes={self.num_classes}, "
                f"filled={len(self)}, temperature={self.temperature}, metric={self.metric!r}")

    def _check_batch(self, embeddings, labels):
        check.embeddings("embeddings", embeddings)
        if embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must have dimension dim={self.dim} of this cache, "
                             f"got {embeddings.shape[1]}")
        check.same_device(embeddings=embeddings, memory=self.memory)
        if labels is not None:
            check.labels("labels", labels, embeddings.shape[0], "embeddings")
            check.same_device(embeddings=embeddings, labels=labels)
            check.label_range("labels", labels, self.num_classes)

    def _content(self):
        # a snapshot: the backward recomputes from it after later pushes overwrote slots
        n = len(self)
        return self.memory[:n].clone(), self.labels[:n].clone()

    def push(self, embeddings, labels):
        """Write a batch into the oldest slots (detached). A batch larger than the
        cache keeps its last ``size`` rows, with a warning."""
        self._check_batch(embeddings, labels)
        n = embeddings.shape[0]
        if n > self.size:
            warnings.warn(f"a batch of {n} rows was pushed into a cache of {self.size} slots: "
                          f"only its last {self.size} rows are kept", stacklevel=2)
            embeddings, labels, n = embeddings[-self.size:], labels[-self.size:], self.size
        start = int(self.ptr)
        slots = (start + torch.arange(n, device=self.memory.device)) % self.size
        with torch.no_grad():
            self.memory[slots] = embeddings.detach().to(self.memory.dtype)
            self.labels[slots] = labels.to(torch.long)
            self.ptr.fill_((start + n) % self.size)
            self.filled.fill_(min(self.size, len(self) + n))

    def reset(self):
        """Empty the cache."""
        self.memory.zero_()
        self.labels.fill_(-1)
        self.ptr.zero_()
        self.filled.zero_()

    def loss(self, embeddings, labels, reduction="mean"):
        """Loss of the queries against the current content; 0 (with a gradient path)
        while the cache is empty. Gradients reach the queries only."""
        self._check_batch(embeddings, labels)
        if len(self) == 0:
            check.choice("reduction", reduction, check.REDUCTIONS)
            zero = embeddings.sum(1) * 0.0  # keeps the graph and propagates NaN
            return zero if reduction == "none" else zero.sum()
        memory, mem_labels = self._content()
        return F.nca_loss(embeddings, labels, ref_embeddings=memory, ref_labels=mem_labels,
                          temperature=self.temperature, metric=self.metric,
                          reduction=reduction, backend=self.backend)

    def forward(self, embeddings, labels):
        """Loss against the current content, then push the detached batch."""
        loss = self.loss(embeddings, labels)
        self.push(embeddings, labels)
        return loss

    def predict(self, embeddings, model_probs=None, weight=0.5):
        """The cache's class distribution (N, C), or with the model's own softmax output
        ``(1 - weight) * model_probs + weight * cache``: the cache as a second opinion."""
        self._check_batch(embeddings, None)
        if len(self) == 0:
            raise RuntimeError("predict() needs a filled cache: push embeddings first")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
            raise ValueError(f"weight must be a number in [0, 1], got {weight!r}")
        memory, mem_labels = self._content()
        probs = F.soft_knn_predict(embeddings, memory, mem_labels, self.num_classes,
                                   temperature=self.temperature, metric=self.metric,
                                   backend=self.backend)
        if model_probs is None:
            return probs
        if not isinstance(model_probs, torch.Tensor):
            raise TypeError(f"model_probs must be a tensor, got {type(model_probs).__name__}")
        if model_probs.shape != probs.shape:
            raise ValueError(f"model_probs must have shape {tuple(probs.shape)}, "
                             f"got {tuple(model_probs.shape)}")
        return (1.0 - weight) * model_probs + weight * probs.to(model_probs.dtype)
