"""Plots of the monitor's records (matplotlib, imported lazily, Agg backend)."""
from __future__ import annotations

import math

from .monitor import StepRecord, TrainingMonitor

__all__ = ["plot_grad_norms", "plot_history"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from err
    matplotlib.use("Agg")  # no display needed; plots go to files
    import matplotlib.pyplot as plt
    return plt


def plot_grad_norms(source, *, ax=None, path=None, title: str | None = None):
    """Bar chart of per-layer gradient norms (log scale), one bar per layer.

    Args:
        source: a :class:`TrainingMonitor` (its last record), a :class:`StepRecord`,
            or a ``{layer name: norm}`` dict.
        ax: a matplotlib Axes to draw on; default a new figure.
        path: if given, the figure is saved there (png/pdf/svg by extension).
        title: axes title. Default names the step.

    Returns:
        The matplotlib Figure.

    Raises:
        ValueError: the monitor has no record, or there are no gradient norms.
    """
    step = None
    if isinstance(source, TrainingMonitor):
        if not source.history:
            raise ValueError("source monitor has no records; call record() after backward() first")
        source = source.history[-1]
    if isinstance(source, StepRecord):
        step, source = source.step, source.layer_grad_norm
    if not isinstance(source, dict) or not source:
        raise ValueError(f"source must hold per-layer gradient norms, got {source!r}")
    plt = _pyplot()
    fig = ax.figure if ax is not None else plt.subplots(figsize=(max(4, 0.6 * len(source) + 2), 3.5))[1].figure
    ax = ax if ax is not None else fig.axes[0]
    names = list(source)
    # Zero or non-finite norms cannot sit on a log axis; draw them as a red marker.
    values = [v if math.isfinite(v) and v > 0 else float("nan") for v in source.values()]
    ax.bar(range(len(names)), values, color="tab:blue")
    for i, v in enumerate(source.values()):
        if not (math.isfinite(v) and v > 0):
            ax.annotate("nan/inf" if not math.isfinite(v) else "0", (i, 1), xycoords=("data", "axes fraction"),
                        ha="center", va="top", color="red", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("gradient norm")
    ax.set_title(title if title is not None else ("gradient norm per layer" + (f" (step {step})" if step is not None else "")))
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_history(monitors, *, path=None, chance: dict[str, float] | None = None):
    """Training curves of one or several monitors, one line per monitor.

    Panels: train loss, test loss (log scale when positive), parameter norm, total
    gradient norm (log), dead ReLU fraction, and the last per-layer gradient norms (bars
    grouped by monitor). When
    ``chance`` maps a monitor's name to its chance level (or the monitor has
    ``chance`` set), its losses are divided by it, so that losses with different
    scales share an axis and 1.0 means "at chance".

    Args:
        monitors: a :class:`TrainingMonitor` or a ``{name: monitor}`` dict.
        path: if given, the figure is saved there.
        chance: optional ``{name: chance level}``.

    Returns:
        The matplotlib Figure.
    """
    if isinstance(monitors, TrainingMonitor):
        monitors = {"model": monitors}
    if not isinstance(monitors, dict) or not monitors:
        raise ValueError(f"monitors must be a TrainingMonitor or a non-empty dict of them, got {monitors!r}")
    chance = dict(chance or {})
    for name, mon in monitors.items():
        if name not in chance and mon.chance:
            chance[name] = mon.chance
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    scaled = bool(chance) and all(name in chance for name in monitors)
    loss_unit = "loss / chance level" if scaled else "loss"
    panels = [("train_loss", f"train {loss_unit}", "log"), ("test_loss", f"test {loss_unit}", "log"),
              ("param_norm", "parameter norm", "linear"), ("grad_norm", "gradient norm (total)", "log"),
              ("dead_relu", "dead ReLU fraction", "linear")]
    for ax, (key, label, scale) in zip(axes.flat, panels):
        drawn, positive = False, True
        for name, mon in monitors.items():
            pts = [(r.step, getattr(r, key)) for r in mon.history if getattr(r, key) is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if key.endswith("loss") and scaled:
                ys = [y / chance[name] for y in ys]
            ax.plot(xs, ys, label=name, lw=1.3)
            drawn = True
            positive = positive and all(y > 0 for y in ys)
        if key.endswith("loss") and scaled:
            ax.axhline(1.0, color="gray", ls=":", lw=1)
        if drawn and scale == "log" and positive:  # a loss of exactly 0 keeps a linear axis
            ax.set_yscale("log")
        ax.set_title(label)
        ax.set_xlabel("step")
        if not drawn:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="gray")
    axes.flat[0].legend(fontsize=8)
    _grouped_grad_bars(axes.flat[5], monitors)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _grouped_grad_bars(ax, monitors: dict) -> None:
    """Last per-layer gradient norms, one bar group per layer, one colour per monitor."""
    last = {name: mon.history[-1].layer_grad_norm for name, mon in monitors.items() if mon.history}
    layers = list(dict.fromkeys(layer for norms in last.values() for layer in norms))
    if not layers:
        ax.text(0.5, 0.5, "no gradients", ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    width = 0.8 / max(1, len(last))
    for i, (name, norms) in enumerate(last.items()):
        vals = [norms.get(layer, float("nan")) for layer in layers]
        vals = [v if math.isfinite(v) and v > 0 else float("nan") for v in vals]
        ax.bar([j + (i - (len(last) - 1) / 2) * width for j in range(len(layers))], vals, width, label=name)
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right", fontsize=8)
    ax.set_title("gradient norm per layer (last record)")
