"""Contiguous partition of per-layer costs into K stages that minimises the largest stage cost."""

from __future__ import annotations

from itertools import accumulate

__all__ = ["balanced_split", "stage_ranges"]


def balanced_split(costs: list[float], stages: int) -> list[int]:
    """Split points (K-1 layer indices, increasing) for a contiguous partition of `costs` into
    `stages` non-empty parts with the smallest possible maximum part (exact O(K L^2) dynamic
    programme; L is at most a few hundred blocks). Ties go to the earliest split."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} layers into {stages} non-empty stages")
    pre = [0.0, *accumulate(costs)]
    inf = float("inf")
    # best[k][i]: smallest max-part for the first i layers in k parts; cut[k][i]: last cut.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], pre[i] - pre[j])
                if v < best[k][i] - 1e-15:
                    best[k][i], cut[k][i] = v, j
    splits, i = [], n
    for k in range(stages, 1, -1):
        i = cut[k][i]
        splits.append(i)
    return splits[::-1]


def stage_ranges(num_layers: int, splits: list[int]) -> list[tuple[int, int]]:
    """[start, end) layer range of every stage for the given split points."""
    edges = [0, *splits, num_layers]
    return list(zip(edges, edges[1:]))
