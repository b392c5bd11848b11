"""Rank program (2-3 ranks): the last rank stops itself (SIGSTOP) before an operation; every
other rank's wait must raise CommTimeout at the group's timeout naming the stopped rank.
argv[1]: allreduce (MPI's), ring (the core's ring, 8 MiB), recv (a tagged recv from the
stopped rank), future (DDP's path: the Work's future carries the error), busy (the last rank
does not stop but sleeps in Python: alive, in no collective).
Each waiting rank writes `CAUGHT <seconds> <error type> <message>` to $RESULT_DIR/rank<r>.txt
(two ranks' prints can share a line of mpirun's output) and aborts the job with code 3:
MPI_Abort, not an exit without MPI_Finalize, because hydra then sometimes kills no one and
mpirun waits for the stopped rank forever (seen in CI: dpsgs.job.process._finalize)."""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import dpsgs.distributed  # noqa: F401
from dpsgs.comm.abort import abort_job
from dpsgs.comm.errors import CommTimeout

TIMEOUT = float(os.environ.get("STOP_TEST_TIMEOUT", "4"))
kind = sys.argv[1]
dist.init_process_group("dpsgs", init_method="mpi://", timeout=timedelta(seconds=TIMEOUT))
r, n = dist.get_rank(), dist.get_world_size()
dist.barrier()
if r == n - 1:
    if kind == "busy":   # alive, its engine answers probes, but it never joins
        time.sleep(TIMEOUT * 4)
        sys.exit(0)
    os.kill(os.getpid(), signal.SIGSTOP)   # the stopped peer: never answers
t0 = time.monotonic()
try:
    if kind == "recv":
        if r == 0:
            dist.recv(torch.empty(10), src=n - 1, tag=4)
        else:   # the middle rank waits in a collective with rank 0 ... that rank 0 never joins:
            time.sleep(TIMEOUT * 3)   # (stays out of the way; rank 0's line is the one checked)
            sys.exit(0)
    elif kind == "future":
        fut = dist.all_reduce(torch.ones(100), async_op=True).get_future()
        fut.wait()
    else:
        dist.all_reduce(torch.ones(2 * 1024 * 1024 if kind == "ring" else 100))
    result = f"NO ERROR after {time.monotonic() - t0:.1f} s"
except CommTimeout as e:
    result = f"CAUGHT {time.monotonic() - t0:.2f} CommTimeout {e}"
except Exception as e:   # noqa: BLE001 (the future's path must still carry the core's error)
    result = f"CAUGHT {time.monotonic() - t0:.2f} {type(e).__name__} {e}"
print(result, flush=True)
with open(os.path.join(os.environ.get("RESULT_DIR", "."), f"rank{r}.txt"), "w") as f:
    f.write(result + "\n")
abort_job(3)   # no teardown: the stopped peer would hold it up
