"""Split an nn.Sequential into K contiguous stages: explicit split points or balanced by cost.

Every rank builds the full model deterministically from the seed and keeps only its own
stage's layers (`stage_module`); at the sizes this project trains that costs a moment and
some transient memory, and it guarantees every rank starts from the same weights.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["check_split", "balance", "stage_bounds", "stage_module", "layer_costs",
           "profile_layers", "boundary_shapes"]


def _layers(model: nn.Sequential | Sequence[nn.Module]) -> list[nn.Module]:
    return list(model.children()) if isinstance(model, nn.Module) else list(model)


def check_split(split: Sequence[int], num_layers: int, stages: int) -> list[int]:
    """Validate K-1 split points (index of the first layer of stages 1..K-1)."""
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if stages > num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {stages} stages "
                         f"(each stage needs at least one layer)")
    split = [int(s) for s in split]
    if len(split) != stages - 1:
        raise ValueError(f"split {split}: {stages} stages need {stages - 1} split points")
    prev = 0
    for i, s in enumerate(split):
        if not prev < s < num_layers:
            raise ValueError(f"split {split}: point {i} = {s} must be in ({prev}, {num_layers}) "
                             f"(strictly increasing layer indices, no empty stage)")
        prev = s
    return split


def balance(costs: Sequence[float], stages: int) -> list[int]:
    """Split points minimising the largest per-stage cost (contiguous, non-empty stages).

    Exact dynamic programme, O(K L^2); ties go to the earliest split."""
    L = len(costs)
    if stages > L:
        raise ValueError(f"cannot split {L} layers into {stages} stages "
                         f"(each stage needs at least one layer)")
    if any(c < 0 for c in costs):
        raise ValueError(f"layer costs must be >= 0, got {list(costs)}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[s][i]: minimal max-cost splitting layers [0, i) into s stages; arg: last cut
    best = [[inf] * (L + 1) for _ in range(stages + 1)]
    arg = [[0] * (L + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, L + 1):
            for j in range(s - 1, i):
                v = max(best[s - 1][j], prefix[i] - prefix[j])
                if v < best[s][i] - 1e-12 * max(1.0, abs(v)):
                    best[s][i], arg[s][i] = v, j
    cuts, i = [], L
    for s in range(stages, 0, -1):
        i = arg[s][i]
        cuts.append(i)
    return sorted(cuts)[1:]  # drop the leading 0


def stage_bounds(split: Sequence[int], num_layers: int) -> list[tuple[int, int]]:
    """[(first, end)] layer ranges of every stage."""
    edges = [0, *split, num_layers]
    return [(edges[k], edges[k + 1]) for k in range(len(edges) - 1)]


def stage_module(model: nn.Sequential | Sequence[nn.Module], split: Sequence[int],
                 stage: int) -> nn.Sequential:
    """Stage `stage`'s layers as a new nn.Sequential (shares the layer objects)."""
    layers = _layers(model)
    split = check_split(split, len(layers), len(split) + 1)
    a, b = stage_bounds(split, len(layers))[stage]
    return nn.Sequential(*layers[a:b])


def layer_costs(model: nn.Sequential | Sequence[nn.Module], how: str,
                sample: torch.Tensor | None = None, repeats: int = 3) -> list[float]:
    """Per-layer cost: 'layers' (1 each), 'params' (parameter count, min 1) or 'time'
    (measured forward+backward seconds on `sample`, see profile_layers)."""
    layers = _layers(model)
    if how == "layers":
        return [1.0] * len(layers)
    if how == "params":
        return [float(max(1, sum(p.numel() for p in m.parameters()))) for m in layers]
    if how == "time":
        if sample is None:
            raise ValueError("balance='time' needs a sample batch to profile")
        # on a copy: profiling in train mode would move BatchNorm statistics on this rank only
        return profile_layers(copy.deepcopy(layers), sample, repeats)
    raise ValueError(f"balance must be one of time|params|layers, got {how!r}")


def profile_layers(layers: Sequence[nn.Module], sample: torch.Tensor,
                   repeats: int = 3) -> list[float]:
    """Median forward+backward seconds of every layer on `sample` (layer by layer, each on
    the previous layer's output). Timing is not reproducible: profile on one rank and
    broadcast, so every rank agrees on the split."""
    costs = []
    x = sample
    for m in layers:
        times = []
        for _ in range(repeats):
            xi = x.detach().requires_grad_(x.is_floating_point())
            t0 = time.perf_counter()
            y = m(xi)
            y.float().sum().backward()
            times.append(time.perf_counter() - t0)
        for p in m.parameters():
            p.grad = None
        costs.append(sorted(times)[len(times) // 2])
        with torch.no_grad():
            x = m(x.detach())
    return costs


@torch.no_grad()
def boundary_shapes(model: nn.Sequential | Sequence[nn.Module], in_shape: Sequence[int],
                    dtype: torch.dtype) -> list[tuple[int, ...]]:
    """Per-sample output shape after every layer (eval mode, so no running stat changes)."""
    layers = _layers(model)
    modes = [m.training for m in layers]
    x = torch.zeros((2, *in_shape), dtype=dtype)
    shapes = []
    try:
        for m in layers:
            m.eval()
            x = m(x)
            shapes.append(tuple(x.shape[1:]))
    finally:
        for m, mode in zip(layers, modes):
            m.train(mode)
    return shapes
