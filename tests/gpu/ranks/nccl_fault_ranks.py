"""2 ranks on the simulator: one fault hook (csrc/sim/sim_faults.h) fires on rank 0 (init_hang:
on rank 1), and the waits must end in the documented error within the deadline, naming the
operation; rank 0 then ends the job (no rank is left waiting).

    mpirun -n 2 python -m mpi4py tests/gpu/ranks/nccl_fault_ranks.py stall|async_error|init_hang TIMEOUT
"""

from __future__ import annotations

import sys
import time

from gpu_arrays import pick
from mpi4py import MPI

from dpsgs import _C
from dpsgs.comm import nccl
from dpsgs.comm.abort import abort_job

FAULT, TIMEOUT = sys.argv[1], float(sys.argv[2])


def report(rank: int, e: Exception, t0: float) -> None:
    # one write, newline included: both ranks report at the same deadline, and print()'s two
    # writes (text, then newline) from two ranks can merge into one line in mpirun's output
    sys.stdout.write(f"rank {rank}: {type(e).__name__} after {time.monotonic() - t0:.1f}s: {e}\n")
    sys.stdout.flush()


def main() -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    arr = pick()
    t0 = time.monotonic()
    if FAULT == "init_hang":
        if rank == 1:
            _C.sim.set_fault("init_hang:1")
        try:
            nccl.init(comm, timeout=TIMEOUT)
        except _C.CommError as e:      # CommTimeout is a CommError
            report(rank, e, t0)
            abort_job(3)
        print(f"rank {rank}: no error?!", flush=True)
        abort_job(4)
    world = nccl.init(comm, timeout=TIMEOUT)
    reducer = nccl.TensorReducer(world)
    world.connect()
    x = arr.pattern((1 << 12,), "float32", salt=rank)
    reducer.allreduce(x).wait()                 # a healthy one first
    if rank == 0:
        _C.sim.set_fault(f"{FAULT}:1")           # the next NCCL operation of rank 0
    t0 = time.monotonic()
    try:
        reducer.allreduce(x).wait()
    except _C.CommError as e:
        report(rank, e, t0)
        abort_job(3)
    print(f"rank {rank}: no error?!", flush=True)
    abort_job(4)


if __name__ == "__main__":
    main()
