"""Rank program (2+ ranks): every rank prints the same number of numbered lines at once, as
fast as it can, the way ranks report together; the test checks that mpirun's output holds
every line whole (tests/mpi/ranks/sitecustomize.py: stdout writes whole lines)."""

import sys

from mpi4py import MPI

comm = MPI.COMM_WORLD
lines = int(sys.argv[1])
comm.Barrier()
for i in range(lines):
    print(f"rank {comm.Get_rank()} line {i} of {lines}")
    print(f"rank {comm.Get_rank()} error {i} of {lines}", file=sys.stderr)
