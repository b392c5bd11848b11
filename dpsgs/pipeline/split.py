"""Cut a traced model into stage modules, and resolve split points named by module path.

Stage k of cuts p_1 < ... < p_{K-1} runs the operations [p_k, p_{k+1}) of the ModelGraph.
Its forward takes the tensors crossing its incoming cut (stage 0: the batch) as positional
arguments, in the order they were made, and returns those crossing its outgoing cut (the
last stage: the logits): one tensor alone, else a tuple. It is a torch.fx GraphModule over
the caller's model: it holds the very modules, parameters and buffers of that model under
their paths in it, so a stage's state_dict keys are the whole model's keys (a checkpoint
is keyed by module path) and in the model's own order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch.fx as fx
from torch import nn

from dpsgs.pipeline.graph import ModelGraph, SplitError

__all__ = ["is_random", "resolve_split", "stage_module", "stage_edges"]


def stage_edges(graph: ModelGraph, positions: Sequence[int]) -> list[tuple[int, int]]:
    """[(first, end)] body positions of every stage."""
    edges = [0, *positions, len(graph.body)]
    return [(edges[k], edges[k + 1]) for k in range(len(edges) - 1)]


def resolve_split(graph: ModelGraph, split: Sequence[int | str], stages: int) -> list[int]:
    """The body positions of K-1 split points (module paths, or top-level child indices);
    SplitError naming the point when one is unknown, out of order or impossible."""
    if len(split) != stages - 1:
        raise SplitError(f"split {list(split)}: {stages} stages need {stages - 1} split points")
    positions = []
    for point in split:
        p = graph.position(point)
        label = graph._path(point)
        if p == 0:
            raise SplitError(f"cannot split {graph.cls} before '{label}': it is where the "
                             f"forward starts, so stage {len(positions)} would be empty")
        if positions and p <= positions[-1]:
            prev = graph.name(positions[-1])
            raise SplitError(f"split {list(split)}: '{label}' runs "
                             f"{'where' if p == positions[-1] else 'before'} '{prev}' does; "
                             f"split points must follow the order the forward runs them in")
        graph.check(p, label)
        positions.append(p)
    return positions


def stage_module(graph: ModelGraph, model: nn.Module, positions: Sequence[int],
                 stage: int) -> fx.GraphModule:
    """Stage `stage` of `model` (the traced model or a copy of it with the same structure)
    cut at `positions`; shares `model`'s modules and tensors, copies nothing."""
    first, end = stage_edges(graph, positions)[stage]
    last = end == len(graph.body)
    ins = [graph.input] if first == 0 else graph.live(first)
    outs = [graph.output] if last else graph.live(end)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {v: g.placeholder(v.name) for v in ins}

    def arg(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op != "get_attr":      # a bug in live(): the value should have crossed
                raise SplitError(f"stage {stage} of {graph.cls}: '{n.name}' is not available")
            env[n] = g.get_attr(n.target)   # each stage reads its own parameters
        return env[n]

    for n in graph.body[first:end]:
        env[n] = g.node_copy(n, arg)
    result = [arg(v) for v in outs]
    g.output(result[0] if len(result) == 1 else tuple(result))
    g.lint()
    gm = fx.GraphModule(model, g, class_name=f"{graph.cls}Stage{stage}")
    _mirror(gm, model)
    return gm


def _mirror(stage: nn.Module, orig: nn.Module) -> None:
    """Make the containers fx created mirror `orig`'s: children, parameters and buffers in
    its order (parameters() and state_dict() list them as the whole model does), plain
    tensor attributes kept plain and non-persistent buffers non-persistent."""
    if stage is orig:
        return

    def order(names: Sequence[str]) -> dict[str, int]:
        return {n: i for i, n in enumerate(names)}

    mods = order(list(orig._modules))
    stage._modules = OrderedDict(sorted(stage._modules.items(), key=lambda kv: mods.get(kv[0], len(mods))))
    params = order(list(orig._parameters))
    stage._parameters = OrderedDict(sorted(stage._parameters.items(),
                                           key=lambda kv: params.get(kv[0], len(params))))
    buffers = order(list(orig._buffers))
    for name in [n for n in stage._buffers if n not in buffers]:
        t = stage._buffers.pop(name)       # a plain tensor attribute of orig, not a buffer
        object.__setattr__(stage, name, t)
    stage._buffers = OrderedDict(sorted(stage._buffers.items(), key=lambda kv: buffers[kv[0]]))
    stage._non_persistent_buffers_set = {n for n in stage._buffers
                                         if n in orig._non_persistent_buffers_set}
    for name, child in stage._modules.items():
        _mirror(child, orig._modules[name])


def is_random(module: nn.Module) -> bool:
    """Whether `module` may draw random numbers in train mode (dropout layers, RReLU, a stage
    graph calling torch's random functions or running a user's module whole), so a
    recompute must replay its RNG."""
    if any(isinstance(m, (nn.modules.dropout._DropoutNd, nn.RReLU)) for m in module.modules()):
        return True
    if isinstance(module, fx.GraphModule):
        for n in module.graph.nodes:
            if n.op == "call_module" and not _from_torch(module.get_submodule(n.target)):
                return True           # a module run whole: what it draws is unknown
            if n.op in ("call_function", "call_method"):
                name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
                if any(w in name for w in _RANDOM):
                    return True
    return False


_RANDOM = ("dropout", "rand", "bernoulli", "normal", "multinomial", "rrelu", "exponential",
           "uniform", "cauchy", "geometric", "log_normal", "poisson")


def _from_torch(m: nn.Module) -> bool:
    return type(m).__module__.startswith("torch.")
