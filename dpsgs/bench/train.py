"""Training throughput of dpsgs against its peers on the same cores, model, global batch and data.

    python -m dpsgs.bench.train --workload all --steps 30 --out bench/results/ --force
    python -m dpsgs.bench.train --workload cnn --only backprop-1rank,dpsgs-fdg-weights
    python -m dpsgs.bench.train --device cuda --workload cnn     # the same workloads on GPUs

Each configuration runs in its own process group (mpirun for multi-rank ones) with a
timeout; its runner (dpsgs/bench/peers/) writes raw per-step times, this file derives
samples/s (median and IQR over the steps after warm-up), speedup over 1-rank backprop,
scaling efficiency, the per-stage compute/channel/reduce split and exposed communication
(dpsgs metrics; DDP: step - no_sync step), and stash memory. Results go to
OUT/train-WORKLOAD.json and OUT/train-WORKLOAD*.png; a configuration that cannot run here
is kept in the JSON and the table with the reason. OUT is by default a new folder per run,
runs/bench/train-<YYYYmmdd-HHMMSS>/; an --out already holding any of those files (e.g. the
published bench/results) is refused (exit 2) unless --force.

--device cuda runs every configuration on GPUs, one per rank by local rank: dpsgs with the
trainer's --device cuda (NCCL channels and all-reduce), DDP over NCCL, 1-rank backprop on
one GPU; the peers with no GPU form here (torch pipelining over gloo, the 2-thread CPU peer)
are reported as not run, with the reason. Where ranks outnumber the visible GPUs, each rank
gets its own NCCL_HOSTID from the launch (launch.SHARE_GPU) and the output flags those
figures: NCCL then runs over sockets, on one GPU's compute. Without a usable GPU, --device
cuda is refused (exit 2) before anything runs. The K=2 split still comes from a CPU profile.

Splits: torch pipelining cuts between top-level blocks (`split` in the JSON: the block
index balanced by the per-block profile); the dpsgs K=2 configurations share one split of
their own, which may fall inside a residual block (`dpsgs_split`: module paths, how they
were chosen and the stage costs it predicted; --dpsgs-split: flops = the trainer's
deterministic default, the default here too; time = balanced by a 1-thread profile of the
traced model's stretches between cut points at the full batch, taken here before the runs;
blocks = torch pipelining's split).
The measured per-stage compute ms of every dpsgs configuration are in its `stages`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from .launch import launch, runner_command
from .outputs import add_out_args, existing_error, out_folder
from .train_configs import DEVICES, WORKLOADS, BenchConfig, Workload, bench_configs, \
    cuda_unavailable, unavailable_reason, visible_gpus
from .train_stats import derive

__all__ = ["build_parser", "main", "run_workload", "run_config", "config_command", "bench_profile",
           "pipeline_split", "dpsgs_split", "headline", "DPSGS_SPLITS"]

DPSGS_SPLITS = ("time", "flops", "blocks")


def bench_profile(w: Workload, configs: list[BenchConfig]) -> Any:
    """Single-thread per-block profile of the workload's model at every per-call batch the
    configurations use (B/N, and B/M for the pipelines): the split comes from it, and the
    planner's validation uses it (taken under the same load as the runs)."""
    import torch

    from dpsgs.job.models import build_model
    from dpsgs.planner.profile import profile_model

    units = {w.batch}
    for c in configs:
        if c.plan:
            m = c.plan.get("micro_batches", 1) if c.plan["schedule"] in ("gpipe", "1f1b") else 1
            units.add(max(1, w.batch // c.plan["replicas"] // m))
    torch.manual_seed(0)
    model = build_model(w.model, w.in_shape, 10)
    return profile_model(model, w.in_shape, sorted(units), name=w.model, reps=2, threads=1)


def pipeline_split(prof: Any, batch: int, stages: int = 2) -> list[int]:
    """One balanced split for every K = 2 configuration (torch pipelining and dpsgs alike),
    at the full batch, so partitions do not differ between them."""
    from dpsgs.pipeline.partition import balance

    return balance([sum(lay.seconds(batch)) for lay in prof.layers], stages)


def dpsgs_split(w: Workload, how: str, blocks: list[int] | None,
                stages: int = 2) -> dict[str, Any]:
    """The split every dpsgs K-stage configuration runs with (see the module docstring), as
    SplitChoice.record(): module paths, how, predicted stage costs."""
    if how == "blocks":
        return {"split": [str(b) for b in blocks or []], "split_by": "blocks",
                "stage_costs": None, "stage_cost_unit": None}
    import torch

    from dpsgs.config import TrainConfig
    from dpsgs.job.data import Dataset
    from dpsgs.job.models import build_model
    from dpsgs.job.run_setup import choose_split, load

    threads = torch.get_num_threads()
    torch.set_num_threads(1)           # one intra-op thread per rank, as the runs have
    try:
        torch.manual_seed(0)
        model = build_model(w.model, w.in_shape, 10)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(w.batch, *w.in_shape, generator=g)
        y = torch.randint(0, 10, (w.batch,), generator=g)
        data = Dataset(x, y, 10, "synthetic"), Dataset(x, y, 10, "synthetic")
        cfg = TrainConfig(stages=stages, balance=how, model=w.model, batch_size=w.batch,
                          dataset="synthetic", num_classes=10, progress=False)
        return choose_split(load(cfg, model, data)).record()
    finally:
        torch.set_num_threads(threads)


def _pool(recs: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """One record from the repeats of a configuration: each repeat's warm-up steps dropped,
    the timed steps (and the dpsgs per-rank split lists) concatenated."""
    ok = [r for r in recs if r["status"] == "ok"]
    if not ok:
        return recs[-1]
    out = dict(ok[0], repeats=len(recs), repeats_ok=len(ok))
    out["step_times"] = [t for r in ok for t in r.get("step_times", [])[warmup:]]
    if ok[0].get("rank_split"):
        out["rank_split"] = {rank: {k: [v for r in ok for v in r["rank_split"][rank][k][warmup:]]
                                    for k in split}
                             for rank, split in ok[0]["rank_split"].items()}
    out["wall_s"] = sum(r.get("wall_s", 0.0) for r in ok)
    return out


def config_command(cfg: BenchConfig, w: Workload, steps: int, warmup: int,
                   split: list[int] | list[str] | None, out: Path) -> list[str]:
    """The command line that runs `cfg` on workload `w`, its result going to `out`: on cuda
    with `--device cuda`, and each rank through launch.SHARE_GPU when ranks outnumber GPUs
    (CPU command lines are as they always were). `split`: the configuration's split points
    (block indices for torch pipelining, module paths for dpsgs)."""
    args = ["--model", w.model, "--in-shape", ",".join(map(str, w.in_shape)),
            "--batch", str(w.batch), "--steps", str(steps), "--warmup", str(warmup),
            "--threads", str(cfg.threads), "--out", str(out), *cfg.args]
    if cfg.pipeline and split:
        args += ["--split", ",".join(map(str, split))]
    if cfg.device != "cpu":
        args += ["--device", cfg.device]
    return runner_command(cfg.runner, args, cfg.ranks, cfg.mpi4py, cfg.share_gpu)


def run_config(cfg: BenchConfig, w: Workload, steps: int, warmup: int,
               split: list[int] | list[str] | None, timeout: float,
               workdir: Path) -> dict[str, Any]:
    """Launch one configuration; return its raw record plus status ('ok', 'failed',
    'unavailable', 'timeout') and the reason when not ok."""
    base = {"name": cfg.name, "runner": cfg.runner, "ranks": cfg.ranks, "threads": cfg.threads,
            "cores": cfg.cores, "plan": cfg.plan, "batch": w.batch, "warmup": warmup}
    if cfg.device != "cpu":
        base.update(device=cfg.device, share_gpu=cfg.share_gpu)
    why = unavailable_reason(cfg)
    if why:
        return {**base, "status": "unavailable", "reason": why}
    out = workdir / f"{w.name}-{cfg.name}.json"
    cmd = config_command(cfg, w, steps, warmup, split, out)
    run = launch(cmd, out, cfg.threads, timeout)
    if run["status"] != "ok":
        return {**base, **run}
    raw = run["result"]
    return {**base, **raw, "impl": raw.get("runner"), "runner": cfg.runner, "name": cfg.name,
            "plan": cfg.plan, "cores": cfg.cores,
            "status": "ok", "command": cmd, "wall_s": run["wall_s"]}


def gpus_info() -> dict[str, Any]:
    """The GPUs this process sees, for a --device cuda run's JSON and header."""
    import torch

    count = torch.cuda.device_count()
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # noqa: BLE001 - only a label (a torch without NCCL)
        nccl = None
    return {"count": count, "names": [torch.cuda.get_device_name(i) for i in range(count)],
            "cuda": torch.version.cuda, "nccl": nccl}


def machine() -> dict[str, Any]:
    """What a reader needs to judge the numbers (the machine may be shared: load average)."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in
                   Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import mpi4py
        mpi = mpi4py.__version__
    except ImportError:
        mpi = None
    return {"hostname": socket.gethostname(), "cpu_model": cpu, "cpu_count": os.cpu_count(),
            "loadavg": list(os.getloadavg()), "python": platform.python_version(),
            "torch": torch.__version__, "mpi4py": mpi, "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def run_workload(w: Workload, configs: list[BenchConfig], steps: int, warmup: int,
                 timeout: float, repeat: int = 1, log=print,
                 dpsgs_how: str = "flops") -> dict[str, Any]:
    """Run every configuration `repeat` times, interleaved (round r runs all of them once),
    so a change of load on a shared machine hits every configuration alike."""
    device = configs[0].device if configs else "cpu"
    prof = bench_profile(w, configs)
    split = pipeline_split(prof, w.batch) if any(c.pipeline for c in configs) else None
    ours = (dpsgs_split(w, dpsgs_how, split)
            if any(c.pipeline and c.runner == "dpsgs_run" for c in configs) else None)
    log(f"# workload {w.name}: {w.model} {w.in_shape}, global batch {w.batch}, {steps} timed "
        f"steps after {warmup} warm-up, x{repeat}; K=2 split at block {split}"
        + (" (from a 1-thread CPU profile)" if device != "cpu" else ""))
    if ours is not None:
        log(f"# {_split_line(ours)}")
    gpus = gpus_info() if device != "cpu" else None
    if gpus is not None:
        log(f"# device cuda: {gpus['count']} GPU(s) visible ({', '.join(gpus['names'])})")
        for line in _sharing_lines(configs):
            log(line)
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="dpsgs-train-bench-") as tmp:
        for rnd in range(repeat):
            for cfg in configs:
                if runs[cfg.name] and runs[cfg.name][-1]["status"] == "unavailable":
                    continue
                mine = ours["split"] if cfg.runner == "dpsgs_run" and ours else split
                rec = run_config(cfg, w, steps, warmup, mine, timeout, Path(tmp))
                log(f"  {cfg.name:<22} {rec['status']}" +
                    (f" ({rec.get('wall_s', 0):.1f}s)" if rec["status"] == "ok" else
                     f": {rec.get('reason', '')}") + (f" [round {rnd + 1}]" if repeat > 1 else ""))
                runs[cfg.name].append(rec)
    results = [_pool(runs[c.name], warmup) for c in configs]
    prof_after = bench_profile(w, configs)   # the load may have drifted during the runs
    base = next((r for r in results if r["name"] == "backprop-1rank" and r["status"] == "ok"),
                None)
    base_sps = None
    if base:   # warm-up already dropped by _pool
        base_sps = derive(base, None, 1, 0)["samples_per_s"]["median"]
    for r in results:
        if r["status"] == "ok":
            r.update(derive(r, base_sps, r["cores"], 0))
    return {"bench": "train", "workload": w.name, "summary": headline(results),
            "device": device, **({"gpus": gpus} if gpus is not None else {}),
            "model": w.model, "in_shape": list(w.in_shape),
            "num_classes": 10, "global_batch": w.batch, "steps": steps, "warmup": warmup,
            "split": split, "dpsgs_split": ours, "why": w.why, "baseline": "backprop-1rank",
            "repeat": repeat,
            "profile": prof.to_json(), "profile_after": prof_after.to_json(),
            "machine": machine(), "command": [sys.executable, "-m", "dpsgs.bench.train",
                                              *sys.argv[1:]],
            "results": results}


def _split_line(rec: dict[str, Any]) -> str:
    costs = rec.get("stage_costs")
    unit = rec.get("stage_cost_unit") or ""
    return (f"dpsgs K=2 split before {', '.join(repr(p) for p in rec['split'])} "
            f"({rec['split_by']}" + (f"; predicted stage costs "
                                     f"{', '.join(f'{c:.4g}' for c in costs)} {unit}"
                                     if costs else "") + ")")


def _sharing_lines(configs: list[BenchConfig]) -> list[str]:
    """What a GPU run with more ranks than GPUs can and cannot show (its configurations)."""
    shared = [c.name for c in configs if c.share_gpu and unavailable_reason(c) is None]
    if not shared:
        return []
    return [(f"# SHARED GPU: {', '.join(shared)} run more ranks than GPUs, each rank with its "
             "own NCCL_HOSTID: NCCL connects them over sockets and they share one GPU's "
             "compute, so their throughput is not what they would reach with a GPU each over "
             "NVLink")]


def headline(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's closing numbers: each fdg K=2 mode's throughput over the best peer (the
    fastest of single-2threads, torch DDP over gloo and torch pipelining) and over 1-rank
    backprop; and DDP over the dpsgs backend against DDP over gloo (samples/s ratio and
    each one's exposed communication)."""
    def sps(r: dict[str, Any] | None) -> float | None:
        return (r.get("samples_per_s") or {}).get("median") if r and r["status"] == "ok" else None

    def on_dpsgs(r: dict[str, Any]) -> bool:   # dpsgs's own trainer or its torch backend
        return r["name"].startswith("dpsgs") or r.get("backend") == "dpsgs"

    peers = [r for r in results if not on_dpsgs(r) and not r["name"].startswith("backprop") and sps(r)]
    best = max(peers, key=sps, default=None)
    base = next((r for r in results if r["name"] == "backprop-1rank" and sps(r)), None)
    out: dict[str, Any] = {"best_peer": best["name"] if best else None,
                           "best_peer_samples_per_s": sps(best) if best else None}
    for r in results:
        if r["name"].startswith("dpsgs") and sps(r):
            out[r["name"]] = {
                "samples_per_s": sps(r),
                "over_best_peer": sps(r) / sps(best) if best else None,
                "over_backprop_1rank": sps(r) / sps(base) if base else None}
    gloo = next((r for r in results if r["name"] == "torch-ddp" and sps(r)), None)
    ours = next((r for r in results if r["name"] == "torch-ddp-dpsgs" and sps(r)), None)
    if gloo and ours:
        out["ddp_dpsgs_over_ddp_gloo"] = {
            "ratio": sps(ours) / sps(gloo), "dpsgs_samples_per_s": sps(ours), "gloo_samples_per_s": sps(gloo),
            "dpsgs_exposed_comm_s": ours.get("exposed_comm_s"), "gloo_exposed_comm_s": gloo.get("exposed_comm_s"),
            "dpsgs_step_s": ours["step_time_s"]["median"], "gloo_step_s": gloo["step_time_s"]["median"],
            "compute_only_step_s": {"dpsgs": ours.get("compute_only_step"), "gloo": gloo.get("compute_only_step")}}
    return out


def _table(doc: dict[str, Any]) -> str:
    from .harness import Table

    runs = doc.get("repeat", 1)
    gpu = doc.get("device", "cpu") != "cpu"
    where = f" on CUDA ({doc['gpus']['count']} GPU(s) visible)" if gpu else ""
    unit = "ranks (one GPU each, unless shared)" if gpu else "cores"
    t = Table(f"Training throughput{where}: {doc['model']} {tuple(doc['in_shape'])}, global "
              f"batch {doc['global_batch']}, median [IQR] over {doc['steps']} steps (x{runs} "
              f"runs) after {doc['warmup']} warm-up;\nspeedup over backprop-1rank; "
              f"efficiency = speedup / {unit}",
              [("configuration", 22), ("ranks" if gpu else "cores", 5), ("samples/s", 10),
               ("IQR", 8),
               ("speedup", 7), ("effic", 6), ("exp.comm ms", 11), ("stash MB", 8),
               ("status", 12)])
    rows = []
    for r in doc["results"]:
        if r["status"] != "ok":
            rows.append([r["name"], r["cores"], None, None, None, None, None, None,
                         r["status"]])
            continue
        sps = r["samples_per_s"]
        stash = r.get("stash_peak_bytes")
        rows.append([r["name"], r["cores"], sps["median"], sps["iqr"], r["speedup"],
                     r["efficiency"],
                     r["exposed_comm_s"] * 1e3 if r["exposed_comm_s"] is not None else None,
                     max(stash.values()) / 1e6 if stash else None, "ok"])
    lines = [t.render(rows)]
    shared = [r["name"] for r in doc["results"] if r.get("share_gpu") and r["status"] == "ok"]
    if shared:
        lines.append(f"# shared GPU (several ranks per GPU over NCCL sockets): "
                     f"{', '.join(shared)}: not what a GPU per rank over NVLink would reach")
    head = doc.get("summary", {})
    for name, v in head.items():
        if isinstance(v, dict) and v.get("over_best_peer") is not None:
            lines.append(f"# {name}: {v['over_best_peer']:.2f}x best peer ({head['best_peer']}),"
                         f" {v['over_backprop_1rank'] or 0:.2f}x 1-rank backprop")
    if doc.get("dpsgs_split"):
        lines.append(f"# {_split_line(doc['dpsgs_split'])}; torch pipelining: block "
                     f"{doc.get('split')}")
    ddp = head.get("ddp_dpsgs_over_ddp_gloo")
    if ddp:
        ms = lambda v: "N/A" if v is None else f"{v * 1e3:.1f} ms"  # noqa: E731
        lines.append(f"# DDP over dpsgs: {ddp['ratio']:.2f}x DDP over gloo (step {ms(ddp['dpsgs_step_s'])} vs "
                     f"{ms(ddp['gloo_step_s'])}; exposed communication {ms(ddp['dpsgs_exposed_comm_s'])} vs "
                     f"{ms(ddp['gloo_exposed_comm_s'])})")
    for r in doc["results"]:
        if r["status"] != "ok":
            lines.append(f"# {r['name']}: {r['status']}: {r.get('reason', '')}")
        for s in r.get("stages", []):
            f = lambda v: "N/A" if v is None else f"{v * 1e3:.1f}"  # noqa: E731
            lines.append(f"#   {r['name']} stage {s['stage']}: step {f(s['step_s'])} ms = "
                         f"compute {f(s['compute_s'])} + channel {f(s['channel_s'])} + "
                         f"reduce {f(s['reduce_s'])} + other {f(s['other_s'])}")
    return "\n".join(lines)


def _outputs(out: Path, workloads: list[str], plots: bool) -> list[Path]:
    """The files a run of `workloads` writes into `out`."""
    stems = [f"train-{w}" for w in workloads]
    pngs = [out / f"{s}{tail}.png" for s in stems for tail in ("", "-split")] if plots else []
    return [out / f"{s}.json" for s in stems] + pngs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpsgs.bench.train",
                                description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    p.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--batch", type=int, help="global batch (default: the workload's)")
    p.add_argument("--model", help="override the workload's model (a dpsgs.job.models name)")
    p.add_argument("--micro-batches", type=int, default=4, help="pipeline micro-batches")
    p.add_argument("--only", help="comma-separated configuration names")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per configuration")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every configuration this many times, interleaved, steps pooled")
    add_out_args(p, "train", folder=True, force_example="e.g. the published ones")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--dpsgs-split", choices=DPSGS_SPLITS, default="flops",
                   help="how the dpsgs K=2 configurations are split: flops (the trainer's "
                        "deterministic default, the default here too), time (a 1-thread "
                        "profile of the traced model, here, before the runs; it may land on a "
                        "block boundary under load) or blocks (torch pipelining's block split)")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="cpu (gloo, MPI; the default) or cuda: every configuration on GPUs, "
                        "one per rank by local rank (dpsgs with --device cuda, DDP over NCCL; "
                        "peers without a GPU form reported as not run); more ranks than GPUs "
                        "share them, each rank with its own NCCL_HOSTID")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.device == "cuda":      # refused before any profiling or run
        why = cuda_unavailable()
        if why:
            print(f"dpsgs.bench.train: --device cuda: {why}; nothing was run", file=sys.stderr)
            return 2
    configs = bench_configs(a.micro_batches, a.device,
                            visible_gpus() if a.device == "cuda" else 0)
    if a.only:
        want = [s.strip() for s in a.only.split(",") if s.strip()]
        unknown = sorted(set(want) - {c.name for c in configs})
        if unknown:
            p.error(f"unknown configuration(s) {unknown}; known: {[c.name for c in configs]}")
        configs = [c for c in configs if c.name in want]
    names = list(WORKLOADS) if a.workload == "all" else [a.workload]
    if a.out:       # checked before minutes of runs, not when writing
        refused = existing_error("dpsgs.bench.train",
                                 _outputs(Path(a.out), names, not a.no_plot), a.force)
        if refused:
            print(refused, file=sys.stderr)
            return 2
    out = out_folder(a.out, "train")
    from .harness import write_json

    for name in names:
        w = WORKLOADS[name]
        if a.batch or a.model:
            w = Workload(w.name, a.model or w.model, w.in_shape, a.batch or w.batch, w.why)
        doc = run_workload(w, configs, a.steps, a.warmup, a.timeout, a.repeat, print,
                           a.dpsgs_split)
        path = write_json(out / f"train-{name}.json", doc, overwrite=a.force)
        print(_table(doc))
        print(f"# wrote {path}")
        if not a.no_plot:
            from .train_plot import plot_workload
            for png in plot_workload(doc, out):
                print(f"# wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
