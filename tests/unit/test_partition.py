"""Partitioning into K stages: split points, the balancer, the costs it balances over a
traced model (dpsgs.pipeline.partition)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

from dpsgs.pipeline.graph import ModelGraph, SplitError
from dpsgs.pipeline.partition import (balance, balance_graph, check_split, node_costs,
                                      profile_units, stage_bounds, unit_costs)
from dpsgs.pipeline.split import resolve_split, stage_module


def _model():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6),
                         nn.Tanh(), nn.Linear(6, 3))


def test_check_split_errors():
    assert check_split([2, 4], 6, 3) == [2, 4]
    with pytest.raises(ValueError, match="cannot split 6 layers into 7 stages"):
        check_split([1, 2, 3, 4, 5, 6], 6, 7)
    with pytest.raises(ValueError, match="3 stages need 2 split points"):
        check_split([2], 6, 3)
    with pytest.raises(ValueError, match=r"point 1 = 2 must be in \(4, 6\)"):
        check_split([4, 2], 6, 3)          # unsorted
    with pytest.raises(ValueError, match=r"point 0 = 0 must be in \(0, 6\)"):
        check_split([0], 6, 2)             # empty first stage
    with pytest.raises(ValueError, match=r"point 0 = 6 must be in \(0, 6\)"):
        check_split([6], 6, 2)             # out of range


def _brute(costs, K):
    L = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, L), K - 1):
        edges = [0, *cuts, L]
        worst = max(sum(costs[edges[i]:edges[i + 1]]) for i in range(K))
        if best is None or worst < best:
            best = worst
    return best


def test_balance_exact():
    assert balance([1, 1, 1, 1], 2) == [2]
    assert balance([5, 1, 1, 1, 1, 1], 2) == [1]
    assert balance([1, 1, 1, 1, 1, 1], 3) == [2, 4]
    assert balance([3, 1, 1, 1], 1) == []
    assert balance([1, 2, 3], 3) == [1, 2]
    with pytest.raises(ValueError, match="cannot split 2 layers into 3 stages"):
        balance([1, 1], 3)
    with pytest.raises(ValueError, match=">= 0"):
        balance([1, -1], 2)


def test_balance_optimal_random():
    rng = random.Random(0)
    for _ in range(200):
        L = rng.randint(1, 9)
        K = rng.randint(1, L)
        costs = [rng.randint(0, 20) for _ in range(L)]
        split = balance(costs, K)
        check_split(split, L, K)
        edges = [0, *split, L]
        worst = max(sum(costs[edges[i]:edges[i + 1]]) for i in range(K))
        assert worst == _brute(costs, K), (costs, K, split)


def test_stage_module_and_bounds():
    m = _model()
    g = ModelGraph.trace(m, torch.randn(3, 3, 4))
    assert stage_bounds([2, 4], 6) == [(0, 2), (2, 4), (4, 6)]
    positions = resolve_split(g, [2, 4], 3)            # layer indices of an nn.Sequential
    assert positions == resolve_split(g, ["2", "4"], 3) == [2, 4]
    parts = [stage_module(g, m, positions, k) for k in range(3)]
    assert [len(list(p.children())) for p in parts] == [2, 2, 2]
    assert parts[1].get_submodule("2") is m[2]         # shares the layers, no copy
    assert [list(p.state_dict()) for p in parts] == [["1.weight", "1.bias"],
                                                      ["3.weight", "3.bias"],
                                                      ["5.weight", "5.bias"]]
    x = torch.randn(5, 3, 4)
    h = x
    for p in parts:
        h = p(h)
    torch.testing.assert_close(h, m(x), rtol=0, atol=0)


def test_costs():
    m = _model()
    g = ModelGraph.trace(m, torch.randn(3, 3, 4))
    assert node_costs(g, "layers") == [1.0] * 6
    assert node_costs(g, "params") == [1.0, 104.0, 1.0, 54.0, 1.0, 21.0]
    # 3 x forward FLOPs (2 per multiply-add) + a cost per element written
    from dpsgs.pipeline.partition import ELEMENT_COST as E, MATMUL_ELEMENT_COST as M

    assert node_costs(g, "flops") == [E * 12, M * 8 + 3 * 2 * 12 * 8, E * 8,
                                      M * 6 + 3 * 2 * 8 * 6, E * 6, M * 3 + 3 * 2 * 6 * 3]
    cands = g.candidates()
    assert cands == [1, 2, 3, 4, 5]
    t = profile_units(g, m, torch.randn(4, 3, 4), cands, repeats=2)
    assert len(t) == 6 and all(v > 0 for v in t)
    assert unit_costs(g, node_costs(g, "params"), [2, 4]) == [105.0, 55.0, 22.0]
    assert balance_graph(g, 3, unit_costs(g, node_costs(g, "params"), cands), cands) == [1, 2]
    with pytest.raises(ValueError, match="balance must be one of"):
        node_costs(g, "seconds")
    with pytest.raises(SplitError, match="can be cut only in 5 places"):
        balance_graph(g, 7, [1.0] * 6, cands)
