"""Rank program: a stage changes its output shape mid-run; the receiving stage's header
check must fail with both ranks, the message number and expected vs received shape, and the
job must end (python -m mpi4py turns the error into MPI_Abort). Argument: shape | dtype."""

import sys

import numpy as np
from mpi4py import MPI

from dpsgs import _C

comm = _C.Communicator(MPI.COMM_WORLD, timeout=10.0, warn_after=5.0)
FLOAT32 = 2
if comm.rank == 0:
    ch = _C.Channel(comm, 1, 5, True, "act s0->s1")
    ch.send([np.ones(4, dtype=np.float32)]).wait()
    bad = np.ones(5, np.float32) if sys.argv[1] == "shape" else np.ones(4, np.float64)
    ch.send([bad]).wait()                             # the bug: a changed output
    comm.barrier()                                    # never passed: rank 1 aborts the job
else:
    ch = _C.Channel(comm, 0, 5, False, "act s0->s1")
    ch.recv([(FLOAT32, (4,))])
    ch.recv([(FLOAT32, (4,))])                        # raises ValueError
    comm.barrier()
