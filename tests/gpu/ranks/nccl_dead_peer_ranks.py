"""2 ranks: rank 1 stops answering after the NCCL set-up; rank 0's wait (a channel recv, or an
all-reduce) ends within the deadline with a CommTimeout naming rank 1 / the operation, and
rank 0 then aborts the whole job (no rank is left waiting).

    mpirun -n 2 python -m mpi4py tests/gpu/ranks/nccl_dead_peer_ranks.py recv|allreduce TIMEOUT [WARN_AFTER]
"""

from __future__ import annotations

import sys
import time

from gpu_arrays import pick
from mpi4py import MPI

from dpsgs import _C
from dpsgs.comm import nccl
from dpsgs.comm.abort import abort_job

OP, TIMEOUT = sys.argv[1], float(sys.argv[2])
WARN_AFTER = float(sys.argv[3]) if len(sys.argv) > 3 else 60.0


def main() -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    arr = pick()
    world = nccl.init(comm, timeout=TIMEOUT, warn_after=WARN_AFTER)
    ch = nccl.TensorChannel(world, 1 - rank, 5, rank == 1, "act s1->s0")
    world.connect()
    if rank == 1:
        print("rank 1: stops answering", flush=True)
        time.sleep(120)
    t0 = time.monotonic()
    try:
        if OP == "recv":
            ch.recv_into((arr.empty((1024,), "float32"),))
        else:
            nccl.TensorReducer(world).allreduce(arr.pattern((1 << 20,), "float32", salt=0)).wait()
    except _C.CommTimeout as e:
        took = time.monotonic() - t0
        print(f"rank 0: CommTimeout after {took:.1f}s: {e}", flush=True)
        abort_job(3)
    print("rank 0: no timeout?!", flush=True)
    abort_job(4)


if __name__ == "__main__":
    main()
