"""Checkpoints with real ranks: collective save/load, and a rank dying mid-save leaves the
previous checkpoint the latest complete one, loadable bit-exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "ranks"))
from checkpoint_ranks import stage_state  # noqa: E402
from launcher import run_ranks  # noqa: E402

from dpsgs.job.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from dpsgs.comm.grid import Grid  # noqa: E402


@pytest.mark.parametrize("k, n", [(2, 1), (1, 2)])
def test_collective_save_and_load(tmp_path: Path, k: int, n: int) -> None:
    run = run_ranks(k * n, "checkpoint_ranks.py", "save", str(tmp_path), str(k), str(n),
                    timeout=90)
    assert "OK" in run.stdout
    # one shard per stage, written by replica 0 only
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "step2").iterdir()) == \
        ["manifest.json"] + [f"stage{s}.pt" for s in range(k)]


@pytest.mark.parametrize("fault", ["rank=0,step=2,phase=save,kind=exit",
                                   "rank=1,step=2,phase=save,kind=sigkill"])
def test_rank_dying_mid_save_keeps_previous(tmp_path: Path, fault: str) -> None:
    run = run_ranks(2, "checkpoint_ranks.py", "crash", str(tmp_path), "2", "1", timeout=90,
                    expect_ok=False, env={"DPSGS_FAULT": fault})
    assert run.returncode != 0, run.tail()
    assert "UNREACHABLE" not in run.stdout and "injected fault" in run.stderr, run.tail()
    assert not (tmp_path / "checkpoints" / "step2" / "manifest.json").exists()
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoints" / "step1"
    for stage in range(2):
        got = load_checkpoint(latest, Grid(2, 1), stage, {"model": "mlp"})
        assert torch.equal(got["w"], stage_state(stage, 1)["w"])
