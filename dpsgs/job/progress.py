"""ProgressReporter: a training job's per-step record — the rank's metrics line, rank 0's
progress bar fed with the last stage's live loss, and the job's metrics line per step.

As step hooks it sees each loss and each step's end. Per-step data live only until the end
of their segment, when rank 0 gathers the last stages' losses and writes one metrics line
per step (RUN_DIR/metrics.jsonl); every rank writes its own timings as it goes
(RUN_DIR/metrics.rank{R}.jsonl).
"""

from __future__ import annotations

import time
from typing import Any

from dpsgs.config import TrainConfig
from dpsgs.job.metrics import MetricsLog, Timeline
from dpsgs.pipeline.hooks import StepHooks

__all__ = ["ProgressReporter"]

_LOSS_TAG = 901
Record = tuple[float, int, int]      # loss, correct, samples


class ProgressReporter(StepHooks):
    """One rank's per-step reporting (see the module docstring). `gather` is a
    deadline-checked communicator (StepControl.bounded) for the segment-end gather."""

    def __init__(self, config: TrainConfig, pycomm: Any, rank: int, replica: int, stage: int,
                 timeline: Timeline, job_log: MetricsLog, rank_log: MetricsLog) -> None:
        self.config, self.pycomm = config, pycomm
        self.rank, self.replica, self.stage = rank, replica, stage
        self.timeline, self.job_log, self.rank_log = timeline, job_log, rank_log
        self.every = max(1, int(config.metrics_every or 1))
        self.stash_bytes = lambda: 0          # set by the trainer once the executor exists
        self._bar: Any = None
        self._last_time = time.perf_counter()
        self._loss: Record | None = None     # this step's loss (last stage)
        self._step_losses: dict[int, Record] = {}   # this segment's, by step (last stage)
        self._history: list[dict[str, Any]] = []     # this segment's step times (rank 0)
        self._feed: list[Any] = []
        self._fed = 0
        self.last_train: dict[str, Any] = {}
        self.staleness_seen: set[int] = set()     # every staleness this stage's updates had

    @property
    def _feeding(self) -> bool:
        """Replica 0's last stage feeds rank 0's progress bar (when there is one, K > 1)."""
        return bool(self.config.progress) and self.config.stages > 1

    def start(self, total_steps: int) -> None:
        self._last_time = time.perf_counter()
        if self.rank == 0 and self.config.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc=f"dpsgs {self.config.schedule} "
                             f"K={self.config.stages} N={self.config.replicas}", unit="step",
                             dynamic_ncols=True)

    # -- step hooks ------------------------------------------------------------------------
    def loss(self, step: int, batch: int, loss: float, correct: int, count: int) -> None:
        self._loss = (loss, correct, count)

    def updated(self, stage: int, batch: int, staleness: int) -> None:
        self.staleness_seen.add(staleness)

    def step_done(self, step: int) -> bool:
        now = time.perf_counter()
        dt, self._last_time = now - self._last_time, now
        totals = self.timeline.step_totals()
        rec, self._loss = self._loss, None
        if rec is not None:
            self._step_losses[step] = rec
        if step % self.every == 0:
            self.rank_log.write({"step": step, "rank": self.rank, "replica": self.replica,
                                 "stage": self.stage, "seconds": dt, **totals,
                                 "stash_bytes": self.stash_bytes(),
                                 **({"loss": rec[0]} if rec else {})})
        if rec and self._feeding and self.replica == 0 and self.stage == self.config.stages - 1:
            # live loss for rank 0's progress bar (tiny, non-blocking; one per batch)
            self._feed.append(self.pycomm.isend((step, rec), dest=0, tag=_LOSS_TAG))
        if self.rank == 0:
            self._history.append({"step": step, "seconds": dt, **totals})
            if self._bar is not None:
                self._bar.update(1)
                live = rec
                while self._feeding and self.pycomm.iprobe(source=self.config.stages - 1, tag=_LOSS_TAG):
                    _, live = self.pycomm.recv(source=self.config.stages - 1, tag=_LOSS_TAG)
                    self._fed += 1
                if live:
                    self._bar.set_postfix(loss=f"{live[0]:.4f}", acc=f"{live[1] / live[2]:.3f}",
                                          refresh=False)
        return False

    # -- segment and evaluation ----------------------------------------------------------
    def end_segment(self, seg: list[tuple[int, int]], gather: Any) -> None:
        """Collective: drain the bar's feed, then rank 0 writes one line per step of the
        segment with the replicas' mean loss and accuracy."""
        self._drain_feed(len(seg))
        everyone = gather.gather(self._step_losses, root=0)
        self._step_losses = {}
        history, self._history = self._history, []
        if self.rank != 0:
            return
        per_step: dict[int, list[Record]] = {}
        for d in everyone:
            for s, v in d.items():
                per_step.setdefault(s, []).append(v)
        B, N = self.config.batch_size, self.config.replicas
        for h in history:
            if h["step"] % self.every:
                continue
            rec: dict[str, Any] = {"step": h["step"], "epoch": seg[-1][0]}
            vs = per_step.get(h["step"])
            if vs:
                rec["loss"] = sum(v[0] for v in vs) / len(vs)
                rec["accuracy"] = sum(v[1] for v in vs) / sum(v[2] for v in vs)
                rec["samples_per_s"] = B * N / h["seconds"] if h["seconds"] > 0 else None
            rec.update({c: h[c] for c in ("compute", "channel", "reduce")})
            self.job_log.write(rec)
            if "loss" in rec:
                self.last_train = rec

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

    def evaluated(self, test: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{self.last_train.get('loss', float('nan')):.4f}",
                                  test_acc=f"{test['test_accuracy']:.3f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
