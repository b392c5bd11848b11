"""What the peer runners share: arguments, model, batches, device, process group, step timer."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["Workload", "add_workload_args", "workload_from_args", "config_args", "make_model",
           "make_batches", "make_optimizer", "StepTimer", "write_result", "mpi_rank_size",
           "init_gloo", "init_group", "init_dpsgs", "gloo_beside_dpsgs", "close_gloo",
           "slowest_per_step", "set_threads", "gpu_index", "cuda_device", "device_sync"]


@dataclass
class Workload:
    model: str
    in_shape: tuple[int, ...]
    num_classes: int
    batch: int                 # global samples per step, the same for every configuration
    steps: int                 # timed steps
    warmup: int                # untimed steps first (allocator, caches, lazy connections)
    seed: int = 0
    pool: int = 4              # distinct synthetic batches cycled through

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--in-shape", default="3,32,32")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch", type=int, required=True, help="global samples per step")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--out", required=True, help="result JSON (written by rank 0)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu, or cuda: one GPU per rank by local rank (NCCL between ranks)")


def workload_from_args(a: argparse.Namespace) -> Workload:
    shape = tuple(int(v) for v in a.in_shape.split(","))
    return Workload(a.model, shape, a.num_classes, a.batch, a.steps, a.warmup, a.seed)


def config_args(description: str, argv: list[str] | None) -> argparse.Namespace:
    """--config, --threads and --out of the time-to-accuracy runners."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="TrainConfig fields as JSON")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    # interop threads can only be set before any parallel work; ignore if too late
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def make_model(w: Workload) -> nn.Sequential:
    """The same weights on every rank and in every runner (seeded before building)."""
    from dpsgs.job.models import build_model

    torch.manual_seed(w.seed)
    return build_model(w.model, w.in_shape, w.num_classes)


def make_batches(w: Workload, batch: int, offset: int = 0,
                 device: torch.device | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`pool` synthetic (x, y) batches of `batch` samples; `offset` picks a replica's slice
    so data-parallel ranks see different samples of the same global batch. Drawn on the CPU
    (the same samples whatever the device), then moved to `device` once, before timing."""
    g = torch.Generator().manual_seed(w.seed + 1)
    out = []
    for _ in range(w.pool):
        x = torch.randn(w.batch, *w.in_shape, generator=g)
        y = torch.randint(0, w.num_classes, (w.batch,), generator=g)
        x, y = x[offset:offset + batch].contiguous(), y[offset:offset + batch].contiguous()
        out.append((x, y) if device is None else (x.to(device), y.to(device)))
    return out


def gpu_index(env: Mapping[str, str], rank: int, visible: int) -> int:
    """This rank's CUDA ordinal: its local rank (the launcher's MPI_LOCALRANKID,
    OMPI_COMM_WORLD_LOCAL_RANK or SLURM_LOCALID; else the global rank, one host) modulo the
    visible GPUs, as dpsgs.comm.device chooses for the trainer."""
    from dpsgs.comm.device import device_for, local_rank_from_env

    found = local_rank_from_env(env)
    return device_for(found[0] if found else rank, visible)


def cuda_device(rank: int) -> torch.device:
    """This rank's GPU (gpu_index), made current; SystemExit with the reason when torch
    cannot use CUDA here. More ranks than GPUs need a NCCL_HOSTID per rank, which the
    launcher sets (dpsgs.bench.launch.SHARE_GPU), not this runner."""
    if not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: torch {torch.__version__} cannot use CUDA here "
                         f"({'no CUDA build' if torch.version.cuda is None else 'no GPU visible'})")
    dev = torch.device("cuda", gpu_index(os.environ, rank, torch.cuda.device_count()))
    torch.cuda.set_device(dev)
    return dev


def device_sync(device: torch.device | None) -> Callable[[], None] | None:
    """What a step timer calls to wait for the GPU's queued work (None on CPU: nothing)."""
    if device is None or device.type != "cuda":
        return None
    return lambda: torch.cuda.synchronize(device)


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    # The trainer's defaults (SGD, momentum 0.9, wd 5e-4); a small lr keeps synthetic runs finite.
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


@dataclass
class StepTimer:
    """Wall seconds of every step (warm-up included; the report drops it). With `sync` (on a
    GPU: torch.cuda.synchronize) the clock starts and stops on an idle device, so a step's
    time is its kernels', not the time to queue them."""
    times: list[float] = field(default_factory=list)
    _t0: float = 0.0
    sync: Callable[[], None] | None = None

    def start(self) -> None:
        if self.sync is not None:
            self.sync()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.sync is not None:
            self.sync()
        dt = time.perf_counter() - self._t0
        self.times.append(dt)
        return dt


def mpi_rank_size() -> tuple[int, int]:
    """Rank and size from the launcher's environment (MPICH/Hydra, Open MPI, Slurm), so a
    runner that talks gloo needs no MPI library."""
    for r, s in (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                 ("SLURM_PROCID", "SLURM_NTASKS"), ("RANK", "WORLD_SIZE")):
        if r in os.environ and s in os.environ:
            return int(os.environ[r]), int(os.environ[s])
    return 0, 1


def init_gloo(rank: int, size: int, port: int) -> None:
    """The gloo process group, rendezvousing at MASTER_ADDR/PORT when the launcher set them,
    else at 127.0.0.1:`port`."""
    init_group("gloo", rank, size, port)


def init_group(backend: str, rank: int, size: int, port: int,
               device: torch.device | None = None) -> None:
    """The process group (gloo, or nccl bound to `device`, this rank's GPU), rendezvousing
    at MASTER_ADDR/PORT when the launcher set them, else at 127.0.0.1:`port`."""
    import torch.distributed as dist
    # Imported before the group exists: its functions bind group.WORLD as a default argument
    # at import, and pipelining and DDP's lazy imports pull it in; imported after init, it
    # would keep the group alive past destroy_process_group (see close_gloo).
    import torch.distributed.nn  # noqa: F401

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    bound = {"device_id": device} if backend == "nccl" and device is not None else {}
    dist.init_process_group(backend, rank=rank, world_size=size,
                            timeout=timedelta(seconds=120), **bound)


def init_dpsgs(rank: int, size: int) -> None:
    """The "dpsgs" process group (dpsgs.distributed) over init_method="mpi://": rank, size and
    store from MPI; checks that MPI agrees with the launcher's rank and size."""
    import torch.distributed as dist
    import torch.distributed.nn  # noqa: F401  (before the group exists: see init_group)

    import dpsgs.distributed  # noqa: F401  (registers the backend and mpi://)

    dist.init_process_group("dpsgs", init_method="mpi://", timeout=timedelta(seconds=120))
    if (dist.get_rank(), dist.get_world_size()) != (rank, size):
        raise RuntimeError(f"mpi:// says rank {dist.get_rank()} of {dist.get_world_size()}, the launcher "
                           f"rank {rank} of {size}")


def gloo_beside_dpsgs(timeout: timedelta) -> dict[str, Any]:
    """{"gloo": group, "dpsgs": group} over every rank of the job, for benchmarks that compare
    the two in one run: the default group is "dpsgs" (init_method="mpi://": rank, size and
    store from MPI), gloo a second group over the same ranks and store."""
    import torch.distributed as dist
    import torch.distributed.nn  # noqa: F401  (before the group exists: see init_group)

    import dpsgs.distributed  # noqa: F401  (registers the backend and mpi://)

    dist.init_process_group("dpsgs", init_method="mpi://", timeout=timeout)
    return {"gloo": dist.new_group(backend="gloo", timeout=timeout), "dpsgs": dist.group.WORLD}


def close_gloo() -> None:
    """Tear the process group (gloo, or nccl) down while the interpreter is still whole;
    every rank calls it after its last collective, with its models (DDP, pipeline stages
    hold the group) gone.

    The barrier keeps a rank from closing its connections while a peer still talks to it.
    The group's worker threads are joined only when its last reference goes: if that is at
    interpreter exit, a worker still dropping a finished collective's tensors needs the GIL,
    is killed inside a destructor, and the process aborts ("terminate called without an
    active exception"). So a group that outlives destroy_process_group is an error here."""
    import gc
    import weakref

    import torch.distributed as dist

    dist.barrier()
    backend = dist.get_backend()
    group = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    gc.collect()   # a model in a reference cycle may still hold the group
    if group() is not None:
        raise RuntimeError(
            f"the {backend} process group outlived destroy_process_group; something still holds it "
            "(e.g. torch.distributed.nn imported after init_process_group binds group.WORLD "
            "as a default argument), so its threads would race interpreter exit")


def slowest_per_step(times: list[float], size: int) -> list[float]:
    """Every rank's step times (a collective: all ranks call it); per step the slowest
    rank's, since the slowest rank sets the pace."""
    import torch.distributed as dist

    all_times = [None] * size
    dist.all_gather_object(all_times, times)
    return [max(ts[i] for ts in all_times) for i in range(len(times))]


def write_result(path: str | Path, record: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
