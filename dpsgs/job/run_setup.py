"""Resolve a TrainConfig into what every rank (and the reference) agrees on: data, model, split.

Both the distributed trainer and the single-process reference call `prepare`, so they build
the same model from the same seed, split it at the same points, and walk the same batches.
The resulting Setup is the pipeline's Workload (dpsgs.pipeline.workload): the step executor
takes its batches, stage modules and optimizers from it.

Any nn.Module is split by tracing (dpsgs.pipeline.graph): with K > 1 stages the model is
traced on every rank (what cannot be traced is refused there, the same on every rank), the
split is either given (config.split: module paths, or top-level child indices) or balanced
(config.balance), and each rank builds its stage module from the traced graph. With K = 1 the
model runs whole, untraced: any forward trains data-parallel.
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
from dpsgs.pipeline.graph import ModelGraph, SplitError
from dpsgs.pipeline.partition import balance_graph, node_costs, profile_units, unit_costs
from dpsgs.pipeline.split import resolve_split, stage_module
from dpsgs.pipeline.workload import StagePlace

__all__ = ["DTYPES", "Loaded", "Setup", "SplitChoice", "assemble", "check_names", "choose_split",
           "load", "prepare", "torch_dtype", "segments", "eval_batches"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


@dataclass
class SplitChoice:
    """The cut points every rank agrees on, and how they were chosen (printed at start,
    recorded in run.json and summary.json, saved in every checkpoint)."""

    split: list[str]                     # K-1 module paths: each stage starts before one
    how: str                             # '--split', 'checkpoint', or the balance mode
    stage_costs: list[float] | None = None   # per stage, in `unit` (balanced splits)
    unit: str = ""
    whole: list[str] = field(default_factory=list)   # modules run whole (forward not traceable)

    def describe(self, model: str, stages: int) -> str:
        """One line for the start of a run."""
        if stages == 1:
            return f"split: {model} runs whole in 1 stage (not traced)"
        where = ", ".join(repr(p) for p in self.split)
        why = {"--split": "as --split asked", "checkpoint": "the checkpoint's",
               "run folder": "the run's"}.get(self.how, f"balanced by {self.how}")
        costs = (f"; stage costs {', '.join(_fmt(c) for c in self.stage_costs)} {self.unit}"
                 if self.stage_costs else "")
        whole = (f"; run whole, their forward not traceable: {', '.join(self.whole)}"
                 if self.whole else "")
        return f"split: {model} into {stages} stages before {where} ({why}{costs}{whole})"

    def record(self) -> dict[str, Any]:
        return {"split": list(self.split), "split_by": self.how,
                "stage_costs": self.stage_costs, "stage_cost_unit": self.unit or None,
                "run_whole": list(self.whole)}


def _fmt(c: float) -> str:
    return f"{c:.0f}" if abs(c) >= 100 else f"{c:.3g}"


@dataclass
class Setup:
    config: TrainConfig
    train: Dataset
    test: Dataset
    sampler: BatchSampler
    model: nn.Module                 # the full model, built from the seed
    graph: ModelGraph | None         # the traced model (None with K = 1: it runs whole)
    positions: list[int]             # K-1 cut positions in graph.body
    choice: SplitChoice
    dtype: torch.dtype
    in_shape: tuple[int, ...]        # one sample
    _replica_models: dict[int, nn.Module] = field(default_factory=dict, repr=False)

    @property
    def split(self) -> list[str]:
        """The K-1 split points as module paths."""
        return list(self.choice.split)

    @property
    def stages(self) -> int:
        return len(self.positions) + 1

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

    def stage_layers(self, model: nn.Module, stage: int) -> nn.Module:
        """Stage `stage` of `model` (this setup's model or a copy of it): its module."""
        if self.graph is None:
            return model
        return stage_module(self.graph, model, self.positions, stage)

    def specs(self, stage: int, side: str) -> tuple[tuple[torch.dtype, tuple[int, ...]], ...]:
        """(wire dtype, per-sample shape) of the tensors crossing stage `stage`'s incoming
        ('in') or outgoing ('out') cut: floating tensors in the amp dtype under autocast."""
        K = self.stages
        if side == "in" and stage == 0 or self.graph is None:
            specs = [(self.dtype, self.in_shape)] if side == "in" else []
        elif side == "out" and stage == K - 1:
            v = self.graph.values[self.graph.output]
            specs = [(v.dtype, v.shape)]
        else:
            specs = self.graph.specs(self.positions[stage - 1 if side == "in" else stage])
        amp = AMP_DTYPES[self.config.amp]
        return tuple((amp if amp is not None and dt.is_floating_point else dt, tuple(shape))
                     for dt, shape in specs)

    # -- the pipeline's Workload ---------------------------------------------------------
    def place(self, rank: int) -> StagePlace:
        K, N = self.config.stages, self.config.replicas
        replica, stage = divmod(rank, K)
        return StagePlace(rank, replica, stage, K, N, self.specs(stage, "in"),
                          self.specs(stage, "out"), self.dtype, AMP_DTYPES[self.config.amp])

    def stage_module(self, replica: int, stage: int) -> nn.Module:
        """Stage `stage` of replica `replica`'s model. The first replica asked for takes the
        seeded model itself (a rank of the trainer holds one replica); others in the same
        process (the reference) get deep copies, taken before any training."""
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
    """What one rank builds on its own from a config, before any collective: the data, the
    seeded model and (K > 1) its traced graph; the split comes after, from rank 0 in a job
    (its balance, or a checkpoint's)."""

    config: TrainConfig
    train: Dataset
    test: Dataset
    model: nn.Module
    dtype: torch.dtype
    in_shape: tuple[int, ...]
    sampler: BatchSampler
    graph: ModelGraph | None = None

    def sample(self, rows: int) -> torch.Tensor:
        """The first `rows` training inputs (repeated if there are fewer), in the run's dtype."""
        x = self.train.x
        return x[torch.arange(rows) % max(1, len(x))].to(self.dtype)


def load(config: TrainConfig, model: nn.Module | None = None, data: Any = None) -> Loaded:
    """The data and the seeded full model of `config` (model/data override config.model and
    config.dataset: embedding, tests; a given model is used as is, seeded by the caller;
    `data` is (train, test) in any form of dpsgs.job.user_data), traced when K > 1, and
    config.split checked against it. SplitError (one line naming the module and the reason)
    for a model that cannot be traced or cut as asked."""
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
    given = model
    if model is None:
        from dpsgs.job.models import build_model

        torch.manual_seed(config.seed)
        model = build_model(config.model, in_shape, config.num_classes or train.num_classes)
    model = model.to(dtype)
    sampler = BatchSampler(len(train), config.batch_size, config.replicas, config.seed,
                           drop_last=config.drop_last)
    loaded = Loaded(config, train, test, model, dtype, in_shape, sampler)
    if config.stages > 1:
        label = config.model if given is None else type(model).__name__
        loaded.graph = ModelGraph.trace(model, loaded.sample(3), label)
        if config.split:
            resolve_split(loaded.graph, config.split, config.stages)
        else:
            _enough_cuts(loaded.graph, config.stages)
    else:
        _check_logits(model, loaded.sample(2))
    return loaded


def _enough_cuts(graph: ModelGraph, stages: int) -> None:
    balance_graph(graph, stages, [0.0] * (len(graph.candidates()) + 1), graph.candidates())


def _check_logits(model: nn.Module, sample: torch.Tensor) -> None:
    """K = 1: the model's output is one floating tensor (batch, classes) (eval mode, no
    gradient: nothing moves)."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            out = model(sample)
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not (isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() == 2
            and out.shape[0] == sample.shape[0]):
        what = (f"a tensor of shape {tuple(out.shape)} and dtype {out.dtype}"
                if isinstance(out, torch.Tensor) else f"a {type(out).__name__}")
        raise SplitError(f"cannot train {type(model).__name__}: its forward returns {what}; "
                         f"dpsgs needs the logits, one floating tensor of shape (batch, classes)")


def choose_split(loaded: Loaded, split: list[int | str] | None = None,
                 how: str | None = None) -> SplitChoice:
    """The split of `loaded`: `split` (a resumed run keeps its checkpoint's; `how` says
    where it came from), else config.split, else balanced per config.balance ('time'
    profiles here: call it on one rank and share the result)."""
    config, graph = loaded.config, loaded.graph
    if graph is None:
        return SplitChoice([], "whole")
    given = split or config.split
    if given:
        positions = resolve_split(graph, given, config.stages)
        return SplitChoice([graph.name(p) for p in positions],
                           how or ("checkpoint" if split else "--split"), whole=graph.whole)
    cands = graph.candidates()
    if config.balance == "time":
        units = profile_units(graph, loaded.model, loaded.sample(config.batch_size), cands)
        scale, unit = 1e3, "ms/batch"
    else:
        units = unit_costs(graph, node_costs(graph, config.balance), cands)
        scale, unit = ((1e-6, "MFLOP-eq/sample") if config.balance == "flops" else
                       (1.0, "parameters" if config.balance == "params" else "layers"))
    positions = balance_graph(graph, config.stages, units, cands)
    edges = [0, *[cands.index(p) + 1 for p in positions], len(units)]
    stage_costs = [scale * sum(units[edges[k]:edges[k + 1]]) for k in range(config.stages)]
    return SplitChoice([graph.name(p) for p in positions], config.balance, stage_costs, unit,
                       graph.whole)


def assemble(loaded: Loaded, choice: SplitChoice) -> Setup:
    """The Setup of a loaded rank cut as `choice` says."""
    positions = ([] if loaded.graph is None else
                 resolve_split(loaded.graph, choice.split, loaded.config.stages))
    return Setup(loaded.config, loaded.train, loaded.test, loaded.sampler, loaded.model,
                 loaded.graph, positions, choice, loaded.dtype, loaded.in_shape)


def prepare(config: TrainConfig, model: nn.Module | None = None, data: Any = None,
            split: list[int | str] | None = None) -> Setup:
    """Data, seeded full model and split for `config`, in one process (load, choose_split,
    assemble). `split` overrides config.split."""
    loaded = load(config, model, data)
    return assemble(loaded, choose_split(loaded, split))


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
