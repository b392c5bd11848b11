"""Checkpointer: when and what a training job saves, and where a resumed job starts.

Positions: a checkpoint records the next batch to train, (epoch, batch). An epoch's end is
tagged `epoch{E}`; a stop inside epoch E before batch B gets its own tag (`e{E}b{B}`, or
`preempt-e{E}b{B}` for a signal), so saving it never un-commits the epoch checkpoint. Every
manifest names the run it belongs to (run_id) and the global step after it. The files
themselves (atomic, sharded, checksummed) are dpsgs.job.checkpoint's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpsgs.comm.grid import Grid
from dpsgs.config import TrainConfig
from dpsgs.job.checkpoint import CheckpointError, load_checkpoint, read_manifest, save_checkpoint
from dpsgs.pipeline.executor import StageExecutor

__all__ = ["Checkpointer", "Position", "next_position", "skip_done", "checkpoint_plan"]

Segment = list[tuple[int, int]]


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


def checkpoint_plan(path: Path, grid: Grid) -> dict[str, Any]:
    """What a resume from checkpoint `path` needs to know before the job is built (rank 0
    reads it once): its split and the global step after it. CheckpointError naming both
    grids when it was written by another K x N."""
    m = read_manifest(path)
    here, saved = (grid.stages, grid.replicas), (m["stages"], m["replicas"])
    if saved != here:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by a {saved[0]}x{saved[1]} grid "
            f"(K={saved[0]} stages x N={saved[1]} replicas); this run is {here[0]}x{here[1]} "
            f"(K={here[0]} x N={here[1]}): resume with the same --stages/--replicas")
    return {"split": m["meta"].get("split"), "global_step": m["meta"].get("global_step")}


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
                 run_id: str | None) -> None:
        self.config, self.grid, self.rank = config, grid, rank
        self.resume_from = Path(resume_from) if resume_from else None
        self.run_id = run_id

    def resume(self, executor: StageExecutor, split: list[int]) -> Position:
        """Load this stage's state from the resume checkpoint; the position it records."""
        path = self.resume_from
        if path is None:
            return Position()
        stage = self.grid.coords(self.rank)[1]
        state = load_checkpoint(path, self.grid, stage, {"model": self.config.model, "split": split})
        replica = self.grid.coords(self.rank)[0]
        executor.load_state(state, state.get("replica_buffers", {}).get(replica))
        pos = Position(int(state["epoch"]), int(state.get("batch", 0)), int(state.get("iterations", 0)),
                       int(state.get("global_step", 0)))
        if self.rank == 0:
            print(f"dpsgs: resumed from {path} at epoch {pos.epoch}", file=sys.stderr)
        return pos

    def save(self, executor: StageExecutor, seg: Segment, batches_per_epoch: int, done: int,
             global_step: int, split: list[int], comm: Any, stopped_by: str | None = None) -> Path:
        """Collective: checkpoint the position after (flushed) segment `seg`; `done` counts
        the batches trained since the run began; `stopped_by` names the signal of a
        preemption. Keeps the newest config.keep_checkpoints (0: all). The folder written."""
        cfg = self.config
        epoch, batch = next_position(seg, batches_per_epoch)
        meta = {"model": cfg.model, "epoch": epoch, "batch": batch, "step": done,
                "global_step": global_step, "run_id": self.run_id,
                "schedule": cfg.schedule, "dtype": cfg.dtype, "split": split}
        if stopped_by:
            meta["preempted"] = True
            tag = f"preempt-e{epoch}b{batch}"
        else:
            tag = f"epoch{epoch}" if batch == 0 else f"e{epoch}b{batch}"
        state = {**executor.state(), "epoch": epoch, "batch": batch, "iterations": done,
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
