"""The trained model out of a run: inspect a checkpoint, export it as one plain state_dict.

    python -m dpsgs checkpoint inspect RUN_DIR            # what the newest checkpoint holds
    python -m dpsgs checkpoint export RUN_DIR model.pt [--bn average]

    sd = dpsgs.job.export.export_state_dict("runs/r")     # or export(RUN_DIR, "model.pt")
    torch.manual_seed(0)                                   # any seed: every tensor is loaded
    model = dpsgs.job.models.build_model("mlp", (1, 8, 8), 10).to(torch.float32)
    model.load_state_dict(sd)                              # strict: every key matches

RUN_DIR is a run folder (its newest committed checkpoint, checked whole) or a checkpoint
folder. The state_dict is keyed as the whole model's own state_dict (module paths), with
replica 0's BatchNorm running statistics, or (bn='average') the mean over the replicas of
every floating buffer (integer ones, e.g. num_batches_tracked, are replica 0's: they are
equal on every replica).
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import torch

from dpsgs.comm.grid import Grid
from dpsgs.job.atomic_file import atomic_write
from dpsgs.job.checkpoint import (CheckpointError, committed_checkpoints, load_checkpoint,
                                  read_manifest, verify)
from dpsgs.job.whole_state import EMPTY_PIPELINE, read_whole

__all__ = ["BN_CHOICES", "checkpoint_folder", "export", "export_state_dict", "inspect",
           "format_inspect"]

BN_CHOICES = ("replica0", "average")


def checkpoint_folder(path: str | os.PathLike) -> Path:
    """The checkpoint `path` names: itself, or a run folder's newest committed one
    (CheckpointError when it has none)."""
    p = Path(path)
    if (p / "checkpoints").is_dir() or (p / "run.json").is_file():
        found = committed_checkpoints(p)
        if not found:
            raise CheckpointError(f"run folder {str(p)!r} has no committed checkpoint")
        return found[-1]
    read_manifest(p)            # a clear error for a missing or incomplete checkpoint folder
    return p


def export_state_dict(path: str | os.PathLike, bn: str = "replica0") -> dict[str, torch.Tensor]:
    """The whole model's state_dict from checkpoint or run folder `path` (module docstring)."""
    if bn not in BN_CHOICES:
        raise ValueError(f"--bn must be one of {', '.join(BN_CHOICES)}, got {bn!r}")
    folder = checkpoint_folder(path)
    problem = verify(folder)
    if problem:
        raise CheckpointError(f"checkpoint {folder} cannot be exported: {problem}")
    whole = read_whole(folder)
    sd = dict(whole.model)
    if bn == "average" and len(whole.replica_buffers) > 1:
        reps = [whole.replica_buffers[r] for r in sorted(whole.replica_buffers)]
        for key, t in reps[0].items():
            if t.is_floating_point():
                sd[key] = torch.stack([b[key] for b in reps]).mean(dim=0).to(t.dtype)
    return sd


def export(path: str | os.PathLike, out: str | os.PathLike, bn: str = "replica0") -> Path:
    """Write export_state_dict(path, bn) to `out` with torch.save (atomically); `out`."""
    sd = export_state_dict(path, bn)
    buf = io.BytesIO()
    torch.save(sd, buf)
    out = Path(out)
    atomic_write(out, buf.getvalue())
    return out


def _tensor_bytes(obj: Any) -> tuple[int, int]:
    """(tensors, bytes) in a nested state."""
    if isinstance(obj, torch.Tensor):
        return 1, obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        n = b = 0
        for v in obj:
            dn, db = _tensor_bytes(v)
            n, b = n + dn, b + db
        return n, b
    return 0, 0


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """What checkpoint (or run folder) `path` holds: grid, position, run id, split, whether
    it may be resharded, integrity, and per stage its file, bytes and tensors."""
    folder = checkpoint_folder(path)
    m = read_manifest(folder)
    meta = m["meta"]
    problem = verify(folder)
    info: dict[str, Any] = {
        "checkpoint": str(folder), "tag": m.get("tag"), "run_id": meta.get("run_id"),
        "created": m.get("created"), "stages": m["stages"], "replicas": m["replicas"],
        "epoch": meta.get("epoch"), "batch": meta.get("batch"), "batches_trained": meta.get("step"),
        "global_step": meta.get("global_step"), "model": meta.get("model"),
        "dtype": meta.get("dtype"), "schedule": meta.get("schedule"), "split": meta.get("split"),
        "preempted": bool(meta.get("preempted")),
        "pipeline_empty": meta.get("pipeline") == EMPTY_PIPELINE,
        "integrity": problem or "ok", "shards": []}
    whole = None if problem else read_whole(folder)
    for sh in m["shards"]:
        row = {"stage": sh["stage"], "file": sh["file"], "bytes": sh["bytes"], "sha256": sh["sha256"]}
        info["shards"].append(row)
    if whole is not None:
        grid = Grid(m["stages"], m["replicas"])
        for row in info["shards"]:
            st = load_checkpoint(folder, grid, row["stage"])
            row["model_tensors"], row["model_bytes"] = _tensor_bytes(st["model"])
            row["optimizer_tensors"], row["optimizer_bytes"] = _tensor_bytes(st.get("optimizer", {}))
            row["replica_buffers"] = sorted(int(r) for r in (st.get("replica_buffers") or {}))
        info["optimizer_state"] = "per parameter" if whole.optimizer else "none"
    return info


def format_inspect(info: dict[str, Any]) -> str:
    """inspect()'s record as the lines `dpsgs checkpoint inspect` prints."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["created"] or 0))
    split = ", ".join(repr(s) for s in info["split"] or []) or "none (one stage)"
    reshard = ("pipeline empty (taken after a flush): can resume on any grid" if info["pipeline_empty"]
               else "pipeline state not recorded (an older dpsgs): resumes on its own grid only")
    lines = [f"checkpoint {info['checkpoint']} (tag {info['tag']}, run {info['run_id']}, "
             f"committed {when})",
             f"grid: K={info['stages']} stages x N={info['replicas']} replicas; split before {split}",
             f"position: epoch {info['epoch']}, batch {info['batch']} next; {info['batches_trained']} "
             f"batches trained, global step {info['global_step']}"
             + ("; written by a preemption" if info["preempted"] else ""),
             f"model {info['model']}, {info['dtype']}, schedule {info['schedule']}; {reshard}",
             f"integrity: {info['integrity']}"]
    for row in info["shards"]:
        text = f"stage {row['stage']}: {row['file']} {row['bytes']} bytes"
        if "model_tensors" in row:
            text += (f"; model {row['model_tensors']} tensors ({row['model_bytes']} bytes), "
                     f"optimizer {row['optimizer_tensors']} tensors ({row['optimizer_bytes']} bytes)")
            if row["replica_buffers"]:
                text += f", BatchNorm statistics of replicas {row['replica_buffers']}"
        lines.append(text)
    return "\n".join(lines)
