"""`python -m dpsgs plot RUN_DIR`: loss, accuracy, throughput and time curves from metrics files."""

from __future__ import annotations

import os
import re
import statistics
from pathlib import Path
from typing import Any, Sequence

from dpsgs.job.metrics import CATEGORIES, read_metrics

__all__ = ["plot_run", "series", "smooth", "smoothing_window", "time_panels"]

# Accepted spellings of each curve in a metrics record (first found wins).
KEYS: dict[str, tuple[str, ...]] = {
    "train loss": ("loss", "train_loss"),
    "test loss": ("test_loss",),
    "train accuracy": ("accuracy", "train_accuracy", "acc", "train_acc"),
    "test accuracy": ("test_accuracy", "test_acc"),
    "samples/s": ("samples_per_s", "samples_per_sec", "throughput"),
}
FIGURES: dict[str, tuple[str, ...]] = {
    "loss": ("train loss", "test loss"),
    "accuracy": ("train accuracy", "test accuracy"),
    "throughput": ("samples/s",),
}
# Per-step rates spike on a short step (one fast step reads as 275k samples/s), so these
# curves are drawn as a rolling median, the raw points kept faint behind.
SMOOTHED = frozenset({"samples/s"})
WINDOW = 25  # steps in the rolling median (fewer for a short run)

# A timing curve: steps and seconds; a panel: its title and a curve per category.
Curve = tuple[list[float], list[float]]
Panel = tuple[str, dict[str, Curve]]


def series(records: list[dict[str, Any]], keys: tuple[str, ...]) -> tuple[list[float], list[float]]:
    """(x, y) of the records holding one of `keys` with a number; x = the record's "step",
    else the last step seen before it (an eval line), else its position."""
    xs, ys = [], []
    step: float | None = None
    for i, rec in enumerate(records):
        if isinstance(rec.get("step"), (int, float)):
            step = float(rec["step"])
        key = next((k for k in keys if k in rec), None)
        if key is None or not _is_number(rec[key]):
            continue
        xs.append(step if step is not None else float(i))
        ys.append(float(rec[key]))
    return xs, ys


def smoothing_window(n: int, window: int = WINDOW) -> int:
    """Points in the rolling median of an n-point series: `window`, or about a fifth of the
    points when that is fewer (a 20-step run keeps its shape); odd, so it centres on a point."""
    return min(window, n // 5) | 1


def smooth(ys: Sequence[float], window: int = WINDOW) -> list[float]:
    """Centred rolling median over smoothing_window(len(ys), window) points, shrunk at the
    ends. A median, not a mean: an isolated spike vanishes, a step change stays sharp."""
    half = smoothing_window(len(ys), window) // 2
    return [statistics.median(ys[max(0, i - half):i + half + 1]) for i in range(len(ys))]


def time_panels(records: list[dict[str, Any]], window: int = WINDOW) -> list[Panel]:
    """One panel per pipeline stage: per category, the seconds of the stage's replicas
    averaged per step, then smooth()ed. Records without a "stage" (older logs) get one
    panel per "rank" instead. Panels with no timing are left out."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rec in records:
        if not _is_number(rec.get("step")):
            continue
        kind = "stage" if isinstance(rec.get("stage"), int) else "rank"
        groups.setdefault((kind, rec.get(kind, 0)), []).append(rec)
    panels: list[Panel] = []
    for (kind, k), recs in sorted(groups.items()):
        curves = {c: _mean_per_step(recs, c) for c in CATEGORIES}
        curves = {c: (xs, smooth(ys, window)) for c, (xs, ys) in curves.items() if xs}
        if curves:
            panels.append((_panel_title(kind, k, recs), curves))
    return panels


def _mean_per_step(records: list[dict[str, Any]], category: str) -> Curve:
    """(steps, mean seconds of `category` over the records of each step), steps ascending."""
    per_step: dict[float, list[float]] = {}
    for rec in records:
        if _is_number(rec.get(category)):
            per_step.setdefault(float(rec["step"]), []).append(float(rec[category]))
    xs = sorted(per_step)
    return xs, [statistics.fmean(per_step[x]) for x in xs]


def _panel_title(kind: str, k: int, records: list[dict[str, Any]]) -> str:
    if kind == "rank":
        return f"rank {k}"
    n = len({r.get("replica") for r in records})
    return f"stage {k} (mean of {n} replicas)" if n > 1 else f"stage {k} (1 replica)"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _metrics_files(run_dir: Path) -> list[Path]:
    files = sorted(run_dir.glob("metrics*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no metrics*.jsonl in {str(run_dir)!r} (is it a run folder?)")
    return files


def _timing_records(files: list[Path], main: Path) -> list[dict[str, Any]]:
    """Records of the per-rank files (each tagged with its file's rank when it lacks one),
    else of the main log, which repeats rank 0's timings."""
    per_rank = [(f, re.fullmatch(r"metrics\.rank(\d+)\.jsonl", f.name)) for f in files]
    per_rank = [(f, m) for f, m in per_rank if m]
    if not per_rank:
        return read_metrics(main)
    return [{"rank": int(m.group(1)), **rec} for f, m in per_rank for rec in read_metrics(f)]


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> list[Path]:
    """Write loss.png, accuracy.png, throughput.png (a rolling median of samples/s) and
    time.png (compute/channel/reduce seconds per step of each pipeline stage, when recorded)
    into `out` (default RUN_DIR/plots). Returns the files written; ValueError if no record
    has anything to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    files = _metrics_files(run_dir)
    # The main log (metrics.jsonl, rank 0) carries loss/accuracy; per-rank files the timings.
    main = next((f for f in files if f.name == "metrics.jsonl"), files[0])
    records = read_metrics(main)
    out_dir = Path(out) if out else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for fig_name, curves in FIGURES.items():
        data = {c: series(records, KEYS[c]) for c in curves}
        if not any(xs for xs, _ in data.values()):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        ylabel = fig_name
        for label, (xs, ys) in data.items():
            if xs and label in SMOOTHED:
                ylabel = _draw_smoothed(ax, label, xs, ys)
            elif xs:
                ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{run_dir.name}: {fig_name}")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(_save(fig, out_dir / f"{fig_name}.png", plt))
    panels = time_panels(_timing_records(files, main))
    if panels:
        written.append(_save(_time_figure(plt, run_dir.name, panels), out_dir / "time.png", plt))
    if not written:
        found = sorted({k for r in records for k in r})
        raise ValueError(f"{str(main)!r}: nothing to plot; record keys are {found}, expected "
                         f"some of {sorted({k for ks in KEYS.values() for k in ks})}")
    return written


def _draw_smoothed(ax: Any, label: str, xs: list[float], ys: list[float]) -> str:
    """The rolling median as the line, the raw points faint behind; returns the axis label."""
    w = smoothing_window(len(ys))
    if w == 1:
        ax.plot(xs, ys, label=label, marker="o")
        return label
    smoothed, sm = f"{label} (median of {w} steps)", smooth(ys)
    (line,) = ax.plot(xs, sm, label=smoothed, zorder=3)
    ax.plot(xs, ys, ".", color=line.get_color(), alpha=0.25, markersize=3,
            label=f"{label} (each step)", zorder=2)
    # scale to the trend and the usual scatter around it; the spikes above fall off the top
    scatter = statistics.quantiles([abs(y - m) for y, m in zip(ys, sm)], n=4)[-1]
    top = max(sm) + max(4 * scatter, 0.1 * abs(max(sm)))
    ax.set_ylim(min(0.0, min(sm)), top or 1.0)
    return smoothed


def _time_figure(plt: Any, name: str, panels: list[Panel]) -> Any:
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels) + 0.8),
                             sharex=True, squeeze=False)
    for ax, (title, curves) in zip(axes[:, 0], panels):
        for c, (xs, ys) in curves.items():
            ax.plot(xs, ys, label=c)
        ax.set_ylabel("s / step")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    w = smoothing_window(max(len(xs) for _, curves in panels for xs, _ in curves.values()))
    fig.suptitle(f"{name}: seconds per step" + (f" (median of {w} steps)" if w > 1 else ""),
                 fontsize=10)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    return fig


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
