"""Peer: torch.distributed.pipelining, K stages on CPU/gloo (GPipe or 1F1B), under mpirun.

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29513 mpirun -n 2 python -m dpsgs.bench.peers.pipe \
        --model resnet20 --batch 64 --schedule 1f1b --micro-batches 4 --out r.json

Every rank builds the whole model from the same seed and keeps its stage's blocks; the split
is balanced by a short per-block profile (dpsgs.planner) unless --split is given, so the
comparison with dpsgs `sync` uses the same kind of partition.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from .common import (StepTimer, Workload, add_workload_args, close_gloo, init_gloo,
                     make_batches, make_model, make_optimizer, mpi_rank_size, set_threads,
                     slowest_per_step, workload_from_args, write_result)

__all__ = ["main", "balanced_splits"]


def balanced_splits(model: nn.Sequential, in_shape: tuple[int, ...], batch: int,
                    stages: int) -> list[int]:
    """Split points balancing profiled forward+backward time of the blocks at `batch`."""
    from dpsgs.pipeline.partition import balance
    from dpsgs.planner.profile import profile_model

    prof = profile_model(model, in_shape, [batch], reps=1, threads=torch.get_num_threads())
    return balance([sum(lay.seconds(batch)) for lay in prof.layers], stages)


def _splits(a: argparse.Namespace, w: Workload, rank: int, size: int) -> list[int]:
    if a.split:
        return [int(s) for s in a.split.split(",")]
    # rank 0 profiles, everyone uses its answer (profiles differ on a noisy machine)
    box = [balanced_splits(make_model(w).train(), w.in_shape, w.batch // a.micro_batches, size)
           if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _train(a: argparse.Namespace, w: Workload, rank: int, size: int) -> dict:
    """The timed steps; returns the result record. The stage and schedule, which hold the
    process group, die with this frame, before close_gloo."""
    splits = _splits(a, w, rank, size)
    full = make_model(w).train()   # fresh: profiling touched BN statistics and grads
    edges = [0, *splits, len(full)]
    part = nn.Sequential(*list(full)[edges[rank]:edges[rank + 1]])
    stage = PipelineStage(part, rank, size, torch.device("cpu"))
    loss_fn = nn.CrossEntropyLoss()
    kind = ScheduleGPipe if a.schedule == "gpipe" else Schedule1F1B
    sched = kind(stage, n_microbatches=a.micro_batches, loss_fn=loss_fn)
    opt = make_optimizer(part.parameters())
    batches = make_batches(w, w.batch)
    timer, losses = StepTimer(), []
    dist.barrier()
    for i in range(w.total_steps):
        x, y = batches[i % len(batches)]
        timer.start()
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            sched.step(x)
        elif rank == size - 1:
            out: list[torch.Tensor] = []
            sched.step(target=y, losses=out)
            losses.append(float(sum(v.item() for v in out) / len(out)))
        else:
            sched.step()
        opt.step()
        timer.stop()
    # Stage 0 finishes each step last (its backward of the last micro-batch), so its clock
    # is the pipeline's; gather everyone's anyway and take the slowest.
    steps = slowest_per_step(timer.times, size)
    all_losses = [None] * size
    dist.all_gather_object(all_losses, losses)
    return {"runner": "torch.distributed.pipelining", "ranks": size, "threads": a.threads,
            "schedule": a.schedule, "micro_batches": a.micro_batches, "splits": splits,
            "batch": w.batch, "warmup": w.warmup, "step_times": steps,
            "losses": all_losses[-1], "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p)
    p.add_argument("--schedule", choices=("gpipe", "1f1b"), default="1f1b")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--split", help="comma-separated split points (block indices)")
    a = p.parse_args(argv)
    if a.device != "cpu":   # said, not faked: the bench reports it as not run on GPU
        p.error(f"--device {a.device}: this torch pipelining peer runs over gloo on CPU only")
    set_threads(a.threads)
    w = workload_from_args(a)
    rank, size = mpi_rank_size()
    init_gloo(rank, size, 29513)
    record = _train(a, w, rank, size)
    close_gloo()
    if rank == 0:   # only once the teardown was clean
        write_result(a.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
