"""``overfit_small_batch``: can the model drive one small batch to near-zero loss?

If a network cannot memorise a handful of samples with a conservative optimizer, the
bug is in the model, the loss or the data pipeline, not in the hyper-parameters. A
pass does not prove the setup right; a fail proves it wrong.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["OverfitResult", "overfit_small_batch"]


@dataclass
class OverfitResult:
    """``passed`` is True when ``final_loss <= tol``. ``losses`` holds every step's loss."""

    passed: bool
    initial_loss: float
    final_loss: float
    steps: int
    tol: float
    losses: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"overfit check {verdict}: loss {self.initial_loss:.4g} -> {self.final_loss:.4g} "
                f"in {self.steps} steps (target <= {self.tol:g})")


def overfit_small_batch(model: nn.Module, loss_fn: Callable, batch, *, steps: int = 300,
                        lr: float = 1e-3, tol: float = 0.05, optimizer: Callable | None = None,
                        inplace: bool = False) -> OverfitResult:
    """Train on one batch only and report whether the loss gets near zero.

    Args:
        model: the network. By default a deep copy is trained, so ``model`` is unchanged.
        loss_fn: called as ``loss_fn(model(inputs), targets)``; returns a scalar
            tensor. ``nbkernels.nca_loss`` fits directly for an embedding network.
        batch: ``(inputs, targets)``; keep it small (a few dozen samples).
        steps: the most optimizer steps; training stops as soon as the loss is
            ``<= tol``. Default 300.
        lr: learning rate of the default optimizer, ``torch.optim.Adam``. Default 1e-3,
            the conservative choice the check calls for.
        tol: the loss counted as "near zero". Default 0.05.
        optimizer: optional factory ``optimizer(params) -> torch.optim.Optimizer``
            replacing Adam.
        inplace: train ``model`` itself instead of a copy. Default False.

    Returns:
        An :class:`OverfitResult` (``passed``, ``initial_loss``, ``final_loss``, ...).
        A non-finite loss stops the run and fails it.

    Raises:
        ValueError: ``steps < 1``, ``lr <= 0``, ``tol < 0``, a batch that is not a pair, or a
            loss that no trainable parameter reaches.

    Example::

        result = overfit_small_batch(net, nbkernels.nca_loss, (x[:32], y[:32]))
        assert result.passed, result
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"batch must be an (inputs, targets) pair, got {type(batch).__name__}")
    inputs, targets = batch
    net = model if inplace else copy.deepcopy(model)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    if not params and optimizer is None:
        raise ValueError("model has no trainable parameter (every parameter has requires_grad=False)")
    opt = optimizer(params) if optimizer is not None else torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    for step in range(steps + 1):  # the last pass only measures the final loss
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(inputs), targets)
        # One host read per step is fine here: the check runs once, on one batch.
        losses.append(float(loss.detach()))
        if step == steps or not math.isfinite(losses[-1]) or losses[-1] <= tol:
            break
        if not loss.requires_grad:
            raise ValueError("loss_fn(model(inputs), targets) does not require grad: no trainable "
                             "parameter of the model reaches the loss")
        loss.backward()
        opt.step()
    final = losses[-1]
    return OverfitResult(passed=math.isfinite(final) and final <= tol, initial_loss=losses[0],
                         final_loss=final, steps=len(losses) - 1, tol=tol, losses=losses)
