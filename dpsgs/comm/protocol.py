"""The transport seam: what the step executor needs from a backend, as typing.Protocols.

A Transport belongs to one rank of the K x N grid. It makes directed channels to pipeline
neighbours and averages flat gradient buffers over this rank's stage group; everything
above it (the GradientReducer's buckets and hooks, the executor, the trainer) is written
once against these protocols. Implementations: `MpiTransport` (dpsgs._C over MPI, host
memory), `NcclTransport` (dpsgs._C over NCCL, device memory), `Mpi4pyTransport` (plain
mpi4py, a baseline) and `LoopbackTransport` (in-process, for the reference). Errors are
those of dpsgs.comm.errors on every backend.

Contracts:
- Channel: one sender and one receiver; messages arrive in order. A message is an ordered
  tuple of 1..MAX_MESSAGE_TENSORS tensors, each of any wire dtype and shape (zero-element
  tensors too; dtypes may differ within a message): the activation and any skip tensors
  that cross a stage cut, or their gradients. There is no single-tensor form: `send((t,))`,
  `(x,) = recv([(torch.float32, (32, 64))])`. `send(message)` may read the tensors until
  its Work completes; at most two MESSAGES are in flight (a third send waits for the
  oldest); `sent`, `received` and `in_flight` count messages. `recv(specs)` returns tensors
  the caller owns (autograd may keep them); `recv_into(out)` fills the given tensors. Both
  check the count, then each tensor's dtype and shape, and raise HeaderMismatch naming the
  channel, the ranks, the tensor index and expected vs received. A message of no tensors
  or of more than MAX_MESSAGE_TENSORS is refused (ValueError) on either end.
- allreduce(flat): an in-place mean over the stage group, started now (every rank of the
  group calls it in the same order), complete when its Work's wait() returns.
- Work.wait() has a deadline (CommTimeout) and never burns a core.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch

__all__ = ["MAX_MESSAGE_TENSORS", "TensorSpec", "Work", "Channel", "Reducer", "Transport"]

TensorSpec = tuple[torch.dtype, tuple[int, ...]]     # one tensor of a message: dtype, shape
MAX_MESSAGE_TENSORS = 16     # tensors per message; the C++ core's kMaxMessageTensors agrees


@runtime_checkable
class Work(Protocol):
    def wait(self, timeout: float | None = None) -> None: ...
    def is_completed(self) -> bool: ...


@runtime_checkable
class Channel(Protocol):
    name: str

    @property
    def sent(self) -> int: ...
    @property
    def received(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    def send(self, message: Sequence[torch.Tensor]) -> Work: ...
    def recv(self, specs: Sequence[TensorSpec]) -> tuple[torch.Tensor, ...]: ...
    def recv_into(self, out: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]: ...


@runtime_checkable
class Reducer(Protocol):
    """Averages a stage's gradients over its replicas (dpsgs.comm.gradient_reducer)."""

    buffers: int

    def zero_grad(self) -> None: ...
    def start_all(self) -> None: ...
    def wait(self) -> None: ...
    def no_sync(self) -> AbstractContextManager[None]: ...
    def close(self) -> None: ...


@runtime_checkable
class Transport(Protocol):
    device: torch.device          # where this rank's tensors live

    def channel(self, peer: int, tag: int, sending: bool, name: str) -> Channel: ...
    def allreduce(self, flat: torch.Tensor) -> Work: ...
    def reducer(self, params: Iterable[torch.nn.Parameter], buffers: int = 1) -> Reducer: ...
    def connect(self) -> None: ...    # collective, after every channel exists
    def close(self) -> None: ...
