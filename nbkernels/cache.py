"""The cache model of "A Simple Cache Model for Image Recognition", used in training.

A circular memory of detached past embeddings and their labels. Each query scores
every filled slot, a softmax follows, and the label-weighted vote is the cache's
class distribution; ``-log`` of the true class's mass is the loss.

The memory may live on the CPU (pinned) while the queries are on a GPU: it is then
streamed in chunks (``nbkernels.streaming``). With ``distributed=True`` every rank keeps
its own slots and the loss and the prediction are those of the union of all ranks'
slots (``nbkernels.distributed``).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from nbkernels import _validation as check
from nbkernels import kernel_inputs
from nbkernels import backends
from nbkernels import distributed as dist_
from nbkernels import functional as F
from nbkernels import partials as P
from nbkernels.streaming import DEFAULT_CHUNK_SIZE, Spec


class NeighborCache(nn.Module):
    """A circular cache of ``size`` embeddings of dimension ``dim``.

    Args:
        size: number of slots (>= 1). dim: embedding dimension. num_classes: C.
        temperature: T of the softmax (the paper's scale is 1/T). metric: as in ``nca_loss``.
        backend: as in ``nca_loss``. dtype, device: of the memory (default float32, CPU).
        chunk_size: as in ``nca_loss``: a memory on the CPU scored by queries on a GPU is
            streamed in chunks of this many slots (default 65536).
        pin_memory: allocate a CPU memory in pinned (page-locked) host memory, so that
            the chunks' copies to the GPU overlap with the compute. Needs CUDA.
        distributed: every rank keeps its own ``size`` slots and pushes only its own
            batches; ``loss`` and ``predict`` score the local queries against the union of
            every rank's slots (the queries are gathered, each rank scores them against its
            slots, the partial results are merged across ranks); ``loss`` reduces over
            every rank's queries, as ``nca_loss(distributed=True)``. Gradients reach the
            local queries exactly. Every rank must call ``loss``/``predict`` (and backward)
            together. Needs an initialised torch.distributed process group.
        group: the process group (default: the world); needs ``distributed=True``.

    ``memory``, ``labels``, ``ptr`` (next slot to write) and ``filled`` are buffers, so a
    state_dict round-trips the cache exactly.

    Example::

        cache = nbkernels.NeighborCache(4096, 128, num_classes=10)
        loss = cache(model(x), y)   # loss against the cache, then x is pushed
        probs = cache.predict(model(x_test), model_probs=softmax_out, weight=0.3)
    """

    def __init__(self, size, dim, num_classes, *, temperature=0.05, metric="cosine",
                 backend="auto", dtype=torch.float32, device=None, chunk_size=None,
                 pin_memory=False, distributed=False, group=None):
        super().__init__()
        size, dim = check.integer("size", size, low=1), check.integer("dim", dim, low=1)
        num_classes = check.num_classes(num_classes)
        check.choice("metric", metric, kernel_inputs.METRICS)
        check.choice("backend", backend, backends.CHOICES)
        check.temperature(temperature, torch.device("cpu"))
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        chunk_size = F._scale_options(chunk_size, distributed, group)
        if not isinstance(pin_memory, bool):
            raise TypeError(f"pin_memory must be a bool, got {type(pin_memory).__name__}")
        if pin_memory and (torch.device(device or "cpu").type != "cpu"
                           or not torch.cuda.is_available()):
            raise ValueError(f"pin_memory=True needs a CPU memory (device=None or 'cpu') and "
                             f"CUDA, got device={device}, cuda available="
                             f"{torch.cuda.is_available()}")
        self.size, self.dim, self.num_classes = size, dim, num_classes
        self._warned_cast = False
        self.temperature, self.metric, self.backend = temperature, metric, backend
        self.chunk_size, self.distributed, self.group = chunk_size, distributed, group
        memory = torch.zeros(size, dim, dtype=dtype, device=device)
        self.register_buffer("memory", memory.pin_memory() if pin_memory else memory)
        labels = torch.full((size,), -1, dtype=torch.long, device=device)
        self.register_buffer("labels", labels.pin_memory() if pin_memory else labels)
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
        mem = self.memory.device
        if embeddings.device != mem and not (mem.type == "cpu" and embeddings.device.type == "cuda"):
            raise ValueError(f"embeddings must be on the memory's device {mem}, or on a CUDA "
                             f"device while the memory is on the CPU, got {embeddings.device}")
        if labels is not None:
            check.labels("labels", labels, embeddings.shape[0], "embeddings")
            check.same_device(embeddings=embeddings, labels=labels)
            check.label_range("labels", labels, self.num_classes)

    def _content(self, embeddings):
        n = len(self)
        memory, labels = self.memory[:n], self.labels[:n]
        t = self.temperature
        needs_grad = embeddings.requires_grad or (isinstance(t, torch.Tensor) and t.requires_grad)
        if torch.is_grad_enabled() and needs_grad:
            # a snapshot: the backward (to the queries or to a learned temperature)
            # recomputes from it after later pushes overwrote slots
            pinned = memory.device.type == "cpu" and memory.is_pinned()
            memory = torch.empty(memory.shape, dtype=memory.dtype, device=memory.device,
                                 pin_memory=pinned).copy_(memory)
            labels = labels.clone()
        return memory, labels

    def _sharded(self, embeddings, fn, q_labels=None):
        """``fn.apply`` (ShardedLSE or ShardedProbs) on this rank's slots: ``(q, outputs)``."""
        memory, mem_labels = self._content(embeddings)
        q = embeddings.to(torch.promote_types(embeddings.dtype, memory.dtype))
        t = check.temperature(self.temperature, q.device, check.acc_dtype(q.dtype))
        backend = backends.resolve(self.backend, q.device)
        streamed = memory.device != q.device or self.chunk_size is not None
        chunk = (self.chunk_size or DEFAULT_CHUNK_SIZE) if streamed else max(len(self), 1)
        spec = Spec(self.metric, None, backend, chunk, self.num_classes)
        labels = [] if q_labels is None else [q_labels]
        return q, fn.apply(q, memory, *labels, mem_labels, t, spec, self.group)

    def push(self, embeddings, labels):
        """Write a batch into the oldest slots (detached). A batch larger than the
        cache keeps its last ``size`` rows, with a warning.

        Raises ``ValueError`` when a row holds NaN or inf, or a value beyond the memory
        dtype's range (nothing is written: one such row would poison every later loss and
        prediction, or be stored as inf and lost). Embeddings of a dtype that the
        memory cannot hold exactly (fp64 into an fp32 memory, say) are cast to the
        memory's dtype, with a warning the first time.
        """
        self._check_push(embeddings, labels)
        self._write(embeddings, labels)

    def _check_push(self, embeddings, labels, collective=False):
        """Refuse a batch ``push`` would lose. ``collective`` (``forward`` of a distributed
        cache, whose loss is a collective; a push is each rank's own): every rank refuses,
        or none, since one that raised alone would leave the others waiting in the loss."""
        self._check_batch(embeddings, labels)
        bad = ~torch.isfinite(embeddings).all(1)
        top = torch.finfo(self.memory.dtype).max
        # finite rows the memory's dtype cannot hold would be stored as inf: lost
        big = (embeddings.abs() > top).any(1) & ~bad if \
            torch.finfo(embeddings.dtype).max > top else torch.zeros_like(bad)
        counts = torch.stack([bad.sum(), big.sum()])
        if collective:
            dist_.require(self.group)
            counts = dist_.global_sum(counts.to(embeddings.device), self.group)
        if bool(counts.any()):  # a push reads ptr on the host anyway: no extra sync point
            self._refuse(bad, big, counts, top)
        if (torch.promote_types(embeddings.dtype, self.memory.dtype) != self.memory.dtype
                and not self._warned_cast):
            self._warned_cast = True
            warnings.warn(f"embeddings of dtype {embeddings.dtype} are stored in the cache's "
                          f"{self.memory.dtype} memory (rounded); pass dtype={embeddings.dtype} "
                          "to NeighborCache to keep them exactly", stacklevel=3)

    def _refuse(self, bad, big, counts, top):
        """The push's ValueError: this rank's rows, else another rank's counts."""
        if bool(bad.any()):
            rows = bad.nonzero().flatten()
            raise ValueError(f"embeddings pushed into the cache must be finite, got NaN or inf "
                             f"in {rows.numel()} row(s), e.g. rows {rows[:8].tolist()}; "
                             "nothing was pushed")
        if bool(big.any()):
            rows = big.nonzero().flatten()
            raise ValueError(
                f"embeddings pushed into the cache must fit its {self.memory.dtype} "
                f"memory (|x| <= {top:.6g}), got {rows.numel()} row(s) beyond it, e.g. "
                f"rows {rows[:8].tolist()}; nothing was pushed (pass a wider dtype= to "
                "NeighborCache)")
        raise ValueError(f"another rank's batch holds {int(counts[0])} row(s) with NaN or inf "
                         f"and {int(counts[1])} beyond the {self.memory.dtype} memory's range: "
                         "nothing was pushed on any rank")

    def _write(self, embeddings, labels):
        n = embeddings.shape[0]
        if n > self.size:
            warnings.warn(f"a batch of {n} rows was pushed into a cache of {self.size} slots: "
                          f"only its last {self.size} rows are kept", stacklevel=3)
            embeddings, labels, n = embeddings[-self.size:], labels[-self.size:], self.size
        start = int(self.ptr)
        slots = (start + torch.arange(n, device=self.memory.device)) % self.size
        with torch.no_grad():
            self.memory[slots] = embeddings.detach().to(self.memory.device, self.memory.dtype)
            self.labels[slots] = labels.to(self.memory.device, torch.long)
            self.ptr.fill_((start + n) % self.size)
            self.filled.fill_(min(self.size, len(self) + n))

    def reset(self):
        """Empty the cache."""
        self.memory.zero_()
        self.labels.fill_(-1)
        self.ptr.zero_()
        self.filled.zero_()

    def loss(self, embeddings, labels, reduction="mean"):
        """Loss of the queries against the current content; 0 (with a gradient path) while
        it is empty. Gradients reach the queries only. Distributed: against every rank's
        slots, and "mean" / "sum" over every rank's queries, as ``nca_loss(...,
        distributed=True)``: the same value on every rank, whose gradient w.r.t. the local
        queries is world_size times the single-process one (DDP's average of the gradients
        is then the single-process gradient, whatever the local batch sizes); "none" the
        local rows."""
        self._check_batch(embeddings, labels)
        check.choice("reduction", reduction, check.REDUCTIONS)
        zero = embeddings.sum(1) * 0.0  # keeps the graph and propagates NaN
        if self.distributed:
            q, (lse_all, lse_pos, _) = self._sharded(embeddings, dist_.ShardedLSE,
                                                     labels.long().contiguous())
            valid = P.has_positive(lse_pos)
            loss = F._loss_from_lse(lse_all, lse_pos, valid) + zero  # zero: for an empty union
            # over every rank's queries, as nca_loss(distributed=True): DDP's average of
            # the gradients is then the single-process one, local batch sizes aside
            return F._global_reduce(loss, valid, reduction, q.dtype, self.group)
        if len(self) == 0:
            return zero if reduction == "none" else zero.sum()
        memory, mem_labels = self._content(embeddings)
        return F.nca_loss(embeddings, labels, ref_embeddings=memory, ref_labels=mem_labels,
                          temperature=self.temperature, metric=self.metric,
                          reduction=reduction, backend=self.backend, chunk_size=self.chunk_size)

    def forward(self, embeddings, labels):
        """Loss against the current content, then push the detached batch (checked first:
        a batch that ``push`` refuses raises before any loss is computed)."""
        self._check_push(embeddings, labels, collective=self.distributed)
        loss = self.loss(embeddings, labels)
        self._write(embeddings, labels)
        return loss

    def predict(self, embeddings, model_probs=None, weight=0.5):
        """The cache's class distribution (N, C), or with the model's own softmax output
        ``(1 - weight) * model_probs + weight * cache``: the cache as a second opinion."""
        self._check_batch(embeddings, None)
        filled = len(self)
        if self.distributed:  # every rank raises, or none
            filled = int(dist_.global_sum(self.filled.to(embeddings.device), self.group))
        if filled == 0:
            raise RuntimeError("predict() needs a filled cache: push embeddings first")
        weight = check.real("weight", weight, 0, 1)
        if self.distributed:
            q, probs = self._sharded(embeddings, dist_.ShardedProbs)
            probs = probs.to(q.dtype)
        else:
            memory, mem_labels = self._content(embeddings)
            probs = F.soft_knn_predict(embeddings, memory, mem_labels, self.num_classes,
                                       temperature=self.temperature, metric=self.metric,
                                       backend=self.backend, chunk_size=self.chunk_size)
        if model_probs is None:
            return probs
        if not isinstance(model_probs, torch.Tensor):
            raise TypeError(f"model_probs must be a tensor, got {type(model_probs).__name__}")
        if not model_probs.dtype.is_floating_point:
            raise TypeError(f"model_probs must be a floating tensor of probabilities, got "
                            f"{model_probs.dtype}")
        if model_probs.shape != probs.shape:
            raise ValueError(f"model_probs must have shape {tuple(probs.shape)}, "
                             f"got {tuple(model_probs.shape)}")
        return (1.0 - weight) * model_probs + weight * probs.to(model_probs.dtype)
