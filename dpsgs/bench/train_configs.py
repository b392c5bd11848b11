"""The configurations the training bench runs: each peer and dpsgs mode, launch and plan."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field

__all__ = ["DEVICES", "Workload", "WORKLOADS", "BenchConfig", "bench_configs", "cuda_unavailable",
           "unavailable_reason", "visible_gpus"]

DEVICES = ("cpu", "cuda")


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
    device: str = "cpu"        # cpu | cuda: where its ranks compute (cuda: one GPU per rank)
    share_gpu: bool = False    # cuda with more ranks than GPUs: a NCCL_HOSTID per rank

    @property
    def cores(self) -> int:
        return self.ranks * self.threads


def bench_configs(micro_batches: int = 4, device: str = "cpu",
                  gpus: int = 0) -> list[BenchConfig]:
    """Baseline first: every speedup is over `backprop-1rank` (1 process, 1 thread; on cuda
    one GPU). device="cuda": every configuration on GPUs, those with more ranks than the
    `gpus` visible sharing them (share_gpu)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    configs = _cpu_configs(micro_batches)
    if device == "cpu":
        return configs
    return [dataclasses.replace(c, device="cuda", share_gpu=c.ranks > max(gpus, 1))
            for c in configs]


def _cpu_configs(micro_batches: int) -> list[BenchConfig]:
    m = str(micro_batches)
    return [
        BenchConfig("backprop-1rank", "single", 1, 1, plan=dict(stages=1, replicas=1,
                                                                 schedule="ddp")),
        BenchConfig("single-2threads", "single", 1, 2),
        BenchConfig("torch-ddp", "ddp", 2, 1, plan=dict(stages=1, replicas=2, schedule="ddp")),
        # the same DDP script over dpsgs's core as a torch.distributed backend (no planner
        # prediction: the planner's DDP link is gloo's)
        BenchConfig("torch-ddp-dpsgs", "ddp", 2, 1, ("--backend", "dpsgs"), mpi4py=True),
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
        # the same trainer over torch.distributed (gloo on cpu, NCCL on cuda): the transport's cost
        BenchConfig("dpsgs-fdg-torch", "dpsgs_run", 2, 1,
                    ("--stages", "2", "--schedule", "fdg", "--stash", "weights", "--transport", "torch"),
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


def _missing(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is None
    except (ImportError, ValueError):
        return True


def unavailable_reason(cfg: BenchConfig) -> str | None:
    """Why `cfg` cannot run in this environment (checked before launching), else None."""
    needs = {"dpsgs_run": ("dpsgs._C", "dpsgs.job.trainer")}.get(cfg.runner, ())
    if "dpsgs" in cfg.args:   # a torch peer over the dpsgs backend
        needs = ("dpsgs._C", "dpsgs.distributed")
    for mod in needs:
        if _missing(mod):
            return f"{mod} is not built/importable in this tree"
    if cfg.device == "cuda":
        return _cuda_reason(cfg)
    if cfg.runner == "pipe" and _missing("torch.distributed.pipelining"):
        return "torch.distributed.pipelining is not in this torch build"
    if cfg.runner in ("ddp", "pipe"):
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_gloo_available():
            return "torch.distributed with the gloo backend is not available"
    return None


def _cuda_reason(cfg: BenchConfig) -> str | None:
    """Why `cfg` cannot run on GPUs: peers with no GPU form first (said, not faked), then
    what this machine lacks for the runner."""
    if cfg.runner == "pipe":
        return ("not run on GPU: this bench's torch pipelining peer runs over gloo on CPU "
                "only (no NCCL/CUDA variant)")
    if "dpsgs" in cfg.args:
        return ("not run on GPU: the dpsgs backend hands CUDA tensors to NCCL, which torch-ddp "
                "measures on GPUs")
    if cfg.runner == "single" and cfg.threads > 1:
        return ("not run on GPU: intra-op CPU threads do not apply to a GPU run "
                "(backprop-1rank is the one-GPU baseline)")
    why = cuda_unavailable()
    if why:
        return why
    if cfg.runner == "ddp":
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_nccl_available():
            return "torch.distributed has no NCCL backend in this torch build"
    if cfg.runner == "dpsgs_run":
        from dpsgs.comm import nccl

        ok, why = nccl.available()
        if not ok:
            return f"dpsgs NCCL backend: {why}"
    return None


def visible_gpus() -> int:
    """CUDA devices torch sees in this process (0 without a CUDA build of torch)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cuda_unavailable() -> str | None:
    """Why nothing can run on GPUs here (torch without CUDA, no visible device), else None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA (a CPU build)"
    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        return f"no CUDA device is visible to torch {torch.__version__}"
    return None
