"""The benchmarks' parts for the "dpsgs" torch backend, without MPI: the training bench's
DDP-over-dpsgs configuration (command line, refusal on GPUs, headline ratio, kept out of the
peers) and the collective table's bus factors and expected outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dpsgs.bench import train, train_configs as tc
from dpsgs.bench.torch_collectives import Case, bus_factor

W = tc.WORKLOADS["mlp"]


def _by_name(configs: list) -> dict:
    return {c.name: c for c in configs}


def test_ddp_over_dpsgs_runs_the_ddp_peer_under_mpi4py() -> None:
    cfg = _by_name(tc.bench_configs(4))["torch-ddp-dpsgs"]
    assert (cfg.runner, cfg.ranks, cfg.threads, cfg.plan) == ("ddp", 2, 1, None)
    cmd = train.config_command(cfg, W, 3, 1, None, Path("o.json"))
    assert cmd[1:3] == ["-n", "2"] and cmd[4:8] == ["-m", "mpi4py", "-m", "dpsgs.bench.peers.ddp"]
    assert cmd[-2:] == ["--backend", "dpsgs"] and "--model" in cmd and "mlp-wide" in cmd
    assert tc.unavailable_reason(cfg) is None
    gpu = _by_name(tc.bench_configs(4, "cuda", gpus=2))["torch-ddp-dpsgs"]
    assert tc.unavailable_reason(gpu).startswith("not run on GPU: the dpsgs backend hands CUDA tensors to NCCL")


def test_headline_compares_ddp_over_dpsgs_with_ddp_over_gloo() -> None:
    def r(name: str, sps: float, backend: str | None = None, exposed: float = 0.01) -> dict:
        return {"name": name, "status": "ok", "samples_per_s": {"median": sps}, "backend": backend,
                "step_time_s": {"median": 64 / sps}, "exposed_comm_s": exposed, "compute_only_step": 0.02}

    h = train.headline([r("backprop-1rank", 10), r("torch-ddp", 15, "gloo", 0.03),
                        r("torch-ddp-dpsgs", 24, "dpsgs", 0.005), r("dpsgs-dp", 20)])
    assert h["best_peer"] == "torch-ddp"   # the dpsgs backend is not a peer of dpsgs
    assert h["dpsgs-dp"]["over_best_peer"] == pytest.approx(20 / 15)
    d = h["ddp_dpsgs_over_ddp_gloo"]
    assert d["ratio"] == pytest.approx(1.6)
    assert (d["dpsgs_exposed_comm_s"], d["gloo_exposed_comm_s"]) == (0.005, 0.03)
    assert d["gloo_step_s"] == pytest.approx(64 / 15)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_collective_table_factors_and_expected_outputs(n: int) -> None:
    assert bus_factor("allreduce", n) == pytest.approx(2 * (n - 1) / n)
    assert bus_factor("allgather", n) == bus_factor("alltoall", n) == pytest.approx((n - 1) / n)
    assert bus_factor("broadcast", n) == 1.0
    count = 12 * n
    cases = {rank: Case("alltoall", count, rank, n) for rank in range(n)}
    for rank, c in cases.items():   # block q of rank r's output is block r of rank q's input
        per = count // n
        want = np.concatenate([cases[q].init.numpy()[rank * per:(rank + 1) * per] for q in range(n)])
        assert np.array_equal(c.expect, want)
    ag = [Case("allgather", count, rank, n) for rank in range(n)]
    assert np.array_equal(ag[1].expect, np.concatenate([c.init.numpy() for c in ag]))
    rs = [Case("reduce_scatter", count, rank, n) for rank in range(n)]
    total = sum(c.init.numpy().astype(np.float64) for c in rs)
    assert np.array_equal(rs[n - 1].expect, total[(n - 1) * count // n:].astype(np.float32))
    assert rs[0].nbytes == 4 * count and ag[0].nbytes == 4 * count


def test_pair_summary_takes_ratios_pair_by_pair() -> None:
    from dpsgs.bench.ddp_pair import pair_summary

    # warm-up pair first (dropped); then three pairs whose load moves both alike
    raw = {"gloo": {"step_times": [9.0, 0.30, 0.60, 0.15], "nosync_times": [0.1, 0.2],
                    "allreduce_times": [0.05, 0.1, 0.2], "losses": [2.3, 2.2, 2.1, 2.0]},
           "dpsgs": {"step_times": [1.0, 0.20, 0.40, 0.15], "nosync_times": [0.1, 0.2],
                     "allreduce_times": [0.01, 0.02, 0.03], "losses": [2.3, 2.2, 2.1, 2.0]}}
    s = pair_summary(raw, 64, 1)
    assert s["pairs"] == 3 and s["dpsgs_won"] == 2     # a tie is not a win
    assert s["dpsgs_over_gloo"]["median"] == pytest.approx(1.5)
    assert s["nosync_dpsgs_over_gloo"]["median"] == 1.0
    assert s["gloo"]["step_time_s"]["median"] == 0.30 and s["dpsgs"]["step_time_s"]["median"] == 0.20
    assert s["gloo"]["exposed_comm_s"] == pytest.approx(0.15) and s["gloo"]["bare_allreduce_s"] == 0.1
    assert s["gloo"]["rest_of_exposed_s"] == pytest.approx(0.05)
    assert s["dpsgs"]["exposed_comm_s"] == pytest.approx(0.05) and s["dpsgs"]["rest_of_exposed_s"] == pytest.approx(0.03)
    assert s["dpsgs"]["samples_per_s"]["median"] == pytest.approx(64 / 0.20)
    assert s["losses_identical"] and s["max_loss_difference"] == 0.0
    raw["dpsgs"]["losses"][2] = 2.125
    s = pair_summary(raw, 64, 1)
    assert not s["losses_identical"] and s["max_loss_difference"] == pytest.approx(0.025)
