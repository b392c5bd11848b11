"""A run folder belongs to one run: its identity, a lock against a second live job, its history.

RUN_DIR/run.json (written atomically) holds the run's id, its identity settings (the
TrainConfig fields that decide the numbers: TrainConfig.identity()) and a history of every
start and resume with the operational settings and the split it ran under and any identity
setting changed on purpose (--override NAME), and the run's split (module paths). RUN_DIR/.lock
is held (flock) by rank 0 while a job runs, and records who holds it. The rules, checked on
rank 0 before any collective:
- a fresh run (no --resume) into a folder that already holds a run, or any dpsgs output, is
  refused with the way out (resume it, or choose a new --run-dir);
- a second live job on the folder is refused, naming the holder;
- a resume must keep the identity settings unless each change is named with --override;
- a resume of a finished run changes nothing (the caller reports the summary and stops).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpsgs.config import TrainConfig
from dpsgs.job.atomic_file import atomic_write

__all__ = ["RunFolder", "RunFolderError", "RUN_FILE", "LOCK_FILE", "check_run_dir", "strict_json"]

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
_OUTPUTS = ("run.json", "config.json", "summary.json", "metrics.jsonl", "checkpoints")


class RunFolderError(ValueError):
    """The run folder cannot be used as asked; the message says why and what to do."""


def check_run_dir(path: str) -> Path:
    """The run folder as a Path, created if missing; RunFolderError if it names a file or a
    place this process cannot write to."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RunFolderError(f"--run-dir {path}: is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"--run-dir {path}: cannot create it: {e.strerror or e}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise RunFolderError(f"--run-dir {path}: not writable by this user")
    return p


def strict_json(obj: Any) -> Any:
    """`obj` with every NaN or Inf float as None: strict JSON (the files' readers) has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def _dumps(obj: Any, **kw: Any) -> str:
    return json.dumps(strict_json(obj), allow_nan=False, default=str, **kw) + "\n"


def _atomic_json(path: Path, obj: Any) -> None:
    atomic_write(path, _dumps(obj, indent=2, sort_keys=True))


@dataclass
class RunFolder:
    """Rank 0's hold on a run folder for one job (see the module docstring)."""

    path: Path
    run_id: str
    record: dict[str, Any] = field(default_factory=dict)
    _lock: Any = None
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)   # overridden identity settings

    @property
    def finished(self) -> bool:
        """The run ended normally (its final summary is written)."""
        return bool(self.record.get("finished"))

    @classmethod
    def open(cls, config: TrainConfig) -> "RunFolder":
        """Take the folder for this job: check, lock, then create or check the run identity."""
        assert config.run_dir, "the caller resolves a default run folder first"
        path = check_run_dir(config.run_dir)
        lock = _take_lock(path)
        try:
            run_file = path / RUN_FILE
            if run_file.exists():
                record = _read_record(run_file)
                folder = cls(path, record["run_id"], record, lock)
                folder._check_resume(config)
            else:
                used = sorted(n for n in _OUTPUTS if (path / n).exists())
                if used:
                    raise RunFolderError(
                        f"run folder {path} already holds results ({', '.join(used)}) but no "
                        f"{RUN_FILE} (written by an older dpsgs?): choose a new --run-dir")
                folder = cls(path, uuid.uuid4().hex[:12], {}, lock)
                folder.record = {"run_id": folder.run_id, "created": time.time(),
                                 "identity": config.identity(), "history": []}
            return folder
        except BaseException:
            lock.close()
            raise

    def _check_resume(self, config: TrainConfig) -> None:
        if not config.resume:
            raise RunFolderError(
                f"run folder {self.path} already holds run {self.run_id} (started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.record.get('created', 0)))}); "
                "continue it with --resume auto, or choose a new --run-dir")
        saved = self.record.get("identity", {})
        mine = config.identity()
        changed = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        unknown = sorted(set(config.override or ()) - set(mine))
        if unknown:
            raise RunFolderError(f"--override {' '.join(unknown)}: not identity settings; "
                                 f"those are {', '.join(sorted(mine))}")
        refused = {k: v for k, v in changed.items() if k not in (config.override or ())}
        if refused:
            what = "; ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in refused.items())
            raise RunFolderError(
                f"resuming run {self.run_id} in {self.path} with other identity settings: {what}. "
                "Resume with the run's settings, or name each change with --override "
                f"{' '.join(sorted(refused))} (it is recorded in {RUN_FILE})")
        self.changes = changed

    def start(self, config: TrainConfig, resumed_from: str | None,
              ran: dict[str, Any] | None = None, split: dict[str, Any] | None = None,
              reshard: dict[str, Any] | None = None) -> None:
        """Record this job's start (or resume) with its operational settings, what it runs
        on (`ran`: the model, data and device as the job resolved them) and the split it runs
        with (`split`: SplitChoice.record(); also kept at the top, where a resume before the
        first checkpoint finds it) and, where the checkpoint was resharded, how (`reshard`:
        the grids, the splits, what the BatchNorm statistics did), and write the config it runs under (config.json: the
        settings as given, e.g. --device auto)."""
        atomic_write(self.path / "config.json", config.to_json())
        entry: dict[str, Any] = {"time": time.time(), "event": "resume" if resumed_from else "start",
                                 "operational": config.operational(), **(ran or {}),
                                 "host": socket.gethostname(), "pid": os.getpid(), **(split or {})}
        if split is not None:
            self.record["split"] = split["split"]
        if resumed_from:
            entry["checkpoint"] = resumed_from
        if reshard:           # another grid or split than the checkpoint's (dpsgs.job.reshard)
            entry["reshard"] = reshard
        if self.changes:
            entry["overrides"] = {k: {"was": a, "now": b} for k, (a, b) in self.changes.items()}
            self.record["identity"] = config.identity()
            self.record.pop("finished", None)         # an extended run is running again
        self.record.setdefault("history", []).append(entry)
        _atomic_json(self.path / RUN_FILE, self.record)

    def summary(self) -> dict[str, Any]:
        """The summary.json of the job that wrote one last ({} if none; ValueError if torn)."""
        path = self.path / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write(self.path / "summary.json", _dumps(summary, indent=2))

    def finish(self, summary: dict[str, Any]) -> None:
        self.record["finished"] = True
        self.record["finished_at"] = time.time()
        # the whole run's steps and batches (over its resumes), where the summary has them
        self.record["final"] = {"steps": summary.get("run_steps", summary.get("steps")),
                                "iterations": summary.get("run_iterations", summary.get("iterations")),
                                "test_accuracy": summary.get("test_accuracy"),
                                "test_loss": summary.get("test_loss")}
        if summary.get("test_loss_nonfinite"):
            self.record["final"]["test_loss_nonfinite"] = summary["test_loss_nonfinite"]
        _atomic_json(self.path / RUN_FILE, self.record)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()          # closing the file releases the flock
            self._lock = None


def _read_record(run_file: Path) -> dict[str, Any]:
    """run.json as written by RunFolder; RunFolderError naming the file when it is not."""
    try:
        record = json.loads(run_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{run_file} cannot be read as a run record ({type(e).__name__}: {e}); "
                             "restore it, or choose a new --run-dir") from None
    if not isinstance(record, dict) or not isinstance(record.get("run_id"), str) \
            or not isinstance(record.get("identity", {}), dict) \
            or not isinstance(record.get("history", []), list):
        raise RunFolderError(f"{run_file} is not a run record (it needs a run_id, an identity "
                             "and a history, as dpsgs writes them); restore it, or choose a new --run-dir")
    return record


def _take_lock(path: Path) -> Any:
    """flock RUN_DIR/.lock for this process (released when the process ends, however it
    ends); RunFolderError naming the holder when another live job has it."""
    f = open(path / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunFolderError(f"run folder {path} is in use by a live job ({holder}); wait for it "
                             "to end, or choose another --run-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f
