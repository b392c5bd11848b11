"""Numbers the training bench derives from step times: medians, IQR, speedup, efficiency, splits."""

from __future__ import annotations

import statistics
from typing import Any

__all__ = ["quartiles", "throughput", "derive", "stage_split"]


def quartiles(values: list[float]) -> dict[str, float] | None:
    """Median, first and third quartile (inclusive method), IQR, min, max; None if empty."""
    if not values:
        return None
    v = sorted(values)
    if len(v) == 1:
        q1 = med = q3 = v[0]
    else:
        q1, med, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "min": v[0], "max": v[-1],
            "n": len(v)}


def throughput(step_times: list[float], batch: int, warmup: int) -> dict[str, Any]:
    """samples/s per timed step (after `warmup`) and step-time statistics."""
    timed = [t for t in step_times[warmup:] if t > 0]
    return {"samples_per_s": quartiles([batch / t for t in timed]),
            "step_time_s": quartiles(timed)}


def stage_split(rank_split: dict[str, dict[str, list[float]]], rank_stage: dict[str, int],
                warmup: int) -> list[dict[str, Any]]:
    """Per stage (replica 0's rank, all replicas being alike), median seconds per step of
    compute, channel wait, reduce wait and the rest of the step."""
    out = []
    for rank, split in sorted(rank_split.items(), key=lambda kv: int(kv[0])):
        stage = rank_stage.get(rank, 0)
        if any(o["stage"] == stage for o in out):
            continue
        med = {k: (statistics.median(v[warmup:]) if len(v) > warmup else None)
               for k, v in split.items()}
        parts = [med.get(k) for k in ("compute", "channel", "reduce")]
        other = (med["step"] - sum(p for p in parts if p is not None)
                 if med.get("step") is not None else None)
        out.append({"stage": stage, "rank": int(rank), "compute_s": med.get("compute"),
                    "channel_s": med.get("channel"), "reduce_s": med.get("reduce"),
                    "other_s": other, "step_s": med.get("step")})
    return sorted(out, key=lambda o: o["stage"])


def derive(rec: dict[str, Any], baseline_sps: float | None, cores: int,
           warmup: int) -> dict[str, Any]:
    """Add throughput, speedup over 1-rank backprop, scaling efficiency (speedup / cores),
    exposed communication and stash memory to one configuration's raw record."""
    out = throughput(rec.get("step_times", []), rec["batch"], warmup)
    sps = out["samples_per_s"]["median"] if out["samples_per_s"] else None
    out["speedup"] = sps / baseline_sps if sps and baseline_sps else None
    out["efficiency"] = out["speedup"] / cores if out["speedup"] else None
    step = out["step_time_s"]["median"] if out["step_time_s"] else None
    exposed, how = None, None
    if "compute_only_step" in rec and step is not None:
        exposed, how = max(0.0, step - rec["compute_only_step"]), "step - no_sync step"
    if rec.get("rank_split"):
        stages = stage_split(rec["rank_split"], rec.get("rank_stage", {}), warmup)
        out["stages"] = stages
        waits = [(s["channel_s"] or 0.0) + (s["reduce_s"] or 0.0) for s in stages
                 if s["channel_s"] is not None or s["reduce_s"] is not None]
        if waits:
            exposed, how = max(waits), ("max over stages of channel + reduce wait (a "
                                          "sync pipeline's bubble waits included)")
    out["exposed_comm_s"], out["exposed_comm_how"] = exposed, how
    stash = rec.get("stash_peak_bytes")
    if isinstance(stash, dict) and stash:
        out["stash_peak_bytes"] = {k: int(v) for k, v in stash.items()}
    return out
