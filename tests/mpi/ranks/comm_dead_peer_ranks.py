"""Rank program (2 ranks): rank 1 exits early; rank 0's wait (recv, or all-reduce) fails with a
CommTimeout naming rank 1 within the deadline, and rank 0 then aborts the whole job."""

import os
import sys
import time

import numpy as np
from mpi4py import MPI

from dpsgs import _C

OP = sys.argv[1]                 # "recv" | "allreduce" | "allreduce-small" (blocking path)
TIMEOUT = float(sys.argv[2])
comm = _C.Communicator(MPI.COMM_WORLD, timeout=TIMEOUT, warn_after=TIMEOUT / 3)
if comm.rank == 1:
    print("rank 1: exiting early", flush=True)
    if os.environ.get("DEAD_HOW") == "kill":
        os._exit(0)
    elif os.environ.get("DEAD_HOW") == "hang":
        time.sleep(60)
    sys.exit(0)
t0 = time.monotonic()
try:
    if OP == "recv":
        ch = _C.Channel(comm, 1, 3, False, "act s0<-s1")
        ch.recv([(2, (10,))])
    elif OP == "allreduce":
        _C.Reducer(comm, "ring").allreduce(np.ones(1 << 20, np.float32)).wait()
    else:   # a blocking MPI_Allreduce: MPI cannot time out, the watchdog aborts the job
        reducer = _C.Reducer(comm, "auto", blocking_below_bytes=1024)
        assert reducer.blocks_for(64), "64 bytes should take the blocking path"
        reducer.allreduce(np.ones(16, np.float32))
except _C.CommTimeout as e:
    took = time.monotonic() - t0
    print(f"rank 0: CommTimeout after {took:.1f}s: {e}", flush=True)
    assert isinstance(e, TimeoutError) and isinstance(e, _C.CommError)
    assert "rank 1" in str(e), e
    assert took < TIMEOUT + 2, took
    comm.abort(3, f"giving up: {e}")
print("rank 0: no timeout?!", flush=True)
