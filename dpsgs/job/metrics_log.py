"""MetricsLog: JSON lines appended to a file by a writer thread, off the step's critical path.

A training step must never sit in the kernel writing its metrics line: on a frozen file
system every rank would, and no deadline of the job could fire. So `write` only formats the
line and appends it to a bounded queue; a thread of the log's own writes and flushes it (a
killed run keeps the lines written so far). The queue is a deque the thread polls, not a
queue.Queue: a Ctrl-C raised in the middle of a Condition's notify loses the wake-up, and the
writer (and a close that waits for it) would wait until the timeout. What goes wrong there is kept, not raised, and
`failure` says it in one line naming the file — a write that fails (a full disk), a write
that has not returned within `timeout` seconds (a frozen file system), or a queue that
fills up (a file system far slower than training) — for the job to act on at a step
boundary (dpsgs.reliability.step_control). After a failure further lines are dropped.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from dpsgs.job.atomic_file import atomic_write

__all__ = ["MetricsLog", "read_metrics", "jsonable"]

_IDLE_S = (0.001, 0.05)     # the writer's poll of an empty queue: backs off to 50 ms idle


class MetricsLog:
    """Appends one JSON object per write() to `path`; path=None makes every call a no-op
    (ranks that do not log). `keep_below`: on opening, first drop (atomically) the records
    of steps >= keep_below already in the file — a resumed run redoes those steps, and a run
    restarted from the beginning passes 0. `deferred`: touch nothing until open() (the
    trainer opens its logs only once a resume has been agreed). Seams: `open_file` opens the
    file for appending (a test's file can block); `before_write(step)` runs on the writer
    thread before each line (fault injection: dpsgs.reliability.faults)."""

    def __init__(self, path: str | os.PathLike | None, keep_below: int | None = None, *,
                 timeout: float = 300.0, max_pending: int = 65536, deferred: bool = False,
                 open_file: Callable[[Path], IO[str]] | None = None,
                 before_write: Callable[[int], None] | None = None) -> None:
        self.path = Path(path) if path else None
        self.keep_below, self.timeout = keep_below, timeout
        self._open_file = open_file or (lambda p: open(p, "a"))
        self._before_write = before_write
        self.max_pending = max_pending
        self._queue: deque[tuple[int, str]] = deque()    # append/popleft: atomic, no lock
        self._queued = self._written = 0                  # lines given / taken by the writer
        self._closing = False
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._busy_since: float | None = None      # monotonic start of the write in progress
        self.dropped = 0
        self._closed = False
        if not deferred:
            self.open()

    def open(self) -> None:
        """Prepare the file (keep_below) and start the writer; once, on the caller's thread."""
        if self.path is None or self._thread is not None or self._closed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.keep_below is not None and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if int(r.get("step", -1)) < self.keep_below]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        file = self._open_file(self.path)
        self._thread = threading.Thread(target=self._run, args=(file,), daemon=True,
                                        name=f"dpsgs metrics {self.path.name}")
        self._thread.start()

    def write(self, record: dict[str, Any]) -> None:
        """Queue one record (never blocks); after a failure, count it as dropped."""
        if self.path is None or self._closed:
            return
        if self._thread is None:
            raise RuntimeError(f"MetricsLog {self.path}: write before open()")
        if self.failure is not None:
            self.dropped += 1
            return
        if len(self._queue) >= self.max_pending:
            self._fail(f"{self.max_pending} lines wait to be written: its file system is far "
                       "slower than training, or stalls")
            self.dropped += 1
            return
        line = json.dumps({k: jsonable(v) for k, v in record.items()}) + "\n"
        self._queue.append((int(record.get("step", -1)), line))
        self._queued += 1

    @property
    def failure(self) -> str | None:
        """One line saying why lines are not being written (None while all is well)."""
        if self._error is None and self._busy_since is not None:
            stuck = time.monotonic() - self._busy_since
            if stuck > self.timeout:
                self._fail(f"a write has not returned for {stuck:.0f} s (--timeout "
                           f"{self.timeout:g}): its file system is frozen or far too slow")
        return self._error

    def flush(self, timeout: float | None = None) -> str | None:
        """Wait until every queued line is written (at most `timeout`, default the log's);
        the failure, if any."""
        if self._thread is None:
            return self.failure
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while self.failure is None and self._written < self._queued:
            if time.monotonic() > deadline:
                self._fail(f"{self._queued - self._written} lines not written within "
                           f"{self.timeout:g} s: its file system stalls")
                break
            time.sleep(_IDLE_S[0])
        return self.failure

    def close(self, wait: float | None = None) -> None:
        """Write what is queued (waiting at most `wait` seconds, default the timeout) and end
        the writer. Never raises and never waits on a writer that failed: the thread is a
        daemon, and a write stuck in the kernel must not hold the process."""
        self._closed = True
        if self._thread is None:
            return
        self._closing = True
        if self.failure is None:
            self._thread.join(self.timeout if wait is None else wait)
        self._thread = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        """A caller that writes synchronously (`with MetricsLog(...)`): lines written, or
        OSError with the failure."""
        failure = self.flush() if exc_type is None else None
        self.close()
        if failure:
            raise OSError(failure)

    # -- the writer thread -----------------------------------------------------------------
    def _fail(self, why: str) -> None:
        if self._error is None:
            self._error = f"metrics file {self.path} cannot be written: {why}"

    def _run(self, file: IO[str]) -> None:
        idle = _IDLE_S[0]
        try:
            while self._error is None:
                try:
                    step, line = self._queue.popleft()
                except IndexError:
                    if self._closing:
                        return
                    time.sleep(idle)
                    idle = min(2 * idle, _IDLE_S[1])
                    continue
                idle = _IDLE_S[0]
                self._busy_since = time.monotonic()
                try:
                    if self._before_write is not None:
                        self._before_write(step)
                    file.write(line)
                    file.flush()
                except OSError as e:
                    self._fail(f"[Errno {e.errno}] {e.strerror or e}")
                except Exception as e:  # noqa: BLE001 - kept for the job to report
                    self._fail(f"{type(e).__name__}: {e}")
                finally:
                    self._busy_since = None
                    self._written += 1
        finally:
            try:
                file.close()
            except OSError as e:        # a full disk may refuse the last buffered bytes
                self._fail(f"[Errno {e.errno}] {e.strerror or e}")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a torn last line (killed writer) is skipped."""
    records = []
    with open(path) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    return records


def jsonable(v: Any) -> Any:
    """Tensors/NumPy scalars -> Python numbers; NaN/Inf -> strings (strict JSON has neither)."""
    import math

    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        v = v.item()
    elif hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    return v
