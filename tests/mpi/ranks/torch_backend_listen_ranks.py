"""Rank program (2 ranks): which TCP sockets does this process listen on after MPI_Init, and
after a process group of backend argv[1] over init_method="mpi://" has rendezvoused and run
collectives? Writes `<inodes>` to $RESULT_DIR/<backend>.rank<r>.txt: the listening sockets the group
added (read from /proc/net/tcp{,6}, state 0A, matched to this process's socket fds). MPI's own
(MPICH opens some at MPI_Init) are there before and are not counted."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from mpi4py import MPI

import dpsgs.distributed  # noqa: F401


def listening_inodes() -> set[str]:
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            for line in open(table).read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":   # TCP_LISTEN
                    listening.add(fields[9])
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.add(target[len("socket:["):-1])
    return listening & mine


backend = sys.argv[1]
before = listening_inodes()
dist.init_process_group(backend, init_method="mpi://")
sub = dist.new_group([0, 1])
t = torch.ones(1000)
dist.all_reduce(t)
dist.all_reduce(t, group=sub)
dist.barrier()
new = sorted(listening_inodes() - before)
with open(os.path.join(os.environ["RESULT_DIR"], f"{backend}.rank{MPI.COMM_WORLD.Get_rank()}.txt"), "w") as f:
    f.write(",".join(new))
dist.destroy_process_group()
