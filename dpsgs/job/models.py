"""Models as flat nn.Sequential of blocks (stem, blocks, head): block i is module "i", its layers
"i.conv1", "i.bn1", ...; the pipeline cuts them between blocks or inside one (the skip tensor
then crosses beside the main activation: dpsgs.pipeline.graph)."""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MODEL_NAMES", "build_model", "check_model_name"]

# Every name here builds; besides them any "wrn-D-K" (depth D = 6n+4, widen factor K) does.
MODEL_NAMES: list[str] = ["mlp", "mlp-wide", "resnet20", "resnet56", "resnet110", "resnet18",
                          "wrn-16-4", "wrn-28-10"]

_CIFAR_RESNET_DEPTHS = {"resnet20": 20, "resnet56": 56, "resnet110": 110}
_WRN = re.compile(r"^wrn-(\d+)-(\d+)$")


def check_model_name(name: str) -> None:
    """Raise ValueError naming the known models unless `name` is one (no model is built)."""
    if name in ("mlp", "mlp-wide", "resnet18") or name in _CIFAR_RESNET_DEPTHS:
        return
    m = _WRN.match(name)
    if m:
        depth, widen = int(m.group(1)), int(m.group(2))
        if (depth - 4) % 6 != 0 or depth < 10 or widen < 1:
            raise ValueError(f"model {name!r}: a wide ResNet needs depth = 6n+4 >= 10 and "
                             f"widen factor >= 1 (e.g. wrn-16-4, wrn-28-10)")
        return
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)} "
                     f"(or any wrn-D-K with D = 6n+4)")


def build_model(name: str, in_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Build model `name` for inputs of shape `in_shape` (no batch dim) and `num_classes`.

    Every model is a flat nn.Sequential whose children are whole blocks (a residual block, a
    Linear+ReLU, the pooling+classifier head): integer split points name blocks, module
    paths ("7.conv2") name layers inside them. Initialisation uses torch's global RNG: seed it
    for a reproducible model.
    """
    check_model_name(name)
    in_shape = tuple(int(s) for s in in_shape)
    if not in_shape or any(s < 1 for s in in_shape):
        raise ValueError(f"model {name!r}: bad input shape {in_shape}")
    if num_classes < 2:
        raise ValueError(f"model {name!r}: num_classes must be >= 2, got {num_classes}")
    if name == "mlp":
        return _mlp(in_shape, num_classes, hidden=(128, 128, 64))
    if name == "mlp-wide":  # ~6.3M params on CIFAR shapes: 25 MB of fp32 gradient per step
        return _mlp(in_shape, num_classes, hidden=(1024, 1024, 1024, 1024))
    if len(in_shape) != 3:
        raise ValueError(f"model {name!r} takes images C x H x W, got input shape {in_shape}")
    if name in _CIFAR_RESNET_DEPTHS:
        n = (_CIFAR_RESNET_DEPTHS[name] - 2) // 6
        return _resnet(in_shape[0], num_classes, widths=(16, 32, 64), blocks=(n, n, n),
                       shortcut="A")
    if name == "resnet18":
        return _resnet(in_shape[0], num_classes, widths=(64, 128, 256, 512),
                       blocks=(2, 2, 2, 2), shortcut="B")
    m = _WRN.match(name)
    assert m is not None
    return _wide_resnet(in_shape[0], num_classes, int(m.group(1)), int(m.group(2)))


# ---------------------------------------------------------------- MLP

def _mlp(in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...]) -> nn.Sequential:
    # Inputs of any shape are flattened by the first block, so images (1x8x8 digits) work too.
    features = math.prod(in_shape)
    blocks: list[nn.Module] = []
    for i, width in enumerate(hidden):
        layers: list[nn.Module] = [nn.Flatten()] if i == 0 else []
        layers += [nn.Linear(features, width), nn.ReLU()]
        blocks.append(nn.Sequential(*layers))
        features = width
    blocks.append(nn.Linear(features, num_classes))
    return nn.Sequential(*blocks)


# ---------------------------------------------------------------- ResNets (He et al. 2016)

class _PadShortcut(nn.Module):
    """Option A shortcut: subsample by `stride`, zero-pad the new channels (no parameters)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers and a shortcut (identity, option A pad, or option B 1x1 conv)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = (_PadShortcut(in_ch, out_ch, stride) if shortcut == "A" else
                             nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                           nn.BatchNorm2d(out_ch)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _stem(in_ch: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU())


def _head(width: int, num_classes: int, pre: list[nn.Module] | None = None) -> nn.Sequential:
    return nn.Sequential(*(pre or []), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))


def _resnet(in_ch: int, num_classes: int, widths: tuple[int, ...], blocks: tuple[int, ...],
            shortcut: str) -> nn.Sequential:
    layers: list[nn.Module] = [_stem(in_ch, widths[0])]
    prev = widths[0]
    for group, (width, count) in enumerate(zip(widths, blocks)):
        for i in range(count):
            stride = 2 if group > 0 and i == 0 else 1
            layers.append(BasicBlock(prev, width, stride, shortcut))
            prev = width
    layers.append(_head(prev, num_classes))
    _init_resnet(layers)
    return nn.Sequential(*layers)


def _init_resnet(layers: list[nn.Module]) -> None:
    for m in nn.ModuleList(layers).modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------- Wide ResNet (Zagoruyko 2016)

class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3, BN-ReLU-conv3x3, 1x1 conv shortcut on a change."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        # As in the reference WRN code: the projection shortcut reads the pre-activated input.
        return out + (x if self.shortcut is None else self.shortcut(pre))


def _wide_resnet(in_ch: int, num_classes: int, depth: int, widen: int) -> nn.Sequential:
    n = (depth - 4) // 6
    widths = (16 * widen, 32 * widen, 64 * widen)
    layers: list[nn.Module] = [nn.Conv2d(in_ch, 16, 3, 1, 1, bias=False)]
    prev = 16
    for group, width in enumerate(widths):
        for i in range(n):
            layers.append(WideBlock(prev, width, 2 if group > 0 and i == 0 else 1))
            prev = width
    layers.append(_head(prev, num_classes, pre=[nn.BatchNorm2d(prev), nn.ReLU()]))
    _init_resnet(layers)
    return nn.Sequential(*layers)
