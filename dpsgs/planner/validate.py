"""Hold the planner against the training bench: predict each measured run, report % error."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from .cluster import Cluster
from .cost import Config, predict
from .profile import ModelProfile, profile_for

__all__ = ["calibrate_link", "gloo_link", "validate_doc", "run_validation", "SHM_DEFAULTS",
           "GLOO_DEFAULTS"]

# Shared memory between two processes on this kind of machine when no comm bench ran:
# a few µs per message, a memcpy-class bandwidth; the all-reduce also adds and copies.
SHM_DEFAULTS = {"alpha": 3e-6, "bw": 4e9, "ar_alpha": 5e-6, "ar_bw": 2e9,
                "source": "defaults (no bench/results/comm-*.json)"}
# The torch peers talk gloo over TCP loopback, a slower link than MPI's shared memory.
GLOO_DEFAULTS = {"alpha": 30e-6, "bw": 1e9, "ar_alpha": 30e-6, "ar_bw": 1e9,
                 "source": "defaults"}


def _fit(points: list[tuple[float, float]], hops: float) -> tuple[float, float] | None:
    """alpha, bandwidth of t = hops * alpha + size / bw from (bytes, seconds) points:
    alpha from the smaller half (at most 3 points), bandwidth from the larger half whose time
    is mostly transfer (at least twice the latency term). Least-squares-free, so one noisy
    mid-size point cannot bend it: a 4-point gloo curve with a 4 MiB point as fast as its
    256 KiB one had made a 1.2 GB/s link look like 10 GB/s."""
    pts = sorted(p for p in points if p[1] > 0)
    if len(pts) < 3:
        return None
    k = min(3, len(pts) // 2)
    alpha = statistics.median(t for _, t in pts[:k]) / hops
    big = [s / (t - hops * alpha) for s, t in pts[-k:] if t > 2 * hops * alpha]
    return (alpha, statistics.median(big)) if big else None


def calibrate_link(folder: Path) -> dict[str, Any]:
    """Shared-memory alpha/beta from the comm bench's 2-rank JSON (dpsgs side when present,
    else raw MPI): p2p one-way latency rows and all-reduce rows. Falls back to defaults."""
    files = sorted(folder.glob("comm-2ranks.json")) or sorted(folder.glob("comm-*.json"))
    if not files:
        return dict(SHM_DEFAULTS)
    d = json.loads(files[0].read_text())
    out = dict(SHM_DEFAULTS, source=str(files[0]))
    lat = (d.get("p2p") or {}).get("latency") or []
    pts = []
    for row in lat:
        side = row.get("dpsgs") or row.get("raw")
        if side and "median_us" in side:
            pts.append((float(row["size"]), side["median_us"] * 1e-6))
    fit = _fit(pts, 1.0)
    if fit:
        out["alpha"], out["bw"] = fit
    n = int(d.get("nprocs", 2))
    pts = []
    for row in d.get("allreduce") or []:
        v = row.get("variants", {})
        side = v.get("dpsgs.auto") or v.get("mpi.Allreduce-inplace")
        if side and "median_us" in side:
            # ring volume 2(n-1)/n * size, so "bw" below is the per-link bandwidth
            pts.append((2 * (n - 1) / n * float(row["size"]), side["median_us"] * 1e-6))
    fit = _fit(pts, 2.0 * (n - 1))
    if fit:
        out["ar_alpha"], out["ar_bw"] = fit
    return out


def gloo_link(doc: dict[str, Any]) -> dict[str, Any]:
    """The gloo link from the DDP run's own all-reduce curve (same run), else defaults."""
    ddp = next((r for r in doc["results"] if r.get("gloo_allreduce")), None)
    if ddp is None:
        return dict(GLOO_DEFAULTS)
    n = int(ddp.get("ranks", 2))
    pts = [(2 * (n - 1) / n * b, t) for b, t in ddp["gloo_allreduce"]]
    fit = _fit(pts, 2.0 * (n - 1))
    if not fit:
        return dict(GLOO_DEFAULTS)
    return {"alpha": fit[0], "bw": fit[1], "ar_alpha": fit[0], "ar_bw": fit[1],
            "source": f"{ddp['name']} gloo all-reduce curve"}


def validate_doc(doc: dict[str, Any], link: dict[str, Any], reps: int = 2,
                 profile: Any = None, overlap: str | None = "none") -> dict[str, Any]:
    """Predictions and errors for every measured configuration with a `plan` in one
    train-bench result document. The profile: `profile` if given, else the one the bench
    stored (mean of before and after its runs), else taken here, one thread per rank.

    overlap="none" (default here): on this CPU machine a rank has one core, and the
    all-reduce's copies and sums run on that same core, so backward cannot hide them; pass
    None to use each configuration's own overlap setting (the GPU assumption)."""

    batch = int(doc["global_batch"])
    runs = [r for r in doc["results"] if r.get("status") == "ok" and r.get("plan")]
    units = set()
    for r in runs:
        pl = r["plan"]
        m = pl.get("micro_batches", 1) if pl["schedule"] in ("gpipe", "1f1b") else 1
        units.add(max(1, batch // pl["replicas"] // m))
    source = "given"
    if profile is None and doc.get("profile"):
        # taken by the bench itself before (and after) the runs: the load the runs saw
        profile = _mean_profile([ModelProfile.from_json(doc[k])
                                 for k in ("profile", "profile_after") if doc.get(k)])
        source = "bench (mean of before/after the runs)"
        if any(u not in profile.layers[0].times for u in units):
            profile = None   # a bench file without every batch: profile again
    if profile is None:
        source = "profiled now"
        profile = profile_for(doc["model"], tuple(doc["in_shape"]), doc.get("num_classes", 10),
                              sorted(units), reps=reps, threads=1)
    gloo = gloo_link(doc)
    rows = _predict_rows(doc, runs, profile, link, gloo, overlap, batch)
    # Calibrated: scale the profile so that 1-rank backprop is predicted exactly. On a
    # shared machine the profile and the runs see different load; what remains is the
    # error of the parallel part of the model (pipeline, channels, all-reduce).
    base = next((row for row in rows if row["name"] == "backprop-1rank"), None)
    factor = None
    if base:
        factor = base["measured_step_s"] / base["predicted_step_s"]
        cal = _predict_rows(doc, runs, profile.scaled(factor), link, gloo, overlap, batch)
        for row, c in zip(rows, cal):
            row["calibrated_predicted_samples_per_s"] = c["predicted_samples_per_s"]
            row["calibrated_error_pct"] = c["error_pct"]
    return {"workload": doc.get("workload"), "model": doc["model"], "global_batch": batch,
            "link": link, "gloo_link": gloo, "overlap": overlap,
            "profile_source": source, "profile_batches": sorted(units),
            "calibration_factor": factor, "rows": rows}


def _mean_profile(profiles: list[ModelProfile]) -> ModelProfile:
    """Per-layer mean of the timings of equally shaped profiles (bytes from the first)."""
    first = profiles[0]
    out = first.scaled(1.0)
    for i, lay in enumerate(out.layers):
        others = [p.layers[i] for p in profiles]
        lay.times = {b: [statistics.fmean(o.times[b][j] for o in others) for j in range(2)]
                     for b in lay.times if all(b in o.times for o in others)}
        lay.update = statistics.fmean(o.update for o in others)
        lay.snapshot = statistics.fmean(o.snapshot for o in others)
        lay.accumulate = statistics.fmean(o.accumulate for o in others)
    return out


def _predict_rows(doc: dict[str, Any], runs: list[dict[str, Any]], profile: Any,
                  link: dict[str, Any], gloo: dict[str, Any], overlap: str | None,
                  batch: int) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        pl = dict(r["plan"])
        if overlap is not None:
            pl["overlap"] = overlap
        K, N = pl["stages"], pl["replicas"]
        ln = gloo if r.get("runner") in ("ddp", "pipe") else link
        cl = Cluster(K * N, K * N, intra_bw=ln["bw"], alpha_intra=ln["alpha"])
        if N > 1:   # the all-reduce runs over its own calibrated curve
            cl = replace(cl, intra_bw=ln["ar_bw"], alpha_intra=ln["ar_alpha"])
        splits = tuple(doc["split"]) if K == 2 and doc.get("split") else None
        cfg = Config(**pl, splits=splits)
        p = predict(profile, cl, cfg, batch)
        meas = r["samples_per_s"]["median"]
        rows.append({"name": r["name"], "label": cfg.label, "link": ln["source"],
                     "measured_samples_per_s": meas,
                     "predicted_samples_per_s": p.samples_per_s,
                     "error_pct": 100.0 * (p.samples_per_s - meas) / meas,
                     "predicted_step_s": p.step_time,
                     "measured_step_s": r["step_time_s"]["median"],
                     "predicted_stash_bytes": [s.stash_bytes for s in p.stages],
                     "measured_stash_bytes": r.get("stash_peak_bytes"),
                     "prediction": p.to_json()})
    return rows


def run_validation(paths: list[str], comm_folder: Path, reps: int = 2,
                   out: str | None = None, overlap: str | None = "none") -> int:
    link = calibrate_link(comm_folder)
    print(f"# link (shared memory): p2p alpha {link['alpha'] * 1e6:.1f} us, "
          f"{link['bw'] / 1e9:.2f} GB/s; all-reduce alpha {link['ar_alpha'] * 1e6:.1f} us, "
          f"{link['ar_bw'] / 1e9:.2f} GB/s  [{link['source']}]")
    docs = []
    for path in paths:
        doc = json.loads(Path(path).read_text())
        res = validate_doc(doc, link, reps, overlap=overlap)
        docs.append(res)
        g = res["gloo_link"]
        print(f"# {res['model']} global batch {res['global_batch']} ({path}); profile "
              f"{res['profile_source']} at {res['profile_batches']}, 1 thread; overlap "
              f"{res['overlap'] or 'as run'}; gloo all-reduce alpha {g['ar_alpha'] * 1e6:.0f} us, "
              f"{g['ar_bw'] / 1e9:.2f} GB/s [{g['source']}]")
        f = res["calibration_factor"]
        print(f"# {'configuration':<22} {'measured':>10} {'predicted':>10} {'error %':>8} "
              f"{'calibrated':>10} {'error %':>8}   (calibrated: profile x "
              f"{f if f is None else round(f, 3)} so backprop-1rank is exact)")
        for row in res["rows"]:
            cal = row.get("calibrated_predicted_samples_per_s")
            print(f"  {row['name']:<22} {row['measured_samples_per_s']:10.1f} "
                  f"{row['predicted_samples_per_s']:10.1f} {row['error_pct']:8.1f} "
                  + (f"{cal:10.1f} {row['calibrated_error_pct']:8.1f}" if cal else ""))
        for key, what in (("error_pct", "raw"), ("calibrated_error_pct", "calibrated")):
            errs = [abs(r[key]) for r in res["rows"] if key in r and r["name"] != (
                "backprop-1rank" if key.startswith("cal") else "")]
            if errs:
                print(f"# {what}: mean |error| {statistics.fmean(errs):.1f} %, "
                      f"max {max(errs):.1f} %")
    target = Path(out) if out else Path(paths[0]).with_name(
        "plan-validate-" + Path(paths[0]).name.removeprefix("train-"))
    target.write_text(json.dumps({"validations": docs}, indent=1, default=str) + "\n")
    print(f"# wrote {target}")
    return 0
