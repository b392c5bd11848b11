"""CUDA suite: the NCCL backend under real ranks (torch CUDA or CuPy buffers).

Runs on however many GPUs are visible: one rank per GPU where there are enough, else
several ranks per GPU, each with its own NCCL_HOSTID (set here, by the launcher: NCCL then
takes the ranks for separate hosts and connects them over sockets on lo; dpsgs never sets
it, so its shared-GPU guard keeps its meaning). Skipped, with the reason, where no GPU is
visible or dpsgs._C was built without NCCL. `bash scripts/gpu-check.sh` runs it all.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_launch import ENV, GPU_RANKS, assert_clean, gpu_ranks, need_gpu  # noqa: E402
from launcher import run_ranks  # noqa: E402

pytestmark = pytest.mark.gpu


def test_channel_byte_exact_both_directions():
    run = gpu_ranks(2, "nccl_channel_ranks.py", "1000", timeout=600)
    assert run.stdout.count("OK") == 2, run.tail()
    assert_clean(run)


def test_channel_header_mismatch_names_both_ranks_by_label():
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
    # the deadline, plus start-up (two CUDA contexts, NCCL's socket bootstrap), a bounded
    # ncclCommAbort (10 s) and the job's teardown; not the peer's 120 s
    assert run.seconds < timeout + 60, run.tail()


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
