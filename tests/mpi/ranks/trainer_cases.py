"""Rank program: trainer behaviours under real ranks, one CASE per launch.

    world_size   call train() with K*N != world size; every rank prints its ValueError
    embedded     ranks 0-1 train K=2 x N=1 on a split of COMM_WORLD while rank 2 works alone
    bad_peer     stage 1 builds a model with other parameter shapes: the start-up agreement
                 names both ranks, on every rank, before any batch moves
    unseeded     each replica builds its model from another seed (same shapes): named too
    after_error  an embedded train() stops on a NaN; the caller lives on: the signal handler is
                 the caller's again and the run folder is free for the next train()
"""

from __future__ import annotations

import sys
import time

import torch
from mpi4py import MPI
from torch import nn

from dpsgs.job.trainer import train
from toy import toy_config, toy_data, toy_model

torch.set_num_threads(1)


def main() -> None:
    case, transport = sys.argv[1], sys.argv[2]
    world = MPI.COMM_WORLD
    if case == "world_size":
        try:
            train(toy_config(stages=2, replicas=2), world, transport=transport)
        except ValueError as e:
            print(f"rank {world.rank}: ValueError: {e}", flush=True)
            return
        raise SystemExit(f"rank {world.rank}: no error for world size {world.size}")
    if case == "embedded":
        sub = world.Split(0 if world.rank < 2 else 1, world.rank)
        if world.rank < 2:
            s = train(toy_config(stages=2, replicas=1, max_steps=6), sub,
                      model=toy_model(), data=toy_data(), transport=transport)
            # one write with its newline: hydra may splice another rank's output between
            # print's two writes (text, then end), merging two lines
            print(f"rank {world.rank}: trained steps={s['steps']} "
                  f"acc={s['test_accuracy']:.6f}\n", end="", flush=True)
        else:
            time.sleep(0.5)                       # "other work" of the workflow
            print(f"rank {world.rank}: did other work", flush=True)
        world.Barrier()
        assert sub.Get_size() == (2 if world.rank < 2 else 1)
        return
    if case == "bad_peer":
        model = toy_model()
        if world.rank == 1:                       # stage 1 expects 5 features, not 8
            model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 8), nn.Tanh(),
                                  nn.Linear(8, 3))
        train(toy_config(stages=2, replicas=1, split=[2]), world, model=model,
              data=toy_data(), transport=transport)
        raise SystemExit(f"rank {world.rank}: the mismatch went unnoticed")   # train() raised instead
    if case == "unseeded":
        train(toy_config(stages=1, replicas=2), world, model=toy_model(seed=world.rank),
              data=toy_data(), transport=transport)
        raise SystemExit(f"rank {world.rank}: the replicas' other weights went unnoticed")
    if case == "after_error":
        import signal
        import tempfile

        from dpsgs.reliability.guards import NonFiniteError

        run_dir = tempfile.mkdtemp(prefix="dpsgs-after-error-")
        before = signal.getsignal(signal.SIGTERM)
        try:
            train(toy_config(stages=1, replicas=1, lr=1e30, run_dir=run_dir), world,
                  model=toy_model(), data=toy_data(), transport=transport)
        except NonFiniteError:
            pass
        print(f"handler restored: {signal.getsignal(signal.SIGTERM) is before}", flush=True)
        again = train(toy_config(stages=1, replicas=1, lr=1e30, run_dir=run_dir, resume="auto",
                                 on_nonfinite="skip"),
                      world, model=toy_model(), data=toy_data(), transport=transport)
        print(f"second train ran: {again['steps']} steps", flush=True)
        return
    raise SystemExit(f"unknown case {case!r}")


if __name__ == "__main__":
    main()
