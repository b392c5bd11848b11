"""2 ranks: a receiver expecting another shape of the second array of a two-array message
gets a HeaderMismatch (the ValueError every transport raises for it) naming both ranks by
the labels the trainer sets, the tensor index, the expected and the received shape, before
any device memory is written.

    mpirun -n 2 python -m mpi4py tests/gpu/ranks/nccl_mismatch_ranks.py
"""

from __future__ import annotations

import os
import sys

from gpu_arrays import pick
from mpi4py import MPI

from dpsgs.comm import nccl
from dpsgs.comm.errors import HeaderMismatch


def main() -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    arr = pick()
    ncomm = nccl.init(comm, timeout=60.0)
    ncomm.set_labels(["rank 0 (replica 0, stage 0)", "rank 1 (replica 0, stage 1)"])
    ch = nccl.TensorChannel(ncomm, 1 - rank, 7, rank == 0, "act s0->s1")
    ncomm.connect()
    ok = True
    if rank == 0:
        ch.send((arr.pattern((2,), "int32", salt=1), arr.pattern((4, 8), "float32", salt=0)))
    else:
        try:
            ch.recv_into((arr.empty((2,), "int32"), arr.empty((4, 9), "float32")))
            ok = False
            print("rank 1: no error for a mismatched shape", flush=True)
        except HeaderMismatch as e:
            text = str(e)
            print(f"rank 1: got HeaderMismatch: {text}", flush=True)
            ok = all(s in text for s in ("rank 0 (replica 0, stage 0)", "rank 1 (replica 0, stage 1)",
                                         "tensor 1 of 2: expected dtype float32 shape (4, 9) but "
                                         "received dtype float32 shape (4, 8)"))
    ok = comm.allreduce(ok, op=MPI.LAND)
    print(f"rank {rank}: {'OK' if ok else 'FAIL'}", flush=True)
    # The unmatched ncclSend can never finish: leave without finalizing NCCL.
    sys.stdout.flush()
    os._exit(0 if ok else 1)


if __name__ == "__main__":
    main()
