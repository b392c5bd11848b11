"""RankContext: this rank's place in a training job — the grid, its communicators, its transport.

Every collective here waits behind a deadline: a rank killed during start-up must not leave
the others blocked (MPI's own Dup, bcast and allgather have no timeout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpsgs.comm.accelerator import Accelerator, accelerator_of_device
from dpsgs.comm.grid import Grid
from dpsgs.comm.protocol import Transport
from dpsgs.comm.waits import barrier
from dpsgs.config import TrainConfig

__all__ = ["RankContext", "open_rank", "torch_backend_for", "TRANSPORTS"]

TRANSPORTS = ("core", "mpi4py", "torch")


@dataclass
class RankContext:
    config: TrainConfig
    grid: Grid
    pycomm: Any            # a duplicate of the caller's mpi4py communicator: metadata, votes
    rank: int
    replica: int
    stage: int
    transport: Transport
    accel: Accelerator     # the rank's device seam (dpsgs.comm.accelerator), the transport's

    def close(self) -> None:
        self.transport.close()


def open_rank(config: TrainConfig, comm: Any, transport: str | Transport | None = None,
              device: str = "cpu") -> RankContext:
    """Collective over `comm` (an mpi4py communicator of exactly K*N ranks): the grid, a
    duplicate communicator and the transport. `transport` (default: config.transport):
    "core" (dpsgs._C: over MPI for device "cpu", over NCCL for "cuda" and "sim": the
    simulated CUDA/NCCL of a DPSGS_CUDA=sim build), "mpi4py" (the plain-MPI baseline, CPU),
    "torch" (torch.distributed over config.torch_backend) or a Transport object made by the
    caller. `device` is what --device resolved to (agreed)."""
    transport = config.transport if transport is None else transport
    grid = Grid(config.stages, config.replicas)
    grid.check_world(comm.Get_size())        # the same on every rank: all fail alike
    barrier(comm, config.timeout, "start-up barrier")
    pycomm = comm.Dup()
    rank = pycomm.Get_rank()
    replica, stage = grid.coords(rank)
    if not isinstance(transport, str):
        made = transport
    elif transport == "core" and device in ("cuda", "sim"):
        made = _nccl_transport(config, grid, pycomm, replica, stage)
    elif transport == "core":
        made = _core_transport(config, grid, pycomm, replica, stage)
    elif transport == "mpi4py" and device == "cpu":
        from dpsgs.comm.mpi4py_baseline import Mpi4pyTransport

        made = Mpi4pyTransport(pycomm, pycomm.Split(stage, replica), timeout=config.timeout,
                               bucket_cap_mb=config.bucket_cap_mb, first_bucket_mb=config.first_bucket_mb)
    elif transport == "torch":
        made = _torch_transport(config, grid, pycomm, device)
    else:
        raise ValueError(f"transport must be one of {TRANSPORTS} or a Transport, got {transport!r}"
                         + (" (the mpi4py baseline moves host memory: use --device cpu)"
                            if transport == "mpi4py" else ""))
    # a transport of device memory carries its accelerator (NcclTransport); others name a device
    accel = getattr(made, "accel", None) or accelerator_of_device(made.device)
    return RankContext(config, grid, pycomm, rank, replica, stage, made, accel)


def _core_transport(config: TrainConfig, grid: Grid, pycomm: Any, replica: int,
                    stage: int) -> Transport:
    from dpsgs import _C
    from dpsgs.comm.mpi import MpiTransport

    core = _C.Communicator(pycomm, config.timeout, config.warn_after)
    core.set_labels([grid.label(r) for r in range(grid.size)])
    # the stage group (ordered by replica) averages gradients; channels use the grid's ranks;
    # its messages name job ranks with their (replica, stage), not ranks inside the group
    stage_comm = core.split(stage, replica)
    stage_comm.set_labels([grid.label(grid.rank(q, stage)) for q in range(grid.replicas)])
    return MpiTransport(core, stage_comm, bucket_cap_mb=config.bucket_cap_mb,
                        first_bucket_mb=config.first_bucket_mb, algorithm=config.allreduce)


def _nccl_transport(config: TrainConfig, grid: Grid, pycomm: Any, replica: int, stage: int) -> Transport:
    """The GPU chosen by local rank (the shared-GPU check first), NCCL over the grid and the
    stage group, the GPU made current for torch; messages name ranks as the MPI path's do.
    On a DPSGS_CUDA=sim build the same code runs over the simulator (nccl.init knows which)."""
    from dpsgs.comm import nccl

    world = nccl.init(pycomm, timeout=config.timeout, warn_after=config.warn_after)
    world.set_labels([grid.label(r) for r in range(grid.size)])
    stage_comm = world.split(stage, replica)
    stage_comm.set_labels([grid.label(grid.rank(q, stage)) for q in range(grid.replicas)])
    return nccl.NcclTransport(world, stage_comm, bucket_cap_mb=config.bucket_cap_mb,
                              first_bucket_mb=config.first_bucket_mb)


def torch_backend_for(config: TrainConfig, device: str) -> str:
    """--torch-backend resolved for `device`, or ValueError (one line) for a pair that cannot
    move this device's tensors."""
    backend = config.torch_backend
    if device == "sim":
        raise ValueError("--transport torch runs on cpu or cuda: --device sim simulates dpsgs's own "
                         "NCCL backend (--transport core)")
    if backend == "auto":
        return "nccl" if device == "cuda" else "gloo"
    if backend == "gloo" and device == "cuda":
        raise ValueError("--torch-backend gloo moves host memory: use --device cpu, or "
                         "--torch-backend nccl for cuda")
    if backend == "nccl" and device != "cuda":
        raise ValueError(f"--torch-backend nccl moves GPU memory but the job runs on {device}: "
                         f"use --device cuda, or --torch-backend gloo or dpsgs")
    return backend


def _torch_transport(config: TrainConfig, grid: Grid, pycomm: Any, device: str) -> Transport:
    """torch.distributed's default group: the caller's when it is initialised already (its
    ranks must be the grid's), else initialised here over `mpi://` on `pycomm` (no
    environment variables, no TCP store) and destroyed when the transport closes. On cuda
    the GPU is chosen by local rank (the shared-GPU check first) and made current."""
    import torch
    import torch.distributed as dist

    from dpsgs.comm.torch_dist import TorchTransport, group_timeout

    backend = torch_backend_for(config, device)
    gpu = None
    if device == "cuda":
        from dpsgs.comm.accelerator import accelerator
        from dpsgs.comm.device import select_device

        gpu = torch.device("cuda", select_device(pycomm).device)
        accelerator("cuda", gpu.index).make_current()   # the device seam, as nccl.init does
    owned = not dist.is_initialized()
    if owned:
        import dpsgs.distributed as ddist      # registers "dpsgs" and mpi://

        ddist.use_communicator(pycomm)
        dist.init_process_group(backend, init_method="mpi://", timeout=group_timeout(config.timeout),
                                **({"device_id": gpu} if backend == "nccl" else {}))
    else:
        have, rank, size = str(dist.get_backend()), dist.get_rank(), dist.get_world_size()
        if config.torch_backend != "auto" and have != backend:
            raise ValueError(f"--torch-backend {backend}: torch.distributed is initialised "
                             f"already, with backend {have}")
        if (rank, size) != (pycomm.Get_rank(), pycomm.Get_size()):
            raise ValueError(f"--transport torch: torch.distributed's default group has this "
                             f"process as rank {rank} of {size}, the job's communicator as rank "
                             f"{pycomm.Get_rank()} of {pycomm.Get_size()}: they must agree")
    return TorchTransport(grid, timeout=config.timeout, bucket_cap_mb=config.bucket_cap_mb,
                          first_bucket_mb=config.first_bucket_mb, device=gpu,
                          owns_default_group=owned)
