"""NCCL benchmark: dpsgs's NCCL all-reduce and channel against torch.distributed's, side by side.

    mpirun -n 2 python -m dpsgs bench nccl --check            # 8 B .. 256 MiB, x4, -n 20 -w 5
    mpirun -n 4 python -m dpsgs bench nccl -b 8 -e 256M -f 4 -n 20 -w 5 --check --out FILE
    # several ranks on one GPU: the launcher gives each rank its own NCCL_HOSTID (docs/gpu.md)
    mpirun -n 2 bash -c 'export NCCL_HOSTID=bench-$PMI_RANK NCCL_SOCKET_IFNAME=lo; exec "$@"' \\
        share-gpu python -m dpsgs bench nccl --check

One run, the same ranks, sizes and GPU buffers (torch CUDA tensors) for both sides:
(a) all-reduce, mean, in place: dpsgs `TensorReducer.allreduce` (ncclAvg) against
`torch.distributed.all_reduce` over NCCL (ReduceOp.AVG; SUM then divide where AVG is
missing); nccl-tests columns and the busbw ratio dpsgs / torch. (b) With 2 ranks, channel
bandwidth rank 0 -> 1: dpsgs `TensorChannel` send / recv_into against torch `isend / irecv`.

Timing as nccl-tests: per size and side, warm-up calls, a barrier, then the calls back to
back and their completion (every Work waited, the device synchronised); time = the slowest
rank's total / calls. algbw = size / time, busbw = algbw * 2(n-1)/n (GB/s = 1e9 B/s).

--check: rank j contributes pattern + 2j (small integers), whose mean is pattern + (n-1);
exact for a power-of-two rank count, else within (n+1)*u*max|x| (u: the unit roundoff), and
every rank must hold rank 0's bits; #wrong counts the elements failing either; exit 1 on
any. Exit 2 with one line saying why where it cannot run (no GPU, torch without CUDA or
NCCL, dpsgs._C without the NCCL backend, ranks sharing a GPU without NCCL_HOSTID). Rank 0
writes JSON to --out, by default a new runs/bench/nccl-<np>ranks-<YYYYmmdd-HHMMSS>.json; an
--out that exists is refused (exit 2) unless --force.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from . import outputs
from .allreduce import bus_factor
from .harness import MIB, BenchContext, Table, add_common_args, command_line, element_counts, iters_for, \
    machine_info, pattern, ratio, run_on_world, size_sweep, time_iterations, write_json
from .launch import free_port
from .outputs import RUNS, stamp

__all__ = ["SECTIONS", "UNIT_ROUNDOFF", "allreduce_rows", "allreduce_table", "build_parser",
           "channel_rows", "channel_table", "count_wrong_mean", "default_out", "expected_mean",
           "gpu_layout", "layout_lines", "main", "mean_bound", "measure", "summarize",
           "summary_lines", "unavailable_reason"]

PROG = "dpsgs bench nccl"
# Unit roundoff of the dtypes the bench offers: the tolerance of a non-power-of-two mean.
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float64": 2.0 ** -53}
SECTIONS = ("allreduce", "channel")
SUMMARY_SIZES = (8, MIB, 64 * MIB, 256 * MIB)
CHANNEL_TAG = 7


# --- what can run here --------------------------------------------------------------------

def unavailable_reason() -> str | None:
    """Why this process cannot run the benchmark (None when it can): the dpsgs NCCL backend,
    a visible GPU, a CUDA build of torch, torch.distributed's NCCL backend."""
    from dpsgs.comm import nccl as dnccl

    ok, why = dnccl.available()
    if not ok:
        return why
    try:
        import torch
        import torch.distributed as dist
    except ImportError as e:
        return f"torch does not import: {e}"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} has no CUDA (a CPU build)"
    if not dist.is_available() or not dist.is_nccl_available():
        return f"torch {torch.__version__} has no NCCL backend in torch.distributed"
    return None


# --- the check ------------------------------------------------------------------------------

def expected_mean(count: int, nranks: int) -> np.ndarray:
    """The exact mean (float64) of rank j's pattern + 2j over j < n: pattern + (n-1)."""
    return pattern(count, np.float64, nranks - 1)


def mean_bound(count: int, nranks: int, dtype: str) -> np.ndarray | None:
    """Per element, how far an averaging all-reduce may land from the exact mean: None
    (exact) for a power-of-two rank count, where 1/n, every product and every partial sum of
    these small integers are exact; else (n+1)*u*max_j|x_j|: one rounding of 1/n, one per
    product, n-1 per sum (or, for SUM then divide, one for the division)."""
    if nranks & (nranks - 1) == 0:
        return None
    largest = pattern(count, np.float64, 2 * (nranks - 1))     # max_j |x_j| = pattern + 2(n-1)
    return (nranks + 1) * UNIT_ROUNDOFF[dtype] * largest


def count_wrong_mean(got: np.ndarray, nranks: int, dtype: str) -> int:
    """Elements of `got` (one rank's result) that are not the mean of the ranks' patterns
    within what NCCL guarantees (mean_bound)."""
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    exact = expected_mean(got.size, nranks)
    bound = mean_bound(got.size, nranks, dtype)
    if bound is None:
        return int(np.count_nonzero(got != exact))
    return int(np.count_nonzero(~(np.abs(got - exact) <= bound)))    # NaN counts as wrong


def _differs_from_root(comm: Any, got: np.ndarray) -> int:
    """Elements of this rank's result that differ from rank 0's bits (0 everywhere when the
    digests agree; rank 0's array travels only when one does not)."""
    digest = hashlib.sha256(got.tobytes()).hexdigest()
    root = comm.bcast(digest, root=0)
    if not comm.allreduce(int(digest != root)):
        return 0
    ref = got.copy()
    comm.Bcast(ref, root=0)
    bits = np.dtype(f"u{got.itemsize}")     # compare bits, not values (-0.0, NaN payloads)
    return int(np.count_nonzero(got.view(bits) != ref.view(bits)))


# --- where the ranks run ------------------------------------------------------------------

def _gpu_slot(device: int) -> dict[str, Any]:
    """This rank's GPU as the header and the JSON describe it."""
    import torch

    from dpsgs.comm.device import physical_gpu_id

    props = torch.cuda.get_device_properties(device)
    uuid = str(getattr(props, "uuid", "") or "")
    return {"host": socket.gethostname(), "nccl_hostid": os.environ.get("NCCL_HOSTID") or None,
            "device": device, "gpu": uuid or physical_gpu_id(
                device, os.environ.get("CUDA_VISIBLE_DEVICES")),
            "name": props.name, "memory_gib": round(props.total_memory / 2 ** 30, 1),
            "visible": torch.cuda.device_count()}


def gpu_layout(slots: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Ranks, hosts, GPUs visible (per host, the most any of its ranks sees) and in use, the
    most ranks on one GPU, and whether any GPU is shared (then NCCL ran over sockets)."""
    per_gpu = Counter((s["host"], s["gpu"]) for s in slots)
    visible: dict[str, int] = {}
    for s in slots:
        visible[s["host"]] = max(visible.get(s["host"], 0), int(s["visible"]))
    most = max(per_gpu.values(), default=0)
    return {"ranks": len(slots), "hosts": len(visible), "gpus_visible": sum(visible.values()),
            "gpus_used": len(per_gpu), "ranks_per_gpu": most, "shared": most > 1,
            "names": sorted({s["name"] for s in slots})}


def layout_lines(layout: dict[str, Any]) -> list[str]:
    """The header's lines on GPUs against ranks, with what a shared GPU's figures mean."""
    lines = [(f"# {layout['ranks']} ranks on {layout['hosts']} host(s): "
              f"{layout['gpus_visible']} GPU(s) visible, {layout['gpus_used']} in use "
              f"({', '.join(layout['names'])}), at most {layout['ranks_per_gpu']} rank(s) "
              "per GPU")]
    if layout["shared"]:
        lines.append("# SHARED GPU: several ranks per GPU, each with its own NCCL_HOSTID, so "
                     "NCCL connects them as separate hosts over its socket transport. These "
                     "are socket figures, not NVLink ones: they check correctness and compare "
                     "the two libraries' overheads, not link bandwidth.")
    else:
        lines.append("# one GPU per rank: NCCL picks its transport (NVLink/P2P/SHM within a "
                     "host, the network between hosts)")
    return lines


# --- timing ---------------------------------------------------------------------------------

def _time_per_call(ctx: BenchContext, calls: Callable[[int], None], iters: int,
                   sync: Callable[[], None]) -> float:
    """Seconds per call: warm-up calls, then (after a barrier) `iters` calls back to back and
    their completion, the slowest rank's time / iters (nccl-tests)."""
    if ctx.warmup:
        calls(ctx.warmup)
        sync()

    def body() -> None:
        calls(iters)
        sync()

    return time_iterations(body, 1, 0, ctx.comm).median / iters


def _wait_all(works: list[Any]) -> None:
    for w in works:
        w.wait()


class _Sides:
    """The two implementations' all-reduce and channel calls on this rank's GPU.

    What the sections need of a `sides` object (a CPU stand-in in the tests has the same):
    `torch`, `device`, `channel` (None: no channel table), `torch_redop`, `sync()`, and
    `allreduce(side, x)` / `transfer(side, buf)` returning calls(k), k calls of side
    "dpsgs" or "torch" on the buffer, waited for up to what sync() completes."""

    def __init__(self, ctx: BenchContext, ncomm: Any, device: int) -> None:
        import torch
        import torch.distributed as dist

        from dpsgs.comm import nccl as dnccl

        self.torch, self.dist, self.n = torch, dist, ctx.size
        self.device = torch.device("cuda", device)
        self.rank = ctx.rank
        self.channel = None
        if ctx.size == 2:   # the channel table is a 2-rank measurement (rank 0 -> 1)
            self.channel = dnccl.TensorChannel(ncomm, 1 - ctx.rank, CHANNEL_TAG, ctx.rank == 0,
                                               "bench nccl 0->1")
        ncomm.connect()     # collective, after every channel exists
        self.reducer = dnccl.TensorReducer(ncomm)
        # ncclAvg on both sides where torch has it: the same arithmetic, the same bound
        self.avg = getattr(dist.ReduceOp, "AVG", None)
        self.torch_redop = "avg" if self.avg is not None else "sum+div"

    def sync(self) -> None:
        self.torch.cuda.synchronize(self.device)

    def allreduce(self, side: str, x: Any) -> Callable[[int], None]:
        if side == "dpsgs":
            return lambda k: _wait_all([self.reducer.allreduce(x) for _ in range(k)])
        dist = self.dist
        if self.avg is not None:
            return lambda k: _wait_all([dist.all_reduce(x, op=self.avg, async_op=True)
                                        for _ in range(k)])

        def sum_then_divide(k: int) -> None:
            for _ in range(k):
                dist.all_reduce(x, op=dist.ReduceOp.SUM)
                x.div_(self.n)
        return sum_then_divide

    def transfer(self, side: str, buf: Any) -> Callable[[int], None]:
        """k messages of `buf` rank 0 -> 1 (rank 1 receives into `buf`)."""
        ch, dist = self.channel, self.dist
        if side == "dpsgs":
            if self.rank == 0:
                return lambda k: _wait_all([ch.send((buf,)) for _ in range(k)])

            def receive(k: int) -> None:
                for _ in range(k):
                    ch.recv_into((buf,))   # the current stream waits for it; sync() the host
            return receive
        if self.rank == 0:
            return lambda k: _wait_all([dist.isend(buf, 1) for _ in range(k)])
        return lambda k: _wait_all([dist.irecv(buf, 0) for _ in range(k)])

    def close(self) -> None:
        self.channel = self.reducer = None


def _device_pattern(sides: Any, count: int, dtype: str, salt: int) -> Any:
    return sides.torch.from_numpy(pattern(count, dtype, salt)).to(sides.device)


# --- the two sections -----------------------------------------------------------------------

def allreduce_table(dtype: str, torch_redop: str) -> Table:
    torch_label = "torch all_reduce (AVG)" if torch_redop == "avg" else "torch all_reduce (SUM, /n)"
    return Table("All-reduce, mean, in place, on GPU buffers (nccl-tests all_reduce_perf "
                 "columns; GB/s = 1e9 B/s; time = slowest rank's, per call)",
                 [("size(B)", 12), ("count", 12), ("type", 8), ("redop", 5),
                  ("time(us)", 10), ("algbw", 7), ("busbw", 7), ("#wrong", 6),
                  ("time(us)", 10), ("algbw", 7), ("busbw", 7), ("#wrong", 6), ("busbw", 7)],
                 [("", 4), ("dpsgs TensorReducer (ncclAvg)", 4), (torch_label, 4),
                  ("dp/torch", 1)])


def _allreduce_values(row: dict[str, Any]) -> list[Any]:
    return [row["size"], row["count"], row["type"], row["redop"],
            *(row[s][k] for s in ("dpsgs", "torch") for k in ("time_us", "algbw", "busbw",
                                                               "wrong")),
            row["ratio"]]


def allreduce_rows(ctx: BenchContext, sides: Any, sizes: list[int], dtype: str,
                    ) -> list[dict[str, Any]]:
    """One row per size, printed as it completes (a killed run keeps what it measured)."""
    itemsize = np.dtype(dtype).itemsize
    table = allreduce_table(dtype, sides.torch_redop)
    ctx.log(table.header())
    rows = []
    for count, size in element_counts(sizes, itemsize):
        init = _device_pattern(sides, count, dtype, 2 * ctx.rank)
        x = init.clone()     # one buffer for both sides, refilled from `init`
        iters = iters_for(size, ctx.iters)
        row: dict[str, Any] = {"size": size, "count": count, "type": dtype, "redop": "mean",
                               "iters": iters, "torch_redop": sides.torch_redop}
        for side in ("dpsgs", "torch"):
            calls = sides.allreduce(side, x)
            x.copy_(init)
            t = _time_per_call(ctx, calls, iters, sides.sync)
            wrong = None
            if ctx.check:
                x.copy_(init)
                calls(1)
                sides.sync()
                got = x.cpu().numpy()
                wrong = ctx.total(count_wrong_mean(got, ctx.size, dtype) +
                                  _differs_from_root(ctx.comm, got))
            algbw = size / t / 1e9
            row[side] = {"time_us": t * 1e6, "algbw": algbw, "busbw": algbw * bus_factor(
                ctx.size), "wrong": wrong}
        # the busbw ratio is the algbw ratio (same factor); algbw also means something at n=1
        row["ratio"] = ratio(row["dpsgs"]["algbw"], row["torch"]["algbw"])
        ctx.log(table.row(_allreduce_values(row)))
        rows.append(row)
    return rows


def channel_table() -> Table:
    return Table("Channel bandwidth, rank 0 -> 1, GPU buffers (back-to-back messages; "
                 "GB/s = 1e9 B/s)",
                 [("size(B)", 12), ("count", 12), ("iters", 6),
                  ("time(us)", 10), ("GB/s", 7), ("#wrong", 6),
                  ("time(us)", 10), ("GB/s", 7), ("#wrong", 6), ("GB/s", 7)],
                 [("", 3), ("dpsgs TensorChannel", 3), ("torch isend/irecv", 3),
                  ("dp/torch", 1)])


def channel_rows(ctx: BenchContext, sides: Any, sizes: list[int], dtype: str,
                  ) -> dict[str, Any]:
    if sides.channel is None:
        return {"rows": [], "note": f"needs exactly 2 ranks (ran with {ctx.size})"}
    itemsize = np.dtype(dtype).itemsize
    table = channel_table()
    ctx.log(table.header())
    rows = []
    for count, size in element_counts(sizes, itemsize):
        sent = _device_pattern(sides, count, dtype, 3)
        buf = sent if ctx.rank == 0 else sides.torch.zeros_like(sent)
        iters = iters_for(size, ctx.iters)
        row: dict[str, Any] = {"size": size, "count": count, "type": dtype, "iters": iters}
        for side in ("dpsgs", "torch"):
            calls = sides.transfer(side, buf)
            t = _time_per_call(ctx, calls, iters, sides.sync)
            wrong = None
            if ctx.check:
                if ctx.rank == 1:
                    buf.zero_()
                calls(1)
                sides.sync()
                mine = int(sides.torch.count_nonzero(buf != sent)) if ctx.rank == 1 else 0
                wrong = ctx.total(mine)
            row[side] = {"time_us": t * 1e6, "gbps": size / t / 1e9, "wrong": wrong}
        row["ratio"] = ratio(row["dpsgs"]["gbps"], row["torch"]["gbps"])
        ctx.log(table.row([size, count, iters,
                           *(row[s][k] for s in ("dpsgs", "torch")
                             for k in ("time_us", "gbps", "wrong")), row["ratio"]]))
        rows.append(row)
    return {"rows": rows, "ranks": [0, 1]}


def measure(ctx: BenchContext, sides: Any, sizes: list[int], sections: Sequence[str],
            dtype: str) -> dict[str, Any]:
    """The sections asked for, tables printed as they go: {"allreduce": rows, "channel":
    {"rows": rows, "note" where not measured}}."""
    results: dict[str, Any] = {"allreduce": [], "channel": {"rows": []}}
    if "allreduce" in sections:
        results["allreduce"] = allreduce_rows(ctx, sides, sizes, dtype)
    if "channel" in sections:
        results["channel"] = channel_rows(ctx, sides, sizes, dtype)
        if results["channel"].get("note"):
            ctx.log(f"# channel: not measured: {results['channel']['note']}")
    return results


# --- summary --------------------------------------------------------------------------------

def _at(rows: list[dict[str, Any]], size: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["size"] == size), None)


def summarize(allreduce: list[dict[str, Any]], channel: list[dict[str, Any]],
              checked: bool) -> dict[str, Any]:
    """The summary's figures: nccl-tests' average busbw per side, the ratios at 1 MiB,
    64 MiB and the largest size, the lowest ratio, and the total #wrong (None unchecked)."""
    def ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
        out = {label: (_at(rows, size) or {}).get("ratio")
               for label, size in (("1M", MIB), ("64M", 64 * MIB))}
        if rows:
            out["largest"] = rows[-1]["ratio"]
        return out

    s: dict[str, Any] = {
        "avg_busbw": {side: (float(np.mean([r[side]["busbw"] for r in allreduce]))
                             if allreduce else None) for side in ("dpsgs", "torch")},
        "allreduce_ratio": ratios(allreduce), "channel_ratio": ratios(channel),
        "largest": allreduce[-1]["size"] if allreduce else None}
    valid = [r for r in allreduce if r["ratio"] is not None]
    low = min(valid, key=lambda r: r["ratio"], default=None)
    s["allreduce_ratio_lowest"] = {"ratio": low["ratio"], "size": low["size"]} if low else None
    s["wrong"] = (sum(r[side]["wrong"] for r in [*allreduce, *channel]
                      for side in ("dpsgs", "torch")) if checked else None)
    return s


def _r(v: float | None) -> str:
    return "N/A" if v is None else f"{v:.2f}x"


def _gbps(v: float | None) -> str:
    return "N/A" if v is None else f"{v:.2f}"


def summary_lines(s: dict[str, Any], layout: dict[str, Any]) -> list[str]:
    """nccl-tests' closing lines, the ratios, the shared-GPU caveat, the check's verdict."""
    avg, low = s["avg_busbw"], s["allreduce_ratio_lowest"]
    ar, ch = s["allreduce_ratio"], s["channel_ratio"]
    lowest = f"; lowest {_r(low['ratio'])} at {low['size']} B" if low else ""
    lines = [(f"# Avg bus bandwidth    : dpsgs {_gbps(avg['dpsgs'])} GB/s, torch "
              f"{_gbps(avg['torch'])} GB/s"),
             (f"# all-reduce busbw dpsgs/torch: 1M {_r(ar.get('1M'))}, 64M "
              f"{_r(ar.get('64M'))}, largest {_r(ar.get('largest'))}{lowest}")]
    if "largest" in ch:
        lines.append(f"# channel GB/s dpsgs/torch: 1M {_r(ch.get('1M'))}, 64M "
                     f"{_r(ch.get('64M'))}, largest {_r(ch.get('largest'))}")
    if layout.get("shared"):
        lines.append(f"# (shared GPU: {layout['ranks_per_gpu']} ranks per GPU over NCCL's "
                     "socket transport: socket figures, not NVLink ones)")
    wrong = s["wrong"]
    lines.append("# Out of bounds values : " + ("N/A (no --check)" if wrong is None else
                                                 f"{wrong} {'OK' if wrong == 0 else 'FAILED'}"))
    return lines


# --- entry point ----------------------------------------------------------------------------

def default_out(nprocs: int, when: str | None = None) -> Path:
    """runs/bench/nccl-<np>ranks-<when>.json; `when` defaults to now (a new file per run)."""
    return RUNS / f"nccl-{nprocs}ranks-{when or stamp()}.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpsgs bench nccl",
                                description=__doc__.splitlines()[0])
    add_common_args(p, maxbytes="256M")
    p.add_argument("-d", "--dtype", default="float32", choices=tuple(UNIT_ROUNDOFF),
                   help="element type (default float32)")
    p.add_argument("--only", default="allreduce,channel",
                   help="comma-separated sections: allreduce, channel (default both)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="NCCL init and wait deadline, seconds, both sides (default 300)")
    outputs.add_out_args(p, "nccl", folder=False)
    return p


def _refuse(comm: Any, why: str | None) -> bool:
    """Collective: True on every rank when any rank has a reason; rank 0 prints the first
    one, on one line."""
    reasons = comm.allgather(why)
    first = next(((r, w) for r, w in enumerate(reasons) if w), None)
    if first and comm.Get_rank() == 0:
        where = f" (rank {first[0]})" if comm.Get_size() > 1 and len(set(reasons)) > 1 else ""
        print(f"{PROG}: cannot run here: {first[1]}{where}", file=sys.stderr, flush=True)
    return first is not None


def _init_torch(comm: Any, device: int, timeout: float) -> None:
    """torch.distributed over NCCL on `device`: rank and size from MPI, rendezvous at
    MASTER_ADDR/PORT (as the launcher set them, else rank 0's choice, broadcast)."""
    import torch
    import torch.distributed as dist

    hosts = comm.allgather(socket.gethostname())
    where = None
    if comm.Get_rank() == 0:
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if len(set(hosts)) == 1
                                                 else hosts[0])
        where = (addr, os.environ.get("MASTER_PORT") or str(free_port()))
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = comm.bcast(where, root=0)
    dist.init_process_group("nccl", rank=comm.Get_rank(), world_size=comm.Get_size(),
                            timeout=timedelta(seconds=timeout),
                            device_id=torch.device("cuda", device))


def _versions(ncomm_info: dict[str, Any]) -> dict[str, Any]:
    import torch

    try:
        v = torch.cuda.nccl.version()
        torch_nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:  # noqa: BLE001 - only a label
        torch_nccl = None
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "torch_nccl": torch_nccl, "dpsgs_nccl": ncomm_info.get("nccl_version"),
            "dpsgs_cuda": ncomm_info.get("cuda_version")}


def _run(args: argparse.Namespace, argv: list[str], comm: Any) -> int:
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    # before any work: a run that would overwrite another's results stops here, on all ranks
    out, refused = comm.bcast(outputs.resolve_out("dpsgs.bench.nccl", args.out, args.force,
                                                  default_out(comm.Get_size()))
                              if comm.Get_rank() == 0 else None, root=0)
    if refused:
        if comm.Get_rank() == 0:
            print(refused, file=sys.stderr, flush=True)
        return 2
    if _refuse(comm, unavailable_reason()):
        return 2

    from dpsgs import _C
    from dpsgs.comm import nccl as dnccl
    from dpsgs.comm.device import SharedGPUError

    try:
        ncomm = dnccl.init(comm, timeout=args.timeout)
    except SharedGPUError as e:     # raised alike on every rank, before NCCL starts
        _refuse(comm, f"{e} (to share a GPU for testing, give each rank its own NCCL_HOSTID "
                      "in the launcher: docs/gpu.md)")
        return 2
    _init_torch(comm, ncomm.device, args.timeout)
    import torch.distributed as dist

    ctx = BenchContext(comm, ncomm, args.iters, args.warmup, args.check)
    sides = _Sides(ctx, ncomm, ncomm.device)
    slots = comm.allgather(_gpu_slot(ncomm.device))
    layout = gpu_layout(slots)
    info = machine_info(comm, dict(_C.build_info()))
    info.update(gpus=slots, gpu_layout=layout, versions=_versions(dict(_C.build_info())))
    v = info["versions"]
    sizes = size_sweep(args.minbytes, args.maxbytes, args.stepfactor, SUMMARY_SIZES)
    ctx.log(f"# dpsgs.bench.nccl: dpsgs NCCL vs torch.distributed NCCL; {info['cpu_model']}, "
            f"{info['cpu_count']} cores, load {info['loadavg']}")
    for line in layout_lines(layout):
        ctx.log(line)
    ctx.log(f"# torch {v['torch']} (CUDA {v['torch_cuda']}, NCCL {v['torch_nccl']}); dpsgs._C "
            f"built with NCCL {v['dpsgs_nccl']}, CUDA {v['dpsgs_cuda']}; {info['mpi_library']}")
    ctx.log(f"# sizes {args.minbytes}..{args.maxbytes} x{args.stepfactor}; -n {args.iters} "
            f"(x up to 10 below 1 MiB) -w {args.warmup}; {args.dtype}; check "
            f"{'on' if args.check else 'off'}")

    results = measure(ctx, sides, sizes, sections, args.dtype)
    summary = summarize(results["allreduce"], results["channel"]["rows"], args.check)
    wrong = summary["wrong"] or 0
    if ctx.rank == 0:
        for line in summary_lines(summary, layout):
            print(line, flush=True)
        if out is not None:
            data = {"benchmark": "dpsgs.bench.nccl", "format": 1,
                    "command": command_line("dpsgs.bench.nccl", argv, ctx.size),
                    "argv": list(argv), "process_argv": [sys.executable, *sys.argv],
                    "nprocs": ctx.size, "args": dict(vars(args)), "machine": info,
                    "checked": args.check, "sizes": sizes, **results, "summary": summary,
                    "wrong": wrong, "ok": (wrong == 0) if args.check else None}
            path = write_json(out, data, overwrite=args.force and args.out is not None)
            print(f"# JSON: {path}", flush=True)
    # teardown while every rank is here: dpsgs's communicators (bounded), then torch's group
    sides.close()
    comm.Barrier()
    ncomm.close()
    comm.Barrier()
    dist.destroy_process_group()
    return 1 if args.check and wrong else 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on COMM_WORLD; the exit code (1 on wrong data, 2 where it cannot
    run). Any other error on any rank aborts the whole job, so no peer hangs in NCCL."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)     # --help and bad options need no MPI
    return run_on_world(lambda comm: _run(args, argv, comm))


if __name__ == "__main__":
    sys.exit(main())
