"""Alpha-beta link model of a cluster: point-to-point and ring all-reduce times between ranks."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Cluster"]


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpus_per_node: int
    intra_bw: float = 100e9        # bytes/s between two devices of one node
    inter_bw: float = 12.5e9       # bytes/s of one NIC
    alpha_intra: float = 5e-6      # seconds per message inside a node
    alpha_inter: float = 2e-5      # seconds per message between nodes
    nics_per_node: int = 1         # concurrent cross-node rings share these

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.gpus_per_node < 1:
            raise ValueError(f"need gpus >= 1 and gpus_per_node >= 1, got {self.gpus}, "
                             f"{self.gpus_per_node}")
        if min(self.intra_bw, self.inter_bw) <= 0 or self.nics_per_node < 1:
            raise ValueError("bandwidths and nics_per_node must be positive")

    def node(self, rank: int) -> int:
        # Ranks fill nodes in order (mpirun's default block placement).
        return rank // self.gpus_per_node

    def p2p(self, a: int, b: int, nbytes: float) -> float:
        """One message of `nbytes` from rank a to rank b."""
        if nbytes <= 0:
            return 0.0
        if self.node(a) == self.node(b):
            return self.alpha_intra + nbytes / self.intra_bw
        return self.alpha_inter + nbytes / self.inter_bw

    def allreduce(self, group: list[int], nbytes: float, concurrent: int = 1) -> float:
        """Ring all-reduce of `nbytes` over `group`: 2(n-1) steps of nbytes/n each, every step
        paced by the slowest hop. `concurrent` rings of other groups cross the same node
        boundary at once (all stage groups reduce during the same step), so they share the
        node's NICs: each ring gets inter_bw * min(nics, concurrent) / concurrent."""
        n = len(group)
        if n <= 1 or nbytes <= 0:
            return 0.0
        nodes = {self.node(r) for r in group}
        if len(nodes) == 1:
            alpha, bw = self.alpha_intra, self.intra_bw
        else:
            share = min(self.nics_per_node, concurrent) / max(1, concurrent)
            alpha, bw = self.alpha_inter, self.inter_bw * share
        return 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / bw
