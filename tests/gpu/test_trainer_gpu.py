"""The trainer on CUDA (--device cuda): the decoupled K x N pipeline over NCCL channels and the
NCCL all-reduce, on one GPU or many (tests/gpu/gpu_launch.py), against the same references as
on CPU. Skipped, with the reason, where no GPU is visible or dpsgs._C lacks NCCL.

Tolerance: fdg and sync run in float64 and the reference runs the same executor on the same
GPU with the same kernels (cuBLAS made deterministic by CUBLAS_WORKSPACE_CONFIG); the
replicas' mean is NCCL's ncclAvg, x/2 + y/2 for N = 2, which equals the reference's
(x + y)/2 bit for bit. So the bound is the CPU suite's, 1e-10, not a float tolerance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mpi"))
from compare import compare_to_reference, load_dump  # noqa: E402
from fault_trial import train_args  # noqa: E402
from gpu_launch import assert_clean, gpu_ranks, need_gpu  # noqa: E402
from launcher import RANKS_DIR  # noqa: E402
from test_fdg_equal import _specs  # noqa: E402
from test_sync_equal import backprop  # noqa: E402
from toy import toy_config  # noqa: E402

from dpsgs.job.metrics import read_metrics  # noqa: E402

pytestmark = pytest.mark.gpu


def _on_cuda(specs: list[dict]) -> list[dict]:
    return [dict(s, device="cuda") for s in specs]


@pytest.mark.parametrize("K,N", [(1, 2), (2, 1), (2, 2), (3, 1), (3, 2)])
def test_fdg_on_cuda_equals_the_reference_on_cuda(tmp_path, K, N):
    specs = _on_cuda(_specs(K, N))          # both stash modes, both overlap modes, BN, AdamW
    run = gpu_ranks(K * N, RANKS_DIR / "train_dump.py", str(tmp_path), "core", json.dumps(specs), timeout=900)
    assert_clean(run)
    for spec in specs:
        figures = compare_to_reference(load_dump(tmp_path / f"{spec['name']}.pt"), spec)
        assert figures["loss_diff"] <= 1e-10 and figures["param_diff"] <= 1e-10, (spec["name"], figures)


def test_sync_on_cuda_equals_backprop(tmp_path):
    specs = [{"name": f"sync-{kind}", "schedule": "sync", "stages": 2, "replicas": 2, "sync_kind": kind,
              "micro_batches": 4, "epochs": 4, "max_steps": 20, "device": "cuda"} for kind in ("1f1b", "gpipe")]
    run = gpu_ranks(4, RANKS_DIR / "train_dump.py", str(tmp_path), "core", json.dumps(specs), timeout=900)
    assert_clean(run)
    for spec in specs:
        cfg = toy_config(**{k: v for k, v in spec.items() if k not in ("name", "device")})
        want = backprop(cfg, 20)                             # single-process, on the host
        ranks = {(d["replica"], d["stage"]): d["params"] for d in load_dump(tmp_path / f"{spec['name']}.pt")["ranks"]}
        for r in range(2):
            got = [p for k in range(2) for p in ranks[(r, k)]]
            worst = max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))
            assert worst <= 1e-10, (spec["name"], r, worst)


def _train(run_dir: Path, *extra: str, n: int = 4, k: int = 2, epochs: int = 3, env: dict | None = None,
           expect_ok: bool = True):
    return gpu_ranks(n, "dpsgs", *train_args(k, n // k, str(run_dir), timeout=30.0, epochs=epochs),
                     "--device", "cuda", *extra, module=True, env=env, expect_ok=expect_ok, timeout=600)


def test_bf16_trains_on_cuda(tmp_path):
    run = _train(tmp_path, "--amp", "bf16", "--lr", "0.05", epochs=6)
    assert_clean(run)
    losses = [m["loss"] for m in read_metrics(tmp_path / "metrics.jsonl") if "loss" in m]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_a_killed_rank_ends_the_job_within_the_timeout_naming_the_peer(tmp_path):
    run = _train(tmp_path, env={"DPSGS_FAULT": "rank=1,step=12,phase=forward,kind=hang"}, expect_ok=False)
    assert run.returncode != 0, run.tail()
    assert "rank 1 (replica 0, stage 1)" in run.stderr, run.tail()
    assert run.seconds < 30 + 90, run.tail()          # --timeout 30, plus start-up and abort


def test_resume_after_a_kill_continues_exactly(tmp_path):
    import torch

    from dpsgs.job.checkpoint import latest_checkpoint, load_checkpoint
    from dpsgs.comm.grid import Grid

    ref = _train(tmp_path / "ref", "--dtype", "float64", n=2)
    assert_clean(ref)
    died = _train(tmp_path / "run", "--dtype", "float64", n=2,
                  env={"DPSGS_FAULT": "rank=1,step=11,phase=forward,kind=sigkill"}, expect_ok=False)
    assert died.returncode != 0
    resumed = _train(tmp_path / "run", "--dtype", "float64", "--resume", "auto", n=2)
    assert_clean(resumed)
    grid = Grid(2, 1)
    for stage in range(2):
        a = load_checkpoint(latest_checkpoint(tmp_path / "ref"), grid, stage)["model"]
        b = load_checkpoint(latest_checkpoint(tmp_path / "run"), grid, stage)["model"]
        assert all(torch.equal(a[key], b[key]) for key in a), stage


def test_digits_mlp_on_cuda_reaches_the_cpu_accuracy(tmp_path):
    need_gpu()
    common = ["train", "-K", "2", "-N", "2", "--model", "mlp", "--dataset", "digits", "--epochs", "20",
              "--no-progress", "--balance", "params"]
    gpu = gpu_ranks(4, "dpsgs", *common, "--device", "cuda", "--run-dir", str(tmp_path / "gpu"),
                    module=True, timeout=900)
    cpu = gpu_ranks(4, "dpsgs", *common, "--device", "cpu", "--run-dir", str(tmp_path / "cpu"),
                    module=True, timeout=900)
    assert_clean(gpu)
    acc = {d: json.loads((tmp_path / d / "summary.json").read_text())["test_accuracy"] for d in ("gpu", "cpu")}
    print(f"digits MLP K=2 N=2, 20 epochs: test accuracy cuda {acc['gpu']:.4f}, cpu {acc['cpu']:.4f}")
    # The target is 0.5 points, read from this print (gpu-check.sh keeps it). Asserted
    # is 3 points: rounding alone moves this run further (on the CPU, float32 against float64
    # of the same run: 97.78 % against 95.56 %; the test set is 360 samples, 0.28 points each).
    assert abs(acc["gpu"] - acc["cpu"]) <= 0.03, acc
    assert cpu.returncode == 0
