"""The device seam (dpsgs.comm.accelerator) on every kind: cpu, and cuda / sim (conftest.py).
What the executor, stage and metrics rely on: exact host <-> device copies for every
wire dtype, stream switching, timed events, where autograd hooks run, and (sim) memory that
starts as poison."""

from __future__ import annotations

import math
import time

import pytest

torch = pytest.importorskip("torch")

from conftest import DEVICE_PARAMS  # noqa: E402
from gpu_launch import need_device  # noqa: E402

from dpsgs.comm.accelerator import CpuAccelerator, accelerator  # noqa: E402
from dpsgs.comm.dtypes import WIRE_CODES  # noqa: E402


@pytest.fixture(params=["cpu", *DEVICE_PARAMS])
def accel(request):
    if request.param == "cpu":
        return CpuAccelerator()
    need_device(request.param)
    a = accelerator(request.param, 0)
    a.make_current()
    return a


@pytest.mark.parametrize("dtype", sorted(WIRE_CODES))
def test_host_device_round_trip_is_exact(accel, dtype):
    t = getattr(torch, dtype)
    host = (torch.arange(-300, 300) % 127).to(t) if dtype != "bool" else torch.arange(600) % 3 == 0
    host = host.reshape(20, 30)
    back = accel.to_host(accel.to_device(host))
    assert back.dtype == host.dtype and back.shape == host.shape
    assert torch.equal(back, host)
    assert accel.to_host(accel.to_device(host[:0])).shape == (0, 30)


def test_timed_events_measure_between_two_records(accel):
    start, end = accel.event(timing=True), accel.event(timing=True)
    start.record()
    x = accel.to_device(torch.ones(1 << 16))
    time.sleep(0.05)
    x = accel.to_device(torch.ones(1 << 16) * 2)
    end.record()
    end.synchronize()
    assert end.query() and start.query()
    assert 0.0 <= start.elapsed(end) < 60.0
    assert accel.to_host(x)[0].item() == 2.0


def test_device_rng_state_is_the_devices_own(accel):
    state = accel.rng_state()
    if accel.kind == "cuda":
        assert state is not None
        accel.set_rng_state(state)
    else:
        assert state is None   # the CPU generator draws for cpu and sim
        accel.set_rng_state(None)


def test_simulated_memory_starts_as_poison(sim):
    a = accelerator("sim", 0)
    x = a.to_host(a.empty((4,), torch.float32))
    assert all(math.isnan(v) for v in x.tolist())
    assert a.to_host(a.empty((3,), torch.int32)).tolist() == [-1, -1, -1]


def test_autograd_hooks_run_where_the_device_runs_them(accel):
    # CUDA's autograd runs a backward's hooks (the reducer's all-reduces) on its device
    # thread; the simulator copies that with a thread of its own; the CPU runs them here
    import threading

    w = torch.ones(3, requires_grad=True)
    seen = []
    w.register_post_accumulate_grad_hook(lambda p: seen.append(threading.get_ident()))
    out = accel.backward(lambda: (w * 2).sum().backward() or "done")
    assert out == "done" and w.grad.tolist() == [2.0, 2.0, 2.0]
    if accel.kind == "sim":
        assert seen and seen[0] != threading.get_ident()
    elif accel.kind == "cpu":
        assert seen == [threading.get_ident()]
    with pytest.raises(RuntimeError, match="a backward's error"):
        accel.backward(lambda: (_ for _ in ()).throw(RuntimeError("a backward's error")))
