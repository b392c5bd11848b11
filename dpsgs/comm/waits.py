"""Polite waits with a deadline for Python-side waits: test, yield, then short sleeps.

Ranks often share cores (4 ranks on 2 cores in tests): a waiter that spins steals the
compute of the very rank it waits for. Every Python wait on MPI requests goes through
`poll` (the C++ core has its own, csrc/common/backoff.*).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from dpsgs.comm.errors import CommTimeout

__all__ = ["poll", "wait_for", "barrier"]


def poll(done: Callable[[], bool], timeout: float, timeout_error: Callable[[float], Exception],
         stall: Callable[[float], str] | None = None, warn_after: float | None = None) -> None:
    """Call done() until it is true. After `timeout` seconds raise timeout_error(timeout);
    every `warn_after` seconds print the stall line stall(waited) (both built only then)."""
    start = time.monotonic()
    next_warn = warn_after
    spins = 0
    while not done():
        waited = time.monotonic() - start
        if waited >= timeout:
            raise timeout_error(timeout)
        if stall is not None and next_warn is not None and waited >= next_warn:
            print(stall(waited), file=sys.stderr, flush=True)
            next_warn += warn_after
        spins += 1
        # yield first (a fast peer answers within microseconds), then sleep up to 2 ms
        time.sleep(0 if spins < 20 else min(0.002, 1e-5 * (spins - 19)))


def wait_for(done: Callable[[], bool], timeout: float, what: str) -> None:
    """poll() with the transport's timeout error: CommTimeout('<what>: no progress after T s')."""
    poll(done, timeout, lambda t: CommTimeout(f"{what}: no progress after {t:.1f} s"))


def barrier(comm: Any, timeout: float, what: str = "barrier") -> None:
    """An mpi4py barrier with a deadline that sleeps instead of spinning (MPI's own Barrier,
    Dup, bcast have no timeout: a rank that never comes would block everyone forever)."""
    req = comm.Ibarrier()
    wait_for(req.Test, timeout, f"rank {comm.Get_rank()}: {what} not reached by every rank")
