"""Class-balanced batches: ``m`` samples for each of ``k`` distinct classes.

Neighbor losses (``nca_loss``, ``prototype_loss``, ``NeighborCache``) get a learning
signal only from same-class pairs inside the batch, so a batch must hold several
samples of each class it contains. A uniformly shuffled batch of 64 out of 100 classes
has almost none; this sampler guarantees ``samples_per_class - 1`` positives per query.
"""
from __future__ import annotations

import numbers
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from nbkernels import _validation as check

__all__ = ["ClassBalancedBatchSampler"]


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Yield batches of dataset indices holding ``samples_per_class`` samples of each
    of ``classes_per_batch`` distinct classes.

    Classes are visited in shuffled rounds, so over ``C / classes_per_batch`` batches
    every class appears about equally often. Within a class the samples are drawn from
    a shuffled queue without replacement, so every sample is seen before any repeats:
    at any point, the draw counts of a class's samples differ by at most one. When a
    pass over the class ends inside a draw, the draw takes the rest of that pass first
    and fills up from the next pass, skipping samples already in the draw.
    A class with fewer than ``samples_per_class`` samples is drawn *with* replacement
    (its batches then contain duplicates).

    Each batch is a list of ``classes_per_batch * samples_per_class`` ints, grouped by
    class: the first ``samples_per_class`` indices share one label, and so on.

    Args:
        labels: (N,) integer class labels (tensor, NumPy array or sequence), one per
            dataset item. Any integer values; they need not be contiguous.
        classes_per_batch: ``k``, the number of distinct classes per batch,
            ``1 <= k <= number of distinct labels``.
        samples_per_class: ``m >= 1``, the samples drawn for each class. Use ``m >= 2``
            for neighbor losses: with ``m = 1`` a query has no positive.
        num_batches: batches per pass (``len(sampler)``). Default
            ``max(1, N // (k * m))``, about one epoch.
        generator: a ``torch.Generator`` to draw from. Mutually exclusive with ``seed``.
        seed: seed for a private generator. Two samplers built with the same labels,
            arguments and seed yield the same batches, pass after pass. With neither
            ``generator`` nor ``seed``, a seed is drawn from torch's global RNG, so
            ``torch.manual_seed`` makes the run reproducible.

    Raises:
        TypeError: labels are not integers, or a count is not an int.
        ValueError: labels are empty or not 1-D, a count is out of range, or both
            ``generator`` and ``seed`` are given.

    Example::

        sampler = ClassBalancedBatchSampler(train_labels, classes_per_batch=8, samples_per_class=4, seed=0)
        loader = DataLoader(dataset, batch_sampler=sampler)
        for x, y in loader: ...   # 32 rows: 4 of each of 8 classes
    """

    def __init__(
        self,
        labels,
        classes_per_batch: int,
        samples_per_class: int,
        *,
        num_batches: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        labels = _as_label_tensor(labels)
        classes, inverse = torch.unique(labels, sorted=True, return_inverse=True)
        num_classes = classes.numel()
        classes_per_batch = _check_count("classes_per_batch", classes_per_batch, low=1, high=num_classes,
                                         high_reason=f"the number of distinct labels ({num_classes})")
        samples_per_class = _check_count("samples_per_class", samples_per_class, low=1)
        if num_batches is None:
            num_batches = max(1, labels.numel() // (classes_per_batch * samples_per_class))
        num_batches = _check_count("num_batches", num_batches, low=1)
        if generator is not None and seed is not None:
            raise ValueError("pass either generator or seed, not both "
                             f"(got generator={generator!r}, seed={seed!r})")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        seed = check.seed(seed, optional=True)
        if generator is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator().manual_seed(int(seed))

        self.classes = classes.tolist()
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        self.num_batches = num_batches
        self.generator = generator
        # members[c]: dataset indices of class position c (positions index self.classes)
        order = torch.argsort(inverse, stable=True)
        counts = torch.bincount(inverse, minlength=num_classes).tolist()
        self.members = list(torch.split(order, counts))
        self._class_queue: list[int] = []
        self._sample_queues: list[list[int]] = [[] for _ in range(num_classes)]

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.num_batches):
            batch: list[int] = []
            for c in self._next_classes():
                batch.extend(self._draw(c))
            yield batch

    def _next_classes(self) -> list[int]:
        """``k`` distinct class positions from a shuffled round of all classes."""
        k = self.classes_per_batch
        picked, self._class_queue = self._class_queue[:k], self._class_queue[k:]
        if len(picked) < k:
            # The round ran out: top up from a fresh round, skipping classes already
            # picked so that the batch still has k distinct classes.
            fresh = torch.randperm(len(self.classes), generator=self.generator).tolist()
            top_up = [c for c in fresh if c not in picked][: k - len(picked)]
            self._class_queue = [c for c in fresh if c not in top_up]
            picked += top_up
        return picked

    def _draw(self, c: int) -> list[int]:
        """``m`` indices of class position ``c``."""
        m = self.samples_per_class
        members = self.members[c]
        if members.numel() < m:
            pick = torch.randint(members.numel(), (m,), generator=self.generator)
            return members[pick].tolist()
        queue = self._sample_queues[c]
        if len(queue) >= m:
            self._sample_queues[c] = queue[m:]
            return queue[:m]
        # The pass ran out: take the remainder (samples not yet seen in this pass)
        # first, then fill up from a fresh permutation, skipping indices already in
        # this draw so that no index appears twice in one batch (possible because the
        # class has >= m samples). The skipped ones stay at the front of the new queue,
        # so the new pass still visits every sample once.
        taken = list(queue)
        in_draw = set(taken)
        fresh = members[torch.randperm(members.numel(), generator=self.generator)].tolist()
        rest: list[int] = []
        for i in fresh:
            if len(taken) < m and i not in in_draw:
                taken.append(i)
            else:
                rest.append(i)
        self._sample_queues[c] = rest
        return taken


def _as_label_tensor(labels) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"labels must be a 1-D sequence of integers, got {type(labels).__name__}") from err
    # empty first: an empty sequence becomes a float tensor
    if labels.numel() == 0:
        raise ValueError("labels must not be empty, got 0 labels")
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {tuple(labels.shape)}")
    return labels.detach().to("cpu", torch.int64)


def _check_count(name: str, value, *, low: int, high: int | None = None, high_reason: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high_reason or high}, got {value}")
    return value
