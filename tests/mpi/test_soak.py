"""A long run holds its memory flat: per-step data live in bounded structures (slow)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launcher import run_ranks  # noqa: E402


@pytest.mark.slow
def test_rss_per_rank_grows_under_1_mb_over_20000_steps(tmp_path: Path) -> None:
    run = run_ranks(2, "soak_ranks.py", str(tmp_path / "run"), "20000", timeout=1800)
    grown = [int(g) for g in re.findall(r"grown (-?\d+) kB", run.stdout)]
    steps = {int(s) for s in re.findall(r"steps (\d+) rss", run.stdout)}
    assert len(grown) == 2 and steps == {20000 + 2}, run.tail()   # one segment: + its flush (K=2)
    assert max(grown) < 1024, run.tail()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) > 20000                  # every step was logged, none kept in memory
