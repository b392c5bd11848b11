"""Optimizers and the per-step learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from dpsgs.config import TrainConfig
from dpsgs.job.optim import build_optimizer, lr_at, set_lr


def test_build_optimizer():
    p = [torch.nn.Parameter(torch.ones(3))]
    opt = build_optimizer(p, TrainConfig(optimizer="sgd", lr=0.5, momentum=0.9,
                                         weight_decay=0.1, nesterov=True))
    assert isinstance(opt, torch.optim.SGD)
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (0.5, 0.9, 0.1, True)
    assert isinstance(build_optimizer(p, TrainConfig(optimizer="adam")), torch.optim.Adam)
    assert isinstance(build_optimizer(p, TrainConfig(optimizer="adamw")), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer(p, TrainConfig(optimizer="lamb"))
    with pytest.raises(ValueError, match="nesterov needs momentum"):
        build_optimizer(p, TrainConfig(nesterov=True, momentum=0.0))
    set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] == 0.25


def test_sgd_step_value():
    p = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = build_optimizer([p], TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.5))
    p.grad = torch.tensor([2.0], dtype=torch.float64)
    opt.step()                    # v = 2 + 0.5*1 = 2.5; p = 1 - 0.25
    assert p.item() == pytest.approx(0.75)
    p.grad = torch.tensor([2.0], dtype=torch.float64)
    opt.step()                    # g = 2 + 0.375 = 2.375; v = 0.9*2.5 + 2.375 = 4.625
    assert p.item() == pytest.approx(0.75 - 0.4625)


def test_lr_schedules():
    c = TrainConfig(lr=1.0, lr_schedule="constant")
    assert [lr_at(i, 10, c) for i in (0, 5, 9)] == [1.0, 1.0, 1.0]
    c = TrainConfig(lr=1.0, lr_schedule="step", lr_milestones=[0.5, 0.75], lr_gamma=0.1)
    assert [lr_at(i, 100, c) for i in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    c = TrainConfig(lr=2.0, lr_schedule="cosine")
    assert lr_at(0, 10, c) == 2.0
    assert lr_at(5, 10, c) == pytest.approx(1.0)
    assert lr_at(10, 10, c) == pytest.approx(0.0)
    c = TrainConfig(lr=1.0, lr_schedule="cosine", warmup_epochs=1)
    assert [lr_at(i, 14, c, steps_per_epoch=4) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 14, c, steps_per_epoch=4) == 1.0
    assert lr_at(9, 14, c, steps_per_epoch=4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    with pytest.raises(ValueError, match="steps_per_epoch"):
        lr_at(0, 10, c)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        lr_at(0, 10, TrainConfig(lr_schedule="poly"))
