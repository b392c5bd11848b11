"""The simulated accelerator (dpsgs.comm.accelerator's contract) of a DPSGS_CUDA=sim build.

The device is the simulator of csrc/sim/ (dpsgs._C.sim): streams are worker threads,
events positions in them, copies and NCCL operations run there after seeded random
delays, and memory allocated here starts as poison (0xFF: NaN in every float type). Its
tensors are CPU tensors (torch.frombuffer over simulator memory), and torch computes on
the host, so the host is where this device "runs kernels": `consume` and `to_device`
therefore also make the host catch up with the current stream (bounded: a transfer from a
dead peer ends in the Work's own CommTimeout naming it, not in a hang). As CUDA's autograd
runs a backward's work and hooks on its device thread, `backward` runs it on a thread of
this device's own, so the reducer's hooks issue their all-reduces off the main thread.
Every stream-ordering mistake of code written to the contract still shows: a transfer that
was not waited for leaves poison, a buffer freed or reused before its send completed is
reported by the simulator, an event recorded before a non-blocking call settled misses it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator, TypeVar

from dpsgs.comm.accelerator import simulated_build
from dpsgs.comm.dtypes import WIRE_CODES

__all__ = ["SimAccelerator"]

T = TypeVar("T")


class _SimEvent:
    def __init__(self, sim: Any, accel: SimAccelerator, timing: bool) -> None:
        self._sim, self._accel = sim, accel
        self.handle = sim.event_create(timing)

    def record(self, stream: int | None = None) -> None:
        self._sim.event_record(self.handle, self._accel.current_stream() if stream is None else stream)

    def query(self) -> bool:
        return bool(self._sim.event_query(self.handle))

    def synchronize(self) -> None:
        self._sim.event_synchronize(self.handle)

    def elapsed(self, end: Any) -> float:
        return float(self._sim.event_elapsed_ms(self.handle, end.handle)) / 1e3

    def __del__(self) -> None:
        try:
            self._sim.event_destroy(self.handle)
        except Exception:  # noqa: BLE001 - interpreter teardown: the simulator is gone too
            pass


class SimAccelerator:
    kind, asynchronous, lazy_kernels = "sim", True, True   # the GPU path, warm-up included

    def __init__(self, index: int) -> None:
        import torch

        if not simulated_build():
            raise RuntimeError("the simulated device needs a DPSGS_CUDA=sim build of dpsgs._C "
                               "(this one has " + ("the real CUDA backend" if _has_nccl() else "no NCCL backend")
                               + "); rebuild with DPSGS_CUDA=sim python setup.py build_ext --inplace")
        from dpsgs import _C

        self._sim = _C.sim
        self._torch = torch
        self.index = index
        self.device = torch.device("cpu")
        # this accelerator's own default stream: the simulator's stream 0 is per thread's device
        self._default = self._sim.stream_create(index)
        self._local = threading.local()
        self._autograd = ThreadPoolExecutor(1, thread_name_prefix=f"dpsgs-sim-autograd-{index}")

    def make_current(self) -> None:
        self._sim.set_device(self.index)

    def current_stream(self) -> int:
        return getattr(self._local, "stream", self._default)

    def new_stream(self) -> int:
        return int(self._sim.stream_create(self.index))

    @contextmanager
    def use_stream(self, stream: int) -> Iterator[None]:
        before = getattr(self._local, "stream", None)
        self._local.stream = stream
        try:
            yield
        finally:
            if before is None:
                del self._local.stream
            else:
                self._local.stream = before

    def event(self, timing: bool = False) -> Any:
        return _SimEvent(self._sim, self, timing)

    def synchronize(self) -> None:
        self._sim.stream_synchronize(self.current_stream())

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """Simulator memory, poison until written; freed, it is poisoned in the order of the
        current stream (as torch's caching allocator reuses a block in its stream's order)."""
        torch = self._torch
        numel = 1
        for s in shape:
            numel *= int(s)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        buf = self._sim.Buffer(numel * itemsize, self.index, False, self.current_stream())
        return torch.frombuffer(buf, dtype=dtype, count=numel).view(shape)

    def _copy(self, dst: Any, src: Any, kind: int) -> None:
        if dst.numel():
            self._sim.memcpy_async(dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size(), kind,
                                   self.current_stream())

    def to_device(self, t: Any) -> Any:
        """Through pinned memory, non-blocking on the current stream; the host then catches
        up (its compute is this device's)."""
        t = t.contiguous()
        pinned = self._pinned_like(t)
        pinned.copy_(t)
        out = self.empty(tuple(t.shape), t.dtype)
        self._copy(out, pinned, self._sim.HOST_TO_DEVICE)
        self.synchronize()
        return out

    def _pinned_like(self, t: Any) -> Any:
        if t.numel() == 0:
            return self._torch.empty_like(t)
        buf = self._sim.Buffer(t.numel() * t.element_size(), self.index, True)
        return self._torch.frombuffer(buf, dtype=t.dtype, count=t.numel()).view(t.shape)

    def to_host(self, t: Any) -> Any:
        """A host copy, made on the current stream once what is queued there has run."""
        out = self._torch.empty(tuple(t.shape), dtype=t.dtype)
        self._copy(out, t.contiguous(), self._sim.DEVICE_TO_HOST)  # pageable: returns when done
        return out

    def describe(self, t: Any) -> tuple:
        if t.device.type != "cpu":
            raise ValueError(f"the simulated device's tensors are CPU tensors, got one on {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"non-contiguous tensor of shape {tuple(t.shape)}; call .contiguous() first")
        name = str(t.dtype).removeprefix("torch.")
        if name not in WIRE_CODES:
            raise ValueError(f"unsupported dtype {t.dtype}; supported: {', '.join(WIRE_CODES)}")
        self._sim.set_device(self.index)   # unregistered memory belongs to the thread's device
        return (t.data_ptr(), t.numel() * t.element_size(), WIRE_CODES[name], tuple(t.shape), self.index,
                int(self.current_stream()))

    def consume(self, work: Any) -> None:
        stream = self.current_stream()
        work.wait_stream(stream)
        caught_up = self.event()
        caught_up.record(stream)
        if not caught_up.query():
            # the stream waits for the transfer: wait for that with the Work's deadline (the
            # host has none), then the stream is bounded too. A missing wait_stream still
            # shows: the stream would then not wait, and the host would read poison.
            work.wait()
            caught_up.synchronize()

    def backward(self, fn: Callable[[], T]) -> T:
        """`fn` on this device's autograd thread; the caller waits (as torch's caller of a
        CUDA backward does). Its exception is raised here."""
        return self._autograd.submit(fn).result()

    def rng_state(self) -> Any:
        return None   # torch's CPU generator draws the simulated device's random numbers

    def set_rng_state(self, state: Any) -> None:
        if state is not None:
            raise ValueError("a device RNG state given to the simulated accelerator")


def _has_nccl() -> bool:
    try:
        from dpsgs import _C
    except ImportError:
        return False
    return bool(_C.build_info().get("nccl"))
