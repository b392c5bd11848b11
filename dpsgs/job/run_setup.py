"""Resolve a TrainConfig into what every rank (and the reference) agrees on: data, model, split.

Both the distributed trainer and the single-process reference call `prepare`, so they build
the same model from the same seed, split it at the same points, and walk the same batches.
The resulting Setup is the pipeline's Workload (dpsgs.pipeline.workload): the step executor
takes its batches, stage modules and optimizers from it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dpsgs.config import TrainConfig
from dpsgs.job.data import BatchSampler, Dataset
from dpsgs.job.optim import ScheduledOptimizer, build_optimizer
from dpsgs.pipeline.partition import boundary_shapes, check_split, layer_costs, stage_bounds
from dpsgs.pipeline.workload import StagePlace

__all__ = ["DTYPES", "Loaded", "Setup", "assemble", "check_names", "choose_split", "load", "prepare",
           "torch_dtype", "segments", "eval_batches"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


@dataclass
class Setup:
    config: TrainConfig
    train: Dataset
    test: Dataset
    sampler: BatchSampler
    model: nn.Sequential             # the full model, built from the seed
    split: list[int]                 # K-1 split points
    bounds: list[tuple[int, int]]    # layer range of every stage
    dtype: torch.dtype
    in_shape: tuple[int, ...]        # one sample
    out_shapes: list[tuple[int, ...]] = field(default_factory=list)  # per stage, one sample
    costs: list[float] | None = None
    _replica_models: dict[int, nn.Sequential] = field(default_factory=dict, repr=False)

    @property
    def stages(self) -> int:
        return len(self.bounds)

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def total_iterations(self) -> int:
        """Global batches of the whole run (epochs x batches, capped by max_steps)."""
        total = self.config.epochs * self.batches_per_epoch
        if self.config.max_steps is not None:
            total = min(total, int(self.config.max_steps))
        return total

    def stage_layers(self, model: nn.Sequential, stage: int) -> nn.Sequential:
        a, b = self.bounds[stage]
        return nn.Sequential(*list(model.children())[a:b])

    # -- the pipeline's Workload ---------------------------------------------------------
    def place(self, rank: int) -> StagePlace:
        K, N = self.config.stages, self.config.replicas
        replica, stage = divmod(rank, K)
        return StagePlace(rank, replica, stage, K, N,
                          self.in_shape if stage == 0 else self.out_shapes[stage - 1],
                          self.out_shapes[stage], self.dtype, AMP_DTYPES[self.config.amp],
                          first_block=self.bounds[stage][0])

    def stage_module(self, replica: int, stage: int) -> nn.Sequential:
        """Stage `stage`'s layers of replica `replica`'s model. The first replica asked for
        takes the seeded model itself (a rank of the trainer holds one replica); others in the
        same process (the reference) get deep copies, taken before any training."""
        if replica not in self._replica_models:
            first = not self._replica_models
            self._replica_models[replica] = self.model if first else copy.deepcopy(self.model)
        return self.stage_layers(self._replica_models[replica], stage)

    def make_optimizer(self, params: Sequence[nn.Parameter]) -> ScheduledOptimizer | None:
        opt = build_optimizer(params, self.config)
        return None if opt is None else ScheduledOptimizer(opt, self.config, self.total_iterations,
                                                           self.batches_per_epoch)

    def segments(self, start_epoch: int = 0) -> list[list[tuple[int, int]]]:
        return segments(self, start_epoch)

    def batch(self, epoch: int, batch: int, replica: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (cast to the run's dtype) and labels of one replica's share of a batch."""
        from dpsgs.job.data import get_batch

        x, y = get_batch(self.train, self.sampler, epoch, batch, replica, train=True)
        return x.to(self.dtype), y

    def inputs(self, epoch: int, batch: int, replica: int) -> torch.Tensor:
        return self.batch(epoch, batch, replica)[0]

    def labels(self, epoch: int, batch: int, replica: int) -> torch.Tensor:
        """The labels of `batch` alone (what get_batch returns as y: augmentation changes
        only inputs), so the last stage needs no input data."""
        return self.train.y[self.sampler.indices(epoch, batch, replica)]

    def eval_spans(self, replica: int) -> list[tuple[int, int]]:
        return eval_batches(len(self.test), self.config.batch_size, self.config.replicas, replica)

    def eval_inputs(self, a: int, b: int) -> torch.Tensor:
        return self.test.x[a:b].to(self.dtype)

    def eval_labels(self, a: int, b: int) -> torch.Tensor:
        return self.test.y[a:b]

    def drop_inputs(self) -> None:
        """Forget the input tensors (train and test x) on a rank that never reads them:
        every stage but the first. Replaces the Dataset objects, never mutates them."""
        import dataclasses

        for name in ("train", "test"):
            ds = getattr(self, name)
            empty = ds.x.new_empty((0, *ds.x.shape[1:]))
            setattr(self, name, dataclasses.replace(ds, x=empty))


def check_names(config: TrainConfig) -> None:
    """The model and dataset names (and the CIFAR folder) exist; ValueError naming the option."""
    from dpsgs.job.data import check_dataset
    from dpsgs.job.models import check_model_name

    check_model_name(config.model)
    check_dataset(config.dataset, config.data_dir)


@dataclass
class Loaded:
    """What one rank builds on its own from a config, before any collective: the data and the
    seeded model (the split comes after, from rank 0 in a job: its profile, or a checkpoint)."""

    config: TrainConfig
    train: Dataset
    test: Dataset
    model: nn.Sequential
    dtype: torch.dtype
    in_shape: tuple[int, ...]
    sampler: BatchSampler

    @property
    def layers(self) -> int:
        return len(list(self.model.children()))


def load(config: TrainConfig, model: nn.Sequential | None = None, data: Any = None) -> Loaded:
    """The data and the seeded full model of `config` (model/data override config.model and
    config.dataset: embedding, tests; a given model is used as is, seeded by the caller;
    `data` is (train, test) in any form of dpsgs.job.user_data)."""
    from dpsgs.job.data import load_dataset
    from dpsgs.job.user_data import as_datasets, check_labels

    config.validate()
    dtype = torch_dtype(config.dtype)
    if data is None:
        train, test = load_dataset(config.dataset, config.data_dir, tuple(config.synthetic_shape),
                                   config.synthetic_samples, config.seed)
        for ds, which in ((train, "train"), (test, "test")):
            check_labels(ds, which, config.num_classes or ds.num_classes,
                         "as set" if config.num_classes else "as the dataset declares")
    elif config.data_dir:
        raise ValueError(f"--data-dir {config.data_dir}: this run's data comes from data=, "
                         f"nothing reads the folder; drop data_dir")
    else:
        train, test = as_datasets(data, config.num_classes)
    in_shape = tuple(train.x.shape[1:])
    if model is None:
        from dpsgs.job.models import build_model

        torch.manual_seed(config.seed)
        model = build_model(config.model, in_shape, config.num_classes or train.num_classes)
    model = model.to(dtype)
    sampler = BatchSampler(len(train), config.batch_size, config.replicas, config.seed,
                           drop_last=config.drop_last)
    loaded = Loaded(config, train, test, model, dtype, in_shape, sampler)
    if config.split:
        check_split(config.split, loaded.layers, config.stages)
    elif config.stages > loaded.layers:
        raise ValueError(f"model {config.model!r} has {loaded.layers} blocks, cannot make "
                         f"{config.stages} stages (each stage needs at least one block)")
    return loaded


def choose_split(loaded: Loaded, costs: Sequence[float] | None = None, profile: bool = True,
                 split: Sequence[int] | None = None) -> tuple[list[int], list[float] | None]:
    """(split points, per-layer costs): `split` (a resumed run keeps its checkpoint's), else
    config.split, else balanced by `costs`, or by costs measured here (balance=time, when
    `profile`) or counted (params, layers)."""
    config = loaded.config
    split = split or config.split
    if split:
        return check_split(split, loaded.layers, config.stages), list(costs) if costs is not None else None
    if costs is None and not (config.balance == "time" and not profile):
        sample = loaded.train.x[:config.batch_size].to(loaded.dtype)
        costs = layer_costs(loaded.model, config.balance, sample)
    from dpsgs.pipeline.partition import balance as balance_costs

    return balance_costs(costs if costs is not None else [1.0] * loaded.layers, config.stages), \
        (list(costs) if costs is not None else None)


def assemble(loaded: Loaded, split: Sequence[int], costs: Sequence[float] | None = None) -> Setup:
    """The Setup of a loaded rank cut at `split`."""
    split = check_split(split, loaded.layers, loaded.config.stages)
    bounds = stage_bounds(split, loaded.layers)
    shapes = boundary_shapes(loaded.model, loaded.in_shape, loaded.dtype)
    out_shapes = [shapes[b - 1] for _, b in bounds]
    return Setup(loaded.config, loaded.train, loaded.test, loaded.sampler, loaded.model, split,
                 bounds, loaded.dtype, loaded.in_shape, out_shapes,
                 list(costs) if costs is not None else None)


def prepare(config: TrainConfig, model: nn.Sequential | None = None, data: Any = None,
            costs: Sequence[float] | None = None, profile: bool = True,
            split: Sequence[int] | None = None) -> Setup:
    """Data, seeded full model and split for `config`, in one process (load, choose_split,
    assemble). `costs` (per layer) fixes the balance; without them and with balance='time',
    layers are profiled here if `profile`. `split` overrides config.split."""
    loaded = load(config, model, data)
    chosen, costs = choose_split(loaded, costs, profile, split)
    return assemble(loaded, chosen, costs)


def segments(setup: Setup, start_epoch: int = 0) -> list[list[tuple[int, int]]]:
    """The run as pipeline segments, each a list of (epoch, batch); the pipeline is flushed
    after every segment. flush_every_epoch: one segment per epoch; else a single segment."""
    nb = setup.batches_per_epoch
    total = setup.total_iterations
    segs = []
    for epoch in range(start_epoch, setup.config.epochs):
        seg = [(epoch, b) for b in range(nb) if epoch * nb + b < total]
        if seg:
            segs.append(seg)
    if not setup.config.flush_every_epoch and segs:
        segs = [[eb for seg in segs for eb in seg]]
    return segs


def eval_batches(n: int, batch_size: int, replicas: int, replica: int) -> list[tuple[int, int]]:
    """Row ranges [a, b) of the test set that `replica` evaluates: contiguous batches of
    `batch_size` (the last may be partial) dealt round-robin over the replicas."""
    spans = [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]
    return spans[replica::replicas]
