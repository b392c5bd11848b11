"""Rank program: refusals that every rank meets and rank 0 prints once (dpsgs.job.trainer.train).

    refusal_ranks.py TRANSPORT                  K = 2 on a model whose own forward has
                                                data-dependent control flow
    refusal_ranks.py TRANSPORT train RUN_DIR    ReluNet K = 2 split before fc3, 1 epoch
    refusal_ranks.py TRANSPORT resume RUN_DIR   resume it for a second epoch (the test made
                                                its checkpoint an older dpsgs's first)
"""

from __future__ import annotations

import sys

import torch
from mpi4py import MPI
from torch import nn

from dpsgs.job.agreement import SetupFailed
from dpsgs.job.trainer import train
from toy import toy_config, toy_data, toy_model

torch.set_num_threads(1)


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else self.b(x)


def main() -> None:
    world = MPI.COMM_WORLD
    transport, case = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "gated"
    if case == "train":
        train(toy_config(stages=2, split=["fc3"], epochs=1, run_dir=sys.argv[3],
                         checkpoint_every=1), world, model=toy_model(kind="relu"),
              data=toy_data(), transport=transport)
        return
    torch.manual_seed(0)
    try:
        if case == "resume":
            train(toy_config(stages=2, split=["fc3"], epochs=2, run_dir=sys.argv[3],
                             resume="auto", override=["epochs"], checkpoint_every=1), world,
                  model=toy_model(kind="relu"), data=toy_data(), transport=transport)
        else:
            train(toy_config(stages=2, split=None), world, model=Gated(), data=toy_data(),
                  transport=transport)
    except SetupFailed:
        # one write with its newline: hydra may splice another rank's output between two
        print(f"rank {world.rank}: refused\n", end="", flush=True)
        return
    raise SystemExit(f"rank {world.rank}: not refused")


if __name__ == "__main__":
    main()
