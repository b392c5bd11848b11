"""Checkpointer: when and what a training job saves, and where a resumed job starts.

Positions: a checkpoint records the next batch to train, (epoch, batch). An epoch's end is
tagged `epoch{E}`; a stop inside epoch E before batch B gets its own tag (`e{E}b{B}`, or
`preempt-e{E}b{B}` for a signal), so saving it never un-commits the epoch checkpoint. Every
manifest names the run it belongs to (run_id), the global step after it and the split (module
paths). The files themselves (atomic, sharded, checksummed) are dpsgs.job.checkpoint's.

Names: a stage shard's model state is keyed by module path in the whole model (`7.conv2.weight`,
`layer3.1.bn1.running_mean`), whatever the stage; the manifest says so (`param_names`). A
checkpoint of an older dpsgs (no `param_names`) keyed each stage's state by its position in a
stage-local nn.Sequential and recorded integer split points: it resumes an nn.Sequential
(the keys are renamed to module paths, the split to the same cut) and is refused, in one line,
for any other model (that version split such a model wrongly, by its children).

Another grid: a checkpoint of another K x N or split is resharded (dpsgs.job.reshard's rules,
dpsgs.job.whole_state's reading): every shard read as one model, this stage's slice cut out.
Each shard names its trainable parameters in its optimizer's order (`param_names`), and the
manifest records the per-replica batch and that the pipeline was empty (every save follows a
flush), which resharding needs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpsgs.comm.grid import Grid
from dpsgs.config import TrainConfig
from dpsgs.job.checkpoint import CheckpointError, load_checkpoint, read_manifest, save_checkpoint
from dpsgs.job.reshard import check_reshard, data_position, saved_batch
from dpsgs.job.whole_state import EMPTY_PIPELINE, read_whole, stage_state, trainable_names
from dpsgs.pipeline.executor import StageExecutor

__all__ = ["Checkpointer", "Position", "next_position", "skip_done", "checkpoint_plan",
           "legacy_split", "PARAM_NAMES"]

Segment = list[tuple[int, int]]

PARAM_NAMES = "module paths"     # the manifest's param_names: how the shards' keys are named


def next_position(seg: Segment, batches_per_epoch: int) -> tuple[int, int]:
    """(epoch, batch) of the first batch after segment `seg`: where a resume starts."""
    epoch, batch = seg[-1][0], seg[-1][1] + 1
    return (epoch + 1, 0) if batch == batches_per_epoch else (epoch, batch)


def skip_done(segs: list[Segment], start_batch: int) -> list[Segment]:
    """Drop the first `start_batch` batches of the first segment (a mid-epoch resume)."""
    if start_batch <= 0 or not segs:
        return segs
    first = segs[0][start_batch:]
    return ([first] if first else []) + segs[1:]


def checkpoint_plan(path: Path, grid: Grid, config: TrainConfig | None = None,
                    batches_per_epoch: int = 0) -> dict[str, Any]:
    """What a resume from checkpoint `path` needs to know before the job is built (rank 0
    reads it once): its split (module paths; None when the resume reshards onto a new K or
    split: the job chooses its own), whether an older dpsgs wrote it (`legacy`: the caller
    refuses it for a model that is not an nn.Sequential), whether it is resharded
    (`reshard`, dpsgs.job.reshard's rules, each refusal a CheckpointError) and the global
    step after it."""
    m = read_manifest(path)
    reshard = check_reshard(path, grid, config or TrainConfig(stages=grid.stages,
                                                              replicas=grid.replicas),
                            batches_per_epoch)
    split, legacy = m["meta"].get("split"), not m["meta"].get("param_names")
    split = legacy_split(split, path) if legacy else split
    new_split = reshard and (int(m["stages"]) != grid.stages or "split" in (config.override or ()))
    return {"split": None if new_split else split, "saved_split": split, "legacy": legacy,
            "reshard": reshard, "saved_grid": (int(m["stages"]), int(m["replicas"])),
            "global_step": m["meta"].get("global_step")}


def legacy_split(split: list[int] | None, path: Path) -> list[str]:
    """An older checkpoint's integer split points as module paths: child i of an
    nn.Sequential is module 'i' (the caller checks the model is one)."""
    if split is None or not all(isinstance(s, int) for s in split):
        raise CheckpointError(f"checkpoint {str(path)!r}: its split {split!r} is neither module "
                              f"paths nor an older dpsgs's layer indices")
    return [str(s) for s in split]


def _rename_legacy(state: dict[str, Any], first: int) -> dict[str, Any]:
    """Keys 'i.rest' of an older checkpoint's stage whose first block is the model's block
    `first` -> the model's 'first+i.rest'."""
    def name(key: str) -> str:
        head, dot, rest = key.partition(".")
        return f"{int(head) + first}{dot}{rest}" if head.isdigit() else key

    out = dict(state)
    out["model"] = {name(k): v for k, v in state["model"].items()}
    if "replica_buffers" in state:
        out["replica_buffers"] = {r: {name(k): v for k, v in b.items()}
                                  for r, b in state["replica_buffers"].items()}
    return out


@dataclass
class Position:
    """Where a (resumed) run starts."""

    epoch: int = 0
    batch: int = 0            # > 0 after a checkpoint taken mid-epoch
    iterations: int = 0       # batches trained before this process
    global_step: int = 0      # step numbering continues across a resume


class Checkpointer:
    """One rank's side of the job's checkpoints (every call is collective over the grid)."""

    def __init__(self, config: TrainConfig, grid: Grid, rank: int, resume_from: str | None,
                 run_id: str | None, batches_per_epoch: int = 0) -> None:
        self.config, self.grid, self.rank = config, grid, rank
        self.batches_per_epoch = batches_per_epoch
        self.resume_from = Path(resume_from) if resume_from else None
        self.run_id = run_id

    def resume(self, executor: StageExecutor, split: list[str]) -> Position:
        """Load this stage's state from the resume checkpoint; the position it records."""
        path = self.resume_from
        if path is None:
            return Position()
        replica, stage = self.grid.coords(self.rank)
        m = read_manifest(path)
        meta = m["meta"]
        same_grid = (int(m["stages"]), int(m["replicas"])) == (self.grid.stages, self.grid.replicas)
        if not same_grid or (meta.get("param_names") and meta.get("split") != split):
            pos = self._reshard(path, m, executor)
        else:
            if meta.get("param_names"):
                state = load_checkpoint(path, self.grid, stage, {"model": self.config.model,
                                                                 "split": split})
            else:              # an older dpsgs's: split checked as module paths, keys renamed
                old = legacy_split(meta.get("split"), path)
                if old != split:
                    raise CheckpointError(f"checkpoint {str(path)!r} was saved with split {old}, "
                                          f"this run has {split}")
                state = load_checkpoint(path, self.grid, stage, {"model": self.config.model})
                state = _rename_legacy(state, ([0] + [int(s) for s in old])[stage])
            executor.load_state(state, state.get("replica_buffers", {}).get(replica))
            pos = Position(int(state["epoch"]), int(state.get("batch", 0)),
                           int(state.get("iterations", 0)), int(state.get("global_step", 0)))
        if self.rank == 0:
            print(f"dpsgs: resumed from {path} at epoch {pos.epoch}", file=sys.stderr)
        return pos

    def _reshard(self, path: Path, m: dict[str, Any], executor: StageExecutor) -> Position:
        """Load this rank's part of a checkpoint of another grid or split (dpsgs.job.reshard):
        the shards holding this stage's tensors read as one model, this stage's slice cut out."""
        where = f"checkpoint {str(path)!r}"
        if m["meta"].get("model") != self.config.model:
            raise CheckpointError(f"{where} was saved with model={m['meta'].get('model')!r}, "
                                  f"this run has model={self.config.model!r}")
        check_reshard(path, self.grid, self.config, self.batches_per_epoch)
        whole = read_whole(path, need=executor.compute.module.state_dict().keys())
        replica = self.grid.coords(self.rank)[0]
        state, buffers = stage_state(whole, executor.compute.module, replica, where)
        executor.load_state(state, buffers)
        p = whole.position
        batch = data_position(m["meta"], int(m["replicas"]), saved_batch(m, self.config.run_dir),
                              self.config, self.batches_per_epoch, where)
        epoch = p["epoch"] + 1 if batch >= self.batches_per_epoch else p["epoch"]
        batch = 0 if batch >= self.batches_per_epoch else batch
        return Position(epoch, batch, p["iterations"], p["global_step"])

    def save(self, executor: StageExecutor, seg: Segment, batches_per_epoch: int, done: int,
             global_step: int, split: list[str], comm: Any, stopped_by: str | None = None) -> Path:
        """Collective: checkpoint the position after (flushed) segment `seg`; `done` counts
        the batches trained since the run began; `stopped_by` names the signal of a
        preemption. Keeps the newest config.keep_checkpoints (0: all). The folder written."""
        cfg = self.config
        epoch, batch = next_position(seg, batches_per_epoch)
        meta = {"model": cfg.model, "epoch": epoch, "batch": batch, "step": done,
                "global_step": global_step, "run_id": self.run_id,
                "schedule": cfg.schedule, "dtype": cfg.dtype, "split": split,
                "param_names": PARAM_NAMES, "batch_size": cfg.batch_size,
                # every save follows a flush (an epoch's end, a preemption's drain): nothing
                # is in flight, so the checkpoint may be resumed on another grid
                "pipeline": EMPTY_PIPELINE}
        if stopped_by:
            meta["preempted"] = True
            tag = f"preempt-e{epoch}b{batch}"
        else:
            tag = f"epoch{epoch}" if batch == 0 else f"e{epoch}b{batch}"
        state = {**executor.state(), "param_names": trainable_names(executor.compute.module),
                 "epoch": epoch, "batch": batch, "iterations": done,
                 "global_step": global_step}
        if self.grid.replicas > 1:
            # replica 0 writes the stage's shard; BatchNorm statistics differ per replica,
            # so every replica's travel with it and each resumes with its own
            mine = executor.buffers()
            everyone = comm.allgather((self.grid.coords(self.rank), mine if mine else None))
            stage = self.grid.coords(self.rank)[1]
            theirs = {r: b for (r, k), b in everyone if k == stage and b}
            if theirs:
                state["replica_buffers"] = theirs
        folder = save_checkpoint(cfg.run_dir, tag, self.grid, self.rank, state, meta, comm,
                                 keep=cfg.keep_checkpoints or None)
        if stopped_by and self.rank == 0:
            print(f"dpsgs: stopped by {stopped_by} at epoch {epoch}, batch {batch}: checkpoint "
                  f"{folder} written; resume with --resume auto", file=sys.stderr, flush=True)
        return folder
