"""Ranks that print at the same moment keep their lines whole in mpirun's output (the test
ranks' sitecustomize: PYTHONUNBUFFERED made print() write text and newline apart, and two
ranks' reports merged into one line: a CI flake in test_channel_messages)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launcher import COLD, run_ranks, skip_unless_warm  # noqa: E402

LINES = 3000


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
def test_two_ranks_printing_at_once_keep_every_line_whole(warm: bool) -> None:
    if warm:
        skip_unless_warm()
    run = run_ranks(2, "whole_lines_ranks.py", str(LINES), env={"PYTHONUNBUFFERED": "1", **({} if warm else COLD)})
    for stream, word in ((run.stdout, "line"), (run.stderr, "error")):
        got = [line for line in stream.splitlines() if line.startswith("rank ") or word in line]
        want = {f"rank {r} {word} {i} of {LINES}" for r in (0, 1) for i in range(LINES)}
        broken = [line for line in got if line not in want]
        assert not broken and len(got) == len(want) and set(got) == want, \
            f"{len(broken)} of {len(got)} {word} lines broken, e.g. {broken[:3]}"
