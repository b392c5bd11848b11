"""Launching GPU rank programs: one rank per GPU where enough are visible, else several ranks
per GPU, each with its own NCCL_HOSTID (set here, by the launcher: NCCL then takes the ranks
for separate hosts and connects them over sockets on lo; dpsgs never sets it, so its
shared-GPU guard keeps its meaning). `need_gpu` skips, with the reason, where no GPU is
visible or dpsgs._C was built without NCCL."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mpi"))
from launcher import REPO, RANKS_DIR, RankRun, run_ranks  # noqa: E402

__all__ = ["ENV", "GPU_RANKS", "SHARE_GPU", "assert_clean", "gpu_ranks", "need_gpu"]

GPU_RANKS = Path(__file__).resolve().parent / "ranks"
# CUBLAS_WORKSPACE_CONFIG: deterministic cuBLAS, so float64 runs compare bit for bit
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(GPU_RANKS), str(RANKS_DIR)]), "NCCL_DEBUG": "WARN",
       "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
# Per-rank host identity for ranks that share a GPU (hydra: PMI_RANK; Open MPI: its own).
SHARE_GPU = ["bash", "-c", 'export NCCL_HOSTID="dpsgs-test-${PMI_RANK:-${OMPI_COMM_WORLD_RANK:-0}}"; exec "$@"',
             "share-gpu"]
# What a healthy run must never print: NCCL's warnings, CUDA failures, dpsgs's error paths.
TROUBLE = re.compile(r"NCCL WARN|Cuda failure|driver shutting down|aborting NCCL|\[dpsgs\]|failed:|Segmentation")


_PROBE = """
import json
from dpsgs.comm import nccl
ok, why = nccl.available()
gpus, lib = 0, None
if ok:
    from dpsgs import _C
    gpus = _C.cuda_device_count()
    try:
        import torch
        lib = "torch" if torch.cuda.is_available() else None
    except ImportError:
        pass
    if lib is None:
        try:
            import cupy  # noqa: F401
            lib = "cupy"
        except ImportError:
            pass
print(json.dumps({"ok": ok, "why": why, "gpus": gpus, "lib": lib}))
"""


@functools.cache
def _probe() -> dict:
    """Asked in a subprocess, so pytest itself never initialises MPI or CUDA."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                          env=env, cwd=REPO)
    if proc.returncode != 0:
        return {"ok": False, "why": f"probe failed: {proc.stderr.strip()[-500:]}", "gpus": 0, "lib": None}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def need_gpu() -> int:
    """Skip unless NCCL can run here with an array library; the number of visible GPUs."""
    p = _probe()
    if not p["ok"]:
        pytest.skip(f"NCCL backend cannot run here: {p['why']}")
    if p["lib"] is None:
        pytest.skip("no CUDA array library: torch is a CPU build and CuPy is missing (pip install cupy-cuda12x)")
    return p["gpus"]


def gpu_ranks(nprocs: int, program: str | Path, *args: str, timeout: float = 300, expect_ok: bool = True,
              env: dict[str, str] | None = None, share: bool | None = None, module: bool = False) -> RankRun:
    """Launch a GPU rank program (a file of tests/gpu/ranks/, a path, or with module=True a
    module such as dpsgs): one rank per GPU if enough are visible, else (or with share=True)
    several per GPU with a distinct NCCL_HOSTID each."""
    gpus = need_gpu()
    share = gpus < nprocs if share is None else share
    full_env = dict(ENV, **(env or {}))
    if share:
        full_env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    target = program if module or Path(program).is_absolute() else GPU_RANKS / program
    return run_ranks(nprocs, target, *args, timeout=timeout, env=full_env, expect_ok=expect_ok,
                     wrapper=SHARE_GPU if share else None, module=module)


def assert_clean(run: RankRun) -> None:
    """A successful run prints no NCCL/CUDA error, at exit included."""
    bad = [line for line in (run.stdout + run.stderr).splitlines() if TROUBLE.search(line)]
    assert not bad, "errors printed by a successful run:\n" + "\n".join(bad[:20]) + "\n" + run.tail()
