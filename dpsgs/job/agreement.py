"""Every rank runs the same job: the start-up agreement.

Each rank does its local set-up (check the config, load the data, build the model) before
any collective and reports the outcome — its error, or a digest of the job it is about to
run: every setting of its resolved config, its model's parameter shapes and initial
values, and its data's identity. One bounded allgather compares them. A failure anywhere,
or ranks that disagree (an MPMD launch with another --lr on one rank, another
--batch-size...), becomes one SetupFailed raised on every rank with one message naming what
and which ranks; rank 0 prints it. Without this, a disagreement shows up much later, as diverged replicas or a peer that
"is dead or stuck" while every rank is alive.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from dpsgs.comm.grid import Grid
from dpsgs.comm.waits import barrier
from dpsgs.config import TrainConfig

__all__ = ["Outcome", "SetupFailed", "agree", "job_digest"]

# Settings that may differ between ranks of one job (none decides what a rank computes).
_PER_RANK = frozenset({"data_dir", "trace", "progress"})


class SetupFailed(ValueError):
    """Raised on every rank when the job cannot start: a bad setting, a failure in some rank's
    set-up, or ranks that disagree (the start-up agreement)."""


@dataclass
class Outcome:
    """What one rank reports at the agreement."""

    error: str | None = None
    digest: dict[str, str] = field(default_factory=dict)
    decisions: dict[str, Any] = field(default_factory=dict)    # rank 0's, for everyone


def _hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
    return h.hexdigest()[:16]


def _bytes(t: Any) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def job_digest(config: TrainConfig, model: Any, train: Any, test: Any) -> dict[str, str]:
    """Setting name -> its value (as text) for every setting that must match across ranks,
    plus the model's parameter shapes and initial values (a model= built without the same
    seed on every rank would train diverged replicas) and the data's identity (sizes,
    labels, a sample of the inputs: cheap, yet different data cannot pass)."""
    d = {f"--{k.replace('_', '-')}": repr(v) for k, v in config.to_dict().items() if k not in _PER_RANK}
    d["the model's parameter shapes"] = _hash([tuple(p.shape) for p in model.parameters()])
    d["the model's initial weights"] = _hash(*(_bytes(t) for t in model.state_dict().values()))
    step = max(1, len(train) // 64)
    d["the training data"] = _hash(train.name, tuple(train.x.shape), train.num_classes,
                                   train.y.numpy().tobytes(), _bytes(train.x[::step]))
    step = max(1, len(test) // 64)
    d["the test data"] = _hash(test.name, tuple(test.x.shape), test.y.numpy().tobytes(),
                               _bytes(test.x[::step]))
    return d


def _ranks(grid: Grid, ranks: list[int]) -> str:
    if len(ranks) == grid.size:
        return "every rank"
    return ", ".join(grid.label(r) for r in ranks)


def agree(comm: Any, grid: Grid, mine: Outcome, timeout: float) -> Outcome:
    """Collective over `comm` (an mpi4py communicator of the grid): compare every rank's
    outcome. Returns rank 0's (its decisions hold for all); SetupFailed on every rank when a
    rank failed or the digests differ. Bounded: a rank that never comes is a timeout naming
    the barrier."""
    barrier(comm, timeout, "start-up agreement")
    everyone: list[Outcome] = comm.allgather(mine)
    errors: dict[str, list[int]] = {}
    for r, o in enumerate(everyone):
        if o.error:
            errors.setdefault(o.error, []).append(r)
    if errors:
        raise SetupFailed("; ".join(f"{_ranks(grid, rs)}: {text}" for text, rs in errors.items()))
    differ = []
    for key in everyone[0].digest:
        values: dict[str, list[int]] = {}
        for r, o in enumerate(everyone):
            values.setdefault(o.digest.get(key, "(missing)"), []).append(r)
        if len(values) > 1:
            groups = sorted(values.items(), key=lambda kv: kv[1][0])
            if key.startswith("--"):
                differ.append(f"{key} is " + " but ".join(f"{v} on {_ranks(grid, rs)}" for v, rs in groups))
            else:            # digests: name who agrees with whom, not the hashes
                differ.append(f"{key} differ between " + " and ".join(_ranks(grid, rs) for _, rs in groups))
    if differ:
        raise SetupFailed("the ranks do not run the same job: " + "; ".join(differ[:4])
                          + ("; ..." if len(differ) > 4 else "")
                          + " (launch every rank with the same settings)")
    return everyone[0]
