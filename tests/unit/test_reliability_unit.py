"""Pure-logic tests of fault injection, the NaN/Inf guard and the preemption flag (no MPI)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from dpsgs.reliability import faults
from dpsgs.reliability.guards import FiniteGuard, NonFiniteError, first_nonfinite
from dpsgs.reliability.preemption import PreemptionHandler, signal_name


# --- faults -------------------------------------------------------------------------------

def test_parse_fault_full_and_default_step():
    f = faults.parse_fault("rank=1,step=7,phase=forward,kind=sigkill")
    assert (f.rank, f.step, f.phase, f.kind) == (1, 7, "forward", "sigkill")
    assert faults.parse_fault(" rank=0 , phase=save, kind=hang ").step == 0


@pytest.mark.parametrize("spec, message", [
    ("rank=1,phase=forward", "missing kind="),
    ("rank=1,phase=lunch,kind=exit", "unknown phase 'lunch'; choose from ('warmup'"),
    ("rank=1,phase=forward,kind=explode", "unknown kind 'explode'; choose from ('sigkill'"),
    ("rank=one,phase=forward,kind=exit", "rank and step must be integers"),
    ("rank=-1,phase=forward,kind=exit", "rank and step must be >= 0"),
    ("rank=1,phase=forward,kind=exit,colour=red", "unknown keys ['colour']"),
    ("rank=1,phase", "item 'phase' is not key=value"),
])
def test_parse_fault_rejects_with_message(spec, message):
    with pytest.raises(ValueError) as e:
        faults.parse_fault(spec)
    assert message in str(e.value)
    assert "DPSGS_FAULT=" in str(e.value)


def test_fault_point_unset_is_noop():
    faults.reset("")        # no spec and (in tests) no env var -> nothing fires
    if os.environ.get(faults.ENV_VAR):
        pytest.skip("DPSGS_FAULT set in the environment")
    for phase in faults.PHASES:
        faults.fault_point(phase, 10**6, 0)


def test_fault_point_fires_once_on_matching_rank_phase_and_later_step():
    faults.reset("rank=2,step=5,phase=eval,kind=exception")
    try:
        faults.fault_point("eval", 9, 1)       # other rank
        faults.fault_point("forward", 9, 2)    # other phase
        faults.fault_point("eval", 4, 2)       # too early
        with pytest.raises(faults.FaultInjected, match="rank 2 in phase eval at step 7"):
            faults.fault_point("eval", 7, 2)   # first eval at or after step 5
        faults.fault_point("eval", 8, 2)       # fired already: no second failure
    finally:
        faults.reset("")


def test_fault_oom_raises_memory_error():
    faults.reset("rank=0,phase=backward,kind=oom")
    try:
        with pytest.raises(MemoryError, match="injected out-of-memory on rank 0"):
            faults.fault_point("backward", 0, 0)
    finally:
        faults.reset("")


# --- guards -------------------------------------------------------------------------------

def test_first_nonfinite_names_the_tensor_and_kind():
    ok = torch.ones(4)
    nan = torch.tensor([1.0, float("nan")])
    both = torch.tensor([float("inf"), float("nan")])
    assert first_nonfinite([("a", ok), ("b", None)]) is None
    assert first_nonfinite([("a", ok), ("w", nan)]) == ("w", "NaN")
    assert first_nonfinite([("x", torch.tensor([-float("inf")]))]) == ("x", "Inf")
    assert first_nonfinite([("y", both)]) == ("y", "NaN and Inf")
    # finite float32 values near the max must not be mistaken for an overflow
    big = torch.full((1000,), 3e38, dtype=torch.float32)
    assert first_nonfinite([("big", big)]) is None


def test_guard_stop_reports_step_stage_tensor(capsys):
    g = FiniteGuard("stop", rank=3, stage=1)
    assert g.check(6, "gradient", [("0.weight", torch.zeros(2))])
    assert not g.check(7, "gradient", [("0.weight", torch.zeros(2)),
                                       ("2.bias", torch.tensor([float("inf")]))])
    assert g.pending_step == 7
    err = g.error(g.pending)
    assert isinstance(err, NonFiniteError)
    assert ("non-finite gradient (Inf) at step 7, stage 1 (rank 3), tensor '2.bias'"
            in str(err))
    assert "--on-nonfinite skip" in str(err)
    assert "stopping all ranks" in capsys.readouterr().err


def test_guard_read_a_step_late_reports_the_step_and_tensor_it_was_found_at(capsys):
    # a device behind the host: no read at the update; the next update (or resolve_late)
    # reads the earlier step's flag and reports that step and tensor
    g = FiniteGuard("stop", rank=3, stage=1)
    grad = torch.tensor([1.0, float("nan")])
    assert g.check_late(7, "gradient", [("0.weight", torch.zeros(2)), ("2.bias", grad)])
    assert g.pending is None                      # not read yet: the update went ahead
    grad.zero_()                                  # the next step's gradient, finite
    assert g.check_late(8, "gradient", [("0.weight", torch.zeros(2)), ("2.bias", grad)])
    assert g.pending_step == 7
    assert "non-finite gradient (NaN) at step 7, stage 1 (rank 3), tensor '2.bias'" in g.pending
    g.resolve_late()                              # step 8 was finite: the first report stays
    assert g.pending_step == 7 and "stopping all ranks" in capsys.readouterr().err
    inf = FiniteGuard("stop", rank=0, stage=0)
    inf.check_late(2, "gradient", [("w", torch.tensor([float("inf")]))])
    inf.resolve_late()
    assert "(Inf) at step 2" in inf.pending
    with pytest.raises(ValueError, match="check_late is for policy stop"):
        FiniteGuard("skip", 0, 0).check_late(1, "gradient", [])


def test_guard_skip_counts_updates_and_only_reports_losses(capsys):
    g = FiniteGuard("skip", rank=0, stage=0)
    # regression: a non-finite loss was counted as a skipped update and said "skipping this
    # update", then its gradients were counted again (or, finite, applied after all)
    assert not g.check(2, "loss", [("loss", torch.tensor(float("nan")))], update=False)
    assert g.skipped == 0 and g.pending is None
    assert ("non-finite loss (NaN) at step 2, stage 0 (rank 0), tensor 'loss': updates with "
            "non-finite gradients are skipped (--on-nonfinite skip; 0 skipped on this rank)") \
        in capsys.readouterr().err
    assert not g.check(2, "gradient", [("0.weight", torch.tensor(float("nan")))])
    assert g.skipped == 1
    assert ("tensor '0.weight': skipping this update (--on-nonfinite skip; 1 skipped on this rank)"
            in capsys.readouterr().err)
    for step in range(3, 200):
        g.check(step, "gradient", [("0.weight", torch.tensor(float("inf")))])
    assert capsys.readouterr().err.count("skipping") == 4 + 1     # counts 2..5 and the 100th


def test_guard_rejects_unknown_policy():
    with pytest.raises(ValueError, match=r"on_nonfinite='ignore': choose from \('stop', 'skip'\)"):
        FiniteGuard("ignore", 0, 0)


# --- preemption ---------------------------------------------------------------------------

def test_preemption_handler_sets_flag_only_and_restores():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as h:
        assert not h.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)     # a second signal keeps the first
        assert h.requested and signal_name(h.signum) == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before


def test_rank_label_follows_grid_layout():
    from dpsgs.comm.grid import Grid

    assert Grid(2, 2).label(3) == "rank 3 (replica 1, stage 1)"
    assert Grid(3, 1).label(2) == "rank 2 (replica 0, stage 2)"


# --- rank map -----------------------------------------------------------------------------

class _FakeComm:
    def __init__(self, pids):
        self.pids = pids

    def allgather(self, mine):
        return [("node1", p) for p in self.pids]

    def Get_rank(self):
        return 0


def test_rank_map_line_maps_a_launcher_pid_to_the_rank(capsys):
    from dpsgs.reliability.rank_map import announce_ranks, parse_rank_map

    from dpsgs.comm.grid import Grid

    announce_ranks(_FakeComm([100, 101, 102, 103]), Grid(2, 2))
    line = capsys.readouterr().err
    assert line.startswith("dpsgs ranks: 0=s0r0@node1:100 1=s1r0@node1:101 2=s0r1@node1:102")
    log = "noise\n" + line + "=   PID 102 RUNNING AT node1\n"
    assert parse_rank_map(log)[102] == 2
    assert parse_rank_map("no map here") == {}


# --- cutting a running segment (preemption) ------------------------------------------------

@pytest.mark.parametrize("stages, overlap", [(2, "backward"), (3, "backward"), (3, "step")])
def test_cut_plan_turns_the_rest_into_the_flush_of_admitted_batches(stages, overlap):
    from dpsgs.pipeline.schedule import cut_plan, fdg_plan

    plan = fdg_plan(stages, 8, overlap)
    seg = [(0, b) for b in range(8)]
    executed = [list(r) for r in plan[:5]]
    assert cut_plan(plan, seg, 5, overlap)
    assert plan == fdg_plan(stages, 5, overlap) and plan[:5] == executed
    assert seg == [(0, b) for b in range(5)]
    # every admitted batch is still applied on every stage; nothing after batch 4 enters
    for k in range(stages):
        assert sorted(r[k].apply for r in plan if r[k].apply is not None) == list(range(5))
        assert all(r[k].forward is None or r[k].forward < 5 for r in plan)
    # in the flush already (all 5 admitted): nothing to cut
    assert not cut_plan(plan, seg, 5, overlap)
