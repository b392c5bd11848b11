"""Rank program: K=1 x N=2 with BatchNorm (per-replica running statistics), embedded train()
into RUN_DIR with a checkpoint every epoch; RESUME=1 continues the folder's run. Rank 0
prints the final test loss exactly (repr) on a line "test_loss <value>".

usage: bn_resume_ranks.py RUN_DIR RESUME   (a kill comes from DPSGS_FAULT, set by the test)
"""

from __future__ import annotations

import sys

import torch
from mpi4py import MPI

from dpsgs.job.trainer import train
from toy import toy_config, toy_data, toy_model

torch.set_num_threads(1)


def main() -> None:
    run_dir, resume = sys.argv[1], sys.argv[2] == "1"
    cfg = toy_config(stages=1, replicas=2, epochs=3, run_dir=run_dir, checkpoint_every=1,
                     resume="auto" if resume else None)
    summary = train(cfg, MPI.COMM_WORLD, model=toy_model(bn=True), data=toy_data())
    if MPI.COMM_WORLD.rank == 0:
        print(f"test_loss {summary['test_loss']!r}", flush=True)


if __name__ == "__main__":
    main()
