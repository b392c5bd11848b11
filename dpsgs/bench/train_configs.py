"""The configurations the training bench runs: each peer and dpsgs mode, launch and plan."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

__all__ = ["Workload", "WORKLOADS", "BenchConfig", "bench_configs", "unavailable_reason"]


@dataclass(frozen=True)
class Workload:
    name: str
    model: str
    in_shape: tuple[int, ...]
    batch: int                 # global samples per step (same for every configuration)
    why: str


# CIFAR-shaped synthetic data for both: the CNN is compute-bound, the MLP's 25 MB gradient
# is large next to its compute, which is where splitting the model into K stages cuts the
# all-reduce volume per rank by K.
WORKLOADS = {
    "cnn": Workload("cnn", "resnet20", (3, 32, 32), 64, "compute-heavy CIFAR ResNet"),
    "mlp": Workload("mlp", "mlp-wide", (3, 32, 32), 64,
                    "communication-heavy: 6.3M params (25 MB fp32 gradient) per step"),
}


@dataclass(frozen=True)
class BenchConfig:
    name: str
    runner: str                # module under dpsgs.bench.peers
    ranks: int
    threads: int               # intra-op threads per rank
    args: tuple[str, ...] = ()
    # what the planner should predict for it (dpsgs.planner.cost.Config fields), or None
    plan: dict | None = field(default=None, hash=False)
    mpi4py: bool = False       # launch as `python -m mpi4py -m ...` (dpsgs uses MPI itself)
    pipeline: bool = False     # takes the bench's split points

    @property
    def cores(self) -> int:
        return self.ranks * self.threads


def bench_configs(micro_batches: int = 4) -> list[BenchConfig]:
    """Baseline first: every speedup is over `backprop-1rank` (1 process, 1 thread)."""
    m = str(micro_batches)
    return [
        BenchConfig("backprop-1rank", "single", 1, 1, plan=dict(stages=1, replicas=1,
                                                                 schedule="ddp")),
        BenchConfig("single-2threads", "single", 1, 2),
        BenchConfig("torch-ddp", "ddp", 2, 1, plan=dict(stages=1, replicas=2, schedule="ddp")),
        BenchConfig("torch-pipe-gpipe", "pipe", 2, 1, ("--schedule", "gpipe",
                                                       "--micro-batches", m),
                    plan=dict(stages=2, replicas=1, schedule="gpipe",
                              micro_batches=micro_batches, overlap="none"), pipeline=True),
        BenchConfig("torch-pipe-1f1b", "pipe", 2, 1, ("--schedule", "1f1b",
                                                      "--micro-batches", m),
                    plan=dict(stages=2, replicas=1, schedule="1f1b",
                              micro_batches=micro_batches, overlap="none"), pipeline=True),
        BenchConfig("dpsgs-fdg-weights", "dpsgs_run", 2, 1,
                    ("--stages", "2", "--schedule", "fdg", "--stash", "weights"),
                    plan=dict(stages=2, replicas=1, schedule="fdg", stash="weights"),
                    mpi4py=True, pipeline=True),
        BenchConfig("dpsgs-fdg-recompute", "dpsgs_run", 2, 1,
                    ("--stages", "2", "--schedule", "fdg", "--stash", "recompute"),
                    plan=dict(stages=2, replicas=1, schedule="fdg", stash="recompute"),
                    mpi4py=True, pipeline=True),
        BenchConfig("dpsgs-sync-1f1b", "dpsgs_run", 2, 1,
                    ("--stages", "2", "--schedule", "sync", "--sync-kind", "1f1b",
                     "--micro-batches", m),
                    plan=dict(stages=2, replicas=1, schedule="1f1b",
                              micro_batches=micro_batches), mpi4py=True, pipeline=True),
        BenchConfig("dpsgs-sync-gpipe", "dpsgs_run", 2, 1,
                    ("--stages", "2", "--schedule", "sync", "--sync-kind", "gpipe",
                     "--micro-batches", m),
                    plan=dict(stages=2, replicas=1, schedule="gpipe",
                              micro_batches=micro_batches), mpi4py=True, pipeline=True),
        BenchConfig("dpsgs-dp", "dpsgs_run", 2, 1, ("--stages", "1", "--replicas", "2"),
                    plan=dict(stages=1, replicas=2, schedule="ddp"), mpi4py=True),
    ]


def unavailable_reason(cfg: BenchConfig) -> str | None:
    """Why `cfg` cannot run in this environment (checked before launching), else None."""
    def missing(mod: str) -> bool:
        try:
            return importlib.util.find_spec(mod) is None
        except (ImportError, ValueError):
            return True

    if cfg.runner == "dpsgs_run":
        for mod in ("dpsgs._C", "dpsgs.job.trainer"):
            if missing(mod):
                return f"{mod} is not built/importable in this tree"
    if cfg.runner == "pipe" and missing("torch.distributed.pipelining"):
        return "torch.distributed.pipelining is not in this torch build"
    if cfg.runner in ("ddp", "pipe"):
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_gloo_available():
            return "torch.distributed with the gloo backend is not available"
    return None
