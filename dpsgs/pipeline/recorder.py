"""Recorder: StepHooks that keep every loss and every update's staleness (tests, the reference).

Unbounded by design: a training job keeps bounded metrics instead (dpsgs.job.metrics).
Thread-safe, so the reference's virtual ranks can share one.
"""

from __future__ import annotations

import threading

from dpsgs.pipeline.hooks import StepHooks

__all__ = ["Recorder", "observed_staleness"]


class Recorder(StepHooks):
    """losses[(batch, replica)] = (loss, correct, count); staleness = [(stage, batch, steps)]
    (replica 0's updates); step_losses[step] = [(loss, correct, count), ...] (one per replica
    finishing a batch)."""

    def __init__(self, replica: int = 0) -> None:
        self.replica = replica
        self.losses: dict[tuple[int, int], tuple[float, int, int]] = {}
        self.staleness: list[tuple[int, int, int]] = []
        self.step_losses: dict[int, list[tuple[float, int, int]]] = {}
        self._lock = threading.Lock()

    def for_replica(self, replica: int) -> "Recorder":
        """A view recording into the same tables under another replica's key."""
        view = Recorder.__new__(Recorder)
        view.__dict__.update(self.__dict__)
        view.replica = replica
        return view

    def loss(self, step: int, batch: int, loss: float, correct: int, count: int) -> None:
        with self._lock:
            self.losses[(batch, self.replica)] = (loss, correct, count)
            self.step_losses.setdefault(step, []).append((loss, correct, count))

    def updated(self, stage: int, batch: int, staleness: int) -> None:
        if self.replica:        # every replica of a stage updates alike: keep replica 0's
            return
        with self._lock:
            self.staleness.append((stage, batch, staleness))


def observed_staleness(records: list[tuple[int, int, int]]) -> dict[int, list[int]]:
    """Per stage, the sorted set of observed staleness values."""
    out: dict[int, set[int]] = {}
    for k, _, s in records:
        out.setdefault(k, set()).add(s)
    return {k: sorted(v) for k, v in sorted(out.items())}
