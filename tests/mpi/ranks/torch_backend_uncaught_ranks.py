"""Rank program (2 ranks), launched as plain `python -m` (not `python -m mpi4py`, which aborts
on its own): rank 1 stops itself; rank 0's all-reduce raises CommTimeout, uncaught. The job
must end (dpsgs.distributed.uncaught: MPI_Abort) instead of waiting in MPI_Finalize for the
stopped rank at rank 0's exit. argv[1]: the backend (dpsgs, or gloo over mpi://)."""

import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import dpsgs.distributed  # noqa: F401

dist.init_process_group(sys.argv[1], init_method="mpi://", timeout=timedelta(seconds=3))
dist.barrier()
if dist.get_rank() == 1:
    os.kill(os.getpid(), signal.SIGSTOP)
dist.all_reduce(torch.ones(100))
print("NO ERROR", flush=True)
