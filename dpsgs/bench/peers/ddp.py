"""Peer: PyTorch DistributedDataParallel over gloo, one rank per core, launched by mpirun.

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29512 mpirun -n 2 python -m dpsgs.bench.peers.ddp \
        --model resnet20 --batch 64 --out r.json

The rank comes from the MPI launcher's environment (PMI_RANK etc.); gloo rendezvouses over
MASTER_ADDR/PORT. After the timed steps, a few steps under `no_sync()` (no all-reduce) give
the compute-only step time, so exposed communication = step time - compute-only time.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .common import (StepTimer, Workload, add_workload_args, close_gloo, init_gloo,
                     make_batches, make_model, make_optimizer, mpi_rank_size, set_threads,
                     slowest_per_step, workload_from_args, write_result)

__all__ = ["main"]


def _allreduce_curve(numel: int, reps: int = 5) -> list[list[float]]:
    """(bytes, median seconds) of a bare gloo all-reduce at a few sizes up to the model's
    gradient: the planner's validation calibrates the gloo link from it."""
    import time

    out = []
    for n in sorted({1, 1 << 16, 1 << 20, max(1, numel)}):
        t = torch.zeros(n)
        ts = []
        for i in range(reps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            if i:
                ts.append(time.perf_counter() - t0)
        out.append([4.0 * n, statistics.median(ts)])
    return out


def _train(a: argparse.Namespace, w: Workload, rank: int, size: int) -> dict:
    """The timed steps, the no_sync steps and the all-reduce curve; returns the result
    record. The DDP model, which holds the process group, dies with this frame."""
    local = w.batch // size
    model = DDP(make_model(w).train(), bucket_cap_mb=a.bucket_cap_mb)
    opt = make_optimizer(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    batches = make_batches(w, local, offset=rank * local)

    def step(i: int) -> float:
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    timer, nosync, losses = StepTimer(), StepTimer(), []
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
    calib = _allreduce_curve(sum(p.numel() for p in model.parameters()))
    steps = slowest_per_step(timer.times, size)
    return {"runner": "ddp", "ranks": size, "threads": a.threads, "backend": "gloo",
            "bucket_cap_mb": a.bucket_cap_mb, "batch": w.batch, "warmup": w.warmup,
            "step_times": steps, "compute_only_step": statistics.median(nosync.times[1:]),
            "losses": losses, "gloo_allreduce": calib, "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p)
    p.add_argument("--nosync-steps", type=int, default=5)
    p.add_argument("--bucket-cap-mb", type=float, default=25.0)
    a = p.parse_args(argv)
    set_threads(a.threads)
    w = workload_from_args(a)
    rank, size = mpi_rank_size()
    init_gloo(rank, size, 29512)
    if w.batch % size:
        raise ValueError(f"global batch {w.batch} does not split over {size} ranks")
    record = _train(a, w, rank, size)
    close_gloo()
    if rank == 0:   # only once the teardown was clean
        write_result(a.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
