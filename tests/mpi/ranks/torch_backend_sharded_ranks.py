"""Rank program (2-3 ranks): torch's sharded training over "dpsgs" against the same over gloo.

FSDP2 (`fully_shard`) — same
seed, data and sharding, 10 AdamW steps. FSDP2 gathers each layer's parameters into an output
whose block for this rank is the rank's own shard (an input aliasing its output, which MPI
forbids: the core runs it in place) and reduce-scatters the gradients. The full parameters
must be bit-identical on 2 ranks and within 1e-6 relative (per tensor, in norm) on 3, and
each rank's shard must hold its slice of them. Then torch.distributed.checkpoint saves the
sharded state over "dpsgs" into the folder given as argv[1] and loads it into a fresh model
(DCP's planning gathers and scatters objects: dist.gather_object, scatter_object_list), which
must hold the same full parameters.

Tensor parallelism (`parallelize_module`, ColwiseParallel then RowwiseParallel: DTensor's
functional all-gather, all-reduce and reduce-scatter), 5 SGD steps on the same batch on
every rank: the same bounds. Prints `OK sharded` on rank 0."""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

import dpsgs.distributed  # noqa: F401

dist.init_process_group("dpsgs", init_method="mpi://", timeout=timedelta(seconds=90))
r, n = dist.get_rank(), dist.get_world_size()
GLOO = dist.new_group(backend="gloo")
STEPS = 10


def sharded(group: dist.ProcessGroup, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # 37 and 300: rows that do not divide by 2 or 3, so FSDP2 pads the last shard
    model = nn.Sequential(nn.Linear(48, 300), nn.ReLU(), nn.Linear(300, 37), nn.ReLU(), nn.Linear(37, 10))
    mesh = DeviceMesh.from_group(group, "cpu")
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(group: dist.ProcessGroup) -> dict[str, torch.Tensor]:
    model = sharded(group, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 * step + r)
        x, y = torch.randn(16, 48, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    shards = {k: v.to_local().detach().clone() for k, v in model.state_dict().items()}
    full = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
    if group is dist.group.WORLD and len(sys.argv) > 1:   # DCP over "dpsgs": save, load into another
        import torch.distributed.checkpoint as dcp

        dcp.save({"model": model.state_dict()}, checkpoint_id=sys.argv[1])
        fresh = sharded(group, 1)
        state = {"model": fresh.state_dict()}
        dcp.load(state, checkpoint_id=sys.argv[1])
        fresh.load_state_dict(state["model"])
        for k, v in fresh.state_dict().items():
            if not torch.equal(v.full_tensor(), full[k]):
                failures.append(f"{k}: not what torch.distributed.checkpoint saved")
    for k, shard in shards.items():   # Shard(0): rank r holds rows [r*c, r*c + c) of the full tensor
        rows = -(-full[k].shape[0] // n)
        if not torch.equal(shard, full[k][r * rows:(r + 1) * rows]):
            failures.append(f"{k}: rank {r}'s shard is not its slice of the full tensor")
    return full


def tensor_parallel(group: dist.ProcessGroup) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 10))
    model = parallelize_module(model, DeviceMesh.from_group(group, "cpu"),
                               {"0": ColwiseParallel(), "2": RowwiseParallel()})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(5):
        g = torch.Generator().manual_seed(step)          # the same batch on every rank
        x, y = torch.randn(16, 48, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}


def compare(what: str, ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    for k in theirs:
        a, b = ours[k], theirs[k]
        if n == 2:
            if not torch.equal(a, b):
                failures.append(f"{what} {k}: not bit-identical to gloo (max diff {(a - b).abs().max().item():.3g})")
        else:
            rel = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
            if rel > 1e-6:
                failures.append(f"{what} {k}: relative difference {rel:.3g} > 1e-6")


failures: list[str] = []
compare("FSDP2", train(dist.group.WORLD), train(GLOO))
compare("tensor parallel", tensor_parallel(dist.group.WORLD), tensor_parallel(GLOO))
for f in failures:
    print(f"rank {r}: FAIL {f}", flush=True)
flag = torch.tensor([len(failures)])
dist.all_reduce(flag, group=GLOO)
if r == 0:
    print("OK sharded" if int(flag) == 0 else f"FAILED {int(flag)}", flush=True)
dist.destroy_process_group()
sys.exit(0 if int(flag) == 0 else 1)
