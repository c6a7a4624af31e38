"""Training-health diagnostics, after the "missing cookbook recipes" for training nets.

* :class:`TrainingMonitor`: per logged step, train/test loss, total parameter norm,
  per-layer gradient norm and max |grad|, dead ReLU fraction, tanh/sigmoid saturation,
  and the first layer that produced a NaN/inf; :meth:`TrainingMonitor.diagnose` turns
  the history into findings.
* :func:`chance_level` and :func:`check_initial_loss`: the loss an untrained model
  should give (softmax, nca, prototype) and a warning when the first loss is far off.
* :func:`overfit_small_batch`: can the model memorise one small batch?
* :func:`plot_grad_norms` (bar chart per layer) and :func:`plot_history` (curves).

Example::

    from nbkernels.diagnostics import TrainingMonitor, chance_level
    monitor = TrainingMonitor(net, chance=chance_level("nca", y_batch))
    ...; loss.backward(); monitor.record(step, loss); opt.step()
    for finding in monitor.diagnose(): print(finding)
"""
from .chance import ChanceCheck, chance_level, check_initial_loss
from .monitor import StepRecord, TrainingMonitor
from .plots import plot_grad_norms, plot_history
from .sanity import OverfitResult, overfit_small_batch

__all__ = [
    "ChanceCheck",
    "OverfitResult",
    "StepRecord",
    "TrainingMonitor",
    "chance_level",
    "check_initial_loss",
    "overfit_small_batch",
    "plot_grad_norms",
    "plot_history",
]
