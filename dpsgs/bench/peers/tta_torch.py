"""Time-to-accuracy peer: backprop (1 rank) or PyTorch DDP over gloo, dpsgs's data and optimizer.

    python -m dpsgs.bench.peers.tta_torch --config '{"model": "mlp", ...}' --out r.json
    mpirun -n 2 python -m dpsgs.bench.peers.tta_torch --config '{...}' --out r.json

The run uses the same TrainConfig fields as a dpsgs run (model, dataset, per-replica batch,
optimizer, learning-rate schedule, seed) and dpsgs's own sampler, so each global batch holds
the same samples. After every epoch rank 0 evaluates the test set; training seconds exclude
evaluation. One JSON record per epoch: epoch, train_seconds, test_accuracy, test_loss.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dpsgs.config import TrainConfig

from .common import (close_gloo, config_args, init_gloo, mpi_rank_size, set_threads,
                     write_result)

__all__ = ["main", "evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch: int = 512) -> tuple[float, float]:
    """(mean loss, accuracy) over the whole test set, model in eval mode."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        out = model(x[i:i + batch])
        loss += nn.functional.cross_entropy(out, y[i:i + batch], reduction="sum").item()
        correct += int((out.argmax(1) == y[i:i + batch]).sum())
    model.train()
    return loss / len(y), correct / len(y)


def _train(cfg: TrainConfig, rank: int, size: int) -> list[dict[str, Any]]:
    """Train every epoch; rank 0's per-epoch records. The DDP model, which holds the process
    group, dies with this frame."""
    from dpsgs.job.data import BatchSampler, get_batch, load_dataset
    from dpsgs.job.models import build_model
    from dpsgs.job.optim import build_optimizer, lr_at, set_lr

    train, test = load_dataset(cfg.dataset, cfg.data_dir, cfg.synthetic_shape,
                               cfg.synthetic_samples, cfg.seed)
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.model, train.sample_shape, train.num_classes)
    model: nn.Module = (nn.parallel.DistributedDataParallel(net, bucket_cap_mb=cfg.bucket_cap_mb)
                        if size > 1 else net)
    opt = build_optimizer(net.parameters(), cfg)
    sampler = BatchSampler(len(train), cfg.batch_size, size, cfg.seed, cfg.drop_last)
    steps = sampler.batches_per_epoch
    total = steps * cfg.epochs
    loss_fn = nn.CrossEntropyLoss()
    records, trained = [], 0.0
    for epoch in range(cfg.epochs):
        if size > 1:
            dist.barrier()
        t0 = time.perf_counter()
        for j in range(steps):
            x, y = get_batch(train, sampler, epoch, j, rank)
            set_lr(opt, lr_at(epoch * steps + j, total, cfg, steps))
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        if size > 1:
            dist.barrier()
        trained += time.perf_counter() - t0
        if rank == 0:
            tl, acc = evaluate(net, test.x, test.y)
            records.append({"epoch": epoch + 1, "train_seconds": trained, "test_accuracy": acc,
                            "test_loss": tl, "steps": (epoch + 1) * steps})
    return records


def main(argv: list[str] | None = None) -> int:
    a = config_args(__doc__.splitlines()[0], argv)
    set_threads(a.threads)

    cfg = TrainConfig.from_dict(json.loads(a.config))
    rank, size = mpi_rank_size()
    if size != cfg.replicas:
        raise ValueError(f"launched {size} ranks for N = {cfg.replicas} replicas")
    if size > 1:
        init_gloo(rank, size, 29514)
    records = _train(cfg, rank, size)
    if size > 1:
        close_gloo()
    if rank == 0:   # only once the teardown was clean
        write_result(a.out, {"runner": "ddp" if size > 1 else "single", "ranks": size,
                             "threads": a.threads, "config": cfg.to_dict(),
                             "epochs": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
