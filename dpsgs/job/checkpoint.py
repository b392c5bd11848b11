"""Atomic, per-stage checkpoints: one shard per stage plus a manifest that is the commit point.

Layout: RUN_DIR/checkpoints/TAG/{stage0.pt, ..., stage{K-1}.pt, manifest.json}.

Save (collective over the job's communicator, every rank calls it at the same flush
boundary): rank 0 invalidates an older manifest of the same tag; replica 0 of each stage
writes its shard to a temporary file in the same folder, fsyncs it, renames it into place
and fsyncs the folder; the shards' sizes and SHA-256 sums are gathered on rank 0, which
then writes manifest.json the same way. A checkpoint without a manifest is incomplete and
ignored, so a crash at any point of a save leaves the previous checkpoint loadable.
Load: torch.load(weights_only=True) after checking the grid, the expected metadata
(model, ...) and the shard's size and checksum, each with an error naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dpsgs.job.atomic_file import atomic_write, fsync_dir
from dpsgs.reliability import faults

__all__ = ["CheckpointError", "CheckpointSaveError", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "committed_checkpoints", "complete_checkpoints", "prune_checkpoints", "read_manifest",
           "resolve_resume", "shard_entry", "verify", "MANIFEST"]

MANIFEST = "manifest.json"
_FORMAT = "dpsgs-checkpoint"
_VERSION = 1
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: incomplete, corrupt, or from another run shape."""


class CheckpointSaveError(CheckpointError):
    """A save failed; raised on every rank of the job together (the status is broadcast)."""


def _shard_name(stage: int) -> str:
    return f"stage{stage}.pt"


def shard_entry(stage: int, data: bytes, state: dict) -> dict:
    """The manifest's row for stage `stage`'s shard (`data`, the bytes of `state`): file, size,
    SHA-256 and the names of the model tensors it holds, so a resume on another grid reads
    only the shards that hold what its stage needs (dpsgs.job.whole_state.read_whole)."""
    model = state.get("model")
    return {"stage": stage, "file": _shard_name(stage), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            **({"tensors": sorted(model)} if isinstance(model, dict) else {})}


def _check_loadable(obj: Any, where: str) -> None:
    """Refuse at save time what torch.load(weights_only=True) would refuse at resume time."""
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.Tensor,
                                       torch.Size, torch.dtype, torch.device)):
        return
    if isinstance(obj, (dict, OrderedDict)):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint: {where} has a key {k!r} of type "
                                f"{type(k).__name__}; use str or int keys")
            _check_loadable(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_loadable(v, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint: {where} is a {type(obj).__module__}.{type(obj).__name__}, "
                    f"which torch.load(weights_only=True) refuses; store tensors, numbers, "
                    f"strings, lists and dicts")


def save_checkpoint(run_dir: str | os.PathLike, tag: str, grid: Any, rank: int,
                    stage_state: dict, meta: dict, comm: Any, keep: int | None = None) -> Path:
    """Save this rank's part of checkpoint `tag`; returns the checkpoint folder.

    Collective: every rank of `comm` (an mpi4py communicator whose rank r is grid rank r;
    None for a one-rank grid) must call it in the same order. `stage_state` is what this
    rank's stage needs to resume (only replica 0's is written: the weights are identical
    after the all-reduce; what differs per replica, the caller puts into replica 0's
    state); `meta` (JSON: model, step, epoch, ...) goes into the manifest and is
    checked on load. A failure on any rank raises CheckpointError on every rank. With
    `keep`, rank 0 then deletes all but the `keep` newest complete checkpoints.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"save_checkpoint: keep must be >= 1 (or None: keep all), got {keep}")
    if not _TAG.match(tag):
        raise ValueError(f"checkpoint tag {tag!r}: use letters, digits, '.', '_', '-'")
    stages, replicas = int(grid.stages), int(grid.replicas)
    if comm is None and stages * replicas != 1:
        raise ValueError(f"save_checkpoint: comm=None only for a 1x1 grid, got {stages}x{replicas}")
    replica, stage = grid.coords(rank)
    folder = Path(run_dir) / "checkpoints" / tag

    def bcast(obj: Any) -> Any:
        return obj if comm is None else comm.bcast(obj, root=0)

    # 1. rank 0 makes the folder and un-commits an older save of the same tag.
    status = None
    if rank == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)        # the new folder's entry is durable too
            if (folder / MANIFEST).exists():
                (folder / MANIFEST).unlink()
                fsync_dir(folder)
        except OSError as e:
            status = f"rank 0: cannot prepare {folder}: {e}"
    status = bcast(status)
    if status:
        raise CheckpointSaveError(f"checkpoint {tag!r} not saved: {status}")

    # 2. replica 0 of each stage writes its shard.
    info: dict[str, Any] | None = None
    error = None
    if replica == 0:
        try:
            _check_loadable(stage_state, "stage_state")
            buf = io.BytesIO()
            torch.save({"format": _FORMAT, "stage": stage, "stages": stages,
                        "state": stage_state}, buf)
            data = buf.getvalue()
            atomic_write(folder / _shard_name(stage), data)
            info = shard_entry(stage, data, stage_state)
        except Exception as e:
            error = f"rank {rank} (stage {stage}): {type(e).__name__}: {e}"
    faults.fault_point("save", int(meta.get("step", 0) or 0), rank)  # tests: die mid-save

    # 3. rank 0 commits once every shard is on disk.
    reports = [(info, error)] if comm is None else comm.gather((info, error), root=0)
    if rank == 0:
        errors = [e for _, e in reports if e]
        shards = sorted((i for i, _ in reports if i), key=lambda i: i["stage"])
        if not errors and [s["stage"] for s in shards] != list(range(stages)):
            errors = [f"got shards of stages {[s['stage'] for s in shards]}, "
                      f"expected 0..{stages - 1}"]
        if not errors:
            try:
                manifest = {"format": _FORMAT, "version": _VERSION, "tag": tag,
                            "stages": stages, "replicas": replicas, "created": time.time(),
                            "meta": meta, "shards": shards}
                atomic_write(folder / MANIFEST,
                              (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
            except Exception as e:
                errors = [f"rank 0: manifest: {type(e).__name__}: {e}"]
        if not errors and keep is not None:
            prune_checkpoints(run_dir, keep)
        status = "; ".join(errors) or None
    status = bcast(status)
    if status:
        raise CheckpointSaveError(f"checkpoint {tag!r} in {folder} not saved: {status}")
    return folder


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of checkpoint folder `path`; CheckpointError if missing or malformed."""
    folder = Path(path)
    file = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {str(folder)!r} does not exist")
    if not file.is_file():
        raise CheckpointError(f"checkpoint {str(folder)!r} is incomplete: no {MANIFEST} "
                              f"(a save that did not finish); use --resume auto to pick the "
                              f"latest complete one")
    try:
        manifest = json.loads(file.read_text())
        if manifest.get("format") != _FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {_FORMAT!r}")
        for key in ("stages", "replicas", "meta", "shards"):
            if key not in manifest:
                raise ValueError(f"missing key {key!r}")
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint manifest {str(file)!r} is corrupt: {e}") from None
    return manifest


def load_checkpoint(path: str | os.PathLike, grid: Any, stage: int,
                    meta_expect: dict | None = None) -> dict:
    """The stage_state that stage `stage` saved in checkpoint folder `path`.

    Raises CheckpointError naming both sides when the checkpoint was written by another
    K x N grid or with different metadata (each key of `meta_expect`, e.g. the model), and
    naming the file when a shard is missing, truncated or corrupt.
    """
    folder = Path(path)
    m = read_manifest(folder)
    here = (int(grid.stages), int(grid.replicas))
    saved = (m["stages"], m["replicas"])
    if saved != here:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} was written by a {saved[0]}x{saved[1]} grid "
            f"(K={saved[0]} stages x N={saved[1]} replicas); this run is {here[0]}x{here[1]} "
            f"(K={here[0]} x N={here[1]}): resume with the same --stages/--replicas")
    for key, want in (meta_expect or {}).items():
        got = m["meta"].get(key)
        if got != want:
            raise CheckpointError(f"checkpoint {str(folder)!r} was saved with {key}={got!r}, "
                                  f"this run has {key}={want!r}")
    shard = next((s for s in m["shards"] if s.get("stage") == stage), None)
    if shard is None:
        raise CheckpointError(f"checkpoint {str(folder)!r}: manifest lists no shard for "
                              f"stage {stage}")
    file = folder / shard["file"]
    if not file.is_file():
        raise CheckpointError(f"checkpoint shard {str(file)!r} is missing")
    data = file.read_bytes()
    if len(data) != shard["bytes"]:
        raise CheckpointError(f"checkpoint shard {str(file)!r} is truncated or overwritten: "
                              f"{len(data)} bytes, the manifest says {shard['bytes']}")
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        raise CheckpointError(f"checkpoint shard {str(file)!r} is corrupt: its SHA-256 "
                              f"differs from the manifest's")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint shard {str(file)!r} cannot be loaded: "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(obj, dict) or obj.get("stage") != stage or "state" not in obj:
        raise CheckpointError(f"checkpoint shard {str(file)!r} does not hold stage {stage}")
    return obj["state"]


def verify(folder: Path) -> str | None:
    """None when committed checkpoint `folder` is whole; else what is wrong, naming the file
    (a corrupt manifest, a missing, truncated or altered shard)."""
    try:
        m = read_manifest(folder)
        for sh in m["shards"]:
            file = folder / sh["file"]
            if not file.is_file():
                return f"shard {file} is missing"
            data = file.read_bytes()
            if len(data) != sh["bytes"]:
                return f"shard {file} is truncated or overwritten: {len(data)} bytes, the manifest says {sh['bytes']}"
            if hashlib.sha256(data).hexdigest() != sh["sha256"]:
                return f"shard {file} is corrupt: its SHA-256 differs from the manifest's"
    except CheckpointError as e:
        return str(e)
    except (OSError, KeyError, TypeError) as e:
        return f"manifest {folder / MANIFEST} is corrupt: {type(e).__name__}: {e}"
    return None


def _commit_time(folder: Path) -> float:
    """When the save committed: the manifest's own record, else (unreadable) its file time."""
    try:
        return float(json.loads((folder / MANIFEST).read_text())["created"])
    except (OSError, ValueError, KeyError, TypeError):
        return (folder / MANIFEST).stat().st_mtime


def committed_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints whose save committed (manifest.json written), oldest commit first, whatever
    state they are in now. A folder without a manifest is a save that never finished."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(_commit_time(f), f.name, f) for f in root.iterdir() if (f / MANIFEST).is_file()]
    return [f for _, _, f in sorted(found)]


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Committed checkpoints that are whole (verify), oldest first."""
    return [f for f in committed_checkpoints(run_dir) if verify(f) is None]


def latest_checkpoint(run_dir: str | os.PathLike, run_id: str | None = None, fallback: bool = False,
                      note: Callable[[str], None] | None = None) -> Path | None:
    """The newest committed checkpoint of RUN_DIR, checked whole and (with `run_id`) of this
    run; None when none was ever committed. A damaged or foreign newest checkpoint is a
    CheckpointError naming the file and what is wrong — unless `fallback`, which goes back to
    the newest good one and reports each one skipped through `note`. Never silent."""
    skipped = []
    for folder in reversed(committed_checkpoints(run_dir)):
        problem = verify(folder)
        if problem is None and run_id is not None:
            owner = read_manifest(folder)["meta"].get("run_id")
            if owner != run_id:
                problem = f"it belongs to run {owner}, not to this folder's run {run_id}"
        if problem is None:
            for s in skipped:
                (note or print)(s)
            return folder
        text = f"checkpoint {folder} cannot be resumed: {problem}"
        if not fallback:
            raise CheckpointError(text + "; fix or remove it, or resume from the previous good "
                                  "checkpoint with --resume-fallback")
        skipped.append(text + " (skipped: --resume-fallback)")
    if skipped:
        raise CheckpointError("no checkpoint can be resumed: " + "; ".join(skipped))
    return None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the `keep` newest committed checkpoints (manifest first, so a deletion
    cut short leaves an uncommitted folder, never a wrong one); returns what was deleted."""
    doomed = committed_checkpoints(run_dir)[:-keep] if keep > 0 else []
    for folder in doomed:
        (folder / MANIFEST).unlink()
        fsync_dir(folder)
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    return doomed


def resolve_resume(resume: str | None, run_dir: str | os.PathLike | None, run_id: str | None = None,
                   fallback: bool = False, note: Callable[[str], None] | None = None) -> Path | None:
    """Map --resume to a checkpoint folder of this run: None -> None; "auto" -> the newest
    committed checkpoint of run_dir (None if none was committed yet: a start from the
    beginning); a checkpoint folder -> itself; a run folder -> its newest. A damaged or
    foreign checkpoint -> CheckpointError (see latest_checkpoint)."""
    if not resume:
        return None
    if resume == "auto":
        if run_dir is None:
            raise CheckpointError("--resume auto needs --run-dir: the run folder to resume in")
        return latest_checkpoint(run_dir, run_id, fallback, note)
    p = Path(resume)
    if (p / "checkpoints").is_dir():
        found = latest_checkpoint(p, run_id, fallback, note)
        if found is None:
            raise CheckpointError(f"--resume {resume}: run folder has no committed checkpoint")
        return found
    problem = verify(p) if (p / MANIFEST).is_file() else None
    read_manifest(p)   # raises: missing folder or incomplete checkpoint
    if problem:
        raise CheckpointError(f"checkpoint {p} cannot be resumed: {problem}")
    owner = read_manifest(p)["meta"].get("run_id")
    if run_id is not None and owner != run_id:
        raise CheckpointError(f"checkpoint {p} belongs to run {owner}, not to this folder's run {run_id}")
    return p
