"""Training/TTA bench arithmetic: quartiles, speedup, efficiency, stage split, headline ratios."""

from __future__ import annotations

import pytest

from dpsgs.bench.train import headline
from dpsgs.bench.train_stats import derive, quartiles, stage_split
from dpsgs.bench.tta import time_to_target


def test_quartiles_and_empty() -> None:
    q = quartiles([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (q["median"], q["q1"], q["q3"], q["iqr"], q["n"]) == (3.0, 2.0, 4.0, 2.0, 5)
    assert quartiles([]) is None
    assert quartiles([7.0])["iqr"] == 0.0


def test_derive_drops_warmup_and_scales_by_cores() -> None:
    rec = {"batch": 10, "step_times": [9.0, 0.5, 0.5, 0.5], "compute_only_step": 0.4}
    d = derive(rec, baseline_sps=10.0, cores=2, warmup=1)
    assert d["samples_per_s"]["median"] == pytest.approx(20.0)
    assert d["speedup"] == pytest.approx(2.0) and d["efficiency"] == pytest.approx(1.0)
    assert d["exposed_comm_s"] == pytest.approx(0.1)


def test_stage_split_takes_one_rank_per_stage_and_the_rest_is_other() -> None:
    split = {"0": {"compute": [9, 1.0], "channel": [9, 0.2], "reduce": [9, 0.1],
                   "step": [9, 1.5]},
             "1": {"compute": [9, 0.5], "channel": [9, 0.0], "reduce": [9, 0.0],
                   "step": [9, 1.5]},
             "2": {"compute": [9, 7.0], "channel": [9, 0.0], "reduce": [9, 0.0],
                   "step": [9, 9.0]}}          # rank 2 = stage 0 of replica 1: skipped
    out = stage_split(split, {"0": 0, "1": 1, "2": 0}, warmup=1)
    assert [s["stage"] for s in out] == [0, 1]
    assert out[0]["other_s"] == pytest.approx(0.2)
    assert out[1]["other_s"] == pytest.approx(1.0)


def test_headline_ratios() -> None:
    def r(name: str, sps: float | None) -> dict:
        return {"name": name, "status": "ok" if sps else "unavailable",
                "samples_per_s": {"median": sps} if sps else None}

    h = headline([r("backprop-1rank", 10), r("torch-ddp", 15), r("torch-pipe-1f1b", 12),
                  r("dpsgs-fdg-weights", 18), r("single-2threads", None)])
    assert h["best_peer"] == "torch-ddp"
    assert h["dpsgs-fdg-weights"]["over_best_peer"] == pytest.approx(1.2)
    assert h["dpsgs-fdg-weights"]["over_backprop_1rank"] == pytest.approx(1.8)


def test_time_to_target() -> None:
    curve = [{"epoch": 1, "train_seconds": 1.0, "test_accuracy": 0.5},
             {"epoch": 2, "train_seconds": 2.0, "test_accuracy": 0.96},
             {"epoch": 3, "train_seconds": 3.0, "test_accuracy": 0.95}]
    t = time_to_target(curve, 0.95)
    assert (t["seconds"], t["epoch"], t["best_accuracy"], t["final_accuracy"]) == \
        (2.0, 2, 0.96, 0.95)
    assert time_to_target(curve, 0.99)["seconds"] is None
