"""Optimizers (SGD/Adam/AdamW via torch.optim) and the per-step learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from dpsgs.config import TrainConfig

__all__ = ["OPTIMIZERS", "LR_SCHEDULES", "ScheduledOptimizer", "build_optimizer", "lr_at", "set_lr"]

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "step", "cosine")


def build_optimizer(params: Iterable[torch.nn.Parameter],
                    config: TrainConfig) -> torch.optim.Optimizer | None:
    """The optimizer named by config.optimizer over `params` (one stage's parameters); None
    for a stage without parameters (e.g. a lone activation): callers skip its update.
    Every rank of a stage builds the same one and steps it with the same averaged gradient.
    foreach=False: the same per-parameter kernels in every process, so runs compare bitwise."""
    params = list(params)
    name = config.optimizer
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if not params:
        return None
    if name == "sgd":
        if config.nesterov and (config.momentum <= 0):
            raise ValueError("nesterov needs momentum > 0")
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, nesterov=config.nesterov,
                               foreach=False)
    if name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay,
                                foreach=False)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                 foreach=False)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def lr_at(iteration: int, total: int, config: TrainConfig, steps_per_epoch: int | None = None) -> float:
    """Learning rate for the update of global batch `iteration` (0-based) of `total`.

    Linear warm-up over config.warmup_epochs (needs steps_per_epoch), then constant,
    step (multiply by lr_gamma at each fraction of training in lr_milestones) or cosine
    (from lr to 0 over the iterations after warm-up)."""
    base = float(config.lr)
    total = max(1, int(total))
    warm = 0
    if config.warmup_epochs and config.warmup_epochs > 0:
        if not steps_per_epoch:
            raise ValueError("warmup_epochs needs steps_per_epoch")
        warm = int(round(config.warmup_epochs * steps_per_epoch))
    if iteration < warm:
        return base * (iteration + 1) / warm
    kind = config.lr_schedule
    if kind == "constant":
        return base
    if kind == "step":
        passed = sum(1 for m in config.lr_milestones if iteration >= m * total)
        return base * config.lr_gamma ** passed
    if kind == "cosine":
        span = max(1, total - warm)
        progress = min(1.0, (iteration - warm) / span)
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {kind!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class ScheduledOptimizer:
    """A stage's optimizer with the run's LR schedule: step(batch) sets the learning rate of
    global batch `batch` (0-based, of `total`) and applies the update (the pipeline's
    StageOptimizer)."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainConfig, total: int,
                 steps_per_epoch: int) -> None:
        self.optimizer, self.config = optimizer, config
        self.total, self.steps_per_epoch = total, steps_per_epoch

    def step(self, batch: int) -> None:
        set_lr(self.optimizer, lr_at(batch, self.total, self.config, self.steps_per_epoch))
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
