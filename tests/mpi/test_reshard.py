"""Resharding with real ranks: a 2x2 checkpoint resumed on 1x2, 2x1, 4x1, 1x4, 3x1 and back
reassembles bit-identically (SGD momentum, AdamW); the issue's command continues a 2x2 run
as 1x2; a sync float64 run resumed at another K stays within 1e-12 of the uninterrupted one;
--elastic relaunches a 2x2 job that lost a rank on 2 ranks; export equals the run's accuracy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_trial import REPO  # noqa: E402
from launcher import mpirun, rank_pythonpath, run_ranks  # noqa: E402

from dpsgs.config import TrainConfig  # noqa: E402
from dpsgs.comm.grid import Grid  # noqa: E402
from dpsgs.job.checkpoint import latest_checkpoint, load_checkpoint, read_manifest  # noqa: E402
from dpsgs.job.export import export_state_dict  # noqa: E402
from dpsgs.job.whole_state import WholeState, read_whole  # noqa: E402

GRIDS = ("1x2", "2x1", "4x1", "1x4", "3x1")


def _args(k: int, n: int, run_dir: Path, *extra: str, epochs: int = 1, batch: int = 8) -> list[str]:
    """A tiny run: 128 synthetic samples, global batch 16 (8 batches an epoch)."""
    return ["train", "-K", str(k), "-N", str(n), "--model", "mlp", "--dataset", "synthetic",
            "--synthetic-shape", "16", "--synthetic-samples", "128", "--batch-size", str(batch),
            "--epochs", str(epochs), "--lr-schedule", "constant", "--balance", "params",
            "--timeout", "30", "--warn-after", "10", "--run-dir", str(run_dir), "--no-progress",
            *extra]


def _train(ranks: int, args: list[str], fault: str | None = None,
           timeout: float = 180.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=rank_pythonpath())
    env.pop("DPSGS_FAULT", None)
    if fault:
        env["DPSGS_FAULT"] = fault
    return subprocess.run([mpirun(), "-n", str(ranks), sys.executable, "-m", "dpsgs", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _tail(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"


def _same(a: object, b: object, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs: max |diff| {(a - b).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for key in a:
            _same(a[key], b[key], f"{where}[{key!r}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_whole_equal(a: WholeState, b: WholeState, where: str) -> None:
    _same(a.model, b.model, f"{where}: model")
    _same(a.optimizer, b.optimizer, f"{where}: optimizer state")
    _same(a.hyper, b.hyper, f"{where}: optimizer settings")
    assert a.param_order == b.param_order, where
    _same(a.position, b.position, f"{where}: position")
    assert a.optimizer, f"{where}: no optimizer state was saved at all"


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_2x2_resharded_to_every_grid_and_back_is_bit_identical(tmp_path: Path, optimizer: str) -> None:
    src = tmp_path / "src"
    extra = ["--optimizer", optimizer, "--momentum", "0.9", "--lr", "0.05"]
    first = _train(4, _args(2, 2, src, *extra))
    assert first.returncode == 0, _tail(first)
    ckpt = latest_checkpoint(src)
    cfg = TrainConfig.load(src / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({**cfg.to_dict(), "resume": None,
                                                      "run_dir": None}))
    run = run_ranks(4, "reshard_ranks.py", str(ckpt), str(tmp_path / "hops"),
                    str(tmp_path / "config.json"), *GRIDS, timeout=400)
    assert "DONE" in run.stdout, run.tail()
    saved = read_whole(ckpt)
    assert saved.optimizer and (saved.stages, saved.replicas) == (2, 2)
    # the manifest lists each shard's tensors: a resharded resume reads the shards it needs by it
    for row in read_manifest(ckpt)["shards"]:
        assert row["tensors"] == sorted(load_checkpoint(ckpt, Grid(2, 2), row["stage"])["model"]), row
    for grid in GRIDS:
        for name in (grid, f"{grid}-back"):
            there = latest_checkpoint(tmp_path / "hops" / name)
            whole = read_whole(there)
            k, n = (int(v) for v in (grid if name == grid else "2x2").split("x"))
            assert (whole.stages, whole.replicas) == (k, n), name
            _assert_whole_equal(saved, whole, f"2x2 -> {name}")


def test_2x2_run_continues_as_1x2_with_the_issues_command(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = _train(4, _args(2, 2, run_dir, "--optimizer", "adamw", "--lr", "0.01"))
    assert first.returncode == 0, _tail(first)
    # the issue's command (an epoch more, so there is something to continue)
    more = _train(2, _args(1, 2, run_dir, "--optimizer", "adamw", "--lr", "0.01", "--resume",
                           "auto", "--override", "stages", "epochs", epochs=2))
    assert more.returncode == 0, _tail(more)
    assert (f"dpsgs: resharding checkpoint {run_dir}/checkpoints/epoch1 from 2x2 to 1x2 "
            "(split ['1.1'] -> [])") in more.stderr, _tail(more)
    record = json.loads((run_dir / "run.json").read_text())
    last = record["history"][-1]
    assert last["reshard"] == {"from": "2x2", "to": "1x2", "split_was": ["1.1"], "split": []}
    assert last["overrides"]["stages"] == {"was": 2, "now": 1}
    assert record["finished"] and record["final"]["iterations"] == 16, record["final"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["stages"], summary["replicas"]) == (1, 2)
    assert (read_whole(latest_checkpoint(run_dir)).stages) == 1


def test_sync_float64_resumed_at_another_k_stays_within_1e_12(tmp_path: Path) -> None:
    sync = ["--schedule", "sync", "--dtype", "float64", "--micro-batches", "2"]
    ref = _train(2, _args(2, 1, tmp_path / "ref", *sync, epochs=2, batch=16))
    assert ref.returncode == 0, _tail(ref)
    half = _train(2, _args(2, 1, tmp_path / "run", *sync, epochs=1, batch=16))
    assert half.returncode == 0, _tail(half)
    rest = _train(3, _args(3, 1, tmp_path / "run", *sync, "--resume", "auto", "--override",
                           "stages", "epochs", epochs=2, batch=16))
    assert rest.returncode == 0, _tail(rest)
    a, b = read_whole(latest_checkpoint(tmp_path / "ref")), read_whole(latest_checkpoint(tmp_path / "run"))
    assert (a.stages, b.stages) == (2, 3) and a.position == b.position
    assert set(a.model) == set(b.model)
    worst = max(float((a.model[k] - b.model[k]).abs().max()) for k in a.model)
    assert worst <= 1e-12, f"resumed at K=3: parameters differ by {worst:.3g}"
    for name in a.optimizer:
        for key, t in a.optimizer[name].items():
            d = float((t - b.optimizer[name][key]).abs().max())
            assert d <= 1e-12, f"momentum of {name} differs by {d:.3g}"


def test_export_evaluates_in_plain_pytorch_as_the_run_did(tmp_path: Path) -> None:
    from dpsgs.job.data import load_dataset
    from dpsgs.job.models import build_model

    run_dir = tmp_path / "run"
    first = _train(4, _args(2, 2, run_dir, epochs=2))
    assert first.returncode == 0, _tail(first)
    out = tmp_path / "model.pt"
    cli = subprocess.run([sys.executable, "-m", "dpsgs", "checkpoint", "export", str(run_dir), str(out)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert cli.returncode == 0 and f"wrote {out}" in cli.stdout, cli.stderr
    sd = torch.load(out, weights_only=True)
    _, test = load_dataset("synthetic", None, (16,), 128, 0)
    torch.manual_seed(123)                 # any seed: every tensor comes from the export
    model = build_model("mlp", (16,), 10)
    model.load_state_dict(sd)              # strict: the whole model's own keys
    model.eval()
    with torch.no_grad():
        acc = float((model(test.x).argmax(1) == test.y).float().mean())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert abs(acc - summary["test_accuracy"]) < 1e-12, (acc, summary["test_accuracy"])
    same = export_state_dict(run_dir, bn="average")      # no BatchNorm: nothing to average
    _same(sd, same, "export")
    shown = subprocess.run([sys.executable, "-m", "dpsgs", "checkpoint", "inspect", str(run_dir)],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "grid: K=2 stages x N=2 replicas; split before '1.1'" in shown.stdout, shown.stdout
    assert "position: epoch 2, batch 0 next; 16 batches trained" in shown.stdout, shown.stdout
    assert "integrity: ok" in shown.stdout


def test_elastic_relaunch_of_a_2x2_job_that_lost_a_rank_finishes_on_2(tmp_path: Path) -> None:
    opts = ["--model", "mlp", "--dataset", "synthetic", "--synthetic-shape", "16",
            "--synthetic-samples", "256", "--batch-size", "8", "--epochs", "3", "--lr", "0.05",
            "--lr-schedule", "constant", "--balance", "params", "--timeout", "10",
            "--warn-after", "5", "--no-progress"]
    ref = _train(4, ["train", "-K", "2", "-N", "2", "--run-dir", str(tmp_path / "ref"), *opts])
    assert ref.returncode == 0, _tail(ref)
    # 16 batches an epoch + 2 flush steps: step 25 is mid-epoch 2; the relaunch on 2 ranks has
    # no rank 3, so the fault does not fire again
    env = dict(os.environ, OMP_NUM_THREADS="1", RANKS="4 2", RELAUNCH_DELAY="0",
               DPSGS_FAULT="rank=3,step=25,phase=forward,kind=sigkill",
               MPIRUN=mpirun(), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               PYTHONPATH=rank_pythonpath())
    run_dir = tmp_path / "run"
    loop = subprocess.run(["bash", str(REPO / "examples" / "mpirun_relaunch.sh"), str(run_dir), "2",
                           *opts], capture_output=True, text=True, env=env, cwd=REPO, timeout=400,
                          stdin=subprocess.DEVNULL)
    assert loop.returncode == 0, _tail(loop)
    assert "relaunch: attempt 2 on 2 ranks (K=2)" in loop.stderr, _tail(loop)
    assert "injected fault on rank 3" in loop.stdout + loop.stderr, _tail(loop)
    assert "dpsgs: --elastic: 2 ranks, so K=2 x N=1 (-N 1 was given)" not in loop.stderr
    assert ("dpsgs: N=2 -> N=1: per-replica batch 8 -> 16, keeping the global batch 16"
            in loop.stderr), _tail(loop)
    record = json.loads((run_dir / "run.json").read_text())
    last = record["history"][-1]
    assert last["reshard"]["from"] == "2x2" and last["reshard"]["to"] == "2x1", last
    assert last["reshard"]["elastic"] is True
    assert last["checkpoint"].endswith("epoch1"), last        # the last good checkpoint
    assert record["finished"] and record["final"]["iterations"] == 48, record["final"]
    got = record["final"]["test_accuracy"]
    want = json.loads((tmp_path / "ref" / "run.json").read_text())["final"]["test_accuracy"]
    print(f"elastic relaunch: test accuracy {got:.4f}, uninterrupted {want:.4f}")
    assert abs(got - want) <= 0.1, (got, want)
