"""dpsgs under the benchmark workload: dpsgs.job.trainer.train on synthetic data, then its metrics.

    mpirun -n 2 python -m mpi4py -m dpsgs.bench.peers.dpsgs_run --model resnet20 --batch 64 \
        --stages 2 --replicas 1 --schedule fdg --stash weights --out r.json [--device cuda]

The global batch is split over the N replicas (batch_size = B/N), exactly as the peers see
it. Per-step compute/channel/reduce seconds and the step time come from the trainer's own
metrics JSON lines (every rank's file), so the split is measured where the time is spent.
--device goes to the trainer's own setting (TrainConfig.device: cuda = a GPU per rank by
local rank, NCCL channels and all-reduce); a CPU run names cpu explicitly, so it stays on
the CPU even where the trainer's "auto" would take a GPU.
"""

from __future__ import annotations

import argparse
import glob
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from .common import add_workload_args, set_threads, workload_from_args, write_result

__all__ = ["main", "step_records"]

# Key spellings the trainer may use for a step's wall time (first found wins).
_STEP_KEYS = ("seconds", "step_time", "step_seconds", "time", "wall")
_SPLIT_KEYS = ("compute", "channel", "reduce")


def step_records(run_dir: Path, first: int = 0,
                 end: int | None = None) -> dict[int, list[dict[str, Any]]]:
    """Per rank, the per-step metric records of a run with first <= step < end (the
    per-rank files metrics.rank*.jsonl; rank 0's combined metrics.jsonl only without them)."""
    from dpsgs.job.metrics import read_metrics

    out: dict[int, list[dict[str, Any]]] = {}
    paths = (sorted(glob.glob(str(run_dir / "**" / "metrics.rank*.jsonl"), recursive=True))
             or sorted(glob.glob(str(run_dir / "**" / "metrics*.jsonl"), recursive=True)))
    for path in paths:
        for rec in read_metrics(path):
            if "step" in rec and not (first <= int(rec["step"]) < (end or 1 << 62)):
                continue
            kind = rec.get("kind", rec.get("type", "step"))
            if "step" not in rec or kind not in ("step", "train"):
                continue
            out.setdefault(int(rec.get("rank", 0)), []).append(rec)
    return out


def _point(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _step_time(rec: dict[str, Any], batch: int) -> float | None:
    for k in _STEP_KEYS:
        if isinstance(rec.get(k), (int, float)):
            return float(rec[k])
    sps = rec.get("samples_per_s")
    if isinstance(sps, (int, float)) and sps > 0:
        return batch / sps
    return None


def summarize_run(records: dict[int, list[dict[str, Any]]], batch: int,
                  stages: int) -> dict[str, Any]:
    """Step times (the slowest rank each step) and per-stage medians of the time split."""
    steps: dict[int, float] = {}
    per_rank: dict[int, dict[str, list[float]]] = {}
    for rank, recs in records.items():
        split = per_rank.setdefault(rank, {k: [] for k in (*_SPLIT_KEYS, "step")})
        for rec in recs:
            t = _step_time(rec, batch)
            if t is not None:
                s = int(rec["step"])
                steps[s] = max(steps.get(s, 0.0), t)
                split["step"].append(t)
            for k in _SPLIT_KEYS:
                v = rec.get(k, rec.get(f"{k}_s", rec.get(f"{k}_time")))
                if isinstance(v, (int, float)):
                    split[k].append(float(v))
    stash: dict[str, float] = {}
    for rank, recs in records.items():
        vals = [r.get("stash_bytes", r.get("stash_peak_bytes", r.get("peak_stash_bytes")))
                for r in recs]
        vals = [v for v in vals if isinstance(v, (int, float))]
        if vals:   # ranks of one stage across replicas: the largest
            key = f"stage{rank % stages}"
            stash[key] = max(stash.get(key, 0), max(vals))
    return {"step_times": [steps[s] for s in sorted(steps)],
            "rank_split": {str(r): v for r, v in sorted(per_rank.items())},
            "rank_stage": {str(r): r % stages for r in sorted(per_rank)},
            "stash_peak_bytes": dict(sorted(stash.items()))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--schedule", choices=("fdg", "sync"), default="fdg")
    p.add_argument("--stash", choices=("weights", "recompute"), default="weights")
    p.add_argument("--overlap", choices=("backward", "step"), default="backward")
    p.add_argument("--sync-kind", choices=("1f1b", "gpipe"), default="1f1b")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--split", help="comma-separated split points: module paths or top-level "
                                    "indices (else the trainer balances)")
    p.add_argument("--transport", choices=("core", "torch"), default="core",
                   help="the trainer's transport (torch: torch.distributed, gloo on cpu, nccl on cuda)")
    p.add_argument("--run-dir", help="keep the run here (default: a temporary folder)")
    a = p.parse_args(argv)
    set_threads(a.threads)
    w = workload_from_args(a)
    from mpi4py import MPI

    from dpsgs.config import TrainConfig
    from dpsgs.pipeline.schedule import update_start
    from dpsgs.job.trainer import train

    comm = MPI.COMM_WORLD
    if w.batch % a.replicas:
        raise ValueError(f"global batch {w.batch} does not split over N = {a.replicas}")
    run_dir = a.run_dir
    if run_dir is None:   # one folder for all ranks: rank 0 picks it
        run_dir = comm.bcast(tempfile.mkdtemp(prefix="dpsgs-bench-") if comm.rank == 0 else None)
    # fdg: the first 2(K-1) steps fill the pipeline (stage 0 has no backward yet) and as
    # many flush it at the end; run that many more batches and time only the steady steps
    # [fill, fill + total). A sync step is a whole flushed pipeline: no fill.
    fill = update_start(0, a.stages, a.overlap) if a.schedule == "fdg" else 0
    steps = w.total_steps + fill
    # One epoch longer than the run, so no epoch-end flush or evaluation lands inside it.
    samples = w.batch * (steps + 2)
    cfg = TrainConfig(stages=a.stages, replicas=a.replicas, schedule=a.schedule, stash=a.stash,
                      overlap=a.overlap, sync_kind=a.sync_kind, micro_batches=a.micro_batches,
                      split=[_point(s) for s in a.split.split(",")] if a.split else None,
                      model=w.model, dataset="synthetic", synthetic_shape=list(w.in_shape),
                      synthetic_samples=samples, num_classes=w.num_classes,
                      batch_size=w.batch // a.replicas, epochs=1, max_steps=steps,
                      lr=0.01, lr_schedule="constant", seed=w.seed, run_dir=run_dir,
                      checkpoint_every=0, progress=False, metrics_every=1,
                      device=a.device, transport=a.transport)
    summary = train(cfg, comm)
    comm.Barrier()
    if comm.rank == 0:
        rec = summarize_run(step_records(Path(run_dir), fill, fill + w.total_steps), w.batch,
                            a.stages)
        peak = summary.get("stash_peak_bytes")
        if isinstance(peak, list):   # the trainer's own per-stage peak (replica 0)
            rec["stash_peak_bytes"] = {f"stage{k}": int(v) for k, v in enumerate(peak)}
        write_result(a.out, {"runner": "dpsgs", "ranks": comm.size, "threads": a.threads,
                             "stages": a.stages, "replicas": a.replicas,
                             "schedule": a.schedule, "stash": a.stash, "overlap": a.overlap,
                             "sync_kind": a.sync_kind, "micro_batches": a.micro_batches,
                             "device": a.device,
                             "batch": w.batch, "warmup": w.warmup, "run_dir": run_dir,
                             "fill_steps": fill,
                             "summary": {k: v for k, v in summary.items()
                                         if isinstance(v, (int, float, str, list, dict))},
                             "torch": torch.__version__, **rec})
        if a.run_dir is None:   # our temporary folder (metrics, final checkpoint): drop it
            shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
