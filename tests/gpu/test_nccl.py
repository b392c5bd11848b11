"""The NCCL backend under real ranks, on each device kind (conftest.py): "cuda" on real GPUs
(marked gpu; torch CUDA or CuPy buffers) and "sim" on the CPU simulator of a DPSGS_CUDA=sim
build (csrc/sim/sim.h), which runs in CI.

On CUDA it runs on however many GPUs are visible: one rank per GPU where there are enough,
else several ranks per GPU, each with its own NCCL_HOSTID (set by the launcher: NCCL then
takes the ranks for separate hosts and connects them over sockets on lo; dpsgs never sets
it, so its shared-GPU guard keeps its meaning). `bash scripts/gpu-check.sh` runs it all.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_launch import ENV, GPU_RANKS, assert_clean, gpu_ranks, need_device  # noqa: E402
from launcher import COLD, run_ranks  # noqa: E402


def test_channel_byte_exact_both_directions(device):
    # sim: 300 messages cover every dtype x size x array count of the rotation several times
    # (the simulator's random delays make each one slow); a GPU runs the full 1,000
    messages = "1000" if device == "cuda" else "300"
    run = gpu_ranks(2, "nccl_channel_ranks.py", messages, timeout=600, device=device)
    assert run.stdout.count("OK") == 2, run.tail()
    assert_clean(run)


def test_channel_header_mismatch_names_both_ranks_by_label(device):
    run = gpu_ranks(2, "nccl_mismatch_ranks.py", device=device, env=COLD)   # leaves unfinalized
    assert "got HeaderMismatch" in run.stdout and run.stdout.count("OK") == 2, run.tail()


@pytest.mark.parametrize("nprocs", [2, 3, 4])
def test_allreduce_means_hold_nccl_guarantees(nprocs, device):
    # 3 ranks: ncclAvg pre-multiplies by fl(1/3), so floats are bounded, not exact (mean_check)
    run = gpu_ranks(nprocs, "nccl_allreduce_ranks.py", timeout=600, device=device)
    assert run.stdout.count("OK") == nprocs, run.tail()
    assert_clean(run)


@pytest.mark.parametrize("nprocs", [2, 3, 4, *(pytest.param(n, marks=pytest.mark.slow) for n in range(5, 9))])
def test_split_groups_of_every_grid(nprocs, device):
    run = gpu_ranks(nprocs, "nccl_split_ranks.py", timeout=600, device=device)
    assert run.stdout.count("OK") == nprocs, run.tail()
    assert_clean(run)


@pytest.mark.parametrize("op", ["recv", "allreduce"])
def test_dead_peer_times_out_naming_it_and_ends_the_job(op, device):
    timeout = 5.0
    run = gpu_ranks(2, "nccl_dead_peer_ranks.py", op, str(timeout), timeout=120, expect_ok=False, device=device)
    out = run.stdout + run.stderr
    assert run.returncode != 0, run.tail()
    assert "rank 0: CommTimeout after" in out, run.tail()
    assert ("from rank 1" in out) if op == "recv" else ("allreduce" in out and "timed out" in out), run.tail()
    # the abort of a non-blocking communicator may answer ncclInProgress: accepted, not a failure
    assert "ncclCommAbort" not in out or "failed" not in out.split("ncclCommAbort", 1)[1].split("\n", 1)[0], \
        run.tail()
    # the deadline, plus start-up (two CUDA contexts, NCCL's socket bootstrap), a bounded
    # ncclCommAbort (10 s) and the job's teardown; not the peer's 120 s
    assert run.seconds < timeout + 60, run.tail()


def test_stall_report_comes_after_warn_after_not_at_a_fixed_60_s(device):
    # Regression: warn_after never reached the NCCL waits (they printed STALL at 60 s, past
    # the deadline here); with warn_after=1 the STALL line comes before the 8 s deadline.
    run = gpu_ranks(2, "nccl_dead_peer_ranks.py", "recv", "8", "1", timeout=120, expect_ok=False, device=device)
    out = run.stdout + run.stderr
    stalls = [line for line in out.splitlines() if line.startswith("[dpsgs] STALL:") and "recv header #0" in line]
    assert stalls and "rank 0: CommTimeout after" in out, run.tail()
    waited = float(stalls[0].rsplit("still waiting after ", 1)[1].split(" s", 1)[0])
    assert waited < 8, run.tail()


def test_two_ranks_on_one_gpu_refused_on_one_host(device):
    need_device(device)
    env = dict(ENV, CUDA_VISIBLE_DEVICES="0", NCCL_HOSTID="", DPSGS_TEST_DEVICE=device)
    run = run_ranks(2, GPU_RANKS / "nccl_shared_gpu_ranks.py", timeout=300, env=env, expect_ok=False)
    assert run.returncode != 0, run.tail()
    text = run.stdout + run.stderr
    assert "SharedGPUError" in text and "both map to GPU" in text and "rank 1 and rank 0" in text, run.tail()
    assert "accepted two ranks" not in text, run.tail()


def test_two_ranks_on_one_gpu_accepted_with_distinct_nccl_hostids(device):
    run = gpu_ranks(2, "nccl_shared_gpu_ranks.py", env={"CUDA_VISIBLE_DEVICES": "0"}, share=True, device=device)
    assert run.stdout.count("accepted two ranks on one GPU; all-reduce OK") == 2, run.tail()
    assert_clean(run)


def test_close_at_exit_and_abort_leave_no_error(device):
    # Communicators never closed are closed by the atexit hook, before the CUDA runtime
    # unloads; an explicit abort of a non-blocking communicator is no failure either.
    run = gpu_ranks(2, "nccl_exit_ranks.py", timeout=300, device=device)
    assert run.stdout.count("OK") == 2, run.tail()
    lines = (run.stdout + run.stderr).splitlines()
    aborts = [line for line in lines if "aborting NCCL communicator" in line]
    assert len(aborts) == 2 and all("(the test aborts it)" in line for line in aborts), run.tail()
    assert_clean(run, allow=aborts)


def test_destroying_a_channel_keeps_its_in_flight_sends_alive(device):
    # Regression: a channel dropped with sends in flight released their buffers while
    # ncclSend could still read them (the simulator poisons freed memory and checks every
    # send buffer, so the receiver saw poison or the sender's check failed).
    run = gpu_ranks(2, "nccl_drop_channel_ranks.py", timeout=300, device=device)
    assert run.stdout.count("OK") == 2, run.tail()
    text = run.stdout + run.stderr
    assert "closed with 2 sends still in flight" in text, run.tail()


def test_nccl_bench_checks(device):
    size = "64M" if device == "cuda" else "1M"
    run = gpu_ranks(2, "nccl_bench_ranks.py", "--check", "-e", size, timeout=900, device=device)
    assert "all checks passed" in run.stdout, run.tail()
    assert_clean(run)
