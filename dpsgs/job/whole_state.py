"""A checkpoint read as one model: every stage shard merged by module path, and cut again.

A checkpoint holds one shard per stage (dpsgs.job.checkpoint); its model state is keyed by
module path in the whole model, and (since dpsgs 19) each shard names its trainable
parameters in the stage optimizer's order (`param_names`); the manifest lists each shard's
tensors (`tensors`; an older dpsgs's does not). `read_whole` merges the shards (for one stage of a new grid, only
those holding its tensors):
the whole model's state (replica 0's buffers), every replica's BatchNorm statistics, one
optimizer state per parameter name (momentum, Adam moments, step counts) with the
optimizer's hyper-parameters, and the position. `stage_state` cuts that for one stage module
of any grid, as StageExecutor.load_state takes it; nothing is computed, tensors are copied
as they are, so a reassembly of the cut is bit-identical to the saved state.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpsgs.comm.grid import Grid
from dpsgs.job.checkpoint import CheckpointError, load_checkpoint, read_manifest

__all__ = ["WholeState", "read_whole", "shards_holding", "whole_from_shards", "stage_state", "trainable_names",
           "EMPTY_PIPELINE"]

EMPTY_PIPELINE = "empty"     # manifest meta "pipeline": the checkpoint was taken after a flush


@dataclass
class WholeState:
    """One checkpoint as one model (see the module docstring)."""

    stages: int
    replicas: int
    model: dict[str, torch.Tensor]                    # parameters and replica 0's buffers
    replica_buffers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    optimizer: dict[str, dict[str, Any]] = field(default_factory=dict)   # per parameter name
    hyper: dict[str, Any] | None = None               # the optimizer's param_group settings
    param_order: list[str] = field(default_factory=list)   # trainable parameters, stage order
    position: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def buffers_of(self, replica: int) -> dict[str, torch.Tensor] | None:
        """Replica `replica`'s own buffers where it was saved; None: the model's (replica 0's)."""
        return self.replica_buffers.get(replica)


def trainable_names(module: nn.Module) -> list[str]:
    """A stage module's trainable parameters in its optimizer's order (StageCompute.params)."""
    return [n for n, p in module.named_parameters() if p.requires_grad]


def whole_from_shards(shards: list[dict[str, Any]], stages: int, replicas: int,
                      where: str = "checkpoint", model_params: list[str] | None = None,
                      numbers: list[int] | None = None) -> WholeState:
    """Merge the stage states `shards` (stage order; `numbers`: their stages, when only some
    were read) into a WholeState. `model_params` (the whole model's trainable names) stand in
    for a shard that does not name its parameters (an older dpsgs's); without either, such a
    shard's optimizer state is refused."""
    whole = WholeState(stages, replicas, {})
    for k, st in zip(numbers if numbers is not None else range(len(shards)), shards, strict=True):
        model = st["model"]
        clash = sorted(set(model) & set(whole.model))
        if clash:
            raise CheckpointError(f"{where}: stage {k} holds {clash[0]!r}, which an earlier stage "
                                  f"holds too (a parameter shared across stages)")
        whole.model.update(model)
        for r, bufs in (st.get("replica_buffers") or {}).items():
            whole.replica_buffers.setdefault(int(r), {}).update(bufs)
        names = st.get("param_names")
        if names is None and model_params is not None:
            names = [n for n in model_params if n in model]
        whole.param_order += list(names or [])
        opt = st.get("optimizer") or {}
        if not opt:
            continue
        if names is None:
            raise CheckpointError(f"{where}: stage {k}'s shard does not name its parameters "
                                  f"(written by an older dpsgs): its optimizer state cannot be "
                                  f"matched to the model's")
        flat = [i for g in opt["param_groups"] for i in g["params"]]
        if len(flat) != len(names):
            raise CheckpointError(f"{where}: stage {k}'s optimizer has {len(flat)} parameters, "
                                  f"its shard names {len(names)}")
        index = dict(zip(flat, names))
        for i, s in opt["state"].items():
            whole.optimizer[index[int(i)]] = s
        hyper = {key: v for key, v in opt["param_groups"][0].items() if key != "params"}
        if whole.hyper is None:
            whole.hyper = hyper
    last = shards[-1] if shards else {}
    whole.position = {key: int(last.get(key, 0)) for key in ("epoch", "batch", "iterations",
                                                             "global_step")}
    return whole


def shards_holding(manifest: dict[str, Any], need: Collection[str] | None) -> list[int]:
    """The stages whose shards hold any of the model tensors `need`, by the manifest's list
    of each shard's tensors; every stage when `need` is None or a shard lists none (a
    checkpoint of an older dpsgs)."""
    rows = sorted(manifest["shards"], key=lambda row: row["stage"])
    if need is None or any("tensors" not in row for row in rows):
        return [int(row["stage"]) for row in rows]
    want = set(need)
    holding = [int(row["stage"]) for row in rows if want.intersection(row["tensors"])]
    # a stage with no tensors of its own still needs the position, which every shard holds
    return holding or [int(rows[-1]["stage"])]


def read_whole(path: str | os.PathLike, model_params: list[str] | None = None,
               need: Collection[str] | None = None) -> WholeState:
    """Checkpoint folder `path` as one model; each shard read checked against the manifest
    (size, SHA-256) as a resume checks it. CheckpointError naming the file otherwise. With
    `need` (the model tensors of one stage of the new grid), only the shards holding any of
    them are read (shards_holding): a rank of a resharded resume reads one or two shards, not
    all K, and the WholeState holds just those stages' tensors and optimizer state."""
    folder = Path(path)
    m = read_manifest(folder)
    grid = Grid(int(m["stages"]), int(m["replicas"]))
    numbers = shards_holding(m, need)
    shards = [load_checkpoint(folder, grid, k) for k in numbers]
    whole = whole_from_shards(shards, grid.stages, grid.replicas, f"checkpoint {str(folder)!r}",
                              model_params, numbers)
    whole.meta = dict(m["meta"])
    return whole


def stage_state(whole: WholeState, module: nn.Module, replica: int,
                where: str = "checkpoint") -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """(state, buffers) for StageExecutor.load_state of stage module `module` on replica
    `replica` of any grid: its slice of the model and optimizer state, and the replica's
    own BatchNorm statistics — replica r keeps its own where the checkpoint has replica r,
    a new replica takes replica 0's (the model's). CheckpointError naming a missing tensor."""
    keys = list(module.state_dict().keys())
    missing = [k for k in keys if k not in whole.model]
    if missing:
        raise CheckpointError(f"{where} holds no {missing[0]!r} (of {len(missing)} tensors this "
                              f"stage needs): it was saved from another model")
    state: dict[str, Any] = {"model": {k: whole.model[k] for k in keys}, "optimizer": {}}
    names = trainable_names(module)
    if whole.hyper is not None and names:
        # a parameter that never had a gradient has no state, saved or cut
        state["optimizer"] = {
            "state": {i: whole.optimizer[n] for i, n in enumerate(names) if n in whole.optimizer},
            "param_groups": [{**whole.hyper, "params": list(range(len(names)))}]}
    own = whole.buffers_of(replica)
    buffers = None if own is None else {k: v for k, v in own.items() if k in keys}
    return state, buffers
