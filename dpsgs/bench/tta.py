"""Time to accuracy: wall time and epochs of fdg, sync, dpsgs data-parallel and DDP to one accuracy.

    python -m dpsgs.bench.tta --dataset digits --epochs 20 --target 0.95
    python -m dpsgs.bench.tta --dataset digits --model resnet20 --epochs 10 --target 0.95 \
        --out bench/results/ --force
    python -m dpsgs.bench.tta --dataset cifar10 --data-dir ~/data/cifar-10-batches-py \
        --model resnet20 --batch 128 --epochs 30 --target 0.85

Every configuration trains the same model from the same seed on the same data, with the same
global batch, optimizer and learning-rate schedule, on 2 ranks (the 1-rank backprop
reference on one); the test set is evaluated after every epoch, and training seconds exclude
evaluation. Writes OUT/tta-DATASET-MODEL.json and OUT/tta-DATASET-MODEL.png (accuracy vs
wall time). OUT is by default a new folder per run, runs/bench/tta-<YYYYmmdd-HHMMSS>/; an
--out already holding those files (e.g. the published bench/results) is refused (exit 2)
unless --force.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .launch import launch, runner_command
from .outputs import add_out_args, existing_error, out_folder
from .train import machine

__all__ = ["main", "TtaConfig", "tta_configs", "time_to_target"]


@dataclass(frozen=True)
class TtaConfig:
    name: str
    runner: str                 # tta_torch | tta_dpsgs
    ranks: int
    fields: tuple[tuple[str, Any], ...] = ()   # TrainConfig overrides

    def train_config(self, base: dict[str, Any], batch: int) -> dict[str, Any]:
        cfg = {**base, **dict(self.fields)}
        n = cfg.get("replicas", 1)
        if batch % n:
            raise ValueError(f"global batch {batch} does not split over N = {n}")
        cfg["batch_size"] = batch // n
        return cfg


def tta_configs(micro_batches: int = 4) -> list[TtaConfig]:
    return [
        TtaConfig("backprop-1rank", "tta_torch", 1, (("stages", 1), ("replicas", 1))),
        TtaConfig("torch-ddp", "tta_torch", 2, (("stages", 1), ("replicas", 2))),
        TtaConfig("dpsgs-fdg", "tta_dpsgs", 2, (("stages", 2), ("replicas", 1),
                                                 ("schedule", "fdg"), ("stash", "weights"))),
        TtaConfig("dpsgs-sync", "tta_dpsgs", 2, (("stages", 2), ("replicas", 1),
                                                  ("schedule", "sync"), ("sync_kind", "1f1b"),
                                                  ("micro_batches", micro_batches))),
        TtaConfig("dpsgs-dp", "tta_dpsgs", 2, (("stages", 1), ("replicas", 2))),
    ]


def time_to_target(curve: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """First evaluation at or above `target`: its training seconds and epoch (None if never)."""
    hit = next((c for c in curve if c["test_accuracy"] >= target), None)
    return {"seconds": hit["train_seconds"] if hit else None,
            "epoch": hit["epoch"] if hit else None,
            "best_accuracy": max((c["test_accuracy"] for c in curve), default=None),
            "final_accuracy": curve[-1]["test_accuracy"] if curve else None}


def _run(cfg: TtaConfig, train_cfg: dict[str, Any], timeout: float, tmp: Path) -> dict[str, Any]:
    base = {"name": cfg.name, "runner": cfg.runner, "ranks": cfg.ranks, "config": train_cfg}
    if cfg.runner == "tta_dpsgs":
        import importlib.util
        for mod in ("dpsgs._C", "dpsgs.job.trainer"):
            if importlib.util.find_spec(mod) is None:
                return {**base, "status": "unavailable", "reason": f"{mod} not importable"}
    out = tmp / f"{cfg.name}.json"
    cmd = runner_command(cfg.runner, ["--config", json.dumps(train_cfg), "--out", str(out)],
                         cfg.ranks, mpi4py=cfg.runner == "tta_dpsgs")
    run = launch(cmd, out, 1, timeout)
    if run["status"] != "ok":
        return {**base, **run}
    raw = run["result"]
    if not raw.get("epochs"):
        return {**base, **raw, "status": "failed",
                "reason": "the run logged no test accuracy (no evaluation records found)"}
    return {**base, **raw, "name": cfg.name, "runner": cfg.runner, "status": "ok",
            "wall_s": run["wall_s"], "command": cmd[:-4] + ["--config", "..."]}


def _plot(doc: dict[str, Any], path: Path) -> Path | None:
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    if not ok:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in ok:
        xs = [0.0] + [c["train_seconds"] for c in r["epochs"]]
        ys = [None] + [c["test_accuracy"] for c in r["epochs"]]
        ax.plot(xs[1:], ys[1:], marker="o", ms=3, label=r["name"],
                lw=2 if r["name"].startswith("dpsgs") else 1.2)
    ax.axhline(doc["target"], color="k", ls="--", lw=0.8, label=f"target {doc['target']:.2f}")
    ax.set_xlabel("training wall time, s (evaluation excluded)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Time to accuracy: {doc['model']} on {doc['dataset']}, global batch "
                 f"{doc['global_batch']} (load {doc['machine']['loadavg'][0]:.1f})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpsgs.bench.tta",
                                description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("digits", "cifar10"), default="digits")
    p.add_argument("--data-dir")
    p.add_argument("--model", help="default: mlp (digits), resnet20 (cifar10)")
    p.add_argument("--batch", type=int, default=32, help="global batch per step")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--lr-schedule", default="cosine")
    p.add_argument("--target", type=float, default=0.95, help="test accuracy to reach")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help="comma-separated configuration names")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    add_out_args(p, "tta", folder=True, force_example="e.g. the published ones")
    a = p.parse_args(argv)
    model = a.model or ("mlp" if a.dataset == "digits" else "resnet20")
    stem = f"tta-{a.dataset}-{model}"
    if a.out:       # checked before minutes of training, not when writing
        refused = existing_error("dpsgs.bench.tta", [Path(a.out) / f"{stem}{ext}"
                                                     for ext in (".json", ".png")], a.force)
        if refused:
            print(refused, file=sys.stderr)
            return 2
    out = out_folder(a.out, "tta")
    base = {"model": model, "dataset": a.dataset, "data_dir": a.data_dir, "epochs": a.epochs,
            "lr": a.lr, "lr_schedule": a.lr_schedule, "seed": a.seed, "eval_every": 1,
            "checkpoint_every": 0, "metrics_every": 1, "progress": False,
            "device": "cpu"}   # the torch peers run on the CPU: dpsgs too, even where "auto" sees a GPU
    configs = tta_configs(a.micro_batches)
    if a.only:
        want = {s.strip() for s in a.only.split(",")}
        configs = [c for c in configs if c.name in want]
    results = []
    print(f"# time to accuracy: {model} on {a.dataset}, global batch {a.batch}, {a.epochs} "
          f"epochs, lr {a.lr} {a.lr_schedule}, target {a.target}")
    with tempfile.TemporaryDirectory(prefix="dpsgs-tta-") as tmp:
        for c in configs:
            r = _run(c, c.train_config(base, a.batch), a.timeout, Path(tmp))
            if r["status"] == "ok":
                r["to_target"] = time_to_target(r["epochs"], a.target)
            results.append(r)
            tt = r.get("to_target", {})
            print(f"  {c.name:<16} {r['status']:<11} " + (
                f"to {a.target:.2f}: {tt['seconds'] and round(tt['seconds'], 2)} s, epoch "
                f"{tt['epoch']}; best {tt['best_accuracy']:.4f}" if r["status"] == "ok"
                else r.get("reason", "")))
    ref = {r["name"]: r["to_target"]["seconds"] for r in results
           if r["status"] == "ok" and r["to_target"]["seconds"]}
    for r in results:
        t = r.get("to_target", {}).get("seconds")
        r["speedup_vs"] = {n: (s / t if t else None) for n, s in ref.items()}
    doc = {"bench": "tta", "dataset": a.dataset, "model": model, "global_batch": a.batch,
           "epochs": a.epochs, "target": a.target, "lr": a.lr, "lr_schedule": a.lr_schedule,
           "machine": machine(), "command": [sys.executable, "-m", "dpsgs.bench.tta",
                                             *(argv if argv is not None else sys.argv[1:])],
           "results": results}
    from .harness import write_json
    path = write_json(out / f"{stem}.json", doc, overwrite=a.force)
    print(f"# wrote {path}")
    png = _plot(doc, path.with_suffix(".png"))
    if png:
        print(f"# wrote {png}")
    fdg = next((r for r in results if r["name"] == "dpsgs-fdg" and r["status"] == "ok"), None)
    if fdg:
        for n, s in sorted(fdg["speedup_vs"].items()):
            if s and n != "dpsgs-fdg":
                print(f"# time to {a.target:.2f}: {n} / dpsgs-fdg = {s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
