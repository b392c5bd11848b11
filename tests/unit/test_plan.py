"""Planner: closed-form cases of the cost model, exact partition, the recommendation."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from torch import nn

from dpsgs.pipeline.partition import balance, stage_bounds
from dpsgs.planner import (Cluster, Config, LayerProfile, ModelProfile, candidates,
                           load_layer_times, predict, profile_model, recommend)
from dpsgs.planner.cli import main as plan_main


def synthetic(layers: int = 8, fwd: float = 1e-3, bwd: float = 2e-3, params: int = 1_000_000,
              act: int = 1000, saved: int = 4000, update: float = 0.0) -> ModelProfile:
    """Identical layers whose time is proportional to the batch (measured at batch 1)."""
    lays = [LayerProfile(f"L{i}", params, act, saved, {1: [fwd, bwd]}, update)
            for i in range(layers)]
    return ModelProfile("synthetic", [10], 40, 1, lays)


def ring(n: int, nbytes: float, alpha: float, bw: float) -> float:
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / bw


# ---------------------------------------------------------------- partition

def test_balance_simple() -> None:
    assert balance([1, 1, 1, 1], 2) == [2]
    assert balance([5, 1, 1, 1, 1, 1], 2) == [1]
    assert balance([1, 2, 3], 3) == [1, 2]
    assert balance([7], 1) == []
    assert stage_bounds([2, 4], 5) == [(0, 2), (2, 4), (4, 5)]


def test_balance_is_optimal_against_brute_force() -> None:
    rng = random.Random(3)
    for _ in range(50):
        n = rng.randint(1, 7)
        k = rng.randint(1, n)
        costs = [rng.random() for _ in range(n)]
        best = min(max(sum(costs[a:b]) for a, b in stage_bounds(list(cut), n))
                   for cut in itertools.combinations(range(1, n), k - 1))
        got = balance(costs, k)
        assert max(sum(costs[a:b]) for a, b in stage_bounds(got, n)) == pytest.approx(best)


def test_balance_rejects_too_many_stages() -> None:
    with pytest.raises(ValueError, match="3 layers into 4"):
        balance([1, 1, 1], 4)


# ---------------------------------------------------------------- cost model

def test_k1_is_the_ddp_formula() -> None:
    prof = synthetic(update=1e-4)
    cl = Cluster(4, 4, intra_bw=1e9, alpha_intra=1e-5)
    batch, N = 64, 4
    fdg = predict(prof, cl, Config(1, N, "fdg"), batch)
    ddp = predict(prof, cl, Config(1, N, "ddp"), batch)
    b = batch // N
    F, G, U = 8 * 1e-3 * b, 8 * 2e-3 * b, 8 * 1e-4
    ar = ring(N, 8 * 1_000_000, 1e-5, 1e9)
    expect = F + G + U + max(0.0, ar - G)
    assert fdg.step_time == pytest.approx(expect)
    assert ddp.step_time == pytest.approx(expect)
    assert ddp.samples_per_s == pytest.approx(batch / expect)
    assert ddp.stages[0].allreduce == pytest.approx(ar)


def test_overlap_modes_hide_what_they_promise() -> None:
    prof = synthetic(params=50_000_000)           # all-reduce longer than the backward
    cl = Cluster(2, 2, intra_bw=1e9, alpha_intra=0.0)
    none, bwd, step = (predict(prof, cl, Config(1, 2, "ddp", overlap=o), 2)
                       for o in ("none", "backward", "step"))
    ar = ring(2, 8 * 50_000_000, 0.0, 1e9)
    assert none.step_time == pytest.approx(8 * 3e-3 + ar)
    assert bwd.step_time == pytest.approx(8 * 3e-3 + ar - 8 * 2e-3)
    assert step.step_time == pytest.approx(max(8 * 3e-3, ar))


def test_fdg_has_no_bubble_and_sync_has_the_gpipe_bubble() -> None:
    prof = synthetic()
    cl = Cluster(4, 4, intra_bw=1e30, alpha_intra=0.0)   # free links
    batch, K, M = 32, 4, 8
    fdg = predict(prof, cl, Config(K, 1, "fdg"), batch)
    per_stage = 2 * 3e-3 * batch                          # 2 layers of (1+2) ms per sample
    assert fdg.step_time == pytest.approx(per_stage)
    assert fdg.bubble == 0.0
    for kind in ("gpipe", "1f1b"):
        sync = predict(prof, cl, Config(K, 1, kind, micro_batches=M), batch)
        assert sync.bubble == pytest.approx((K - 1) / (M + K - 1))
        assert sync.step_time == pytest.approx((M + K - 1) * per_stage / M)


def test_micro_batches_after_the_first_pay_the_gradient_accumulation() -> None:
    prof = synthetic()
    for lay in prof.layers:
        lay.accumulate = 5e-3
    cl = Cluster(4, 4, intra_bw=1e30, alpha_intra=0.0)
    batch, K, M = 32, 4, 8
    per_stage = 2 * 3e-3 * batch
    sync = predict(prof, cl, Config(K, 1, "gpipe", micro_batches=M), batch)
    slot = per_stage / M + 2 * 5e-3 * (M - 1) / M        # 2 layers per stage accumulate
    assert sync.step_time == pytest.approx((M + K - 1) * slot)
    fdg = predict(prof, cl, Config(K, 1, "fdg"), batch)   # one backward per step: none
    assert fdg.step_time == pytest.approx(per_stage)


def test_recompute_adds_a_forward_except_on_the_last_stage() -> None:
    prof = synthetic()
    cl = Cluster(2, 2, intra_bw=1e30, alpha_intra=0.0)
    w = predict(prof, cl, Config(2, 1, "fdg", stash="weights"), 1)
    r = predict(prof, cl, Config(2, 1, "fdg", stash="recompute"), 1)
    assert r.stages[0].compute == pytest.approx(w.stages[0].compute + 4 * 1e-3)
    assert r.stages[1].compute == pytest.approx(w.stages[1].compute)


def test_stash_memory_grows_with_staleness() -> None:
    prof = synthetic(layers=4, params=100, saved=1000)
    cl = Cluster(4, 4)
    p = predict(prof, cl, Config(4, 1, "fdg", stash="weights"), 1)
    # stage k keeps tau_k = 2(K-1-k) graphs and tau_k old weight copies
    for k, st in enumerate(p.stages):
        tau = 2 * (3 - k)
        assert st.stash_bytes == max(tau, 1) * 1000 - 1000 + tau * 100
    r = predict(prof, cl, Config(4, 1, "fdg", stash="recompute"), 1)
    assert [st.stash_bytes for st in r.stages] == [6 * 40, 4 * 1000, 2 * 1000, 0]


def test_channel_cost_intra_versus_inter_node() -> None:
    prof = synthetic(layers=2, act=1_000_000)
    fast = Cluster(2, 2, intra_bw=1e9, inter_bw=1e8, alpha_intra=1e-6, alpha_inter=1e-5)
    split = Cluster(2, 1, intra_bw=1e9, inter_bw=1e8, alpha_intra=1e-6, alpha_inter=1e-5)
    a = predict(prof, fast, Config(2, 1, "fdg"), 1).stages[0].channel
    b = predict(prof, split, Config(2, 1, "fdg"), 1).stages[0].channel
    assert a == pytest.approx(1e-6 + 1e6 / 1e9)
    assert b == pytest.approx(1e-5 + 1e6 / 1e8)


def test_cross_node_rings_share_the_nic() -> None:
    cl = Cluster(8, 4, inter_bw=1e9, alpha_inter=0.0, nics_per_node=1)
    one = cl.allreduce([0, 4], 1e9, concurrent=1)
    four = cl.allreduce([0, 4], 1e9, concurrent=4)
    assert one == pytest.approx(1.0)
    assert four == pytest.approx(4.0)
    many_nics = Cluster(8, 4, inter_bw=1e9, alpha_inter=0.0, nics_per_node=4)
    assert many_nics.allreduce([0, 4], 1e9, concurrent=4) == pytest.approx(1.0)
    assert cl.allreduce([0, 1], 1e9) < one       # same node: intra link


def test_predict_rejects_bad_configs() -> None:
    prof, cl = synthetic(), Cluster(4, 4)
    with pytest.raises(ValueError, match="does not split"):
        predict(prof, cl, Config(1, 3, "ddp"), 64)
    with pytest.raises(ValueError, match="exceeds"):
        predict(prof, cl, Config(2, 4, "fdg"), 64)
    with pytest.raises(ValueError, match="ddp means K = 1"):
        predict(prof, cl, Config(2, 2, "ddp"), 64)


# ---------------------------------------------------------------- recommendation

def test_recommends_pipeline_when_gradients_dwarf_compute() -> None:
    # Huge parameters over a slow network, cheap compute: splitting the model into all
    # devices' stages (N = 1) removes the all-reduce; fdg beats the sync pipelines' bubble.
    prof = synthetic(params=100_000_000, act=10)
    cl = Cluster(8, 8, intra_bw=1e9, alpha_intra=1e-5)
    best = recommend(candidates(prof, cl, 64))
    assert (best.config.schedule, best.config.stages, best.config.replicas) == ("fdg", 8, 1)


def test_recommends_ddp_when_activations_dwarf_gradients() -> None:
    prof = synthetic(params=10, act=100_000_000)
    cl = Cluster(8, 8, intra_bw=1e9, alpha_intra=1e-5)
    best = recommend(candidates(prof, cl, 64))
    assert (best.config.schedule, best.config.stages) == ("ddp", 1)


def test_candidates_skip_impossible_factorisations() -> None:
    prof = synthetic(layers=2)
    cands = candidates(prof, Cluster(4, 4), 6)
    skipped = {c.config.label: c.skipped for c in cands if c.skipped}
    assert any("not divisible" in s for s in skipped.values())          # N = 4 with batch 6
    assert any("> 2 layers" in s for s in skipped.values())             # K = 4 > 2 layers


# ---------------------------------------------------------------- profile

def test_profile_measures_bytes_of_a_tiny_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    prof = profile_model(model, (4,), [2, 4], reps=1)
    assert [lay.param_bytes for lay in prof.layers] == [(12 + 3) * 4, 0, (6 + 2) * 4]
    assert [lay.out_bytes_per_sample for lay in prof.layers] == [12, 12, 8]
    assert prof.in_bytes_per_sample == 16
    assert prof.layers[0].saved_bytes_per_sample == 16        # Linear keeps its input
    assert all(set(lay.times) == {2, 4} for lay in prof.layers)


def test_layer_time_interpolation() -> None:
    lay = LayerProfile("x", 0, 0, 0, {2: [2.0, 4.0], 10: [10.0, 20.0]})
    assert lay.seconds(6) == pytest.approx((6.0, 12.0))
    assert lay.seconds(20) == pytest.approx((20.0, 40.0))     # extrapolated on the end pair
    one = LayerProfile("y", 0, 0, 0, {4: [1.0, 2.0]})
    assert one.seconds(8) == pytest.approx((2.0, 4.0))


def test_layer_times_file_round_trip_and_cli(tmp_path, capsys) -> None:
    path = tmp_path / "prof.json"
    synthetic(params=100_000_000, act=10).save(path)
    back = load_layer_times(path)
    assert back.layers[0].times == {1: [1e-3, 2e-3]}
    out = tmp_path / "plan.json"
    rc = plan_main(["--layer-times", str(path), "--gpus", "8", "--gpus-per-node", "8",
                    "--batch", "64", "--intra-bw", "1e9", "--alpha-intra", "1e-5",
                    "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "recommended: fdg K=8 N=1" in text
    doc = json.loads(out.read_text())
    assert doc["recommended"].startswith("fdg K=8")
    assert {c["label"] for c in doc["candidates"]} >= {"ddp N=8", "fdg K=2 N=4 weights"}


def test_plan_help_shows_defaults_with_units(capsys, monkeypatch) -> None:
    from dpsgs import cli

    monkeypatch.setenv("COLUMNS", "100")               # the same wrapping whatever the tty
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--help"])                   # = python -m dpsgs plan --help
    assert e.value.code == 0
    out = capsys.readouterr().out
    lines: dict[str, str] = {}                         # option -> its entry, unwrapped
    for ln in out.split("\noptions:\n")[1].splitlines():
        if ln.startswith("  -"):
            flag = ln.split()[0]
        lines[flag] = " ".join((lines.get(flag, "") + " " + ln).split())
    assert lines["--inter-bw"].endswith("between nodes, bytes/s (default: 1.25e+10)")
    assert lines["--intra-bw"].endswith("bytes/s (default: 1e+11)")
    assert lines["--alpha-inter"].endswith("seconds per message (default: 2e-05)")
    assert "samples per step" in lines["--batch"] and lines["--batch"].endswith("(default: 128)")
    assert lines["--memory-limit"].endswith("bytes per device; skip configurations needing "
                                            "more (default: no limit)")
    assert lines["--stash"].endswith("(default: weights)")
    # no default to state (None, store_true) or stated in the help: nothing appended
    assert "(default: None)" not in out and "(default: False)" not in out
    assert lines["--profile"].endswith("(the default without --layer-times)")
    assert lines["--json"] == "--json FILE write every prediction as JSON"
    # the description's command lines, as written
    assert "--intra-bw 100e9 \\\n        --inter-bw 12.5e9" in out
    assert "python -m dpsgs plan --validate bench/results/train-cnn.json" in out
