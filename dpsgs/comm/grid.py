"""The K x N grid: the one map rank <-> (replica, stage), stage and pipeline groups (DESIGN §2)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

__all__ = ["Grid", "make_groups"]


@dataclass(frozen=True)
class Grid:
    """K = `stages` pipeline stages x N = `replicas` data-parallel replicas.

    rank = r*K + k: a replica's stages are consecutive ranks (the per-step activation
    traffic stays between neighbours, usually on one node); stage k's group is
    {r*K + k for all r}.
    """

    stages: int
    replicas: int

    def __post_init__(self) -> None:
        for name, v in (("stages", self.stages), ("replicas", self.replicas)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Grid: {name} must be an int >= 1, got {v!r}")

    @property
    def size(self) -> int:
        return self.stages * self.replicas

    def rank(self, replica: int, stage: int) -> int:
        if not 0 <= replica < self.replicas:
            raise ValueError(f"replica {replica} out of range for {self.replicas} replicas")
        if not 0 <= stage < self.stages:
            raise ValueError(f"stage {stage} out of range for {self.stages} stages")
        return replica * self.stages + stage

    def coords(self, rank: int) -> tuple[int, int]:
        """(replica, stage) of `rank`."""
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} out of range for a {self.stages}x{self.replicas} grid")
        return divmod(rank, self.stages)

    def label(self, rank: int) -> str:
        """'rank 3 (replica 1, stage 1)': how every message names a rank."""
        replica, stage = self.coords(rank)
        return f"rank {rank} (replica {replica}, stage {stage})"

    def stage_group(self, stage: int) -> list[int]:
        """Ranks holding `stage` in every replica (the all-reduce group)."""
        return [self.rank(r, stage) for r in range(self.replicas)]

    def pipeline_group(self, replica: int) -> list[int]:
        """Ranks of one replica's pipeline, stage 0 first."""
        return [self.rank(replica, k) for k in range(self.stages)]

    def check_world(self, size: int) -> None:
        """Raise ValueError unless the world has exactly K*N ranks."""
        if size != self.size:
            raise ValueError(
                f"world size {size} does not match the grid: K*N = {self.stages}*{self.replicas}"
                f" = {self.size} ranks needed (launch with mpirun -n {self.size})")


def make_groups(grid: Grid, rank: int, split: Callable[[int, int], T]) -> tuple[T, T]:
    """This rank's (stage group, pipeline group), made by `split(color, key)` of any backend
    (dpsgs._C.Communicator.split, NcclCommunicator.split, an mpi4py Comm.Split). Collective:
    every rank calls it once, in the same order. Ranks inside each group are ordered by
    replica (stage group) or by stage (pipeline group)."""
    replica, stage = grid.coords(rank)
    return split(stage, replica), split(replica, stage)
