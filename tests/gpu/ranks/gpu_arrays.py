"""Device arrays for the GPU rank programs: torch CUDA when torch has CUDA, else CuPy; the
simulated device (torch CPU tensors in simulator memory) where DPSGS_TEST_DEVICE=sim.

Every pattern is closed-form small integers, exact in every dtype (bfloat16 included), so a
transfer can be checked for equality and a mean against its exact value.
"""

from __future__ import annotations

from typing import Any

import os

__all__ = ["Arrays", "pick"]


class Arrays:
    name = "?"
    dtypes: list[str] = []

    def pattern(self, shape: tuple[int, ...], dtype: str, salt: int) -> Any: ...
    def empty(self, shape: tuple[int, ...], dtype: str) -> Any: ...
    def equal(self, a: Any, b: Any) -> bool: ...
    def side_stream(self) -> Any: ...   # context manager making a new stream current
    def synchronize(self) -> None: ...
    def host(self, a: Any) -> Any: ...    # numpy copy (bfloat16 widened to float32, exactly)
    def raw(self, a: Any) -> bytes: ...   # the array's bytes, as stored


class TorchArrays(Arrays):
    name = "torch"
    dtypes = ["float32", "float16", "bfloat16", "float64", "int32", "int64", "uint8", "int8", "bool"]

    def __init__(self) -> None:
        import torch

        self.t = torch

    def _dt(self, dtype: str) -> Any:
        return getattr(self.t, dtype)

    def pattern(self, shape, dtype, salt):
        n = 1
        for s in shape:
            n *= s
        base = (self.t.arange(n, device="cuda", dtype=self.t.int64) % 61) + (salt % 61)
        if dtype == "bool":
            return (base % 2 == 1).reshape(shape)
        return base.to(self._dt(dtype)).reshape(shape)

    def empty(self, shape, dtype):
        return self.t.empty(shape, dtype=self._dt(dtype), device="cuda")

    def equal(self, a, b):
        return bool(self.t.equal(a, b))

    def side_stream(self):
        return self.t.cuda.stream(self.t.cuda.Stream())

    def synchronize(self):
        self.t.cuda.synchronize()

    def host(self, a):
        return (a.float() if a.dtype == self.t.bfloat16 else a).cpu().numpy()

    def raw(self, a):
        if a.dtype in (self.t.bfloat16, self.t.bool):
            a = a.view(self.t.int16 if a.dtype == self.t.bfloat16 else self.t.uint8)
        return a.contiguous().cpu().numpy().tobytes()


class CupyArrays(Arrays):
    name = "cupy"
    dtypes = ["float32", "float16", "float64", "int32", "int64", "uint8", "int8", "bool"]  # no bfloat16

    def __init__(self) -> None:
        import cupy

        self.cp = cupy

    def pattern(self, shape, dtype, salt):
        n = 1
        for s in shape:
            n *= s
        base = (self.cp.arange(n, dtype=self.cp.int64) % 61) + (salt % 61)
        if dtype == "bool":
            return (base % 2 == 1).reshape(shape)
        return base.astype(dtype).reshape(shape)

    def empty(self, shape, dtype):
        return self.cp.empty(shape, dtype=dtype)

    def equal(self, a, b):
        return bool(self.cp.array_equal(a, b))

    def side_stream(self):
        return self.cp.cuda.Stream(non_blocking=True)

    def synchronize(self):
        self.cp.cuda.runtime.deviceSynchronize()

    def host(self, a):
        return self.cp.asnumpy(a)

    def raw(self, a):
        return self.cp.asnumpy(a).tobytes()


class SimArrays(Arrays):
    """Arrays of the simulated device, touched only as device memory is: through copies on
    the current stream (a pattern is produced by a host-to-device copy there, a check reads
    by a device-to-host copy there), so every stream-ordering slip shows as poison."""

    name = "sim"
    dtypes = TorchArrays.dtypes

    def __init__(self) -> None:
        import torch

        self.t = torch

    @property
    def accel(self):
        """The accelerator of the thread's current device (nccl.init made the rank's current),
        so patterns are made on the very streams the channels order themselves after."""
        from dpsgs import _C
        from dpsgs.comm.accelerator import accelerator

        return accelerator("sim", _C.sim.current_device())

    def pattern(self, shape, dtype, salt):
        n = 1
        for s in shape:
            n *= s
        base = (self.t.arange(n, dtype=self.t.int64) % 61) + (salt % 61)
        host = (base % 2 == 1) if dtype == "bool" else base.to(getattr(self.t, dtype))
        out = self.accel.empty(tuple(shape), getattr(self.t, dtype))
        if n:
            sim = self.accel._sim
            sim.memcpy_async(out.data_ptr(), host.data_ptr(), host.numel() * host.element_size(),
                             sim.HOST_TO_DEVICE, self.accel.current_stream())
        return out

    def empty(self, shape, dtype):
        return self.accel.empty(tuple(shape), getattr(self.t, dtype))

    def equal(self, a, b):
        return bool(self.t.equal(self.accel.to_host(a), self.accel.to_host(b)))

    def side_stream(self):
        return self.accel.use_stream(self.accel.new_stream())

    def synchronize(self):
        self.accel.synchronize()

    def host(self, a):
        h = self.accel.to_host(a)
        return (h.float() if h.dtype == self.t.bfloat16 else h).numpy()

    def raw(self, a):
        h = self.accel.to_host(a)
        if h.dtype in (self.t.bfloat16, self.t.bool):
            h = h.view(self.t.int16 if h.dtype == self.t.bfloat16 else self.t.uint8)
        return h.numpy().tobytes()


def pick() -> Arrays:
    """The simulated device where DPSGS_TEST_DEVICE=sim; else torch if it has CUDA, else CuPy;
    SystemExit with the reason when neither can."""
    if os.environ.get("DPSGS_TEST_DEVICE") == "sim":
        return SimArrays()
    try:
        import torch

        if torch.cuda.is_available():
            return TorchArrays()
    except ImportError:
        pass
    try:
        return CupyArrays()
    except ImportError:
        raise SystemExit("no CUDA array library: torch is a CPU build and CuPy is missing "
                         "(pip install cupy-cuda12x)") from None
