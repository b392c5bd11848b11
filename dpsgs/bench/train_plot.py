"""PNG charts of a training-bench result: samples/s per configuration, per-stage time split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_workload"]


def plot_workload(doc: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in doc["results"] if r["status"] == "ok" and r.get("samples_per_s")]
    written: list[Path] = []
    if not ok:
        return written
    title = (f"{doc['model']}, global batch {doc['global_batch']} "
             f"({doc['machine']['cpu_count']} cores, load {doc['machine']['loadavg'][0]:.1f})")
    names = [r["name"] for r in ok]
    med = [r["samples_per_s"]["median"] for r in ok]
    err = [[m - r["samples_per_s"]["q1"] for m, r in zip(med, ok)],
           [r["samples_per_s"]["q3"] - m for m, r in zip(med, ok)]]
    colors = ["tab:red" if n.startswith("dpsgs") else "tab:gray" if n.startswith("backprop")
              else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(range(len(ok)), med, yerr=err, capsize=3, color=colors)
    base = next((r for r in ok if r["name"] == doc.get("baseline")), None)
    if base:
        b = base["samples_per_s"]["median"]
        ax.axhline(b, color="k", lw=0.8, ls="--", label="1-rank backprop")
        ax.axhline(2 * b, color="k", lw=0.8, ls=":", label="2 x 1-rank (2-core limit)")
        ax.legend(loc="upper left", fontsize=8)
    for i, r in enumerate(ok):
        if r.get("speedup"):
            ax.text(i, med[i], f"{r['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(ok)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("samples/s (median, IQR bars)")
    ax.set_title(f"Training throughput: {title}", fontsize=10)
    fig.tight_layout()
    p = out / f"train-{doc['workload']}.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(p)

    split = [(r["name"], s) for r in ok for s in r.get("stages", [])]
    if split:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        bottom = [0.0] * len(split)
        for key, color in (("compute_s", "tab:green"), ("channel_s", "tab:orange"),
                           ("reduce_s", "tab:purple"), ("other_s", "tab:gray")):
            vals = [max(0.0, (s.get(key) or 0.0)) * 1e3 for _, s in split]
            ax.bar(range(len(split)), vals, bottom=bottom, color=color,
                   label=key.removesuffix("_s"))
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(split)), [f"{n}\nstage {s['stage']}" for n, s in split],
                      rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("ms per step (median)")
        ax.set_title(f"Where a dpsgs step goes: {title}", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / f"train-{doc['workload']}-split.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    return written
