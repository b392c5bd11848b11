"""Fault injection for tests: make one rank die or hang at a chosen phase and step.

Set `DPSGS_FAULT="rank=1,step=7,phase=forward,kind=sigkill"` in the environment of an
`mpirun` launch; the trainer calls `fault_point(phase, step, rank)` at each phase boundary
and the named rank fails there. Unset (the normal case), `fault_point` returns at once.

Matching: the fault fires once, at the first call on `rank` whose phase equals `phase` and
whose step is >= `step` (phases such as `save` or `eval` happen only at some steps, so a
random step still lands on the next occurrence). `step` may be omitted (= 0).

Kinds: `sigkill` (the process vanishes, as on an OOM kill), `exception` (a Python error
escapes, as on a bug), `oom` (MemoryError), `exit` (os._exit without MPI_Finalize),
`hang` (the rank stops answering; its peers must time out) and `sigterm` (this one rank
receives a preemption signal and carries on: a deterministic preemption test). Before
failing, the rank prints one line to stderr naming itself, so a test log always says which
rank was the culprit.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ENV_VAR", "PHASES", "KINDS", "Fault", "FaultInjected", "parse_fault",
           "active_fault", "fault_point", "reset", "instrument"]

ENV_VAR = "DPSGS_FAULT"
# Phase boundaries the trainer marks. `warmup` is marked at the top of each step while the
# pipeline fills, so a warm-up fault hits before the first update of every stage.
PHASES = ("warmup", "forward", "backward", "reduce", "flush", "eval", "save")
KINDS = ("sigkill", "exception", "oom", "exit", "hang", "sigterm")
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


def instrument(worker: Any, rank: int, stages: int) -> None:
    """Put fault points at the phase boundaries of a dpsgs.pipeline.executor.StageWorker, from outside.

    Does nothing (the worker is untouched: zero cost) unless a fault is set for `rank`.
    Otherwise wraps, on this one instance: run_fdg/run_sync (to know the global step and,
    at the top of each step, whether the pipeline is filling — `warmup`, the first 2K-2
    steps of a segment — or draining — `flush`, the steps after its last batch entered),
    the stage's forward and backward, `_apply` (wait for the all-reduce, then update:
    `reduce`) and `evaluate` (`eval`). `save` is marked inside dpsgs.job.checkpoint.
    """
    f = _fault
    if f is None or f.rank != rank:
        return
    now = {"step": 0}

    def at(phase: str) -> None:
        fault_point(phase, now["step"], rank)

    def wrap(obj: Any, name: str, before: Callable[[], None]) -> None:
        inner = getattr(obj, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            before()
            return inner(*args, **kwargs)
        setattr(obj, name, wrapped)

    def top_of_step(step: int, step0: int, batches: int, steps: int) -> None:
        now["step"] = step
        if step - step0 < 2 * stages - 2:
            at("warmup")
        if step - step0 >= batches and step < step0 + steps:
            at("flush")

    def run(name: str) -> None:
        inner = getattr(worker, name)

        def wrapped(plan_or_seg: Any, *args: Any, **kwargs: Any) -> Any:
            if name == "run_fdg":
                seg, step0, on_step = args[0], args[1], (args[2] if len(args) > 2 else
                                                         kwargs.pop("on_step", None))
                args = args[:2]
                steps = len(plan_or_seg)
            else:
                seg, step0, on_step = plan_or_seg, args[0], (args[1] if len(args) > 1 else
                                                             kwargs.pop("on_step", None))
                args = args[:1]
                steps = len(seg)

            def tick(step: int) -> None:
                if on_step is not None:
                    on_step(step)
                top_of_step(step + 1, step0, len(seg), steps)

            top_of_step(step0, step0, len(seg), steps)
            return inner(plan_or_seg, *args, on_step=tick, **kwargs)
        setattr(worker, name, wrapped)

    run("run_fdg")
    run("run_sync")
    wrap(worker.compute, "forward", lambda: at("forward"))
    wrap(worker.compute, "backward", lambda: at("backward"))
    wrap(worker, "_apply", lambda: at("reduce"))
    wrap(worker, "evaluate", lambda: at("eval"))
