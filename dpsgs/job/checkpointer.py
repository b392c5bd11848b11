"""Checkpointer: when and what a training job saves, and where a resumed job starts.

Positions: a checkpoint records the next batch to train, (epoch, batch). An epoch's end is
tagged `epoch{E}`; a stop inside epoch E before batch B gets its own tag (`e{E}b{B}`, or
`preempt-e{E}b{B}` for a signal), so saving it never un-commits the epoch checkpoint. The
files themselves (atomic, sharded, checksummed) are dpsgs.job.checkpoint's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpsgs.comm.grid import Grid
from dpsgs.config import TrainConfig
from dpsgs.job.checkpoint import load_checkpoint, read_manifest, resolve_resume, save_checkpoint
from dpsgs.pipeline.executor import StageExecutor

__all__ = ["Checkpointer", "Position", "next_position", "skip_done"]

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


@dataclass
class Position:
    """Where a (resumed) run starts."""

    epoch: int = 0
    batch: int = 0            # > 0 after a checkpoint taken mid-epoch
    iterations: int = 0       # batches trained before this process
    global_step: int = 0      # step numbering continues across a resume


class Checkpointer:
    """One rank's side of the job's checkpoints (every call is collective over the grid)."""

    def __init__(self, config: TrainConfig, grid: Grid, rank: int) -> None:
        self.config, self.grid, self.rank = config, grid, rank
        # resolved before the split is chosen: a resumed run keeps the checkpoint's
        self.resume_from: Path | None = resolve_resume(config.resume, config.run_dir)

    def stored_split(self) -> list[int] | None:
        """The split of the checkpoint to resume from, when it has this run's K and no
        --split was given (its shards hold those stages; a fresh time profile may split
        elsewhere). A checkpoint of another K has no usable split: resume() names both grids."""
        if self.resume_from is None or self.config.split:
            return None
        manifest = read_manifest(self.resume_from)
        return manifest["meta"].get("split") if manifest["stages"] == self.config.stages else None

    def resume(self, executor: StageExecutor, split: list[int]) -> Position:
        """Load this stage's state from the resume checkpoint; the position it records."""
        path = self.resume_from
        if path is None:
            return Position()
        stage = self.grid.coords(self.rank)[1]
        state = load_checkpoint(path, self.grid, stage, {"model": self.config.model, "split": split})
        executor.load_state(state)
        pos = Position(int(state["epoch"]), int(state.get("batch", 0)), int(state.get("iterations", 0)),
                       int(state.get("global_step", 0)))
        if self.rank == 0:
            print(f"dpsgs: resumed from {path} at epoch {pos.epoch}", file=sys.stderr)
        return pos

    def save(self, executor: StageExecutor, seg: Segment, batches_per_epoch: int, done: int,
             global_step: int, split: list[int], comm: Any, stopped_by: str | None = None) -> Path:
        """Collective: checkpoint the position after (flushed) segment `seg`; `done` counts
        the batches trained since the run began; `stopped_by` names the signal of a
        preemption. The folder written."""
        cfg = self.config
        epoch, batch = next_position(seg, batches_per_epoch)
        meta = {"model": cfg.model, "epoch": epoch, "batch": batch, "step": done,
                "schedule": cfg.schedule, "dtype": cfg.dtype, "split": split}
        if stopped_by:
            meta["preempted"] = True
            tag = f"preempt-e{epoch}b{batch}"
        else:
            tag = f"epoch{epoch}" if batch == 0 else f"e{epoch}b{batch}"
        state = {**executor.state(), "epoch": epoch, "batch": batch, "iterations": done,
                 "global_step": global_step}
        folder = save_checkpoint(cfg.run_dir, tag, self.grid, self.rank, state, meta, comm)
        if stopped_by and self.rank == 0:
            print(f"dpsgs: stopped by {stopped_by} at epoch {epoch}, batch {batch}: checkpoint "
                  f"{folder} written; resume with --resume auto", file=sys.stderr, flush=True)
        return folder
