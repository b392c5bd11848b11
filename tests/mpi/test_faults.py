"""A rank dies or hangs: every other rank goes down within the timeout plus a few seconds,
with a message naming the dead rank or the operation it was waiting on; no hangs.

The CI part is a handful of trials; the full seeded matrix (>= 20 trials across phases and
topologies) is `bash scripts/fault-matrix.sh`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_trial import SLACK, TIMEOUT, Trial, run_trial  # noqa: E402
from launcher import run_ranks  # noqa: E402

needs_trainer = pytest.mark.skipif(importlib.util.find_spec("dpsgs.job.trainer") is None,
                                   reason="dpsgs.job.trainer not written yet")


def test_step_vote_takes_the_max_on_every_rank():
    run = run_ranks(3, "control_ranks.py", "vote", timeout=60)
    assert "PASS" in run.stdout


def test_stall_report_then_timeout_names_the_missing_rank():
    # rank 1 stops answering at step 2: rank 0 reports the stall after warn_after (1 s),
    # times out after 3 s naming rank 1 and aborts the job.
    run = run_ranks(3, "control_ranks.py", "stall", "3", timeout=60, expect_ok=False)
    assert run.returncode != 0, run.tail()
    assert ("dpsgs stall: rank 0 has been waiting for rank 1 (replica 0, stage 1) for 1 s "
            "in the step-boundary vote at step 2") in run.stderr, run.tail()
    assert ("rank 0: step-boundary vote at step 2 timed out after 3.0 s waiting for "
            "rank 1 (replica 0, stage 1): that rank is dead or stuck") in run.stderr, run.tail()
    assert run.seconds < 3 + SLACK + 20, run.tail()     # 20 s: start-up of 3 pythons


def _check(trial: Trial) -> None:
    o = run_trial(trial)
    detail = f"{trial}\n{o}\n--- output tail\n{o.output_tail}"
    assert not o.hang, f"HANG\n{detail}"
    assert o.fired, f"the fault never fired (phase not reached?)\n{detail}"
    assert o.returncode != 0, detail
    assert o.time_to_exit is not None and o.time_to_exit <= TIMEOUT + SLACK, detail
    assert o.named_by, f"no message names the dead rank or the operation\n{detail}"


@needs_trainer
def test_sigkill_in_forward_hydra_cleans_up_and_pid_names_the_rank():
    _check(Trial(2, 1, rank=1, step=3, phase="forward", kind="sigkill", launcher="cleanup"))


@needs_trainer
def test_hang_in_reduce_survivors_time_out_naming_the_peer():
    _check(Trial(2, 2, rank=3, step=4, phase="reduce", kind="hang", launcher="survivors"))


@needs_trainer
def test_exit_in_save_without_cleanup_survivors_time_out():
    _check(Trial(3, 1, rank=2, step=2, phase="save", kind="exit", launcher="survivors"))


@pytest.mark.slow          # the same path as every bad-input error: tests/mpi/test_bad_input.py
@needs_trainer
def test_exception_in_eval_aborts_the_job():
    _check(Trial(2, 1, rank=0, step=1, phase="eval", kind="exception", launcher="cleanup"))
