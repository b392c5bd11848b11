"""StepHooks: the named points where code outside the pipeline runs inside a step.

The step executor calls its hooks object at fixed points; the default does nothing. Step
control (votes, plan cutting, the NaN/Inf guard), fault injection and metrics are
implementations (dpsgs.reliability, dpsgs.job); `HookChain` runs several in order. A reader
of dpsgs/pipeline/executor.py sees every call site; nothing patches the executor.

Points, in the order a step meets them:
- phase(name, step): a phase boundary. Names: "warmup" / "flush" (top of a step while the
  pipeline fills / drains), "forward", "backward", "reduce" (before waiting for the
  all-reduce and updating), "eval" (before a pipelined evaluation).
- loss(step, batch, loss, correct, count): the last stage computed a loss.
- update_ok(step, named_grads) -> bool: just before the optimizer step, with the averaged
  gradients; False skips this update.
- updated(stage, batch, staleness): an update was applied; staleness = steps since the
  forward of that batch through this stage.
- step_done(step) -> bool: the step is over; True asks the executor to stop admitting
  batches (it then flushes what is in flight and returns).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:      # the hooks load without torch: the CLI installs signal handlers first
    import torch

__all__ = ["StepHooks", "HookChain", "Spans", "NoSpans"]


class StepHooks:
    """No-op hooks; subclass and override the points you need."""

    def phase(self, name: str, step: int) -> None:
        return None

    def loss(self, step: int, batch: int, loss: float, correct: int, count: int) -> None:
        return None

    def update_ok(self, step: int, named_grads: Iterable[tuple[str, torch.Tensor | None]]) -> bool:
        return True

    def updated(self, stage: int, batch: int, staleness: int) -> None:
        return None

    def step_done(self, step: int) -> bool:
        return False


class HookChain(StepHooks):
    """Runs several hooks in order: every one sees every point; update_ok is the AND of all
    answers and step_done the OR (each hook still runs)."""

    def __init__(self, *hooks: StepHooks) -> None:
        self.hooks = [h for h in hooks if h is not None]

    def phase(self, name: str, step: int) -> None:
        for h in self.hooks:
            h.phase(name, step)

    def loss(self, step: int, batch: int, loss: float, correct: int, count: int) -> None:
        for h in self.hooks:
            h.loss(step, batch, loss, correct, count)

    def update_ok(self, step: int, named_grads: Iterable[tuple[str, torch.Tensor | None]]) -> bool:
        named = list(named_grads)
        return all([h.update_ok(step, named) for h in self.hooks])

    def updated(self, stage: int, batch: int, staleness: int) -> None:
        for h in self.hooks:
            h.updated(stage, batch, staleness)

    def step_done(self, step: int) -> bool:
        return any([h.step_done(step) for h in self.hooks])


class Spans:
    """Where the executor's time goes: span(name, category) times a block (compute,
    channel, reduce). The job's Timeline implements it; NoSpans does nothing."""

    def span(self, name: str, category: str) -> AbstractContextManager[None]:
        raise NotImplementedError


class NoSpans(Spans):
    @contextmanager
    def _nothing(self) -> Iterator[None]:
        yield

    def span(self, name: str, category: str) -> AbstractContextManager[None]:
        return self._nothing()
