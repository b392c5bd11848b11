"""Rank program: a long run (STEPS steps in one segment, every step logged) that reports each
rank's resident memory after warm-up and at the end: per-step data must not accumulate.

    mpirun -n 2 python -m mpi4py soak_ranks.py RUN_DIR STEPS
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from mpi4py import MPI

from dpsgs.job.trainer import Trainer
from dpsgs.pipeline.hooks import StepHooks
from toy import toy_config, toy_data, toy_model

torch.set_num_threads(1)
WARM = 2000


def rss_kb() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4


class RssProbe(StepHooks):
    def __init__(self) -> None:
        self.at_warm = self.at_end = 0

    def step_done(self, step: int) -> bool:
        if step == WARM:
            self.at_warm = rss_kb()
        self.at_end = rss_kb()
        return False


def main() -> None:
    run_dir, steps = sys.argv[1], int(sys.argv[2])
    comm = MPI.COMM_WORLD
    probe = RssProbe()
    cfg = toy_config(stages=2, replicas=comm.Get_size() // 2, max_steps=steps, epochs=10**6,
                     flush_every_epoch=False, run_dir=run_dir, checkpoint_every=0, metrics_every=1)
    t = Trainer(cfg, comm, model=toy_model(), data=toy_data(), hooks=probe)
    summary = t.fit()
    grown = probe.at_end - probe.at_warm
    print(f"rank {comm.Get_rank()}: steps {summary['steps']} rss after warm-up {probe.at_warm} kB, "
          f"at the end {probe.at_end} kB, grown {grown} kB", flush=True)


if __name__ == "__main__":
    main()
