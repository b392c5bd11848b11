"""Run a rank program under real MPI ranks: `mpirun -n N python -m mpi4py PROGRAM ARGS`.

`python -m mpi4py` turns an uncaught exception on any rank into MPI_Abort, so peers never
hang; the subprocess timeout is the last line of defence. On failure the assertion message
carries every rank's output tail.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COLD", "RANKS_DIR", "RankRun", "WatchedJob", "mpirun", "rank_pythonpath", "run_ranks",
           "skip_unless_warm"]

RANKS_DIR = Path(__file__).resolve().parent / "ranks"
REPO = Path(__file__).resolve().parents[2]


def mpirun() -> str:
    beside_python = Path(sys.executable).parent / "mpirun"
    return str(beside_python) if beside_python.exists() else (shutil.which("mpirun") or "mpirun")


# env for a launch whose ranks must start cold (tests/mpi/forkserver.py): where hydra's view of
# the rank process matters: its PID (hydra names a dead rank by the PID it started, a warm
# rank's client), or its exit to the millisecond (a program that leaves without MPI_Finalize,
# whose peers hydra kills if they outlive it; a warm rank's exit reaches hydra a little later);
# and where the order in which torch's modules are first imported matters
COLD = {"DPSGS_TEST_FORKSERVER": "0"}


def skip_unless_warm() -> None:
    """Skip the calling test where ranks cannot start warm (no fork server runs)."""
    import pytest

    if os.environ.get("DPSGS_TEST_FORKSERVER", "0") == "0":
        pytest.skip("the fork server is off (DPSGS_TEST_FORKSERVER=0)")


def rank_pythonpath() -> str:
    """PYTHONPATH for ranks a test starts itself: the repository, then the rank programs'
    folder, whose sitecustomize starts a rank warm from the suite's fork server."""
    return os.pathsep.join([str(REPO), str(RANKS_DIR), os.environ.get("PYTHONPATH", "")])


@dataclass
class RankRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def tail(self, lines: int = 60) -> str:
        out = "\n".join(self.stdout.splitlines()[-lines:])
        err = "\n".join(self.stderr.splitlines()[-lines:])
        return f"--- exit {self.returncode} after {self.seconds:.1f}s\n--- stdout\n{out}\n--- stderr\n{err}"


def run_ranks(nprocs: int, program: str | Path, *args: str, timeout: float = 120.0,
              expect_ok: bool = True, env: dict[str, str] | None = None,
              module: bool = False, wrapper: list[str] | None = None,
              cwd: Path | None = None) -> RankRun:
    """Launch `nprocs` ranks of `program` (a file in tests/mpi/ranks/ or a path, or a module
    name with module=True). With expect_ok, assert that every rank exited 0. `wrapper` goes
    between mpirun's options and the python command (e.g. a shell that sets per-rank
    variables and execs the rest). `cwd`: the ranks' working folder (default: this one)."""
    import time

    if module:
        target = ["-m", str(program)]
    else:
        path = Path(program)
        if not path.is_absolute():
            path = RANKS_DIR / path
        target = ["-m", "mpi4py", str(path)]
    cmd = [mpirun(), "-n", str(nprocs), *(wrapper or []), sys.executable, *target, *args]
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONPATH"] = rank_pythonpath()
    full_env.update(env or {})
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=full_env, stdin=subprocess.DEVNULL, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise AssertionError(f"HANG: {' '.join(cmd)} still running after {timeout}s\n"
                             f"--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}") from None
    run = RankRun(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)
    if expect_ok:
        assert run.returncode == 0, f"{' '.join(cmd)} failed\n{run.tail()}"
    return run


class WatchedJob:
    """A job in the background whose `stream` ("stdout" or "stderr") is read as it comes, for
    tests that act while it runs (signal mpirun, stop a rank). On leaving the `with`, mpirun
    and every rank in the job's rank map (dpsgs prints one) are killed: nothing is left behind."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path = REPO, stream: str = "stderr") -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env, cwd=cwd, stdin=subprocess.DEVNULL)
        self._watched = getattr(self.proc, stream)
        self._lines: list[str] = []
        self._said = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._watched:
            with self._said:
                self._lines.append(line)
                self._said.notify_all()

    def text(self) -> str:
        """What the watched stream has said so far."""
        with self._said:
            return "".join(self._lines)

    def wait_until(self, said: Callable[[str], bool], timeout: float) -> bool:
        """Whether said(everything read so far) came true within `timeout` seconds."""
        with self._said:
            return self._said.wait_for(lambda: said("".join(self._lines)), timeout)

    def wait_for(self, marker: str, timeout: float) -> bool:
        return self.wait_until(lambda text: marker in text, timeout)

    def pids(self) -> dict[int, int]:
        """pid -> rank, from the job's rank map."""
        from dpsgs.reliability.rank_map import parse_rank_map

        return parse_rank_map(self.text())

    def __enter__(self) -> "WatchedJob":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reader.join(10)
