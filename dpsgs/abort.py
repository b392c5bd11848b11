"""End the whole MPI job after one rank's error, without losing that rank's last words.

`MPI_Abort` tears the job down at once: output a rank wrote just before, still sitting in
the pipe to mpirun's proxy, is lost (seen in the fault matrix and in CI: the message that
named the dead peer vanished). So `abort_job` flushes, waits until mpirun's proxy has read
every byte of this rank's stdout/stderr pipes (Linux FIONREAD), gives it a moment to forward
them, and only then aborts. Bounded: a proxy that never reads costs at most `drain_s`.
"""

from __future__ import annotations

import array
import fcntl
import os
import stat
import sys
import termios
import time
from typing import NoReturn

__all__ = ["abort_job", "wait_for_output_drain"]

_FORWARD_GRACE_S = 0.2      # proxy read -> mpirun wrote it: one event-loop turn, generously


def _unread_bytes(fd: int) -> int:
    """Bytes written to pipe `fd` that its reader has not taken yet (0 if not a pipe)."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return 0
        n = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, n, True)
        return n[0]
    except OSError:
        return 0


def wait_for_output_drain(drain_s: float = 2.0) -> None:
    """Flush Python's stdout/stderr, then wait (up to `drain_s`) until their pipes are empty."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + drain_s
    while any(_unread_bytes(fd) for fd in (1, 2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(_FORWARD_GRACE_S)


def abort_job(code: int = 1, drain_s: float = 2.0) -> NoReturn:
    """Abort MPI_COMM_WORLD after this rank's output has reached mpirun.

    COMM_WORLD, not a duplicate: under `mpirun -disable-auto-cleanup` MPICH's MPI_Abort on
    any other communicator ends only its members, and peers outside it would wait forever
    (docs/reliability.md)."""
    from mpi4py import MPI

    wait_for_output_drain(drain_s)
    MPI.COMM_WORLD.Abort(code)
    os._exit(code)      # MPI_Abort does not return; if it ever did, still end this rank
