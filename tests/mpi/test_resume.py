"""Resume with real ranks: step numbering continues, the checkpoint's split is kept, and a
final checkpoint cut mid-epoch by --max-steps gets its own tag and batch offset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from legacy import make_legacy  # noqa: E402
from test_preempt import _assert_same, _states, _tail, _train  # noqa: E402

from dpsgs.job.checkpoint import latest_checkpoint, read_manifest  # noqa: E402
from dpsgs.job.metrics import read_metrics  # noqa: E402


def test_resumed_run_continues_the_step_numbering(tmp_path: Path) -> None:
    k, n = 2, 1
    first = _train(k, n, tmp_path, epochs=2)
    assert first.returncode == 0, _tail(first)
    files = ["metrics.jsonl", *(f"metrics.rank{r}.jsonl" for r in range(k * n))]
    before = {f: read_metrics(tmp_path / f) for f in files}
    resumed = _train(k, n, tmp_path, "--resume", "auto", "--override", "epochs", epochs=3)
    assert resumed.returncode == 0, _tail(resumed)
    for f in files:
        old, new = before[f], read_metrics(tmp_path / f)[len(before[f]):]
        # 2 epochs x (8 batches + 2 flush steps) = steps 0..19; the 3rd epoch is 20..29
        steps = [m["step"] for m in new if "test_loss" not in m]   # evals repeat a step
        assert old[-1]["step"] == 19 and steps == list(range(20, 30)), (f, steps)
    # regression: run.json's final record counted the last job only (10 steps, 8 batches)
    final = json.loads((tmp_path / "run.json").read_text())["final"]
    assert (final["steps"], final["iterations"]) == (30, 24), final


def test_resume_keeps_the_checkpoints_split_under_balance_time(tmp_path: Path) -> None:
    k, n = 2, 1
    # balanced by parameter count; the balance is operational (a resume may change it), the
    # split comes from the checkpoint, printed once and recorded
    first = _train(k, n, tmp_path, "--balance", "params", epochs=1)
    assert first.returncode == 0, _tail(first)
    split = json.loads((tmp_path / "summary.json").read_text())["split"]
    assert split == ["1.1"]               # module paths: before the ReLU of block 1
    said = [ln for ln in first.stderr.splitlines() if "split: mlp into 2 stages" in ln]
    assert said == ["dpsgs: split: mlp into 2 stages before '1.1' (balanced by params; stage "
                    "costs 18690, 8908 parameters)"], _tail(first)
    resumed = _train(k, n, tmp_path, "--balance", "time", "--resume", "auto", "--override", "epochs",
                     epochs=2)
    assert resumed.returncode == 0, _tail(resumed)
    said = [ln for ln in resumed.stderr.splitlines() if "split: mlp into 2 stages" in ln]
    assert said == ["dpsgs: split: mlp into 2 stages before '1.1' (the checkpoint's)"], _tail(resumed)
    assert json.loads((tmp_path / "summary.json").read_text())["split"] == split
    assert read_manifest(latest_checkpoint(tmp_path))["meta"]["split"] == split
    history = json.loads((tmp_path / "run.json").read_text())["history"]
    assert [(h["split"], h["split_by"]) for h in history] == [(split, "params"),
                                                               (split, "checkpoint")]
    clash = _train(k, n, tmp_path, "--split", "1", "--resume", "auto", "--override", "epochs", epochs=3)
    assert clash.returncode != 0
    assert "with other identity settings: --split was None, now [1]" in clash.stderr, _tail(clash)


def test_final_checkpoint_mid_epoch_gets_its_own_tag(tmp_path: Path) -> None:
    k, n = 2, 1
    epoch_end = _train(k, n, tmp_path, "--max-steps", "8")       # 8 batches per epoch
    assert epoch_end.returncode == 0, _tail(epoch_end)
    epoch1 = tmp_path / "checkpoints" / "epoch1" / "manifest.json"
    saved = epoch1.read_bytes()
    mid = _train(k, n, tmp_path, "--resume", "auto", "--max-steps", "12", "--override", "max_steps")
    assert mid.returncode == 0, _tail(mid)
    assert epoch1.read_bytes() == saved
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt == tmp_path / "checkpoints" / "e1b4", (ckpt, _tail(mid))
    meta = read_manifest(ckpt)["meta"]
    assert (meta["epoch"], meta["batch"], meta["step"]) == (1, 4, 12), meta
    rest = _train(k, n, tmp_path, "--resume", "auto", "--override", "max_steps")
    assert rest.returncode == 0, _tail(rest)
    assert f"resumed from {ckpt}" in rest.stderr, _tail(rest)
    assert json.loads((tmp_path / "summary.json").read_text())["iterations"] == 3 * 8 - 12
    assert read_manifest(latest_checkpoint(tmp_path))["meta"]["step"] == 3 * 8


def test_resume_keeps_each_replicas_batchnorm_statistics(tmp_path: Path) -> None:
    # regression: only replica 0's shard was saved, so after a resume every replica
    # evaluated with replica 0's running statistics and the test loss moved
    from launcher import run_ranks

    def loss(run) -> str:
        return next(line for line in run.stdout.splitlines() if line.startswith("test_loss "))

    straight = run_ranks(2, "bn_resume_ranks.py", str(tmp_path / "a"), "0", timeout=120)
    died = run_ranks(2, "bn_resume_ranks.py", str(tmp_path / "b"), "0", timeout=120, expect_ok=False,
                     env={"DPSGS_FAULT": "rank=1,step=9,phase=forward,kind=sigkill"})
    assert died.returncode != 0 and "test_loss" not in died.stdout, died.tail()
    resumed = run_ranks(2, "bn_resume_ranks.py", str(tmp_path / "b"), "1", timeout=120)
    assert "resumed from" in resumed.stderr and "epoch1" in resumed.stderr, resumed.tail()
    assert loss(resumed) == loss(straight), (loss(resumed), loss(straight))


def test_an_older_checkpoint_resumes_an_nn_sequential_exactly(tmp_path: Path) -> None:
    # checkpoints of dpsgs before module paths: stage-local keys ("0.weight" of stage 1 is
    # the model's "2.weight"), integer split points; renamed on resume, same numbers
    k, n = 2, 1
    straight = _train(k, n, tmp_path / "a", "--split", "2", epochs=2)
    assert straight.returncode == 0, _tail(straight)
    first = _train(k, n, tmp_path / "b", "--split", "2", epochs=1)
    assert first.returncode == 0, _tail(first)
    make_legacy(latest_checkpoint(tmp_path / "b"), [2], ["0", "1", "2", "3"])
    resumed = _train(k, n, tmp_path / "b", "--split", "2", "--resume", "auto", "--override",
                     "epochs", epochs=2)
    assert resumed.returncode == 0, _tail(resumed)
    assert "split: mlp into 2 stages before '2' (the checkpoint's)" in resumed.stderr
    _assert_same(_states(tmp_path / "a", k, n), _states(tmp_path / "b", k, n))
    assert read_manifest(latest_checkpoint(tmp_path / "b"))["meta"]["param_names"] == "module paths"


def test_an_older_checkpoint_of_another_model_is_refused_in_one_line(tmp_path: Path) -> None:
    from launcher import run_ranks

    run_ranks(2, "refusal_ranks.py", "mpi4py", "train", str(tmp_path), timeout=120)
    make_legacy(latest_checkpoint(tmp_path), [2], ["fc1", "fc2", "fc3"])
    run = run_ranks(2, "refusal_ranks.py", "mpi4py", "resume", str(tmp_path), timeout=120)
    lines = [ln for ln in run.stderr.splitlines() if "older dpsgs" in ln]
    assert len(lines) == 1 and "which split ReluNet by its children and dropped what its " \
        "forward does between them: it cannot be resumed; start a new run" in lines[0], run.tail()


def test_a_resume_before_the_first_checkpoint_keeps_the_runs_split(tmp_path: Path) -> None:
    # killed before its first checkpoint: the resume starts over, with the split run.json
    # recorded (a --balance time profile would otherwise be taken again and could differ)
    k, n = 2, 1
    died = _train(k, n, tmp_path, "--balance", "time", epochs=1,
                  fault="rank=1,step=3,phase=forward,kind=sigkill")
    assert died.returncode != 0 and latest_checkpoint(tmp_path) is None, _tail(died)
    split = json.loads((tmp_path / "run.json").read_text())["split"]
    resumed = _train(k, n, tmp_path, "--balance", "params", "--resume", "auto", epochs=1)
    assert resumed.returncode == 0, _tail(resumed)
    said = [ln for ln in resumed.stderr.splitlines() if "split: mlp into 2 stages" in ln]
    assert said == [f"dpsgs: split: mlp into 2 stages before '{split[0]}' (the run's)"], _tail(resumed)
    assert json.loads((tmp_path / "summary.json").read_text())["split"] == split
