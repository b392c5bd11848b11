"""DDP over gloo and DDP over "dpsgs" in one job, alternating step by step: the ratio of the
two backends on a machine whose load moves more than the difference between them.

    mpirun -n 2 python -m dpsgs.bench.ddp_pair --workload mlp
    mpirun -n 2 python -m dpsgs.bench.ddp_pair --workload all --steps 120 --out bench/results --force

Why: dpsgs.bench.train runs torch-ddp and torch-ddp-dpsgs as separate jobs, seconds apart; on
a shared 2-core machine the load of the moment moves a run's step time by 30 % or more, so
two such runs of the same pair measured 1.53x and 1.14x. Here both run in the same
processes, on the same model, data and seed: the default group is "dpsgs"
(init_method="mpi://"), gloo a second group over the same ranks and store, and each has its
own DDP replica of the workload's model (same initial weights, same batches). Every pair of
steps runs both, in the order gloo-dpsgs, then dpsgs-gloo (ABBA: neither always goes
first), each step starting at an untimed barrier and timed as the slowest rank's. Then the
same under no_sync() (compute only): the two must time alike, which checks the pairing.

Reported per backend: median step time and samples/s (with IQR), the no_sync step, the
exposed communication (step - no_sync step, as dpsgs.bench.train) and its split into one
bare all-reduce of the whole gradient on that group (timed alone after the steps) and the
rest (DDP's copies into and out of its bucket, the hook, the future); and the median over the
timed pairs of gloo step / dpsgs step, its quartiles and how many pairs dpsgs won. The two
replicas' losses are compared step by step: on 2 ranks they are bit-identical (each
gradient element is the same sum of two numbers), and any difference is printed. JSON per
workload: OUT/ddp-pair-WORKLOAD.json, OUT by default a new runs/bench/ddp-pair-<stamp>/;
an --out holding those files already is refused unless --force.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from .harness import command_line, machine_info, run_on_world, write_json
from .outputs import add_out_args, existing_error, out_folder
from .train_configs import WORKLOADS
from .train_stats import quartiles

__all__ = ["BACKENDS", "build_parser", "main", "pair_summary"]

BACKENDS = ("gloo", "dpsgs")


def _abba(i: int) -> tuple[str, ...]:
    """The backends' order in pair i: gloo first, then dpsgs first, and so on."""
    return BACKENDS if i % 2 == 0 else BACKENDS[::-1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpsgs.bench.ddp_pair", description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=(*WORKLOADS, "all"), default="mlp")
    p.add_argument("--model", help="override the workload's model (a dpsgs.job.models name)")
    p.add_argument("--batch", type=int, help="global batch (default: the workload's)")
    p.add_argument("--steps", type=int, default=40, help="timed pairs of steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed pairs first")
    p.add_argument("--nosync-steps", type=int, default=30, help="timed pairs under no_sync()")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds, both groups")
    add_out_args(p, "ddp-pair", folder=True, force_example="e.g. the published bench/results")
    return p


def _workload(args: argparse.Namespace, name: str, size: int) -> Any:
    from .peers.common import Workload

    w = WORKLOADS[name]
    batch = args.batch or w.batch
    if batch % size:
        raise SystemExit(f"dpsgs.bench.ddp_pair: global batch {batch} does not split over {size} ranks")
    return Workload(args.model or w.model, w.in_shape, 10, batch, args.steps, args.warmup)


def _run_workload(args: argparse.Namespace, w: Any, groups: dict[str, Any]) -> dict[str, Any]:
    """Both replicas' step and no_sync times (slowest rank per step) and losses."""
    import time

    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .peers.common import make_batches, make_model, make_optimizer, slowest_per_step

    rank, size = dist.get_rank(), dist.get_world_size()
    local = w.batch // size
    batches = make_batches(w, local, offset=rank * local)
    loss_fn = nn.CrossEntropyLoss()
    replicas = {}
    for name in BACKENDS:
        model = DDP(make_model(w).train(), process_group=groups[name], bucket_cap_mb=args.bucket_cap_mb)
        replicas[name] = (model, make_optimizer(model.parameters()))
    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    nosync: dict[str, list[float]] = {b: [] for b in BACKENDS}
    losses: dict[str, list[float]] = {b: [] for b in BACKENDS}

    def step(name: str, i: int, into: dict[str, list[float]], record: bool) -> None:
        model, opt = replicas[name]
        x, y = batches[i % len(batches)]
        dist.barrier()                     # untimed: one step's skew is not charged to the next
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        value = loss.item()
        into[name].append(time.perf_counter() - t0)
        if record:
            losses[name].append(value)

    for i in range(w.warmup + w.steps):
        for name in _abba(i):
            step(name, i, times, True)
    with contextlib.ExitStack() as stack:   # compute only: no all-reduce in either
        for name in BACKENDS:
            stack.enter_context(replicas[name][0].no_sync())
        for i in range(args.nosync_steps + 1):
            for name in _abba(i):
                step(name, i, nosync, False)
    numel = sum(p.numel() for p in replicas["gloo"][0].parameters())
    bare = _bare_allreduce(numel, groups, args.nosync_steps)
    return {name: {"step_times": slowest_per_step(times[name], size),
                   "nosync_times": slowest_per_step(nosync[name], size)[1:],
                   "allreduce_times": slowest_per_step(bare[name], size)[1:],
                   "losses": losses[name]} for name in BACKENDS}


def _bare_allreduce(numel: int, groups: dict[str, Any], reps: int) -> dict[str, list[float]]:
    """Seconds of one float32 all-reduce of the whole gradient's size on each group, alone,
    alternating as the steps (the first of each is dropped by the caller)."""
    import time

    import torch
    import torch.distributed as dist

    buf = torch.zeros(numel)
    out: dict[str, list[float]] = {b: [] for b in BACKENDS}
    for i in range(reps + 1):
        for name in _abba(i):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buf, group=groups[name])
            out[name].append(time.perf_counter() - t0)
    return out


def pair_summary(raw: dict[str, dict[str, list[float]]], batch: int, warmup: int) -> dict[str, Any]:
    """Per backend: step and samples/s quartiles, no_sync step, exposed communication; the
    pairs: quartiles of gloo step / dpsgs step over the timed pairs, dpsgs's wins, the no_sync
    control; whether the losses agree."""
    out: dict[str, Any] = {}
    for name in BACKENDS:
        steps = raw[name]["step_times"][warmup:]
        step = statistics.median(steps)
        alone = statistics.median(raw[name]["nosync_times"])
        exposed = max(0.0, step - alone)
        bare = statistics.median(raw[name]["allreduce_times"])
        out[name] = {"step_time_s": quartiles(steps),
                     "samples_per_s": quartiles([batch / t for t in steps]),
                     "compute_only_step_s": alone, "exposed_comm_s": exposed,
                     "bare_allreduce_s": bare, "rest_of_exposed_s": max(0.0, exposed - bare)}
    gloo, ours = raw["gloo"]["step_times"][warmup:], raw["dpsgs"]["step_times"][warmup:]
    pairs = [g / d for g, d in zip(gloo, ours)]
    control = [g / d for g, d in zip(raw["gloo"]["nosync_times"], raw["dpsgs"]["nosync_times"])]
    lg, ld = raw["gloo"]["losses"], raw["dpsgs"]["losses"]
    out["dpsgs_over_gloo"] = quartiles(pairs)
    out["dpsgs_won"] = sum(r > 1.0 for r in pairs)
    out["pairs"] = len(pairs)
    out["nosync_dpsgs_over_gloo"] = quartiles(control)
    out["losses_identical"] = lg == ld
    out["max_loss_difference"] = max((abs(a - b) for a, b in zip(lg, ld)), default=0.0)
    return out


def _report(w: Any, size: int, summ: dict[str, Any]) -> str:
    lines = [f"# DDP over gloo and over dpsgs, alternating steps: {w.model}, {size} ranks x 1 "
             f"thread, global batch {w.batch}, {summ['pairs']} timed pairs after {w.warmup}",
             f"# {'backend':>8} {'step ms':>8} {'IQR':>6} {'samples/s':>10} {'no_sync ms':>11} "
             f"{'exp.comm ms':>12} {'= all-reduce':>12} {'+ rest':>7}"]
    for name in BACKENDS:
        s = summ[name]
        step = s["step_time_s"]
        lines.append(f"  {name:>8} {1e3 * step['median']:8.1f} {1e3 * step['iqr']:6.1f} "
                     f"{s['samples_per_s']['median']:10.1f} {1e3 * s['compute_only_step_s']:11.1f} "
                     f"{1e3 * s['exposed_comm_s']:12.1f} {1e3 * s['bare_allreduce_s']:12.1f} "
                     f"{1e3 * s['rest_of_exposed_s']:7.1f}")
    lines.append("# all-reduce: one bare all-reduce of the whole gradient on the group; rest: the "
                 "remainder of the exposed time (DDP's bucket copies, the hook and its future)")
    r, c = summ["dpsgs_over_gloo"], summ["nosync_dpsgs_over_gloo"]
    lines.append(f"# DDP over dpsgs: {r['median']:.2f}x DDP over gloo (median over {summ['pairs']} "
                 f"pairs of gloo step / dpsgs step; quartiles {r['q1']:.2f}-{r['q3']:.2f}; dpsgs "
                 f"faster in {summ['dpsgs_won']}/{summ['pairs']}); no_sync control "
                 f"{c['median']:.2f}x")
    lines.append("# losses: bit-identical at every step" if summ["losses_identical"] else
                 f"# losses differ: at most {summ['max_loss_difference']:.3g} apart")
    return "\n".join(lines)


def _run(args: argparse.Namespace, argv: list[str], comm: Any) -> int:
    import torch
    import torch.distributed as dist

    from .peers.common import gloo_beside_dpsgs

    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    refused = None
    folder = None
    if comm.Get_rank() == 0:
        folder = out_folder(args.out, "ddp-pair")
        refused = existing_error("dpsgs.bench.ddp_pair",
                                 [folder / f"ddp-pair-{n}.json" for n in names], args.force)
    folder, refused = comm.bcast((folder, refused), root=0)
    if refused:
        if comm.Get_rank() == 0:
            print(refused, file=sys.stderr, flush=True)
        return 2
    torch.set_num_threads(1)
    groups = gloo_beside_dpsgs(timedelta(seconds=args.timeout))
    info = machine_info(comm)
    info["torch"] = torch.__version__
    for name in names:
        w = _workload(args, name, comm.Get_size())
        raw = _run_workload(args, w, groups)
        if comm.Get_rank() == 0:
            summ = pair_summary(raw, w.batch, w.warmup)
            print(_report(w, comm.Get_size(), summ), flush=True)
            data = {"benchmark": "dpsgs.bench.ddp_pair", "format": 1,
                    "command": command_line("dpsgs.bench.ddp_pair", argv, comm.Get_size()), "argv": argv,
                    "nprocs": comm.Get_size(), "machine": info, "workload": name, "model": w.model,
                    "in_shape": list(w.in_shape), "global_batch": w.batch, "steps": w.steps,
                    "warmup": w.warmup, "nosync_steps": args.nosync_steps,
                    "bucket_cap_mb": args.bucket_cap_mb, "raw": raw, "summary": summ}
            path = write_json(Path(folder) / f"ddp-pair-{name}.json", data, overwrite=args.force)
            print(f"# JSON: {path}", flush=True)
    dist.barrier(group=groups["gloo"])
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return run_on_world(lambda comm: _run(args, argv, comm))


if __name__ == "__main__":
    sys.exit(main())
