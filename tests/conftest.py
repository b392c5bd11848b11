"""Session set-up shared by every test folder: the fork servers that start MPI ranks warm
(tests/mpi/forkserver.py). DPSGS_TEST_FORKSERVER=0 starts every rank cold."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

MPI_TESTS = Path(__file__).resolve().parent / "mpi"
SERVERS = 2          # rank r uses server r mod 2: neighbouring ranks differ in str-hash seed
READY_WITHIN = 60.0  # seconds; each server imports torch once
_summary: list[str] = []   # for the terminal summary, written at the fixture's teardown


@pytest.fixture(scope="session", autouse=True)
def warm_ranks():
    if os.environ.get("DPSGS_TEST_FORKSERVER") == "0":
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="dpsgs-forkserver-"))
    env = {k: v for k, v in os.environ.items() if k != "DPSGS_TEST_FORKSERVER"}
    env.setdefault("OMP_NUM_THREADS", "1")           # what the launchers give their ranks
    env["PYTHONPATH"] = os.pathsep.join([str(MPI_TESTS / "ranks"), env.get("PYTHONPATH", "")])
    sockets = [str(folder / f"server{i}.sock") for i in range(SERVERS)]
    logs = [folder / f"server{i}.log" for i in range(SERVERS)]
    servers = []
    for sock, log in zip(sockets, logs):
        with open(log, "w") as out:
            servers.append(subprocess.Popen([sys.executable, str(MPI_TESTS / "forkserver.py"), sock],
                                            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out))
    # wait, so that every test starts its ranks the same way, first or last
    deadline = time.monotonic() + READY_WITHIN
    while not all(Path(sock).exists() for sock in sockets):
        down = [s.args[-1] for s in servers if s.poll() is not None]
        assert not down and time.monotonic() < deadline, \
            f"fork server not ready after {READY_WITHIN:g} s; its log: {folder}"
        time.sleep(0.05)
    os.environ["DPSGS_TEST_FORKSERVER"] = os.pathsep.join(sockets)
    yield folder
    os.environ.pop("DPSGS_TEST_FORKSERVER", None)
    died = [f"server {i} exited with {s.returncode}" for i, s in enumerate(servers) if s.poll() is not None]
    for server in servers:
        server.terminate()
    for server in servers:
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    _summary[:] = _summarize(logs, died)
    if len(_summary) == 1:                           # nothing to look into: no log kept
        shutil.rmtree(folder, ignore_errors=True)


def _summarize(logs: list[Path], died: list[str]) -> list[str]:
    """How many ranks started warm, why the others did not, and any trouble (logs kept)."""
    warm, cold, errors = 0, {}, 0
    for log in logs:
        for line in log.read_text().splitlines():
            warm += line.startswith("warm:")
            errors += line.startswith("Traceback")
            if line.startswith("cold:"):
                cold[line[6:]] = cold.get(line[6:], 0) + 1
    why = "; ".join(f"{n} × {reason}" for reason, n in sorted(cold.items(), key=lambda x: -x[1]))
    lines = [f"fork server: {warm} ranks started warm, {sum(cold.values())} cold"
             + (f" ({why})" if why else "")]
    if errors or died:
        lines.append(f"fork server: {errors} errors, {', '.join(died) or 'no server died'}; "
                     f"logs: {logs[0].parent}")
    return lines


def pytest_terminal_summary(terminalreporter) -> None:
    for i, line in enumerate(_summary):
        terminalreporter.write_line(line, red=i > 0)
