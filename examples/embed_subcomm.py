"""Embed dpsgs in a larger MPI workflow: train on a sub-communicator while the other ranks work.

    # from any folder, in the venv of scripts/setup.sh (dpsgs is installed there)
    mpirun -n 3 python -m mpi4py examples/embed_subcomm.py                   # 2x1 + 1 worker
    mpirun -n 6 python -m mpi4py examples/embed_subcomm.py -K 2 -N 2 --epochs 3

The first K*N ranks of COMM_WORLD train (dpsgs never touches COMM_WORLD, only the
communicator it is given, and never initialises or finalises MPI); the remaining ranks form
their own communicator and estimate pi by Monte Carlo meanwhile. Then every rank meets again
on COMM_WORLD: the trainers' rank 0 broadcasts the summary and the workers' result to all.
`python -m mpi4py` turns an exception on any rank into MPI_Abort, so nobody hangs. Each run
writes a new folder runs/embedded-<time>-<id> (a run folder belongs to one run), unless
--run-dir names one.
"""

from __future__ import annotations

import argparse
import random
import time
import uuid

from mpi4py import MPI

import dpsgs

__all__ = ["main"]


def monte_carlo_pi(comm: MPI.Comm, samples: int = 200_000) -> float:
    """Other MPI work: each worker rank throws darts, an allreduce over the workers sums hits."""
    rng = random.Random(1234 + comm.Get_rank())
    hits = sum(rng.random() ** 2 + rng.random() ** 2 <= 1.0 for _ in range(samples))
    return 4.0 * comm.allreduce(hits) / (samples * comm.Get_size())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-K", "--stages", type=int, default=2)
    p.add_argument("-N", "--replicas", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--run-dir", default=None, help="default: a new runs/embedded-<time>-<id>")
    args = p.parse_args()

    world = MPI.COMM_WORLD
    trainers = args.stages * args.replicas
    if world.Get_size() <= trainers:
        raise SystemExit(f"launch more than K*N = {trainers} ranks (got {world.Get_size()}): "
                         f"the extra ranks do the other work")
    is_trainer = world.Get_rank() < trainers
    # world rank 0 names the run's folder for everyone: a new one per run, so a second run
    # starts its own rather than meet the first one's (which dpsgs refuses to overwrite)
    fresh = f"runs/embedded-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_dir = world.bcast(args.run_dir or fresh, root=0)
    # Collective over COMM_WORLD: color 0 trains, color 1 does the other work.
    sub = world.Split(color=0 if is_trainer else 1, key=world.Get_rank())

    summary, pi = None, None
    if is_trainer:
        config = dpsgs.TrainConfig(stages=args.stages, replicas=args.replicas, epochs=args.epochs,
                             model="mlp", dataset="digits", run_dir=run_dir,
                             progress=False, lr=0.05)
        summary = dpsgs.train(config, comm=sub)
    else:
        pi = monte_carlo_pi(sub)
    sub.Free()

    # Everyone meets again: world rank 0 (a trainer) and world rank K*N (a worker) share.
    summary = world.bcast(summary, root=0)
    pi = world.bcast(pi, root=trainers)
    acc = summary.get("test_accuracy")
    line = (f"world rank {world.Get_rank()}: {'trained' if is_trainer else 'worked'}; "
            f"test accuracy {acc:.4f}, pi ~ {pi:.4f}")
    # One printer: lines from several ranks can interleave mid-line in the launcher's output.
    lines = world.gather(line, root=0)
    if world.Get_rank() == 0:
        print("\n".join(lines + [f"run folder: {run_dir}"]), flush=True)


if __name__ == "__main__":
    main()
