"""A training job that owns its process (the CLI's `python -m dpsgs train`), from the first
moment to the last: signals, one line per error, a bounded end.

- The preemption handler is installed before MPI and torch load, so a SIGTERM in the first
  seconds takes the clean path (stop at the first agreed step, checkpoint, exit 0). If the
  job has not ended --stop-grace seconds after the signal (a rank is stopped or stuck), a
  watchdog ends it, naming the ranks that do not answer (dpsgs.reliability.stop_deadline).
- Errors follow dpsgs.job.failure: one line, the traceback in RUN_DIR/logs/. Ctrl-C prints
  one line (rank 0) and ends the job at once, without tracebacks.
- The job ends with an agreement under a deadline (a vote that names any rank that does not
  come) and aborts rather than wait; rank 0 reports the results; a second vote checks that
  every rank came to MPI_Finalize, and a rank that stopped or died in between is named and
  the job aborted (MPI_Abort ends a stopped process too; exit 0 when the results are
  complete). MPI_Finalize itself runs under a watchdog for the moment left after that vote
  (docs/reliability.md).
Embedded use (dpsgs.train with the caller's communicator) does none of this: the caller owns
MPI's lifecycle (DESIGN §2).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from dpsgs.comm.abort import abort_job
from dpsgs.config import TrainConfig
from dpsgs.reliability.faults import fault_point
from dpsgs.reliability.preemption import install_early

_INTERRUPT_GRACE_S = 2.0

__all__ = ["launcher_rank", "run_job"]


def launcher_rank() -> int:
    """This process's rank as the launcher set it (hydra, Open MPI, PMIx, Slurm), known before
    MPI starts; 0 outside a launcher."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def run_job(config: TrainConfig, default_run_dir: Any,
            report: Callable[[dict[str, Any]], None] | None = None) -> tuple[int, dict[str, Any] | None]:
    """Run the job on COMM_WORLD in this process; (exit code, summary on success). `report`
    is called on rank 0 with the summary once every rank has agreed that the job ended, before
    MPI_Finalize (which a peer stopped at the very end would hold)."""
    handler = install_early()
    from mpi4py import MPI

    from dpsgs.job.trainer import train
    from dpsgs.reliability.stop_deadline import StopDeadline
    from dpsgs.reliability.votes import StepVote, VoteTimeout

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    deadline: StopDeadline | None = None
    closing: StepVote | None = None
    try:
        config.run_dir = config.run_dir or default_run_dir(comm)
        # made now, while every rank is here: the end-of-job vote must not need a collective
        label = _labels(config, comm)
        closing = StepVote(comm, 1, config.timeout, config.warn_after, label=label)
        deadline = StopDeadline(comm, handler, config.stop_grace, label=label,
                                last_checkpoint=lambda: _newest_checkpoint(config.run_dir)).start()
        summary = train(config, comm)
        fault_point("end", 0, rank)
        closing.vote(-1, [0], "end-of-job agreement")
        if report is not None and rank == 0:
            report(summary)
        fault_point("finalize", 0, rank)
    except KeyboardInterrupt:
        if rank == 0:
            print("dpsgs: interrupted (Ctrl-C): the job ends now, without a checkpoint "
                  "(SIGTERM or SIGUSR1 stop it cleanly)", file=sys.stderr, flush=True)
        elif comm.Get_size() > 1:
            # mpirun interrupts every rank: rank 0 says so and ends the job; the others end
            # it themselves only if rank 0 cannot (an abort of theirs first lost its line)
            try:
                time.sleep(_INTERRUPT_GRACE_S)
            except KeyboardInterrupt:
                pass
        abort_job(130) if comm.Get_size() > 1 else os._exit(130)
    except VoteTimeout as e:
        print(f"dpsgs: {e}", file=sys.stderr, flush=True)
        abort_job(1)
    except Exception:  # noqa: BLE001 - train() has reported it, and aborted unless all ranks raise it
        _finalize(comm, config.timeout, deadline, closing)
        return 1, None
    _finalize(comm, config.timeout, deadline, closing, done=True)
    return 0, summary


def _labels(config: TrainConfig, comm: Any) -> Any:
    """How the stop deadline names a rank: with its place in the grid where the world fits it."""
    from dpsgs.comm.grid import Grid

    try:
        grid = Grid(config.stages, config.replicas)
        grid.check_world(comm.Get_size())
    except ValueError:
        return lambda r: f"rank {r}"
    return grid.label


def _newest_checkpoint(run_dir: str | None) -> str | None:
    from dpsgs.job.checkpoint import committed_checkpoints

    found = committed_checkpoints(run_dir) if run_dir else []
    return str(found[-1]) if found else None


def _finalize(comm: Any, timeout: float, deadline: Any = None, arrival: Any = None,
              done: bool = False) -> None:
    """Shut the core's progress threads down and finalize MPI, with a bounded end.

    MPI_Finalize waits for every rank; one stopped at the very end would hold this rank in it
    forever. So the ranks first vote, under `timeout`, that they all came (`arrival`, a
    StepVote); a rank that does not come is named and the job aborted: MPI_Abort ends every
    process, a stopped one too, with exit code 0 when `done` (every rank agreed that the job
    ended: its results are complete and reported), else 1. (Exiting without MPI_Finalize and
    leaving the rest to mpirun is not enough: MPICH 5.0.2's hydra sometimes reaps the exited
    rank before it reads the end of its PMI socket, and then kills no one.)
    A rank stopped between that vote and MPI_Finalize is left to a watchdog, which ends this
    rank after `timeout` (exit 0 when `done`). Rank 0 speaks; the others give it
    _INTERRUPT_GRACE_S to, and speak only if it cannot (it may be the stopped one)."""
    from dpsgs import _C

    if deadline is not None:     # its thread uses MPI: it ends before MPI does
        deadline.stop()
    rank = comm.Get_rank()       # not in hung(): MPI is being finalized then
    complete = "; the job's results are complete" if done else ""
    if arrival is not None:
        try:
            arrival.vote(-2, [0], "arrival at MPI_Finalize")
        except Exception as e:   # noqa: BLE001 - VoteTimeout, or ranks at different votes
            print(f"dpsgs: {e}{complete}; ending the job (exit {0 if done else 1})", file=sys.stderr,
                  flush=True)
            abort_job(0 if done else 1)
    fault_point("mpi_finalize", 0, rank)

    def hung() -> None:
        if rank != 0:
            time.sleep(_INTERRUPT_GRACE_S)
        print(f"dpsgs: rank {rank}: MPI_Finalize did not return within {timeout:g} s (a peer is "
              f"gone or stopped){complete}; exiting", file=sys.stderr, flush=True)
        os._exit(0 if done else 1)

    watchdog = threading.Timer(timeout, hung)
    watchdog.daemon = True
    watchdog.start()
    _C._shutdown()
    _C._shutdown_torch_backend()   # mpi://'s store server and "dpsgs" engines (--transport torch)
    _C.finalize_mpi()       # with the GIL released (mpi4py's Finalize holds it): the watchdog runs
    watchdog.cancel()
