"""Tensors as the core's buffers: byte views, reduction buffers, staging and copy-back.

The core moves contiguous host memory. Data-moving operations (broadcast, gathers,
all-to-all, send/recv) take any dtype as bytes; reductions take the core's dtypes (float16,
bfloat16, float32, float64, int8, uint8, int32, int64, bool) and complex as its real pairs
(sum only). float16/bfloat16 MIN/MAX/PRODUCT are reduced in float32 and rounded once.
A tensor the core cannot use in place (not contiguous, or upcast) is staged: the operation
runs on a contiguous copy and `Staged.back()` writes the result into the tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dpsgs.comm.dtypes import WIRE_CODES
from dpsgs.comm.mpi import as_buffer

__all__ = ["REDUCIBLE", "Staged", "byte_view", "typed", "reduction_of", "stage", "stage_for_reduction",
           "pack", "check_cpu"]

REDUCIBLE = {getattr(torch, name) for name in WIRE_CODES}
_HALF = (torch.float16, torch.bfloat16)
_COMPLEX = {torch.complex64: torch.float32, torch.complex128: torch.float64}
_OPS = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.AVG: "sum", dist.ReduceOp.MIN: "min",
        dist.ReduceOp.MAX: "max", dist.ReduceOp.PRODUCT: "product"}


def check_cpu(where: str, tensors: Sequence[torch.Tensor]) -> None:
    for i, t in enumerate(tensors):
        if t.device.type != "cpu":
            raise ValueError(f"dpsgs backend {where}: tensor {i} is on {t.device}; the MPI core takes "
                             "CPU tensors (CUDA tensors go to NCCL)")


def reduction_of(op: dist.ReduceOp, where: str) -> tuple[str, bool]:
    """(the core's reduction, whether to divide by the group size afterwards)."""
    kind = getattr(op, "op", op)   # a ReduceOp wraps its RedOpType (hashable)
    name = _OPS.get(kind)
    if name is None:
        raise NotImplementedError(f"dpsgs backend {where}: reduce op {kind} is not implemented "
                                  "(supported: SUM, AVG, MIN, MAX, PRODUCT)")
    return name, kind == dist.ReduceOp.AVG


def byte_view(t: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's memory as a flat uint8 NumPy array (zero-copy; any dtype)."""
    flat = t.reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8)


_BF16 = WIRE_CODES["bfloat16"]


def typed(t: torch.Tensor) -> tuple[np.ndarray, int | None]:
    """(NumPy view, dtype code override) of a contiguous tensor of a reducible dtype."""
    if t.dtype == torch.bfloat16:   # NumPy has no bfloat16: its bits as uint16, named by code
        return as_buffer(t.reshape(-1)), _BF16
    return t.detach().reshape(-1).numpy(), None


@dataclass
class Staged:
    """`buf` is what the core works on; `back()` writes it into `target` unless `buf` is
    `target`'s own memory (copy=False)."""
    target: torch.Tensor
    buf: torch.Tensor
    copy: bool = True

    def back(self) -> None:
        if not self.copy:
            return
        if self.target.is_complex() and not self.buf.is_complex():
            self.target.copy_(torch.view_as_complex(self.buf))
        else:
            self.target.copy_(self.buf.to(self.target.dtype).view_as(self.target))


def stage(t: torch.Tensor) -> Staged:
    """A contiguous buffer for `t` (itself when it is contiguous)."""
    if t.is_contiguous():
        return Staged(t, t, copy=False)
    return Staged(t, t.contiguous())


def stage_for_reduction(t: torch.Tensor, red: str, where: str) -> Staged:
    """A buffer the core can reduce with `red` for `t`; ValueError for a dtype it cannot."""
    if t.dtype in _COMPLEX:
        if red != "sum":
            raise ValueError(f"dpsgs backend {where}: {red} of {t.dtype} is not defined (complex: SUM/AVG)")
        c = t if t.is_contiguous() else t.contiguous()
        return Staged(t, torch.view_as_real(c), copy=c is not t)
    if t.dtype not in REDUCIBLE:
        raise ValueError(f"dpsgs backend {where}: cannot reduce {t.dtype}; reductions take "
                         f"{', '.join(WIRE_CODES)}, complex64 and complex128 (send/recv, broadcast, "
                         "gathers and all-to-all take any dtype)")
    if t.dtype in _HALF and red != "sum":
        return Staged(t, t.float())
    return stage(t)


def pack(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensors flattened into one new contiguous 1-D tensor (in `dtype` if given)."""
    flat = [t.reshape(-1) for t in tensors]
    out = torch.cat(flat) if flat else torch.empty(0)
    return out if dtype is None else out.to(dtype)
