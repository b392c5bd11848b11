"""NCCL backend micro-benchmark (nccl-tests columns): all-reduce (ncclAvg, in place) time,
algbw, busbw, #wrong over sizes 8 B .. 256 MiB (x4), and, with 2 ranks, channel bandwidth (rank 0 -> 1).

    mpirun -n 2 python -m mpi4py tests/gpu/ranks/nccl_bench_ranks.py --check [-e 256M] [-n 20]

busbw = algbw * 2(n-1)/n (nccl-tests), GB/s = 1e9 B/s. With --check the data are exact
small integers and every result is held to what NCCL guarantees (mean_check: exact for a
power-of-two rank count); exit 1 on any wrong element.
"""

from __future__ import annotations

import argparse
import sys
import time

from gpu_arrays import pick
from mean_check import check_mean
from mpi4py import MPI

from dpsgs.comm import nccl


def parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1].upper(), 1)
    return int(s[:-1] if mult > 1 else s) * mult


def timed(arr, iters: int, fn) -> float:
    arr.synchronize()
    t0 = time.perf_counter()
    work = None
    for _ in range(iters):
        work = fn()
    if work is not None:
        work.wait()
    arr.synchronize()
    return (time.perf_counter() - t0) / iters


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("-b", default="8")
    p.add_argument("-e", default="256M")
    p.add_argument("-f", type=int, default=4)
    p.add_argument("-n", type=int, default=20)
    p.add_argument("-w", type=int, default=5)
    p.add_argument("--check", action="store_true")
    a = p.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    arr = pick()
    world = nccl.init(comm)
    ch = None
    if size == 2:  # the channel table is a 2-rank measurement
        ch = nccl.TensorChannel(world, 1 - rank, 1, rank == 0, "bench")
    world.connect()
    reducer = nccl.TensorReducer(world)
    sizes, s = [], parse_size(a.b)
    while s <= parse_size(a.e):
        sizes.append(s)
        s *= a.f
    wrong_total = 0
    if rank == 0:
        print(f"# dpsgs NCCL backend, {size} ranks, {arr.name} buffers, float32, -n {a.n} -w {a.w}")
        print(f"#{'size':>12} {'count':>12} {'type':>7} {'time(us)':>10} {'algbw':>8} {'busbw':>8} {'#wrong':>7}")
    for nbytes in sizes:
        count = max(1, nbytes // 4)
        x = arr.pattern((count,), "float32", salt=2 * rank)
        for _ in range(a.w):
            reducer.allreduce(x).wait()
        t = timed(arr, a.n, lambda: reducer.allreduce(x))
        wrong = 0
        if a.check:
            y = arr.pattern((count,), "float32", salt=2 * rank)
            reducer.allreduce(y).wait()
            problems = check_mean(arr, y, "float32", count, comm, "bench")
            for p in problems:
                print(p, flush=True)
            wrong = 1 if problems else 0
        wrong = comm.allreduce(wrong)
        wrong_total += wrong
        algbw = count * 4 / t / 1e9
        if rank == 0:
            print(f" {count * 4:>12} {count:>12} {'float':>7} {t * 1e6:>10.1f} {algbw:>8.2f} "
                  f"{algbw * 2 * (size - 1) / size:>8.2f} {wrong if a.check else 'N/A':>7}", flush=True)
    if ch is not None:
        if rank == 0:
            print(f"# channel rank 0 -> rank 1\n#{'size':>12} {'time(us)':>10} {'GB/s':>8} {'#wrong':>7}")
        for nbytes in sizes:
            count = max(1, nbytes // 4)
            buf = arr.pattern((count,), "float32", salt=3) if rank == 0 else arr.empty((count,), "float32")

            def step():
                if rank == 0:
                    return ch.send((buf,))
                ch.recv_into((buf,))
                return None

            for _ in range(a.w):
                step()
            t = timed(arr, a.n, step)
            wrong = 0
            if a.check and rank == 1:
                wrong = 0 if arr.equal(buf, arr.pattern((count,), "float32", salt=3)) else 1
            wrong = comm.bcast(wrong, root=1)
            wrong_total += wrong
            if rank == 0:
                print(f" {count * 4:>12} {t * 1e6:>10.1f} {count * 4 / t / 1e9:>8.2f} "
                      f"{wrong if a.check else 'N/A':>7}", flush=True)
    if rank == 0:
        print(f"# #wrong {wrong_total}" + (": all checks passed" if a.check and wrong_total == 0 else ""))
    world.close()
    return 1 if wrong_total else 0


if __name__ == "__main__":
    sys.exit(main())
