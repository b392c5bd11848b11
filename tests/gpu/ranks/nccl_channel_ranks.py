"""2 ranks: NcclChannel byte-exactness for every dtype over N ordered messages of changing
sizes and shapes, traffic in both directions at once (the pipeline's pattern: both ends send
before they receive), the two-in-flight bound, and data produced on a side stream.

    mpirun -n 2 python -m mpi4py tests/gpu/ranks/nccl_channel_ranks.py [messages]
"""

from __future__ import annotations

import sys

from gpu_arrays import pick
from mpi4py import MPI

from dpsgs.comm import nccl

SIZES = [0, 1, 7, 1000, 65537, 3, 4096, 1 << 20]


def main() -> int:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    assert size == 2, f"run with 2 ranks, got {size}"
    messages = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    arr = pick()
    ncomm = nccl.init(comm)
    peer = 1 - rank
    # Opposite creation orders on the two ranks: construction must not depend on the order.
    if rank == 0:
        fwd = nccl.TensorChannel(ncomm, peer, 1, True, "fwd")
        bwd = nccl.TensorChannel(ncomm, peer, 2, False, "bwd")
    else:
        bwd = nccl.TensorChannel(ncomm, peer, 2, True, "bwd")
        fwd = nccl.TensorChannel(ncomm, peer, 1, False, "fwd")
    ncomm.connect()
    out, inp = (fwd, bwd) if rank == 0 else (bwd, fwd)

    bad, works = 0, []
    for i in range(messages):
        dtype = arr.dtypes[i % len(arr.dtypes)]
        n = SIZES[(i // len(arr.dtypes)) % len(SIZES)]
        shape = (n,) if i % 3 else (1, n)
        if i % 5 == 0:  # produced on a side stream: the send must wait for it
            with arr.side_stream():
                x = arr.pattern(shape, dtype, salt=2 * i + rank)
                works.append(out.send(x))
        else:
            works.append(out.send(arr.pattern(shape, dtype, salt=2 * i + rank)))
        if out.in_flight > 2:
            bad += 1
            print(f"rank {rank}: {out.in_flight} sends in flight after message {i} (bound is 2)", flush=True)
        y = inp.recv_into(arr.empty(shape, dtype))
        expect = arr.pattern(shape, dtype, salt=2 * i + peer)
        if not arr.equal(y, expect):
            bad += 1
            if bad <= 5:
                print(f"rank {rank}: message {i} {dtype}{shape} differs from the pattern", flush=True)
        works = works[-4:]
    for w in works:
        w.wait()
    arr.synchronize()
    ok = comm.allreduce(bad == 0, op=MPI.LAND)
    ncomm.close()
    print(f"rank {rank}: {messages} messages each way ({arr.name}), {bad} wrong: {'OK' if ok else 'FAIL'}",
          flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
