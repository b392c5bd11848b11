"""P ranks: NcclReducer means hold what NCCL guarantees (mean_check) on every rank, for every
dtype, odd and zero sizes, several buckets in flight before the first wait, inputs produced
on a side stream, over the world and over split groups (stage-like: color = rank % 2).

    mpirun -n P python -m mpi4py tests/gpu/ranks/nccl_allreduce_ranks.py [LARGEST]

LARGEST (default 1 Mi + 5 elements) is the largest size checked (ThreadSanitizer runs use less).
"""

from __future__ import annotations

import sys

from gpu_arrays import pick
from mean_check import all_agree, check_mean
from mpi4py import MPI

from dpsgs.comm import nccl

SIZES = [0, 1, 3, 1023, int(sys.argv[1]) if len(sys.argv) > 1 else (1 << 20) + 5]
DTYPES = ["float32", "float64", "float16", "bfloat16", "int32", "int64"]


def check_group(arr, ncomm, mpi_group, label: str) -> int:
    reducer = nccl.TensorReducer(ncomm)
    j = ncomm.rank
    assert (j, ncomm.size) == (mpi_group.Get_rank(), mpi_group.Get_size()), "groups disagree"
    jobs = []
    with arr.side_stream():
        for dtype in (d for d in DTYPES if d in arr.dtypes):
            for n in SIZES:
                x = arr.pattern((n,), dtype, salt=2 * j)
                jobs.append((dtype, n, x, reducer.allreduce(x)))
    problems = []
    for dtype, n, x, work in jobs:
        work.wait()
        problems += check_mean(arr, x, dtype, n, mpi_group, label)
    for p in problems[:10]:
        print(p, flush=True)
    return len(problems)


def check_alone(arr, ncomm) -> int:
    """A group of one rank: the mean is the buffer itself, but only once its producer stream
    has made it. Regression: wait() returned at once, and a read on another stream raced the
    producer (ThreadSanitizer caught it on the simulator)."""
    reducer, bad = nccl.TensorReducer(ncomm), 0
    for i in range(20):
        with arr.side_stream():
            x = arr.pattern((1 << 16,), "float32", salt=i)
            work = reducer.allreduce(x)
        work.wait()
        if not arr.equal(x, arr.pattern((1 << 16,), "float32", salt=i)):
            bad += 1
            print(f"rank {ncomm.rank}: group of one, buffer {i} read before its producer wrote it", flush=True)
    return bad


def main() -> int:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    arr = pick()
    world = nccl.init(comm)
    stage = world.split(rank % 2, rank)
    alone = world.split(rank, 0)
    world.connect()
    stage.connect()
    alone.connect()
    bad = check_group(arr, world, comm, "world")
    bad += check_group(arr, stage, comm.Split(rank % 2, rank), f"group {rank % 2}")
    bad += check_alone(arr, alone)
    ok = all_agree(comm, bad == 0)
    alone.close()
    stage.close()
    world.close()
    print(f"rank {rank}/{size}: all-reduce means ({arr.name}) {bad} wrong: {'OK' if ok else 'FAIL'}",
          flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
