"""P ranks: ncclCommSplit groups of every K x N grid with K * N = P (the stage groups
{r*K + k} and the pipeline groups {r*K .. r*K + K-1} of DESIGN §2), one after another on
one world communicator, plus a split where half the ranks take no colour (None). Every
group all-reduces several buckets at once and checks what NCCL guarantees (mean_check).
Regression: the first all-reduce on a split group segfaulted with 4 ranks (two threads
completing the communicator's NCCL group job at once).

    mpirun -n P python -m mpi4py tests/gpu/ranks/nccl_split_ranks.py
"""

from __future__ import annotations

import sys

from gpu_arrays import pick
from mean_check import all_agree, check_mean
from mpi4py import MPI

from dpsgs.comm import nccl

CASES = [("float32", 1 << 16), ("float32", 3), ("float64", 1000), ("int32", 4097)]


def reduce_and_check(arr, ncomm, mpi_group, label: str) -> list[str]:
    reducer = nccl.TensorReducer(ncomm)
    j = ncomm.rank
    jobs = [(d, n, x, reducer.allreduce(x)) for d, n in CASES
            for x in [arr.pattern((n,), d, salt=2 * j)]]
    problems = []
    for d, n, x, work in jobs:
        work.wait()
        problems += check_mean(arr, x, d, n, mpi_group, label)
    return problems


def main() -> int:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    arr = pick()
    world = nccl.init(comm)
    layouts = [k for k in range(1, size + 1) if size % k == 0]
    groups = []
    for K in layouts:
        stage, pipe = nccl.split_grid(world, K)
        r, k = divmod(rank, K)
        groups.append((stage, comm.Split(k, r), f"K={K} stage {k}"))
        groups.append((pipe, comm.Split(r, k), f"K={K} pipeline {r}"))
    half = world.split(0 if rank % 2 == 0 else -1, rank)
    if (half is None) != (rank % 2 == 1):
        print(f"rank {rank}: split with colour {-1 if rank % 2 else 0} returned {half!r}", flush=True)
        return 1
    mpi_half = comm.Split(0 if rank % 2 == 0 else MPI.UNDEFINED, rank)
    if half is not None:
        groups.append((half, mpi_half, "even ranks"))
    for c in [world] + [g for g, _, _ in groups]:
        c.connect()
    problems = reduce_and_check(arr, world, comm, "world")
    for ncomm, mpi_group, label in groups:
        problems += reduce_and_check(arr, ncomm, mpi_group, label)
    for p in problems[:10]:
        print(p, flush=True)
    ok = all_agree(comm, not problems)
    for ncomm, _, _ in reversed(groups):
        ncomm.close()
    world.close()
    print(f"rank {rank}/{size}: split layouts K in {layouts} ({len(groups)} groups), "
          f"{len(problems)} wrong: {'OK' if ok else 'FAIL'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
