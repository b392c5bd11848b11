"""Per-rank timing (per-step totals by category, optional Chrome trace); the JSON-lines log
(MetricsLog, read_metrics) lives in dpsgs.job.metrics_log and is re-exported here."""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict, deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from dpsgs.comm.accelerator import Accelerator
from dpsgs.job.metrics_log import MetricsLog, jsonable as _jsonable, read_metrics
from dpsgs.pipeline.hooks import Spans

__all__ = ["CATEGORIES", "Timeline", "MetricsLog", "read_metrics", "rank_path", "merge_traces"]

# compute: forward/backward/optimizer; channel: waiting on activations/gradients;
# reduce: waiting on the gradient all-reduce. Other category names are accepted too.
CATEGORIES = ("compute", "channel", "reduce")


def rank_path(path: str | os.PathLike, rank: int) -> Path:
    """`trace.json` -> `trace.rank3.json`; a `{rank}` in the name is formatted instead."""
    p = Path(path)
    if "{rank}" in p.name:
        return p.with_name(p.name.format(rank=rank))
    return p.with_name(f"{p.stem}.rank{rank}{p.suffix or '.json'}")


class Timeline(Spans):
    """Times spans of work on one rank.

    Totals per category are always kept (two perf_counter calls per span); events are only
    recorded when `trace_path` is given, so tracing off costs almost nothing. close() writes
    a Chrome trace (open in https://ui.perfetto.dev or chrome://tracing) to
    rank_path(trace_path, rank): complete events (ph "X", µs since the Unix epoch so several
    ranks' files line up), pid = rank, one thread per category (named by "M" metadata
    events, since viewers want integer tids).

    `accel` (dpsgs.comm.accelerator) of a device that runs behind the host (CUDA, the
    simulator): a span's time is the device clock's time between two timing events recorded
    on the current stream at its start and end (the host only
    enqueues kernels, so its clock would time the launches): the kernels in between, plus
    any time the stream sat idle there. So a wait that blocks the host (a gradient
    all-reduce, a channel header) counts in full while the stream has nothing queued, and
    only past the queued kernels otherwise: the time it cost the GPU. Events are read
    without stalling the host: step_totals() adds the spans whose events have completed
    (so a step's totals may hold an earlier step's spans; sums over many steps are exact),
    and waits only when more than a few steps are pending. In the trace, "ts" is when the
    host issued a span, "dur" its GPU time.
    """

    _MAX_PENDING = 256     # spans waiting for their events before step_totals waits

    def __init__(self, rank: int, trace_path: str | os.PathLike | None = None,
                 max_events: int = 500_000, accel: Accelerator | None = None) -> None:
        self.rank, self.max_events, self.dropped = rank, max_events, 0
        # spans of a synchronous device (the CPU) are timed by the host clock alone
        self._device = accel if accel is not None and accel.asynchronous else None
        self._pending: deque[tuple[str, str, float, Any, Any, dict[str, Any]]] = deque()
        self.trace_path = rank_path(trace_path, rank) if trace_path else None
        self._totals: dict[str, float] = defaultdict(float)
        self._events: list[dict[str, Any]] | None = [] if self.trace_path else None
        self._tids: dict[str, int] = {c: i for i, c in enumerate(CATEGORIES)}
        # wall-clock origin read once; spans use the monotonic perf_counter
        self._epoch_us = time.time() * 1e6 - time.perf_counter() * 1e6

    @contextmanager
    def span(self, name: str, category: str, **args: Any) -> Iterator[None]:
        start = time.perf_counter()
        begin = self._event() if self._device is not None else None
        try:
            yield
        finally:
            if self._device is not None:
                self._pending.append((name, category, start, begin, self._event(), args))
            else:
                end = time.perf_counter()
                self._totals[category] += end - start
                if self._events is not None:
                    self._record(name, category, start, end, args)

    def _resolve(self) -> None:
        """Account the GPU spans whose events completed (all of them past a backlog)."""
        while self._pending:
            name, category, start, begin, end, args = self._pending[0]
            if len(self._pending) <= self._MAX_PENDING and not end.query():
                return
            end.synchronize()
            self._pending.popleft()
            seconds = begin.elapsed(end)
            self._totals[category] += seconds
            if self._events is not None:
                self._record(name, category, start, start + seconds, args)

    def _event(self) -> Any:
        """A timing event of the device, recorded on the current stream now."""
        event = self._device.event(timing=True)  # type: ignore[union-attr]
        event.record()
        return event

    def add(self, name: str, category: str, seconds: float, **args: Any) -> None:
        """Account `seconds` that ended now (for time measured elsewhere, e.g. in C++)."""
        end = time.perf_counter()
        self._totals[category] += seconds
        if self._events is not None:
            self._record(name, category, end - seconds, end, args)

    def _record(self, name: str, category: str, start: float, end: float,
                args: dict[str, Any]) -> None:
        if len(self._events) >= self.max_events:  # type: ignore[arg-type]
            self.dropped += 1
            return
        tid = self._tids.setdefault(category, len(self._tids))
        event = {"name": name, "cat": category, "ph": "X", "pid": self.rank, "tid": tid,
                 "ts": round(self._epoch_us + start * 1e6, 3),
                 "dur": round((end - start) * 1e6, 3)}
        if args:
            event["args"] = {k: _jsonable(v) for k, v in args.items()}
        self._events.append(event)  # type: ignore[union-attr]

    def step_totals(self, reset: bool = True) -> dict[str, float]:
        """Seconds per category since the last reset (every CATEGORIES key present)."""
        if self._device is not None:
            self._resolve()
        totals = {c: 0.0 for c in CATEGORIES}
        totals.update(self._totals)
        if reset:
            self._totals.clear()
        return totals

    def close(self) -> None:
        if self._device is not None:
            self._MAX_PENDING = 0
            self._resolve()
        if self._events is None or self.trace_path is None:
            return
        meta = [{"name": "process_name", "ph": "M", "pid": self.rank, "tid": 0,
                 "args": {"name": f"rank {self.rank}"}},
                {"name": "process_sort_index", "ph": "M", "pid": self.rank, "tid": 0,
                 "args": {"sort_index": self.rank}}]
        meta += [{"name": "thread_name", "ph": "M", "pid": self.rank, "tid": tid,
                  "args": {"name": cat}} for cat, tid in self._tids.items()]
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)
        trace: dict[str, Any] = {"traceEvents": meta + self._events, "displayTimeUnit": "ms"}
        if self.dropped:
            trace["otherData"] = {"dropped_spans": self.dropped, "max_events": self.max_events}
        with open(self.trace_path, "w") as f:
            json.dump(trace, f)
        self._events = []


def merge_traces(paths: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Concatenate per-rank Chrome traces into one file (one process row per rank)."""
    events: list[dict[str, Any]] = []
    for p in paths:
        with open(p) as f:
            events += json.load(f)["traceEvents"]
    out = Path(out)
    out.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return out
