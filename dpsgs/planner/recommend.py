"""Enumerate the K x N factorisations of a device count, predict each schedule, pick the fastest."""

from __future__ import annotations

from dataclasses import dataclass

from .cluster import Cluster
from .cost import Config, Prediction, predict
from .profile import ModelProfile

__all__ = ["Candidate", "candidates", "recommend"]


@dataclass
class Candidate:
    prediction: Prediction | None
    config: Config
    skipped: str = ""                # why this configuration cannot run (then prediction None)


def candidates(profile: ModelProfile, cluster: Cluster, batch: int, stash: str = "weights",
               overlap: str = "backward", micro_batches: int = 4,
               schedules: tuple[str, ...] = ("fdg", "1f1b", "gpipe"),
               memory_limit: float | None = None) -> list[Candidate]:
    """Every K x N = gpus with K <= layers: DDP for K = 1, each of `schedules` for K > 1."""
    out: list[Candidate] = []
    G, L = cluster.gpus, len(profile.layers)
    for K in (k for k in range(1, G + 1) if G % k == 0):
        N = G // K
        scheds = ("ddp",) if K == 1 else schedules
        for s in scheds:
            cfg = Config(K, N, s, stash=stash, overlap=overlap, micro_batches=micro_batches)
            why = ""
            if K > L:
                why = f"K = {K} > {L} layers"
            elif batch % N:
                why = f"batch {batch} not divisible by N = {N}"
            elif s in ("gpipe", "1f1b") and (batch // N) % micro_batches:
                why = f"per-replica batch {batch // N} not divisible by M = {micro_batches}"
            if why:
                out.append(Candidate(None, cfg, why))
                continue
            p = predict(profile, cluster, cfg, batch)
            peak = max(st.activation_bytes + st.param_bytes * 4 for st in p.stages)
            if memory_limit is not None and peak > memory_limit:
                # weights + gradient + 2 optimizer buffers = 4 x parameter bytes, as a floor
                out.append(Candidate(p, cfg, f"needs {peak / 1e9:.2f} GB > limit"))
                continue
            out.append(Candidate(p, cfg))
    return out


def recommend(cands: list[Candidate]) -> Candidate:
    """The runnable candidate with the highest predicted samples/s (ties: fewer stages)."""
    ok = [c for c in cands if c.prediction is not None and not c.skipped]
    if not ok:
        raise ValueError("no configuration fits: " +
                         "; ".join(f"{c.config.label}: {c.skipped}" for c in cands))
    return max(ok, key=lambda c: (round(c.prediction.samples_per_s, 9),  # type: ignore
                                  -c.config.stages))
