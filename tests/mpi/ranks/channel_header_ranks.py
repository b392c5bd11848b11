"""Rank program (2 ranks): dtype and shape mismatches of one-tensor messages through the raw
_C.Channel raise ValueError naming both ranks, the channel, the message number, the tensor and
expected vs received; the stream stays usable afterwards."""

import numpy as np
from mpi4py import MPI

from dpsgs import _C

comm = _C.Communicator(MPI.COMM_WORLD, timeout=20.0)
name = "act s0->s1"
if comm.rank == 0:
    ch = _C.Channel(comm, 1, 4, True, name)
    ch.send([np.ones((2, 3), np.float32)])
    ch.send([np.ones((2, 3), np.float32)])
    ch.send([np.arange(5, dtype=np.int64)]).wait()
    ch.send([np.ones(20000, np.float64)]).wait()     # separate payload path, shape mismatch
else:
    ch = _C.Channel(comm, 0, 4, False, name)
    errors = []
    for expect in [(3, (2, 3)), (2, (3, 2))]:
        try:
            ch.recv([expect])
        except ValueError as e:
            errors.append(str(e))
    (a,) = ch.recv([(5, (5,))])
    assert a.tolist() == [0, 1, 2, 3, 4], a
    try:
        ch.recv([(3, (20001,))])
    except ValueError as e:
        errors.append(str(e))
    for e in errors:
        print("rank 1 got:", e, flush=True)
    assert len(errors) == 3, errors
    dt, shp, big = errors
    for e in errors:
        assert "rank 0" in e and "rank 1" in e and name in e, e
    assert "#0" in dt and "tensor 0 of 1: expected dtype float64 shape (2, 3) but received dtype float32" in dt, dt
    assert "#1" in shp and "expected dtype float32 shape (3, 2) but received dtype float32 shape (2, 3)" in shp, shp
    assert "#3" in big and "(20001,)" in big and "(20000,)" in big, big
comm.barrier()
if comm.rank == 0:
    print("PASS", flush=True)
