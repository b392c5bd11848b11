"""A tiny float64 model and dataset shared by the trainer rank programs and their tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpsgs.config import TrainConfig
from dpsgs.job.data import Dataset

__all__ = ["toy_data", "toy_model", "toy_config", "ReluNet", "SkipNet"]


def toy_data(n: int = 96, features: int = 6, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return Dataset(x, y, classes, "toy"), Dataset(x[:36], y[:36], classes, "toy")


class ReluNet(nn.Module):
    """Functional ops between the child layers (issue 16: a children() split dropped them)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(F.relu(self.fc1(x)))))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(x + self.b(torch.tanh(self.a(x))))


class SkipNet(nn.Module):
    """A residual block: a cut before block.b carries the block's input beside a's output."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(6, 8), _Block(), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.block(torch.tanh(self.inp(x))))


def toy_model(seed: int = 0, bn: bool = False, kind: str = "seq") -> nn.Module:
    """seq: 5 blocks; with bn=True the second block is Linear+BatchNorm (running
    statistics). relu / skip: ReluNet / SkipNet (split them by module path)."""
    torch.manual_seed(seed)
    if kind != "seq":
        return {"relu": ReluNet, "skip": SkipNet}[kind]()
    middle = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)) if bn else nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), middle, nn.Tanh(), nn.Linear(8, 3))


def toy_config(**overrides) -> TrainConfig:
    """float64, batch 8, 2 epochs of 96 samples, SGD with momentum/wd, cosine LR."""
    base = dict(dtype="float64", batch_size=8, epochs=2, lr=0.1, momentum=0.9,
                weight_decay=1e-3, lr_schedule="cosine", progress=False, seed=3,
                checkpoint_every=0, timeout=60.0)
    base.update(overrides)
    if base.get("split") is None and base.get("stages", 2) > 1:
        base["split"] = {2: [2], 3: [2, 4], 4: [1, 2, 4]}[base.get("stages", 2)]
    return TrainConfig(**base)
