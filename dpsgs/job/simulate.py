"""`--simulate`: a K x N run in one process (the pipeline's reference over the job's setup)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpsgs.config import TrainConfig
from dpsgs.job.data import Dataset
from dpsgs.job.run_setup import prepare
from dpsgs.pipeline.reference import Reference

__all__ = ["reference_for", "simulate"]


def reference_for(config: TrainConfig, model: nn.Sequential | None = None,
                  data: tuple[Dataset, Dataset] | None = None) -> Reference:
    """The single-process reference of `config` (model/data override config.model/dataset)."""
    return Reference(prepare(config, model, data))


def simulate(config: TrainConfig, model: nn.Sequential | None = None,
             data: tuple[Dataset, Dataset] | None = None) -> dict[str, Any]:
    """Train per `config` on K x N virtual ranks in this process; the summary dict."""
    torch.manual_seed(config.seed)
    ref = reference_for(config, model, data)
    summary = ref.run()
    summary["split"] = ref.workload.split
    return summary
