"""CUDA suite: the NCCL backend under real ranks (torch CUDA or CuPy buffers).

Skipped, with the reason, where no GPU is visible or dpsgs._C was built without NCCL. On a
GPU machine run it as docs/gpu.md says. Written and compiled without a GPU: compiled, not run.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mpi"))
from launcher import REPO, RANKS_DIR, run_ranks  # noqa: E402

pytestmark = pytest.mark.gpu

GPU_RANKS = Path(__file__).resolve().parent / "ranks"
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(GPU_RANKS), str(RANKS_DIR)])}

_PROBE = """
import json
from dpsgs import nccl
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


def need_gpus(n: int) -> None:
    p = _probe()
    if not p["ok"]:
        pytest.skip(f"NCCL backend cannot run here: {p['why']}")
    if p["lib"] is None:
        pytest.skip("no CUDA array library: torch is a CPU build and CuPy is missing (pip install cupy-cuda12x)")
    if p["gpus"] < n:
        pytest.skip(f"needs {n} GPUs (one per rank), {p['gpus']} visible")


def test_channel_byte_exact_both_directions():
    need_gpus(2)
    run = run_ranks(2, GPU_RANKS / "nccl_channel_ranks.py", "1000", timeout=600, env=ENV)
    assert run.stdout.count("OK") == 2, run.tail()


def test_channel_header_mismatch_names_both_ranks():
    need_gpus(2)
    run = run_ranks(2, GPU_RANKS / "nccl_mismatch_ranks.py", timeout=300, env=ENV)
    assert "got ValueError" in run.stdout and run.stdout.count("OK") == 2, run.tail()


@pytest.mark.parametrize("nprocs", [2, 3, 4])
def test_allreduce_average(nprocs):
    need_gpus(nprocs)
    run = run_ranks(nprocs, GPU_RANKS / "nccl_allreduce_ranks.py", timeout=600, env=ENV)
    assert run.stdout.count("OK") == nprocs, run.tail()


def test_two_ranks_on_one_gpu_fail_before_nccl_init():
    need_gpus(1)
    env = dict(ENV, CUDA_VISIBLE_DEVICES="0")
    run = run_ranks(2, GPU_RANKS / "nccl_shared_gpu_ranks.py", timeout=300, env=env, expect_ok=False)
    assert run.returncode != 0, run.tail()
    text = run.stdout + run.stderr
    assert "SharedGPUError" in text and "both map to GPU" in text and "rank 1 and rank 0" in text, run.tail()
    assert "accepted two ranks" not in text, run.tail()


@pytest.mark.slow
def test_nccl_bench_checks():
    need_gpus(2)
    run = run_ranks(2, GPU_RANKS / "nccl_bench_ranks.py", "--check", timeout=900, env=ENV)
    assert "#wrong 0" in run.stdout or "all checks passed" in run.stdout, run.tail()
