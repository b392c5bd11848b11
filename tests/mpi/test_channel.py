"""Channel under real ranks: byte-exact ordered transfer, the two-in-flight bound, header checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launcher import run_ranks  # noqa: E402

pytest.importorskip("dpsgs._C", reason="dpsgs._C not built")


def test_thousand_messages_every_dtype_byte_exact() -> None:
    run = run_ranks(2, "channel_exact_ranks.py", "1000", timeout=90)
    assert "received 1000 byte-exact: True" in run.stdout
    assert "max in flight 2" in run.stdout and "PASS" in run.stdout


def test_sender_never_has_more_than_two_in_flight() -> None:
    run = run_ranks(2, "channel_bound_ranks.py", timeout=60)
    assert "in_flight after each send [1, 2, 2, 2, 2, 2]" in run.stdout, run.tail()
    assert "PASS" in run.stdout


def test_header_mismatch_names_both_ranks_and_shapes() -> None:
    run = run_ranks(2, "channel_header_ranks.py", timeout=60)
    want = "expected dtype float64 shape (2, 3) but received dtype float32 shape (2, 3)"
    assert want in run.stdout, run.tail()
    assert "PASS" in run.stdout
