"""DpsgsWork: the torch Work of one backend call, over the core's OpWorks.

One torch call may be several core operations (a list of tensors, one per dtype of a
coalesced call) and may need a step after the data has arrived (copy a staged result back,
divide for AVG): `finish`, run exactly once, by whichever sees the end first — wait(),
is_completed(), or the future's completion callback.

- wait(timeout=None) waits in C++ with the GIL released. Without a timeout it honours the
  group's (the engine's deadline fires first and its CommTimeout names the operation and
  the missing peer); with one, it raises CommTimeout after it. A failed operation raises
  its own error (CommError, CommTimeout, ValueError).
- get_future() is made on first use (DDP uses it; torch's pipelining does not): the core
  then calls back on its completion thread, which takes the GIL and completes the Future
  with `result` — no thread per operation and no polling in Python.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.futures import Future

__all__ = ["DpsgsWork"]


class DpsgsWork(dist._Work):
    """Work over the core operations `core` (dpsgs._C.OpWork); the future's value is `result`."""

    def __init__(self, core: Sequence[Any], result: Any = None,
                 finish: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._core = list(core)
        self._result = result
        self._finish = finish
        self._lock = threading.Lock()
        self._finish_lock = threading.Lock()
        self._finished = False
        self._future: Future | None = None
        self._pending = len(self._core)
        self._error: BaseException | None = None

    def wait(self, timeout: timedelta | None = None) -> bool:
        seconds = None if timeout is None or timeout.total_seconds() <= 0 else timeout.total_seconds()
        for w in self._core:
            w.wait(seconds)
        self._run_finish()
        return True

    def is_completed(self) -> bool:
        if not all(w.is_completed() for w in self._core):   # a failure raises here
            return False
        self._run_finish()
        return True

    def is_success(self) -> bool:
        try:
            return self.is_completed()
        except Exception:   # noqa: BLE001 (is_success reports failure as False, as torch's)
            return False

    def exception(self) -> BaseException | None:
        try:
            self.is_completed()
        except Exception as e:  # noqa: BLE001
            return e
        return None

    def result(self) -> Any:
        return self._result

    def get_future(self) -> Future:
        with self._lock:
            if self._future is not None:
                return self._future
            self._future = Future()
            if not self._core:
                self._pending = 0
        if not self._core:
            self._complete_future(None)
        for w in self._core:
            w.on_complete(self._one_ended)
        return self._future

    def _one_ended(self, error: BaseException | None) -> None:
        """The core's completion thread (GIL held), once per core operation."""
        with self._lock:
            if error is not None and self._error is None:
                self._error = error
            self._pending -= 1
            last = self._pending == 0
        if last:
            self._complete_future(self._error)

    def _complete_future(self, error: BaseException | None) -> None:
        assert self._future is not None
        if error is None:
            try:
                self._run_finish()
            except Exception as e:  # noqa: BLE001 (the future carries it to its waiter)
                error = e
        if error is not None:
            self._future.set_exception(error)
        else:
            self._future.set_result(self._result)

    def _run_finish(self) -> None:
        if self._finish is None:   # none, or it has run (it is dropped only after running)
            self._finished = True
            return
        # Held while `finish` runs, so nobody returns from wait() before the copy-back ends.
        with self._finish_lock:
            if self._finished:
                return
            try:
                if self._finish is not None:
                    with torch.no_grad():
                        self._finish()
            finally:
                self._finished = True
                self._finish = None

    def __repr__(self) -> str:
        what = "; ".join(w.description for w in self._core) or "nothing to do"
        return f"<DpsgsWork {what}>"
