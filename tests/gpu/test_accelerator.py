"""The device seam (dpsgs.comm.accelerator) on every kind: cpu, and cuda / sim (conftest.py).
What the executor, stage and metrics will rely on: exact host <-> device copies for every
wire dtype, stream switching, timed events, and (sim) memory that starts as poison."""

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
