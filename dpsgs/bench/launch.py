"""Launching a benchmark runner (dpsgs/bench/peers/) as a subprocess and classifying its end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["REPO", "SHARE_GPU", "free_port", "launch", "runner_command"]

REPO = Path(__file__).resolve().parents[2]
# Between mpirun's options and the rank's command where ranks outnumber GPUs: each rank gets
# its own NCCL_HOSTID (hydra's PMI_RANK, Open MPI's rank), so NCCL takes the ranks for
# separate hosts and connects them over its socket transport on lo instead of refusing a
# shared GPU. The launcher sets it, never the runner (dpsgs's shared-GPU guard keeps its
# meaning: the same rule as tests/gpu and scripts/gpu-check.sh).
SHARE_GPU = ["bash", "-c", 'export NCCL_HOSTID="dpsgs-bench-${PMI_RANK:-${OMPI_COMM_WORLD_RANK'
             ':-0}}" NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-lo}"; exec "$@"', "share-gpu"]


def _mpirun() -> str:
    # The venv's own mpirun matches the MPI that mpi4py was built against.
    beside = Path(sys.executable).parent / "mpirun"
    return str(beside) if beside.exists() else "mpirun"


def free_port() -> int:
    """A TCP port free on this host now (for a torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runner_command(runner: str, args: list[str], ranks: int, mpi4py: bool,
                   share_gpu: bool = False) -> list[str]:
    """`python [-m mpi4py] -m dpsgs.bench.peers.RUNNER ARGS`, under `mpirun -n RANKS` unless it
    is one rank that needs no MPI; `share_gpu`: each rank through SHARE_GPU (its own
    NCCL_HOSTID), for more ranks than GPUs."""
    py = [sys.executable, *(["-m", "mpi4py"] if mpi4py else []), "-m",
          f"dpsgs.bench.peers.{runner}", *args]
    if ranks == 1 and not mpi4py:
        return py
    return [_mpirun(), "-n", str(ranks), *(SHARE_GPU if share_gpu else []), *py]


def launch(cmd: list[str], out: Path, threads: int, timeout: float) -> dict[str, Any]:
    """Run `cmd`, a runner that writes its JSON result to `out`, from the repository root with
    `threads` OpenMP threads per rank and a fresh gloo rendezvous port.

    Returns {"status": "ok", "wall_s", "result": the runner's JSON} or, when it timed out,
    exited non-zero or wrote no result, {"status": "timeout" | "failed", "reason", "command",
    "stderr_tail"} (plus "wall_s" when failed)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or "")[-1500:]
        return {"status": "timeout", "reason": f"no result after {timeout:.0f}s",
                "command": cmd, "stderr_tail": tail}
    wall = time.monotonic() - t0
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout)[-1500:]
        last = next((ln for ln in reversed(tail.splitlines()) if ln.strip()), "")
        return {"status": "failed", "reason": f"exit {proc.returncode}: {last[:300]}",
                "command": cmd, "stderr_tail": tail, "wall_s": wall}
    return {"status": "ok", "wall_s": wall, "result": json.loads(out.read_text())}
