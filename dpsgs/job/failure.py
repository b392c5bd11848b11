"""One error, one clear line: the traceback goes to a per-rank log file, stderr gets one line.

When every rank raises the same error at the same point (the start-up agreement, a NaN/Inf
stop, a failed checkpoint save, a rank's metrics file that cannot be written: all decided
collectively), rank 0 prints it; any other error
is printed by the rank that saw it, named by its job rank and (replica, stage). The full
traceback of every failing rank is in RUN_DIR/logs/rank{R}.log (or a temporary folder when
the run has no folder).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

__all__ = ["everywhere", "log_file", "log_traceback", "report_failure"]


def everywhere(error: BaseException) -> bool:
    """Errors every rank raises together (agreed by a vote or a collective)."""
    from dpsgs.job.agreement import SetupFailed
    from dpsgs.job.checkpoint import CheckpointSaveError
    from dpsgs.reliability.guards import NonFiniteError
    from dpsgs.reliability.step_control import RankFailure

    return isinstance(error, (SetupFailed, NonFiniteError, CheckpointSaveError, RankFailure))


def log_file(run_dir: str | None, rank: int) -> Path:
    folder = Path(run_dir) / "logs" if run_dir else Path(tempfile.gettempdir()) / f"dpsgs-logs-{os.getppid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix="dpsgs-logs-"))
    return folder / f"rank{rank}.log"


def log_traceback(error: BaseException, rank: int, run_dir: str | None) -> str:
    """Append `error`'s traceback to this rank's log file; where it went (for the one line)."""
    path = log_file(run_dir, rank)
    try:
        with open(path, "a") as f:
            f.write(f"--- rank {rank}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            traceback.print_exception(error, file=f)
        return f"traceback: {path}"
    except OSError as e:
        return f"traceback not written: {e}"


def report_failure(error: BaseException, rank: int, label: str, run_dir: str | None) -> None:
    """Log `error`'s traceback in this rank's log file; print the one line this rank owes."""
    where = log_traceback(error, rank, run_dir)
    if everywhere(error):
        if rank == 0:
            print(f"dpsgs: error: {error} [every rank; {where.replace(f'rank{rank}.log', 'rank*.log')}]",
                  file=sys.stderr, flush=True)
    else:
        print(f"dpsgs: {label} failed: {type(error).__name__}: {error} [{where}]",
              file=sys.stderr, flush=True)
