"""Communicator and dpsgs.comm.mpi under real ranks: GIL, sub-communicators, dead peers, torch face."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launcher import run_ranks  # noqa: E402

_C = pytest.importorskip("dpsgs._C", reason="dpsgs._C not built")


def test_build_info_reports_mpi_and_nccl() -> None:
    import dpsgs

    info = dpsgs.build_info()
    assert info["mpi_library"].startswith("MPICH") or "MPI" in info["mpi_library"]
    assert isinstance(info["nccl"], bool)
    assert (info["nccl_version"] is None) == (not info["nccl"])


def test_size_one_in_process() -> None:
    from mpi4py import MPI

    comm = _C.Communicator(MPI.COMM_SELF, timeout=5.0)
    assert (comm.rank, comm.size) == (0, 1)
    x = np.arange(10, dtype=np.float32)
    w = _C.Reducer(comm).allreduce(x)
    w.wait()
    assert w.is_completed() and np.array_equal(x, np.arange(10, dtype=np.float32))
    with pytest.raises(ValueError, match="peer 0 must be another rank"):
        _C.Channel(comm, 0, 1, True, "self")
    with pytest.raises(ValueError, match="non-contiguous"):
        _C.Reducer(comm).allreduce(np.zeros((4, 4), np.float32)[:, 0])
    with pytest.raises(ValueError, match="read-only"):
        ro = np.zeros(4, np.float32)
        ro.flags.writeable = False
        _C.Reducer(comm).allreduce(ro)
    with pytest.raises(ValueError, match="unknown algorithm 'fast'"):
        _C.Reducer(comm, "fast")
    with pytest.raises(ValueError, match="does not match"):
        _C.Reducer(comm).allreduce(np.zeros(4, np.float32), dtype_code=1)


def test_waits_release_the_gil() -> None:
    run = run_ranks(2, "comm_gil_ranks.py", timeout=60)
    assert run.stdout.count("python thread ticked") == 2 and "PASS" in run.stdout


def test_communicator_on_sub_communicators() -> None:
    run = run_ranks(4, "comm_subcomm_ranks.py", timeout=60)
    assert run.stdout.count("PASS") == 4


@pytest.mark.parametrize("op", ["recv", "allreduce"])
def test_stuck_peer_times_out_naming_it_and_aborts_the_job(op: str) -> None:
    timeout = 3.0
    run = run_ranks(2, "comm_dead_peer_ranks.py", op, str(timeout), timeout=60, expect_ok=False,
                    env={"DEAD_HOW": "hang"})       # rank 1 stays alive but never answers
    out = run.stdout + run.stderr
    assert run.returncode != 0, run.tail()
    assert run.seconds < timeout + 8, run.tail()    # not the peer's 60 s sleep
    assert "CommTimeout after" in out, run.tail()
    assert "from rank 1" in out or "waiting for rank 1" in out, run.tail()
    assert "aborting the job" in out, run.tail()


def test_blocking_small_allreduce_with_a_stuck_peer_aborts_the_job_at_the_deadline() -> None:
    # MPI_Allreduce has no deadline of its own; the communicator's watchdog ends the job.
    timeout = 2.0
    run = run_ranks(2, "comm_dead_peer_ranks.py", "allreduce-small", str(timeout), timeout=60,
                    expect_ok=False, env={"DEAD_HOW": "hang"})
    out = run.stdout + run.stderr
    assert run.returncode != 0, run.tail()
    assert run.seconds < timeout + 8, run.tail()    # not the peer's 60 s sleep
    assert ("rank 0: all-reduce #0 (64 bytes float32 (16,)) over 2 ranks [mpi, blocking] did "
            "not complete within 2 s") in out, run.tail()
    assert "aborting the job" in out, run.tail()


def test_peer_that_exits_early_times_out_naming_it() -> None:
    run = run_ranks(2, "comm_dead_peer_ranks.py", "recv", "3", timeout=60, expect_ok=False,
                    env={"DEAD_HOW": "exit"})       # rank 1 finalizes and leaves
    out = run.stdout + run.stderr
    assert run.returncode != 0 and run.seconds < 11, run.tail()
    assert "recv #0 from rank 1 did not complete within 3 s" in out, run.tail()


@pytest.mark.parametrize("nprocs", [2, 3])
def test_torch_gradient_reducer_and_tensor_channel(nprocs: int) -> None:
    pytest.importorskip("torch")
    run = run_ranks(nprocs, "comm_torch_ranks.py", timeout=90)
    assert "PASS" in run.stdout, run.tail()


def test_two_gradient_sets_overlap_the_next_backward() -> None:
    pytest.importorskip("torch")
    run = run_ranks(2, "reducer_two_sets_ranks.py", timeout=90)
    assert "two gradient sets" in run.stdout and "PASS" in run.stdout, run.tail()


@pytest.mark.parametrize("op", ["recv", "allreduce"])
def test_ctrl_c_ends_a_wait_at_once(op: str) -> None:
    # regression: a wait ignored Ctrl-C until its deadline, so under mpirun an interrupted
    # job sometimes ended (by another rank's abort) before rank 0 said it was interrupted
    run = run_ranks(2, "interrupt_ranks.py", op, timeout=60, expect_ok=False)
    took = re.search(r"rank 0: KeyboardInterrupt after ([0-9.]+) s", run.stdout)
    assert took and float(took.group(1)) < 3.0, run.tail()       # SIGINT at 1 s; deadline 30 s
    assert run.seconds < 20, run.tail()
