"""Rank program (2 ranks): 1,000 ordered messages of every dtype with changing sizes (zero-size,
inline, separate, growth past the slot capacity, non-contiguous input) arrive byte-exact and in
order; the sender never has more than 2 messages in flight."""

import sys

import numpy as np
from mpi4py import MPI

from dpsgs import _C

MESSAGES = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
CAPACITY = 16384  # small, so growth past the slot capacity happens many times
CODES = {0: np.float16, 1: np.uint16, 2: np.float32, 3: np.float64, 4: np.int32, 5: np.int64,
         6: np.uint8}


def message(i: int) -> tuple[int, np.ndarray, bool]:
    """The i-th message: (dtype code, array, send it non-contiguous?) — same on both ranks."""
    rng = np.random.default_rng(i)
    code = list(CODES)[i % len(CODES)]
    kind = i % 10
    if kind == 0:
        n = 0
    elif kind < 5:
        n = int(rng.integers(1, 600))                  # inline (<= 8 KiB)
    elif kind < 9:
        n = int(rng.integers(2000, 9000))              # separate or oversize, near the capacity
    else:
        n = int(rng.integers(9000, 40000)) * (1 + i // 250)   # grows over the run
    raw = rng.integers(0, 256, size=n * np.dtype(CODES[code]).itemsize, dtype=np.uint8)
    arr = raw.view(CODES[code])
    if n % 3 == 0 and n >= 6:
        arr = arr.reshape(3, n // 3)
    return code, arr, (i % 7 == 3 and n >= 4)


comm = _C.Communicator(MPI.COMM_WORLD, timeout=30.0, warn_after=10.0)
assert comm.size == 2, comm.size
ok = True
if comm.rank == 0:
    ch = _C.Channel(comm, 1, 11, True, "exact", capacity=CAPACITY)
    most = 0
    for i in range(MESSAGES):
        code, arr, strided = message(i)
        if strided:  # send a non-contiguous view whose contiguous copy equals arr
            big = np.zeros((arr.size, 2), dtype=arr.dtype)
            big[:, 0] = arr.reshape(-1)
            view = big[:, 0].reshape(arr.shape)
            assert not view.flags.c_contiguous
            ch.send([view], dtype_codes=[code])
        else:
            ch.send([arr], dtype_codes=[code])
        most = max(most, ch.in_flight)
        assert ch.in_flight <= 2, ch.in_flight
    assert ch.sent == MESSAGES
    print(f"rank 0: sent {ch.sent}, max in flight {most}", flush=True)
else:
    ch = _C.Channel(comm, 0, 11, False, "exact", capacity=CAPACITY)
    for i in range(MESSAGES):
        code, arr, _ = message(i)
        (got,) = ch.recv([(code, arr.shape)])
        if got.dtype != arr.dtype or got.shape != arr.shape or got.tobytes() != arr.tobytes():
            print(f"rank 1: message {i} differs: {got.dtype} {got.shape} "
                  f"vs {arr.dtype} {arr.shape}", flush=True)
            ok = False
            break
    assert ch.received == (MESSAGES if ok else ch.received)
    print(f"rank 1: received {ch.received} byte-exact: {ok}", flush=True)
ok = MPI.COMM_WORLD.allreduce(ok, op=MPI.LAND)
assert ok
comm.barrier()
if comm.rank == 0:
    print("PASS", flush=True)
