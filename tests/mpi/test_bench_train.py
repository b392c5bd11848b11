"""Training bench: a tiny run of one peer and one dpsgs configuration yields every JSON field."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _bench(tmp_path: Path, *args: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dpsgs.bench.train", "--out", str(tmp_path), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _needs_trainer() -> None:
    for mod in ("dpsgs._C", "dpsgs.job.trainer"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} not available yet")


def test_tiny_run_writes_every_field(tmp_path: Path) -> None:
    _needs_trainer()
    _bench(tmp_path, "--workload", "mlp", "--model", "mlp", "--batch", "16", "--steps", "3",
           "--warmup", "1", "--only", "backprop-1rank,dpsgs-fdg-weights", "--no-plot",
           "--timeout", "120")
    doc = json.loads((tmp_path / "train-mlp.json").read_text())
    assert doc["bench"] == "train" and doc["model"] == "mlp" and doc["global_batch"] == 16
    assert doc["machine"]["cpu_count"] >= 1 and doc["split"] is not None
    assert set(doc["profile"]["layers"][0]["times"]) == {"16"}   # every per-call batch
    by = {r["name"]: r for r in doc["results"]}
    assert set(by) == {"backprop-1rank", "dpsgs-fdg-weights"}
    for r in by.values():
        assert r["status"] == "ok", r.get("stderr_tail") or r.get("reason")
        assert len(r["step_times"]) == 3                       # timed steps only
        sps = r["samples_per_s"]
        assert sps["n"] == 3 and sps["q1"] <= sps["median"] <= sps["q3"] and sps["median"] > 0
        assert r["speedup"] is not None and r["efficiency"] == pytest.approx(
            r["speedup"] / r["cores"])
    assert by["backprop-1rank"]["speedup"] == pytest.approx(1.0)
    fdg = by["dpsgs-fdg-weights"]
    assert fdg["ranks"] == 2 and fdg["plan"]["schedule"] == "fdg"
    assert [s["stage"] for s in fdg["stages"]] == [0, 1]
    for s in fdg["stages"]:
        assert s["compute_s"] is not None and s["compute_s"] >= 0
    assert fdg["exposed_comm_s"] is not None


def test_unavailable_peer_is_recorded_with_its_reason(tmp_path: Path, monkeypatch) -> None:
    # In-process: a configuration whose check fails is kept in the JSON with the reason.
    from dpsgs.bench import train as bench

    monkeypatch.setattr(bench, "unavailable_reason", lambda cfg: "not here: test")
    monkeypatch.setattr(bench, "pipeline_split", lambda prof, batch, stages=2: [1])
    rc = bench.main(["--workload", "mlp", "--model", "mlp", "--batch", "8", "--steps", "1",
                     "--warmup", "0", "--only", "torch-pipe-1f1b", "--no-plot",
                     "--out", str(tmp_path)])
    assert rc == 0
    r = json.loads((tmp_path / "train-mlp.json").read_text())["results"][0]
    assert r["status"] == "unavailable" and r["reason"] == "not here: test"


@pytest.mark.slow
def test_full_bench_both_workloads(tmp_path: Path) -> None:
    _needs_trainer()
    _bench(tmp_path, "--workload", "all", "--steps", "10", "--warmup", "3", timeout=1800)
    for w in ("cnn", "mlp"):
        doc = json.loads((tmp_path / f"train-{w}.json").read_text())
        assert {r["status"] for r in doc["results"]} <= {"ok", "unavailable"}
        assert (tmp_path / f"train-{w}.png").exists()
