r"""`python -m dpsgs plan`: predict the step time of every K x N grid on a cluster, recommend one.

    python -m dpsgs plan --model resnet56 --gpus 16 --gpus-per-node 4 --intra-bw 100e9 \
        --inter-bw 12.5e9 --alpha-intra 5e-6 --alpha-inter 2e-5 --batch 128 --profile
    python -m dpsgs plan --model wrn-28-10 --gpus 8 --gpus-per-node 4 --layer-times prof.json
    python -m dpsgs plan --validate bench/results/train-cnn.json     # vs measured runs here

The model and its assumptions: docs/planner.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from dpsgs.planner.cluster import Cluster
from dpsgs.planner.cost import Prediction
from dpsgs.planner.profile import load_layer_times, profile_for
from dpsgs.planner.recommend import Candidate, candidates, recommend

__all__ = ["main", "build_parser"]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter,
                     argparse.ArgumentDefaultsHelpFormatter):
    """The description's command lines as written, and "(default: X)" after each option's
    help, except where the help already states its default or there is none to state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False):
            return text
        if isinstance(action.default, float):   # 1e+11, not 100000000000.0
            return text + " (default: %(default)g)"
        return super()._get_help_string(action) or text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpsgs plan", description=__doc__,
                                formatter_class=_HelpFormatter)
    p.add_argument("--model", default="resnet56", help="a dpsgs.job.models name")
    p.add_argument("--in-shape", default="3,32,32",
                   help="shape of one input sample, without the batch dimension (C,H,W)")
    p.add_argument("--num-classes", type=int, default=10, help="classes the model outputs")
    p.add_argument("--gpus", type=int, default=8,
                   help="devices in the cluster, one rank each (= K x N)")
    p.add_argument("--gpus-per-node", type=int, default=4, help="devices per node")
    p.add_argument("--nics-per-node", type=int, default=1,
                   help="NICs per node; concurrent cross-node rings share them")
    p.add_argument("--intra-bw", type=float, default=100e9, metavar="BYTES/S",
                   help="bandwidth between two devices of a node, bytes/s")
    p.add_argument("--inter-bw", type=float, default=12.5e9, metavar="BYTES/S",
                   help="bandwidth of one NIC between nodes, bytes/s")
    p.add_argument("--alpha-intra", type=float, default=5e-6, metavar="SECONDS",
                   help="latency inside a node, seconds per message")
    p.add_argument("--alpha-inter", type=float, default=2e-5, metavar="SECONDS",
                   help="latency between nodes, seconds per message")
    p.add_argument("--batch", type=int, default=128, metavar="SAMPLES",
                   help="global batch, samples per step, the same for every K x N "
                        "(each replica takes batch/N samples)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--profile", action="store_true",
                     help="profile the model's layers here (the default without --layer-times)")
    src.add_argument("--layer-times", metavar="FILE", help="per-layer profile JSON (see docs)")
    p.add_argument("--save-profile", metavar="FILE", help="write the profile used as JSON")
    p.add_argument("--profile-reps", type=int, default=2,
                   help="timed repetitions of each layer and batch size while profiling")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads while profiling")
    p.add_argument("--compute-scale", type=float, default=1.0,
                   help="factor on the profiled seconds: target device time / this "
                        "machine's (e.g. 0.05 for a device 20x faster)")
    p.add_argument("--stash", choices=("weights", "recompute"), default="weights",
                   help="fdg: keep the weight versions of in-flight batches, or recompute "
                        "their activations")
    p.add_argument("--overlap", choices=("none", "backward", "step"), default="backward",
                   help="compute the all-reduce hides behind: none, the backward pass "
                        "(DDP buckets), or the whole step")
    p.add_argument("--micro-batches", type=int, default=4,
                   help="gpipe/1f1b micro-batches per step")
    p.add_argument("--schedules", default="fdg,1f1b,gpipe",
                   help="comma-separated schedules to consider for K > 1 (K = 1 is always DDP)")
    p.add_argument("--memory-limit", type=float, metavar="BYTES",
                   help="bytes per device; skip configurations needing more (default: no limit)")
    p.add_argument("--json", metavar="FILE", help="write every prediction as JSON")
    p.add_argument("--validate", metavar="RESULTS", nargs="+",
                   help="predict the configurations measured by `python -m dpsgs.bench.train` "
                        "(its JSON) on this machine and print the error of each")
    p.add_argument("--validate-overlap", choices=("none", "as-run"), default="none",
                   help="validation: 'none' = all-reduce not hidden (one core per rank does "
                        "compute and copies), 'as-run' = each run's overlap setting")
    p.add_argument("--comm-results", default="bench/results",
                   help="folder with comm-*.json to calibrate the shared-memory link (validate)")
    return p


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())


def _unit_batches(batch: int, gpus: int, micro: int) -> list[int]:
    """Smallest, middle and largest per-call batch any factorisation uses (the profile is
    interpolated between them)."""
    sizes = {batch // n for n in range(1, gpus + 1) if gpus % n == 0 and batch % n == 0}
    sizes |= {max(1, s // micro) for s in sizes}
    lo, hi = min(sizes), max(sizes)
    return sorted({lo, max(lo, round(math.sqrt(lo * hi))), hi})


def _row(c: Candidate) -> str:
    if c.prediction is None:
        return f"  {c.config.label:<28} {'-':>10} {'-':>10}  skipped: {c.skipped}"
    p: Prediction = c.prediction
    worst = max(p.stages, key=lambda s: s.compute + s.channel + s.exposed_allreduce)
    mem = max(s.activation_bytes + s.param_bytes for s in p.stages) / 1e6
    note = f"  {c.skipped}" if c.skipped else ""
    return (f"  {c.config.label:<28} {p.step_time * 1e3:10.2f} {p.samples_per_s:10.1f} "
            f"{worst.compute * 1e3:9.2f} {worst.channel * 1e3:8.2f} "
            f"{worst.exposed_allreduce * 1e3:8.2f} {max(s.allreduce for s in p.stages) * 1e3:8.2f}"
            f" {p.bubble * 100:6.1f} {mem:9.1f}{note}")


def _print_table(cands: list[Candidate], best: Candidate) -> None:
    print(f"  {'configuration':<28} {'step ms':>10} {'samples/s':>10} {'comp ms':>9} "
          f"{'chan ms':>8} {'exp.AR':>8} {'AR ms':>8} {'bubble':>6} {'mem MB':>9}")
    ranked = sorted(cands, key=lambda c: -(c.prediction.samples_per_s
                                            if c.prediction and not c.skipped else -1))
    for c in ranked:
        print(_row(c))
    p = best.prediction
    assert p is not None
    print(f"\nrecommended: {best.config.label}  ({p.samples_per_s:.1f} samples/s, "
          f"step {p.step_time * 1e3:.2f} ms)")
    for k, st in enumerate(p.stages):
        print(f"  stage {k}: layers [{st.layers[0]}, {st.layers[1]})  compute "
              f"{st.compute * 1e3:.2f} ms  channel {st.channel * 1e3:.3f} ms  all-reduce "
              f"{st.allreduce * 1e3:.2f} ms (exposed {st.exposed_allreduce * 1e3:.2f})  "
              f"params {st.param_bytes / 1e6:.2f} MB  stash {st.stash_bytes / 1e6:.1f} MB")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.validate:
        from dpsgs.planner.validate import run_validation
        return run_validation(args.validate, Path(args.comm_results), reps=args.profile_reps,
                              out=args.json, overlap=None if args.validate_overlap == "as-run"
                              else "none")
    in_shape = _shape(args.in_shape)
    cluster = Cluster(args.gpus, args.gpus_per_node, args.intra_bw, args.inter_bw,
                      args.alpha_intra, args.alpha_inter, args.nics_per_node)
    if args.layer_times:
        prof = load_layer_times(args.layer_times)
    else:
        batches = _unit_batches(args.batch, args.gpus, args.micro_batches)
        print(f"profiling {args.model} {in_shape} at batches {batches} "
              f"({args.threads} thread(s), {args.profile_reps} reps) ...", file=sys.stderr)
        prof = profile_for(args.model, in_shape, args.num_classes, batches,
                           reps=args.profile_reps, threads=args.threads)
    if args.compute_scale != 1.0:
        prof = prof.scaled(args.compute_scale)
    if args.save_profile:
        prof.save(args.save_profile)
    cands = candidates(prof, cluster, args.batch, stash=args.stash, overlap=args.overlap,
                       micro_batches=args.micro_batches,
                       schedules=tuple(s for s in args.schedules.split(",") if s),
                       memory_limit=args.memory_limit)
    best = recommend(cands)
    print(f"{prof.model}: {len(prof.layers)} blocks, {prof.param_bytes / 1e6:.1f} MB params; "
          f"{args.gpus} devices, {args.gpus_per_node}/node; global batch {args.batch}")
    _print_table(cands, best)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "profile": prof.to_json(),
            "recommended": best.config.label,
            "candidates": [{"label": c.config.label, "skipped": c.skipped,
                            "prediction": c.prediction.to_json() if c.prediction else None}
                           for c in cands]}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
