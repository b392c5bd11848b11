"""Timeline totals and Chrome trace format; MetricsLog JSON lines."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dpsgs.job.metrics import MetricsLog, Timeline, merge_traces, rank_path, read_metrics


def test_step_totals_by_category() -> None:
    tl = Timeline(rank=0)
    with tl.span("fwd", "compute"):
        time.sleep(0.02)
    with tl.span("recv act", "channel"):
        time.sleep(0.01)
    tl.add("allreduce", "reduce", 0.5)
    totals = tl.step_totals()
    assert 0.02 <= totals["compute"] < 0.2 and 0.01 <= totals["channel"] < 0.2
    assert totals["reduce"] == pytest.approx(0.5)
    assert tl.step_totals() == {"compute": 0.0, "channel": 0.0, "reduce": 0.0}   # reset
    tl.close()   # no trace requested: nothing written, no error


def test_span_counts_even_when_the_body_raises() -> None:
    tl = Timeline(rank=0)
    with pytest.raises(RuntimeError):
        with tl.span("bwd", "compute"):
            raise RuntimeError("boom")
    assert tl.step_totals(reset=False)["compute"] > 0


def test_chrome_trace(tmp_path: Path) -> None:
    tl = Timeline(rank=3, trace_path=tmp_path / "trace.json")
    assert tl.trace_path == tmp_path / "trace.rank3.json"
    with tl.span("fwd b0", "compute", batch=0, loss=torch.tensor(1.5)):
        time.sleep(0.002)
    with tl.span("wait", "reduce"):
        pass
    tl.close()
    trace = json.loads((tmp_path / "trace.rank3.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    names = {e["args"]["name"]: e["tid"] for e in trace["traceEvents"]
             if e["name"] == "thread_name"}
    assert [s["name"] for s in spans] == ["fwd b0", "wait"]
    assert all(s["pid"] == 3 for s in spans)
    assert spans[0]["tid"] == names["compute"] and spans[1]["tid"] == names["reduce"]
    assert spans[0]["dur"] >= 2000 and spans[0]["args"] == {"batch": 0, "loss": 1.5}
    assert abs(spans[0]["ts"] / 1e6 - time.time()) < 60      # wall-clock µs: ranks line up
    merged = merge_traces([tmp_path / "trace.rank3.json"] * 2, tmp_path / "all.json")
    assert len(json.loads(merged.read_text())["traceEvents"]) == 2 * len(trace["traceEvents"])


def test_rank_path() -> None:
    assert rank_path("out/t.json", 2) == Path("out/t.rank2.json")
    assert rank_path("out/t-{rank}.json", 2) == Path("out/t-2.json")


def test_metrics_log_lines(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.write({"step": 1, "loss": torch.tensor(0.25), "acc": np.float32(0.5)})
        log.write({"step": 2, "loss": float("nan"), "grad": torch.tensor([1.0, 2.0])})
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')          # a writer killed mid-line
    assert read_metrics(path) == [{"step": 1, "loss": 0.25, "acc": 0.5},
                                  {"step": 2, "loss": "nan", "grad": [1.0, 2.0]}]
    MetricsLog(None).write({"step": 1})     # no-op


def test_trace_is_capped(tmp_path: Path) -> None:
    tl = Timeline(rank=0, trace_path=tmp_path / "t.json", max_events=3)
    for i in range(5):
        with tl.span(f"s{i}", "compute"):
            pass
    tl.close()
    trace = json.loads((tmp_path / "t.rank0.json").read_text())
    assert [e["name"] for e in trace["traceEvents"] if e["ph"] == "X"] == ["s0", "s1", "s2"]
    assert trace["otherData"] == {"dropped_spans": 2, "max_events": 3}


def test_a_segment_starts_its_first_steps_clock_and_totals_afresh():
    # regression: the first step of each segment carried the evaluation and checkpoint that
    # ran before it (5-10x the median step time in the per-step metrics)
    from dpsgs.comm.grid import Grid
    from dpsgs.config import TrainConfig
    from dpsgs.job.progress import ProgressReporter

    cfg = TrainConfig(stages=1, replicas=1, progress=False)
    tl = Timeline(0)
    p = ProgressReporter(cfg, Grid(1, 1), None, 0, tl, MetricsLog(None), MetricsLog(None), 4)
    with tl.span("eval forward", "compute"):
        time.sleep(0.05)
    p.begin_segment()
    assert tl.step_totals()["compute"] == 0.0
    assert time.perf_counter() - p._last_time < 0.05
