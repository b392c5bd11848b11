"""Command line: `python -m dpsgs train|checkpoint|plot|bench|plan ...`.

    # train on the bundled digits data: K=2 stages x N=2 replicas = 4 ranks
    mpirun -n 4 python -m dpsgs train --stages 2 --replicas 2 --epochs 10
    # the same schedule for K x N virtual ranks in one process (no MPI): study staleness
    python -m dpsgs train --simulate --stages 4 --replicas 2 --epochs 10 --shrink 0.5
    # the paper's task: ResNet-56 on CIFAR-10 from a local folder (python-pickle format)
    mpirun -n 4 python -m dpsgs train -K 2 -N 2 --model resnet56 --dataset cifar10 \\
        --data-dir ~/data/cifar-10-batches-py --batch-size 64 --epochs 300 --lr-schedule step \\
        --lr-milestones 0.5 0.75 0.9167 --run-dir runs/r56 --resume auto
    # continue it on 2 ranks as K=1 x N=2 (resharded; the global batch is kept)
    mpirun -n 2 python -m dpsgs train -K 1 -N 2 --model resnet56 ... --run-dir runs/r56 \\
        --resume auto --override stages
    # the trained model as one plain PyTorch state_dict; what a checkpoint holds
    python -m dpsgs checkpoint export runs/r56 model.pt
    python -m dpsgs checkpoint inspect runs/r56
    # curves of a finished run, into RUN_DIR/plots/*.png
    python -m dpsgs plot runs/r56
    # communication benchmarks (point-to-point, all-reduce, overlap)
    mpirun -n 2 python -m dpsgs bench comm

Names (model, dataset, choices) are checked before any MPI work starts, so a typo fails
at once on every rank instead of after the launch.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from dpsgs.config import CHOICES, TrainConfig

__all__ = ["main", "build_parser", "config_from_args"]

# Help text of every TrainConfig field (a field missing here still gets an option).
HELP: dict[str, str] = {
    "stages": "K: pipeline stages per replica",
    "replicas": "N: data-parallel replicas (world size = K*N)",
    "schedule": "fdg: fully decoupled, stale gradients; sync: exact-gradient micro-batched "
                "pipeline (the baseline)",
    "stash": "weights: keep each forward's weights for its delayed backward (consistent, "
             "memory grows with staleness); recompute: keep the input, redo the forward",
    "overlap": "backward: all-reduce each bucket as backward produces it, wait before the "
               "update; step: apply the averaged gradient one step later (+1 staleness)",
    "shrink": "beta: stage k scales its gradient by beta**(K-1-k) (FDG's gradient shrinking)",
    "micro_batches": "sync schedule: micro-batches per step",
    "sync_kind": "sync schedule: 1f1b or gpipe",
    "flush_every_epoch": "finish every batch in flight at each epoch end (eval and "
                         "checkpoints then see no half-processed batch; without it the run is "
                         "one segment, evaluated and checkpointed only at its end)",
    "split": "explicit split points, K-1 module paths: a stage starts before that module "
             "(e.g. 7 or 7.conv2 for the built-in ResNets; layer3.1.conv2 inside a block); an "
             "integer is a top-level child's index; default: balanced",
    "balance": "how to balance stages when --split is not given: flops (deterministic "
               "cost model: the same command always gives the same split), time (profiled "
               "on rank 0 at start; the split it chose is recorded and reused on resume), "
               "params or layers",
    "model": "model name: mlp, mlp-wide, resnet20, resnet56, resnet110, resnet18, wrn-D-K "
             "(e.g. wrn-16-4, wrn-28-10)",
    "dataset": "digits (bundled with scikit-learn), cifar10 (needs --data-dir), synthetic",
    "data_dir": "CIFAR-10 folder in the python-pickle format (data_batch_1..5, test_batch); "
                "only --dataset cifar10 reads it (an error with any other dataset)",
    "synthetic_shape": "synthetic dataset: shape of one sample",
    "synthetic_samples": "synthetic dataset: training samples",
    "num_classes": "number of classes (default: from the dataset)",
    "batch_size": "samples per replica per step (global batch = N * batch size)",
    "drop_last": "drop the partial last batch of an epoch (--no-drop-last: fill it by "
                 "wrapping around; shapes never change)",
    "dtype": "parameter and activation dtype",
    "device": "where each rank's stage runs: cuda (one GPU per rank by local rank, NCCL "
              "channels and all-reduce; an error names what is missing: GPU, CUDA build of "
              "torch, NCCL build of dpsgs), cpu (MPI), or auto (cuda only where every rank has "
              "a GPU of its own and the NCCL backend is built, else cpu; the first line says "
              "why), or sim (a test device: the GPU code path, NCCL channels and all-reduce, "
              "on the CPU simulator of a DPSGS_CUDA=sim build; never chosen by auto)",
    "amp": "bf16: autocast forward/backward in bfloat16, CUDA or CPU (float32 weights, bfloat16 "
           "activations between stages); none: the run's dtype throughout",
    "epochs": "training epochs",
    "max_steps": "stop after this many steps (the pipeline is still flushed)",
    "optimizer": "sgd (momentum, weight decay, Nesterov), adam or adamw",
    "lr": "learning rate (peak, after warm-up)",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay",
    "nesterov": "Nesterov momentum (SGD)",
    "lr_schedule": "learning-rate schedule",
    "lr_milestones": "step schedule: fractions of training at which the lr is multiplied by "
                     "--lr-gamma",
    "lr_gamma": "step schedule: factor at each milestone",
    "warmup_epochs": "linear learning-rate warm-up, in epochs",
    "seed": "seed of the model initialisation, the sampler and the augmentation",
    "bucket_cap_mb": "gradient bucket size for the all-reduce (MB)",
    "first_bucket_mb": "size of the first (last layers') bucket, started earliest (MB)",
    "allreduce": "all-reduce algorithm: auto, ring (C++ ring) or mpi (MPI_Allreduce)",
    "transport": "how ranks talk: core (dpsgs's C++ core over MPI, or NCCL on cuda), mpi4py "
                 "(plain MPI, a baseline; cpu) or torch (torch.distributed: see --torch-backend; "
                 "initialised over mpi://, no environment variables, unless the script already did)",
    "torch_backend": "--transport torch: gloo (cpu), nccl (cuda), dpsgs (the core as a "
                     "torch.distributed backend; cuda tensors go to NCCL) or auto (nccl on cuda, "
                     "else gloo)",
    "timeout": "seconds any wait may take before the job is aborted, naming the peer",
    "warn_after": "seconds after which a stalled wait is reported (which ranks are missing)",
    "stop_grace": "after SIGTERM/SIGUSR1 the job ends within this many seconds, even when a rank "
                  "is stopped or stuck (naming it; the last checkpoint is kept); keep it below "
                  "the batch system's grace (Slurm's KillWait, 30 s by default)",
    "run_dir": "run folder for config, metrics, checkpoints, summary; it belongs to one run "
               "(a fresh run into a used folder is refused) (default: runs/<timestamp>)",
    "metrics_every": "write a metrics line every this many steps",
    "eval_every": "evaluate on the test set every this many epochs",
    "checkpoint_every": "checkpoint every this many epochs (0: only at the end)",
    "keep_checkpoints": "keep the newest this many checkpoints, delete older ones (0: keep all)",
    "resume": "continue the run of --run-dir: 'auto' (its newest checkpoint; from the start if "
              "none yet), a checkpoint folder, or a run folder; the identity settings must match",
    "resume_fallback": "when the newest checkpoint is damaged, resume from the newest good one "
                       "(each one skipped is named) instead of stopping with the error",
    "override": "identity settings (e.g. epochs lr) a resume may change on purpose; the change "
                "is recorded in RUN_DIR/run.json. 'stages', 'replicas' or 'split' reshard the "
                "checkpoint onto the new grid (the global batch is kept: docs/reliability.md)",
    "elastic": "with --resume auto: continue on whatever ranks the launcher gave: K is kept and "
               "N = world size / K (the checkpoint is resharded; the change is recorded in "
               "RUN_DIR/run.json); a world that is not a multiple of K is one error",
    "trace": "write a Chrome trace (Perfetto) per rank R: --trace t.json writes t.rankR.json "
             "(a name without a suffix gets .json; a {rank} in the name is replaced by R instead)",
    "progress": "progress bar on rank 0",
    "on_nonfinite": "NaN/Inf loss or gradient: stop (report step, stage, tensor) or skip "
                    "the step",
}

SHORT = {"stages": "-K", "replicas": "-N"}


def _option_kwargs(tp: Any) -> dict[str, Any]:
    """argparse keywords for a TrainConfig field type (int, float, str, bool, X | None, list)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        if typing.get_origin(item) in (typing.Union, types.UnionType):   # int | str
            return {"nargs": "+", "type": _int_or_str, "metavar": "V"}
        return {"nargs": "+", "type": item, "metavar": "V"}
    return {"type": tp}


def _int_or_str(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


class _Parser(argparse.ArgumentParser):
    """Errors as one line, printed by one rank (the launcher's rank 0), not the whole usage
    once per rank."""

    def error(self, message: str) -> typing.NoReturn:
        from dpsgs.job.process import launcher_rank

        if launcher_rank() == 0:
            print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it is None or the help already names one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.default is False:
            return text
        return super()._get_help_string(action)


def _add_train(sub: Any, defaults: TrainConfig) -> None:
    p = sub.add_parser("train", help="train (under mpirun), or simulate in one process",
                       description="Train on K stages x N replicas (launch K*N ranks with "
                                   "mpirun) or, with --simulate, in one process.",
                       formatter_class=_Defaults)
    p.add_argument("--config", metavar="FILE", default=None,
                   help="take the defaults from a TrainConfig JSON (e.g. a run's "
                        "config.json); options given here override them")
    p.add_argument("--simulate", action="store_true",
                   help="run the single-process reference: the same step executor for K x N "
                        "virtual ranks in one process (one thread each), no MPI")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flags = ([SHORT[f.name]] if f.name in SHORT else []) + [f"--{f.name.replace('_', '-')}"]
        kw = _option_kwargs(hints[f.name])
        if f.name in SHORT:
            kw["metavar"] = SHORT[f.name][1:]
        if f.name in CHOICES:
            kw["choices"] = list(CHOICES[f.name])
        p.add_argument(*flags, dest=f.name, default=getattr(defaults, f.name),
                       help=HELP.get(f.name, f.name.replace("_", " ")), **kw)


def _add_checkpoint(sub: Any) -> None:
    p = sub.add_parser("checkpoint", help="inspect a run's checkpoint, or export its model as "
                       "one plain PyTorch state_dict")
    what = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    q = what.add_parser("inspect", help="print what a checkpoint holds (grid, position, run id, "
                        "per-stage tensors and bytes, integrity)")
    q.add_argument("path", metavar="RUN_DIR", help="a run folder (its newest checkpoint) or a "
                   "checkpoint folder")
    q.add_argument("--json", action="store_true", help="print the record as JSON")
    q = what.add_parser("export", help="write the whole model's state_dict (keyed by module "
                        "path, loadable with load_state_dict into the model dpsgs built)")
    q.add_argument("path", metavar="RUN_DIR", help="a run folder (its newest checkpoint) or a "
                   "checkpoint folder")
    q.add_argument("out", metavar="OUT.pt")
    q.add_argument("--bn", choices=["replica0", "average"], default="replica0",
                   help="BatchNorm running statistics: replica 0's, or the mean over replicas")


def _checkpoint(args: argparse.Namespace) -> int:
    from dpsgs.job.checkpoint import CheckpointError
    from dpsgs.job.export import export, format_inspect, inspect

    try:
        if args.action == "inspect":
            info = inspect(args.path)
            print(json.dumps(info, indent=1) if args.json else format_inspect(info))
            return 0 if info["integrity"] == "ok" else 1
        out = export(args.path, args.out, args.bn)
        print(f"wrote {out}")
        return 0
    except (CheckpointError, OSError) as e:
        print(f"dpsgs checkpoint {args.action}: error: {e}", file=sys.stderr)
        return 2


def build_parser(defaults: TrainConfig | None = None) -> argparse.ArgumentParser:
    """The parser; `defaults` (e.g. from --config) replaces TrainConfig()'s defaults."""
    parser = _Parser(
        prog="python -m dpsgs", description="Data-parallel, fully decoupled backpropagation "
        "with stale gradients over MPI.", epilog="Examples:\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_train(sub, defaults or TrainConfig())
    p = sub.add_parser("plot", help="draw loss/accuracy/throughput curves of a run",
                       description="Read RUN_DIR/metrics*.jsonl, write RUN_DIR/plots/*.png.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/plots)")
    _add_checkpoint(sub)
    p = sub.add_parser("bench", help="benchmarks: 'bench comm|train ...' (arguments go to "
                       "dpsgs.bench.NAME; see 'bench comm --help')", add_help=False)
    p.add_argument("what", metavar="NAME")
    sub.add_parser("plan", help="predict step times of K x N grids (dpsgs.planner.cli; arguments "
                   "are passed on)", add_help=False)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed train options; ValueError for bad names/values (no MPI)."""
    config = TrainConfig(**{f.name: getattr(args, f.name)
                            for f in dataclasses.fields(TrainConfig)})
    validate(config)
    return config


def _base_config(argv: list[str]) -> TrainConfig:
    """The --config FILE given among `argv` (its values become the option defaults)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return TrainConfig()
    try:
        return TrainConfig.load(known.config)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"--config {known.config}: {e}") from None


def validate(c: TrainConfig) -> None:
    """Checks that need no MPI and no data loading; each error names the option."""
    from dpsgs.job.run_setup import check_names

    c.validate()
    check_names(c)
    if c.resume not in (None, "auto") and not Path(c.resume).exists():
        raise ValueError(f"--resume {c.resume}: no such checkpoint or run folder")


def _timestamp_run_dir(comm: Any) -> str:
    # Rank 0 picks the name so every rank agrees even when their clocks straddle a second.
    name = None
    if comm is None or comm.Get_rank() == 0:
        name = str(Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return name if comm is None else comm.bcast(name, root=0)


def _report(summary: dict, config: TrainConfig) -> None:
    test = {k: v for k, v in summary.items() if k.startswith("test_") or k.startswith("final_")}
    acc = next((summary[k] for k in ("test_accuracy", "test_acc", "final_test_accuracy")
                if k in summary), None)
    if acc is not None and summary.get("stopped_by"):
        epoch = summary.get("evaluated_at_epoch")
        print(f"stopped by {summary['stopped_by']} before the end: test accuracy "
              f"{100 * float(acc):.2f}% at the last evaluation"
              + (f" (epoch {epoch})" if epoch is not None else ""))
    elif acc is not None:
        print(f"final test accuracy: {100 * float(acc):.2f}%")
    from dpsgs.job.run_folder import strict_json

    print("summary: " + json.dumps(strict_json(test or summary), default=str))
    print(f"run folder: {summary.get('run_dir', config.run_dir)}")


def _train(args: argparse.Namespace) -> int:
    from dpsgs.job.process import launcher_rank, run_job
    from dpsgs.reliability.preemption import install_early

    if not args.simulate:
        install_early()      # first thing: a SIGTERM while torch and MPI load still stops cleanly
    try:
        config = config_from_args(args)
    except (ValueError, FileNotFoundError) as e:
        if launcher_rank() == 0:       # the same mistake on every rank: say it once
            print(f"dpsgs train: error: {e}", file=sys.stderr)
        return 2
    if args.simulate:
        from dpsgs.job.simulate import simulate

        config.run_dir = config.run_dir or _timestamp_run_dir(None)
        try:
            summary = simulate(config, progress=config.progress)
        except (ValueError, FileNotFoundError) as e:
            print(f"dpsgs train --simulate: error: {e}", file=sys.stderr)
            return 2
        _report(summary, config)
        return 0
    rc, _ = run_job(config, _timestamp_run_dir, report=lambda summary: _report(summary, config))
    return rc


# `python -m dpsgs bench NAME` runs dpsgs.bench.NAME (tests check each has a main()).
BENCHMARKS = {
    "comm": "point-to-point latency/bandwidth, all-reduce algbw/busbw, overlap %: dpsgs vs raw "
            "mpi4py (mpirun -n 2 ...)",
    "train": "training throughput of fdg, sync, DDP, torch pipelining, one process (spawns its runs)",
    "tta": "time to a target test accuracy of the same configurations (spawns its runs)",
    "nccl": "dpsgs NCCL all-reduce and channel vs torch.distributed NCCL, on GPUs (mpirun -n 2 ...)",
    "torch_collectives": "torch.distributed collectives over gloo vs the dpsgs backend, beside the "
                         "core's own all-reduce (mpirun -n 2 ...)",
    "ddp_pair": "DDP over gloo and over the dpsgs backend in one job, alternating step by step "
                "(mpirun -n 2 ...)",
}


def _bench_list() -> str:
    """The benchmarks there are, with what each measures."""
    rows = "\n".join(f"  {name:<8} {what}" for name, what in BENCHMARKS.items())
    return (f"usage: python -m dpsgs bench NAME [options]   (python -m dpsgs bench NAME --help)\n"
            f"benchmarks:\n{rows}")


def _bench_hint(module: str) -> str:
    """'; benchmarks: comm, train' for a missing dpsgs.bench.X (the modules with a main)."""
    if not module.startswith("dpsgs.bench."):
        return ""
    import pkgutil

    try:
        pkg = importlib.import_module("dpsgs.bench")
        names = [m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.ispkg]
        mains = [n for n in names if "def main(" in
                 (Path(pkg.__path__[0]) / f"{n}.py").read_text(errors="replace")]
    except (ImportError, OSError):
        return ""
    return f"; benchmarks: {', '.join(sorted(mains))}" if mains else ""


def _dispatch(module: str, argv: list[str], what: str) -> int:
    """Call `module`.main(argv), imported only now; a clear message if it is not there."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):   # the module itself, not one of its imports
            print(f"dpsgs: '{what}' is not available in this installation ({module} not found)"
                  + _bench_hint(module), file=sys.stderr)
            return 2
        raise
    if not hasattr(mod, "main"):
        print(f"dpsgs: '{what}' is not available: {module} has no main()", file=sys.stderr)
        return 2
    rc = mod.main(argv)
    return int(rc or 0)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:       # before the job started (the job handles its own)
        from dpsgs.job.process import launcher_rank

        if launcher_rank() == 0:
            print("dpsgs: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    # bench/plan pass everything after their name through, --help included.
    if argv and argv[0] == "plan":
        return _dispatch("dpsgs.planner.cli", argv[1:], "plan")
    if argv and argv[0] == "bench" and (len(argv) == 1 or argv[1] in ("-h", "--help")):
        print(_bench_list())
        return 0
    if len(argv) >= 2 and argv[0] == "bench" and not argv[1].startswith("-"):
        name = argv[1]
        if not name.isidentifier():
            print(f"dpsgs bench: bad benchmark name {name!r}", file=sys.stderr)
            return 2
        return _dispatch(f"dpsgs.bench.{name}", argv[2:], f"bench {name}")
    try:
        defaults = _base_config(argv) if argv and argv[0] == "train" else None
    except ValueError as e:
        from dpsgs.job.process import launcher_rank

        if launcher_rank() == 0:       # every rank reads the same file: say it once
            print(f"dpsgs train: error: {e}", file=sys.stderr)
        return 2
    args = build_parser(defaults).parse_args(argv)
    if args.command == "train":
        return _train(args)
    if args.command == "checkpoint":
        return _checkpoint(args)
    if args.command == "plot":
        from dpsgs.job.plots import plot_run

        try:
            written = plot_run(args.run_dir, args.out)
        except (FileNotFoundError, ValueError) as e:
            print(f"dpsgs plot: error: {e}", file=sys.stderr)
            return 2
        for path in written:
            print(path)
        return 0
    print(_bench_list(), file=sys.stderr)
    return 2
