"""The MPI core's face (dpsgs._C over MPI, host memory): zero-copy views, tensor channels,
and MpiTransport, the transport the trainer uses on CPUs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from dpsgs import _C
from dpsgs.comm.channel_end import ChannelEnd
from dpsgs.comm.dtypes import code_of
from dpsgs.comm.gradient_reducer import GradientReducer
from dpsgs.comm.message import as_message, as_specs, spec_of
from dpsgs.comm.protocol import TensorSpec

__all__ = ["Communicator", "MPILibraryMismatch", "MpiTransport", "TensorChannel", "as_buffer",
           "as_communicator", "check_mpi_match"]

Communicator = _C.Communicator


class MPILibraryMismatch(ImportError, RuntimeError):
    """dpsgs._C and mpi4py use different MPI libraries."""


def check_mpi_match(ours: str, theirs: str) -> None:
    """Raise MPILibraryMismatch naming both libraries unless the version strings agree."""
    if ours.strip() != theirs.strip():
        raise MPILibraryMismatch(
            "dpsgs._C and mpi4py use different MPI libraries; rebuild dpsgs in this environment.\n"
            f"--- dpsgs._C links:\n{ours.strip()}\n--- mpi4py uses:\n{theirs.strip()}")


def _code_override(t: torch.Tensor | np.ndarray) -> int | None:
    """bfloat16 travels as uint16 plus this explicit code; everything else as its own dtype."""
    return code_of("bfloat16") if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 else None


def as_buffer(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """Zero-copy NumPy view of a CPU tensor (bfloat16 as uint16: pass dtype_code=1 alongside).
    The view keeps the tensor alive. Non-contiguous tensors give strided views."""
    if isinstance(t, np.ndarray):
        return t
    if not isinstance(t, torch.Tensor):
        raise ValueError("as_buffer: expected a torch.Tensor or numpy.ndarray, "
                         f"got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"as_buffer: tensor on {t.device}; the MPI backend takes CPU tensors "
                         "(CUDA tensors go through the NCCL backend)")
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    code_of(t.dtype)
    return t.numpy()


def as_communicator(comm: Any, timeout: float = 300.0, warn_after: float = 60.0) -> _C.Communicator:
    """A dpsgs._C.Communicator as is, or a new one over an mpi4py communicator (collective)."""
    if isinstance(comm, _C.Communicator):
        return comm
    return _C.Communicator(comm, timeout=timeout, warn_after=warn_after)


class TensorChannel(ChannelEnd):
    """Directed channel of messages of torch CPU tensors between two ranks (one end per rank).

    A message is a tuple of 1..16 tensors (dpsgs.comm.protocol). send(message) is zero-copy
    for the tensors that do not travel inline (non-contiguous tensors are sent from a
    contiguous copy); they must not be modified until the returned Work completes (at most 2
    messages are in flight; a third send waits for the oldest). recv(specs) returns **copies**
    by default, so autograd may keep them; recv(specs, copy=False) returns zero-copy views of
    the receive slot that are valid only until the next recv() on this channel;
    recv_into(out) copies into the given tensors.
    """

    def __init__(self, comm: Any, peer: int, tag: int, is_sender: bool, name: str = "",
                 capacity: int | None = None) -> None:
        self.comm = as_communicator(comm)
        kwargs = {} if capacity is None else {"capacity": capacity}
        self._ch = _C.Channel(self.comm, peer, tag, is_sender, name, **kwargs)

    def _where(self, op: str, seq: int) -> str:
        return f"rank {self.comm.rank}: channel {self.name!r} {op} #{seq}"

    def send(self, message: Sequence[torch.Tensor]) -> _C.Work:
        msg = as_message(message, self._where("send", self.sent))
        codes = [_code_override(t) for t in msg]
        return self._ch.send([as_buffer(t) for t in msg],
                             dtype_codes=codes if any(c is not None for c in codes) else None)

    def recv(self, specs: Sequence[TensorSpec], copy: bool = True) -> tuple[torch.Tensor, ...]:
        expected = as_specs(specs, self._where("recv", self.received))
        arrays = self._ch.recv([(code_of(dt), shape) for dt, shape in expected])
        out = tuple(torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if dt == torch.bfloat16
                    else torch.from_numpy(a) for a, (dt, _) in zip(arrays, expected))
        return tuple(t.clone() for t in out) if copy else out

    def recv_into(self, out: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = as_message(out, self._where("recv", self.received))
        with torch.no_grad():
            for o, t in zip(out, self.recv([spec_of(o) for o in out], copy=False)):
                o.copy_(t)
        return out


class MpiTransport:
    """One rank's transport over the C++ core: channels over `comm` (a dpsgs._C.Communicator
    spanning the grid), bucketed all-reduce over `stage_comm` (this rank's stage group)."""

    device = torch.device("cpu")

    def __init__(self, comm: Any, stage_comm: Any, *, bucket_cap_mb: float = 25.0,
                 first_bucket_mb: float = 1.0, algorithm: str = "auto") -> None:
        self.comm, self.stage_comm = comm, stage_comm
        self.bucket_cap_mb, self.first_bucket_mb = bucket_cap_mb, first_bucket_mb
        self._reducer = _C.Reducer(as_communicator(stage_comm), algorithm)

    def channel(self, peer: int, tag: int, sending: bool, name: str) -> TensorChannel:
        return TensorChannel(self.comm, peer, tag, sending, name)

    def allreduce(self, flat: torch.Tensor) -> _C.Work:
        return self._reducer.allreduce(as_buffer(flat), True, _code_override(flat))

    def reducer(self, params: Iterable[torch.nn.Parameter], buffers: int = 1) -> GradientReducer:
        return GradientReducer(params, self.allreduce, bucket_cap_mb=self.bucket_cap_mb,
                               first_bucket_mb=self.first_bucket_mb, buffers=buffers)

    def connect(self) -> None:
        """Nothing to warm up: MPI connects on first use."""

    def close(self) -> None:
        """The communicators belong to the caller (they free with the job)."""
