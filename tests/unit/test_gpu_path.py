"""The parts of the GPU path that need no GPU: device choice, the settings, bfloat16 autocast
between stages (runs on CPU too), device-free checkpoint state, CUDA-event timing."""

from __future__ import annotations

import copy
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from dpsgs.comm import device as device_mod
from dpsgs.comm.accelerator import CpuAccelerator
from dpsgs.config import OPERATIONAL, TrainConfig
from dpsgs.job.data import Dataset
from dpsgs.job.metrics import Timeline
from dpsgs.job.simulate import reference_for
from dpsgs.pipeline.executor import _to_host


def _data(n=192, f=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(f, classes, generator=g)
    x = torch.randn(n, f, generator=g)
    y = (x @ teacher).argmax(1)
    return Dataset(x, y, classes, "toy"), Dataset(x[:48], y[:48], classes, "toy")


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))


def test_what_cuda_needs_here_is_named():
    """This machine, as probed: the trainer names the first thing missing for CUDA (GPU, CUDA
    torch, NCCL build, in that order); --simulate (no NCCL) the same without the NCCL build."""
    import torch

    view = device_mod.probe_cuda()
    assert view.torch_version == str(torch.__version__)
    assert view.torch_cuda == (torch.version.cuda is not None)
    for nccl in (True, False):
        why = device_mod.cuda_missing([view], nccl=nccl)
        if not view.gpus:
            assert why == "no GPU is visible"
        elif not view.torch_cuda:
            assert why == f"this torch ({torch.__version__}) is a CPU build, not a CUDA one"
        elif nccl and not view.nccl:
            assert why.startswith("dpsgs._C was built without the NCCL backend")
        else:
            pytest.skip("this machine can run CUDA")
        with pytest.raises(ValueError) as e:
            device_mod.resolve_device("cuda", [view], nccl=nccl)
        assert str(e.value) == f"--device cuda: {why}"
        assert device_mod.resolve_device("auto", [view], nccl=nccl) == device_mod.DeviceDecision("cpu", why)


def test_device_is_operational_and_amp_is_identity():
    # a run may resume on another device; bfloat16 autocast changes its numbers
    assert "device" in OPERATIONAL and "amp" not in OPERATIONAL
    assert "device" not in TrainConfig().identity() and "amp" in TrainConfig().identity()
    with pytest.raises(ValueError, match="--amp bf16 trains float32 weights: drop --dtype float64"):
        TrainConfig(amp="bf16", dtype="float64").validate()
    with pytest.raises(ValueError, match="--device must be one of auto, cpu, cuda, sim"):
        TrainConfig(device="gpu").validate()


def test_bf16_autocast_crosses_stages_in_bfloat16_and_trains():
    """--amp bf16 on CPU: the same executor, bfloat16 activations and gradients on every
    channel (a float32 message would be a HeaderMismatch), float32 weights, the loss falls."""
    cfg = TrainConfig(stages=3, replicas=2, split=[2, 4], amp="bf16", device="cpu", epochs=6,
                      batch_size=16, lr=0.1, lr_schedule="constant", progress=False, seed=1)
    ref = reference_for(cfg, _model(), _data())
    ex = ref.executors[0][1]
    assert [d for d, _ in ex.place.in_specs + ex.place.out_specs] == [torch.bfloat16] * 2
    assert all(p.dtype == torch.float32 for p in ex.compute.params)
    summary = ref.run()
    losses = [h["loss"] for h in ref.history if "loss" in h]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    assert summary["test_accuracy"] > 0.6


def test_bf16_is_not_float32():
    """The autocast path really computes in bfloat16: it differs from float32 training."""
    base = dict(stages=2, replicas=1, split=[2], epochs=1, batch_size=16, progress=False, device="cpu")
    a = reference_for(TrainConfig(**base), _model(), _data())
    b = reference_for(TrainConfig(amp="bf16", **base), copy.deepcopy(_model()), _data())
    a.run()
    b.run()
    pa, pb = a.parameters()[0][0], b.parameters()[0][0]
    assert not torch.equal(pa, pb) and float((pa - pb).abs().max()) < 0.05


def test_checkpoint_state_is_on_the_host():
    state = {"model": {"w": torch.ones(2, requires_grad=True)},
             "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(2)}}, "param_groups": [{"lr": 0.1}]}}
    host = _to_host(CpuAccelerator(), state)
    assert host["model"]["w"].device.type == "cpu" and not host["model"]["w"].requires_grad
    assert host["optimizer"]["param_groups"] == [{"lr": 0.1}]
    assert torch.equal(host["optimizer"]["state"][0]["momentum_buffer"], torch.zeros(2))


class _FakeEvent:
    """A timing event of a made-up device: completes when told, times what it is told."""

    clock = 0.0
    done = True

    def record(self, stream=None):
        self.t = _FakeEvent.clock

    def query(self):
        return _FakeEvent.done

    def synchronize(self):
        return None

    def elapsed(self, end):
        return end.t - self.t


class _FakeDevice:
    """An accelerator (dpsgs.comm.accelerator) that runs behind the host; events only."""

    asynchronous = True

    def event(self, timing=False):
        assert timing
        return _FakeEvent()


def test_gpu_timeline_uses_event_times_and_never_waits_for_recent_spans():
    t = Timeline(0, accel=_FakeDevice())
    _FakeEvent.clock, _FakeEvent.done = 0.0, False
    with t.span("forward", "compute"):
        _FakeEvent.clock = 0.25                 # the GPU took 0.25 s, whatever the host did
    assert t.step_totals()["compute"] == 0.0     # not completed yet: no wait, nothing counted
    _FakeEvent.done = True
    with t.span("recv", "channel"):
        _FakeEvent.clock = 0.75
    totals = t.step_totals()
    assert totals["compute"] == pytest.approx(0.25) and totals["channel"] == pytest.approx(0.5)


def test_cpu_timeline_times_spans_by_the_host_clock():
    t = Timeline(0, accel=CpuAccelerator())
    with t.span("forward", "compute"):
        time.sleep(0.05)
    assert t.step_totals()["compute"] >= 0.05


def test_simulate_refuses_cuda_before_making_its_run_folder(tmp_path):
    from dpsgs.job.simulate import simulate

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    with pytest.raises(ValueError, match="--device cuda: "):
        simulate(TrainConfig(device="cuda", run_dir=str(tmp_path / "run"), epochs=1))
    assert not (tmp_path / "run").exists()


def test_simulate_refuses_the_simulated_device_in_one_line(tmp_path):
    from dpsgs.comm.nccl import available
    from dpsgs.job.simulate import simulate

    if not available("sim")[0]:
        pytest.skip("not a DPSGS_CUDA=sim build (elsewhere --device sim is refused as any missing device)")
    with pytest.raises(ValueError, match="--simulate runs in one process, without NCCL: --device sim"):
        simulate(TrainConfig(device="sim", run_dir=str(tmp_path / "run"), epochs=1))
    assert not (tmp_path / "run").exists()


GPU_CHECK = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check.sh"


def test_gpu_check_script_parses_and_names_its_steps():
    # the script runs only on a GPU machine, where a syntax error would cost a device call
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    bad = subprocess.run(["bash", str(GPU_CHECK), "nccl-test"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "unknown step 'nccl-test' (steps: nccl-tests train trainer-tests nccl bench, tests, all)" in bad.stderr


def test_the_simulated_device_is_taken_by_name_only():
    """--device auto never picks the CPU simulator of a DPSGS_CUDA=sim build (its NCCL backend
    counts as none for CUDA, its devices as no GPUs); --device sim needs that build."""
    from dpsgs import _C

    view = device_mod.probe_cuda()
    assert device_mod.resolve_device("auto", [view]).device == "cpu"
    if _C.build_info()["cuda_simulated"]:
        assert not view.nccl and device_mod.visible_gpu_count() == 0
        assert device_mod.resolve_device("sim", [view]) == device_mod.DeviceDecision("sim", "")
    else:
        with pytest.raises(ValueError, match="--device sim: dpsgs._C was built"):
            device_mod.resolve_device("sim", [view])


class _LazyCpu(CpuAccelerator):
    """The host, as a device whose kernels load on first launch (CUDA's lazy loading)."""

    lazy_kernels = True


class _WithAccel:
    """A loopback transport that names its accelerator, as NcclTransport does."""

    def __init__(self, inner, accel, log):
        self._inner, self.accel, self.device, self._log = inner, accel, inner.device, log

    def channel(self, *args):
        self._log.append("channel")
        return self._inner.channel(*args)

    def reducer(self, *args, **kwargs):
        self._log.append("reducer")
        return self._inner.reducer(*args, **kwargs)


@pytest.mark.parametrize("schedule,rows", [("fdg", 16), ("sync", 4)])
def test_a_lazy_kernel_device_warms_every_stage_up_before_its_channels_exist(monkeypatch, schedule, rows):
    from dpsgs.comm.loopback import LoopbackGroup
    from dpsgs.job.run_setup import prepare
    from dpsgs.pipeline.executor import StageExecutor
    from dpsgs.pipeline.stage import StageCompute

    cfg = TrainConfig(stages=3, replicas=1, split=[2, 4], batch_size=16, micro_batches=4,
                      schedule=schedule, device="cpu", epochs=1, progress=False)
    setup = prepare(cfg, _model(), _data())
    group = LoopbackGroup(3, 1, timeout=cfg.timeout, device="cpu")
    seen = []
    monkeypatch.setattr(StageCompute, "warm_up", lambda self, xs, y=None: seen.append(
        (self.stage, [tuple(x.shape) for x in xs], None if y is None else tuple(y.shape))))
    for k in range(3):
        StageExecutor(setup, k, group.transport(k))           # the host: nothing to load
    assert seen == []
    for k in range(3):
        StageExecutor(setup, k, _WithAccel(group.transport(k), _LazyCpu(), seen))
    assert seen == [(0, [(rows, 6)], None), "channel", "channel",
                    (1, [(rows, 32)], None), "channel", "channel", "channel", "channel",
                    (2, [(rows, 32)], (rows,)), "channel", "channel"]
