"""The demo's model, its five training objectives and the training loop.

Every objective trains the same embedding network from the same initial weights, on
the same class-balanced batches, for the same number of steps, with the same
optimizer. Only the loss differs. Neighbor losses use the cosine metric, so that
every model is judged in the same geometry (see ``evaluate``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

import nbkernels
from nbkernels.diagnostics import TrainingMonitor, chance_level, overfit_small_batch
from nbkernels.sampler import ClassBalancedBatchSampler

__all__ = ["LOSSES", "Config", "DemoModel", "Objective", "make_objective", "overfit_check", "train"]

LOSSES = ("softmax", "nca", "prototype", "cache", "softmax+cache")
CACHE_WEIGHT = 1.0  # weight of the cache loss when it regularises softmax
METRIC = "cosine"


@dataclass
class Config:
    """Everything that shapes a run; identical for every loss."""

    steps: int = 1500
    lr: float = 1e-3
    temperature: float = 0.1
    classes_per_batch: int = 10
    samples_per_class: int = 8
    embedding_dim: int = 32
    hidden: int = 128
    cache_size: int = 512
    log_every: int = 25
    overfit_steps: int = 300
    tsne_iter: int = 1000
    seed: int = 0
    losses: tuple[str, ...] = LOSSES


class DemoModel(nn.Module):
    """MLP embedding ``in_dim -> hidden -> hidden -> embedding_dim`` (ReLU), plus a linear
    softmax head for the objectives that need one. ``forward`` returns
    ``(embedding (N, E), logits (N, C) or None)``."""

    def __init__(self, in_dim: int, hidden: int, embedding_dim: int, num_classes: int, with_head: bool):
        super().__init__()
        # Built first, so that the seed gives every objective the same embedding weights.
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                   nn.Linear(hidden, embedding_dim))
        self.head = nn.Linear(embedding_dim, num_classes) if with_head else None

    def forward(self, x):
        z = self.embed(x)
        return z, (self.head(z) if self.head is not None else None)


class Objective:
    """One training loss. ``loss`` may update state (the cache); ``eval_loss`` does not."""

    def __init__(self, name: str, num_classes: int, cfg: Config, device):
        self.name = name
        self.num_classes = num_classes
        self.t = cfg.temperature
        self.uses_head = name in ("softmax", "softmax+cache")
        self.cache = None
        if "cache" in name:
            self.cache = nbkernels.NeighborCache(cfg.cache_size, cfg.embedding_dim, num_classes,
                                                 temperature=cfg.temperature, metric=METRIC, device=device)
        # The cache gives no signal while empty, so its objectives are judged from step 1.
        self.first_step = 1 if self.cache is not None else 0

    def loss(self, out, y):
        z, logits = out
        if self.name == "softmax":
            return F.cross_entropy(logits, y)
        if self.name == "nca":
            return nbkernels.nca_loss(z, y, temperature=self.t, metric=METRIC)
        if self.name == "prototype":
            return nbkernels.prototype_loss(z, y, temperature=self.t, metric=METRIC)
        if self.name == "cache":
            return self.cache(z, y)
        return F.cross_entropy(logits, y) + CACHE_WEIGHT * self.cache(z, y)

    @torch.no_grad()
    def eval_loss(self, out, y) -> torch.Tensor:
        """The loss on held-out data, leaving the cache untouched."""
        z, logits = out
        total = z.new_zeros(())
        if self.uses_head:
            total = total + F.cross_entropy(logits, y)
        if self.name == "nca":
            total = total + nbkernels.nca_loss(z, y, temperature=self.t, metric=METRIC)
        elif self.name == "prototype":
            total = total + nbkernels.prototype_loss(z, y, temperature=self.t, metric=METRIC)
        elif self.cache is not None and len(self.cache):
            mass = self.cache.predict(z).gather(1, y[:, None]).squeeze(1)
            total = total + (CACHE_WEIGHT if self.uses_head else 1.0) * -mass.clamp_min(1e-12).log().mean()
        return total

    def chance(self, y) -> float:
        """Chance level of ``loss`` for batch labels ``y`` given the current cache."""
        level = 0.0
        if self.uses_head:
            level += chance_level("softmax", y, num_classes=self.num_classes)
        if self.name == "nca":
            level += chance_level("nca", y)
        elif self.name == "prototype":
            level += chance_level("prototype", y)
        elif self.cache is not None and len(self.cache):
            n = len(self.cache)
            weight = CACHE_WEIGHT if self.uses_head else 1.0
            level += weight * chance_level("nca", y.cpu(), ref_labels=self.cache.labels[:n].cpu())
        return level


def make_objective(name: str, num_classes: int, cfg: Config, device) -> Objective:
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
    return Objective(name, num_classes, cfg, device)


def build_model(data, cfg: Config, with_head: bool, device) -> DemoModel:
    torch.manual_seed(cfg.seed)
    return DemoModel(data.x_train.shape[1], cfg.hidden, cfg.embedding_dim, data.num_classes, with_head).to(device)


def _sampler(labels, cfg: Config, num_batches: int, seed: int) -> ClassBalancedBatchSampler:
    k = min(cfg.classes_per_batch, int(labels.max()) + 1)
    return ClassBalancedBatchSampler(labels, k, cfg.samples_per_class, num_batches=num_batches, seed=seed)


def overfit_check(name: str, data, cfg: Config, device):
    """The "can it memorise one batch?" check for one objective, on a fresh model."""
    objective = make_objective(name, data.num_classes, cfg, device)
    model = build_model(data, cfg, objective.uses_head, device)
    idx = torch.tensor(next(iter(_sampler(data.y_train, cfg, 1, cfg.seed))))
    batch = (data.x_train[idx].to(device), data.y_train[idx].to(device))
    if objective.cache is not None:
        # An empty cache gives loss 0, a trivial pass: start from the batch's untrained embeddings.
        with torch.no_grad():
            objective.cache.push(model(batch[0])[0], batch[1])
    return overfit_small_batch(model, objective.loss, batch, steps=cfg.overfit_steps, lr=1e-3, inplace=True)


@dataclass
class TrainResult:
    name: str
    model: DemoModel
    objective: Objective
    monitor: TrainingMonitor
    seconds: float
    findings: list[str] = field(default_factory=list)


def train(name: str, data, cfg: Config, device, progress=None) -> TrainResult:
    """Train one objective for ``cfg.steps`` steps, recording a ``TrainingMonitor``.

    ``progress`` is an optional tqdm bar, advanced once per step.
    """
    objective = make_objective(name, data.num_classes, cfg, device)
    model = build_model(data, cfg, objective.uses_head, device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    # Test loss on fixed test batches of the training composition, so that it shares
    # the training loss's chance level.
    n_test_batches = max(1, data.x_test.shape[0] // (cfg.classes_per_batch * cfg.samples_per_class))
    test_batches = [torch.tensor(b, device=device)
                    for b in _sampler(data.y_test, cfg, n_test_batches, cfg.seed + 1)]
    monitor = TrainingMonitor(model, warn=False)
    last = cfg.steps - 1
    start = time.perf_counter()
    for step, idx in enumerate(_sampler(data.y_train, cfg, cfg.steps, cfg.seed)):
        idx = torch.tensor(idx, device=device)
        yb = y_train[idx]
        logged = step >= objective.first_step and (step % cfg.log_every == 0 or step == last
                                                   or step == objective.first_step)
        if logged and monitor.chance is None:
            monitor.chance = objective.chance(yb)  # before loss() pushes into the cache
        model.train()
        loss = objective.loss(model(x_train[idx]), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if logged:
            model.eval()
            with torch.no_grad():  # the monitor's hooks skip no-grad passes
                test_loss = sum(float(objective.eval_loss(model(x_test[b]), y_test[b])) for b in test_batches)
            monitor.record(step, loss, test_loss / len(test_batches))
        opt.step()
        if progress is not None:
            progress.update(1)
    seconds = time.perf_counter() - start
    monitor.close()
    return TrainResult(name=name, model=model, objective=objective, monitor=monitor, seconds=seconds,
                       findings=monitor.diagnose())
