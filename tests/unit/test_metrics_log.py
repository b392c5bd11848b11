"""MetricsLog writes off the caller's thread: a blocked file never holds a step, and what goes
wrong (a full disk, a frozen one, a queue that fills) is one line naming the file (issue 20,
items 8 and 9)."""

from __future__ import annotations

import io
import os
import re
import threading
import time
from pathlib import Path

import pytest

from dpsgs.job.metrics_log import MetricsLog, read_metrics


class _FrozenFile(io.StringIO):
    """A file whose writes block until `thaw` is set: a frozen file system."""

    def __init__(self) -> None:
        super().__init__()
        self.thaw = threading.Event()
        self.entered = threading.Event()

    def write(self, s: str) -> int:
        self.entered.set()
        self.thaw.wait()
        return super().write(s)


def test_a_write_returns_at_once_while_the_file_is_frozen(tmp_path: Path) -> None:
    frozen = _FrozenFile()
    log = MetricsLog(tmp_path / "m.jsonl", timeout=0.5, open_file=lambda p: frozen)
    start = time.monotonic()
    for step in range(100):
        log.write({"step": step, "loss": 1.0})
    assert time.monotonic() - start < 0.4        # no step waited for the file (it is blocked)
    assert frozen.entered.wait(5) and log.failure is None
    time.sleep(0.7)
    assert re.fullmatch(re.escape(f"metrics file {tmp_path / 'm.jsonl'} cannot be written: a write "
                                  "has not returned for ") + r"\d+" + re.escape(
        " s (--timeout 0.5): its file system is frozen or far too slow"), log.failure or ""), log.failure
    log.write({"step": 100})
    assert log.dropped == 1
    t0 = time.monotonic()
    log.close()                                   # a failed writer is not waited for
    assert time.monotonic() - t0 < 0.2
    frozen.thaw.set()


def test_a_full_disk_is_one_line_naming_the_file() -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("needs Linux's /dev/full")
    log = MetricsLog("/dev/full", timeout=5.0)
    log.write({"step": 0})
    assert log.flush() == "metrics file /dev/full cannot be written: [Errno 28] No space left on device"
    log.close()
    with pytest.raises(OSError, match=r"^metrics file /dev/full cannot be written: \[Errno 28\]"):
        with MetricsLog("/dev/full") as log:     # a synchronous writer (--simulate) gets the error
            log.write({"step": 0})


def test_a_queue_that_fills_is_a_failure_not_a_wait(tmp_path: Path) -> None:
    frozen = _FrozenFile()
    log = MetricsLog(tmp_path / "m.jsonl", timeout=60.0, max_pending=4, open_file=lambda p: frozen)
    for step in range(10):
        log.write({"step": step})
    assert "4 lines wait to be written" in (log.failure or "")
    frozen.thaw.set()
    log.close()


def test_lines_arrive_in_order_and_a_deferred_log_touches_nothing_until_opened(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n')
    log = MetricsLog(path, keep_below=1, deferred=True)
    assert path.read_text().count("\n") == 3      # not yet rewritten
    log.open()
    for step in range(1, 500):
        log.write({"step": step, "x": float("nan")})
    assert log.flush() is None
    log.close()
    records = read_metrics(path)
    assert [r["step"] for r in records] == list(range(500)) and records[1]["x"] == "nan"
