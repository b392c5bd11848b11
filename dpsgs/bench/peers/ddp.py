"""Peer: PyTorch DistributedDataParallel over gloo or dpsgs (one rank per core) or NCCL (one GPU per rank).

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29512 mpirun -n 2 python -m dpsgs.bench.peers.ddp \
        --model resnet20 --batch 64 --out r.json
    mpirun -n 2 python -m mpi4py -m dpsgs.bench.peers.ddp --backend dpsgs \
        --model resnet20 --batch 64 --out r.json
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29512 mpirun -n 2 python -m dpsgs.bench.peers.ddp \
        --model resnet20 --batch 64 --device cuda --out r.json

The rank comes from the MPI launcher's environment (PMI_RANK etc.); the group rendezvouses
over MASTER_ADDR/PORT. With --backend dpsgs: the same script over the "dpsgs" backend
(dpsgs.distributed: the C++ core under torch.distributed), rendezvousing with mpi:// (rank,
size and store from MPI, no port). With --device cuda: the NCCL backend, the model and batches on the GPU
of the local rank (MPI_LOCALRANKID / OMPI_COMM_WORLD_LOCAL_RANK mod visible GPUs), steps timed
between torch.cuda.synchronize() calls; more ranks than GPUs need a NCCL_HOSTID per rank,
which the launcher sets, not this runner. After the timed steps, a few steps under
`no_sync()` (no all-reduce) give the compute-only step time, so exposed communication =
step time - compute-only time.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .common import (StepTimer, Workload, add_workload_args, close_gloo, cuda_device,
                     device_sync, init_dpsgs, init_group, make_batches, make_model, make_optimizer,
                     mpi_rank_size, set_threads, slowest_per_step, workload_from_args,
                     write_result)

__all__ = ["main"]


def _allreduce_curve(numel: int, reps: int = 5,
                     device: torch.device | None = None) -> list[list[float]]:
    """(bytes, median seconds) of a bare all-reduce at a few sizes up to the model's
    gradient: the planner's validation calibrates the gloo link from it (on a GPU: NCCL,
    each call timed to the device's completion)."""
    import time

    sync = device_sync(device)
    out = []
    for n in sorted({1, 1 << 16, 1 << 20, max(1, numel)}):
        t = torch.zeros(n, device=device)
        ts = []
        for i in range(reps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            if sync is not None:
                sync()
            if i:
                ts.append(time.perf_counter() - t0)
        out.append([4.0 * n, statistics.median(ts)])
    return out


def _train(a: argparse.Namespace, w: Workload, rank: int, size: int,
           dev: torch.device | None = None) -> dict:
    """The timed steps, the no_sync steps and the all-reduce curve; returns the result
    record. The DDP model, which holds the process group, dies with this frame."""
    local = w.batch // size
    module = make_model(w).train()
    if dev is not None:
        module.to(dev)
    model = DDP(module, device_ids=[dev.index] if dev is not None else None,
                bucket_cap_mb=a.bucket_cap_mb)
    opt = make_optimizer(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    batches = make_batches(w, local, offset=rank * local, device=dev)

    def step(i: int) -> float:
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    sync = device_sync(dev)
    timer, nosync, losses = StepTimer(sync=sync), StepTimer(sync=sync), []
    dist.barrier()
    for i in range(w.total_steps):
        timer.start()
        losses.append(step(i))
        timer.stop()
    dist.barrier()
    with model.no_sync():   # same work without the gradient all-reduce
        for i in range(a.nosync_steps + 1):
            nosync.start()
            step(i)
            nosync.stop()
    calib = _allreduce_curve(sum(p.numel() for p in model.parameters()), device=dev)
    steps = slowest_per_step(timer.times, size)
    # the planner calibrates its gloo link from "gloo_allreduce": a GPU run's curve is NCCL's
    gpu = {"device": str(dev), "gpu": torch.cuda.get_device_name(dev)} if dev else {}
    backend = "nccl" if dev is not None else a.backend
    return {"runner": "ddp", "ranks": size, "threads": a.threads, "backend": backend,
            "bucket_cap_mb": a.bucket_cap_mb, "batch": w.batch, "warmup": w.warmup,
            "step_times": steps, "compute_only_step": statistics.median(nosync.times[1:]),
            "losses": losses, f"{backend}_allreduce": calib,
            "torch": torch.__version__, **gpu}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p)
    p.add_argument("--nosync-steps", type=int, default=5)
    p.add_argument("--bucket-cap-mb", type=float, default=25.0)
    p.add_argument("--backend", choices=("gloo", "dpsgs"), default="gloo",
                   help="the CPU backend: gloo (TCP, MASTER_ADDR/PORT) or dpsgs (the C++ core, mpi://)")
    a = p.parse_args(argv)
    if a.backend == "dpsgs" and a.device != "cpu":
        p.error("--backend dpsgs runs CPU tensors on the core (CUDA ones go to NCCL: use --device cuda)")
    set_threads(a.threads)
    w = workload_from_args(a)
    rank, size = mpi_rank_size()
    dev = cuda_device(rank) if a.device == "cuda" else None
    if a.backend == "dpsgs":
        init_dpsgs(rank, size)
    else:
        init_group("gloo" if dev is None else "nccl", rank, size, 29512, dev)
    if w.batch % size:
        raise ValueError(f"global batch {w.batch} does not split over {size} ranks")
    record = _train(a, w, rank, size, dev)
    close_gloo()
    if rank == 0:   # only once the teardown was clean
        write_result(a.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
