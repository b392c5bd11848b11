"""Preemption: SIGTERM/SIGUSR1 set a flag; the trainer stops at the next agreed step boundary.

Batch systems send SIGTERM (or a chosen signal such as SIGUSR1) some time before the
walltime; hydra's mpirun forwards both to every rank. The handler does nothing but record
the signal: no MPI, no I/O, no allocation, because it runs between two arbitrary bytecodes
of the training loop (possibly inside a communication call). The ranks then agree on it in
the step-boundary vote (dpsgs.reliability.votes), flush the pipeline, write a checkpoint and exit 0;
`--resume auto` continues from that checkpoint. A rank that is stopped or stuck never comes
to that vote: dpsgs.reliability.stop_deadline then ends the job within the grace.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

__all__ = ["DEFAULT_SIGNALS", "PreemptionHandler", "install_early", "installed_handler", "signal_name"]

DEFAULT_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class PreemptionHandler:
    """Installs handlers for `signals` on the main thread; `signum` is the first one received
    (0 = none). `uninstall` restores the previous handlers. Use as a context manager."""

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.signum = 0
        self.received_at = 0.0      # time.monotonic() of the first signal (the stop's grace)
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.signum:         # keep the first: a second SIGTERM must not re-trigger
            self.received_at = time.monotonic()
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def install(self) -> "PreemptionHandler":
        # signal.signal works only on the main thread; an embedding that trains in another
        # thread gets no handler (and no preemption) rather than an error.
        if threading.current_thread() is not threading.main_thread():
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


_early: PreemptionHandler | None = None


def install_early(signals: Sequence[int] = DEFAULT_SIGNALS) -> PreemptionHandler:
    """Install the handler at the very start of a process that owns its job (the CLI), so a
    signal during start-up takes the clean path too: the job stops at its first agreed step
    boundary. The trainer's step control takes this handler over (installed_handler)."""
    global _early
    if _early is None:
        _early = PreemptionHandler(signals).install()
    return _early


def installed_handler() -> PreemptionHandler | None:
    """The handler install_early put in place (taken: a later job installs its own)."""
    global _early
    handler, _early = _early, None
    return handler
