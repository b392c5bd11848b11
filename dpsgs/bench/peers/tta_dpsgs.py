"""Time-to-accuracy run of dpsgs: trainer.train with a TrainConfig, accuracy curve from metrics.

    mpirun -n 2 python -m mpi4py -m dpsgs.bench.peers.tta_dpsgs --config '{...}' --out r.json
"""

from __future__ import annotations

import glob
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .common import config_args, set_threads, write_result

__all__ = ["main", "epoch_curve"]


def epoch_curve(run_dir: Path) -> list[dict[str, Any]]:
    """(epochs done, train_seconds, test_accuracy) at every evaluation of a run. Training
    seconds = the sum over steps up to the evaluation of the step's wall time (the slowest
    rank's, from metrics.rank*.jsonl), so evaluation itself is excluded."""
    from dpsgs.job.metrics import read_metrics

    evals: dict[int, dict[str, Any]] = {}
    step_s: dict[int, float] = {}
    for path in sorted(glob.glob(str(run_dir / "**" / "metrics*.jsonl"), recursive=True)):
        for r in read_metrics(path):
            if "test_accuracy" in r:
                evals[int(r.get("step", len(evals)))] = r
            elif isinstance(r.get("seconds"), (int, float)) and "step" in r:
                s = int(r["step"])
                step_s[s] = max(step_s.get(s, 0.0), float(r["seconds"]))
    curve = []
    for step, r in sorted(evals.items()):
        curve.append({"epoch": int(r.get("epoch", len(curve))) + 1,
                      "train_seconds": sum(t for s, t in step_s.items() if s <= step),
                      "test_accuracy": float(r["test_accuracy"]),
                      "test_loss": r.get("test_loss"), "steps": step + 1})
    return curve


def main(argv: list[str] | None = None) -> int:
    a = config_args(__doc__.splitlines()[0], argv)
    set_threads(a.threads)
    from mpi4py import MPI

    from dpsgs.config import TrainConfig
    from dpsgs.job.trainer import train

    comm = MPI.COMM_WORLD
    cfg = TrainConfig.from_dict(json.loads(a.config))
    temporary = cfg.run_dir is None
    if temporary:
        cfg.run_dir = comm.bcast(tempfile.mkdtemp(prefix="dpsgs-tta-") if comm.rank == 0
                                 else None)
    cfg.progress = False
    summary = train(cfg, comm)
    comm.Barrier()
    if comm.rank == 0:
        write_result(a.out, {"runner": "dpsgs", "ranks": comm.size, "threads": a.threads,
                             "config": cfg.to_dict(), "run_dir": cfg.run_dir,
                             "epochs": epoch_curve(Path(cfg.run_dir)),
                             "summary": {k: v for k, v in summary.items()
                                         if isinstance(v, (int, float, str))}})
        if temporary:   # metrics already read; the final checkpoint is not needed
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
