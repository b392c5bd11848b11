"""What the step executor is handed from above: batches, an optimizer, its stage's place.

The training job builds these from a TrainConfig (dpsgs.job.run_setup); the pipeline layer
only knows the protocols, so it never imports the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from dpsgs.comm.protocol import TensorSpec
from dpsgs.config import TrainConfig

__all__ = ["BatchSource", "StageOptimizer", "StagePlace", "Workload"]


class BatchSource(Protocol):
    """The deterministic batches every rank agrees on (DESIGN §1: the last stage reads the
    labels of the batch it forwards from the same seeded sampler as stage 0)."""

    @property
    def batches_per_epoch(self) -> int: ...
    def inputs(self, epoch: int, batch: int, replica: int) -> torch.Tensor: ...
    def labels(self, epoch: int, batch: int, replica: int) -> torch.Tensor: ...
    def eval_spans(self, replica: int) -> list[tuple[int, int]]: ...
    def eval_inputs(self, a: int, b: int) -> torch.Tensor: ...
    def eval_labels(self, a: int, b: int) -> torch.Tensor: ...


class StageOptimizer(Protocol):
    """One stage's optimizer with its learning-rate schedule: step(batch) applies the update
    of global batch `batch` (its LR) from the parameters' .grad."""

    def step(self, batch: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class StagePlace:
    """Where a stage executor sits in the K x N grid and what crosses its boundaries: the
    tensors crossing its incoming cut (stage 0: the batch) and its outgoing cut (the last
    stage: the logits), in message order, as (wire dtype, shape of one sample)."""

    rank: int
    replica: int
    stage: int
    stages: int
    replicas: int
    in_specs: tuple[TensorSpec, ...]
    out_specs: tuple[TensorSpec, ...]
    dtype: torch.dtype            # the parameters'
    amp: torch.dtype | None = None  # autocast dtype (floating activations between stages), or None

    @property
    def in_grads(self) -> tuple[TensorSpec, ...]:
        """The gradient message this stage sends back: one per floating input."""
        return tuple(s for s in self.in_specs if s[0].is_floating_point)

    @property
    def out_grads(self) -> tuple[TensorSpec, ...]:
        """The gradient message it receives: one per floating output."""
        return tuple(s for s in self.out_specs if s[0].is_floating_point)


class Workload(BatchSource, Protocol):
    """A K x N run as the pipeline sees it (dpsgs.job.run_setup.Setup implements it)."""

    config: TrainConfig

    def place(self, rank: int) -> StagePlace: ...
    def stage_module(self, replica: int, stage: int) -> nn.Module:
        """Stage `stage` of replica `replica`'s model (replicas of one process get copies):
        forward(*tensors crossing its incoming cut) -> those crossing its outgoing cut (one
        tensor alone, else a tuple); parameter names are the whole model's."""
        ...
    def make_optimizer(self, params: Sequence[nn.Parameter]) -> StageOptimizer | None:
        """The optimizer of one stage (None for a stage without parameters)."""
        ...
    def segments(self, start_epoch: int = 0) -> list[list[tuple[int, int]]]:
        """The run as pipeline segments of (epoch, batch), each flushed at its end."""
        ...
