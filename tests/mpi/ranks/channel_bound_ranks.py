"""Rank program (2 ranks): with a slow receiver, the sender never has more than two messages in
flight and its third send blocks until the receiver has taken the first."""

import time

import numpy as np
from mpi4py import MPI

from dpsgs import _C

SLEEP = 0.4
N = 6
comm = _C.Communicator(MPI.COMM_WORLD, timeout=30.0)
payload = np.arange(1 << 18, dtype=np.float32)  # 1 MiB: rendezvous, so sends stay in flight
if comm.rank == 0:
    ch = _C.Channel(comm, 1, 2, True, "bound")
    comm.barrier()
    seen, took, works = [], [], []
    for i in range(N):
        t0 = time.monotonic()
        works.append(ch.send([payload + i]))
        took.append(time.monotonic() - t0)
        seen.append(ch.in_flight)
    for w in works:
        w.wait()
    print(f"rank 0: in_flight after each send {seen}; send seconds {[round(t, 2) for t in took]}",
          flush=True)
    assert max(seen) <= 2, seen
    assert seen[1] == 2, seen                       # the receiver is asleep: both still in flight
    assert took[0] < SLEEP / 2 and took[1] < SLEEP / 2, took
    assert took[2] > SLEEP * 0.6, took              # the third send waited for the oldest
    assert ch.in_flight == 0
else:
    ch = _C.Channel(comm, 0, 2, False, "bound")
    comm.barrier()
    for i in range(N):
        time.sleep(SLEEP)
        (a,) = ch.recv([(2, payload.shape)])
        assert a[0] == i and np.array_equal(a, payload + i), i
comm.barrier()
if comm.rank == 0:
    print("PASS", flush=True)
