"""CLI: complete --help, names checked before any MPI work, --config, --simulate, dispatch of
bench/plan, and plot writing PNGs from a synthetic metrics file."""

from __future__ import annotations

import dataclasses
import os
import json
import sys
import types
from pathlib import Path

import pytest

from dpsgs import cli
from dpsgs.config import TrainConfig
from dpsgs.job.metrics import MetricsLog


@pytest.fixture
def no_mpi(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any `import mpi4py` now fails: proves validation happens before MPI work."""
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)


def test_help_lists_every_option_with_defaults(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in out, f.name
        assert f.name in cli.HELP, f"no help text for TrainConfig.{f.name}"
    for flag in ("--simulate", "--config", "-K K", "-N N", "--no-progress"):
        assert flag in out
    assert "(default: fdg)" in out and "(default: 0.1)" in out and "{weights,recompute}" in out


def test_choices_agree_with_the_modules() -> None:
    from dpsgs.config import CHOICES
    from dpsgs.job.data import DATASET_NAMES
    from dpsgs.job.optim import LR_SCHEDULES, OPTIMIZERS

    # config.py keeps the choices, so --help loads no torch; the modules must agree with them
    assert list(CHOICES["dataset"]) == DATASET_NAMES
    assert CHOICES["optimizer"] == OPTIMIZERS and CHOICES["lr_schedule"] == LR_SCHEDULES


def test_top_level_help_has_the_command_lines(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "mpirun -n 4 python -m dpsgs train --stages 2 --replicas 2" in out
    assert all(c in out for c in ("train", "plot", "bench", "plan"))


def test_bad_names_fail_before_mpi(no_mpi: None, capsys: pytest.CaptureFixture,
                                   tmp_path: Path) -> None:
    assert cli.main(["train", "--model", "resnet21"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet21'" in err and "resnet20" in err and "wrn-16-4" in err
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--dataset", "mnist"])
    assert e.value.code == 2
    assert "invalid choice: 'mnist'" in capsys.readouterr().err
    assert cli.main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "x")]) == 2
    assert "CIFAR-10 folder" in capsys.readouterr().err
    assert cli.main(["train", "--dataset", "cifar10"]) == 2
    assert "needs --data-dir" in capsys.readouterr().err
    assert cli.main(["train", "--resume", "auto"]) == 2
    assert "--resume auto needs --run-dir" in capsys.readouterr().err
    assert cli.main(["train", "-K", "3", "--split", "2"]) == 2
    assert "--split needs K-1 = 2 split points, got [2]" in capsys.readouterr().err
    assert cli.main(["train", "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err


def test_options_map_onto_config(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(
        ["train", "-K", "3", "-N", "2", "--model", "wrn-16-4", "--no-progress", "--split", "2",
         "5", "--lr-milestones", "0.3", "0.6", "--max-steps", "7", "--shrink", "0.5"])
    c = cli.config_from_args(args)
    assert (c.stages, c.replicas, c.model, c.progress, c.split) == (3, 2, "wrn-16-4", False, [2, 5])
    assert c.lr_milestones == [0.3, 0.6] and c.max_steps == 7 and c.shrink == 0.5
    # --config: the file's values are defaults, explicit options win
    TrainConfig(stages=4, replicas=3, lr=0.02, model="resnet20").save(tmp_path / "c.json")
    argv = ["train", "--config", str(tmp_path / "c.json"), "--replicas", "1"]
    c = cli.config_from_args(cli.build_parser(cli._base_config(argv)).parse_args(argv))
    assert (c.stages, c.replicas, c.lr, c.model) == (4, 1, 0.02, "resnet20")


def test_simulate_runs_without_mpi(no_mpi: None, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("dpsgs.pipeline.reference")
    rc = cli.main(["train", "--simulate", "-K", "2", "--epochs", "1", "--max-steps", "6",
                   "--run-dir", str(tmp_path / "run"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "final test accuracy:" in out and str(tmp_path / "run") in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert TrainConfig.load(tmp_path / "run" / "config.json").stages == 2
    # regression: --resume auto was accepted and ran the whole job again, appending its
    # metrics to the finished run's
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    rc = cli.main(["train", "--simulate", "-K", "2", "--epochs", "1", "--max-steps", "6",
                   "--run-dir", str(tmp_path / "run"), "--no-progress", "--resume", "auto"])
    assert rc == 2 and "there is nothing to --resume" in capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before


def test_bench_and_plan_dispatch(monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("dpsgs.bench.fake")
    fake.main = lambda argv: seen.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dpsgs.bench.fake", fake)
    assert cli.main(["bench", "fake", "-b", "8", "--help"]) == 0
    assert seen == [["-b", "8", "--help"]]
    assert cli.main(["bench", "nosuchbench"]) == 2
    assert "'bench nosuchbench' is not available" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "dpsgs.planner.cli", None)    # as if not installed
    assert cli.main(["plan", "--gpus", "8"]) == 2
    assert "'plan' is not available" in capsys.readouterr().err


def write_run(run: Path) -> None:
    with MetricsLog(run / "metrics.jsonl") as log:
        for step in range(20):
            log.write({"step": step, "loss": 2.0 / (1 + step), "accuracy": step / 20,
                       "samples_per_s": 500.0 + step})
            if step % 10 == 9:
                log.write({"step": step, "epoch": step // 10, "test_loss": 1.0 / (1 + step),
                           "test_accuracy": 0.5 + step / 40})
    for rank in range(2):
        with MetricsLog(run / f"metrics.rank{rank}.jsonl") as log:
            for step in range(20):
                log.write({"step": step, "compute": 0.01, "channel": 0.002 * rank,
                           "reduce": 0.001})


def test_plot_writes_pngs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_run(tmp_path / "run")
    assert cli.main(["plot", str(tmp_path / "run")]) == 0
    plots = tmp_path / "run" / "plots"
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["accuracy.png", "loss.png", "throughput.png", "time.png"]
    for p in plots.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert str(plots / "loss.png") in capsys.readouterr().out


def test_plot_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "no metrics*.jsonl in" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "foo": 2}\n')
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "nothing to plot; record keys are ['foo', 'step']" in capsys.readouterr().err


def test_plot_series_and_ranks_in_one_file(tmp_path: Path) -> None:
    from dpsgs.job.plots import series

    recs = [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}, {"epoch": 0, "test_accuracy": 0.9},
            {"step": 2, "loss": "nan"}]
    assert series(recs, ("loss",)) == ([0.0, 1.0], [1.0, 0.5])        # "nan" strings skipped
    assert series(recs, ("test_accuracy",)) == ([1.0], [0.9])          # at the last step seen
    with MetricsLog(tmp_path / "metrics.jsonl") as log:
        for step in range(5):
            for rank in range(3):
                log.write({"step": step, "rank": rank, "compute": 0.1, "reduce": 0.01})
    from dpsgs.job.plots import plot_run

    assert [p.name for p in plot_run(tmp_path)] == ["time.png"]


def test_python_m_dpsgs_writes_whole_lines_under_pythonunbuffered() -> None:
    """-u / PYTHONUNBUFFERED (common in batch scripts) makes print() write a line's text and its
    newline apart, so two ranks' lines can merge in mpirun's output; `python -m dpsgs` makes
    both streams line-buffered (whole lines, one write each) before anything prints."""
    import subprocess
    import sys

    probe = ("import atexit, runpy, sys\n"
             "atexit.register(lambda: sys.__stderr__.write("
             "f'line-buffered {sys.stdout.line_buffering} {sys.stderr.line_buffering}\\n'))\n"
             "sys.argv = ['dpsgs', '--help']\n"
             "runpy.run_module('dpsgs', run_name='__main__', alter_sys=True)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # no test sitecustomize
    run = subprocess.run([sys.executable, "-u", "-c", probe], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert run.returncode == 0, run.stderr
    assert "line-buffered True True" in run.stderr and "train" in run.stdout
