"""Rank program: the NCCL benchmark's sections, check and summary rehearsed on CPU, where
dpsgs's MPI Reducer/Channel and torch.distributed over gloo stand in for the two NCCL sides
(the same calls(k)/sync() face), so everything but the CUDA calls runs under real ranks.

    MASTER_ADDR=127.0.0.1 MASTER_PORT=... mpirun -n N python -m mpi4py nccl_bench_cpu_ranks.py \
        OUT.json [--dtype float64] [--corrupt]

--corrupt: rank 0 adds 1 to element 0 of every dpsgs result (all-reduce) and rank 1 to
every received message's element 0 (channel): the check must count exactly those elements.
Exit status as the benchmark's: 1 when the check finds wrong data.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from mpi4py import MPI

from dpsgs import _C
from dpsgs.bench import nccl as bench
from dpsgs.bench.harness import BenchContext, size_sweep
from dpsgs.bench.peers.common import close_gloo, init_gloo


def _waited(works: list[Any]) -> None:
    for w in works:
        w.wait()


class CpuSides:
    """dpsgs (MPI, CPU) and torch.distributed (gloo) with the benchmark's sides face."""

    def __init__(self, ctx: BenchContext, corrupt: bool) -> None:
        self.torch, self.device, self.n, self.rank = torch, torch.device("cpu"), ctx.size, ctx.rank
        self.corrupt = corrupt
        self.torch_redop = "sum+div"          # gloo has no AVG: the fallback path
        self.reducer = _C.Reducer(ctx.dp, "auto")
        self.channel = None
        if ctx.size == 2:
            peer = 1 - ctx.rank
            self.channel = (_C.Channel(ctx.dp, peer, 40 + ctx.rank, True, "out"),
                            _C.Channel(ctx.dp, peer, 40 + peer, False, "in"))

    def sync(self) -> None:
        pass

    def _spoil(self, x: torch.Tensor, rank: int) -> None:
        if self.corrupt and self.rank == rank:
            x.view(-1)[0] += 1

    def allreduce(self, side: str, x: torch.Tensor) -> Callable[[int], None]:
        arr = x.numpy()                       # shares x's memory

        def dpsgs_calls(k: int) -> None:
            for _ in range(k):
                self.reducer.allreduce(arr, True).wait()
            self._spoil(x, 0)

        def torch_calls(k: int) -> None:
            for _ in range(k):
                dist.all_reduce(x, op=dist.ReduceOp.SUM)
                x.div_(self.n)
        return dpsgs_calls if side == "dpsgs" else torch_calls

    def transfer(self, side: str, buf: torch.Tensor) -> Callable[[int], None]:
        out, inp = self.channel
        arr = buf.numpy()
        if side == "dpsgs":
            if self.rank == 0:
                return lambda k: _waited([out.send([arr]) for _ in range(k)])

            def receive(k: int) -> None:
                for _ in range(k):
                    np.copyto(arr, inp.recv()[0])
                self._spoil(buf, 1)
            return receive
        if self.rank == 0:
            return lambda k: _waited([dist.isend(buf, 1) for _ in range(k)])
        return lambda k: _waited([dist.irecv(buf, 0) for _ in range(k)])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--corrupt", action="store_true")
    a = p.parse_args()
    comm = MPI.COMM_WORLD
    init_gloo(comm.rank, comm.size, 29530)
    ctx = BenchContext(comm, _C.Communicator(comm, timeout=60.0), iters=2, warmup=1, check=True)
    sides = CpuSides(ctx, a.corrupt)
    sizes = size_sweep(8, 64 << 10, 8)
    results: dict[str, Any] = bench.measure(ctx, sides, sizes, bench.SECTIONS, a.dtype)
    summary = bench.summarize(results["allreduce"], results["channel"]["rows"], True)
    if ctx.rank == 0:
        for line in bench.summary_lines(summary, {"shared": False}):
            print(line, flush=True)
        with open(a.out, "w") as f:
            json.dump({**results, "summary": summary, "sizes": sizes}, f)
    sides.channel = None
    comm.Barrier()
    close_gloo()
    return 1 if summary["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
