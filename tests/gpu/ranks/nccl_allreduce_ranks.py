"""P ranks: NcclReducer averages equal the closed-form mean on every rank, for every dtype,
odd and zero sizes, several buckets in flight before the first wait, inputs produced on a
side stream, over the world and over split groups (stage-like: color = rank % 2).

    mpirun -n P python -m mpi4py tests/gpu/ranks/nccl_allreduce_ranks.py
"""

from __future__ import annotations

import sys

from gpu_arrays import pick
from mpi4py import MPI

from dpsgs import nccl

SIZES = [0, 1, 3, 1023, (1 << 20) + 5]
DTYPES = ["float32", "float64", "float16", "bfloat16", "int32", "int64"]


def check_group(arr, ncomm, label: str) -> int:
    """Rank j of m holds pattern + 2j; the mean is pattern + (m - 1), exact in every dtype."""
    reducer = nccl.TensorReducer(ncomm)
    j, m = ncomm.rank, ncomm.size
    jobs = []
    with arr.side_stream():
        for dtype in (d for d in DTYPES if d in arr.dtypes):
            for n in SIZES:
                x = arr.pattern((n,), dtype, salt=2 * j)
                jobs.append((dtype, n, x, reducer.allreduce(x)))
    bad = 0
    for dtype, n, x, work in jobs:
        work.wait()
        if not arr.equal(x, arr.pattern((n,), dtype, salt=m - 1)):
            bad += 1
            print(f"{label} rank {j}/{m}: {dtype}[{n}] mean differs", flush=True)
    return bad


def main() -> int:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    arr = pick()
    world = nccl.init(comm)
    stage = world.split(rank % 2, rank)
    world.connect()
    stage.connect()
    bad = check_group(arr, world, "world") + check_group(arr, stage, f"group {rank % 2}")
    ok = comm.allreduce(bad == 0, op=MPI.LAND)
    print(f"rank {rank}/{size}: all-reduce means ({arr.name}) {bad} wrong: {'OK' if ok else 'FAIL'}",
          flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
