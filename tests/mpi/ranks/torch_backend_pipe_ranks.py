"""Rank program (2 ranks): a 2-stage torch.distributed.pipelining Schedule1F1B over "dpsgs"
against the same over gloo — same model, seed, micro-batches, 3 optimizer steps. The pipeline
moves activations and gradients with batch_isend_irecv (tagged send/recv), so the losses and
the stage's parameters must be bit-identical. Prints `OK pipe` on rank 0."""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

import dpsgs.distributed  # noqa: F401

dist.init_process_group("dpsgs", init_method="mpi://", timeout=timedelta(seconds=90))
r, n = dist.get_rank(), dist.get_world_size()
assert n == 2, "a 2-stage pipeline"
GLOO = dist.new_group(backend="gloo")


def run(group: dist.ProcessGroup) -> tuple[list[float], list[torch.Tensor]]:
    torch.manual_seed(0)
    full = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    part = full[:3] if r == 0 else full[3:]
    stage = PipelineStage(part, r, n, torch.device("cpu"), group=group)
    sched = Schedule1F1B(stage, n_microbatches=4, loss_fn=nn.CrossEntropyLoss())
    opt = torch.optim.SGD(part.parameters(), lr=0.1)
    losses: list[float] = []
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        if r == 0:
            sched.step(x)
        else:
            out: list[torch.Tensor] = []
            sched.step(target=y, losses=out)
            losses += [v.item() for v in out]
        opt.step()
    return losses, [p.detach().clone() for p in part.parameters()]


(l_ours, p_ours), (l_gloo, p_gloo) = run(dist.group.WORLD), run(GLOO)
ok = l_ours == l_gloo and all(torch.equal(a, b) for a, b in zip(p_ours, p_gloo, strict=True))
if r == 1:
    ok = ok and len(l_ours) == 12
if not ok:
    print(f"rank {r}: FAIL losses {l_ours} vs gloo {l_gloo}; parameters equal: "
          f"{[torch.equal(a, b) for a, b in zip(p_ours, p_gloo)]}", flush=True)
flag = torch.tensor([0 if ok else 1])
dist.all_reduce(flag, group=GLOO)
if r == 0:
    print("OK pipe" if int(flag) == 0 else "FAILED", flush=True)
dist.destroy_process_group()
sys.exit(int(flag))
