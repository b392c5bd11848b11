"""Messages of several tensors under real ranks, through the C++ core's channel
(dpsgs.comm.mpi.TensorChannel) and the mpi4py baseline's: byte-exact for every dtype mix and
shape, ordered, at most two messages in flight, one HeaderMismatch per kind of difference
naming the tensor index and both sides, and 17 tensors refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launcher import run_ranks  # noqa: E402

pytest.importorskip("dpsgs._C", reason="dpsgs._C not built")

TRANSPORTS = ["core", "mpi4py"]
WHERE = "channel 'act s0->s1'"


def _ranks(transport: str, case: str, *args: str):
    return run_ranks(2, "channel_messages_ranks.py", transport, case, *args, timeout=120)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_many_messages_of_mixed_tensors_arrive_byte_exact_in_order(transport: str) -> None:
    run = _ranks(transport, "exact", "300")
    assert "rank 1: received 300 messages byte-exact" in run.stdout, run.tail()
    assert "rank 0: sent 300 messages" in run.stdout and "PASS" in run.stdout, run.tail()
    if transport == "core":        # large messages stay in flight: the bound was reached
        assert "max in flight 2" in run.stdout, run.tail()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_in_flight_bound_counts_messages(transport: str) -> None:
    run = _ranks(transport, "bound")
    assert "in_flight after each send [1, 2, 2, 2, 2, 2]" in run.stdout, run.tail()
    assert "PASS" in run.stdout, run.tail()


def _mismatch(transport: str, case: str) -> str:
    run = _ranks(transport, case)
    assert "rank 1: the next message arrived intact" in run.stdout, run.tail()
    assert "PASS" in run.stdout, run.tail()
    line = next(x for x in run.stdout.splitlines() if "got HeaderMismatch" in x)
    assert all(s in line for s in ("act s0->s1", "message #0", "rank 0", "rank 1")), line
    return line


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_count_names_both_lists(transport: str) -> None:
    line = _mismatch(transport, "count")
    assert line.endswith("expected 2 tensor(s) [float32 (2, 3), int64 (0,)] but received 3 "
                         "[float32 (2, 3), int64 (0,), float64 (20000,)]"), line


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_dtype_of_tensor_i_names_the_index_and_both_sides(transport: str) -> None:
    line = _mismatch(transport, "dtype")
    assert line.endswith("tensor 1 of 3: expected dtype int32 shape (0,) but received dtype int64 "
                         "shape (0,)"), line


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_shape_of_tensor_i_names_the_index_and_both_shapes(transport: str) -> None:
    line = _mismatch(transport, "shape")
    assert line.endswith("tensor 2 of 3: expected dtype float64 shape (20001,) but received dtype "
                         "float64 shape (20000,)"), line


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_seventeen_tensors_are_refused_on_either_end(transport: str) -> None:
    run = _ranks(transport, "too_many")
    assert "rank 0 refused: " in run.stdout and "send #0: a message holds 1 to 16 tensors; got 17" \
        in run.stdout, run.tail()
    assert "recv #0: a message holds 1 to 16 tensors; expected 17" in run.stdout, run.tail()
    assert "PASS" in run.stdout, run.tail()
