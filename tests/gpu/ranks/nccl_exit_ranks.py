"""2 ranks: communicators left open at exit are closed by dpsgs's atexit hook (before the
CUDA runtime unloads), and an explicit abort of a non-blocking communicator prints no
failure (ncclCommAbort may answer ncclInProgress: the abort goes on in NCCL's thread).

    mpirun -n 2 python -m mpi4py tests/gpu/ranks/nccl_exit_ranks.py
"""

from __future__ import annotations

from gpu_arrays import pick
from mpi4py import MPI

from dpsgs.comm import nccl

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
arr = pick()
world = nccl.init(comm, timeout=60.0)
stage = world.split(0, rank)
spare = world.split(0, rank)            # aborted below, after its traffic
ch = nccl.TensorChannel(world, 1 - rank, 3, rank == 0, "exit")
reducer, spare_reducer = nccl.TensorReducer(stage), nccl.TensorReducer(spare)
for c in (world, stage, spare):
    c.connect()
x = arr.pattern((4096,), "float32", salt=2 * rank)
reducer.allreduce(x).wait()
spare_reducer.allreduce(arr.pattern((16,), "float32", salt=rank)).wait()
if rank == 0:
    ch.send((arr.pattern((1000,), "int32", salt=5), arr.pattern((3, 4), "bfloat16", salt=6))).wait()
    ok = True
else:
    a, b = ch.recv_into((arr.empty((1000,), "int32"), arr.empty((3, 4), "bfloat16")))
    ok = arr.equal(a, arr.pattern((1000,), "int32", salt=5)) and arr.equal(b, arr.pattern((3, 4), "bfloat16", salt=6))
ok = ok and arr.equal(x, arr.pattern((4096,), "float32", salt=1))
ok = comm.allreduce(ok, op=MPI.LAND)
spare.abort("the test aborts it")
print(f"rank {rank}: left world, stage and a channel open for the exit hook; {'OK' if ok else 'FAIL'}",
      flush=True)
