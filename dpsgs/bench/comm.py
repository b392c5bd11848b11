"""Communication benchmark entry point: p2p, all-reduce and overlap, dpsgs vs raw mpi4py.

    mpirun -n 2 python -m dpsgs.bench.comm                      # 8 B .. 64 MiB, x4
    mpirun -n 2 python -m dpsgs.bench.comm --check --out bench/results/comm-2ranks.json --force
    mpirun -n 2 python -m dpsgs.bench.comm -b 8 -e 64M -f 4 -n 20 -w 5 --check --out FILE
    mpirun -n 2 python -m dpsgs.bench.comm --raw-only -e 1M     # mpi4py side only
    python -m dpsgs bench comm ...                              # the same, via the CLI

Prints nccl-tests/OSU-style tables with dpsgs and raw side by side and ratio columns,
then summary lines; rank 0 writes JSON (machine info, command line, every row) to --out,
by default a new file per run, runs/bench/comm-<np>ranks-<YYYYmmdd-HHMMSS>.json (the
published figures in bench/results are written only when named). An --out that exists is
refused (exit 2) unless --force. Exit 1 when --check finds wrong data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import outputs
from .harness import MIB, BenchContext, add_common_args, command_line, machine_info, \
    parse_size, run_on_world, size_sweep, write_json
from .outputs import RUNS, stamp
from .report import print_tables, summarize, summary_lines
from .threads import compute_threads, pin_compute_threads, threads_line

__all__ = ["SECTIONS", "build_parser", "default_out", "main", "resolve_out"]

SECTIONS = ("p2p", "allreduce", "overlap")
SUMMARY_SIZES = (8, MIB, 64 * MIB)


def default_out(nprocs: int, when: str | None = None) -> Path:
    """runs/bench/comm-<np>ranks-<when>.json under the current directory; `when` defaults
    to now (YYYYmmdd-HHMMSS), so each run gets its own file."""
    return RUNS / f"comm-{nprocs}ranks-{when or stamp()}.json"


def resolve_out(out: str | None, force: bool, nprocs: int) -> tuple[str | None, str | None]:
    """(the JSON path, None for '-'; the one-line refusal, or None). Rank 0 decides and
    broadcasts it, so every rank agrees on the name and on exiting."""
    return outputs.resolve_out("dpsgs.bench.comm", out, force, default_out(nprocs))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpsgs.bench.comm",
                                description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("-d", "--dtype", default="float32",
                   choices=("float32", "float64", "int32", "int64"),
                   help="all-reduce element type (default float32)")
    p.add_argument("--algorithms", default="auto,ring,mpi,auto+blocking",
                   help="dpsgs Reducer algorithms to time; auto+blocking = auto with the "
                        "opt-in blocking MPI_Allreduce below 256 KiB (default "
                        "auto,ring,mpi,auto+blocking)")
    p.add_argument("--window", type=int, default=64, help="osu_bw window (default 64)")
    p.add_argument("--tensors", type=int, default=1,
                   help="p2p: tensors per dpsgs message, the size split among them (1..16; "
                        "default 1)")
    p.add_argument("--window-bytes", type=parse_size, default=parse_size("128M"),
                   help="cap on bytes per window; window >= 2 (default 128M)")
    p.add_argument("--compute", default="numpy", choices=("numpy", "sleep"),
                   help="overlap dummy compute: numpy = fixed NumPy work on the core (OSU-like, "
                        "default); sleep = time.sleep, leaves the core free (diagnostic)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run (default {','.join(SECTIONS)})")
    p.add_argument("--raw-only", action="store_true",
                   help="skip dpsgs (its extension is not built); raw mpi4py side only")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="dpsgs wait deadline in seconds (default 120)")
    outputs.add_out_args(p, "comm", folder=False, force_example="e.g. the published results")
    return p


def _open_dpsgs(comm: Any, timeout: float) -> tuple[Any, dict[str, Any]]:
    from dpsgs import _C
    return _C.Communicator(comm, timeout=timeout), dict(_C.build_info())


def _run(args: argparse.Namespace, argv: list[str], comm: Any, who: dict[str, str]) -> int:
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    if not 1 <= args.tensors <= 16:
        raise SystemExit(f"--tensors {args.tensors}: a channel message holds 1 to 16 tensors")
    # before any work: a run that would overwrite another's results stops here, on all ranks
    out, refused = comm.bcast(resolve_out(args.out, args.force, comm.Get_size())
                              if comm.Get_rank() == 0 else None, root=0)
    if refused:
        if comm.Get_rank() == 0:
            print(refused, file=sys.stderr, flush=True)
        return 2
    dp, dp_info = None, None
    if not args.raw_only:
        try:
            dp, dp_info = _open_dpsgs(comm, args.timeout)
        except ImportError as e:
            if comm.Get_rank() == 0:
                print(f"dpsgs bench: cannot import dpsgs._C ({e}). Build it first "
                      "(pip install --no-build-isolation -e .) or pass --raw-only.",
                      file=sys.stderr, flush=True)
            return 2
    ctx = BenchContext(comm, dp, args.iters, args.warmup, args.check)
    sizes = size_sweep(args.minbytes, args.maxbytes, args.stepfactor, SUMMARY_SIZES)
    algorithms = tuple(a.strip() for a in args.algorithms.split(",") if a.strip())
    info = machine_info(comm, dp_info)
    # every rank's: a rank whose launcher passed other variables shows
    info["compute_threads"] = comm.allgather(compute_threads(who))
    ctx.log(f"# dpsgs.bench.comm: {ctx.size} ranks on {', '.join(info['hosts'])}; "
            f"{info['cpu_model']}, {info['cpu_count']} cores, load {info['loadavg']}")
    ctx.log(f"# {info['mpi_library']}; mpi4py {info['mpi4py']}; numpy {info['numpy']}; "
            f"dpsgs {'on' if dp is not None else 'OFF (--raw-only)'}")
    ctx.log(f"# sizes {args.minbytes}..{args.maxbytes} x{args.stepfactor} (+end, 1M, 64M); "
            f"-n {args.iters} -w {args.warmup}; check {'on' if args.check else 'off'}")
    if "overlap" in sections:
        ctx.log(threads_line(info["compute_threads"]))

    results: dict[str, Any] = {}
    if "p2p" in sections:
        from . import p2p
        results["p2p"] = p2p.run(ctx, sizes, args.window, args.window_bytes, args.tensors)
    if "allreduce" in sections:
        from . import allreduce
        results["allreduce"] = allreduce.run(ctx, sizes, args.dtype, algorithms)
    if "overlap" in sections:
        from . import overlap
        results["overlap"] = overlap.run(ctx, sizes, args.dtype, algorithms[0],
                                         args.compute)

    summary = summarize(results, ctx.size)
    # p2p rows live on ranks 0 and 1 only: rank 0's count decides every rank's exit code.
    wrong = int(comm.bcast(summary["wrong"], root=0))
    if ctx.rank == 0:
        print_tables(results, ctx.size, dp is not None)
        for line in summary_lines(summary, ctx.size, args, info):
            print(line)
        if out is not None:
            data = {"benchmark": "dpsgs.bench.comm", "format": 1,
                    "command": command_line("dpsgs.bench.comm", argv, ctx.size),
                    "argv": list(argv), "process_argv": [sys.executable, *sys.argv],
                    "nprocs": ctx.size, "args": dict(vars(args)), "machine": info,
                    "dpsgs": dp is not None, "checked": args.check, "sizes": sizes,
                    **results, "summary": summary, "wrong": wrong,
                    "ok": (wrong == 0) if args.check else None}
            path = write_json(out, data, overwrite=args.force and args.out is not None)
            print(f"# JSON: {path}", flush=True)
    comm.Barrier()
    return 1 if args.check and wrong else 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on COMM_WORLD; returns the exit code (1 on wrong data). Any error
    on any rank aborts the whole job, so no peer hangs in a collective."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # NumPy's OpenBLAS (and any OpenMP pool) would start a thread per core in every rank of
    # a many-core machine; the overlap test then measured that contention, not overlap.
    who = pin_compute_threads()
    return run_on_world(lambda comm: _run(args, argv, comm, who))


if __name__ == "__main__":
    sys.exit(main())
