"""Communication/computation overlap of a non-blocking all-reduce, measured the OSU way
(osu_iallreduce): dpsgs Reducer (progress thread) against raw mpi4py Iallreduce.

Per size and side: t_comm = start + wait alone; a fixed amount of dummy compute,
calibrated to last about t_comm, alone (t_compute); and the compute between start and wait
(t_total); overlap % = max(0, 100 - 100 * (t_total - t_compute) / t_comm). The three are
timed in turn within every iteration (so they share the machine's background load);
medians over iterations, each iteration the slowest rank's time.

The dummy compute is a loop of NumPy multiplies on three 16 KiB float32 arrays (L1/L2
resident, so it uses the core, not memory bandwidth, and NumPy releases the GIL inside
each call as real compute kernels do). It is a fixed amount of work, not a deadline: when
communication takes the compute's core, the compute gets longer and the overlap falls, as
it would in training. With more busy threads than cores (2 ranks x (compute + progress
thread) on 2 cores here) that is the bound on what any progress thread can hide.

The compute runs on one thread per rank: the entry point (comm.main) pins OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS and MKL_NUM_THREADS to 1 unless the user set them, and the loaded
BLAS's pool at run time (dpsgs.bench.threads). Unpinned, every rank's OpenBLAS/OpenMP pool
had a thread per core on the 16-core GPU host, and the test measured that contention
(51-66 % there, against 87 % / 97 % at 1 / 64 MiB with one BLAS thread per rank). The
header names the threads each rank's compute ran with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from mpi4py import MPI

from .allreduce import Buffers
from .harness import BenchContext, Timing, element_counts, time_iterations

__all__ = ["COMPUTE_KINDS", "Compute", "SleepCompute", "overlap_percent", "run"]


class Compute:
    """Fixed-work dummy compute: `units` NumPy multiplies of 4096 float32 elements."""

    ELEMS = 4096

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.a = rng.random(self.ELEMS, dtype=np.float32)
        self.b = rng.random(self.ELEMS, dtype=np.float32)
        self.c = np.empty_like(self.a)

    def run(self, units: int) -> None:
        a, b, c = self.a, self.b, self.c
        for _ in range(units):
            np.multiply(a, b, out=c)

    def seconds_per_unit(self, comm: Any, units: int = 20000) -> float:
        """Calibrated alone on every rank; the slowest rank's figure, so all ranks run the
        same work and the iteration ends together."""
        self.run(units // 10)  # warm the caches and the ufunc dispatch
        t0 = time.perf_counter()
        self.run(units)
        per_unit = (time.perf_counter() - t0) / units
        return float(comm.allreduce(per_unit, op=MPI.MAX))


class SleepCompute:
    """Diagnostic stand-in for compute that leaves the core free (time.sleep of `units`
    microseconds): models compute on another device, and shows whether a side progresses
    at all without MPI calls. Fixed duration, not fixed work."""

    def run(self, units: int) -> None:
        time.sleep(units * 1e-6)

    def seconds_per_unit(self, comm: Any, units: int = 0) -> float:
        return 1e-6


COMPUTE_KINDS = {"numpy": Compute, "sleep": SleepCompute}


def overlap_percent(t_total: float, t_compute: float, t_comm: float) -> float:
    """OSU: max(0, 100 - 100 * (overall - compute) / pure communication), also capped at
    100: noise can make the overlapped run faster than the compute alone, and more than
    all of the communication cannot be hidden."""
    if t_comm <= 0:
        return 0.0
    return min(100.0, max(0.0, 100.0 - 100.0 * (t_total - t_compute) / t_comm))


def _calibrate(ctx: BenchContext, start: Callable[[], Any], b: Buffers, compute: Any,
               per_unit: float, iters: int) -> int:
    """Compute units lasting about one start + wait: a short comm-only pre-run, then one
    correction from a timed compute run (the startup figure drifts on a busy machine)."""
    t_comm = time_iterations(lambda: start().wait(), iters, ctx.warmup, ctx.comm,
                             setup=b.reset).median
    units = max(1, round(t_comm / per_unit))
    t_units = time_iterations(lambda: compute.run(units), 3, 1, ctx.comm).median
    return max(1, round(units * t_comm / t_units)) if t_units > 0 else units


def _measure(ctx: BenchContext, start: Callable[[], Any], b: Buffers, compute: Any,
             per_unit: float, iters: int) -> dict[str, Any]:
    units = _calibrate(ctx, start, b, compute, per_unit, max(3, iters // 4))

    def overlapped() -> None:
        work = start()
        compute.run(units)
        work.wait()

    bodies = {"comm": lambda: start().wait(), "compute": lambda: compute.run(units),
              "total": overlapped}
    # The three phases alternate within each iteration (OSU runs them one after the other):
    # on a shared machine each then sees the same background load.
    samples: dict[str, list[float]] = {k: [] for k in bodies}
    for i in range(ctx.warmup + iters):
        for name, body in bodies.items():
            t = time_iterations(body, 1, 0, ctx.comm, setup=b.reset)
            if i >= ctx.warmup:
                samples[name] += t.samples
    t = {k: Timing(v) for k, v in samples.items()}
    return {
        "comm_us": t["comm"].median * 1e6, "compute_us": t["compute"].median * 1e6,
        "total_us": t["total"].median * 1e6, "compute_units": units,
        "overlap_pct": overlap_percent(t["total"].median, t["compute"].median,
                                       t["comm"].median),
        "samples": {k: v.to_dict() for k, v in t.items()},
    }


class _MpiWork:
    """Iallreduce request with the Work face (wait()) the measurement loop uses."""

    def __init__(self, req: MPI.Request) -> None:
        self.req = req

    def wait(self) -> None:
        self.req.Wait()


def run(ctx: BenchContext, sizes: list[int], dtype: str = "float32",
        algorithm: str = "auto", compute_kind: str = "numpy") -> list[dict[str, Any]]:
    """One row per size: raw Iallreduce and (with dpsgs) Reducer(algorithm) overlap."""
    dt = np.dtype(dtype)
    compute = COMPUTE_KINDS[compute_kind]()
    per_unit = compute.seconds_per_unit(ctx.comm)
    reducer = None
    if ctx.dp is not None:
        from dpsgs import _C
        reducer = _C.Reducer(ctx.dp, algorithm)
    rows = []
    for count, size in element_counts(sizes, dt.itemsize):
        b = Buffers(count, dt, ctx.rank)
        # Overlap needs fewer repetitions than latency; the plain count is enough.
        iters = ctx.iters
        row: dict[str, Any] = {"size": size, "count": count, "type": dtype,
                               "iters": iters, "compute": compute_kind,
                               "compute_us_per_unit": per_unit * 1e6}
        comm = ctx.comm
        row["mpi.Iallreduce"] = _measure(
            ctx, lambda: _MpiWork(comm.Iallreduce(MPI.IN_PLACE, b.buf, op=MPI.SUM)), b,
            compute, per_unit, iters)
        if reducer is not None:
            row[f"dpsgs.{algorithm}"] = _measure(
                ctx, lambda: reducer.allreduce(b.buf, average=False), b, compute, per_unit,
                iters)
        rows.append(row)
    return rows
