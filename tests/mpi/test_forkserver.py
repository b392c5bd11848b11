"""The suite's fork server (tests/mpi/forkserver.py) is transparent: a rank it starts warm
sees the process a cold rank sees (command line, folder, sys.path, environment, stdin,
signal dispositions, umask, thread count), draws its own random seeds, and ends the job as a
cold rank would (exit status, uncaught error, SIGTERM through mpirun)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launcher import COLD, RANKS_DIR, WatchedJob, mpirun, rank_pythonpath, skip_unless_warm  # noqa: E402

PROBE = RANKS_DIR / "forkserver_probe_ranks.py"
SAME_AS_COLD = ("argv", "cwd", "path", "name", "file", "env", "stdin", "ignored", "sigint_raises",
                "umask", "threads")


@pytest.fixture(autouse=True)
def _server_on() -> None:
    skip_unless_warm()


def _env(warm: bool) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=rank_pythonpath(), PROBE_VALUE="a b=c")
    return env if warm else {**env, **COLD}


def _launch(how: str, warm: bool, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([mpirun(), "-n", "2", sys.executable, str(PROBE), how], input="to rank 0\n",
                          capture_output=True, text=True, env=_env(warm), cwd=cwd, timeout=120)


def _seen(run: subprocess.CompletedProcess) -> dict[int, dict]:
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {seen["rank"]: seen for seen in lines}


def test_a_warm_rank_sees_the_process_a_cold_rank_sees(tmp_path: Path) -> None:
    cold, warm = _launch("ok", False, tmp_path), _launch("ok", True, tmp_path)
    assert cold.returncode == 0 and warm.returncode == 0, cold.stderr + warm.stderr
    c, w = _seen(cold), _seen(warm)
    assert sorted(c) == sorted(w) == [0, 1]
    assert not c[0]["warm"] and not c[1]["warm"] and w[0]["warm"] and w[1]["warm"]
    for rank in (0, 1):
        for key in SAME_AS_COLD:
            assert w[rank][key] == c[rank][key], f"rank {rank}: {key}: warm {w[rank][key]!r}, cold {c[rank][key]!r}"
    assert w[0]["stdin"] == "to rank 0\n" and w[0]["env"]["PROBE_VALUE"] == "a b=c"
    # each rank its own seeds, as cold ranks have: torch, numpy, and str hashing (two servers)
    for key in ("torch_draw", "numpy_draw", "hash"):
        assert w[0][key] != w[1][key], key
    again = _seen(_launch("ok", True, tmp_path))
    assert again[0]["torch_draw"] != w[0]["torch_draw"] and again[0]["numpy_draw"] != w[0]["numpy_draw"]


@pytest.mark.parametrize("how", ["exit3", "raise"])
def test_a_warm_rank_ends_the_job_as_a_cold_one(how: str, tmp_path: Path) -> None:
    cold, warm = _launch(how, False, tmp_path), _launch(how, True, tmp_path)
    assert cold.returncode != 0 and warm.returncode == cold.returncode, (cold.returncode, warm.returncode)
    if how == "raise":
        for run in (cold, warm):
            assert "ValueError: probe: raised on rank 1" in run.stderr, run.stderr[-2000:]


def test_sigterm_to_mpirun_reaches_warm_ranks(tmp_path: Path) -> None:
    cmd = [mpirun(), "-n", "2", sys.executable, str(PROBE), "sigterm"]
    with WatchedJob(cmd, _env(True), cwd=tmp_path, stream="stdout") as job:
        assert job.wait_until(lambda said: said.count(": waiting") == 2, 60), \
            "the ranks never said they wait:\n" + job.text()
        job.proc.send_signal(signal.SIGTERM)
        job.proc.wait(timeout=60)
    out, err = job.text(), job.proc.stderr.read()             # type: ignore[union-attr]
    assert "rank 0: SIGTERM" in out and "rank 1: SIGTERM" in out, out + err
    assert job.proc.returncode == 5, (job.proc.returncode, err[-2000:])
