"""The fdg and sync schedules as pure data: exact plans for K = 1..4 and the rules of DESIGN §1."""

from __future__ import annotations

import itertools

import pytest

from dpsgs.pipeline.schedule import (Action, fdg_plan, fdg_steps, format_plan, staleness, sync_plan,
                            update_start)

# Exact plans: one line per step, per stage "forward backward apply" ('.' = none).
# Read a row left to right: stage k forwards batch t-k, backpropagates batch t-2K+2+k
# (the last stage: the batch it forwards), applies it the same step (overlap=backward) or
# one step later (overlap=step). The trailing rows are the flush: no new batch enters,
# every batch in flight is finished and applied.
EXACT = {
    (1, 2, "backward"): """
    0 0 0
    1 1 1
""",
    (2, 4, "backward"): """
    0 . . | . . .
    1 . . | 0 0 0
    2 0 0 | 1 1 1
    3 1 1 | 2 2 2
    . 2 2 | 3 3 3
    . 3 3 | . . .
""",
    (3, 6, "backward"): """
    0 . . | . . . | . . .
    1 . . | 0 . . | . . .
    2 . . | 1 . . | 0 0 0
    3 . . | 2 0 0 | 1 1 1
    4 0 0 | 3 1 1 | 2 2 2
    5 1 1 | 4 2 2 | 3 3 3
    . 2 2 | 5 3 3 | 4 4 4
    . 3 3 | . 4 4 | 5 5 5
    . 4 4 | . 5 5 | . . .
    . 5 5 | . . . | . . .
""",
    (4, 8, "backward"): """
    0 . . | . . . | . . . | . . .
    1 . . | 0 . . | . . . | . . .
    2 . . | 1 . . | 0 . . | . . .
    3 . . | 2 . . | 1 . . | 0 0 0
    4 . . | 3 . . | 2 0 0 | 1 1 1
    5 . . | 4 0 0 | 3 1 1 | 2 2 2
    6 0 0 | 5 1 1 | 4 2 2 | 3 3 3
    7 1 1 | 6 2 2 | 5 3 3 | 4 4 4
    . 2 2 | 7 3 3 | 6 4 4 | 5 5 5
    . 3 3 | . 4 4 | 7 5 5 | 6 6 6
    . 4 4 | . 5 5 | . 6 6 | 7 7 7
    . 5 5 | . 6 6 | . 7 7 | . . .
    . 6 6 | . 7 7 | . . . | . . .
    . 7 7 | . . . | . . . | . . .
""",
    (1, 2, "step"): """
    0 0 .
    1 1 0
    . . 1
""",
    (2, 4, "step"): """
    0 . . | . . .
    1 . . | 0 0 .
    2 0 . | 1 1 0
    3 1 0 | 2 2 1
    . 2 1 | 3 3 2
    . 3 2 | . . 3
    . . 3 | . . .
""",
    (3, 6, "step"): """
    0 . . | . . . | . . .
    1 . . | 0 . . | . . .
    2 . . | 1 . . | 0 0 .
    3 . . | 2 0 . | 1 1 0
    4 0 . | 3 1 0 | 2 2 1
    5 1 0 | 4 2 1 | 3 3 2
    . 2 1 | 5 3 2 | 4 4 3
    . 3 2 | . 4 3 | 5 5 4
    . 4 3 | . 5 4 | . . 5
    . 5 4 | . . 5 | . . .
    . . 5 | . . . | . . .
""",
}


def _encode(plan) -> str:
    f = lambda v: "." if v is None else str(v)  # noqa: E731
    return "\n".join(" | ".join(f"{f(s.forward)} {f(s.backward)} {f(s.apply)}" for s in row)
                     for row in plan)


@pytest.mark.parametrize("key", sorted(EXACT))
def test_exact_plan(key):
    K, nb, overlap = key
    expected = "\n".join(line.strip() for line in EXACT[key].strip().splitlines())
    assert _encode(fdg_plan(K, nb, overlap)) == expected


CASES = [(K, nb, ov) for K in range(1, 6) for nb in (0, 1, 2, 3, 7, 12)
         for ov in ("backward", "step")]


@pytest.mark.parametrize("K,nb,overlap", CASES)
def test_rules(K, nb, overlap):
    plan = fdg_plan(K, nb, overlap)
    assert len(plan) == fdg_steps(K, nb, overlap)
    assert len(plan) == (0 if nb == 0 else nb + 2 * (K - 1) + (overlap == "step"))
    fwd, bwd, app = {}, {}, {}
    for t, row in enumerate(plan):
        assert [s.stage for s in row] == list(range(K)) and all(s.step == t for s in row)
        for s in row:
            for kind, table in (("forward", fwd), ("backward", bwd), ("apply", app)):
                j = getattr(s, kind)
                if j is not None:
                    assert (s.stage, j) not in table, f"{kind} of {j} twice at stage {s.stage}"
                    table[(s.stage, j)] = t
    every = {(k, j) for k in range(K) for j in range(nb)}
    # each batch forwarded, backpropagated and applied exactly once per stage
    assert set(fwd) == set(bwd) == set(app) == every
    for k, j in every:
        assert fwd[(k, j)] == j + k                        # batch j enters stage 0 at step j
        if k > 0:
            assert fwd[(k, j)] == fwd[(k - 1, j)] + 1      # activation one step later
        if k < K - 1:
            assert bwd[(k, j)] == bwd[(k + 1, j)] + 1      # gradient one step later
        else:
            assert bwd[(k, j)] == fwd[(k, j)]              # last stage: own loss
        assert bwd[(k, j)] == fwd[(k, j)] + 2 * (K - 1 - k)
        assert app[(k, j)] == bwd[(k, j)] + (overlap == "step")
        assert app[(k, j)] - fwd[(k, j)] == staleness(k, K, overlap)
    for k in range(K):
        if nb:
            assert min(t for (kk, _), t in app.items() if kk == k) == update_start(k, K, overlap)
    # the flush: nothing is forwarded after the last batch, nothing is left at the end
    if nb:
        assert max(fwd.values()) == nb - 1 + K - 1
        assert max(app.values()) == len(plan) - 1


def test_staleness_values():
    assert [staleness(k, 4) for k in range(4)] == [6, 4, 2, 0]
    assert [staleness(k, 4, "step") for k in range(4)] == [7, 5, 3, 1]
    assert [update_start(k, 3) for k in range(3)] == [4, 3, 2]
    assert staleness(0, 1) == 0


@pytest.mark.parametrize("bad", [dict(stages=0, num_batches=3), dict(stages=2, num_batches=-1),
                                 dict(stages=2, num_batches=3, overlap="later")])
def test_fdg_bad_input(bad):
    with pytest.raises(ValueError):
        fdg_plan(**bad)
    with pytest.raises(ValueError, match="stage 3 out of range"):
        staleness(3, 3)


def test_format_plan():
    text = format_plan(fdg_plan(2, 2))
    assert text.splitlines()[0].startswith("step | stage 0")
    assert text.splitlines()[3] == "   1 | F1          | F0  B0  U0 "
    assert format_plan([]) == "(empty plan)"


# -- sync ------------------------------------------------------------------------------

def _ops(actions):
    return " ".join(str(a) for a in actions)


def test_sync_exact_1f1b():
    plan = sync_plan(3, 4, "1f1b")
    assert [_ops(p) for p in plan] == [
        "F0 F1 F2 B0 F3 B1 B2 B3",
        "F0 F1 B0 F2 B1 F3 B2 B3",
        "F0 B0 F1 B1 F2 B2 F3 B3",
    ]


def test_sync_exact_gpipe():
    assert [_ops(p) for p in sync_plan(2, 3, "gpipe")] == ["F0 F1 F2 B0 B1 B2"] * 2


def _run_sync(plan, capacity=2):
    """Execute per-stage action lists with blocking receives and channels holding at most
    `capacity` messages in flight per direction; returns the ticks taken, or raises on a
    deadlock (no stage can move)."""
    K = len(plan)
    pos = [0] * K
    act = [[] for _ in range(K)]     # act[k]: micro-batches sent k -> k+1, not yet consumed
    grad = [[] for _ in range(K)]    # grad[k]: micro-batches sent k -> k-1
    ticks = 0
    while any(pos[k] < len(plan[k]) for k in range(K)):
        moved = False
        for k in range(K):
            if pos[k] == len(plan[k]):
                continue
            a = plan[k][pos[k]]
            if a.op == "F":
                if k > 0 and (not act[k - 1] or act[k - 1][0] != a.micro):
                    continue
                if k < K - 1 and len(act[k]) >= capacity:
                    continue
                if k > 0:
                    act[k - 1].pop(0)
                if k < K - 1:
                    act[k].append(a.micro)
            else:
                if k < K - 1 and (not grad[k + 1] or grad[k + 1][0] != a.micro):
                    continue
                if k > 0 and len(grad[k]) >= capacity:
                    continue
                if k < K - 1:
                    grad[k + 1].pop(0)
                if k > 0:
                    grad[k].append(a.micro)
            pos[k] += 1
            moved = True
        if not moved:
            raise AssertionError(f"deadlock at positions {pos}")
        ticks += 1
    return ticks


@pytest.mark.parametrize("K,M,kind", list(itertools.product(range(1, 6), (1, 2, 3, 4, 8),
                                                             ("1f1b", "gpipe"))))
def test_sync_rules(K, M, kind):
    plan = sync_plan(K, M, kind)
    assert len(plan) == K
    for k, ops in enumerate(plan):
        assert sorted((a.op, a.micro) for a in ops) == sorted(
            [("F", m) for m in range(M)] + [("B", m) for m in range(M)])
        for m in range(M):   # a micro-batch's backward follows its forward
            assert ops.index(Action("F", m)) < ops.index(Action("B", m))
        in_flight = peak = 0
        for a in ops:
            in_flight += 1 if a.op == "F" else -1
            peak = max(peak, in_flight)
        assert peak == (min(K - k, M) if kind == "1f1b" else M)
    _run_sync(plan)   # no deadlock with two messages in flight per channel


def test_sync_bad_input():
    with pytest.raises(ValueError, match="micro_batches"):
        sync_plan(2, 0)
    with pytest.raises(ValueError, match="sync kind"):
        sync_plan(2, 2, "zigzag")
