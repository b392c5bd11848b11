"""Shared benchmark harness: size sweep, timed loops with barriers, tables, JSON, checks."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .outputs import write_new

__all__ = [
    "KIB", "MIB", "PERIOD", "BenchContext", "Timing", "Table", "add_common_args",
    "command_line", "count_wrong", "fmt_num", "format_size", "iters_for", "machine_info",
    "parse_size", "pattern", "ratio", "size_sweep", "time_iterations", "write_json",
]

KIB = 1024
MIB = 1024 * 1024
_SUFFIX = {"": 1, "K": KIB, "M": MIB, "G": 1024 * MIB}
# Verification patterns repeat with a prime period so a shifted or reordered block shows.
PERIOD = 251


def parse_size(text: str) -> int:
    """'8' -> 8, '64K' -> 65536, '64M' -> 67108864 (binary units, as nccl-tests)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _SUFFIX else ""
    number = t[: len(t) - len(unit)]
    try:
        value = int(float(number) * _SUFFIX[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: want e.g. 8, 64K, 64M, 1G") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: negative")
    return value


def format_size(nbytes: int) -> str:
    """Exact binary units when they divide: 65536 -> '64K', 1000 -> '1000'."""
    for unit in ("G", "M", "K"):
        if nbytes >= _SUFFIX[unit] and nbytes % _SUFFIX[unit] == 0:
            return f"{nbytes // _SUFFIX[unit]}{unit}"
    return str(nbytes)


def size_sweep(begin: int, end: int, factor: int, include: Iterable[int] = ()) -> list[int]:
    """begin, begin*f, ... <= end (nccl-tests -b/-e/-f), plus `end` itself and the
    `include` sizes inside [begin, end]: the summary lines need 8 B, 1 MiB and 64 MiB
    whatever the factor."""
    if factor < 2:
        raise ValueError(f"step factor must be >= 2, got {factor}")
    if begin < 1 or end < begin:
        raise ValueError(f"need 1 <= begin <= end, got begin={begin} end={end}")
    sizes = {end}
    s = begin
    while s <= end:
        sizes.add(s)
        s *= factor
    sizes.update(x for x in include if begin <= x <= end)
    return sorted(sizes)


def element_counts(sizes: Iterable[int], itemsize: int) -> Iterator[tuple[int, int]]:
    """(elements, bytes) of each sweep size in whole elements of `itemsize` bytes; a size
    below one element is skipped."""
    for nbytes in sizes:
        count = nbytes // itemsize
        if count:
            yield count, count * itemsize


def iters_for(nbytes: int, iters: int) -> int:
    """Small messages are cheap and noisy: up to 10x the iterations below 1 MiB (as OSU
    uses more iterations for small sizes). Every implementation gets the same count."""
    return iters * max(1, min(10, MIB // max(nbytes, 1)))


def add_common_args(p: argparse.ArgumentParser, maxbytes: str = "64M") -> None:
    p.add_argument("-b", "--minbytes", type=parse_size, default=parse_size("8"),
                   help="smallest message size in bytes (K/M/G suffixes; default 8)")
    p.add_argument("-e", "--maxbytes", type=parse_size, default=parse_size(maxbytes),
                   help=f"largest message size (default {maxbytes})")
    p.add_argument("-f", "--stepfactor", type=int, default=4,
                   help="multiply the size by this between rows (default 4)")
    p.add_argument("-n", "--iters", type=int, default=20,
                   help="timed iterations per size (default 20; latency and all-reduce: "
                        "x up to 10 below 1 MiB)")
    p.add_argument("-w", "--warmup", type=int, default=5,
                   help="untimed warm-up iterations per size (default 5)")
    p.add_argument("-c", "--check", action="store_true",
                   help="verify the data; #wrong column; exit 1 if any element is wrong")


@dataclass
class BenchContext:
    """What every benchmark section gets: the caller's mpi4py communicator (raw side), the
    dpsgs communicator on a duplicate of it (None with --raw-only), and the loop settings."""
    comm: Any
    dp: Any | None
    iters: int
    warmup: int
    check: bool

    @property
    def rank(self) -> int:
        return int(self.comm.Get_rank())

    @property
    def size(self) -> int:
        return int(self.comm.Get_size())

    def log(self, text: str = "") -> None:
        if self.rank == 0:
            print(text, flush=True)

    def total(self, value: int) -> int:
        """Sum of an integer (a #wrong count) over all ranks, so every rank sees the same."""
        from mpi4py import MPI
        return int(self.comm.allreduce(int(value), op=MPI.SUM))


@dataclass
class Timing:
    """Per-iteration seconds after warm-up (already combined across ranks)."""
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def avg(self) -> float:
        return statistics.fmean(self.samples)

    def to_dict(self) -> dict[str, float]:
        us = [s * 1e6 for s in self.samples]
        return {"median_us": statistics.median(us), "avg_us": statistics.fmean(us),
                "min_us": min(us), "max_us": max(us), "iters": len(us)}


def time_iterations(body: Callable[[], None], iters: int, warmup: int, comm: Any = None,
                    setup: Callable[[], None] | None = None, barrier: bool = True,
                    combine: str = "max") -> Timing:
    """Run setup (untimed), barrier (untimed), then time body, warmup + iters times.

    combine="max": per iteration, the slowest rank's time (a collective ends when its last
    rank does), identical on every rank. "root": rank 0's times, broadcast (ping-pong,
    where rank 0 times whole round trips, as OSU). "local": no communication.
    """
    samples: list[float] = []
    for i in range(warmup + iters):
        if setup is not None:
            setup()
        if barrier and comm is not None:
            comm.Barrier()
        t0 = time.perf_counter()
        body()
        dt = time.perf_counter() - t0
        if i >= warmup:
            samples.append(dt)
    if comm is not None and combine != "local":
        from mpi4py import MPI
        arr = np.asarray(samples, dtype=np.float64)
        if combine == "max":
            comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.MAX)
        elif combine == "root":
            comm.Bcast(arr, root=0)
        else:
            raise ValueError(f"combine must be max, root or local, got {combine!r}")
        samples = arr.tolist()
    return Timing(samples)


def pattern(count: int, dtype: np.dtype | type, salt: int) -> np.ndarray:
    """Deterministic data: element i = (i mod 251) + salt (mod 256 for bytes). Exact in
    every dtype we use, and sums over a few ranks stay exact in float32."""
    dt = np.dtype(dtype)
    base = np.arange(PERIOD, dtype=np.int64) + salt
    if dt.itemsize == 1:
        base %= 256
    return np.resize(base.astype(dt), count)


def count_wrong(got: np.ndarray, expected: np.ndarray) -> int:
    """Number of elements that differ (exact comparison: the patterns are exact)."""
    if got.shape != expected.shape:
        return max(got.size, expected.size)
    return int(np.count_nonzero(got != expected))


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt_num(x: Any, width: int = 9) -> str:
    """Right-aligned number, nccl-tests-like precision: 2 decimals, fewer when large;
    None prints as N/A (not measured), strings pass through."""
    if x is None:
        s = "N/A"
    elif isinstance(x, str):
        s = x
    elif isinstance(x, (int, np.integer)):
        s = str(int(x))
    else:
        v = float(x)
        s = f"{v:.0f}" if abs(v) >= 1e5 else f"{v:.1f}" if abs(v) >= 1e3 else f"{v:.2f}"
    return s.rjust(width)


class Table:
    """nccl-tests-style fixed-width table: '#'-prefixed title, group and column headers."""

    def __init__(self, title: str, columns: Sequence[tuple[str, int]],
                 groups: Sequence[tuple[str, int]] = ()) -> None:
        self.title = title
        self.columns = list(columns)
        self.groups = list(groups)  # (label, number of columns it spans)

    def header(self) -> str:
        lines = [f"# {line}" for line in self.title.splitlines()]
        if self.groups:
            cells, i = [], 0
            for label, span in self.groups:
                w = sum(width + 1 for _, width in self.columns[i:i + span]) - 1
                cells.append(label.center(w) if label else " " * w)
                i += span
            lines.append("#" + " ".join(cells)[1:])
        heads = " ".join(name.rjust(w) for name, w in self.columns)
        lines.append("#" + heads[1:])
        return "\n".join(lines)

    def row(self, values: Sequence[Any]) -> str:
        return " ".join(fmt_num(v, w) for v, (_, w) in zip(values, self.columns, strict=True))

    def render(self, rows: Iterable[Sequence[Any]]) -> str:
        return "\n".join([self.header(), *(self.row(r) for r in rows)])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(comm: Any, dp_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a reader needs to judge the numbers: CPU, cores, load, library versions."""
    import mpi4py
    from mpi4py import MPI

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = None
    hosts = comm.allgather(socket.gethostname())
    return {
        "hostname": socket.gethostname(),
        "hosts": sorted(set(hosts)),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "memory_gib": None if mem_gib is None else round(mem_gib, 1),
        # The machine may be shared: the load average at start says how noisy the run was.
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "mpi4py": mpi4py.__version__,
        "mpi_library": MPI.Get_library_version().strip().splitlines()[0],
        "mpi_standard": "%d.%d" % MPI.Get_version(),
        "mpi_thread_level": int(MPI.Query_thread()),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "dpsgs": dp_info,
    }


def write_json(path: str | Path, data: dict[str, Any], overwrite: bool = True) -> Path:
    """Write `data` (no NaN: missing values are None) atomically enough for one writer.
    overwrite=False never replaces a file: a name taken meanwhile (a concurrent run) gets
    -2, -3, ... instead. Returns the path written."""
    out = Path(path)
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    if not overwrite:
        return write_new(out, text)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return out


def command_line(module: str, argv: Sequence[str], nprocs: int) -> str:
    """The command that reproduces this run (the launcher's own flags are not visible to a
    rank; `sys.argv` goes into the JSON as well)."""
    return shlex.join(["mpirun", "-n", str(nprocs), "python", "-m", module, *argv])


def run_on_world(body: Callable[[Any], int]) -> int:
    """body(COMM_WORLD)'s exit code. Any other error on any rank prints its traceback and
    aborts the whole job, so no peer hangs in a collective waiting for it."""
    import traceback

    from mpi4py import MPI

    from dpsgs.comm.abort import abort_job

    comm = MPI.COMM_WORLD
    try:
        return body(comm)
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        if comm.Get_size() > 1:
            abort_job(1)
        return 1
