"""NaN/Inf guard: find the first non-finite loss or gradient and report step, stage, tensor."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch

__all__ = ["POLICIES", "NonFiniteError", "first_nonfinite", "FiniteGuard"]

POLICIES = ("stop", "skip")


class NonFiniteError(FloatingPointError):
    """Training stopped because a loss or gradient was NaN or Inf (policy `stop`)."""


def _kind(t: torch.Tensor) -> str:
    nan, inf = bool(torch.isnan(t).any()), bool(torch.isinf(t).any())
    return "NaN and Inf" if nan and inf else ("NaN" if nan else "Inf")


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor | None]]) -> tuple[str, str] | None:
    """(name, "NaN" | "Inf" | "NaN and Inf") of the first tensor holding a non-finite value.

    Fast path: one float64 sum per tensor and a single finiteness test of the total (NaN and
    Inf survive a sum; float64 keeps finite float32 values from overflowing to Inf), so a
    healthy step costs one host sync. Only when the total is non-finite are tensors scanned.
    """
    tensors = [(n, t) for n, t in named if t is not None and t.is_floating_point()]
    if not tensors:
        return None
    total = torch.stack([t.detach().sum(dtype=torch.float64) for _, t in tensors]).sum()
    if bool(torch.isfinite(total)):
        return None
    for name, t in tensors:
        if not bool(torch.isfinite(t.detach()).all()):
            return name, _kind(t.detach())
    return None


class FiniteGuard:
    """Per-rank guard. `check` reports a non-finite value once per step and returns False.

    Policy `skip`: the caller skips this optimizer update. Gradients are checked after the
    all-reduce, when every replica of a stage holds the same values, so the replicas of a
    stage skip together without extra communication; a NaN loss makes NaN input-gradients,
    so earlier stages skip that batch at their own (later) step. Policy `stop`: the report is
    kept in `pending` until the step-boundary vote (dpsgs.reliability.votes) stops every rank together.
    """

    def __init__(self, policy: str, rank: int, stage: int) -> None:
        if policy not in POLICIES:
            raise ValueError(f"on_nonfinite={policy!r}: choose from {POLICIES}")
        self.policy, self.rank, self.stage = policy, rank, stage
        self.pending: str | None = None      # first report not yet acted on (policy stop)
        self.pending_step = -1               # the step it was found at
        self.pending_what = ""               # its kind of tensor ("loss", "gradient", ...)
        self.skipped = 0                     # updates skipped so far (policy skip)
        self._reported = 0                   # loss reports printed (policy skip)
        self._late: tuple[int, str, list[str], torch.Tensor] | None = None   # check_late's

    def check(self, step: int, what: str, named: Iterable[tuple[str, torch.Tensor | None]],
              update: bool = True) -> bool:
        """True when every tensor is finite; otherwise print a report and return False.
        `what` names the kind of tensor ("loss", "gradient", "activation"); `update`: the
        caller skips an update on False (policy skip counts it), else it only reports."""
        found = first_nonfinite(named)
        if found is None:
            return True
        return self._found(step, what, *found, update)

    def check_late(self, step: int, what: str, named: Iterable[tuple[str, torch.Tensor | None]]) -> bool:
        """Policy stop on a device that runs behind the host: no host read now. One float64
        sum per tensor is queued on the device and read at the next call (or `resolve_late`),
        a step later, when it has long been computed; a non-finite one is reported then with
        this step and tensor (its kind from the sum: an Inf and a -Inf read as NaN). The
        update goes ahead (True): the run stops at the vote anyway, without a checkpoint."""
        if self.policy != "stop":
            raise ValueError("check_late is for policy stop: skip must decide before the update")
        self.resolve_late()
        tensors = [(n, t) for n, t in named if t is not None and t.is_floating_point()]
        if tensors:
            sums = torch.stack([t.detach().sum(dtype=torch.float64) for _, t in tensors])
            self._late = (step, what, [n for n, _ in tensors], sums)
        return True

    def resolve_late(self) -> None:
        """Read the flag check_late left (one host read), reporting what it found."""
        late, self._late = self._late, None
        if late is None:
            return
        step, what, names, sums = late
        sums = sums.cpu()
        bad = (~torch.isfinite(sums)).nonzero()
        if len(bad):
            i = int(bad[0])
            self._found(step, what, names[i], "NaN" if bool(torch.isnan(sums[i])) else "Inf", update=False)

    def _found(self, step: int, what: str, name: str, kind: str, update: bool) -> bool:
        report = (f"non-finite {what} ({kind}) at step {step}, stage {self.stage} "
                  f"(rank {self.rank}), tensor '{name}'")
        if self.policy == "skip":
            if update:
                self.skipped += 1
                shown, action = self.skipped, "skipping this update"
            else:
                self._reported += 1
                shown, action = self._reported, "updates with non-finite gradients are skipped"
            # the first few, then every 100th: a diverged run must not flood the log
            if shown <= 5 or shown % 100 == 0:
                print(f"dpsgs: {report}: {action} (--on-nonfinite skip; {self.skipped} skipped "
                      "on this rank)", file=sys.stderr, flush=True)
        elif self.pending is None:
            self.pending, self.pending_step, self.pending_what = report, step, what
            print(f"dpsgs: {report}: stopping all ranks (--on-nonfinite stop)",
                  file=sys.stderr, flush=True)
        return False

    def error(self, report: str) -> NonFiniteError:
        """The error every rank raises after the vote: `report` is the first culprit's."""
        return NonFiniteError(f"{report}; training stopped (use --on-nonfinite skip to skip such updates)")
