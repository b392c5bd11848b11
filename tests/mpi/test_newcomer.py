"""The newcomer's list (issue 16 item 4, issue 17's --device auto), under real ranks and from a
folder outside the repository with no PYTHONPATH: what a new user sees first.

- the run's first line names model, dataset, grid and device; the device is recorded;
- --device auto on a host whose ranks would share a GPU runs on the CPU and says why, once;
- --device cuda without what it needs names the first thing missing, once;
- --data-dir without a dataset that reads it is an error;
- --trace writes the files its help names;
- your own data in every accepted form gives bit-identical metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launcher import mpirun, run_ranks  # noqa: E402

NO_PATH = {"PYTHONPATH": "", "OMP_NUM_THREADS": "1"}    # dpsgs must come from the venv itself


def _cli(nprocs: int, *args: str, cwd: Path, timeout: float = 150.0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("DPSGS_")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [mpirun(), "-n", str(nprocs), sys.executable, "-m", "mpi4py", "-m", "dpsgs", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"HANG: {' '.join(cmd)} still running after {timeout}s")


TINY = ["train", "-K", "2", "--model", "mlp", "--dataset", "digits", "--epochs", "1",
        "--no-progress", "--balance", "params", "--timeout", "60"]


def test_first_line_device_recorded_and_trace_files_as_the_help_says(tmp_path: Path) -> None:
    p = _cli(2, *TINY, "--device", "cpu", "--run-dir", "run", "--trace", "traces/t.json", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    first = ("dpsgs: model mlp, dataset digits, grid K×N = 2×1 (2 ranks), fdg schedule, device cpu")
    assert lines[0] == first and p.stdout.count("dpsgs: model ") == 1, p.stdout
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert {k: run["history"][0][k] for k in ("model", "dataset", "device")} == \
        {"model": "mlp", "dataset": "digits", "device": "cpu"}
    assert "device_why" not in run["history"][0]                 # named, not chosen
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["model"], summary["dataset"], summary["device"]) == ("mlp", "digits", "cpu")
    # --trace: the help's pattern, and exactly the files it names
    help_text = subprocess.run([sys.executable, "-m", "dpsgs", "train", "--help"], capture_output=True,
                               text=True, cwd=tmp_path, env={**os.environ, **NO_PATH}).stdout
    assert "--trace t.json writes t.rankR.json" in " ".join(help_text.split())
    assert sorted(f.name for f in (tmp_path / "traces").iterdir()) == ["t.rank0.json", "t.rank1.json"]
    assert json.loads((tmp_path / "traces" / "t.rank1.json").read_text())["traceEvents"]


def test_auto_runs_on_cpu_where_ranks_would_share_a_gpu_and_says_why_once(tmp_path: Path) -> None:
    run = run_ranks(2, "newcomer_ranks.py", "auto-shared", str(tmp_path / "run"), timeout=150)
    why = ("2 ranks on host gpu-host share 1 GPU(s): rank 1 (replica 0, stage 1) would use rank 0 "
           "(replica 0, stage 0)'s GPU GPU-0 (NCCL needs one GPU per rank)")
    first = (f"dpsgs: model Sequential (given), dataset toy (given), grid K×N = 2×1 (2 ranks), fdg "
             f"schedule, device cpu (--device auto: {why})")
    assert run.stdout.splitlines()[0] == first, run.tail()
    said = [l for l in (run.stdout + run.stderr).splitlines() if "share 1 GPU" in l]
    assert len(said) == 2 and said[1].startswith("SUMMARY "), run.tail()    # printed once
    summary = json.loads(run.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    assert summary == {"device": "cpu", "device_why": why, "model": "Sequential (given)",
                       "dataset": "toy (given)"}
    entry = json.loads((tmp_path / "run" / "run.json").read_text())["history"][0]
    assert (entry["device"], entry["device_why"]) == ("cpu", why)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["device"] == "auto"   # as given


def test_cuda_without_a_cuda_torch_is_one_line_once(tmp_path: Path) -> None:
    run = run_ranks(2, "newcomer_ranks.py", "cuda-cpu-torch", str(tmp_path / "run"), timeout=150)
    line = "--device cuda: this torch (2.13.0+cpu) is a CPU build, not a CUDA one"
    assert sorted(l for l in run.stdout.splitlines() if "refused" in l) == \
        ["rank 0: refused", "rank 1: refused"], run.tail()
    said = [l for l in run.stderr.splitlines() if "--device cuda" in l]
    assert len(said) == 1 and line in said[0], run.tail()


def test_cuda_on_this_machine_names_what_is_missing_once(tmp_path: Path) -> None:
    from dpsgs.comm.device import cuda_missing, probe_cuda

    why = cuda_missing([probe_cuda()])
    if why is None:
        pytest.skip("this machine can train on CUDA")
    p = _cli(2, *TINY, "--device", "cuda", "--run-dir", "run", cwd=tmp_path)
    said = [l for l in p.stderr.splitlines() if "--device cuda" in l]
    assert p.returncode != 0 and len(said) == 1, p.stdout + p.stderr
    assert said[0].startswith(f"dpsgs: error: every rank: ValueError: --device cuda: {why} ")
    assert not (tmp_path / "run" / "run.json").exists()         # nothing started


def test_data_dir_without_a_dataset_that_reads_it(tmp_path: Path) -> None:
    p = _cli(2, *TINY, "--data-dir", str(tmp_path), cwd=tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.strip() == (f"dpsgs train: error: --data-dir {tmp_path}: --dataset digits reads "
                                f"no folder (only --dataset cifar10 does); drop --data-dir or name "
                                f"the dataset"), p.stderr


def test_every_data_form_gives_bit_identical_metrics(tmp_path: Path) -> None:
    run = run_ranks(2, "newcomer_ranks.py", "forms", str(tmp_path), timeout=240)
    got = {l.split()[1]: json.loads(l.split(" ", 2)[2]) for l in run.stdout.splitlines()
           if l.startswith("FORM ")}
    assert sorted(got) == ["dpsgs", "map-style", "pair", "tensordataset"], run.tail()
    numbers = {k: (v["test_loss"], v["test_accuracy"], v["final_train_loss"]) for k, v in got.items()}
    assert len(set(numbers.values())) == 1, numbers
    lines = {form: [(r["step"], r.get("loss")) for r in map(json.loads, (tmp_path / form / "metrics.jsonl")
                                                            .read_text().splitlines()) if "loss" in r]
             for form in got}
    assert len(lines["pair"]) > 10 and all(v == lines["pair"] for v in lines.values())
    assert [got[f]["dataset"] for f in ("pair", "tensordataset", "map-style", "dpsgs")] == \
        ["tensors (given)", "TensorDataset (given)", "Items (given)", "toy (given)"]
