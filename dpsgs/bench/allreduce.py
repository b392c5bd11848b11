"""All-reduce (nccl-tests all_reduce_perf columns): time, algbw, busbw, #wrong for dpsgs
Reducer (auto/ring/mpi) against raw mpi4py Allreduce (out-of-place, in-place) and
Iallreduce+Wait, plus single-threaded memcpy bandwidth (NumPy copyto) of the same size.

Every variant reduces the same input: before each iteration (untimed) the buffer is
refilled from a preallocated copy, then a barrier, then the timed call; the time of an
iteration is the slowest rank's. algbw = size / time (GB/s, 1e9 B), busbw = algbw *
2(n-1)/n. The reduction is a sum (Reducer with average=False) so both sides do the same
arithmetic and the check is exact: rank r holds (i mod 251) + r.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from mpi4py import MPI

from .harness import PERIOD, BenchContext, count_wrong, element_counts, iters_for, pattern, ratio, \
    time_iterations

__all__ = ["DTYPES", "RAW_VARIANTS", "Buffers", "bus_factor", "expected_sum", "memcpy_row",
           "run"]

DTYPES = ("float32", "float64", "int32", "int64")
RAW_VARIANTS = ("Allreduce", "Allreduce-inplace", "Iallreduce+Wait")


def bus_factor(nranks: int) -> float:
    """busbw / algbw for all-reduce (nccl-tests): 2(n-1)/n, so it compares with link speed."""
    return 2.0 * (nranks - 1) / nranks


def expected_sum(count: int, dtype: np.dtype, nranks: int) -> np.ndarray:
    """Sum over ranks r of pattern(salt=r) = n * (i mod 251) + n(n-1)/2."""
    base = np.resize(np.arange(PERIOD, dtype=np.int64) * nranks + nranks * (nranks - 1) // 2,
                     count)
    return base.astype(dtype)


class Buffers:
    """Preallocated per size: the input copy, the in-place/receive buffer, the send buffer."""

    def __init__(self, count: int, dtype: np.dtype, rank: int) -> None:
        self.init = pattern(count, dtype, rank)
        self.buf = self.init.copy()
        self.sbuf = self.init.copy()

    def reset(self) -> None:
        np.copyto(self.buf, self.init)
        np.copyto(self.sbuf, self.init)


def _raw_body(comm: Any, variant: str, b: Buffers) -> Callable[[], None]:
    if variant == "Allreduce":
        return lambda: comm.Allreduce(b.sbuf, b.buf, op=MPI.SUM)
    if variant == "Allreduce-inplace":
        return lambda: comm.Allreduce(MPI.IN_PLACE, b.buf, op=MPI.SUM)
    if variant == "Iallreduce+Wait":
        return lambda: comm.Iallreduce(MPI.IN_PLACE, b.buf, op=MPI.SUM).Wait()
    raise ValueError(f"unknown raw variant {variant!r}")


def _reducer(C: Any, dp: Any, name: str) -> Any:
    """A dpsgs Reducer by bench name: an algorithm, or "auto+blocking": auto whose MPI-sized
    buffers (below 256 KiB) take the opt-in blocking MPI_Allreduce (returns complete)."""
    if name == "auto+blocking":
        return C.Reducer(dp, "auto", blocking_below_bytes=256 * 1024)
    return C.Reducer(dp, name)


def memcpy_row(ctx: BenchContext, nbytes: int, iters: int) -> dict[str, Any]:
    """Single-threaded np.copyto bandwidth on rank 0 while the others wait (the one-core
    memory-copy limit of this machine, measured in the same run)."""
    row: dict[str, Any] = {"size": nbytes}
    if ctx.rank == 0:
        src = pattern(nbytes, np.uint8, 7)
        dst = np.zeros_like(src)
        t = time_iterations(lambda: np.copyto(dst, src), iters, ctx.warmup, combine="local")
        # gbps counts the bytes copied once (as algbw does); STREAM's "Copy" counts the read
        # and the write, twice that (gbps_stream).
        row.update(t.to_dict(), gbps=nbytes / t.median / 1e9,
                   gbps_stream=2 * nbytes / t.median / 1e9)
    return ctx.comm.bcast(row, root=0)


def run(ctx: BenchContext, sizes: list[int], dtype: str = "float32",
        algorithms: tuple[str, ...] = ("auto", "ring", "mpi")) -> list[dict[str, Any]]:
    """One row per size: every variant's timing, algbw, busbw, #wrong; memcpy GB/s; ratio
    of dpsgs busbw (first algorithm) to raw in-place MPI_Allreduce (same in-place semantics)."""
    dt = np.dtype(dtype)
    n = ctx.size
    reducers: dict[str, Any] = {}
    if ctx.dp is not None:
        from dpsgs import _C
        reducers = {a: _reducer(_C, ctx.dp, a) for a in algorithms}
    rows = []
    for count, size in element_counts(sizes, dt.itemsize):
        iters = iters_for(size, ctx.iters)
        b = Buffers(count, dt, ctx.rank)
        expect = expected_sum(count, dt, n) if ctx.check else None
        row: dict[str, Any] = {"size": size, "count": count, "type": dtype, "redop": "sum",
                               "iters": iters, "variants": {}}
        bodies = {f"mpi.{v}": _raw_body(ctx.comm, v, b) for v in RAW_VARIANTS}
        for a, red in reducers.items():
            # `average` positionally: pybind11's keyword parsing costs ~0.4 us per call
            bodies[f"dpsgs.{a}"] = (lambda red=red: red.allreduce(b.buf, False).wait())
        for name, body in bodies.items():
            t = time_iterations(body, iters, ctx.warmup, ctx.comm, setup=b.reset)
            wrong = ctx.total(count_wrong(b.buf, expect)) if expect is not None else None
            algbw = size / t.median / 1e9
            row["variants"][name] = {**t.to_dict(), "algbw": algbw,
                                     "busbw": algbw * bus_factor(n), "wrong": wrong}
        row["memcpy"] = memcpy_row(ctx, size, iters)
        v = row["variants"]
        raw = v["mpi.Allreduce-inplace"]["busbw"]
        if reducers:
            # The first algorithm (auto by default) is dpsgs' headline figure.
            head = row["dpsgs_base"] = f"dpsgs.{algorithms[0]}"
            row["ratio"] = ratio(v[head]["busbw"], raw)
            row["ratio_vs_best_raw"] = ratio(
                v[head]["busbw"], max(v[f"mpi.{x}"]["busbw"] for x in RAW_VARIANTS))
        row["busbw_over_memcpy"] = {k: ratio(x["busbw"], row["memcpy"].get("gbps"))
                                    for k, x in v.items()}
        rows.append(row)
    return rows
