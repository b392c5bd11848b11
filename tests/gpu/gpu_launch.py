"""Launching GPU rank programs on a device kind: "cuda" (real GPUs) or "sim" (the CPU
simulator of a DPSGS_CUDA=sim build, csrc/sim/sim.h; the programs then use its arrays).

On CUDA: one rank per GPU where enough are visible, else several ranks per GPU, each with
its own NCCL_HOSTID (set here, by the launcher: NCCL then takes the ranks for separate
hosts and connects them over sockets on lo; dpsgs never sets it, so its shared-GPU guard
keeps its meaning). On the simulator every rank has a simulated device of its own (8 are
visible). `need_device` skips, with the reason, where the kind cannot run here."""

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

__all__ = ["DEVICES", "ENV", "GPU_RANKS", "SHARE_GPU", "assert_clean", "gpu_ranks", "need_device", "need_gpu"]

DEVICES = ("cuda", "sim")

GPU_RANKS = Path(__file__).resolve().parent / "ranks"
# CUBLAS_WORKSPACE_CONFIG: deterministic cuBLAS, so float64 runs compare bit for bit
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(GPU_RANKS), str(RANKS_DIR)]), "NCCL_DEBUG": "WARN",
       "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
# Per-rank host identity for ranks that share a GPU (hydra: PMI_RANK; Open MPI: its own).
SHARE_GPU = ["bash", "-c", 'export NCCL_HOSTID="dpsgs-test-${PMI_RANK:-${OMPI_COMM_WORLD_RANK:-0}}"; exec "$@"',
             "share-gpu"]
# What a healthy run must never print: NCCL's warnings, CUDA failures, dpsgs's error paths.
TROUBLE = re.compile(r"NCCL WARN|Cuda failure|driver shutting down|aborting NCCL|\[dpsgs\]|\[dpsgs-sim\]|failed:|"
                     r"Segmentation")


_PROBE = """
import json, sys
from dpsgs.comm import nccl
kind = sys.argv[1]
ok, why = nccl.available(kind)
gpus, lib = 0, None
if ok and kind == "sim":
    gpus, lib = 8, "sim"
elif ok:
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
def _probe(kind: str = "cuda") -> dict:
    """Asked in a subprocess, so pytest itself never initialises MPI or CUDA."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _PROBE, kind], capture_output=True, text=True, timeout=120,
                          env=env, cwd=REPO)
    if proc.returncode != 0:
        return {"ok": False, "why": f"probe failed: {proc.stderr.strip()[-500:]}", "gpus": 0, "lib": None}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def need_device(kind: str) -> int:
    """Skip unless NCCL can run here on `kind` with an array library; the devices visible."""
    p = _probe(kind)
    if not p["ok"]:
        pytest.skip(f"NCCL backend cannot run here on {kind}: {p['why']}")
    if p["lib"] is None:
        pytest.skip("no CUDA array library: torch is a CPU build and CuPy is missing (pip install cupy-cuda12x)")
    return p["gpus"]


def need_gpu() -> int:
    """need_device("cuda")."""
    return need_device("cuda")


def gpu_ranks(nprocs: int, program: str | Path, *args: str, timeout: float = 300, expect_ok: bool = True,
              env: dict[str, str] | None = None, share: bool | None = None, module: bool = False,
              device: str = "cuda") -> RankRun:
    """Launch a GPU rank program (a file of tests/gpu/ranks/, a path, or with module=True a
    module such as dpsgs) on `device` ("cuda" or "sim"): one rank per GPU if enough are
    visible, else (or with share=True) several per GPU with a distinct NCCL_HOSTID each."""
    gpus = need_device(device)
    share = gpus < nprocs if share is None else share
    # scripts/gpu-check.sh caps every launch, so a hung test costs minutes, not the device call
    cap = float(os.environ.get("DPSGS_TEST_TIMEOUT_CAP", "0") or 0)
    timeout = min(timeout, cap) if cap > 0 else timeout
    full_env = dict(ENV, **(env or {}))
    full_env["DPSGS_TEST_DEVICE"] = device
    if share:
        full_env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    target = program if module or Path(program).is_absolute() else GPU_RANKS / program
    return run_ranks(nprocs, target, *args, timeout=timeout, env=full_env, expect_ok=expect_ok,
                     wrapper=SHARE_GPU if share else None, module=module)


def assert_clean(run: RankRun, allow: list[str] | tuple[str, ...] = ()) -> None:
    """A successful run prints no NCCL/CUDA error, at exit included (`allow`: lines the test
    expects, e.g. the report of an abort it made)."""
    bad = [line for line in (run.stdout + run.stderr).splitlines() if TROUBLE.search(line) and line not in allow]
    assert not bad, "errors printed by a successful run:\n" + "\n".join(bad[:20]) + "\n" + run.tail()
