"""TrainConfig: every choice of a training run, resolved once and saved with the run."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CHOICES", "OPERATIONAL", "TrainConfig"]

# The allowed values of every choice field (the CLI's --help shows them).
CHOICES: dict[str, tuple[str, ...]] = {
    "schedule": ("fdg", "sync"), "stash": ("weights", "recompute"),
    "overlap": ("backward", "step"), "sync_kind": ("1f1b", "gpipe"),
    "balance": ("flops", "time", "params", "layers"), "dataset": ("digits", "cifar10", "synthetic"),
    "dtype": ("float32", "float64"), "optimizer": ("sgd", "adam", "adamw"),
    "lr_schedule": ("constant", "step", "cosine"), "allreduce": ("auto", "ring", "mpi"),
    "transport": ("core", "mpi4py", "torch"), "torch_backend": ("auto", "gloo", "nccl", "dpsgs"),
    "on_nonfinite": ("stop", "skip"), "device": ("auto", "cpu", "cuda", "sim"), "amp": ("none", "bf16"),
}

# Settings a run may change when it resumes: they decide how it runs, not its numbers. Every
# other field is an identity setting: a resume keeps it unless named with --override.
OPERATIONAL = frozenset({
    "data_dir", "balance", "bucket_cap_mb", "first_bucket_mb", "allreduce", "timeout", "warn_after",
    "stop_grace", "run_dir", "metrics_every", "eval_every", "checkpoint_every", "keep_checkpoints",
    "resume", "resume_fallback", "override", "elastic", "trace", "progress", "on_nonfinite", "device",
    "transport", "torch_backend",
})


@dataclass
class TrainConfig:
    # grid and algorithm (DESIGN §1)
    stages: int = 2                    # K
    replicas: int = 1                  # N
    schedule: str = "fdg"              # fdg | sync
    stash: str = "weights"             # weights | recompute
    overlap: str = "backward"          # backward | step
    shrink: float = 1.0                # beta; stage k scales its gradient by beta**(K-1-k)
    micro_batches: int = 4             # sync schedule: micro-batches per step
    sync_kind: str = "1f1b"            # sync schedule: 1f1b | gpipe
    flush_every_epoch: bool = True
    # explicit split points, else balanced: module paths ("layer3.1": a stage starts before
    # that module; "layer3.1.conv2" inside a block) or ints (index of a top-level child: the
    # layer index of an nn.Sequential)
    split: list[int | str] | None = None
    balance: str = "flops"             # flops (deterministic) | time (profiled) | params | layers

    # model and data
    model: str = "mlp"
    dataset: str = "digits"            # digits | cifar10 | synthetic
    data_dir: str | None = None
    synthetic_shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    synthetic_samples: int = 4096
    num_classes: int | None = None     # inferred from the dataset when None
    batch_size: int = 32               # per replica per step (global batch = N * batch_size)
    drop_last: bool = True             # partial last batch: dropped (documented in README)
    dtype: str = "float32"             # float32 | float64
    device: str = "auto"               # auto (cuda where every rank has a GPU and NCCL) | cpu | cuda
                                       # | sim (a test device: the GPU path on CPUs, DPSGS_CUDA=sim builds)
    amp: str = "none"                  # none | bf16: autocast (for GPUs; bf16 activations between stages)

    # optimisation
    epochs: int = 10
    max_steps: int | None = None       # stop after this many steps (still flushes)
    optimizer: str = "sgd"             # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    lr_schedule: str = "cosine"        # constant | step | cosine
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    seed: int = 0

    # communication
    bucket_cap_mb: float = 25.0
    first_bucket_mb: float = 1.0
    allreduce: str = "auto"            # auto | ring | mpi
    transport: str = "core"            # core (dpsgs._C) | mpi4py (baseline) | torch (torch.distributed)
    torch_backend: str = "auto"        # --transport torch: auto (nccl on cuda, else gloo) | gloo | nccl | dpsgs
    timeout: float = 300.0             # seconds any wait may take before the job is aborted
    warn_after: float = 60.0           # stall report threshold
    stop_grace: float = 15.0           # after SIGTERM the job ends within this, stuck ranks or not

    # output
    run_dir: str | None = None
    metrics_every: int = 1             # write a metrics line every this many steps
    eval_every: int = 1                # evaluate every this many epochs
    checkpoint_every: int = 1          # checkpoint every this many epochs (0 = only final)
    keep_checkpoints: int = 3          # newest checkpoints kept (0 = all)
    resume: str | None = None          # path | auto
    resume_fallback: bool = False      # a damaged newest checkpoint: resume from the one before
    override: list[str] | None = None  # identity settings a resume may change (recorded)
    elastic: bool = False              # with --resume: keep K, take N = world / K (resharding)
    trace: str | None = None           # Chrome-trace JSON file (per-rank suffix added)
    progress: bool = True              # tqdm bar on rank 0
    on_nonfinite: str = "stop"         # stop | skip

    @property
    def world_size(self) -> int:
        return self.stages * self.replicas

    def validate(self) -> None:
        """Every check that needs no data, no model and no MPI; each error names the option.
        The names of models and datasets are checked by the job (dpsgs.job.run_setup)."""
        def option(name: str) -> str:
            return "--" + name.replace("_", "-")

        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{option(name)} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        # --epochs 0 would train nothing and report an untrained model as the result
        for name in ("stages", "replicas", "batch_size", "micro_batches", "metrics_every",
                     "eval_every", "synthetic_samples", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{option(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{option(name)} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")
        if not self.lr > 0 or not self.timeout > 0:
            raise ValueError(f"--lr and --timeout must be > 0, got {self.lr} and {self.timeout}")
        if not self.stop_grace > 0:
            raise ValueError(f"--stop-grace must be > 0, got {self.stop_grace}")
        if not 0 < self.shrink <= 1:
            raise ValueError(f"--shrink must be in (0, 1], got {self.shrink}")
        if self.schedule == "sync" and self.shrink != 1.0:
            raise ValueError(f"--shrink {self.shrink}: gradient shrinking belongs to the fdg "
                             f"schedule; sync computes the exact gradient")
        if self.schedule == "sync" and self.batch_size % self.micro_batches:
            raise ValueError(f"sync schedule: batch_size {self.batch_size} is not divisible "
                             f"by micro_batches {self.micro_batches}")
        if self.split is not None and len(self.split) != self.stages - 1:
            raise ValueError(f"--split needs K-1 = {self.stages - 1} split points, got {self.split}")
        if self.amp != "none" and self.dtype != "float32":
            raise ValueError(f"--amp {self.amp} trains float32 weights: drop --dtype {self.dtype}")
        if self.elastic and not self.resume:
            raise ValueError("--elastic continues a run on whatever ranks it is given: it needs "
                             "--resume auto (and --run-dir)")
        if self.torch_backend != "auto" and self.transport != "torch":
            raise ValueError(f"--torch-backend {self.torch_backend} chooses the backend of "
                             f"--transport torch; the transport is {self.transport}")
        if self.resume == "auto" and not self.run_dir:
            raise ValueError("--resume auto needs --run-dir: the run folder to resume in")

    def identity(self) -> dict:
        """The settings that decide a run's numbers (a resume must keep them)."""
        return {k: v for k, v in self.to_dict().items() if k not in OPERATIONAL}

    def operational(self) -> dict:
        """The settings a resumed run may change."""
        return {k: v for k, v in self.to_dict().items() if k in OPERATIONAL}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
