"""The transport's error types, the same on every backend (MPI core, NCCL, mpi4py, loopback).

Defined here, in Python, and raised by the C++ core too (dpsgs._C translates its exceptions
into these very classes), so the in-process transports need neither MPI nor the extension.
- `CommError` (RuntimeError): a failed MPI/NCCL/CUDA call; the message names the call, the
  rank, the peer and the library's own text.
- `CommTimeout` (CommError, TimeoutError): a wait past its deadline; names the operation
  and the peer it waited on.
- `HeaderMismatch` (ValueError): a channel message whose dtype or shape is not what the
  receiver expects; names both ranks and both shapes.
"""

from __future__ import annotations

__all__ = ["CommError", "CommTimeout", "HeaderMismatch"]


class CommError(RuntimeError):
    """A failed MPI, NCCL or CUDA call (or a communicator used after it failed)."""

    __module__ = "dpsgs._C"      # its name in tracebacks, as the core raises it


class CommTimeout(CommError, TimeoutError):
    """A wait past its deadline."""

    __module__ = "dpsgs._C"


class HeaderMismatch(ValueError):
    """A channel message of another dtype or shape than expected."""

    __module__ = "dpsgs._C"
