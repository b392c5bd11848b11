"""Pipeline schedules as pure data: what every stage does at every step (DESIGN §1)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OVERLAPS", "SYNC_KINDS", "StageStep", "Action", "fdg_plan", "fdg_steps",
           "staleness", "update_start", "sync_plan", "format_plan", "cut_plan"]

OVERLAPS = ("backward", "step")
SYNC_KINDS = ("1f1b", "gpipe")


@dataclass(frozen=True)
class StageStep:
    """What stage `stage` does at step `step` of an fdg plan (None = nothing of that kind).

    Order inside a step (DESIGN §1; dpsgs.pipeline.executor runs it, for the distributed
    trainer and the single-process reference alike): receive; the last stage forwards
    first; backward `backward`, send its input-gradient, start its all-reduce; wait for the
    all-reduce of `apply` and update (overlap=backward: the batch just backpropagated;
    overlap=step: the one of the previous step, so its all-reduce overlapped a whole step);
    forward `forward`, send.
    """

    step: int
    stage: int
    forward: int | None     # batch forwarded at this step
    backward: int | None    # batch whose gradient is backpropagated at this step
    apply: int | None       # batch whose averaged gradient the optimizer applies now


@dataclass(frozen=True)
class Action:
    """One operation of a sync (micro-batched) schedule: 'F' or 'B' of micro-batch `micro`."""

    op: str
    micro: int

    def __str__(self) -> str:
        return f"{self.op}{self.micro}"


def _check(stages: int, overlap: str) -> None:
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be an int >= 1, got {stages!r}")
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap must be one of {OVERLAPS}, got {overlap!r}")


def staleness(stage: int, stages: int, overlap: str = "backward") -> int:
    """Steps between the forward of a batch at `stage` and the update that applies its
    gradient: 2(K-1-k), one more when the all-reduce overlaps a whole step."""
    _check(stages, overlap)
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} out of range for {stages} stages")
    return 2 * (stages - 1 - stage) + (1 if overlap == "step" else 0)


def update_start(stage: int, stages: int, overlap: str = "backward") -> int:
    """First step at which `stage` applies an update (end of its warm-up)."""
    return stage + staleness(stage, stages, overlap)


def fdg_steps(stages: int, num_batches: int, overlap: str = "backward") -> int:
    """Steps of one fdg plan: warm-up, steady state and the flush of `num_batches` batches."""
    _check(stages, overlap)
    if num_batches < 0:
        raise ValueError(f"num_batches must be >= 0, got {num_batches}")
    if num_batches == 0:
        return 0
    # stage 0 applies the last batch at step (nb-1) + staleness(0)
    return num_batches + staleness(0, stages, overlap)


def fdg_plan(stages: int, num_batches: int, overlap: str = "backward") -> list[list[StageStep]]:
    """The fully decoupled schedule: plan[t][k] for K = `stages`, batches 0..num_batches-1.

    Stage k forwards batch t-k and backpropagates batch t-2K+2+k (the last stage: the batch
    it forwards in the same step); it applies that batch's gradient in the same step
    (overlap=backward) or one step later (overlap=step). The plan ends with the flush: no
    batch after the last is admitted, every batch in flight is finished and applied.
    """
    def batch(j: int) -> int | None:
        return j if 0 <= j < num_batches else None

    K = stages
    plan = []
    for t in range(fdg_steps(stages, num_batches, overlap)):
        row = []
        for k in range(K):
            bwd = t - 2 * K + 2 + k
            app = bwd if overlap == "backward" else bwd - 1
            row.append(StageStep(t, k, batch(t - k), batch(bwd), batch(app)))
        plan.append(row)
    return plan


def sync_plan(stages: int, micro_batches: int, kind: str = "1f1b") -> list[list[Action]]:
    """Per stage, the ordered F/B actions of one synchronous micro-batched step.

    gpipe: all forwards, then all backwards. 1f1b: stage k runs K-1-k warm-up forwards,
    then alternates one forward and one backward, then drains the remaining backwards
    (bounded stash: at most K-k micro-batches in flight). Backwards run in micro-batch
    order on every stage, so each channel carries its messages in one fixed order.
    """
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be an int >= 1, got {stages!r}")
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
    if kind not in SYNC_KINDS:
        raise ValueError(f"sync kind must be one of {SYNC_KINDS}, got {kind!r}")
    M = micro_batches
    plan = []
    for k in range(stages):
        if kind == "gpipe":
            ops = [Action("F", m) for m in range(M)] + [Action("B", m) for m in range(M)]
        else:
            warm = min(stages - 1 - k, M)
            ops = [Action("F", m) for m in range(warm)]
            f = warm
            for b in range(M):
                if f < M:
                    ops.append(Action("F", f))
                    f += 1
                ops.append(Action("B", b))
        plan.append(ops)
    return plan


def format_plan(plan: list[list[StageStep]]) -> str:
    """Human-readable table of an fdg plan: one line per step, `F<fwd> B<bwd> U<apply>`."""
    def cell(s: StageStep) -> str:
        parts = [f"F{s.forward}" if s.forward is not None else "  ",
                 f"B{s.backward}" if s.backward is not None else "  ",
                 f"U{s.apply}" if s.apply is not None else "  "]
        return " ".join(p.ljust(3) for p in parts)

    if not plan:
        return "(empty plan)"
    K = len(plan[0])
    head = "step | " + " | ".join(f"stage {k}".ljust(11) for k in range(K))
    lines = [head, "-" * len(head)]
    for row in plan:
        lines.append(f"{row[0].step:4d} | " + " | ".join(cell(s) for s in row))
    return "\n".join(lines)


def cut_plan(plan: list[list[StageStep]], seg: list, done: int, overlap: str = "backward") -> bool:
    """Stop admitting batches after the first `done` steps of a running fdg `plan` over
    `seg`: in place, the rest of the plan becomes the flush of the batches admitted so far
    (stage 0 forwarded batches 0..done-1) and `seg` keeps only those. The fdg plan is a pure
    function of the batch count, and the cut plan agrees with the running one on every step
    already executed (checked). False (nothing changed) when no batch is left to drop."""
    if not plan or done >= len(seg):
        return False
    cut = fdg_plan(len(plan[0]), done, overlap)
    if cut[:done] != plan[:done]:
        return False
    plan[done:] = cut[done:]
    del seg[done:]
    return True
