"""CUDA suite: the NCCL backend under real ranks (torch CUDA or CuPy buffers).

Runs on however many GPUs are visible: one rank per GPU where there are enough, else
several ranks per GPU, each with its own NCCL_HOSTID (set here, by the launcher: NCCL then
takes the ranks for separate hosts and connects them over sockets on lo; dpsgs never sets
it, so its shared-GPU guard keeps its meaning). Skipped, with the reason, where no GPU is
visible or dpsgs._C was built without NCCL. `bash scripts/gpu-check.sh` runs it all.
"""

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

pytestmark = pytest.mark.gpu

GPU_RANKS = Path(__file__).resolve().parent / "ranks"
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(GPU_RANKS), str(RANKS_DIR)]), "NCCL_DEBUG": "WARN"}
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


def gpu_ranks(nprocs: int, program: str, *args: str, timeout: float = 300, expect_ok: bool = True,
              env: dict[str, str] | None = None, share: bool | None = None) -> RankRun:
    """Launch a GPU rank program: one rank per GPU if enough are visible, else (or with
    share=True) several per GPU with a distinct NCCL_HOSTID each."""
    gpus = need_gpu()
    share = gpus < nprocs if share is None else share
    full_env = dict(ENV, **(env or {}))
    if share:
        full_env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    return run_ranks(nprocs, GPU_RANKS / program, *args, timeout=timeout, env=full_env, expect_ok=expect_ok,
                     wrapper=SHARE_GPU if share else None)


def assert_clean(run: RankRun) -> None:
    """A successful run prints no NCCL/CUDA error, at exit included."""
    bad = [line for line in (run.stdout + run.stderr).splitlines() if TROUBLE.search(line)]
    assert not bad, "errors printed by a successful run:\n" + "\n".join(bad[:20]) + "\n" + run.tail()


def test_channel_byte_exact_both_directions():
    run = gpu_ranks(2, "nccl_channel_ranks.py", "1000", timeout=600)
    assert run.stdout.count("OK") == 2, run.tail()
    assert_clean(run)


def test_channel_header_mismatch_names_both_ranks():
    run = gpu_ranks(2, "nccl_mismatch_ranks.py")
    assert "got HeaderMismatch" in run.stdout and run.stdout.count("OK") == 2, run.tail()


@pytest.mark.parametrize("nprocs", [2, 3, 4])
def test_allreduce_means_hold_nccl_guarantees(nprocs):
    # 3 ranks: ncclAvg pre-multiplies by fl(1/3), so floats are bounded, not exact (mean_check)
    run = gpu_ranks(nprocs, "nccl_allreduce_ranks.py", timeout=600)
    assert run.stdout.count("OK") == nprocs, run.tail()
    assert_clean(run)


@pytest.mark.parametrize("nprocs", range(2, 9))
def test_split_groups_of_every_grid(nprocs):
    run = gpu_ranks(nprocs, "nccl_split_ranks.py", timeout=600)
    assert run.stdout.count("OK") == nprocs, run.tail()
    assert_clean(run)


@pytest.mark.parametrize("op", ["recv", "allreduce"])
def test_dead_peer_times_out_naming_it_and_ends_the_job(op):
    timeout = 5.0
    run = gpu_ranks(2, "nccl_dead_peer_ranks.py", op, str(timeout), timeout=120, expect_ok=False)
    out = run.stdout + run.stderr
    assert run.returncode != 0, run.tail()
    assert "rank 0: CommTimeout after" in out, run.tail()
    assert ("from rank 1" in out) if op == "recv" else ("allreduce" in out and "timed out" in out), run.tail()
    # the deadline, plus a bounded ncclCommAbort (10 s) and the job's teardown; not the peer's 120 s
    assert run.seconds < timeout + 40, run.tail()


def test_two_ranks_on_one_gpu_refused_on_one_host():
    need_gpu()
    env = dict(ENV, CUDA_VISIBLE_DEVICES="0", NCCL_HOSTID="")
    run = run_ranks(2, GPU_RANKS / "nccl_shared_gpu_ranks.py", timeout=300, env=env, expect_ok=False)
    assert run.returncode != 0, run.tail()
    text = run.stdout + run.stderr
    assert "SharedGPUError" in text and "both map to GPU" in text and "rank 1 and rank 0" in text, run.tail()
    assert "accepted two ranks" not in text, run.tail()


def test_two_ranks_on_one_gpu_accepted_with_distinct_nccl_hostids():
    run = gpu_ranks(2, "nccl_shared_gpu_ranks.py", env={"CUDA_VISIBLE_DEVICES": "0"}, share=True)
    assert run.stdout.count("accepted two ranks on one GPU; all-reduce OK") == 2, run.tail()
    assert_clean(run)


def test_nccl_bench_checks():
    run = gpu_ranks(2, "nccl_bench_ranks.py", "--check", "-e", "64M", timeout=900)
    assert "all checks passed" in run.stdout, run.tail()
    assert_clean(run)
