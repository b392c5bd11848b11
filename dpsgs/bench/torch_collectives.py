"""torch.distributed collectives over gloo and over "dpsgs", through the torch API, beside the
core's own all-reduce: what the Python process-group layer costs on top of the core.

    mpirun -n 2 python -m dpsgs.bench.torch_collectives --check            # 8 B .. 64 MiB, x4
    mpirun -n 2 python -m dpsgs.bench.torch_collectives --ops allreduce -e 16M --out FILE
    mpirun -n 2 python -m dpsgs.bench.torch_collectives --check --out bench/results/torch-collectives-2ranks.json --force

One job: the default group is "dpsgs" (init_method="mpi://"), gloo a second group over the
same ranks and store. Per operation and size (nccl-tests columns and -b -e -f -n -w -c):
gloo (`dist.<op>(..., group=gloo)`: all_reduce, broadcast, all_gather_single,
reduce_scatter_single, all_to_all_single), dpsgs (the same call on the dpsgs group) and, for
all-reduce, core (`dpsgs._C.Reducer(comm, "auto").allreduce(buf, False).wait()`, the
figure `dpsgs.bench.comm` reports as dpsgs.auto). Each iteration: refill (untimed), barrier,
the timed call; the slowest rank's time. Sum in float32; inputs as bench.comm's, so the
check is exact. size = the largest buffer per rank (all-gather: its output; reduce-scatter:
its input). busbw = algbw x 2(n-1)/n (all-reduce), (n-1)/n (all-gather, reduce-scatter,
all-to-all), 1 (broadcast). Ratios: dpsgs/gloo (busbw), dpsgs/core (busbw; < 1 is the
process-group layer's cost) and its time in us. JSON by default to a new
runs/bench/torch-collectives-<np>ranks-<YYYYmmdd-HHMMSS>.json; an --out that exists is
refused unless --force. Exit 1 when --check finds wrong data.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np

from . import outputs
from .allreduce import expected_sum
from .harness import MIB, BenchContext, Table, add_common_args, command_line, count_wrong, \
    element_counts, iters_for, machine_info, pattern, ratio, run_on_world, size_sweep, \
    time_iterations, write_json
from .outputs import RUNS, stamp

__all__ = ["OPS", "bus_factor", "build_parser", "main", "run_op"]

OPS = ("allreduce", "broadcast", "allgather", "reduce_scatter", "alltoall")


def bus_factor(op: str, n: int) -> float:
    """busbw / algbw of `op` on n ranks (nccl-tests' PERFORMANCE.md)."""
    if op == "allreduce":
        return 2.0 * (n - 1) / n
    if op == "broadcast":
        return 1.0
    return (n - 1) / n


class Case:
    """One operation at one size: this rank's buffers, the timed bodies, the expected output."""

    def __init__(self, op: str, count: int, rank: int, n: int) -> None:
        import torch

        self.op, self.n = op, n
        per = count // n if op in ("allgather", "reduce_scatter", "alltoall") else count
        self.count = per * n if op in ("allgather", "reduce_scatter", "alltoall") else count
        mine = pattern(self.count if op != "allgather" else per, np.float32, rank)
        self.init = torch.from_numpy(mine.copy())
        self.inp = self.init.clone()
        out_len = {"allgather": self.count, "reduce_scatter": per}.get(op, self.count)
        self.out = torch.empty(out_len, dtype=torch.float32)
        everyone = [pattern(self.count if op != "allgather" else per, np.float32, q) for q in range(n)]
        if op == "allreduce":
            self.expect = expected_sum(self.count, np.dtype(np.float32), n)
        elif op == "broadcast":
            self.expect = everyone[0]
        elif op == "allgather":
            self.expect = np.concatenate(everyone)
        elif op == "reduce_scatter":
            self.expect = expected_sum(self.count, np.dtype(np.float32), n)[rank * per:(rank + 1) * per]
        else:   # alltoall: block q of the output is block `rank` of rank q's input
            self.expect = np.concatenate([e[rank * per:(rank + 1) * per] for e in everyone])

    @property
    def nbytes(self) -> int:
        """The largest buffer per rank (all-gather's output, reduce-scatter's input)."""
        return 4 * self.count

    def reset(self) -> None:
        self.inp.copy_(self.init)

    def body(self, group: Any) -> Callable[[], None]:
        import torch.distributed as dist

        op, inp, out = self.op, self.inp, self.out
        if op == "allreduce":
            return lambda: dist.all_reduce(inp, group=group)
        if op == "broadcast":
            return lambda: dist.broadcast(inp, src=0, group=group)
        if op == "allgather":
            return lambda: dist.all_gather_single(out, inp, group=group)
        if op == "reduce_scatter":
            return lambda: dist.reduce_scatter_single(out, inp, group=group)
        return lambda: dist.all_to_all_single(out, inp, group=group)

    def result(self) -> np.ndarray:
        return (self.inp if self.op in ("allreduce", "broadcast") else self.out).numpy()


def run_op(ctx: BenchContext, op: str, sizes: list[int], groups: dict[str, Any],
           core: Any | None) -> list[dict[str, Any]]:
    """One row per size: each variant's timing, algbw, busbw, #wrong and the ratios."""
    n = ctx.size
    rows = []
    for count, _ in element_counts(sizes, 4):
        if count < n and op in ("allgather", "reduce_scatter", "alltoall"):
            continue
        case = Case(op, count, ctx.rank, n)
        size = case.nbytes
        iters = iters_for(size, ctx.iters)
        row: dict[str, Any] = {"size": size, "count": case.count, "type": "float32", "redop": "sum",
                               "iters": iters, "variants": {}}
        bodies = {name: case.body(g) for name, g in groups.items()}
        if op == "allreduce" and core is not None:
            buf = case.inp.numpy()
            bodies["core"] = lambda: core.allreduce(buf, False).wait()
        for name, body in bodies.items():
            t = time_iterations(body, iters, ctx.warmup, ctx.comm, setup=case.reset)
            wrong = ctx.total(count_wrong(case.result(), case.expect)) if ctx.check else None
            algbw = size / t.median / 1e9
            row["variants"][name] = {**t.to_dict(), "algbw": algbw, "busbw": algbw * bus_factor(op, n),
                                     "wrong": wrong}
        v = row["variants"]
        row["dpsgs_over_gloo"] = ratio(v["dpsgs"]["busbw"], v["gloo"]["busbw"])
        if "core" in v:
            row["dpsgs_over_core"] = ratio(v["dpsgs"]["busbw"], v["core"]["busbw"])
            row["layer_us"] = v["dpsgs"]["median_us"] - v["core"]["median_us"]
        rows.append(row)
    return rows


def table(op: str, rows: list[dict[str, Any]], n: int) -> str:
    names = list(rows[0]["variants"]) if rows else ["gloo", "dpsgs"]
    cols = [("size", 12), ("count", 11), ("type", 7), ("redop", 6)]
    groups = [("", 4)]
    for name in names:
        cols += [("time(us)", 9), ("algbw", 7), ("busbw", 7), ("#wrong", 6)]
        groups.append((name, 4))
    cols += [("dpsgs/gloo", 10)]
    if "core" in names:
        cols += [("dpsgs/core", 10), ("layer us", 9)]
    groups.append(("ratios", len(cols) - 4 - 4 * len(names)))
    t = Table(f"{op} through torch.distributed, {n} ranks (busbw factor {bus_factor(op, n):.2f}); "
              f"core = dpsgs._C.Reducer auto", cols, groups)
    out = []
    for r in rows:
        cells: list[Any] = [r["size"], r["count"], r["type"], r["redop"] if op in ("allreduce", "reduce_scatter")
                            else "none"]
        for name in names:
            x = r["variants"][name]
            cells += [x["median_us"], x["algbw"], x["busbw"], "N/A" if x["wrong"] is None else x["wrong"]]
        cells.append(r["dpsgs_over_gloo"])
        if "core" in names:
            cells += [r["dpsgs_over_core"], r["layer_us"]]
        out.append(cells)
    return t.render(out)


def summary(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per operation: dpsgs/gloo busbw at 1 MiB and at the largest size; all-reduce also
    dpsgs/core there; the total #wrong."""
    out: dict[str, Any] = {"wrong": 0}
    for op, rows in results.items():
        for r in rows:
            out["wrong"] += sum(v["wrong"] or 0 for v in r["variants"].values())
        at = {r["size"]: r for r in rows}
        pick = {"1M": at.get(MIB), "largest": rows[-1] if rows else None}
        out[op] = {k: None if r is None else {
            "size": r["size"], "dpsgs_over_gloo": r["dpsgs_over_gloo"],
            "dpsgs_over_core": r.get("dpsgs_over_core"), "layer_us": r.get("layer_us")}
            for k, r in pick.items()}
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpsgs.bench.torch_collectives",
                                description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated operations ({','.join(OPS)})")
    p.add_argument("--timeout", type=float, default=120.0, help="group timeout, seconds (default 120)")
    outputs.add_out_args(p, "torch-collectives", folder=False, force_example="e.g. the published results")
    return p


def _run(args: argparse.Namespace, argv: list[str], comm: Any) -> int:
    import torch
    import torch.distributed as dist

    from dpsgs import _C

    from .peers.common import gloo_beside_dpsgs

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise SystemExit(f"--ops: unknown operation(s) {unknown}; known: {list(OPS)}")
    default = RUNS / f"torch-collectives-{comm.Get_size()}ranks-{stamp()}.json"
    out, refused = comm.bcast(outputs.resolve_out("dpsgs.bench.torch_collectives", args.out, args.force, default)
                              if comm.Get_rank() == 0 else None, root=0)
    if refused:
        if comm.Get_rank() == 0:
            print(refused, file=sys.stderr, flush=True)
        return 2
    torch.set_num_threads(1)
    groups = gloo_beside_dpsgs(timedelta(seconds=args.timeout))
    core = _C.Reducer(_C.Communicator(comm, timeout=args.timeout), "auto")
    ctx = BenchContext(comm, None, args.iters, args.warmup, args.check)
    info = machine_info(comm, dict(_C.build_info()))
    info["torch"] = torch.__version__
    sizes = size_sweep(args.minbytes, args.maxbytes, args.stepfactor, (8, MIB, 64 * MIB))
    ctx.log(f"# dpsgs.bench.torch_collectives: {ctx.size} ranks; {info['cpu_model']}, {info['cpu_count']} "
            f"cores, load {info['loadavg']}; torch {torch.__version__}, {info['mpi_library']}")
    ctx.log(f"# sizes {args.minbytes}..{args.maxbytes} x{args.stepfactor}; -n {args.iters} -w {args.warmup}; "
            f"check {'on' if args.check else 'off'}; 1 intra-op thread per rank")
    results = {op: run_op(ctx, op, sizes, groups, core) for op in ops}
    summ = summary(results)
    wrong = int(comm.bcast(summ["wrong"], root=0))
    if ctx.rank == 0:
        for op in ops:
            print(table(op, results[op], ctx.size))
        for op in ops:
            for k, s in summ[op].items():
                if s is not None:
                    extra = "" if s["dpsgs_over_core"] is None else \
                        f", dpsgs/core {s['dpsgs_over_core']:.2f} ({s['layer_us']:+.1f} us)"
                    print(f"# {op} at {s['size']} B ({k}): dpsgs/gloo busbw {s['dpsgs_over_gloo']:.2f}{extra}")
        print(f"# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}" if args.check
              else "# (not checked: pass --check)")
        if out is not None:
            data = {"benchmark": "dpsgs.bench.torch_collectives", "format": 1,
                    "command": command_line("dpsgs.bench.torch_collectives", argv, ctx.size),
                    "argv": list(argv), "nprocs": ctx.size, "args": dict(vars(args)), "machine": info,
                    "checked": args.check, "sizes": sizes, **results, "summary": summ, "wrong": wrong,
                    "ok": (wrong == 0) if args.check else None}
            path = write_json(out, data, overwrite=args.force and args.out is not None)
            print(f"# JSON: {path}", flush=True)
    for g in list(groups.values())[:1]:
        dist.barrier(group=g)
    dist.destroy_process_group()
    return 1 if args.check and wrong else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return run_on_world(lambda comm: _run(args, argv, comm))


if __name__ == "__main__":
    sys.exit(main())
