"""A training job that owns its process (the CLI's `python -m dpsgs train`), from the first
moment to the last: signals, one line per error, a bounded end.

- The preemption handler is installed before MPI and torch load, so a SIGTERM in the first
  seconds takes the clean path (stop at the first agreed step, checkpoint, exit 0).
- Errors follow dpsgs.job.failure: one line, the traceback in RUN_DIR/logs/. Ctrl-C prints
  one line (rank 0) and ends the job at once, without tracebacks.
- The job ends with an agreement under a deadline (a vote that names any rank that does not
  come) and aborts rather than wait; MPI_Finalize then runs with a watchdog, so a rank that
  dies at the very end cannot leave the others in MPI_Finalize past the timeout.
Embedded use (dpsgs.train with the caller's communicator) does none of this: the caller owns
MPI's lifecycle (DESIGN §2).
"""

from __future__ import annotations

import os
import sys
import threading
import time
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


def run_job(config: TrainConfig, default_run_dir: Any) -> tuple[int, dict[str, Any] | None]:
    """Run the job on COMM_WORLD in this process; (exit code, summary on success)."""
    install_early()
    from mpi4py import MPI

    from dpsgs.job.trainer import train
    from dpsgs.reliability.votes import StepVote, VoteTimeout

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    try:
        config.run_dir = config.run_dir or default_run_dir(comm)
        # made now, while every rank is here: the end-of-job vote must not need a collective
        closing = StepVote(comm, 1, config.timeout, config.warn_after)
        summary = train(config, comm)
        fault_point("end", 0, rank)
        closing.vote(-1, [0], "end-of-job agreement")
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
        _finalize(comm, config.timeout)
        return 1, None
    _finalize(comm, config.timeout)
    return 0, summary


def _finalize(comm: Any, timeout: float) -> None:
    """Shut the core's progress threads down and finalize MPI now, under a watchdog."""
    from mpi4py import MPI

    from dpsgs import _C

    def hung() -> None:
        print(f"dpsgs: rank {comm.Get_rank()}: MPI_Finalize did not return within {timeout:.0f} s "
              "(a peer is gone); exiting", file=sys.stderr, flush=True)
        os._exit(1)

    watchdog = threading.Timer(timeout, hung)
    watchdog.daemon = True
    watchdog.start()
    _C._shutdown()
    MPI.Finalize()
    watchdog.cancel()
