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

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from dpsgs.comm.abort import abort_job
from dpsgs.comm.device import CudaView, DeviceDecision, gather_views, host_identity, probe_cuda, resolve_device
from dpsgs.comm.grid import Grid
from dpsgs.comm.protocol import Transport
from dpsgs.comm.waits import barrier, wait_for
from dpsgs.config import TrainConfig
from dpsgs.job.agreement import Outcome, agree, job_digest
from dpsgs.job.checkpoint import CheckpointError, resolve_resume
from dpsgs.job.checkpointer import Checkpointer, Position, checkpoint_plan, skip_done
from dpsgs.job.failure import everywhere, log_traceback, report_failure
from dpsgs.job.metrics import MetricsLog, Timeline
from dpsgs.job.progress import ProgressReporter, start_line
from dpsgs.job.reshard import describe, regrid_job, reshard_line
from dpsgs.job.rank_context import open_rank
from dpsgs.job.run_folder import RunFolder
from dpsgs.job.run_setup import Loaded, assemble, choose_split, load, segments
from dpsgs.pipeline.executor import StageExecutor
from dpsgs.pipeline.hooks import HookChain
from dpsgs.pipeline.schedule import fdg_plan
from dpsgs.reliability.faults import fault_callback, fault_hooks
from dpsgs.reliability.preemption import PreemptionHandler
from dpsgs.reliability.rank_map import announce_ranks
from dpsgs.reliability.step_control import StepControl

__all__ = ["RunFinished", "Trainer", "train"]

_LOG_CLOSE_WAIT_S = 1.0


class RunFinished(Exception):
    """A resume of a run that already finished: nothing to do (the summary is attached)."""

    def __init__(self, run_dir: str, summary: dict[str, Any]) -> None:
        super().__init__(f"run folder {run_dir} holds a finished run: nothing to resume")
        self.summary = summary


class Trainer:
    """One rank's part of a K x N training job on `comm` (default COMM_WORLD).

    model/data override config.model/config.dataset (build `model` identically on every
    rank, e.g. under torch.manual_seed; `data` in any form of dpsgs.job.user_data).
    transport: 'core' (dpsgs._C), 'mpi4py' (plain MPI baseline), 'torch' (torch.distributed,
    config.torch_backend) or a dpsgs.comm.protocol.Transport; default config.transport.
    `hooks` are extra step hooks (dpsgs.pipeline.hooks), e.g. a dpsgs.pipeline.recorder.Recorder.
    `cuda_view`: what this rank sees of CUDA (default: probed), the seam through which tests
    make up a GPU machine for --device.

    Start-up has two parts. First every rank does what it can alone — check the world size
    and the config, load the data, build the model — and rank 0 takes the run folder
    (dpsgs.job.run_folder), picks the checkpoint to resume from and the split (its profile,
    or the checkpoint's); one agreement (dpsgs.job.agreement) then compares every rank's
    outcome and digest of the job, so a failure or a disagreement anywhere is one error on
    every rank. Then the collective part: communicators, transport, step control, the
    executor; fit() loads the checkpoint under a second agreement, and only then writes to
    the run folder (run.json, config.json, the metrics files), so a refused start leaves
    it as it was."""

    def __init__(self, config: TrainConfig, comm: Any = None, *, model: nn.Module | None = None,
                 data: Any = None, transport: str | Transport | None = None, hooks: Any = None,
                 cuda_view: CudaView | None = None) -> None:
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        # the grid this job runs (--elastic: N from the world) and the per-replica batch that
        # keeps a resharded checkpoint's global batch: rank 0 decides, before anything is built
        self.folder: RunFolder | None = None
        self._notes: list[str] = []
        config, notes, regrid_error = regrid_job(config, comm)
        self._notes += notes
        self.config = config
        self.grid = Grid(config.stages, config.replicas)
        loaded, mine, decision = None, Outcome(), DeviceDecision("cpu", "")
        # what every rank sees of CUDA, gathered (--device cpu probes nothing): --device is
        # decided for the job as a whole (a GPU of its own for every rank, or the CPU)
        views = gather_views(comm, CudaView(host_identity()) if config.device == "cpu" else
                             cuda_view or probe_cuda(), config.timeout)
        try:
            if regrid_error:
                raise ValueError(regrid_error)
            # here, not before: a world that matches the grid of some ranks only (an MPMD
            # launch) must reach the agreement, or those ranks wait out the timeout
            self.grid.check_world(comm.Get_size())
            decision = _device(config, transport, views, labels=[
                self.grid.label(r) for r in range(len(views))] if len(views) == self.grid.size else None)
            loaded = load(config, model, data)
            mine.digest = job_digest(config, loaded.model, loaded.train, loaded.test)
            if comm.Get_rank() == 0:
                mine.decisions = self._decide(loaded)
        except Exception as e:  # noqa: BLE001 - reported by every rank, through the agreement
            mine.error = f"{type(e).__name__}: {e}"
            log_traceback(e, comm.Get_rank(), config.run_dir)
        try:
            decided = agree(comm, self.grid, mine, config.timeout).decisions
        except BaseException:
            self._say_notes()
            self._release_folder()
            raise
        if decided.get("finished"):
            self._release_folder()
            raise RunFinished(str(config.run_dir), decided["summary"])
        self.run_id: str | None = decided.get("run_id")
        self.device, device = decision, decision.device
        # what ran, as the run's first line says it and its records keep it
        self.ran = {"model": config.model if model is None else f"{type(model).__name__} (given)",
                    "dataset": config.dataset if data is None else f"{loaded.train.name} (given)",
                    "device": device, **({"device_why": decision.why} if decision.why else {})}
        if comm.Get_rank() == 0:
            print(start_line(config, self.ran, decision), flush=True)
        self._say_notes()
        self.setup = assemble(loaded, decided["split"])
        if comm.Get_rank() == 0:
            print(f"dpsgs: {self.setup.choice.describe(_model_label(config, model), config.stages)}",
                  file=sys.stderr, flush=True)
            if decided.get("reshard"):
                print(f"dpsgs: {reshard_line(decided['reshard'], decided['resume'])}",
                      file=sys.stderr, flush=True)
        self.ctx = ctx = open_rank(config, comm, transport, device)
        self.pycomm, self.rank = ctx.pycomm, ctx.rank
        self.replica, self.stage = ctx.replica, ctx.stage
        if self.stage > 0:          # only stage 0 reads inputs; the last stage reads labels
            self.setup.drop_inputs()
        self.resumed = decided.get("resume")
        self.reshard = decided.get("reshard")
        self.checkpointer = Checkpointer(config, self.grid, self.rank, self.resumed, self.run_id,
                                         self.setup.batches_per_epoch)
        self.timeline = Timeline(self.rank, config.trace, accel=ctx.accel)
        # reliability (docs/reliability.md): step-boundary vote (preemption signals, NaN/Inf
        # policy) with deadline-checked collectives, rank->pid map, fault points (only when
        # DPSGS_FAULT names this rank)
        barrier(self.pycomm, config.timeout, "start-up barrier")      # the vote's Dup has no deadline
        run_dir = Path(config.run_dir) if config.run_dir else None
        self.run_dir = run_dir
        # a resumed run redoes the steps after its checkpoint: their old lines go (when the
        # resume is agreed: _resume opens the logs); lines are written by a thread of their own
        keep_below = int(decided.get("resume_step") or 0)

        def log(path: Path | None) -> MetricsLog:
            return MetricsLog(path, keep_below, timeout=config.timeout, deferred=True,
                              before_write=fault_callback("metrics", self.rank))

        self.progress = ProgressReporter(
            config, self.grid, self.pycomm, self.rank, self.timeline,
            log(run_dir / "metrics.jsonl" if run_dir and self.rank == 0 else None),
            log(run_dir / f"metrics.rank{self.rank}.jsonl" if run_dir else None),
            batches_per_epoch=self.setup.batches_per_epoch)
        self.control = StepControl(self.pycomm, grid=self.grid, rank=self.rank, timeout=config.timeout,
                                   warn_after=config.warn_after, on_nonfinite=config.on_nonfinite,
                                   preempt=_early_signals(), health=self.progress.log_failure,
                                   late_guard=ctx.accel.asynchronous)
        announce_ranks(self.control.bounded(self.pycomm, "start-up rank map"), self.grid, config.run_dir)
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
        self._said_nonfinite_test = False

    def _decide(self, loaded: Loaded) -> dict[str, Any]:
        """Rank 0, before the agreement: the run folder, the checkpoint to resume, the split."""
        cfg = self.config
        decided: dict[str, Any] = {"run_id": None}
        if cfg.run_dir:
            self.folder = RunFolder.open(cfg)
            decided["run_id"] = self.folder.run_id
            if self.folder.finished and not self.folder.changes:
                decided.update(finished=True, summary=self.folder.summary())
                return decided
        resume = resolve_resume(cfg.resume, cfg.run_dir, decided["run_id"], cfg.resume_fallback,
                                note=lambda text: self._notes.append(f"dpsgs: {text}"))
        stored, how = None, None
        if resume is not None:
            plan = checkpoint_plan(resume, self.grid, cfg, loaded.sampler.batches_per_epoch)
            if plan["legacy"] and not isinstance(loaded.model, nn.Sequential):
                raise CheckpointError(
                    f"checkpoint {resume} was written by an older dpsgs, which split "
                    f"{type(loaded.model).__name__} by its children and dropped what its forward "
                    f"does between them: it cannot be resumed; start a new run")
            decided.update(resume=str(resume), resume_step=plan["global_step"])
            stored, how = plan["split"], "checkpoint" if plan["split"] is not None else None
        elif (cfg.resume and self.folder is not None and self.folder.record.get("split") is not None
              and len(self.folder.record["split"]) == cfg.stages - 1 and "split" not in (cfg.override or ())):
            # resumed before its first checkpoint: the split this run started with (a new K
            # or a named --split: nothing to reshard, the job chooses its own)
            stored, how = self.folder.record["split"], "run folder"
        decided["split"] = choose_split(loaded, split=stored, how=how)
        if resume is not None and plan["reshard"]:
            decided["reshard"] = describe(plan["saved_grid"], plan["saved_split"] or [],
                                          (cfg.stages, cfg.replicas), decided["split"].split,
                                          any(True for _ in loaded.model.buffers()))
            if cfg.elastic:
                decided["reshard"]["elastic"] = True
        return decided

    def _say_notes(self) -> None:
        """Rank 0's notes of the start-up (a damaged checkpoint skipped), after the first line."""
        for note in self._notes:
            print(note, file=sys.stderr, flush=True)
        self._notes = []

    def _release_folder(self) -> None:
        if self.folder is not None:
            self.folder.close()

    # -- public --------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Pipelined forward over the test set; loss/accuracy on every rank."""
        loss_sum, correct, n = self.executor.evaluate()
        from mpi4py import MPI

        # counts exact below 2^53; the last: samples whose loss was NaN or Inf
        tot = np.array([loss_sum, correct, n, self.executor.eval_nonfinite], dtype=np.float64)
        # non-blocking, waited for politely: a rank that died or was interrupted before it
        # (Ctrl-C reaches the ranks at different points) must not hold the others in MPI
        req = self.pycomm.Iallreduce(MPI.IN_PLACE, tot, op=MPI.SUM)
        wait_for(req.Test, self.config.timeout, f"{self.grid.label(self.rank)}: evaluation's all-reduce")
        n = max(1, int(tot[2]))
        test = {"test_loss": float(tot[0]) / n, "test_accuracy": float(tot[1]) / n}
        bad = int(tot[3])
        if bad:
            test["test_loss_nonfinite"] = bad
            if self.rank == 0 and not self._said_nonfinite_test:
                self._said_nonfinite_test = True
                print(f"dpsgs: {bad} of {n} test losses are not finite (NaN or Inf) after step "
                      f"{self.global_step - 1}: test_loss is NaN (null in summary.json and run.json; "
                      "each evaluation's count is test_loss_nonfinite in metrics.jsonl)",
                      file=sys.stderr, flush=True)
        return test

    def fit(self) -> dict[str, Any]:
        """Train the run's remaining segments; the summary. On an error, what this rank holds
        alone is given back before it propagates (an embedded caller lives on): the run
        folder's lock, the signal handlers, the open files."""
        try:
            return self._fit()
        except BaseException:
            self._release_local()
            raise

    def _release_local(self) -> None:
        """No collective here: the other ranks may be anywhere (or gone)."""
        self.executor.close()
        self.control.preempt.uninstall()
        self.progress.close()
        # the lines are flushed already, or this is an error path: its one line (Ctrl-C's
        # from rank 0 within the others' 2 s) must not wait on a slow disk
        self.progress.job_log.close(wait=_LOG_CLOSE_WAIT_S)
        self.progress.rank_log.close(wait=_LOG_CLOSE_WAIT_S)
        self._release_folder()

    def _resume(self) -> Position:
        """Collective: load the resume checkpoint on every rank, agreed — a rank that cannot
        is one error on every rank, and the run folder is left as it was (nothing of it is
        written before this). Then record the start in the folder and open the metrics."""
        mine, position = Outcome(), Position()
        try:
            position = self.checkpointer.resume(self.executor, self.setup.split)
        except Exception as e:  # noqa: BLE001 - reported by every rank, through the agreement
            mine.error = f"{type(e).__name__}: {e}"
            log_traceback(e, self.rank, self.config.run_dir)
        agree(self.pycomm, self.grid, mine, self.config.timeout)
        if self.folder is not None:
            self.folder.start(self.config, self.resumed, ran=self.ran, split=self.setup.choice.record(),
                              reshard=self.reshard)
        self.progress.open_logs()
        return position

    def _fit(self) -> dict[str, Any]:
        cfg, ex = self.config, self.executor
        self.position = self._resume()
        self.global_step = self.position.global_step
        segs = skip_done(segments(self.setup, self.position.epoch), self.position.batch)
        K = cfg.stages
        self.progress.start(sum(len(s) if cfg.schedule == "sync" else
                                len(fdg_plan(K, len(s), cfg.overlap)) for s in segs))
        t0 = time.perf_counter()
        iterations = 0
        test: dict[str, float] = {}
        finished = False
        for i, seg in enumerate(segs):
            first = self.global_step
            self.progress.epoch = seg[0][0]
            self.progress.begin_segment()
            if cfg.schedule == "fdg":
                plan = fdg_plan(K, len(seg), cfg.overlap)
                cut = ex.run_fdg(plan, seg, first)
                self.global_step += len(plan)
            else:
                cut = ex.run_sync(seg, first)
                self.global_step += len(seg)
            iterations += len(seg)
            self.progress.end_segment()
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
            finished = is_final
        if not segs:
            # nothing left to train (a job killed between its last checkpoint and the end of
            # the run, or an --override of a finished one): evaluate the restored weights
            # and keep the earlier job's training figures, rather than writing nulls
            test = self.evaluate()
        seconds = time.perf_counter() - t0
        self.progress.close()
        # the last metrics lines are written (bounded), and what any rank found in the last
        # steps (a NaN, a file it cannot write) stops every rank with its one error
        self.progress.flush_logs()
        self.control.settle(self.global_step)
        summary = self._summary(seconds, iterations, test)
        if self.control.stop_signal and not finished:
            summary["stopped_by"] = self.control.stop_signal
            summary["evaluated_at_epoch"] = self.evals[-1]["epoch"] if self.evals else None
        if not segs and self.run_dir is not None:
            earlier = {k: v for k, v in self._earlier_summary().items()
                       if k not in ("stopped_by", "evaluated_at_epoch")}
            summary = {**summary, **earlier, **test}
        if self.folder is not None:          # rank 0 of a run with a folder
            self.folder.write_summary(summary)
            if finished or not segs:
                self.folder.finish(summary)
        self.close()
        return summary

    def _earlier_summary(self) -> dict[str, Any]:
        """Collective: rank 0's summary.json of the earlier job, for every rank ({} if none)."""
        old: dict[str, Any] = {}
        if self.folder is not None:
            try:
                old = self.folder.summary()
            except ValueError:
                old = {}
        return self.control.bounded(self.pycomm, "earlier summary").bcast(old, root=0)

    def _checkpoint(self, seg: list[tuple[int, int]], iterations: int, stopped_by: str | None = None) -> Path:
        what = f"checkpoint after step {self.global_step - 1}"
        self.control.before_checkpoint(self.global_step - 1)
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
                "run_steps": self.global_step,                           # the run's, resumes too
                "run_iterations": self.position.iterations + iterations,
                "seconds": seconds, "samples_per_s": samples / seconds if seconds else 0.0,
                "final_train_loss": last.get("loss"),
                "staleness": {m["stage"]: m["staleness"] for m in per_stage},
                "stash_peak_bytes": [m["stash_peak_bytes"] for m in per_stage],
                "stage_params": [m["params"] for m in per_stage],
                "split": self.setup.split, "run_dir": cfg.run_dir, **self.ran, **test}

    def close(self) -> None:
        """Collective: the vote's last rounds, the trace, the transport; then what the rank
        holds alone (_release_local)."""
        self.control.close()
        self.timeline.close()
        self.ctx.close()
        self._release_local()


def _device(config: TrainConfig, transport: Any, views: list[CudaView],
            labels: list[str] | None) -> DeviceDecision:
    """--device for this job. Over torch.distributed the GPUs talk through torch's NCCL, so
    dpsgs's NCCL build is not needed; with gloo, auto means the CPU."""
    kind = config.transport if transport is None else transport
    if kind != "torch":
        return resolve_device(config.device, views, labels=labels)
    if config.device == "auto" and config.torch_backend == "gloo":
        return DeviceDecision("cpu", "--torch-backend gloo moves host memory")
    return resolve_device(config.device, views, nccl=False, labels=labels)


def _model_label(config: TrainConfig, model: nn.Module | None) -> str:
    return config.model if model is None else type(model).__name__


def _early_signals() -> PreemptionHandler | None:
    """The handler the CLI installed at start-up (signals before training are kept), if any."""
    from dpsgs.reliability.preemption import installed_handler

    return installed_handler()


def train(config: TrainConfig, comm: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Train per `config` on `comm` (any mpi4py communicator; default COMM_WORLD) and return
    the summary on every rank. Errors (docs/errors.md): one clear line on stderr — from rank
    0 when every rank raised it (a bad setting, ranks that disagree, a NaN/Inf stop), else
    from the rank that saw it — and its traceback in RUN_DIR/logs/rank{R}.log. An error all
    ranks share is raised on each (the caller decides); any other aborts the job, so no rank
    is left waiting. A resume of a finished run returns its summary and changes nothing."""
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    grid = Grid(config.stages, config.replicas)
    rank = comm.Get_rank()
    try:
        return Trainer(config, comm, **kwargs).fit()
    except RunFinished as done:
        if rank == 0:
            print(f"dpsgs: {done}", file=sys.stderr, flush=True)
        return done.summary
    except Exception as e:
        label = grid.label(rank) if rank < grid.size else f"rank {rank}"
        report_failure(e, rank, label, config.run_dir)
        if comm.Get_size() > 1 and not everywhere(e):
            abort_job(1)
        raise
