"""Resharding: the rules by which a checkpoint of one K x N grid (and split) resumes on another.

A resume reshards when the grid or the split differs from the checkpoint's. The rules
(docs/reliability.md lists them with their messages):
- a grid change is named as any identity change: `--override stages` (the split follows: the
  new K's is --split or balanced), `--override replicas`, `--override split` at the same K;
- only a checkpoint taken where the pipeline is empty reshards (every dpsgs save follows a
  flush and records it; one that does not say so, an older dpsgs's, resumes on its grid only);
- N changes: the global batch (N x batch) is kept, the per-replica batch becoming global / N
  (whatever --batch-size says; the line at start says so); refused when it does not divide,
  unless `--override batch_size` sets it;
- the data position is kept in samples: the next sample of the epoch is the same, so none is
  seen twice or skipped; refused when the global batch changed and does not divide it;
- BatchNorm statistics: replica r < N keeps its own; a new replica starts from replica 0's.
`--elastic` (with --resume): K is kept and N = world / K, whatever the launcher gave.

`regrid` runs on rank 0 before the job is built (the per-replica batch decides the sampler) and
`check_reshard` when the checkpoint is chosen; `position` maps the saved position on every rank.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from dpsgs.comm.grid import Grid
from dpsgs.config import TrainConfig
from dpsgs.job.checkpoint import CheckpointError, read_manifest, resolve_resume
from dpsgs.job.whole_state import EMPTY_PIPELINE

__all__ = ["ReshardError", "regrid", "regrid_job", "check_reshard", "saved_batch", "data_position",
           "describe", "reshard_line"]


class ReshardError(ValueError):
    """A resume on another grid that breaks a rule; the message names the rule and the way out."""


def saved_batch(manifest: dict[str, Any], run_dir: str | None) -> int | None:
    """The per-replica batch a checkpoint was trained with: its own record, else (older
    checkpoints) the run's identity in run.json."""
    b = manifest["meta"].get("batch_size")
    if b is None and run_dir and (Path(run_dir) / "run.json").is_file():
        try:
            b = json.loads((Path(run_dir) / "run.json").read_text())["identity"]["batch_size"]
        except (OSError, ValueError, KeyError, TypeError):
            b = None
    return None if b is None else int(b)


def _with_override(config: TrainConfig, *names: str) -> list[str]:
    have = list(config.override or [])
    return have + [n for n in names if n not in have]


def regrid(config: TrainConfig, world: int) -> tuple[TrainConfig, list[str]]:
    """Rank 0, before the job is built: the config this job runs (with --elastic, N = world / K;
    when N differs from the checkpoint's, the per-replica batch that keeps its global batch)
    and the lines to print about it. ReshardError for a rule that does not hold. A checkpoint
    that cannot be found or read is left to the resume's own checks (nothing changes here)."""
    notes: list[str] = []
    if config.elastic:
        if not config.resume:
            raise ReshardError("--elastic continues a run on whatever ranks it is given: it needs "
                               "--resume auto (and --run-dir)")
        K = config.stages
        if world % K:
            raise ReshardError(f"--elastic: {world} ranks are not a multiple of K={K} stages; "
                               f"launch a multiple of {K} ranks")
        if world // K != config.replicas:
            notes.append(f"dpsgs: --elastic: {world} ranks, so K={K} x N={world // K} "
                         f"(-N {config.replicas} was given)")
        # N is the world's, whatever the run had: a change the run records as an override
        config = dataclasses.replace(config, replicas=world // K,
                                     override=_with_override(config, "replicas"))
    if not config.resume:
        return config, notes
    try:
        path = resolve_resume(config.resume, config.run_dir, None, config.resume_fallback,
                              note=lambda text: None)
        m = read_manifest(path) if path is not None else None
    except (CheckpointError, OSError):
        return config, notes
    if m is None:
        return config, notes
    if int(m["stages"]) != config.stages and "stages" in (config.override or ()):
        config = dataclasses.replace(config, override=_with_override(config, "split"))
    n0 = int(m["replicas"])
    b0 = saved_batch(m, config.run_dir)
    if n0 == config.replicas or b0 is None or "batch_size" in (config.override or ()):
        return config, notes
    g = n0 * b0
    if g % config.replicas:
        raise ReshardError(
            f"checkpoint {path}: its global batch {g} (N={n0} x batch {b0}) does not divide "
            f"into N={config.replicas} replicas; resume on a number of replicas that divides "
            f"{g}, or set the per-replica batch with --batch-size B --override batch_size "
            f"(the global batch then changes)")
    b = g // config.replicas
    # the global batch is the run's (its LR, its data order): a --batch-size repeated from the
    # first launch of an elastic chain is not a request to change it
    unused = (f" (--batch-size {config.batch_size} is not used: name --override batch_size to "
              f"change the global batch)" if config.batch_size not in (b0, b) else "")
    notes.append(f"dpsgs: N={n0} -> N={config.replicas}: per-replica batch {b0} -> {b}, "
                 f"keeping the global batch {g}{unused}")
    return dataclasses.replace(config, batch_size=b,
                               override=_with_override(config, "batch_size")), notes


def regrid_job(config: TrainConfig, comm: Any) -> tuple[TrainConfig, list[str], str | None]:
    """Collective over `comm`: rank 0's regrid for this world, on every rank. (config, rank 0's
    notes, None), or (config as given, [], the error every rank reports through the job's
    agreement): rank 0 never raises here, so no rank waits in the broadcast."""
    if not config.resume and not config.elastic:
        return config, [], None
    answer: tuple[TrainConfig | None, str | None] = (None, None)
    notes: list[str] = []
    if comm.Get_rank() == 0:
        try:
            new, notes = regrid(config, comm.Get_size())
            answer = (new, None)
        except Exception as e:  # noqa: BLE001 - reported by every rank, through the agreement
            answer = (None, str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")
    new, error = comm.bcast(answer, root=0)
    return (new or config), notes, error


def check_reshard(path: Path, grid: Grid, config: TrainConfig, batches_per_epoch: int) -> bool:
    """Whether resuming checkpoint `path` on `grid` with `config` reshards it (another grid,
    or another split named with --override split); CheckpointError naming the rule when it
    may not (an unnamed grid change, a pipeline not known to be empty, a data position the
    new global batch does not divide)."""
    m = read_manifest(path)
    meta = m["meta"]
    saved, here = (int(m["stages"]), int(m["replicas"])), (grid.stages, grid.replicas)
    override = set(config.override or ())
    unnamed = [name for name, a, b in (("stages", saved[0], here[0]), ("replicas", saved[1], here[1]))
               if a != b and name not in override]
    if unnamed:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by a {saved[0]}x{saved[1]} grid "
            f"(K={saved[0]} stages x N={saved[1]} replicas); this run is {here[0]}x{here[1]} "
            f"(K={here[0]} x N={here[1]}): resume with the same --stages/--replicas, or name the "
            f"change with --override {' '.join(unnamed)} (the checkpoint is resharded)")
    new_split = (here[0] == saved[0] and "split" in override and config.split is not None
                 and [str(s) for s in config.split] != list(meta.get("split") or []))
    if saved == here and not new_split:
        return False
    if meta.get("pipeline") != EMPTY_PIPELINE:
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be resharded to {here[0]}x{here[1]}: it does not "
            f"record that its pipeline was empty when it was taken (an older dpsgs wrote it), so "
            f"batches may have been in flight; resume it on its own grid, "
            f"-K {saved[0]} -N {saved[1]}")
    data_position(meta, saved[1], saved_batch(m, config.run_dir), config, batches_per_epoch,
                  str(path))
    return True


def data_position(meta: dict[str, Any], n0: int, b0: int | None, config: TrainConfig,
                  batches_per_epoch: int, where: str) -> int:
    """The batch index, under `config`'s global batch, of the next sample the checkpoint
    would have trained (its epoch is kept); ReshardError when it falls inside a batch."""
    batch = int(meta.get("batch", 0) or 0)
    if b0 is None or batch == 0:
        return batch
    g0, g = n0 * b0, config.replicas * config.batch_size
    samples = batch * g0
    if samples % g:
        raise ReshardError(
            f"checkpoint {where} stops at sample {samples} of epoch {meta.get('epoch')} (batch "
            f"{batch} of global batch {g0}); the new global batch {g} does not divide it, so "
            f"samples would be seen twice or skipped: keep the global batch, or resume from an "
            f"epoch's checkpoint")
    if samples // g >= batches_per_epoch:
        return batches_per_epoch
    return samples // g


def describe(saved: tuple[int, int], split_was: list[str], here: tuple[int, int],
             split: list[str], has_buffers: bool) -> dict[str, Any]:
    """The record of a reshard (run.json's history, the start-up line)."""
    rec: dict[str, Any] = {"from": f"{saved[0]}x{saved[1]}", "to": f"{here[0]}x{here[1]}",
                           "split_was": split_was, "split": split}
    if has_buffers and here[1] > saved[1]:
        rec["batchnorm"] = (f"BatchNorm statistics: {_span(saved[1], here[1] - 1)} start from "
                            f"replica 0's")
    elif has_buffers and here[1] < saved[1]:
        rec["batchnorm"] = (f"BatchNorm statistics: {_span(0, here[1] - 1)} keep their own, "
                            f"{_span(here[1], saved[1] - 1)}'s are dropped")
    return rec


def _span(a: int, b: int) -> str:
    return f"replica {a}" if a == b else f"replicas {a}..{b}"


def reshard_line(rec: dict[str, Any], path: str) -> str:
    """The start-up line of a resharded resume (rank 0 prints it after the split's)."""
    line = f"resharding checkpoint {path} from {rec['from']} to {rec['to']}"
    if rec["split_was"] != rec["split"]:
        line += f" (split {rec['split_was']} -> {rec['split']})"
    return line + (f"; {rec['batchnorm']}" if rec.get("batchnorm") else "")
