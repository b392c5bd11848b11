"""TrainConfig: every choice of a training run, resolved once and saved with the run."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TrainConfig"]


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
    split: list[int] | None = None     # explicit split points (layer indices), else balanced
    balance: str = "time"              # time (profiled) | params | layers

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
    timeout: float = 300.0             # seconds any wait may take before the job is aborted
    warn_after: float = 60.0           # stall report threshold

    # output
    run_dir: str | None = None
    metrics_every: int = 1             # write a metrics line every this many steps
    eval_every: int = 1                # evaluate every this many epochs
    checkpoint_every: int = 1          # checkpoint every this many epochs (0 = only final)
    resume: str | None = None          # path | auto
    trace: str | None = None           # Chrome-trace JSON file (per-rank suffix added)
    progress: bool = True              # tqdm bar on rank 0
    on_nonfinite: str = "stop"         # stop | skip

    @property
    def world_size(self) -> int:
        return self.stages * self.replicas

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {unknown}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
