"""The int64 header of a channel message on the Python transports (mpi4py, torch.distributed).

One header precedes each message's tensors on the channel's tag: magic, sequence number,
count, then per tensor its dtype code, number of dimensions and dimensions. It has all
HEADER_WORDS words on backends where a send and its receive must have one size (gloo, NCCL,
the dpsgs torch backend): the receiver posts it before it knows the count. `parse_header`
turns a received one back into (dtype, shape) pairs, or raises CommError for a stream out
of step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dpsgs.comm.dtypes import WIRE_CODES, code_of, torch_dtype_of_code
from dpsgs.comm.errors import CommError
from dpsgs.comm.message import spec_of
from dpsgs.comm.protocol import MAX_MESSAGE_TENSORS, TensorSpec

__all__ = ["HEADER_WORDS", "MAX_DIMS", "check_dims", "copy_back", "pack_header", "parse_header",
           "receive_buffers"]

MAGIC = 0x44505347          # "DPSG", as the core's
MAX_DIMS = 8                # dimensions per tensor the header carries
# magic, seq, count; per tensor: dtype code, ndim, dims
HEADER_WORDS = 3 + MAX_MESSAGE_TENSORS * (2 + MAX_DIMS)


def check_dims(message: Sequence[torch.Tensor], where: str) -> None:
    """ValueError for a tensor of more dimensions than the header carries."""
    for i, t in enumerate(message):
        if t.dim() > MAX_DIMS:
            raise ValueError(f"{where}: tensor {i} has {t.dim()} dims; at most {MAX_DIMS}")


def pack_header(seq: int, message: Sequence[torch.Tensor], padded: bool = True) -> np.ndarray:
    """The int64 words announcing message #seq (checked by check_dims first): HEADER_WORDS
    of them, or with padded=False only those its tensors use (for MPI, whose receive may be
    longer than the send)."""
    used = 3 + len(message) * (2 + MAX_DIMS)
    header = np.zeros(HEADER_WORDS if padded else used, dtype=np.int64)
    header[:3] = (MAGIC, seq, len(message))
    for i, t in enumerate(message):
        at = 3 + i * (2 + MAX_DIMS)
        header[at:at + 2 + t.dim()] = (code_of(t.dtype), t.dim(), *t.shape)
    return header


def parse_header(header: Sequence[int] | np.ndarray, seq: int, what: str) -> list[TensorSpec]:
    """The (dtype, shape) of each tensor of message #seq, or CommError for a corrupt stream."""
    magic, hseq, count = (int(v) for v in header[:3])
    specs, ok = [], magic == MAGIC and hseq == seq and 1 <= count <= MAX_MESSAGE_TENSORS
    for i in range(count if ok else 0):
        at = 3 + i * (2 + MAX_DIMS)
        code, ndim = int(header[at]), int(header[at + 1])
        ok = code in WIRE_CODES.values() and 0 <= ndim <= MAX_DIMS
        if not ok:
            break
        specs.append((torch_dtype_of_code(code), tuple(int(d) for d in header[at + 2:at + 2 + ndim])))
    if not ok:
        got = f"message #{hseq}" if magic == MAGIC and hseq != seq else \
            "a malformed header" if magic == MAGIC else "a foreign message"
        raise CommError(f"{what}: corrupt stream: got {got}")
    return specs


def receive_buffers(into: Sequence[torch.Tensor] | None, received: Sequence[TensorSpec],
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """Where a message whose header said `received` lands: the caller's `into` when it
    matches (a non-contiguous one replaced by a contiguous twin, filled by copy_back), else
    new tensors; the header is checked against what was expected after the bytes arrive."""
    if into is not None and [spec_of(t) for t in into] == list(received):
        return tuple(o if o.is_contiguous()
                     else torch.empty_like(o, memory_format=torch.contiguous_format) for o in into)
    return tuple(torch.empty(sh, dtype=dt, device=device) for dt, sh in received)


def copy_back(out: tuple[torch.Tensor, ...], got: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """recv_into's end: a non-contiguous `out` was received beside it; copy it in."""
    with torch.no_grad():
        for o, g in zip(out, got):
            if g is not o:
                o.copy_(g)
    return out
