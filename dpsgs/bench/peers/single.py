"""Peer: plain backprop in one process (`--threads 1` is the 1-rank baseline, 2 the 2-thread peer).

    python -m dpsgs.bench.peers.single --model resnet20 --batch 64 --threads 2 --out r.json
    python -m dpsgs.bench.peers.single --model resnet20 --batch 64 --device cuda --out r.json

With --device cuda the model and batches live on the GPU the local rank picks, and every
step is timed from an idle device to an idle device (torch.cuda.synchronize).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from .common import (StepTimer, add_workload_args, cuda_device, device_sync, make_batches,
                     make_model, make_optimizer, set_threads, workload_from_args, write_result)

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p)
    a = p.parse_args(argv)
    dev = cuda_device(0) if a.device == "cuda" else None
    set_threads(a.threads)
    w = workload_from_args(a)
    model = make_model(w).train()
    if dev is not None:
        model.to(dev)
    opt = make_optimizer(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    batches = make_batches(w, w.batch, device=dev)
    timer, losses = StepTimer(sync=device_sync(dev)), []
    for step in range(w.total_steps):
        x, y = batches[step % len(batches)]
        timer.start()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        timer.stop()
        losses.append(loss.item())
    gpu = {"device": str(dev), "gpu": torch.cuda.get_device_name(dev)} if dev else {}
    write_result(a.out, {"runner": "single", "ranks": 1, "threads": a.threads,
                         "torch_threads": torch.get_num_threads(), "batch": w.batch,
                         "warmup": w.warmup, "step_times": timer.times, "losses": losses,
                         **gpu})
    return 0


if __name__ == "__main__":
    sys.exit(main())
