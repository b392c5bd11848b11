"""Rank program (2-4 ranks): DistributedDataParallel over "dpsgs" against DDP over gloo — same
seed, data and buckets, 20 SGD steps. The parameters must be bit-identical on 2 ranks (a sum
of two does not depend on the order) and within 1e-6 relative (per tensor, in norm) on 3-4,
and the parameters identical on every rank. The model's 6.5 MB of gradient in 5 MB buckets sends the big
bucket through the core's ring all-reduce and the small ones through MPI's; its BatchNorm
buffers are broadcast every step. Prints `OK ddp` on rank 0."""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dpsgs.distributed  # noqa: F401

dist.init_process_group("dpsgs", init_method="mpi://", timeout=timedelta(seconds=90))
r, n = dist.get_rank(), dist.get_world_size()
GLOO = dist.new_group(backend="gloo")
STEPS = 20


def train(group: dist.ProcessGroup) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.BatchNorm1d(1024), nn.ReLU(), nn.Linear(1024, 1280), nn.ReLU(),
                          nn.Linear(1280, 10))
    ddp = DDP(model, process_group=group, bucket_cap_mb=5)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 * step + r)
        x, y = torch.randn(16, 256, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    return [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]


PARAMS = 8   # the first 8 tensors; then BatchNorm's buffers, which each rank updates with its own batch


ours, theirs = train(dist.group.WORLD), train(GLOO)
failures = []
for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
    if n == 2:
        if not torch.equal(a, b):
            failures.append(f"tensor {i}: not bit-identical to DDP over gloo (max diff {(a - b).abs().max().item():.3g})")
    else:
        rel = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        if rel > 1e-6:
            failures.append(f"tensor {i}: relative difference {rel:.3g} > 1e-6")
    first = a.clone()
    dist.broadcast(first, src=0, group=GLOO)
    if i < PARAMS and not torch.equal(first, a):
        failures.append(f"tensor {i}: rank {r} holds other values than rank 0")
for f in failures:
    print(f"rank {r}: FAIL {f}", flush=True)
flag = torch.tensor([len(failures)])
dist.all_reduce(flag, group=GLOO)
if r == 0:
    print("OK ddp" if int(flag) == 0 else f"FAILED {int(flag)}", flush=True)
dist.destroy_process_group()
sys.exit(0 if int(flag) == 0 else 1)
