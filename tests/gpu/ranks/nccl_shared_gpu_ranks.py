"""2 ranks that see one GPU (run with CUDA_VISIBLE_DEVICES=0). Without NCCL_HOSTID (one host)
nccl.init must fail on both ranks with SharedGPUError naming both ranks and the GPU, before
NCCL initialises; with a distinct NCCL_HOSTID per rank (NCCL then takes them for two hosts)
it must accept them, and an all-reduce between them must work.

    CUDA_VISIBLE_DEVICES=0 mpirun -n 2 python -m mpi4py tests/gpu/ranks/nccl_shared_gpu_ranks.py
"""

from __future__ import annotations

from gpu_arrays import pick
from mpi4py import MPI

from dpsgs.comm import nccl

comm = MPI.COMM_WORLD
world = nccl.init(comm, timeout=60.0)
world.connect()
arr = pick()
x = arr.pattern((1000,), "float32", salt=2 * comm.Get_rank())
nccl.TensorReducer(world).allreduce(x).wait()
ok = comm.allreduce(arr.equal(x, arr.pattern((1000,), "float32", salt=1)), op=MPI.LAND)
world.close()
print(f"rank {comm.Get_rank()}: nccl.init accepted two ranks on one GPU; all-reduce "
      f"{'OK' if ok else 'FAIL'}", flush=True)
