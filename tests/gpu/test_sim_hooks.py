"""The simulator's own hooks (csrc/sim/sim_faults.h, its call counts), which exist only on
a DPSGS_CUDA=sim build: every fault hook ends in the documented error within its deadline,
naming the operation, and connect() warms up only what will be used."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_launch import assert_clean, gpu_ranks  # noqa: E402

TIMEOUT = 5.0
# fault: (the error, what it must name)
EXPECTED = {
    "stall": ("CommTimeout", "NcclReducer allreduce #1"),
    "async_error": ("CommError", "simulated: connection to the peer lost"),
    "init_hang": ("CommTimeout", "ncclCommInitRankConfig"),
}


@pytest.mark.parametrize("fault", sorted(EXPECTED))
def test_fault_hook_ends_in_the_documented_error_within_the_deadline(fault, sim):
    run = gpu_ranks(2, "nccl_fault_ranks.py", fault, str(TIMEOUT), timeout=120, expect_ok=False, device=sim)
    out = run.stdout + run.stderr
    error, named = EXPECTED[fault]
    faulty = 1 if fault == "init_hang" else 0
    lines = [line for line in out.splitlines() if line.startswith(f"rank {faulty}: {error} after")]
    assert run.returncode == 3 and lines and named in lines[0], run.tail()
    took = float(lines[0].split(" after ", 1)[1].split("s:", 1)[0])
    # async_error: reported at once; the others at their deadline (plus a bounded abort)
    assert took < (TIMEOUT if fault == "async_error" else TIMEOUT + 15), run.tail()
    assert "no error?!" not in out, run.tail()


def test_connect_warms_up_the_allreduce_only_where_a_reducer_will_run(sim):
    run = gpu_ranks(4, "nccl_connect_ranks.py", timeout=300, device=sim)
    assert run.stdout.count("connect warm-ups OK") == 4, run.tail()
    assert_clean(run)


def test_a_work_dropped_while_its_operation_runs_keeps_the_buffer_until_it_ends(sim):
    # Regression (ThreadSanitizer, scripts/sim-checks.sh tsan): a Work destroyed before its
    # operation finished released the buffer while the stream could still write it
    run = gpu_ranks(2, "nccl_owner_ranks.py", timeout=120, expect_ok=False, device=sim)
    assert run.returncode == 3 and run.stdout.count(": OK") == 2, run.tail()
