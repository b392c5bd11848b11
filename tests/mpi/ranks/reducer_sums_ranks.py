"""Rank program (any world size): the averaging all-reduce equals a NumPy reference on every
rank, for every dtype, odd sizes (0, 1, primes, more chunks than ranks) and every algorithm;
every rank ends with bit-identical results."""

import hashlib
import sys

import numpy as np
from mpi4py import MPI

from dpsgs import _C

SIZES = [int(s) for s in sys.argv[1].split(",")] if len(sys.argv) > 1 else \
    [0, 1, 2, 3, 7, 1001, 4099, 65537, 300007]
DTYPES = {0: np.float16, 1: np.uint16, 2: np.float32, 3: np.float64, 4: np.int32, 5: np.int64,
          6: np.uint8}
W = MPI.COMM_WORLD
comm = _C.Communicator(W, timeout=60.0)
n, r = comm.size, comm.rank
reducers = {
    "ring": _C.Reducer(comm, "ring", chunk_bytes=1000),        # odd chunk: many uneven chunks
    "ring-default": _C.Reducer(comm, "ring"),
    "mpi": _C.Reducer(comm, "mpi"),
    "auto": _C.Reducer(comm, "auto"),
}


def bf16_to_f32(u: np.ndarray) -> np.ndarray:
    return (u.astype(np.uint32) << 16).view(np.float32)


def data(rank: int, size: int, code: int) -> np.ndarray:
    i = np.arange(size)
    if code in (4, 5):
        return ((i * 7 + rank * 13) % 1000 - 300).astype(DTYPES[code])   # negative too: exact
    if code == 6:
        return ((i + rank * 5) % (256 // max(n, 1))).astype(np.uint8)      # no overflow
    vals = ((i % 17) - 8 + rank * 0.25).astype(np.float32)                 # exact in fp16/bf16
    if code == 1:
        return (vals.view(np.uint32) >> 16).astype(np.uint16)
    return vals.astype(DTYPES[code])


def reference(size: int, code: int, average: bool) -> np.ndarray:
    parts = [data(k, size, code) for k in range(n)]
    if code == 1:
        parts = [bf16_to_f32(p) for p in parts]
    total = np.sum([p.astype(np.float64) if code not in (4, 5, 6) else p.astype(np.int64)
                    for p in parts], axis=0) if parts else np.zeros(size)
    if average:
        total = total / n if code not in (4, 5, 6) else np.trunc(total / n).astype(np.int64)
    return np.asarray(total)


failures = []
digest = hashlib.sha256()
checked = 0
for name, red in reducers.items():
    for code in DTYPES:
        for size in SIZES:
            if name == "ring" and size > 70000:
                continue  # 1000-byte chunks: thousands of messages; the other reducers cover it
            for average in (True, False):
                a = data(r, size, code)
                red.allreduce(a, average=average, dtype_code=code if code == 1 else None).wait()
                ref = reference(size, code, average)
                got = bf16_to_f32(a).astype(np.float64) if code == 1 else a.astype(np.float64)
                tol = {0: 2e-3, 1: 1e-2, 2: 1e-6, 3: 1e-12}.get(code, 0.0)
                if got.shape != ref.shape or not np.allclose(got, ref, rtol=tol, atol=tol):
                    bad = np.flatnonzero(~np.isclose(got, ref, rtol=tol, atol=tol))[:3]
                    failures.append(f"{name} code {code} size {size} avg {average}: "
                                    f"at {bad.tolist()} got {got[bad]} want {ref[bad]}")
                digest.update(a.tobytes())
                checked += 1
# Ordered async use: many in flight at once, waited in reverse, over all three paths of
# "auto": MPI issued from this thread (< 256 KiB), MPI queued to the progress thread
# (256 KiB - 4 MiB) and the ring (>= 4 MiB), interleaved.
red = reducers["auto"]
paths = {red.algorithm_for(4 * s) for s in (10, 70000, 1 << 20, 1_300_000)}
assert paths == {"mpi", "ring"}, paths
arrays = [np.full(s, float(r + 1), np.float32)
          for s in (10, 70000, 1_300_000, 3, 200000, 0, 1 << 20, 5, 1_300_000, 99)]
works = [red.allreduce(x) for x in arrays]
for w in reversed(works):
    w.wait()
for x in arrays:
    if not np.allclose(x, (n + 1) / 2):
        failures.append(f"async batch: got {x[:3]} want {(n + 1) / 2}")
all_digests = W.allgather(digest.hexdigest())
if len(set(all_digests)) != 1:
    failures.append(f"results differ between ranks: {all_digests}")
for f in failures[:10]:
    print(f"rank {r}: FAIL {f}", flush=True)
ok = W.allreduce(not failures, op=MPI.LAND)
if r == 0:
    print(f"{checked} all-reduces checked on {n} ranks: {'PASS' if ok else 'FAIL'}", flush=True)
assert ok
