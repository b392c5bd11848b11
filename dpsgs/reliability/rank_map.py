"""Who is who: a start-up line mapping every rank to host:pid, so a launcher's report of a
dead process ("BAD TERMINATION ... PID 4966") names the rank, stage and replica that died.

With hydra's default clean-up a rank killed by a signal (SIGKILL, the OOM killer) takes the
job down within a second, before any survivor can print a word; hydra names only the PID.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from typing import Any

from dpsgs.comm.grid import Grid

__all__ = ["rank_map", "announce_ranks", "parse_rank_map", "MAX_PRINTED"]

MAX_PRINTED = 64            # larger jobs get the map in a file, not on the terminal
_LINE = re.compile(r"dpsgs ranks: (.*)")
_ENTRY = re.compile(r"(\d+)=s(\d+)r(\d+)@([^:\s]+):(\d+)")


def rank_map(comm: Any, grid: Grid) -> list[tuple[int, int, int, str, int]]:
    """(rank, stage, replica, host, pid) of every rank; collective (an allgather)."""
    mine = (socket.gethostname(), os.getpid())
    everyone = comm.allgather(mine)
    return [(r, grid.coords(r)[1], grid.coords(r)[0], h, p) for r, (h, p) in enumerate(everyone)]


def announce_ranks(comm: Any, grid: Grid, run_dir: str | None = None) -> None:
    """Rank 0 prints `dpsgs ranks: 0=s0r0@host:pid 1=s1r0@host:pid ...` to stderr (or writes it
    to RUN_DIR/ranks.txt when the job has more than MAX_PRINTED ranks). Collective."""
    entries = rank_map(comm, grid)
    if comm.Get_rank() != 0:
        return
    line = "dpsgs ranks: " + " ".join(f"{r}=s{k}r{n}@{h}:{p}" for r, k, n, h, p in entries)
    if len(entries) <= MAX_PRINTED or not run_dir:
        print(line, file=sys.stderr, flush=True)
        return
    path = os.path.join(run_dir, "ranks.txt")
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write(line + "\n")
    print(f"dpsgs ranks: {len(entries)} ranks, rank -> host:pid map in {path}",
          file=sys.stderr, flush=True)


def parse_rank_map(text: str) -> dict[int, int]:
    """pid -> rank from the announce line found in `text` (a job's log); {} if absent."""
    m = _LINE.search(text)
    if not m:
        return {}
    return {int(pid): int(rank) for rank, _, _, _, pid in _ENTRY.findall(m.group(1))}
