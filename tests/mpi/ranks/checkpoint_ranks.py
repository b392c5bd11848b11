"""Rank program for tests/mpi/test_checkpoint.py: collective saves on a K x N grid.

usage: checkpoint_ranks.py MODE RUN_DIR K N
  save   save tags step1 and step2, then every rank loads its stage from the latest one and
         checks the values and the error for a different grid; prints "OK" on rank 0.
  crash  save step1, then step2 with DPSGS_FAULT set by the caller (a rank dies mid-save).
"""

from __future__ import annotations

import sys

import torch
from mpi4py import MPI

from dpsgs.job.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint

from dpsgs.comm.grid import Grid


def stage_state(stage: int, step: int) -> dict:
    # closed form: stage k at step s holds w = 100*k + s (float64), plus its step counter
    return {"w": torch.full((5,), 100.0 * stage + step, dtype=torch.float64), "step": step}


def main() -> None:
    mode, run_dir, k, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    grid = Grid(k, n)
    assert comm.Get_size() == k * n, (comm.Get_size(), k, n)
    _, stage = grid.coords(rank)
    for step in (1, 2):
        save_checkpoint(run_dir, f"step{step}", grid, rank, stage_state(stage, step),
                        {"model": "mlp", "step": step}, comm)
    if mode == "crash":
        print(f"rank {rank}: UNREACHABLE, the fault did not fire", flush=True)
        sys.exit(3)
    ok = True
    latest = latest_checkpoint(run_dir)
    ok &= latest is not None and latest.name == "step2"
    got = load_checkpoint(latest, grid, stage, {"model": "mlp"})
    ok &= torch.equal(got["w"], stage_state(stage, 2)["w"]) and got["step"] == 2
    try:
        load_checkpoint(latest, Grid(k + 1, n), stage)
        ok = False
    except CheckpointError as e:
        ok &= f"written by a {k}x{n} grid" in str(e)
    ok = comm.allreduce(bool(ok), op=MPI.LAND)
    if rank == 0:
        print("OK" if ok else "FAIL", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
