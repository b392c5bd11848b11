"""Where to cut: the one balancer (contiguous stages minimising the largest stage's cost) and
the costs it balances, over the cut points of a traced model (dpsgs.pipeline.graph).

The balancer works on any sequence of costs (the planner gives it per-block profiles). For
a model, the units are the stretches of operations between consecutive possible cuts
(ModelGraph.candidates: before a module, where only batched tensors cross), and a unit's
cost is the sum of its operations' costs:

- 'flops' (the default; deterministic: the same model and input shape always give the same
  split): 3 x the forward FLOPs of matrix products and convolutions (forward + backward)
  plus a cost per element each operation writes (MATMUL_ELEMENT_COST for those,
  NORM_COST for normalisations, ELEMENT_COST for the rest: activations, additions,
  pooling), all per sample, from the shape propagation.
- 'time': forward+backward seconds of each unit measured here on a batch (not
  reproducible: the job profiles on rank 0 and records the split it chose).
- 'params': parameter count of each layer (at least 1 per layer called).
- 'layers': 1 per layer called (torch.nn module).

Every rank builds the full model deterministically from the seed and keeps only its own
stage (dpsgs.pipeline.split): at the sizes this project trains that costs a moment and
some transient memory, and it guarantees every rank starts from the same weights.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
from torch import nn

from dpsgs.pipeline.graph import ModelGraph, SplitError
from dpsgs.pipeline.split import stage_module

__all__ = ["BALANCE_MODES", "ELEMENT_COST", "MATMUL_ELEMENT_COST", "NORM_COST", "balance", "balance_graph", "check_split",
           "node_costs", "profile_units", "stage_bounds", "unit_costs"]

BALANCE_MODES = ("flops", "time", "params", "layers")

# FLOPs one written element costs in the 'flops' model, forward and backward together,
# against 3 x the forward FLOPs of convolutions and matrix products: a least-squares fit to
# the CPU time of every stretch between cut points of resnet20, resnet56 and wrn-16-4 (one
# thread, batch 64). A convolution's output costs beside its FLOPs (memory traffic: the
# narrow, high-resolution early layers run far below peak).
ELEMENT_COST = 85.0
NORM_COST = 600.0
MATMUL_ELEMENT_COST = 450.0


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


# ---------------------------------------------------------------------------- a model's costs

def node_costs(graph: ModelGraph, how: str) -> list[float]:
    """Per-sample cost of every operation of `graph` ('flops', 'params' or 'layers')."""
    out = []
    for n in graph.body:
        v = graph.values[n]
        if how == "flops":
            per = (NORM_COST if v.norm else MATMUL_ELEMENT_COST if v.flops else ELEMENT_COST)
            out.append(3.0 * v.flops + per * v.elements)
        elif how == "params":
            own = _params_of(graph, n)
            out.append(float(max(1, own)) if n.op == "call_module" else float(own))
        elif how == "layers":
            out.append(1.0 if n.op == "call_module" else 0.0)
        else:
            raise ValueError(f"balance must be one of {'|'.join(BALANCE_MODES)}, got {how!r}")
    return out


def _params_of(graph: ModelGraph, n: torch.fx.Node) -> int:
    total = 0
    if n.op == "call_module":
        total += sum(p.numel() for p in graph.model.get_submodule(n.target).parameters())
    for a in n.all_input_nodes:
        if a.op == "get_attr":
            t = graph.gm.get_parameter(a.target) if _is_param(graph, a.target) else None
            total += t.numel() if t is not None else 0
    return total


def _is_param(graph: ModelGraph, target: str) -> bool:
    try:
        graph.gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def unit_costs(graph: ModelGraph, costs: Sequence[float], cuts: Sequence[int]) -> list[float]:
    """The summed costs of the stretches of operations between consecutive cuts."""
    edges = [0, *cuts, len(graph.body)]
    return [float(sum(costs[edges[i]:edges[i + 1]])) for i in range(len(edges) - 1)]


def balance_graph(graph: ModelGraph, stages: int, units: Sequence[float],
                  candidates: Sequence[int]) -> list[int]:
    """Cut positions (among `candidates`) minimising the largest stage's summed `units`
    (one cost per stretch between consecutive candidates)."""
    if stages - 1 > len(candidates):
        where = ", ".join(graph.name(p) for p in candidates) or "none"
        raise SplitError(f"cannot split {graph.cls} into {stages} stages: it can be cut only "
                         f"in {len(candidates)} places (before: {where})")
    return [candidates[i - 1] for i in balance(units, stages)]


def profile_units(graph: ModelGraph, model: nn.Module, sample: torch.Tensor,
                  candidates: Sequence[int], repeats: int = 3) -> list[float]:
    """Median forward+backward seconds of every stretch between consecutive `candidates`,
    each on the previous one's outputs, on a copy of `model` in train mode (its running
    statistics move on the copy only). Not reproducible: profile on one rank."""
    model = copy.deepcopy(model).train()
    units = [stage_module(graph, model, candidates, u) for u in range(len(candidates) + 1)]
    costs = []
    xs: tuple[torch.Tensor, ...] = (sample,)
    for u, unit in enumerate(units):
        times = []
        for _ in range(repeats):
            ins = tuple(x.detach().requires_grad_(u > 0 and x.is_floating_point()) for x in xs)
            t0 = time.perf_counter()
            outs = unit(*ins)
            outs = outs if isinstance(outs, tuple) else (outs,)
            roots = [o for o in outs if o.requires_grad]
            if roots:
                torch.autograd.backward(roots, [torch.ones_like(o) for o in roots])
            times.append(time.perf_counter() - t0)
        for p in unit.parameters():
            p.grad = None
        costs.append(sorted(times)[len(times) // 2])
        with torch.no_grad():
            xs = tuple(o.detach() for o in outs)
    return costs
