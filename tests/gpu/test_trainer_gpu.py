"""The trainer on the GPU path (--device cuda, and --device sim: the same code over the CPU
simulator of a DPSGS_CUDA=sim build): the decoupled K x N pipeline over NCCL channels and the
NCCL all-reduce, against the same references as on CPU. [cuda] is skipped, with the reason,
where no GPU is visible or dpsgs._C lacks NCCL; [sim] runs in CI (conftest.py).

Tolerance: fdg and sync run in float64 and the reference runs the same executor with the same
kernels (on CUDA the same GPU, cuBLAS made deterministic by CUBLAS_WORKSPACE_CONFIG); the
replicas' mean is NCCL's ncclAvg, x/2 + y/2 for N = 2, which equals the reference's
(x + y)/2 bit for bit. So the bound is the CPU suite's, 1e-10, not a float tolerance; on the
simulator the arithmetic is the CPU run's, so the bound there is 0 (bit for bit).

On the simulator each launch is kept small (CI has 2 cores): every fdg grid runs its four
stash x overlap modes in one launch, the extra BatchNorm/AdamW cases of N = 2 only on CUDA.
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
from gpu_launch import assert_clean, gpu_ranks  # noqa: E402
from launcher import RANKS_DIR  # noqa: E402
from test_fdg_equal import MODES, _specs  # noqa: E402
from test_sync_equal import backprop  # noqa: E402
from toy import toy_config  # noqa: E402

from dpsgs.job.metrics import read_metrics  # noqa: E402


def _fdg_specs(K: int, N: int, device: str) -> list[dict]:
    if device == "cuda":       # both stash modes, both overlap modes, BN, AdamW
        return [dict(s, device="cuda") for s in _specs(K, N)]
    specs = [{"name": f"{stash}-{overlap}", "stages": K, "replicas": N, "stash": stash, "overlap": overlap,
              "shrink": beta, "max_steps": 8, "device": "sim"} for stash, overlap, beta in MODES]
    if (K, N) == (2, 2):        # the same run on the CPU (MPI core), to compare bit for bit
        specs.append(dict(specs[0], name="cpu-twin", device="cpu"))
    return specs


@pytest.mark.parametrize("K,N", [(1, 2), (2, 1), (2, 2), (3, 1), (3, 2)])
def test_fdg_on_the_device_equals_the_reference(tmp_path, device, K, N):
    specs = _fdg_specs(K, N, device)
    run = gpu_ranks(K * N, RANKS_DIR / "train_dump.py", str(tmp_path), "core", json.dumps(specs), timeout=900,
                    device=device)
    assert_clean(run)
    bound = 0.0 if device == "sim" else 1e-10
    for spec in specs:
        figures = compare_to_reference(load_dump(tmp_path / f"{spec['name']}.pt"), spec)
        assert figures["loss_diff"] <= bound and figures["param_diff"] <= bound, (spec["name"], figures)
    if device == "sim" and (K, N) == (2, 2):
        sim, cpu = (load_dump(tmp_path / f"{n}.pt")["ranks"] for n in (specs[0]["name"], "cpu-twin"))
        for a, b in zip(sim, cpu, strict=True):
            assert a["losses"] == b["losses"]
            assert all(p.equal(q) for p, q in zip(a["params"], b["params"], strict=True)), a["rank"]


def test_sync_on_the_device_equals_backprop(tmp_path, device):
    steps = 20 if device == "cuda" else 8
    specs = [{"name": f"sync-{kind}", "schedule": "sync", "stages": 2, "replicas": 2, "sync_kind": kind,
              "micro_batches": 4, "epochs": 4, "max_steps": steps, "device": device} for kind in ("1f1b", "gpipe")]
    run = gpu_ranks(4, RANKS_DIR / "train_dump.py", str(tmp_path), "core", json.dumps(specs), timeout=900,
                    device=device)
    assert_clean(run)
    for spec in specs:
        cfg = toy_config(**{k: v for k, v in spec.items() if k not in ("name", "device")})
        want = backprop(cfg, steps)                          # single-process, on the host
        ranks = {(d["replica"], d["stage"]): d["params"] for d in load_dump(tmp_path / f"{spec['name']}.pt")["ranks"]}
        for r in range(2):
            got = [p for k in range(2) for p in ranks[(r, k)]]
            worst = max(float((a.cpu() - b).abs().max()) for a, b in zip(got, want, strict=True))
            assert worst <= 1e-10, (spec["name"], r, worst)


def _train(device: str, run_dir: Path, *extra: str, n: int = 4, k: int = 2, epochs: int = 3,
           env: dict | None = None, expect_ok: bool = True, timeout: float = 30.0):
    # train_args's --warn-after 2 is for the CPU suite's stall tests: here a STALL line fails
    # assert_clean, and NCCL set-up (or the simulator on 2 busy cores) may take longer
    return gpu_ranks(n, "dpsgs", *train_args(k, n // k, str(run_dir), timeout=timeout, epochs=epochs),
                     "--warn-after", str(timeout / 2), "--device", device, *extra, module=True, env=env,
                     expect_ok=expect_ok, timeout=600, device=device)


def test_bf16_trains_on_the_device(tmp_path, device):
    run = _train(device, tmp_path, "--amp", "bf16", "--lr", "0.05", epochs=6)
    assert_clean(run)
    losses = [m["loss"] for m in read_metrics(tmp_path / "metrics.jsonl") if "loss" in m]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_a_killed_rank_ends_the_job_within_the_timeout_naming_the_peer(tmp_path, device):
    timeout = 30.0 if device == "cuda" else 10.0
    run = _train(device, tmp_path, env={"DPSGS_FAULT": "rank=1,step=12,phase=forward,kind=hang"},
                 expect_ok=False, timeout=timeout)
    assert run.returncode != 0, run.tail()
    assert "rank 1 (replica 0, stage 1)" in run.stderr, run.tail()
    assert run.seconds < timeout + 90, run.tail()          # plus start-up and abort


def test_resume_after_a_kill_continues_exactly(tmp_path, device):
    import torch

    from dpsgs.comm.grid import Grid
    from dpsgs.job.checkpoint import latest_checkpoint, load_checkpoint

    ref = _train(device, tmp_path / "ref", "--dtype", "float64", n=2)
    assert_clean(ref)
    died = _train(device, tmp_path / "run", "--dtype", "float64", n=2,
                  env={"DPSGS_FAULT": "rank=1,step=11,phase=forward,kind=sigkill"}, expect_ok=False)
    assert died.returncode != 0
    resumed = _train(device, tmp_path / "run", "--dtype", "float64", "--resume", "auto", n=2)
    assert_clean(resumed)
    grid = Grid(2, 1)
    for stage in range(2):
        a = load_checkpoint(latest_checkpoint(tmp_path / "ref"), grid, stage)["model"]
        b = load_checkpoint(latest_checkpoint(tmp_path / "run"), grid, stage)["model"]
        assert all(torch.equal(a[key], b[key]) for key in a), stage


@pytest.mark.parametrize("kind", [pytest.param("cuda", marks=pytest.mark.gpu),
                                  pytest.param("sim", marks=pytest.mark.slow)])
def test_digits_mlp_on_the_device_reaches_the_cpu_accuracy(tmp_path, kind):
    common = ["train", "-K", "2", "-N", "2", "--model", "mlp", "--dataset", "digits", "--epochs", "20",
              "--no-progress", "--balance", "params"]
    dev = gpu_ranks(4, "dpsgs", *common, "--device", kind, "--run-dir", str(tmp_path / "dev"),
                    module=True, timeout=900, device=kind)
    cpu = gpu_ranks(4, "dpsgs", *common, "--device", "cpu", "--run-dir", str(tmp_path / "cpu"),
                    module=True, timeout=900, device=kind)
    assert_clean(dev)
    acc = {d: json.loads((tmp_path / d / "summary.json").read_text())["test_accuracy"] for d in ("dev", "cpu")}
    print(f"digits MLP K=2 N=2, 20 epochs: test accuracy {kind} {acc['dev']:.4f}, cpu {acc['cpu']:.4f}")
    # The target is 0.5 points, read from this print (gpu-check.sh keeps it). Asserted
    # is 3 points on CUDA: rounding alone moves this run further (on the CPU, float32 against
    # float64 of the same run: 97.78 % against 95.56 %; the test set is 360 samples, 0.28
    # points each). The simulator's arithmetic is the CPU's: the same accuracy.
    assert abs(acc["dev"] - acc["cpu"]) <= (0.03 if kind == "cuda" else 0.0), acc
    assert cpu.returncode == 0
