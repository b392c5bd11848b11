"""A channel message in Python: the checks and error texts every torch-facing channel shares.

A message is an ordered tuple of 1..MAX_MESSAGE_TENSORS tensors (dpsgs.comm.protocol). The
sender's end refuses a message of another length (ValueError); the receiver compares what
arrived with what it expects — first the count, then each tensor's dtype and shape — and
raises HeaderMismatch naming the tensor index and both sides. The C++ core makes the same
checks with the same wording for the MPI and NCCL channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpsgs.comm.dtypes import name_of
from dpsgs.comm.errors import HeaderMismatch
from dpsgs.comm.protocol import MAX_MESSAGE_TENSORS, TensorSpec

__all__ = ["as_message", "as_specs", "check_received", "describe_specs", "spec_of"]


def _check_count(n: int, what: str, where: str) -> None:
    if not 1 <= n <= MAX_MESSAGE_TENSORS:
        raise ValueError(f"{where}: a message holds 1 to {MAX_MESSAGE_TENSORS} tensors; {what} {n}")


def as_message(message: Sequence[torch.Tensor], where: str) -> tuple[torch.Tensor, ...]:
    """The message as a tuple, or ValueError: not a sequence of tensors, or a bad length."""
    if isinstance(message, torch.Tensor) or not isinstance(message, Sequence):
        raise ValueError(f"{where}: a message is a tuple or list of tensors, got "
                         f"{type(message).__name__} (send one tensor as (t,))")
    _check_count(len(message), "got", where)
    for i, t in enumerate(message):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: tensor {i} of the message is a {type(t).__name__}")
    return tuple(message)


def as_specs(specs: Sequence[TensorSpec], where: str) -> tuple[TensorSpec, ...]:
    """(dtype, shape) pairs with shapes as tuples of ints, or ValueError for a bad length."""
    if not isinstance(specs, Sequence) or (len(specs) == 2 and isinstance(specs[0], torch.dtype)):
        raise ValueError(f"{where}: expected a sequence of (dtype, shape) pairs, one per tensor, "
                         f"got {specs!r} (one tensor: [(dtype, shape)])")
    _check_count(len(specs), "expected", where)
    return tuple((dt, tuple(int(s) for s in shape)) for dt, shape in specs)


def spec_of(t: torch.Tensor) -> TensorSpec:
    return t.dtype, tuple(t.shape)


def _shape_str(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))


def describe_specs(specs: Sequence[TensorSpec]) -> str:
    """'[float32 (2, 3), int64 (0,)]': the wording the C++ core uses too."""
    return "[" + ", ".join(f"{name_of(dt)} {_shape_str(shape)}" for dt, shape in specs) + "]"


def check_received(expected: Sequence[TensorSpec], received: Sequence[TensorSpec], where: str) -> None:
    """HeaderMismatch at the first difference: the count, then tensor i's dtype, then its shape."""
    if len(expected) != len(received):
        raise HeaderMismatch(f"{where}: expected {len(expected)} tensor(s) {describe_specs(expected)} "
                             f"but received {len(received)} {describe_specs(received)}")
    for i, ((edt, esh), (rdt, rsh)) in enumerate(zip(expected, received)):
        if edt != rdt or tuple(esh) != tuple(rsh):
            raise HeaderMismatch(f"{where}: tensor {i} of {len(expected)}: expected dtype {name_of(edt)} "
                                 f"shape {_shape_str(esh)} but received dtype {name_of(rdt)} "
                                 f"shape {_shape_str(rsh)}")
