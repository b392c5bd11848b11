"""2 ranks that see one GPU (run with CUDA_VISIBLE_DEVICES=0): nccl.init must fail on both
ranks with SharedGPUError naming both ranks and the GPU, before NCCL initialises.

    CUDA_VISIBLE_DEVICES=0 mpirun -n 2 python -m mpi4py tests/gpu/ranks/nccl_shared_gpu_ranks.py
"""

from __future__ import annotations

from mpi4py import MPI

from dpsgs import nccl

nccl.init(MPI.COMM_WORLD, timeout=60.0)
print(f"rank {MPI.COMM_WORLD.Get_rank()}: nccl.init accepted two ranks on one GPU", flush=True)
