"""End the whole MPI job after one rank's error, without losing that rank's last words.

`MPI_Abort` tears the job down at once: output a rank wrote just before, still sitting in
the pipe to mpirun's proxy, is lost (seen in the fault matrix and in CI: the message that
named the dead peer vanished). So `abort_job` flushes Python's streams, lets the core wait
until mpirun's proxy has read every byte of this rank's stdout/stderr pipes (bounded by
`drain_s`), and only then aborts. The C++ core's own aborts drain the same way.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

__all__ = ["abort_job"]


def abort_job(code: int = 1, drain_s: float = 2.0) -> NoReturn:
    """Abort MPI_COMM_WORLD after this rank's output has reached mpirun.

    COMM_WORLD, not a duplicate: under `mpirun -disable-auto-cleanup` MPICH's MPI_Abort on
    any other communicator ends only its members, and peers outside it would wait forever
    (docs/reliability.md)."""
    from mpi4py import MPI

    from dpsgs import _C

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    _C.wait_for_output_drain(drain_s)
    MPI.COMM_WORLD.Abort(code)
    os._exit(code)      # MPI_Abort does not return; if it ever did, still end this rank
