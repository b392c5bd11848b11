"""2 ranks on the simulator: rank 0's all-reduce stalls its stream (fault hook); a Work
dropped while that operation still runs keeps its buffer alive until the operation has
finished on the stream, then lets it go (regression: the buffer was released, and poisoned by
the simulator's free, while the stream could still write it; ThreadSanitizer reported the
race, scripts/sim-checks.sh tsan).

    mpirun -n 2 python -m mpi4py tests/gpu/ranks/nccl_owner_ranks.py    # exit 3 when both say OK
"""

from __future__ import annotations

import gc
import time
import weakref

from gpu_arrays import pick
from mpi4py import MPI

from dpsgs import _C
from dpsgs.comm import nccl
from dpsgs.comm.abort import abort_job


def main() -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    arr = pick()
    world = nccl.init(comm, timeout=3.0)
    reducer = nccl.TensorReducer(world)
    world.connect()
    reducer.allreduce(arr.pattern((1 << 12,), "float32", salt=0)).wait()
    if rank == 0:
        _C.sim.set_fault("stall:1")           # the next operation holds its stream until an abort
    y = arr.pattern((1 << 12,), "float32", salt=1)
    alive = weakref.ref(y)
    stalled = reducer.allreduce(y)
    del y
    behind = reducer.allreduce(arr.pattern((1 << 12,), "float32", salt=2))
    del stalled                               # dropped while its operation runs (on rank 0)
    gc.collect()
    if rank == 0:
        assert alive() is not None, "the buffer of a running all-reduce was let go with its Work"
    try:
        behind.wait()                         # times out: aborts the communicator, the stall ends
        if rank == 0:
            raise AssertionError("no timeout behind a stalled all-reduce")
    except _C.CommTimeout:
        pass
    del behind
    comm.Barrier()
    # the stream has left the aborted operation by now or soon: the next Works' destruction
    # (on a new communicator) lets its buffer go
    fresh = nccl.init(comm, timeout=30.0)
    other = nccl.TensorReducer(fresh)
    fresh.connect()
    for _ in range(40):
        other.allreduce(arr.pattern((16,), "float32", salt=3)).wait()
        gc.collect()
        # both ranks go on together until rank 0's buffer is gone (or 40 rounds, ~2 s)
        if comm.allreduce(rank != 0 or alive() is None, op=MPI.LAND):
            break
        time.sleep(0.05)
    if rank == 0:
        assert alive() is None, "the buffer was never let go after its all-reduce ended"
    print(f"rank {rank}: OK", flush=True)
    comm.Barrier()
    if rank == 0:   # as after any timeout: the aborted communicator's MPI requests are abandoned
        abort_job(3)
    time.sleep(60)


if __name__ == "__main__":
    main()
