"""The training bench's --device cuda without a GPU: refused in one line; the configurations,
reasons and command lines a GPU run would launch (a stand-in launcher records them); the
peers' device choice and step timing; CPU command lines exactly as before."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpsgs.bench import train
from dpsgs.bench import train_configs as tc
from dpsgs.bench.launch import SHARE_GPU
from dpsgs.bench.peers import common, ddp, pipe, single

__all__: list[str] = []

W = tc.Workload("mlp", "mlp", (3, 32, 32), 8, "test")


def _by_name(configs: list[tc.BenchConfig]) -> dict[str, tc.BenchConfig]:
    return {c.name: c for c in configs}


def _after_python(cmd: list[str]) -> list[str]:
    return cmd[cmd.index(sys.executable):]


def test_cuda_without_a_gpu_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    why = tc.cuda_unavailable()
    if why is None:
        pytest.skip("a GPU is visible here")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "run_workload", lambda *a: pytest.fail("ran"))
    assert train.main(["--device", "cuda", "--workload", "mlp", "--no-plot"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"dpsgs.bench.train: --device cuda: {why}; nothing was run"]
    assert list(tmp_path.iterdir()) == []                  # no run folder made
    import torch

    if torch.version.cuda is None:
        assert why == f"torch {torch.__version__} has no CUDA (a CPU build)"
    with pytest.raises(SystemExit):
        train.main(["--device", "tpu"])


def test_cpu_configurations_and_commands_are_unchanged(tmp_path: Path) -> None:
    configs = tc.bench_configs(4)
    assert configs == tc.bench_configs(4, "cpu", 8)
    assert {(c.device, c.share_gpu) for c in configs} == {("cpu", False)}
    out = tmp_path / "r.json"
    cmd = train.config_command(_by_name(configs)["torch-ddp"], W, 3, 1, [2], out)
    assert cmd[1:3] == ["-n", "2"] and _after_python(cmd) == [
        sys.executable, "-m", "dpsgs.bench.peers.ddp", "--model", "mlp", "--in-shape", "3,32,32",
        "--batch", "8", "--steps", "3", "--warmup", "1", "--threads", "1", "--out", str(out)]
    fdg = train.config_command(_by_name(configs)["dpsgs-fdg-weights"], W, 3, 1, [2], out)
    assert fdg[-2:] == ["--split", "2"] and "--device" not in fdg
    assert train.config_command(configs[0], W, 3, 1, None, out)[0] == sys.executable


def test_cuda_commands_share_a_gpu_only_when_ranks_outnumber_gpus(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    one = _by_name(tc.bench_configs(4, "cuda", gpus=1))
    assert {c.device for c in one.values()} == {"cuda"}
    assert not one["backprop-1rank"].share_gpu and one["torch-ddp"].share_gpu
    base = train.config_command(one["backprop-1rank"], W, 3, 1, None, out)
    assert base[:3] == [sys.executable, "-m", "dpsgs.bench.peers.single"]   # no mpirun
    assert base[-2:] == ["--device", "cuda"]
    ddp_cmd = train.config_command(one["torch-ddp"], W, 3, 1, None, out)
    assert ddp_cmd[1:3] == ["-n", "2"] and ddp_cmd[3:3 + len(SHARE_GPU)] == SHARE_GPU
    assert ddp_cmd[3 + len(SHARE_GPU):][:3] == [sys.executable, "-m", "dpsgs.bench.peers.ddp"]
    assert ddp_cmd[-2:] == ["--device", "cuda"]
    fdg = train.config_command(one["dpsgs-fdg-weights"], W, 3, 1, [2], out)
    assert fdg[3:3 + len(SHARE_GPU)] == SHARE_GPU
    assert _after_python(fdg)[:5] == [sys.executable, "-m", "mpi4py", "-m",
                                      "dpsgs.bench.peers.dpsgs_run"]
    assert fdg[-4:] == ["--split", "2", "--device", "cuda"]
    two = _by_name(tc.bench_configs(4, "cuda", gpus=2))
    for c in two.values():
        assert not c.share_gpu
        assert "bash" not in train.config_command(c, W, 3, 1, [2], out)


def test_the_share_wrapper_gives_each_rank_its_own_hostid() -> None:
    for env, hostid in (({"PMI_RANK": "3"}, "dpsgs-bench-3"),
                        ({"OMPI_COMM_WORLD_RANK": "1"}, "dpsgs-bench-1")):
        got = subprocess.run([*SHARE_GPU, "env"], capture_output=True, text=True, check=True,
                             env={"PATH": "/usr/bin:/bin", **env}).stdout.splitlines()
        assert f"NCCL_HOSTID={hostid}" in got and "NCCL_SOCKET_IFNAME=lo" in got
    kept = subprocess.run([*SHARE_GPU, "env"], capture_output=True, text=True, check=True,
                          env={"PATH": "/usr/bin:/bin", "PMI_RANK": "0",
                               "NCCL_SOCKET_IFNAME": "ib0"}).stdout.splitlines()
    assert "NCCL_SOCKET_IFNAME=ib0" in kept


def test_peers_without_a_gpu_form_are_not_run_with_the_reason() -> None:
    cuda = _by_name(tc.bench_configs(4, "cuda", gpus=1))
    for name in ("torch-pipe-gpipe", "torch-pipe-1f1b"):
        assert tc.unavailable_reason(cuda[name]) == (
            "not run on GPU: this bench's torch pipelining peer runs over gloo on CPU only "
            "(no NCCL/CUDA variant)")
    assert tc.unavailable_reason(cuda["single-2threads"]).startswith(
        "not run on GPU: intra-op CPU threads do not apply")
    why = tc.cuda_unavailable()
    if why is not None:     # this machine: every GPU configuration says what is missing
        for name in ("backprop-1rank", "torch-ddp", "dpsgs-fdg-weights", "dpsgs-dp"):
            assert tc.unavailable_reason(cuda[name]) == why
    assert tc.unavailable_reason(_by_name(tc.bench_configs(4))["torch-ddp"]) is None


def _fake_launch(calls: list[list[str]]):
    def launch(cmd: list[str], out: Path, threads: int, timeout: float) -> dict:
        calls.append(cmd)
        rec = {"runner": "stand-in", "step_times": [0.2, 0.1, 0.1], "batch": 8}
        if "dpsgs.bench.peers.ddp" in cmd:
            rec["compute_only_step"] = 0.08
        return {"status": "ok", "wall_s": 0.5, "result": rec}
    return launch


def test_a_cuda_run_launches_gpu_commands_and_reports_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Everything of a --device cuda run but the GPU: a stand-in launcher records the
    commands and answers with step times."""
    from dpsgs.comm import nccl

    calls: list[list[str]] = []
    monkeypatch.setattr(train, "cuda_unavailable", lambda: None)
    monkeypatch.setattr(tc, "cuda_unavailable", lambda: None)
    monkeypatch.setattr(train, "visible_gpus", lambda: 1)
    monkeypatch.setattr(train, "gpus_info", lambda: {"count": 1, "names": ["NVIDIA H200"],
                                                     "cuda": "13.0", "nccl": "2.28.9"})
    monkeypatch.setattr(nccl, "available", lambda: (True, ""))
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(train, "launch", _fake_launch(calls))
    only = "backprop-1rank,single-2threads,torch-ddp,torch-pipe-1f1b,dpsgs-fdg-weights"
    assert train.main(["--device", "cuda", "--workload", "mlp", "--model", "mlp", "--batch",
                       "8", "--steps", "2", "--warmup", "1", "--only", only, "--no-plot",
                       "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "train-mlp.json").read_text())
    assert doc["device"] == "cuda" and doc["gpus"]["count"] == 1
    by = {r["name"]: r for r in doc["results"]}
    assert by["torch-pipe-1f1b"]["status"] == "unavailable"
    assert "gloo on CPU only" in by["torch-pipe-1f1b"]["reason"]
    assert by["single-2threads"]["status"] == "unavailable"
    assert by["backprop-1rank"]["status"] == "ok" and not by["backprop-1rank"]["share_gpu"]
    assert by["torch-ddp"]["status"] == "ok" and by["torch-ddp"]["share_gpu"] is True
    assert by["torch-ddp"]["speedup"] == pytest.approx(1.0)     # same fake times
    assert by["dpsgs-fdg-weights"]["status"] == "ok"          # the trainer's --device cuda
    assert len(calls) == 3
    assert all(c[-2:] == ["--device", "cuda"] for c in calls)
    assert [("bash" in c) for c in calls] == [False, True, True]
    out = capsys.readouterr().out
    assert "# device cuda: 1 GPU(s) visible (NVIDIA H200)" in out
    assert "# SHARED GPU: torch-ddp, dpsgs-fdg-weights run more ranks than GPUs" in out
    assert "Training throughput on CUDA" in out
    assert "# shared GPU (several ranks per GPU over NCCL sockets): torch-ddp" in out
    assert "efficiency = speedup / ranks" in out


def test_gpu_index_by_local_rank() -> None:
    assert common.gpu_index({"MPI_LOCALRANKID": "3"}, 7, 2) == 1
    assert common.gpu_index({"OMPI_COMM_WORLD_LOCAL_RANK": "2"}, 0, 4) == 2
    assert common.gpu_index({}, 5, 4) == 1                    # no launcher variable: the rank
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        common.gpu_index({}, 0, 0)


def test_step_timer_waits_for_the_device_at_both_ends() -> None:
    waits: list[int] = []
    timer = common.StepTimer(sync=lambda: waits.append(len(waits)))
    timer.start()
    assert timer.stop() >= 0 and waits == [0, 1] and len(timer.times) == 1
    plain = common.StepTimer()
    plain.start()
    plain.stop()
    assert plain.sync is None and common.device_sync(None) is None


@pytest.mark.parametrize("peer", [single, ddp])
def test_peers_refuse_cuda_without_it(tmp_path: Path, peer) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    with pytest.raises(SystemExit) as e:
        peer.main(["--model", "mlp", "--batch", "4", "--out", str(tmp_path / "r.json"),
                   "--device", "cuda"])
    assert str(e.value.code) == (f"--device cuda: torch {torch.__version__} cannot use CUDA "
                                 "here (no CUDA build)") or "no GPU visible" in str(e.value.code)
    assert not (tmp_path / "r.json").exists()


def test_pipe_peer_has_no_gpu_form(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        pipe.main(["--model", "mlp", "--batch", "4", "--out", str(tmp_path / "r.json"),
                   "--device", "cuda"])
    assert e.value.code == 2
    assert "--device cuda: this torch pipelining peer runs over gloo on CPU only" in \
        capsys.readouterr().err
