"""The distributed trainer: K x N ranks, one StageWorker each, epochs, evaluation, metrics.

    mpirun -n 4 python -m dpsgs train --stages 2 --replicas 2 --epochs 10
    # embedded: any mpi4py communicator (e.g. a split of COMM_WORLD)
    summary = dpsgs.job.trainer.train(TrainConfig(stages=2, replicas=2), comm=sub_comm)

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
from dpsgs.job.run_setup import Setup, prepare, segments
from dpsgs.job.metrics import MetricsLog, Timeline
from dpsgs.pipeline.schedule import fdg_plan
from dpsgs.comm.grid import Grid
from dpsgs.pipeline.executor import StageWorker
from dpsgs.reliability import faults
from dpsgs.reliability.step_control import StepControl
from dpsgs.reliability.preemption import next_position, save_preempted, skip_done
from dpsgs.reliability.rank_map import announce_ranks

__all__ = ["Trainer", "train"]

_LOSS_TAG = 901


def _wait_all(comm: Any, timeout: float) -> None:
    """A barrier that sleeps instead of spinning (ranks share cores with rank 0's work)."""
    req = comm.Ibarrier()
    start, delay = time.monotonic(), 0.0
    while not req.Test():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"rank {comm.Get_rank()}: barrier not reached by every rank "
                               f"after {timeout:.0f}s")
        time.sleep(delay)
        delay = min(0.005, delay * 2 + 1e-4)


class Trainer:
    """One rank's part of a K x N training job on `comm` (default COMM_WORLD).

    model/data override config.model/config.dataset (build `model` identically on every
    rank, e.g. under torch.manual_seed). transport: 'core' (dpsgs._C, the default),
    'mpi4py' (plain MPI baseline) or an object with channel()/reducer() (dpsgs.comm.transports).
    """

    def __init__(self, config: Any, comm: Any = None, *, model: nn.Sequential | None = None,
                 data: tuple[Any, Any] | None = None, transport: Any = "core") -> None:
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        if config.schedule not in ("fdg", "sync"):
            raise ValueError(f"schedule must be fdg or sync, got {config.schedule!r}")
        if config.schedule == "sync" and config.shrink != 1.0:
            raise ValueError(f"--shrink {config.shrink}: gradient shrinking belongs to the fdg "
                             f"schedule; sync computes the exact gradient")
        if config.schedule == "sync" and config.batch_size % config.micro_batches:
            raise ValueError(f"sync schedule: batch_size {config.batch_size} is not divisible "
                             f"by micro_batches {config.micro_batches}")
        self.config = config
        self.grid = Grid(config.stages, config.replicas)
        self.grid.check_world(comm.Get_size())   # same on every rank: all fail alike
        # Every start-up collective waits behind a deadline: a rank killed before it must
        # not leave the others blocked (MPI's own Dup/bcast/allgather have no timeout).
        _wait_all(comm, config.timeout)
        self.pycomm = comm.Dup()                   # metadata: bcast/gather/losses
        self.rank = self.pycomm.Get_rank()
        self.replica, self.stage = self.grid.coords(self.rank)
        self.core = None
        from dpsgs.job.checkpoint import resolve_resume

        # resolved before the split is chosen: a resumed run keeps the checkpoint's
        self.resume_from = resolve_resume(config.resume, config.run_dir)
        self.setup = self._prepare(model, data)
        if self.stage > 0:          # only stage 0 reads inputs; the last stage reads labels
            self.setup.drop_inputs()
        self.transport = self._transport(transport)
        self.timeline = Timeline(self.rank, config.trace)
        self.worker = StageWorker(self.setup, self.replica, self.stage, self.rank,
                                  self.transport, self.timeline)
        # reliability hooks (docs/reliability.md): step-boundary vote (preemption signals,
        # NaN/Inf policy) with deadline-checked collectives, rank->pid map, fault points
        # (only when DPSGS_FAULT is set)
        _wait_all(self.pycomm, config.timeout)      # the vote's Dup has no deadline
        self.control = StepControl(self.pycomm, rank=self.rank, stages=config.stages,
                                   timeout=config.timeout, warn_after=config.warn_after,
                                   on_nonfinite=config.on_nonfinite)
        announce_ranks(self.control.bounded(self.pycomm, "start-up rank map"), config.stages,
                       config.run_dir)
        self.control.attach(self.worker)
        faults.instrument(self.worker, self.rank, config.stages)
        run_dir = Path(config.run_dir) if config.run_dir else None
        self.run_dir = run_dir
        self.log = MetricsLog(run_dir / "metrics.jsonl" if run_dir and self.rank == 0 else None)
        self.rank_log = MetricsLog(run_dir / f"metrics.rank{self.rank}.jsonl" if run_dir else None)
        self.start_epoch = 0
        self.start_batch = 0          # > 0 after a checkpoint taken mid-epoch
        self.start_iterations = 0     # batches trained before this process (resume)
        self.global_step = 0
        self.start_step = 0           # global_step of the checkpoint resumed from
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self._bar = None
        self._last_time = time.perf_counter()
        self._feed: list[Any] = []
        self._fed = 0

    # -- construction --------------------------------------------------------------------
    def _prepare(self, model: nn.Sequential | None, data: tuple[Any, Any] | None) -> Setup:
        cfg = self.config
        # its shards hold the checkpoint's stages (a fresh time profile may split elsewhere);
        # an explicit --split that differs fails the metadata check in _resume
        stored = None
        if self.resume_from is not None and not cfg.split:
            from dpsgs.job.checkpoint import read_manifest

            manifest = read_manifest(self.resume_from)
            # a checkpoint of another K has no usable split: _resume names both grids
            if manifest["stages"] == cfg.stages:
                stored = manifest["meta"].get("split")
        if stored or cfg.split or cfg.balance != "time":
            return prepare(cfg, model, data, split=stored)
        # timing differs between ranks: rank 0 profiles, everyone uses its numbers
        costs = None
        if self.rank == 0:
            costs = prepare(cfg, model, data).costs
        _wait_all(self.pycomm, cfg.timeout)
        costs = self.pycomm.bcast(costs, root=0)
        return prepare(cfg, model, data, costs=costs, profile=False)

    def _transport(self, transport: Any) -> Any:
        from dpsgs.comm import transports as tr

        cfg = self.config
        if transport == "core":
            from dpsgs import _C

            self.core = _C.Communicator(self.pycomm, cfg.timeout, cfg.warn_after)
            stage_comm = self.core.split(self.stage, self.replica)
            return tr.CoreTransport(self.core, stage_comm, cfg)
        if transport == "mpi4py":
            stage_comm = self.pycomm.Split(self.stage, self.replica)
            return tr.Mpi4pyTransport(self.pycomm, stage_comm, cfg)
        return transport

    # -- per step ------------------------------------------------------------------------
    def _on_step(self, step: int) -> None:
        now = time.perf_counter()
        dt, self._last_time = now - self._last_time, now
        totals = self.timeline.step_totals()
        rec = self.worker.step_losses.get(step)
        every = max(1, int(self.config.metrics_every or 1))
        if step % every == 0:
                self.rank_log.write({"step": step, "rank": self.rank, "replica": self.replica,
                                 "stage": self.stage, "seconds": dt, **totals,
                                 "stash_bytes": self.worker.compute.stash_bytes,
                                 **({"loss": rec[0]} if rec else {})})
        if rec and self._feeding and self.replica == 0 and self.stage == self.config.stages - 1:
            # live loss for rank 0's progress bar (tiny, non-blocking; one per batch)
            self._feed.append(self.pycomm.isend((step, rec), dest=0, tag=_LOSS_TAG))
        if self.rank == 0:
            self.history.append({"step": step, "seconds": dt, **totals})
            if self._bar is not None:
                self._bar.update(1)
                live = rec
                while self._feeding and self.pycomm.iprobe(source=self.config.stages - 1,
                                                           tag=_LOSS_TAG):
                    _, live = self.pycomm.recv(source=self.config.stages - 1, tag=_LOSS_TAG)
                    self._fed += 1
                if live:
                    self._bar.set_postfix(loss=f"{live[0]:.4f}", acc=f"{live[1] / live[2]:.3f}",
                                          refresh=False)

    @property
    def _feeding(self) -> bool:
        """Replica 0's last stage feeds rank 0's progress bar (when there is one, K > 1)."""
        return bool(self.config.progress) and self.config.stages > 1

    def _drain_feed(self, batches: int) -> None:
        """End of segment: the sender completes its sends, rank 0 receives the rest of the
        `batches` messages (one per batch of the segment)."""
        for req in self._feed:
            req.wait()
        self._feed = []
        if self.rank == 0 and self._feeding:
            while self._fed < batches:
                self.pycomm.recv(source=self.config.stages - 1, tag=_LOSS_TAG)
                self._fed += 1
        self._fed = 0

    def _segment_metrics(self, seg: list[tuple[int, int]], first_step: int) -> None:
        """Gather the last stages' per-step losses to rank 0; one metrics line per step."""
        mine = {s: v for s, v in self.worker.step_losses.items() if s >= first_step}
        everyone = self.control.bounded(self.pycomm, "per-step loss gather").gather(mine, root=0)
        if self.rank != 0:
            return
        per_step: dict[int, list[tuple[float, int, int]]] = {}
        for d in everyone:
            for s, v in d.items():
                per_step.setdefault(s, []).append(v)
        B, N = self.config.batch_size, self.config.replicas
        every = max(1, int(self.config.metrics_every or 1))
        for h in self.history:
            if h["step"] < first_step or h["step"] % every:
                continue
            rec: dict[str, Any] = {"step": h["step"], "epoch": seg[-1][0]}
            vs = per_step.get(h["step"])
            if vs:
                rec["loss"] = sum(v[0] for v in vs) / len(vs)
                rec["accuracy"] = sum(v[1] for v in vs) / sum(v[2] for v in vs)
                rec["samples_per_s"] = B * N / h["seconds"] if h["seconds"] > 0 else None
            rec.update({c: h[c] for c in ("compute", "channel", "reduce")})
            self.log.write(rec)
            if "loss" in rec:
                self.last_train = rec

    # -- public --------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Pipelined forward over the test set; loss/accuracy on every rank."""
        loss_sum, correct, n = self.worker.evaluate()
        _wait_all(self.pycomm, self.config.timeout)
        from mpi4py import MPI

        tot = np.array([loss_sum, correct, n], dtype=np.float64)   # counts exact below 2^53
        self.pycomm.Allreduce(MPI.IN_PLACE, tot, op=MPI.SUM)
        n = max(1, int(tot[2]))
        return {"test_loss": float(tot[0]) / n, "test_accuracy": float(tot[1]) / n}

    def fit(self) -> dict[str, Any]:
        cfg, w = self.config, self.worker
        self._resume()
        if self.rank == 0 and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.json")
        segs = skip_done(segments(self.setup, self.start_epoch), self.start_batch)
        K = cfg.stages
        total_steps = sum(len(s) if cfg.schedule == "sync" else
                          len(fdg_plan(K, len(s), cfg.overlap)) for s in segs)
        if self.rank == 0 and cfg.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc=f"dpsgs {cfg.schedule} K={K} "
                             f"N={cfg.replicas}", unit="step", dynamic_ncols=True)
        self.last_train: dict[str, Any] = {}
        t0 = time.perf_counter()
        self._last_time = t0
        iterations = 0
        test: dict[str, float] = {}
        for i, seg in enumerate(segs):
            first = self.global_step
            if cfg.schedule == "fdg":
                plan = fdg_plan(K, len(seg), cfg.overlap)
                w.run_fdg(plan, seg, first, self._on_step)
                self.global_step += len(plan)
            else:
                w.run_sync(seg, first, self._on_step)
                self.global_step += len(seg)
            iterations += len(seg)
            self._drain_feed(len(seg))
            self._segment_metrics(seg, first)
            epoch = seg[-1][0]
            epoch_done = seg[-1][1] == self.setup.batches_per_epoch - 1
            is_final = i == len(segs) - 1
            if self.control.stop_signal and (self.control.cut or not is_final):
                if cfg.run_dir:   # preempted: the segment was cut and flushed; save, stop
                    save_preempted(self, seg, iterations)
                break
            if is_final or (epoch_done and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                test = self.evaluate()
                rec = {"step": self.global_step - 1, "epoch": epoch, **test}
                self.evals.append(rec)
                self.log.write(rec)
                if self._bar is not None:
                    self._bar.set_postfix(loss=f"{self.last_train.get('loss', float('nan')):.4f}",
                                          test_acc=f"{test['test_accuracy']:.3f}")
            if cfg.run_dir and (is_final or (epoch_done and cfg.checkpoint_every
                                             and (epoch + 1) % cfg.checkpoint_every == 0)):
                self._checkpoint(seg, iterations)
        seconds = time.perf_counter() - t0
        if self._bar is not None:
            self._bar.close()
        summary = self._summary(seconds, iterations, test)
        if self.rank == 0 and self.run_dir is not None:
            (self.run_dir / "summary.json").write_text(
                json.dumps(summary, indent=2, default=str) + "\n")
        self.close()
        return summary

    def _summary(self, seconds: float, iterations: int, test: dict[str, float]) -> dict:
        w, cfg = self.worker, self.config
        from dpsgs.pipeline.reference import observed_staleness

        mine = {"stage": self.stage, "replica": self.replica,
                "staleness": observed_staleness(w.staleness).get(self.stage, []),
                "stash_peak_bytes": w.compute.peak_stash_bytes,
                "params": sum(p.numel() for p in w.compute.params)}
        bounded = self.control.bounded(self.pycomm, "run summary")
        everyone = bounded.allgather(mine)
        per_stage = [next(m for m in everyone if m["stage"] == k and m["replica"] == 0)
                     for k in range(cfg.stages)]
        samples = iterations * cfg.batch_size * cfg.replicas
        last = bounded.bcast(getattr(self, "last_train", {}), root=0)
        return {"mode": "mpi", "schedule": cfg.schedule, "stages": cfg.stages,
                "replicas": cfg.replicas,
                "steps": self.global_step - self.start_step,   # this process's, like iterations
                "iterations": iterations,
                "seconds": seconds, "samples_per_s": samples / seconds if seconds else 0.0,
                "final_train_loss": last.get("loss"),
                "staleness": {m["stage"]: m["staleness"] for m in per_stage},
                "stash_peak_bytes": [m["stash_peak_bytes"] for m in per_stage],
                "stage_params": [m["params"] for m in per_stage],
                "split": self.setup.split, "run_dir": cfg.run_dir, **test}

    def _checkpoint(self, seg: list[tuple[int, int]], iterations: int,
                    preempted: bool = False) -> Path:
        """Collective: checkpoint the position after (flushed) segment `seg`; the folder.

        An epoch's end is tagged `epoch{E}`; a stop inside epoch E before batch B gets a tag
        of its own (`e{E}b{B}`, `preempt-e{E}b{B}` for a signal), so saving it never
        un-commits the epoch checkpoint. The state records the next batch; `skip_done`
        resumes there."""
        from dpsgs.job.checkpoint import save_checkpoint

        cfg = self.config
        epoch, batch = next_position(seg, self.setup.batches_per_epoch)
        done = self.start_iterations + iterations   # manifests count from the run's start
        meta = {"model": cfg.model, "epoch": epoch, "batch": batch, "step": done,
                "schedule": cfg.schedule, "dtype": cfg.dtype, "split": self.setup.split}
        if preempted:
            meta["preempted"] = True
            tag = f"preempt-e{epoch}b{batch}"
        else:
            tag = f"epoch{epoch}" if batch == 0 else f"e{epoch}b{batch}"
        state = {**self.worker.state(), "epoch": epoch, "batch": batch, "iterations": done,
                 "global_step": self.global_step}
        return save_checkpoint(cfg.run_dir, tag, self.grid, self.rank, state, meta,
                               self.control.bounded(self.pycomm, f"checkpoint {tag}"))

    def _resume(self) -> None:
        from dpsgs.job.checkpoint import load_checkpoint

        path = self.resume_from
        if path is None:
            return
        state = load_checkpoint(path, self.grid, self.stage,
                                {"model": self.config.model, "split": self.setup.split})
        self.worker.load_state(state)
        self.start_epoch = int(state["epoch"])
        self.start_batch = int(state.get("batch", 0))
        self.start_iterations = int(state.get("iterations", 0))
        # metrics continue the resumed run's step numbers (older checkpoints: from 0)
        self.start_step = self.global_step = int(state.get("global_step", 0))
        if self.rank == 0:
            print(f"dpsgs: resumed from {path} at epoch {self.start_epoch}", file=sys.stderr)

    def close(self) -> None:
        self.control.close()
        self.timeline.close()
        self.log.close()
        self.rank_log.close()


def _raised_everywhere(e: BaseException) -> bool:
    """Errors every rank raises at the same point (agreed by a vote or a collective)."""
    from dpsgs.job.checkpoint import CheckpointError
    from dpsgs.reliability.guards import NonFiniteError

    return isinstance(e, (NonFiniteError, CheckpointError))


def train(config: Any, comm: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Train per `config` on `comm` (any mpi4py communicator; default COMM_WORLD) and return
    the summary on every rank. A wrong world size raises ValueError on every rank; any other
    failure is reported with rank/replica/stage and aborts the job (no rank is left waiting)."""
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    Grid(config.stages, config.replicas).check_world(comm.Get_size())
    trainer = None
    try:
        trainer = Trainer(config, comm, **kwargs)
        return trainer.fit()
    except Exception as e:
        rank = comm.Get_rank()
        replica, stage = divmod(rank, config.stages)
        print(f"dpsgs: rank {rank} (replica {replica}, stage {stage}) failed: "
              f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        if comm.Get_size() > 1 and _raised_everywhere(e):
            # every rank raises this one together (after a vote): let each print its own
            # message before the first abort ends the job (bounded: never a hang)
            try:
                _wait_all(comm, 10.0)
            except Exception:
                pass
        if comm.Get_size() > 1:
            abort_job(1)
        raise

