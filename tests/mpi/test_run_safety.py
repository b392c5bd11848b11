"""Nothing lost, mixed or misattributed (real ranks): a run folder belongs to one run, a resume
never hides damage, every rank runs the same job, the end is bounded, one line per error.

Each test is a behaviour a user saw go wrong; the earlier run's files are held byte-identical
where they must not be touched."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_trial import REPO, TIMEOUT, train_args  # noqa: E402
from launcher import mpirun, rank_pythonpath  # noqa: E402

from dpsgs.job.checkpoint import committed_checkpoints, read_manifest  # noqa: E402


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=rank_pythonpath())
    env.pop("DPSGS_FAULT", None)
    env.update(extra)
    return env


def _run(run_dir: Path, *extra: str, n: int = 2, epochs: int = 2, env: dict | None = None,
         timeout: float = 150.0, k: int = 2, job_timeout: float = 20.0) -> subprocess.CompletedProcess:
    """`timeout`: the whole mpirun's; `job_timeout`: the job's --timeout (the tests that wait
    it out use the fault trials' short one)."""
    cmd = [mpirun(), "-n", str(n), sys.executable, "-m", "dpsgs",
           *train_args(k, n // k, str(run_dir), timeout=job_timeout, epochs=epochs), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), cwd=REPO,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _tail(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (the lock and logs aside) -> its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock" and "logs" not in p.parts}


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("dpsgs: error") or " failed: " in line]


# -- 1. run folders have an owner --------------------------------------------------------------

def test_fresh_run_into_a_used_folder_is_refused_and_touches_nothing(tmp_path: Path) -> None:
    first = _run(tmp_path, epochs=1)
    assert first.returncode == 0, _tail(first)
    before = _snapshot(tmp_path)
    again = _run(tmp_path, "--seed", "7", epochs=1)
    assert again.returncode != 0
    assert f"run folder {tmp_path} already holds run" in again.stderr, _tail(again)
    assert "continue it with --resume auto, or choose a new --run-dir" in again.stderr
    assert len(_error_lines(again.stderr)) == 1 and "Traceback" not in again.stderr, _tail(again)
    assert _snapshot(tmp_path) == before


def test_a_second_live_job_on_the_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    cmd = [mpirun(), "-n", "2", sys.executable, "-m", "dpsgs",
           *train_args(2, 1, str(tmp_path), timeout=20.0, epochs=500), "--checkpoint-every", "0"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                             cwd=REPO, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (tmp_path / "metrics.jsonl").exists():
            time.sleep(0.2)
        assert first.poll() is None, "the first job ended too soon"
        second = _run(tmp_path, "--resume", "auto")
        assert second.returncode != 0
        assert f"run folder {tmp_path} is in use by a live job (pid" in second.stderr, _tail(second)
        assert first.poll() is None                     # the live job goes on
    finally:
        first.kill()
        first.communicate()


def test_run_dir_that_is_a_file_is_one_clear_line(tmp_path: Path) -> None:
    target = tmp_path / "afile"
    target.write_text("x")
    bad = _run(target, epochs=1)
    assert bad.returncode != 0
    lines = _error_lines(bad.stderr)
    assert len(lines) == 1 and f"--run-dir {target}: is a file, not a folder" in lines[0], _tail(bad)
    assert "Traceback" not in bad.stderr
    under = _run(target / "sub", epochs=1)
    assert under.returncode != 0 and "cannot create it" in under.stderr, _tail(under)


# -- 2. --resume auto hides no damage ------------------------------------------------------------

def test_damaged_newest_checkpoint_is_an_error_unless_fallback(tmp_path: Path) -> None:
    run = _run(tmp_path, "--keep-checkpoints", "0", epochs=2)
    assert run.returncode == 0, _tail(run)
    older, newest = committed_checkpoints(tmp_path)[-2:]
    # make the run unfinished (a crash after the last save), then damage its newest checkpoint
    record = json.loads((tmp_path / "run.json").read_text())
    record.pop("finished")
    (tmp_path / "run.json").write_text(json.dumps(record))
    shard = newest / "stage1.pt"
    shard.write_bytes(shard.read_bytes()[:50])
    before = _snapshot(tmp_path)
    refused = _run(tmp_path, "--resume", "auto", epochs=2)
    assert refused.returncode != 0
    assert f"checkpoint {newest} cannot be resumed: shard {shard} is truncated or overwritten: 50 bytes" \
        in refused.stderr, _tail(refused)
    assert "--resume-fallback" in refused.stderr and _snapshot(tmp_path) == before
    fell = _run(tmp_path, "--resume", "auto", "--resume-fallback", epochs=2)
    assert fell.returncode == 0, _tail(fell)
    assert f"checkpoint {newest} cannot be resumed" in fell.stderr and "skipped" in fell.stderr
    assert f"resumed from {older}" in fell.stderr, _tail(fell)


def test_a_finished_run_says_so_and_changes_nothing(tmp_path: Path) -> None:
    run = _run(tmp_path, epochs=1)
    assert run.returncode == 0, _tail(run)
    before = _snapshot(tmp_path)
    again = _run(tmp_path, "--resume", "auto", epochs=1)
    assert again.returncode == 0, _tail(again)
    assert f"run folder {tmp_path} holds a finished run: nothing to resume" in again.stderr, _tail(again)
    assert "final test accuracy" in again.stdout
    assert _snapshot(tmp_path) == before


def test_a_run_killed_after_its_last_checkpoint_keeps_its_results(tmp_path: Path) -> None:
    # regression: a resume with nothing left to train wrote a summary of nulls and a final
    # record of 0 steps over the finished job's results
    run = _run(tmp_path, epochs=1)
    assert run.returncode == 0, _tail(run)
    done = json.loads((tmp_path / "summary.json").read_text())
    record = json.loads((tmp_path / "run.json").read_text())
    record.pop("finished")          # as if killed between the last checkpoint and the end
    (tmp_path / "run.json").write_text(json.dumps(record))
    again = _run(tmp_path, "--resume", "auto", epochs=1)
    assert again.returncode == 0, _tail(again)
    after = json.loads((tmp_path / "summary.json").read_text())
    assert after["test_accuracy"] == done["test_accuracy"] and after["test_loss"] == done["test_loss"]
    assert after["final_train_loss"] == done["final_train_loss"] and after["iterations"] == done["iterations"]
    assert json.loads((tmp_path / "run.json").read_text())["finished"] is True


def test_resume_with_other_identity_settings_needs_an_override(tmp_path: Path) -> None:
    first = _run(tmp_path, "--checkpoint-every", "1", "--max-steps", "8", epochs=3)
    assert first.returncode == 0, _tail(first)
    refused = _run(tmp_path, "--resume", "auto", epochs=4)
    assert refused.returncode != 0
    assert "with other identity settings: --epochs was 3, now 4; --max-steps was 8, now None" \
        in refused.stderr, _tail(refused)
    ok = _run(tmp_path, "--resume", "auto", "--override", "epochs", "max_steps", epochs=4)
    assert ok.returncode == 0, _tail(ok)
    history = json.loads((tmp_path / "run.json").read_text())["history"]
    assert history[-1]["overrides"] == {"epochs": {"was": 3, "now": 4}, "max_steps": {"was": 8, "now": None}}
    # the run continued its own checkpoints: every manifest names this run
    run_id = json.loads((tmp_path / "run.json").read_text())["run_id"]
    assert {read_manifest(c)["meta"]["run_id"] for c in committed_checkpoints(tmp_path)} == {run_id}


def test_resumed_metrics_drop_the_redone_steps(tmp_path: Path) -> None:
    died = _run(tmp_path, env=_env(DPSGS_FAULT="rank=1,step=13,phase=forward,kind=sigkill"), epochs=2)
    assert died.returncode != 0
    resumed = _run(tmp_path, "--resume", "auto", epochs=2)
    assert resumed.returncode == 0, _tail(resumed)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "test_loss" not in line]
    assert steps == list(range(len(steps))), steps      # each step once, in order


# -- 3. every rank runs the same job -------------------------------------------------------------

def _mpmd(run_dir: Path, a: list[str], b: list[str]) -> subprocess.CompletedProcess:
    base = [sys.executable, "-m", "dpsgs", *train_args(2, 2, str(run_dir), timeout=20.0, epochs=1)]
    cmd = [mpirun(), "-n", "3", *base, *a, ":", "-n", "1", *base, *b]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120,
                          stdin=subprocess.DEVNULL)


def test_ranks_launched_with_another_lr_are_named(tmp_path: Path) -> None:
    run = _mpmd(tmp_path, ["--lr", "0.1"], ["--lr", "0.2"])
    assert run.returncode != 0
    lines = _error_lines(run.stderr)
    assert len(lines) == 1, _tail(run)
    assert ("the ranks do not run the same job: --lr is 0.1 on rank 0 (replica 0, stage 0), rank 1 "
            "(replica 0, stage 1), rank 2 (replica 1, stage 0) but 0.2 on rank 3 (replica 1, stage 1)") \
        in lines[0], _tail(run)


def test_ranks_launched_with_another_batch_size_are_named_not_called_dead(tmp_path: Path) -> None:
    run = _mpmd(tmp_path, [], ["--batch-size", "4"])
    assert run.returncode != 0
    assert "--batch-size is 8 on" in run.stderr and "but 4 on rank 3 (replica 1, stage 1)" in run.stderr, _tail(run)
    assert "dead or stuck" not in run.stderr


# -- 4. a bounded end ----------------------------------------------------------------------------

def test_a_rank_that_stops_after_training_ends_the_job_within_the_timeout(tmp_path: Path) -> None:
    start = time.monotonic()
    run = _run(tmp_path, env=_env(DPSGS_FAULT="rank=1,step=0,phase=end,kind=hang"), epochs=1,
               job_timeout=TIMEOUT)
    took = time.monotonic() - start
    assert run.returncode != 0, _tail(run)
    assert "end-of-job agreement timed out" in run.stderr and "rank 1" in run.stderr, _tail(run)
    assert took < TIMEOUT + 45, took     # --timeout: not the hung rank's hour


def test_sigterm_in_the_first_second_takes_the_clean_path(tmp_path: Path) -> None:
    # the clean path under test, not the stop grace: a loaded machine may take longer than
    # the default 15 s to start up (tests/mpi/test_operator_failures.py tests the grace)
    cmd = [mpirun(), "-n", "2", sys.executable, "-m", "dpsgs",
           *train_args(2, 1, str(tmp_path), timeout=20.0, epochs=50), "--stop-grace", "120"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            cwd=REPO, stdin=subprocess.DEVNULL)
    time.sleep(1.0)                      # python starting, torch and MPI loading: no job yet
    proc.send_signal(signal.SIGTERM)     # hydra forwards it to every rank
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    assert "SIGTERM received: stopping at step" in err, err[-3000:]


# -- 5. one error, one clear line ----------------------------------------------------------------

def test_a_bad_split_is_one_line_from_rank_0_with_tracebacks_in_the_logs(tmp_path: Path) -> None:
    bad = _run(tmp_path / "run", "--split", "99", n=4, epochs=1)
    assert bad.returncode != 0
    lines = _error_lines(bad.stderr)
    assert len(lines) == 1 and "every rank: SplitError: cannot split mlp before top-level " \
        "module 99" in lines[0], _tail(bad)
    assert "Traceback" not in bad.stderr and "Traceback" not in bad.stdout
    logs = sorted((tmp_path / "run" / "logs").glob("rank*.log"))
    assert [p.name for p in logs] == [f"rank{r}.log" for r in range(4)]
    assert all("Traceback" in p.read_text() for p in logs)


def test_an_argument_mistake_is_one_short_line(tmp_path: Path) -> None:
    cmd = [mpirun(), "-n", "4", sys.executable, "-m", "dpsgs", "train", "--stagez", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60)
    assert run.returncode != 0
    assert run.stderr.count("error: unrecognized arguments: --stagez") == 1, _tail(run)
    assert "usage:" not in run.stderr


def test_ctrl_c_is_one_line_and_no_traceback(tmp_path: Path) -> None:
    cmd = [mpirun(), "-n", "2", sys.executable, "-m", "dpsgs",
           *train_args(2, 1, str(tmp_path), timeout=20.0, epochs=500), "--checkpoint-every", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            cwd=REPO, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (tmp_path / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert err.count("dpsgs: interrupted") == 1, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]


def test_allreduce_timeouts_name_job_ranks_with_replica_and_stage(tmp_path: Path) -> None:
    # rank 3 (replica 1, stage 1) stops before a backward: its stage group's all-reduce waits
    run = _run(tmp_path, n=4, env=_env(DPSGS_FAULT="rank=3,step=5,phase=backward,kind=hang"),
               epochs=1, timeout=120, job_timeout=TIMEOUT)
    assert run.returncode != 0
    timeouts = [line for line in run.stderr.splitlines() if "did not complete within" in line
                or "no progress after" in line or "timed out" in line]
    assert timeouts, _tail(run)
    for line in timeouts:       # every rank named is a job rank with its place in the grid
        assert "(replica" in line, line


def test_metrics_lines_carry_their_batchs_epoch_without_per_epoch_flushes(tmp_path: Path) -> None:
    # regression: without --flush-every-epoch the run is one segment and every line said epoch 0
    run = _run(tmp_path, "--no-flush-every-epoch", epochs=2)
    assert run.returncode == 0, _tail(run)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in lines if "loss" in m and "test_loss" not in m]
    assert {m["epoch"] for m in trained} == {0, 1}
    assert [m["epoch"] for m in trained] == sorted(m["epoch"] for m in trained)
