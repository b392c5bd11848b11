"""Rank program (4 ranks): Communicator works on sub-communicators — from mpi4py's Split and
from Communicator.split — with sub-ranks, group-local all-reduce and channels."""

import numpy as np
from mpi4py import MPI

from dpsgs import _C

W = MPI.COMM_WORLD
assert W.size == 4, W.size
world = _C.Communicator(W, timeout=20.0)
color = W.rank % 2                                  # groups {0, 2} and {1, 3}
subs = {
    "mpi4py Split": _C.Communicator(W.Split(color, W.rank), timeout=20.0),
    "Communicator.split": world.split(color, W.rank),
}
for how, sub in subs.items():
    assert (sub.size, sub.rank) == (2, W.rank // 2), (how, sub.size, sub.rank)
    x = np.full(100003, float(W.rank), np.float64)
    _C.Reducer(sub, "ring").allreduce(x).wait()
    want = (color + color + 2) / 2                   # mean of world ranks {c, c+2}
    assert np.all(x == want), (how, x[:3], want)
    ch = _C.Channel(sub, 1 - sub.rank, 9, sub.rank == 0, f"sub{color}")
    if sub.rank == 0:
        ch.send([np.full(5, W.rank, np.int64)]).wait()
    else:
        (got,) = ch.recv([(5, (5,))])
        assert got.tolist() == [color] * 5, (how, got)
    sub.barrier()
assert world.split(-1, 0) is None                    # color < 0 joins no group
print(f"world rank {W.rank}: PASS", flush=True)
