"""dpsgs's C++ core as a torch.distributed backend, and an `mpi://` rendezvous.

    import dpsgs.distributed                          # registers "dpsgs" and mpi://
    dist.init_process_group("dpsgs", init_method="mpi://")
    model = DistributedDataParallel(model)            # DDP, pipelining, your own collectives

    mpirun -n 2 python train.py                       # no MASTER_ADDR/PORT, no RANK, no port opened

The backend runs CPU tensors on the core (csrc/op_engine.*: non-blocking MPI collectives,
the core's ring all-reduce from 4 MiB, tagged send/recv, one thread per group that completes
them) and hands CUDA tensors to NCCL. `mpi://` gives any backend (gloo, nccl) rank and world
size from MPI and a store carried by MPI messages (`MpiStore`). docs/torch-backend.md lists
what is supported on which device.
"""

from __future__ import annotations

import torch.distributed as dist

from dpsgs.distributed.groups import create_process_group, world_communicator
from dpsgs.distributed.process_group import BACKEND_NAME, SUPPORTED, DpsgsProcessGroup
from dpsgs.distributed.rendezvous import SCHEME, mpi_rendezvous_handler, use_communicator
from dpsgs.distributed.store import MpiStore
from dpsgs.distributed.work import DpsgsWork

__all__ = ["BACKEND_NAME", "SUPPORTED", "DpsgsProcessGroup", "DpsgsWork", "MpiStore", "register",
           "use_communicator", "world_communicator"]


def register() -> None:
    """Register the "dpsgs" backend (CPU; CUDA tensors go to NCCL) and the mpi:// rendezvous.
    Done on import; idempotent."""
    if not hasattr(dist.Backend, BACKEND_NAME.upper()):   # register_backend sets Backend.DPSGS
        dist.Backend.register_backend(BACKEND_NAME, create_process_group, extended_api=True,
                                      devices=["cpu", "cuda"])
    try:
        dist.register_rendezvous_handler(SCHEME, mpi_rendezvous_handler)
    except RuntimeError:   # "already registered": imported before (e.g. reloaded)
        pass


register()
