"""Rank program (2 ranks): while rank 0 blocks in recv() and in Work.wait() (its peer is late),
a Python thread on rank 0 keeps running: the waits release the GIL."""

import threading
import time

import numpy as np
from mpi4py import MPI

from dpsgs import _C

DELAY = 1.0
comm = _C.Communicator(MPI.COMM_WORLD, timeout=30.0)
red = _C.Reducer(comm, "ring")
if comm.rank == 0:
    ch = _C.Channel(comm, 1, 1, False, "late")
    ticks = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    t = threading.Thread(target=spin)
    t.start()
    for what in ("recv", "allreduce"):
        before, t0 = ticks[0], time.monotonic()
        if what == "recv":
            (a,) = ch.recv([(2, (1000,))])
            assert a[0] == 7.0
        else:
            x = np.ones(1 << 18, np.float32)
            red.allreduce(x).wait()
            assert x[0] == 2.0, x[0]
        waited, made = time.monotonic() - t0, ticks[0] - before
        print(f"rank 0: {what} waited {waited:.2f}s, python thread ticked {made} times", flush=True)
        assert waited > DELAY * 0.6, waited
        assert made > 20, made           # ~1000 possible; a held GIL allows ~0
        MPI.COMM_WORLD.Barrier()
    stop.set()
    t.join()
else:
    ch = _C.Channel(comm, 0, 1, True, "late")
    time.sleep(DELAY)
    ch.send([np.full(1000, 7.0, np.float32)]).wait()
    MPI.COMM_WORLD.Barrier()
    time.sleep(DELAY)
    x = np.full(1 << 18, 3.0, np.float32)
    red.allreduce(x).wait()
    MPI.COMM_WORLD.Barrier()
if comm.rank == 0:
    print("PASS", flush=True)
