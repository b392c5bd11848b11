"""An uncaught exception ends the whole MPI job (MPI_Abort), as `python -m mpi4py` does.

Under a plain `mpirun -n 2 python train.py`, a rank that dies of an uncaught exception (a
CommTimeout naming a stopped peer, say) goes on, at interpreter exit, into MPI_Finalize, and
waits there for a peer that never comes: the job hung after its own clear error. So, once the
first process group over MPI is made (the "dpsgs" backend or the mpi:// rendezvous) in a job
of more than one rank, an exit handler aborts the job when the interpreter is leaving because
of an uncaught exception (`sys.last_value`, which the interpreter sets after printing the
traceback through every excepthook: torch's prefixes the rank). `sys.exit()` is not one.
Python's exit handlers run last-registered first, so this one runs before MPI_Finalize
(mpi4py's) and before the handlers of anything made earlier.
"""

from __future__ import annotations

import atexit
import sys

__all__ = ["abort_on_uncaught"]

_installed = False


def abort_on_uncaught() -> None:
    """Abort the MPI job if this process exits on an uncaught exception (once; not on 1 rank)."""
    global _installed
    from mpi4py import MPI

    if _installed or MPI.COMM_WORLD.Get_size() < 2:
        return
    atexit.register(_abort_if_uncaught)
    _installed = True


def _abort_if_uncaught() -> None:
    if getattr(sys, "last_value", None) is None:
        return
    from dpsgs.comm.abort import abort_job

    abort_job(1)
