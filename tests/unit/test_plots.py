"""Plots: the rolling median (a spike goes, a step stays), throughput drawn smoothed, and the
time plot with one panel per pipeline stage (replicas averaged), read from the figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dpsgs.job import plots
from dpsgs.job.metrics import MetricsLog
from dpsgs.job.plots import plot_run, smooth, smoothing_window, time_panels


def test_smooth_removes_a_spike_and_keeps_a_step() -> None:
    ys = [1.0] * 30 + [5.0] * 30
    ys[10] = 1000.0                                          # one short step
    assert smoothing_window(len(ys)) == 13
    assert smooth(ys) == [1.0] * 30 + [5.0] * 30             # spike gone, step still at 30
    assert smooth([9.0] + [2.0] * 9) == [5.5] + [2.0] * 9    # 3 points; 2 at the shrunk end


def test_smoothing_window_is_odd_and_shrinks_for_short_runs() -> None:
    assert [smoothing_window(n) for n in (1000, 125, 60, 20, 9, 4, 0)] == [25, 25, 13, 5, 1, 1, 1]
    assert smoothing_window(1000, window=7) == 7
    assert smooth([3.0, 100.0, 4.0]) == [3.0, 100.0, 4.0]   # too few points to smooth


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """plot_run's figures by file name, kept open for the test to read."""
    seen: dict[str, Any] = {}
    save = plots._save

    def keep(fig: Any, path: Path, plt: Any) -> Path:
        seen[path.name] = {"titles": [ax.get_title() for ax in fig.axes],
                           "ylabels": [ax.get_ylabel() for ax in fig.axes],
                           "ylims": [ax.get_ylim() for ax in fig.axes],
                           "lines": [{ln.get_label(): list(ln.get_ydata())
                                      for ln in ax.get_lines()} for ax in fig.axes],
                           "suptitle": fig._suptitle.get_text() if fig._suptitle else ""}
        return save(fig, path, plt)

    monkeypatch.setattr(plots, "_save", keep)
    return seen


def write_grid_run(run: Path, stages: int = 2, replicas: int = 2, steps: int = 100) -> None:
    """A 2-stage x 2-replica run: rank = replica * stages + stage, as the grid lays it out."""
    with MetricsLog(run / "metrics.jsonl") as log:
        for step in range(steps):
            fast = step == 40                                   # one 0.001 s step: a spike
            log.write({"step": step, "loss": 1.0, "samples_per_s": 275_000.0 if fast else 500.0})
    for rank in range(stages * replicas):
        replica, stage = divmod(rank, stages)
        with MetricsLog(run / f"metrics.rank{rank}.jsonl") as log:
            for step in range(steps):
                spike = 9.0 if (rank, step) == (0, 50) else 0.0
                log.write({"step": step, "rank": rank, "replica": replica, "stage": stage,
                           "compute": 0.1 * (stage + 1) + 0.2 * replica + spike,
                           "channel": 0.01 * (1 + replica), "reduce": 0.5 if step >= 60 else 0.1})


def test_throughput_is_drawn_as_a_rolling_median(tmp_path: Path,
                                                 figures: dict[str, Any]) -> None:
    write_grid_run(tmp_path)
    plot_run(tmp_path)
    fig = figures["throughput.png"]
    assert fig["ylabels"] == ["samples/s (median of 21 steps)"]
    lines = fig["lines"][0]
    assert lines["samples/s (median of 21 steps)"] == [500.0] * 100        # the spike is gone
    assert max(lines["samples/s (each step)"]) == 275_000.0               # kept, faintly,
    assert fig["ylims"] == [pytest.approx((0.0, 550.0))]                  # but off the scale


def test_time_plot_has_one_panel_per_stage(tmp_path: Path, figures: dict[str, Any]) -> None:
    write_grid_run(tmp_path)
    assert [p.name for p in plot_run(tmp_path)] == [
        "loss.png", "throughput.png", "time.png"]
    fig = figures["time.png"]
    assert fig["titles"] == ["stage 0 (mean of 2 replicas)", "stage 1 (mean of 2 replicas)"]
    assert fig["suptitle"].endswith("seconds per step (median of 21 steps)")
    stage0, stage1 = fig["lines"]
    assert stage0["compute"] == pytest.approx([0.2] * 100)    # (0.1 + 0.3) / 2, spike gone
    assert stage1["compute"] == pytest.approx([0.3] * 100)    # (0.2 + 0.4) / 2
    assert stage1["channel"] == pytest.approx([0.015] * 100)
    assert stage0["reduce"] == pytest.approx([0.1] * 60 + [0.5] * 40)  # the step stays


def test_time_panels_group_by_stage_else_by_rank() -> None:
    recs = [{"step": s, "rank": r, "replica": r // 2, "stage": r % 2, "compute": float(r)}
            for s in range(3) for r in range(4)]
    panels = time_panels(recs)
    assert [title for title, _ in panels] == ["stage 0 (mean of 2 replicas)",
                                              "stage 1 (mean of 2 replicas)"]
    assert panels[0][1] == {"compute": ([0.0, 1.0, 2.0], [1.0, 1.0, 1.0])}   # ranks 0 and 2
    assert panels[1][1] == {"compute": ([0.0, 1.0, 2.0], [2.0, 2.0, 2.0])}   # ranks 1 and 3
    one = time_panels([{"step": 0, "replica": 0, "stage": 1, "reduce": 0.5}])
    assert one == [("stage 1 (1 replica)", {"reduce": ([0.0], [0.5])})]
    # older logs without "stage": one panel per rank; records without timings are dropped
    old = time_panels([{"step": 0, "rank": 1, "compute": 0.1}, {"step": 0, "rank": 0, "loss": 1}])
    assert old == [("rank 1", {"compute": ([0.0], [0.1])})]
