"""The CUDA accelerator (dpsgs.comm.accelerator's contract) over torch.cuda."""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["CudaAccelerator", "cuda_descriptor"]

T = TypeVar("T")


class _CudaEvent:
    def __init__(self, timing: bool) -> None:
        import torch

        self._e = torch.cuda.Event(enable_timing=timing)

    def record(self, stream: int | None = None) -> None:
        import torch

        self._e.record(None if stream is None else torch.cuda.ExternalStream(stream))

    def query(self) -> bool:
        return bool(self._e.query())

    def synchronize(self) -> None:
        self._e.synchronize()

    def elapsed(self, end: Any) -> float:
        return self._e.elapsed_time(end._e) / 1e3


def cuda_descriptor(t: Any, stream: int | None, index: int | None = None) -> tuple:
    """(ptr, nbytes, dtype_code, shape, device, stream) of a contiguous torch CUDA tensor."""
    import torch

    from dpsgs.comm.dtypes import WIRE_CODES

    if not t.is_cuda:
        raise ValueError(f"expected a CUDA tensor, got one on {t.device} (use dpsgs.comm.mpi for host tensors)")
    if not t.is_contiguous():
        raise ValueError(f"non-contiguous CUDA tensor of shape {tuple(t.shape)}; call .contiguous() first")
    name = str(t.dtype).removeprefix("torch.")
    if name not in WIRE_CODES:
        raise ValueError(f"unsupported dtype {t.dtype}; supported: {', '.join(WIRE_CODES)}")
    if stream is None:
        stream = torch.cuda.current_stream(t.device).cuda_stream
    nbytes = t.numel() * t.element_size()
    return (t.data_ptr(), nbytes, WIRE_CODES[name], tuple(t.shape), t.device.index, int(stream))


class CudaAccelerator:
    kind, asynchronous, lazy_kernels = "cuda", True, True

    def __init__(self, index: int) -> None:
        try:
            import torch
        except ImportError:          # a CuPy-only program: descriptors and streams come from CuPy
            torch = None
        self.index = index
        self.device = torch.device("cuda", index) if torch is not None else None
        self._torch = torch

    def make_current(self) -> None:
        if self._torch is not None and self._torch.cuda.is_available():
            self._torch.cuda.set_device(self.index)
        # CuPy only where the program uses it (imported it already): importing it here would
        # make a broken or mismatched CuPy install fail every torch rank
        cupy = sys.modules.get("cupy")
        if cupy is not None:
            cupy.cuda.Device(self.index).use()

    def current_stream(self) -> int:
        return int(self._torch.cuda.current_stream(self.device).cuda_stream)

    def new_stream(self) -> int:
        return int(self._torch.cuda.Stream(self.device).cuda_stream)

    def use_stream(self, stream: int) -> AbstractContextManager[None]:
        return self._torch.cuda.stream(self._torch.cuda.ExternalStream(stream, device=self.device))

    def event(self, timing: bool = False) -> Any:
        return _CudaEvent(timing)

    def synchronize(self) -> None:
        self._torch.cuda.current_stream(self.device).synchronize()

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self._torch.empty(shape, dtype=dtype, device=self.device)

    def to_device(self, t: Any) -> Any:
        return t.pin_memory().to(self.device, non_blocking=True)

    def to_host(self, t: Any) -> Any:
        return t.cpu()

    def describe(self, t: Any) -> tuple:
        return cuda_descriptor(t, None)

    def consume(self, work: Any) -> None:
        work.wait_stream(self.current_stream())

    def rng_state(self) -> Any:
        return self._torch.cuda.get_rng_state(self.device)

    def set_rng_state(self, state: Any) -> None:
        self._torch.cuda.set_rng_state(state, self.device)

    def backward(self, fn: Callable[[], T]) -> T:
        return fn()      # autograd itself runs CUDA work (and its hooks) on its device thread
