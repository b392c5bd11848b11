"""Rank program for tests/mpi/test_reshard.py: resume a checkpoint on other grids, save at once.

usage: reshard_ranks.py SRC OUT CONFIG_JSON K1xN1 [K2xN2 ...]
For each grid G in order: the first K*N ranks of the world (a sub-communicator) build the
trainer for G with --resume SRC (no run folder) and --override stages replicas, load the
checkpoint through the trainer's own resume (resharding it), and save it at once, with no
training in between, as OUT/G/checkpoints/...; then the same from that checkpoint back to
the grid in CONFIG_JSON (OUT/G-back). Rank 0 prints "DONE".
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from mpi4py import MPI

from dpsgs.config import TrainConfig
from dpsgs.job.checkpoint import latest_checkpoint
from dpsgs.job.checkpointer import Checkpointer
from dpsgs.job.trainer import Trainer


def hop(base: TrainConfig, src: Path, out: Path, k: int, n: int, world: MPI.Comm) -> None:
    """Ranks < k*n: resume `src` on k x n and save it to `out` unchanged."""
    inside = world.Get_rank() < k * n
    sub = world.Split(0 if inside else MPI.UNDEFINED, world.Get_rank())
    if inside:
        cfg = dataclasses.replace(base, stages=k, replicas=n, resume=str(src), run_dir=None,
                                  split=None, override=["stages", "replicas", "split"],
                                  progress=False)
        t = Trainer(cfg, sub)
        pos = t._resume()
        nb = t.setup.batches_per_epoch
        seg = [(pos.epoch - 1, nb - 1)] if pos.batch == 0 else [(pos.epoch, pos.batch - 1)]
        saver = Checkpointer(dataclasses.replace(cfg, run_dir=str(out)), t.grid, t.rank, None,
                             "hop", nb)
        saver.save(t.executor, seg, nb, pos.iterations, pos.global_step, t.setup.split,
                   t.control.bounded(t.pycomm, "hop save"))
        t.close()
        sub.Free()
    world.Barrier()


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    base = TrainConfig.from_dict(json.loads(Path(sys.argv[3]).read_text()))
    world = MPI.COMM_WORLD
    for grid in sys.argv[4:]:
        k, n = (int(v) for v in grid.split("x"))
        hop(base, src, out / grid, k, n, world)
        there = latest_checkpoint(out / grid)
        hop(base, there, out / f"{grid}-back", base.stages, base.replicas, world)
    if world.Get_rank() == 0:
        print("DONE", flush=True)


if __name__ == "__main__":
    main()
