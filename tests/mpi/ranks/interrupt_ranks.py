"""Rank program (2 ranks): rank 1 stays alive but never answers; rank 0 waits (recv, or an
all-reduce) with a 30 s deadline and gets SIGINT after 1 s. The wait must end with
KeyboardInterrupt at once, not at its deadline (mpirun interrupts every rank, and the
others, already out, end the job before this one could say anything)."""

import os
import signal
import sys
import threading
import time

import numpy as np
from mpi4py import MPI

from dpsgs import _C

OP = sys.argv[1]                 # "recv" | "allreduce"
comm = _C.Communicator(MPI.COMM_WORLD, timeout=30.0, warn_after=20.0)
if comm.rank == 1:
    time.sleep(30)
    sys.exit(0)
threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
t0 = time.monotonic()
try:
    if OP == "recv":
        _C.Channel(comm, 1, 3, False, "act s0<-s1").recv([(2, (10,))])
    else:
        _C.Reducer(comm, "ring").allreduce(np.ones(1 << 20, np.float32)).wait()
    print("rank 0: the wait returned?!", flush=True)
except KeyboardInterrupt:
    print(f"rank 0: KeyboardInterrupt after {time.monotonic() - t0:.1f} s", flush=True)
comm.abort(3, "interrupted")
