"""`python -m dpsgs plot RUN_DIR`: loss, accuracy, throughput and time curves from metrics files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dpsgs.job.metrics import CATEGORIES, read_metrics

__all__ = ["plot_run", "series"]

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


def series(records: list[dict[str, Any]], keys: tuple[str, ...]) -> tuple[list[float], list[float]]:
    """(x, y) of the records holding one of `keys` with a number; x = the record's "step",
    else the last step seen before it (an eval line), else its position."""
    xs, ys = [], []
    step: float | None = None
    for i, rec in enumerate(records):
        if isinstance(rec.get("step"), (int, float)):
            step = float(rec["step"])
        key = next((k for k in keys if k in rec), None)
        if key is None or not isinstance(rec[key], (int, float)) or isinstance(rec[key], bool):
            continue
        xs.append(step if step is not None else float(i))
        ys.append(float(rec[key]))
    return xs, ys


def _by_rank(label: str, records: list[dict[str, Any]]) -> list[tuple[str, list[dict]]]:
    """One file's records, split per "rank" when the records carry one."""
    ranks = sorted({r["rank"] for r in records if isinstance(r.get("rank"), int)})
    if not ranks:
        return [(label, records)]
    return [(f"rank {k}", [r for r in records if r.get("rank") == k]) for k in ranks]


def _metrics_files(run_dir: Path) -> list[Path]:
    files = sorted(run_dir.glob("metrics*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no metrics*.jsonl in {str(run_dir)!r} (is it a run folder?)")
    return files


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> list[Path]:
    """Write loss.png, accuracy.png, throughput.png (and time.png: compute/channel/reduce
    seconds per step of every rank, when recorded) into `out` (default RUN_DIR/plots).
    Returns the files written; ValueError if no record has anything to plot."""
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
        for label, (xs, ys) in data.items():
            if xs:
                ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(fig_name)
        ax.set_title(f"{run_dir.name}: {fig_name}")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(_save(fig, out_dir / f"{fig_name}.png", plt))
    # Timings from the per-rank files when there are any (the main log repeats rank 0's).
    per_rank = [f for f in files if f.name.startswith("metrics.rank")] or [main]
    timed = [g for f in per_rank for g in _by_rank(f.stem, read_metrics(f))]
    timed = [(name, r) for name, r in timed if any(series(r, (c,))[0] for c in CATEGORIES)]
    if timed:
        fig, axes = plt.subplots(len(timed), 1, figsize=(7, 2.2 * len(timed) + 0.8),
                                 sharex=True, squeeze=False)
        for ax, (name, recs) in zip(axes[:, 0], timed):
            for c in CATEGORIES:
                xs, ys = series(recs, (c,))
                if xs:
                    ax.plot(xs, ys, label=c)
            ax.set_ylabel("s / step")
            ax.set_title(name, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=8)
        axes[-1, 0].set_xlabel("step")
        written.append(_save(fig, out_dir / "time.png", plt))
    if not written:
        found = sorted({k for r in records for k in r})
        raise ValueError(f"{str(main)!r}: nothing to plot; record keys are {found}, expected "
                         f"some of {sorted({k for ks in KEYS.values() for k in ks})}")
    return written


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
