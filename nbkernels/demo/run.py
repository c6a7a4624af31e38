"""Orchestration: overfit checks, training, evaluation and the output files."""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch

import nbkernels

from .data import DemoData
from .evaluate import embedding_metrics, evaluate
from .report import plot_training, plot_tsne, write_metrics, write_report
from .train import Config, overfit_check, train

__all__ = ["run_demo"]


def run_demo(data: DemoData, cfg: Config, out_dir: str, device: torch.device, *,
             progress: bool = True, command: str = "python -m nbkernels.demo") -> dict:
    """Run the whole experiment and write report.md, metrics.json, tsne.png and
    training.png into ``out_dir``. Returns the metrics.json payload."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else (lambda msg: None)

    log(f"data: {data.source}: {data.x_train.shape[0]} train / {data.x_test.shape[0]} test, "
        f"{data.num_classes} classes; device {device}")
    overfit = {}
    for name in cfg.losses:
        overfit[name] = overfit_check(name, data, cfg, device)
        log(f"[{name}] {overfit[name]}")
    log(f"overfit checks done at {time.perf_counter() - start:.1f} s")

    results = {}
    bar = tqdm(total=cfg.steps * len(cfg.losses), desc="training", unit="step", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    with bar:
        for name in cfg.losses:
            bar.set_description(f"training {name}")
            results[name] = train(name, data, cfg, device, progress=bar)

    losses, embeddings = {}, {}
    for name, res in results.items():
        metrics, embeddings[name] = evaluate(res, data, cfg, device)
        mon = res.monitor
        first = mon.history[0] if mon.history else None
        last = mon.history[-1] if mon.history else None
        metrics.update({
            "train_seconds": res.seconds,
            "first_loss": first.train_loss if first else None,
            "chance_loss": mon.chance,
            "chance_ok": mon.chance_check.ok if mon.chance_check else None,
            "final_train_loss": last.train_loss if last else None,
            "final_test_loss": last.test_loss if last else None,
            "overfit_passed": overfit[name].passed,
            "overfit_final_loss": overfit[name].final_loss,
            "findings": res.findings,
        })
        losses[name] = metrics
    raw = embedding_metrics(data.x_train, data.y_train, data.x_test, data.y_test, data.num_classes,
                            cfg.temperature)
    raw_unit = torch.nn.functional.normalize(data.x_test, dim=1).numpy()

    log(f"training and evaluation done at {time.perf_counter() - start:.1f} s; t-SNE of "
        f"{len(embeddings) + 1} embeddings ...")
    plot_tsne(os.path.join(out_dir, "tsne.png"), {**embeddings, "raw input": raw_unit},
              data.y_test.numpy(), data.class_names, cfg.seed, cfg.tsne_iter)
    plot_training(os.path.join(out_dir, "training.png"), {n: r.monitor for n, r in results.items()})

    payload = {
        "device": _device_name(device),
        "seconds": time.perf_counter() - start,
        "losses": losses,
        "raw_input": raw,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "data": data.describe(),
        "versions": {"torch": torch.__version__, "nbkernels": getattr(nbkernels, "__version__", "unknown"),
                     "python": sys.version.split()[0]},
    }
    write_metrics(os.path.join(out_dir, "metrics.json"), payload)
    write_report(os.path.join(out_dir, "report.md"), payload, overfit,
                 {n: r.findings for n, r in results.items()}, command)
    return payload


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads != 1 else ''})"
