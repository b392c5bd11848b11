"""2 ranks: NcclChannel byte-exactness for every dtype over N ordered messages of 1..4 arrays
of changing dtypes, sizes and shapes (zero elements too), traffic in both directions at once
(the pipeline's pattern: both ends send before they receive), the two-in-flight bound
(counted in messages), and data produced on a side stream.

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
    def specs(i: int) -> list[tuple[str, tuple[int, ...]]]:
        """Message i: 1..4 arrays, rotating dtypes and sizes."""
        out = []
        for j in range(1 + i % 4):
            n = SIZES[(i // len(arr.dtypes) + 3 * j) % len(SIZES)]
            out.append((arr.dtypes[(i + j) % len(arr.dtypes)], (n,) if (i + j) % 3 else (1, n)))
        return out

    def message(i: int, who: int) -> tuple:
        return tuple(arr.pattern(shape, dt, salt=8 * (2 * i + who) + j) for j, (dt, shape) in enumerate(specs(i)))

    for i in range(messages):
        if i % 5 == 0:  # produced on a side stream: the send must wait for it
            with arr.side_stream():
                works.append(out.send(message(i, rank)))
        else:
            works.append(out.send(message(i, rank)))
        if out.in_flight > 2:
            bad += 1
            print(f"rank {rank}: {out.in_flight} messages in flight after message {i} (bound is 2)", flush=True)
        got = inp.recv_into(tuple(arr.empty(shape, dt) for dt, shape in specs(i)))
        for j, (y, expect) in enumerate(zip(got, message(i, peer))):
            if not arr.equal(y, expect):
                bad += 1
                if bad <= 5:
                    print(f"rank {rank}: message {i} array {j} {specs(i)[j]} differs from the pattern", flush=True)
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
