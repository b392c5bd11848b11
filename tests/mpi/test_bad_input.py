"""Bad input under real ranks: each case ends the whole job with a clear message, no hang.

Pure checks (split points, sampler sizes, checkpoint files, names) are unit-tested in
tests/unit/test_bad_input_unit.py; here the same inputs go through `mpirun ... python -m
dpsgs train` or a rank program, so the test also shows that no rank is left waiting.
"""

from __future__ import annotations

import importlib.util
import os
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_trial import REPO, train_args  # noqa: E402
from launcher import mpirun, rank_pythonpath, run_ranks  # noqa: E402

needs_trainer = pytest.mark.skipif(importlib.util.find_spec("dpsgs.job.trainer") is None,
                                   reason="dpsgs.job.trainer not written yet")
needs_core = pytest.mark.skipif(importlib.util.find_spec("dpsgs._C") is None,
                                reason="dpsgs._C not built yet")


def _train(nprocs: int, k: int, n: int, run_dir: Path, *extra: str,
           timeout: float = 120.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=rank_pythonpath())
    env.pop("DPSGS_FAULT", None)
    cmd = [mpirun(), "-n", str(nprocs), sys.executable, "-m", "dpsgs",
           *train_args(k, n, str(run_dir), timeout=10.0, epochs=1), *extra]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"HANG: {' '.join(cmd)} still running after {timeout}s")


def _fails_with(p: subprocess.CompletedProcess, *messages: str) -> None:
    out = p.stdout + p.stderr
    detail = f"exit {p.returncode}\n{out[-4000:]}"
    assert p.returncode != 0, detail
    for m in messages:
        assert m in out, f"missing {m!r}\n{detail}"


def test_unknown_model_fails_on_every_rank_before_mpi_work(tmp_path):
    p = _train(2, 2, 1, tmp_path, "--model", "resnet999")
    _fails_with(p, "dpsgs train: error: unknown model 'resnet999'; known models: mlp")


def test_missing_data_folder(tmp_path):
    missing = tmp_path / "no-cifar"
    p = _train(2, 2, 1, tmp_path, "--dataset", "cifar10", "--data-dir", str(missing))
    _fails_with(p, f"CIFAR-10 folder '{missing}' does not exist")


@needs_trainer
def test_world_size_differs_from_k_times_n(tmp_path):
    p = _train(3, 2, 2, tmp_path)
    _fails_with(p, "world size 3 does not match the grid: K*N = 2*2 = 4 ranks needed")


# more stages than the model has cut points: tests/unit/test_reference.py::test_prepare_errors
# (the MLP can be cut in 7 places: 8 ranks to reach the refusal under mpirun)


@needs_trainer
def test_split_point_out_of_range(tmp_path):
    p = _train(2, 2, 1, tmp_path, "--split", "99")
    _fails_with(p, "cannot split mlp before top-level module 99: it has 4 (0, 1, 2, 3)")


@needs_trainer
def test_dataset_smaller_than_one_global_batch(tmp_path):
    p = _train(2, 2, 1, tmp_path, "--synthetic-samples", "4")
    _fails_with(p, "dataset of 4 samples is smaller than one global batch")


@needs_trainer
def test_dataset_shorter_than_the_pipeline_depth_still_trains(tmp_path):
    # K = 3 stages but one batch per epoch: every epoch is warm-up and flush only. Policy:
    # allowed (the plan covers it), not an error.
    p = _train(3, 3, 1, tmp_path, "--synthetic-samples", "8")
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "final test accuracy" in p.stdout


@needs_trainer
def test_batch_size_not_divisible_by_micro_batches(tmp_path):
    p = _train(2, 2, 1, tmp_path, "--schedule", "sync", "--micro-batches", "3")
    _fails_with(p, "batch_size 8 is not divisible by micro_batches 3")


@needs_trainer
def test_nonfinite_loss_stops_every_rank_naming_step_stage_tensor(tmp_path):
    p = _train(2, 2, 1, tmp_path, "--lr", "1e30", "--on-nonfinite", "stop")
    _fails_with(p, "dpsgs: error: non-finite ")
    # every rank stops together; rank 0 says so once
    assert p.stderr.count("dpsgs: error:") == 1, p.stderr[-4000:]
    assert re.search(r"non-finite (loss|gradient) \((NaN|Inf|NaN and Inf)\) at step \d+, "
                     r"stage \d \(rank \d\), tensor '[^']+'; training stopped", p.stderr), \
        p.stderr[-4000:]


@needs_trainer
def test_nonfinite_skip_policy_finishes(tmp_path):
    p = _train(2, 2, 1, tmp_path, "--lr", "1e30", "--on-nonfinite", "skip")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "skipping this update (--on-nonfinite skip; 1 skipped on this rank)" in out, \
        out[-4000:]


@needs_trainer
def test_checkpoint_from_another_grid(tmp_path):
    first = _train(2, 2, 1, tmp_path)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    p = _train(2, 1, 2, tmp_path, "--resume", "auto")        # the run's own settings refuse it
    _fails_with(p, "with other identity settings: --stages was 2, now 1; --replicas was 1, now 2")
    # overriding them on purpose reshards the checkpoint (dpsgs.job.reshard; the refusal of an
    # unnamed grid change at the checkpoint itself: tests/unit/test_reshard_unit.py)
    p = _train(2, 1, 2, tmp_path, "--resume", "auto", "--override", "stages", "replicas",
               "synthetic_samples")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "from 2x1 to 1x2 (split ['1.1'] -> [])" in out, out[-4000:]
    assert "N=1 -> N=2: per-replica batch 8 -> 4, keeping the global batch 8" in out, out[-4000:]


@needs_trainer
def test_truncated_checkpoint_on_resume(tmp_path):
    first = _train(2, 2, 1, tmp_path)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    ckpts = sorted((tmp_path / "checkpoints").glob("*/stage1.pt"))
    assert ckpts, list(tmp_path.rglob("*"))
    for shard in ckpts:
        shard.write_bytes(shard.read_bytes()[:64])
    record = json.loads((tmp_path / "run.json").read_text())
    record.pop("finished")                       # as after a crash following the last save
    (tmp_path / "run.json").write_text(json.dumps(record))
    p = _train(2, 2, 1, tmp_path, "--resume", str(ckpts[-1].parent))
    _fails_with(p, "stage1.pt is truncated or overwritten")


@needs_core
@pytest.mark.parametrize("change, received", [("shape", "received dtype float32 shape (5,)"),
                                               ("dtype", "received dtype float64 shape (4,)")])
def test_stage_output_shape_or_dtype_changes_mid_run(change, received):
    run = run_ranks(2, "channel_mismatch_ranks.py", change, timeout=60, expect_ok=False)
    assert run.returncode != 0, run.tail()
    assert ("Channel 'act s0->s1' (rank 0 -> rank 1, tag 5) message #1 on rank 1 from rank 0: "
            "tensor 0 of 1: expected dtype float32 shape (4,)") in run.stderr, run.tail()
    assert received in run.stderr, run.tail()
