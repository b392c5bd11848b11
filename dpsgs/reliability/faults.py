"""Fault injection for tests: make one rank die or hang at a chosen phase and step.

Set `DPSGS_FAULT="rank=1,step=7,phase=forward,kind=sigkill"` in the environment of an
`mpirun` launch; the named rank's step executor gets FaultHooks, which call
`fault_point(phase, step, rank)` at each phase boundary, and the rank fails there. Unset
(the normal case), no fault code runs at all.

Matching: the fault fires once, at the first call on `rank` whose phase equals `phase` and
whose step is >= `step` (phases such as `save` or `eval` happen only at some steps, so a
random step still lands on the next occurrence). `step` may be omitted (= 0).

Kinds: `sigkill` (the process vanishes, as on an OOM kill), `exception` (a Python error
escapes, as on a bug), `oom` (MemoryError), `exit` (os._exit without MPI_Finalize),
`hang` (the calling thread stops answering; its peers must time out), `stop` (the whole
process is stopped, as by `kill -STOP` or a node that freezes: not even its signal handlers
or other threads run until a SIGCONT) and `sigterm` (this one rank receives a preemption
signal and carries on: a deterministic preemption test). Before failing, the rank prints
one line to stderr naming itself, so a test log always says which rank was the culprit.

Phase `metrics` is marked on the writer thread of a rank's metrics files before each line
(dpsgs.job.metrics_log), with the line's step: `hang` there is a frozen file system.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from dpsgs.pipeline.hooks import StepHooks

__all__ = ["ENV_VAR", "PHASES", "KINDS", "Fault", "FaultHooks", "FaultInjected", "parse_fault",
           "active_fault", "fault_hooks", "fault_point", "fault_callback", "reset"]

ENV_VAR = "DPSGS_FAULT"
# Phase boundaries the trainer marks. `warmup` is marked at the top of each step while the
# pipeline fills, so a warm-up fault hits before the first update of every stage; `end` after
# training, before the CLI's end-of-job agreement (step 0); `finalize` after that agreement,
# before the vote that every rank came to MPI_Finalize (step 0); `mpi_finalize` after that
# vote, right before MPI_Finalize (step 0).
PHASES = ("warmup", "forward", "backward", "reduce", "flush", "eval", "save", "end", "finalize",
          "mpi_finalize", "metrics")
KINDS = ("sigkill", "exception", "oom", "exit", "hang", "stop", "sigterm")
EXIT_CODE = 17          # kind=exit: distinctive, so logs tell it from a crash


class FaultInjected(RuntimeError):
    """The deliberate failure raised by kind=exception."""


@dataclass(frozen=True)
class Fault:
    rank: int
    phase: str
    kind: str
    step: int = 0

    def describe(self) -> str:
        return f"rank={self.rank},step={self.step},phase={self.phase},kind={self.kind}"


def parse_fault(spec: str) -> Fault:
    """Parse `rank=R,step=S,phase=P,kind=K`; ValueError names the bad field and the choices."""
    fields: dict[str, str] = {}
    for item in (p.strip() for p in spec.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{ENV_VAR}={spec!r}: item {item!r} is not key=value")
        fields[key.strip()] = value.strip()
    unknown = sorted(set(fields) - {"rank", "step", "phase", "kind"})
    if unknown:
        raise ValueError(f"{ENV_VAR}={spec!r}: unknown keys {unknown}; "
                         "expected rank, step, phase, kind")
    for key in ("rank", "phase", "kind"):
        if key not in fields:
            raise ValueError(f"{ENV_VAR}={spec!r}: missing {key}=")
    phase, kind = fields["phase"], fields["kind"]
    if phase not in PHASES:
        raise ValueError(f"{ENV_VAR}={spec!r}: unknown phase {phase!r}; choose from {PHASES}")
    if kind not in KINDS:
        raise ValueError(f"{ENV_VAR}={spec!r}: unknown kind {kind!r}; choose from {KINDS}")
    try:
        rank, step = int(fields["rank"]), int(fields.get("step", "0"))
    except ValueError:
        raise ValueError(f"{ENV_VAR}={spec!r}: rank and step must be integers") from None
    if rank < 0 or step < 0:
        raise ValueError(f"{ENV_VAR}={spec!r}: rank and step must be >= 0")
    return Fault(rank=rank, phase=phase, kind=kind, step=step)


def _from_env() -> Fault | None:
    spec = os.environ.get(ENV_VAR, "").strip()
    return parse_fault(spec) if spec else None


# Parsed once at import: a malformed spec fails the run at start, not at the fault.
_fault: Fault | None = _from_env()
_fired = False


def active_fault() -> Fault | None:
    return _fault


def reset(spec: str | None = None) -> None:
    """Re-read the fault (from `spec`, else the environment); for in-process tests."""
    global _fault, _fired
    _fault = parse_fault(spec) if spec else _from_env()
    _fired = False


def fault_point(phase: str, step: int, rank: int) -> None:
    """Mark a phase boundary; fails here if the configured fault matches. Zero cost unset."""
    global _fired
    f = _fault
    if f is None or _fired or rank != f.rank or phase != f.phase or step < f.step:
        return
    _fired = True
    print(f"dpsgs: injected fault on rank {rank}: kind={f.kind} in phase {phase} at step "
          f"{step} ({ENV_VAR}={f.describe()}; wall {time.time():.3f})",
          file=sys.stderr, flush=True)
    if f.kind == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)    # the handler (dpsgs.reliability.preemption) sets a flag
        return
    if f.kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)    # every thread stops here until a SIGCONT
        return
    if f.kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)      # the signal is asynchronous; never return into the trainer
    elif f.kind == "exit":
        os._exit(EXIT_CODE)
    elif f.kind == "oom":
        raise MemoryError(f"injected out-of-memory on rank {rank} in phase {phase} "
                          f"at step {step}")
    elif f.kind == "exception":
        raise FaultInjected(f"injected exception on rank {rank} in phase {phase} "
                            f"at step {step}")
    else:   # hang: stay alive but silent; peers must detect it with their own deadline
        while True:
            time.sleep(3600)


class FaultHooks(StepHooks):
    """Step hooks that put fault points at the executor's phase boundaries (warmup, flush,
    forward, backward, reduce, eval) for one rank; `save` is marked in dpsgs.job.checkpoint."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def phase(self, name: str, step: int) -> None:
        fault_point(name, step, self.rank)


def fault_hooks(rank: int) -> FaultHooks | None:
    """FaultHooks when a fault is set for `rank`, else None: unset, the executor runs no
    fault code at all."""
    f = _fault
    return FaultHooks(rank) if f is not None and f.rank == rank else None


def fault_callback(phase: str, rank: int) -> Callable[[int], None] | None:
    """`step -> fault_point(phase, step, rank)` when the fault names this rank and phase, else
    None (for seams that take a callback, such as the metrics writer's)."""
    f = _fault
    if f is None or f.rank != rank or f.phase != phase:
        return None
    return lambda step: fault_point(phase, step, rank)
