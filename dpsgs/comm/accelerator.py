"""The device seam: one small object per rank for everything that differs between devices.

Streams, events (with timing), host <-> device copies (pinned, non-blocking), allocation,
the RNG state a recomputed forward must replay, and the NCCL descriptor of a tensor go
through an `Accelerator`; code above it (comm/nccl.py, the executor, stage.py,
job/metrics.py) holds no `torch.cuda` call of its own. Implementations:

- `CpuAccelerator`: no streams; events read the host clock; copies are plain.
- `CudaAccelerator` (accel_cuda.py): torch.cuda streams and events.
- `SimAccelerator` (accel_sim.py): the simulated device of a DPSGS_CUDA=sim build
  (csrc/sim/sim.h), the GPU code path on CPUs, for tests. Its tensors are CPU tensors.

The contract every implementation keeps (what a caller may rely on):
- `current_stream()` is the calling thread's current stream (an int: cudaStream_t), the one
  work issued now is ordered after; `use_stream(s)` makes `s` current in a `with` block.
- `describe(t)` is the descriptor the NCCL backend takes, ordered after the current stream.
- `consume(work)`: after it returns, the calling thread may use what `work` (an NcclWork)
  received or reduced, on the current stream (CUDA: the stream waits on the GPU, the host
  does not; the simulator: the host also catches up, as its compute runs on the host).
- `to_device(t)`: a copy on this device the current stream may use (pinned and
  non-blocking on CUDA); `to_host(t)` waits for it.
- `rng_state()` / `set_rng_state()`: the device generator's state, None where torch's CPU
  generator is the only one (cpu, sim).
- `backward(fn)`: runs `fn` (a backward pass) and returns its result; the autograd hooks it
  fires (the reducer's) run where this device runs them: on CUDA autograd's device thread,
  on the simulator a thread of its own, on the CPU the calling thread.
- `lazy_kernels`: the first launch of each kernel loads it (CUDA's lazy module loading),
  which waits for the whole device; a stage is then run once before its communicators
  connect (StageCompute.warm_up). True on the simulator too, so CI runs that path.
"""

from __future__ import annotations

import functools
import time
from contextlib import AbstractContextManager, nullcontext
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ["Accelerator", "CpuAccelerator", "Event", "KINDS", "accelerator", "accelerator_of_device",
           "simulated_build"]

KINDS = ("cpu", "cuda", "sim")
T = TypeVar("T")


@runtime_checkable
class Event(Protocol):
    """A position in a stream (CUDA event semantics); timing events measure between two."""

    def record(self, stream: int | None = None) -> None: ...
    def query(self) -> bool: ...
    def synchronize(self) -> None: ...
    def elapsed(self, end: Event) -> float: ...   # seconds from this event to `end`


@runtime_checkable
class Accelerator(Protocol):
    kind: str                 # "cpu" | "cuda" | "sim"
    index: int                # device ordinal (0 for cpu)
    device: Any               # torch.device this rank's tensors live on
    asynchronous: bool        # device work runs behind the host
    lazy_kernels: bool        # a kernel's first launch loads it (see the contract above)

    def make_current(self) -> None: ...
    def current_stream(self) -> int: ...
    def new_stream(self) -> int: ...
    def use_stream(self, stream: int) -> AbstractContextManager[None]: ...
    def event(self, timing: bool = False) -> Event: ...
    def synchronize(self) -> None: ...
    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any: ...
    def to_device(self, t: Any) -> Any: ...
    def to_host(self, t: Any) -> Any: ...
    def describe(self, t: Any) -> tuple: ...
    def consume(self, work: Any) -> None: ...
    def rng_state(self) -> Any: ...
    def set_rng_state(self, state: Any) -> None: ...
    def backward(self, fn: Callable[[], T]) -> T: ...


class _HostEvent:
    """An event of the host clock: recorded = completed."""

    def __init__(self) -> None:
        self.at: float | None = None

    def record(self, stream: int | None = None) -> None:
        self.at = time.perf_counter()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed(self, end: Any) -> float:
        if self.at is None or end.at is None:
            raise RuntimeError("elapsed() between events that were not both recorded")
        return end.at - self.at


class CpuAccelerator:
    """The host: no streams, synchronous copies, host-clock events."""

    kind, index, asynchronous, lazy_kernels = "cpu", 0, False, False

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cpu")

    def make_current(self) -> None:
        pass

    def current_stream(self) -> int:
        return 0

    def new_stream(self) -> int:
        return 0

    def use_stream(self, stream: int) -> AbstractContextManager[None]:
        return nullcontext()

    def event(self, timing: bool = False) -> Event:
        return _HostEvent()

    def synchronize(self) -> None:
        pass

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        import torch

        return torch.empty(shape, dtype=dtype)

    def to_device(self, t: Any) -> Any:
        return t

    def to_host(self, t: Any) -> Any:
        return t

    def describe(self, t: Any) -> tuple:
        raise ValueError("the CPU has no NCCL descriptors: host tensors go over dpsgs.comm.mpi")

    def consume(self, work: Any) -> None:
        work.wait()

    def rng_state(self) -> Any:
        return None

    def set_rng_state(self, state: Any) -> None:
        if state is not None:
            raise ValueError("a device RNG state given to the CPU accelerator")

    def backward(self, fn: Callable[[], T]) -> T:
        return fn()


def simulated_build() -> bool:
    """True when dpsgs._C's NCCL backend runs on the CPU simulator (DPSGS_CUDA=sim)."""
    try:
        from dpsgs import _C
    except ImportError:
        return False
    return bool(_C.build_info().get("cuda_simulated"))


@functools.cache
def accelerator(kind: str, index: int = 0) -> Accelerator:
    """The accelerator of a resolved device kind ("cpu", "cuda", "sim") and ordinal: one per
    process and device, so every user shares its streams. "sim" needs a DPSGS_CUDA=sim
    build; "cuda" a CUDA torch (dpsgs.comm.device.resolve_device says which is missing)."""
    if kind == "cpu":
        return CpuAccelerator()
    if kind == "cuda":
        from dpsgs.comm.accel_cuda import CudaAccelerator

        return CudaAccelerator(index)
    if kind == "sim":
        from dpsgs.comm.accel_sim import SimAccelerator

        return SimAccelerator(index)
    raise ValueError(f"device kind must be one of {KINDS}, got {kind!r}")


def accelerator_of_device(device: Any) -> Accelerator:
    """The accelerator of a torch device a transport without one of its own names (the MPI
    core and the in-process loopback: "cpu"; the loopback of a reference on a GPU: "cuda")."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return accelerator("cuda", device.index if device.index is not None else torch.cuda.current_device())
    return accelerator("cpu")
