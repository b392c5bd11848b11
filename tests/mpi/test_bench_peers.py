"""The torch peers of the training bench exit 0 under 2 ranks, their gloo group torn down."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from launcher import COLD, run_ranks

__all__: list[str] = []

# A gloo worker thread alive at interpreter exit aborted the process with this line.
ABORT = "terminate called"


def _gloo_env() -> dict[str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _peer(tmp_path: Path, runner: str, *args: str) -> dict:
    out = tmp_path / f"{runner}.json"
    run = run_ranks(2, f"dpsgs.bench.peers.{runner}", *args, "--out", str(out), module=True,
                    env=_gloo_env(), timeout=120.0)
    assert ABORT not in run.stderr, run.tail()
    assert out.exists(), f"no result written\n{run.tail()}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipe_peer_exits_cleanly(tmp_path: Path, schedule: str) -> None:
    # resnet20 is the workload whose pipe runs aborted at exit.
    rec = _peer(tmp_path, "pipe", "--model", "resnet20", "--batch", "16", "--steps", "1",
                "--warmup", "0", "--split", "4", "--schedule", schedule,
                "--micro-batches", "2")
    assert rec["schedule"] == schedule and len(rec["step_times"]) == 1


def test_ddp_peer_exits_cleanly(tmp_path: Path) -> None:
    rec = _peer(tmp_path, "ddp", "--model", "mlp", "--batch", "16", "--steps", "1",
                "--warmup", "0", "--nosync-steps", "1")
    assert rec["runner"] == "ddp" and len(rec["step_times"]) == 1


def test_close_gloo_refuses_a_group_that_outlives_destroy() -> None:
    # The deterministic form of the abort: the leak that left the group's threads to race
    # interpreter exit is an error at teardown, not a crash one run in a few.
    # cold: the leak needs torch.distributed.nn imported after the group exists, and a warm
    # rank has imported it already (tests/mpi/forkserver.py)
    run = run_ranks(2, "gloo_leak_ranks.py", env={**_gloo_env(), **COLD}, expect_ok=False, timeout=120.0)
    assert run.returncode != 0, run.tail()
    assert "outlived destroy_process_group" in run.stdout + run.stderr, run.tail()
