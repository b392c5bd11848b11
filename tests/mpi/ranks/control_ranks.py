"""Rank program for dpsgs.reliability.votes / preempt / guards: `control_ranks.py MODE`.

Modes: vote (element-wise max), preempt (one rank signals itself; all stop at that step;
preempt-lagged: all stop at the same step, 2(K+1) steps later),
nonfinite (one rank sees NaN; all raise at that step), late-before-checkpoint (a NaN update
read a step late is caught by the check before a checkpoint), stall (one rank hangs; the others
print a stall report, then time out naming it and abort the job).
"""

import os
import signal
import sys
import time

import torch
from mpi4py import MPI

from dpsgs.comm.abort import abort_job
from dpsgs.comm.grid import Grid
from dpsgs.reliability.votes import StepVote, VoteTimeout
from dpsgs.reliability.step_control import StepControl
from dpsgs.reliability.guards import NonFiniteError

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
mode = sys.argv[1]
stages = int(sys.argv[2]) if len(sys.argv) > 2 else size
grid = Grid(stages, -(-size // stages))   # labels only: the vote needs no full grid
ok = True

if mode == "vote":
    v = StepVote(comm, 2, timeout=20)
    for step in range(5):
        got = v.vote(step, [rank * step, size - rank])
        ok &= got == [(size - 1) * step, size]
    v.free()
elif mode in ("preempt", "preempt-lagged"):
    lag = 0 if mode == "preempt" else None      # None: the trainer's default, K+1 steps
    ctl = StepControl(comm, grid=grid, rank=rank, timeout=20, lag=lag)
    stopped = None
    for step in range(50):
        if rank == size - 1 and step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        stopped = ctl.end_of_step(step)
        if stopped:
            break
    ctl.close()
    print(f"rank {rank} stopped at step {step} by {stopped}", flush=True)
    ok &= stopped == "SIGUSR1" and step == 3 + 2 * ctl.lag
elif mode == "nonfinite":
    # the last rank finds a NaN loss at step 2; its effect reaches rank 0's gradient at
    # step 3, before the lagged vote (lag 1) decides at step 4: every rank names the origin
    ctl = StepControl(comm, grid=grid, rank=rank, timeout=20, on_nonfinite="stop", lag=1)
    err = None
    try:
        for step in range(10):
            t = torch.ones(3)
            if (rank, step) in ((size - 1, 2), (0, 3)):
                t[1] = float("nan")
            ctl.guard.check(step, "loss" if rank else "gradient", [("loss" if rank else "0.weight", t)])
            ctl.end_of_step(step)
    except NonFiniteError as e:
        err = str(e)
    ctl.close()
    print(f"rank {rank} step {step}: {err}", flush=True)
    ok &= err is not None and step == 4
elif mode == "late-before-checkpoint":
    # a device's guard reads its flag a step late, so the update of step 2 (NaN on the last
    # rank) went ahead; the check before a checkpoint at step 2 stops every rank at once,
    # naming it, long before the lagged vote would have (and before the checkpoint is written)
    ctl = StepControl(comm, grid=grid, rank=rank, timeout=20, on_nonfinite="stop", late_guard=True)
    err, applied = None, []
    try:
        for step in range(3):
            g = torch.ones(3)
            if (rank, step) == (size - 1, 2):
                g[0] = float("nan")
            applied.append(ctl.update_ok(step, [("0.weight", g)]))
            ctl.end_of_step(step)
        ctl.before_checkpoint(2)
    except NonFiniteError as e:
        err = str(e)
    ctl.close()
    print(f"rank {rank}: applied {applied}: {err}", flush=True)
    ok &= err is not None and applied == [True, True, True]
elif mode == "stall":
    ctl = StepControl(comm, grid=grid, rank=rank, timeout=3, warn_after=1, lag=0)
    for step in range(10):
        if rank == 1 and step == 2:
            time.sleep(3600)        # a rank that stops answering
        try:
            ctl.end_of_step(step)
        except VoteTimeout as e:
            print(f"dpsgs: {e}", file=sys.stderr, flush=True)
            abort_job(3)            # what the CLI does with any error: end the whole job
else:
    raise SystemExit(f"unknown mode {mode}")

ok = comm.allreduce(bool(ok), op=MPI.LAND)
if rank == 0:
    print("PASS" if ok else "FAIL", flush=True)
sys.exit(0 if ok else 1)
