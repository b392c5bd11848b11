"""ProgressReporter: a training job's per-step record — the rank's metrics line, rank 0's
progress bar and the job's metrics line per step.

As step hooks it sees each loss and each step's end. Every rank writes its own timings as it
goes (RUN_DIR/metrics.rank{R}.jsonl). Every last stage sends rank 0 one tiny message per step
(its loss, or None); rank 0 writes a step's line (RUN_DIR/metrics.jsonl: the replicas' mean
loss and accuracy, samples/s, time by category) as soon as it has its own timing of that
step and the N messages, and feeds the bar the newest loss. Nothing is kept per step beyond
the few steps the ranks are apart, so memory stays flat over any number of steps.
"""

from __future__ import annotations

import time
from typing import Any

from dpsgs.comm.grid import Grid
from dpsgs.comm.waits import wait_for
from dpsgs.config import TrainConfig
from dpsgs.job.metrics import MetricsLog, Timeline
from dpsgs.pipeline.hooks import StepHooks

__all__ = ["ProgressReporter", "start_line"]

_LOSS_TAG = 901
Record = tuple[float, int, int, int]      # loss, correct, samples, global batch


def start_line(config: TrainConfig, ran: dict[str, Any], device: Any, simulate: bool = False) -> str:
    """A run's first line: what trains on what, on which grid and device (and, for --device
    auto, why that device). `ran` has the model and dataset names, `device` is the job's
    DeviceDecision."""
    K, N = config.stages, config.replicas
    ranks = f"{K * N} virtual ranks in this process" if simulate else f"{K * N} ranks"
    why = f" (--device auto: {device.why})" if device.why else ""
    return (f"dpsgs{' --simulate' if simulate else ''}: model {ran['model']}, dataset "
            f"{ran['dataset']}, grid K×N = {K}×{N} ({ranks}), {config.schedule} schedule, "
            f"device {device.device}{why}")


class ProgressReporter(StepHooks):
    """One rank's per-step reporting (see the module docstring)."""

    def __init__(self, config: TrainConfig, grid: Grid, pycomm: Any, rank: int, timeline: Timeline,
                 job_log: MetricsLog, rank_log: MetricsLog, batches_per_epoch: int = 0) -> None:
        self.batches_per_epoch = batches_per_epoch   # a line's epoch is its batch's
        self.config, self.grid, self.pycomm, self.rank = config, grid, pycomm, rank
        self.replica, self.stage = grid.coords(rank)
        self.timeline, self.job_log, self.rank_log = timeline, job_log, rank_log
        self.every = max(1, int(config.metrics_every or 1))
        self.stash_bytes = lambda: 0          # set by the trainer once the executor exists
        self.is_last = self.stage == config.stages - 1
        self._senders = [grid.rank(r, config.stages - 1) for r in range(config.replicas)]
        self._bar: Any = None
        self._last_time = time.perf_counter()
        self._loss: Record | None = None     # this step's loss (last stage)
        self._sends: list[Any] = []
        self._steps: dict[int, dict[str, Any]] = {}      # rank 0: its timing, steps not written yet
        self._losses: dict[int, list[Record | None]] = {}  # rank 0: the last stages' messages
        self.epoch = 0                        # of the segment running (set by the trainer)
        self.last_train: dict[str, Any] = {}
        self.staleness_seen: set[int] = set()     # every staleness this stage's updates had

    def begin_segment(self) -> None:
        """A segment's first step is timed from here: what ran between segments (evaluation,
        a checkpoint) is no step's time."""
        self._last_time = time.perf_counter()
        self.timeline.step_totals(reset=True)

    def start(self, total_steps: int) -> None:
        self._last_time = time.perf_counter()
        if self.rank == 0 and self.config.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc=f"dpsgs {self.config.schedule} "
                             f"K={self.config.stages} N={self.config.replicas}", unit="step",
                             dynamic_ncols=True)

    # -- step hooks ------------------------------------------------------------------------
    def loss(self, step: int, batch: int, loss: float, correct: int, count: int) -> None:
        self._loss = (loss, correct, count, batch)

    def updated(self, stage: int, batch: int, staleness: int) -> None:
        self.staleness_seen.add(staleness)

    def step_done(self, step: int) -> bool:
        now = time.perf_counter()
        dt, self._last_time = now - self._last_time, now
        totals = self.timeline.step_totals()
        rec, self._loss = self._loss, None
        if step % self.every == 0:
            self.rank_log.write({"step": step, "rank": self.rank, "replica": self.replica,
                                 "stage": self.stage, "seconds": dt, **totals,
                                 "stash_bytes": self.stash_bytes(),
                                 **({"loss": rec[0]} if rec else {})})
        if self.is_last:   # tiny and non-blocking; rank 0 matches them by step
            self._sends = [r for r in self._sends if not r.Test()]
            self._sends.append(self.pycomm.isend((step, rec), dest=0, tag=_LOSS_TAG))
        if self.rank == 0:
            self._steps[step] = {"seconds": dt, **totals}
            self._receive()
            self._write_complete()
            if self._bar is not None:
                self._bar.update(1)
        return False

    # -- rank 0: merging the last stages' messages ----------------------------------------
    def _receive(self) -> bool:
        got = False
        for src in self._senders:
            while self.pycomm.iprobe(source=src, tag=_LOSS_TAG):
                step, rec = self.pycomm.recv(source=src, tag=_LOSS_TAG)
                self._losses.setdefault(step, []).append(rec)
                got = True
        return got

    def _write_complete(self) -> None:
        B, N = self.config.batch_size, self.config.replicas
        for step in sorted(self._steps):
            recs = self._losses.get(step, [])
            if len(recs) < N:
                break                      # lines go out in step order
            own = self._steps.pop(step)
            del self._losses[step]
            done = [r for r in recs if r is not None]
            epoch = done[0][3] // self.batches_per_epoch if done and self.batches_per_epoch else self.epoch
            line: dict[str, Any] = {"step": step, "epoch": epoch}
            if done:
                line["loss"] = sum(r[0] for r in done) / len(done)
                line["accuracy"] = sum(r[1] for r in done) / sum(r[2] for r in done)
                line["samples_per_s"] = B * N / own["seconds"] if own["seconds"] > 0 else None
                self.last_train = line
                if self._bar is not None:
                    self._bar.set_postfix(loss=f"{line['loss']:.4f}", acc=f"{line['accuracy']:.3f}",
                                          refresh=False)
            line.update({c: own[c] for c in ("compute", "channel", "reduce")})
            if step % self.every == 0:
                self.job_log.write(line)

    def end_segment(self) -> None:
        """The last stages' sends complete; rank 0 receives every message of the segment and
        writes its lines (bounded by the job's timeout: a dead last stage is named)."""
        for r in self._sends:
            wait_for(r.Test, self.config.timeout, f"{self.grid.label(self.rank)}: metrics message to rank 0")
        self._sends = []
        if self.rank == 0:
            def done() -> bool:
                self._receive()
                self._write_complete()
                return not self._steps

            missing = lambda: ", ".join(self.grid.label(s) for s in self._senders)  # noqa: E731
            wait_for(done, self.config.timeout,
                     f"{self.grid.label(0)}: per-step metrics of the last stages ({missing()})")

    def evaluated(self, test: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{self.last_train.get('loss', float('nan')):.4f}",
                                  test_acc=f"{test['test_accuracy']:.3f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
