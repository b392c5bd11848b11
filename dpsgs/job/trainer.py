"""The distributed trainer: K x N ranks, one StageExecutor each, epochs, evaluation, metrics.

    mpirun -n 4 python -m dpsgs train --stages 2 --replicas 2 --epochs 10
    # embedded: any mpi4py communicator (e.g. a split of COMM_WORLD)
    summary = dpsgs.train(dpsgs.TrainConfig(stages=2, replicas=2), comm=sub_comm)

Every rank builds the full model from the seed, keeps its own stage, and walks the same
deterministic batches (stage 0 reads the inputs, the last stage the labels). Runs are cut
into segments (one per epoch with flush_every_epoch, else one): each segment runs the plan
to its flush, then the job evaluates (pipelined forward over the test set) and saves a
checkpoint, so neither ever sees a half-processed batch. Rank 0 shows the progress bar and
writes RUN_DIR/{config.json, metrics.jsonl, summary.json}; every rank writes its timings
to RUN_DIR/metrics.rank{R}.jsonl. An exception on any rank (a CommTimeout naming the
operation and peer, a bad input) is reported with rank/replica/stage and aborts the job.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from dpsgs.comm.abort import abort_job
from dpsgs.comm.grid import Grid
from dpsgs.comm.protocol import Transport
from dpsgs.comm.waits import barrier
from dpsgs.config import TrainConfig
from dpsgs.job.checkpointer import Checkpointer, Position, skip_done
from dpsgs.job.data import Dataset
from dpsgs.job.metrics import MetricsLog, Timeline
from dpsgs.job.progress import ProgressReporter
from dpsgs.job.rank_context import open_rank
from dpsgs.job.run_setup import Setup, prepare, segments
from dpsgs.pipeline.executor import StageExecutor
from dpsgs.pipeline.hooks import HookChain
from dpsgs.pipeline.schedule import fdg_plan
from dpsgs.reliability.faults import fault_hooks
from dpsgs.reliability.rank_map import announce_ranks
from dpsgs.reliability.step_control import StepControl

__all__ = ["Trainer", "train"]


class Trainer:
    """One rank's part of a K x N training job on `comm` (default COMM_WORLD).

    model/data override config.model/config.dataset (build `model` identically on every
    rank, e.g. under torch.manual_seed). transport: 'core' (dpsgs._C, the default),
    'mpi4py' (plain MPI baseline) or a dpsgs.comm.protocol.Transport. `hooks` are extra
    step hooks (dpsgs.pipeline.hooks), e.g. a dpsgs.pipeline.recorder.Recorder."""

    def __init__(self, config: TrainConfig, comm: Any = None, *, model: nn.Sequential | None = None,
                 data: tuple[Dataset, Dataset] | None = None, transport: str | Transport = "core",
                 hooks: Any = None) -> None:
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        config.validate()
        self.config = config
        self.ctx = ctx = open_rank(config, comm, transport)
        self.grid, self.pycomm, self.rank = ctx.grid, ctx.pycomm, ctx.rank
        self.replica, self.stage = ctx.replica, ctx.stage
        self.checkpointer = Checkpointer(config, self.grid, self.rank)
        self.setup = self._prepare(model, data)
        if self.stage > 0:          # only stage 0 reads inputs; the last stage reads labels
            self.setup.drop_inputs()
        self.timeline = Timeline(self.rank, config.trace)
        # reliability (docs/reliability.md): step-boundary vote (preemption signals, NaN/Inf
        # policy) with deadline-checked collectives, rank->pid map, fault points (only when
        # DPSGS_FAULT names this rank)
        barrier(self.pycomm, config.timeout, "start-up barrier")      # the vote's Dup has no deadline
        self.control = StepControl(self.pycomm, grid=self.grid, rank=self.rank, timeout=config.timeout,
                                   warn_after=config.warn_after, on_nonfinite=config.on_nonfinite)
        announce_ranks(self.control.bounded(self.pycomm, "start-up rank map"), self.grid, config.run_dir)
        run_dir = Path(config.run_dir) if config.run_dir else None
        self.run_dir = run_dir
        self.progress = ProgressReporter(
            config, self.pycomm, self.rank, self.replica, self.stage, self.timeline,
            MetricsLog(run_dir / "metrics.jsonl" if run_dir and self.rank == 0 else None),
            MetricsLog(run_dir / f"metrics.rank{self.rank}.jsonl" if run_dir else None))
        # order matters: the step's metrics are written before the vote may stop the run
        self.executor = StageExecutor(self.setup, self.rank, ctx.transport,
                                      hooks=HookChain(fault_hooks(self.rank), self.progress,
                                                      self.control, hooks),
                                      spans=self.timeline)
        ctx.transport.connect()
        self.progress.stash_bytes = lambda: self.executor.compute.stash_bytes
        self.position = Position()
        self.global_step = 0
        self.evals: list[dict[str, Any]] = []

    def _prepare(self, model: nn.Sequential | None, data: tuple[Dataset, Dataset] | None) -> Setup:
        cfg = self.config
        stored = self.checkpointer.stored_split()
        if stored or cfg.split or cfg.balance != "time":
            return prepare(cfg, model, data, split=stored)
        # timing differs between ranks: rank 0 profiles, everyone uses its numbers
        costs = prepare(cfg, model, data).costs if self.rank == 0 else None
        barrier(self.pycomm, cfg.timeout, "profile broadcast")
        costs = self.pycomm.bcast(costs, root=0)
        return prepare(cfg, model, data, costs=costs, profile=False)

    # -- public --------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Pipelined forward over the test set; loss/accuracy on every rank."""
        loss_sum, correct, n = self.executor.evaluate()
        barrier(self.pycomm, self.config.timeout, "evaluation")
        from mpi4py import MPI

        tot = np.array([loss_sum, correct, n], dtype=np.float64)   # counts exact below 2^53
        self.pycomm.Allreduce(MPI.IN_PLACE, tot, op=MPI.SUM)
        n = max(1, int(tot[2]))
        return {"test_loss": float(tot[0]) / n, "test_accuracy": float(tot[1]) / n}

    def fit(self) -> dict[str, Any]:
        cfg, ex = self.config, self.executor
        self.position = self.checkpointer.resume(ex, self.setup.split)
        self.global_step = self.position.global_step
        if self.rank == 0 and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.json")
        segs = skip_done(segments(self.setup, self.position.epoch), self.position.batch)
        K = cfg.stages
        self.progress.start(sum(len(s) if cfg.schedule == "sync" else
                                len(fdg_plan(K, len(s), cfg.overlap)) for s in segs))
        t0 = time.perf_counter()
        iterations = 0
        test: dict[str, float] = {}
        for i, seg in enumerate(segs):
            first = self.global_step
            if cfg.schedule == "fdg":
                plan = fdg_plan(K, len(seg), cfg.overlap)
                cut = ex.run_fdg(plan, seg, first)
                self.global_step += len(plan)
            else:
                cut = ex.run_sync(seg, first)
                self.global_step += len(seg)
            iterations += len(seg)
            self.progress.end_segment(seg, self.control.bounded(self.pycomm, "per-step loss gather"))
            epoch = seg[-1][0]
            epoch_done = seg[-1][1] == self.setup.batches_per_epoch - 1
            is_final = i == len(segs) - 1
            if self.control.stop_signal and (cut or not is_final):
                if cfg.run_dir:   # preempted: the segment was cut and flushed; save, stop
                    self._checkpoint(seg, iterations, stopped_by=self.control.stop_signal)
                break
            if is_final or (epoch_done and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                test = self.evaluate()
                rec = {"step": self.global_step - 1, "epoch": epoch, **test}
                self.evals.append(rec)
                self.progress.job_log.write(rec)
                self.progress.evaluated(test)
            if cfg.run_dir and (is_final or (epoch_done and cfg.checkpoint_every
                                             and (epoch + 1) % cfg.checkpoint_every == 0)):
                self._checkpoint(seg, iterations)
        seconds = time.perf_counter() - t0
        self.progress.close()
        summary = self._summary(seconds, iterations, test)
        if self.rank == 0 and self.run_dir is not None:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        self.close()
        return summary

    def _checkpoint(self, seg: list[tuple[int, int]], iterations: int, stopped_by: str | None = None) -> Path:
        what = f"checkpoint after step {self.global_step - 1}"
        return self.checkpointer.save(self.executor, seg, self.setup.batches_per_epoch,
                                      self.position.iterations + iterations, self.global_step,
                                      self.setup.split, self.control.bounded(self.pycomm, what),
                                      stopped_by=stopped_by)

    def _summary(self, seconds: float, iterations: int, test: dict[str, float]) -> dict:
        ex, cfg = self.executor, self.config
        mine = {"stage": self.stage, "replica": self.replica,
                "staleness": sorted(self.progress.staleness_seen),
                "stash_peak_bytes": ex.compute.peak_stash_bytes,
                "params": sum(p.numel() for p in ex.compute.params)}
        bounded = self.control.bounded(self.pycomm, "run summary")
        everyone = bounded.allgather(mine)
        per_stage = [next(m for m in everyone if m["stage"] == k and m["replica"] == 0)
                     for k in range(cfg.stages)]
        samples = iterations * cfg.batch_size * cfg.replicas
        last = bounded.bcast(self.progress.last_train, root=0)
        return {"mode": "mpi", "schedule": cfg.schedule, "stages": cfg.stages,
                "replicas": cfg.replicas,
                "steps": self.global_step - self.position.global_step,   # this process's
                "iterations": iterations,
                "seconds": seconds, "samples_per_s": samples / seconds if seconds else 0.0,
                "final_train_loss": last.get("loss"),
                "staleness": {m["stage"]: m["staleness"] for m in per_stage},
                "stash_peak_bytes": [m["stash_peak_bytes"] for m in per_stage],
                "stage_params": [m["params"] for m in per_stage],
                "split": self.setup.split, "run_dir": cfg.run_dir, **test}

    def close(self) -> None:
        self.executor.close()
        self.control.close()
        self.timeline.close()
        self.progress.job_log.close()
        self.progress.rank_log.close()
        self.ctx.close()


def _raised_everywhere(e: BaseException) -> bool:
    """Errors every rank raises at the same point (agreed by a vote or a collective)."""
    from dpsgs.job.checkpoint import CheckpointError
    from dpsgs.reliability.guards import NonFiniteError

    return isinstance(e, (NonFiniteError, CheckpointError))


def train(config: TrainConfig, comm: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Train per `config` on `comm` (any mpi4py communicator; default COMM_WORLD) and return
    the summary on every rank. A wrong world size raises ValueError on every rank; any other
    failure is reported with rank/replica/stage and aborts the job (no rank is left waiting)."""
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    grid = Grid(config.stages, config.replicas)
    grid.check_world(comm.Get_size())
    try:
        return Trainer(config, comm, **kwargs).fit()
    except Exception as e:
        rank = comm.Get_rank()
        print(f"dpsgs: {grid.label(rank)} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        if comm.Get_size() > 1 and _raised_everywhere(e):
            # every rank raises this one together (after a vote): let each print its own
            # message before the first abort ends the job (bounded: never a hang)
            try:
                barrier(comm, 10.0, "error report")
            except Exception:
                pass
        if comm.Get_size() > 1:
            abort_job(1)
        raise
