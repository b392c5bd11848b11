"""Peer: plain backprop in one process (`--threads 1` is the 1-rank baseline, 2 the 2-thread peer).

    python -m dpsgs.bench.peers.single --model resnet20 --batch 64 --threads 2 --out r.json
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from .common import (StepTimer, add_workload_args, make_batches, make_model, make_optimizer,
                     set_threads, workload_from_args, write_result)

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p)
    a = p.parse_args(argv)
    set_threads(a.threads)
    w = workload_from_args(a)
    model = make_model(w).train()
    opt = make_optimizer(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    batches = make_batches(w, w.batch)
    timer, losses = StepTimer(), []
    for step in range(w.total_steps):
        x, y = batches[step % len(batches)]
        timer.start()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        timer.stop()
        losses.append(loss.item())
    write_result(a.out, {"runner": "single", "ranks": 1, "threads": a.threads,
                         "torch_threads": torch.get_num_threads(), "batch": w.batch,
                         "warmup": w.warmup, "step_times": timer.times, "losses": losses})
    return 0


if __name__ == "__main__":
    sys.exit(main())
