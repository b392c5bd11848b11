"""2 ranks: the sender drops a channel (and its Works and tensors) with two sends in
flight; the receiver, late on purpose, must still get both messages intact. The buffers
live in the channel's in-flight Works, which outlive it until the sends complete (on the
simulator freed memory is poisoned at once and every send buffer is checked, so a buffer
released early shows).

    mpirun -n 2 python -m mpi4py tests/gpu/ranks/nccl_drop_channel_ranks.py
"""

from __future__ import annotations

import gc
import time

from gpu_arrays import pick
from mpi4py import MPI

from dpsgs.comm import nccl

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
arr = pick()
world = nccl.init(comm, timeout=20.0)
ch = nccl.TensorChannel(world, 1 - rank, 4, rank == 0, "dropped")
world.connect()
ok = True
if rank == 0:
    for i in range(2):
        # two arrays a message; neither the tensors nor the Work kept
        ch.send((arr.pattern((1 << 16,), "float32", salt=i), arr.pattern((1000,), "int64", salt=10 + i)))
    del ch
    gc.collect()
    for i in range(4):       # new tensors: they would reuse a block released too early
        arr.pattern((1 << 16,), "float32", salt=30 + i)
    comm.barrier()
else:
    comm.barrier()           # the sender has dropped the channel by now
    time.sleep(0.5)
    for i in range(2):
        y, z = ch.recv_into((arr.empty((1 << 16,), "float32"), arr.empty((1000,), "int64")))
        if not (arr.equal(y, arr.pattern((1 << 16,), "float32", salt=i))
                and arr.equal(z, arr.pattern((1000,), "int64", salt=10 + i))):
            ok = False
            print(f"rank 1: message {i} differs from what was sent", flush=True)
ok = comm.allreduce(ok, op=MPI.LAND)
world.close()
print(f"rank {rank}: channel dropped with sends in flight: {'OK' if ok else 'FAIL'}", flush=True)
