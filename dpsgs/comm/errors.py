"""The transport's error types, the same on every backend (MPI core, NCCL, mpi4py, loopback).

- `CommError` (RuntimeError): a failed MPI/NCCL/CUDA call; the message names the call, the
  rank, the peer and the library's own text.
- `CommTimeout` (CommError, TimeoutError): a wait past its deadline; names the operation
  and the peer it waited on.
- `HeaderMismatch` (ValueError): a channel message whose dtype or shape is not what the
  receiver expects; names both ranks and both shapes.
"""

from __future__ import annotations

from dpsgs import _C

__all__ = ["CommError", "CommTimeout", "HeaderMismatch"]

CommError = _C.CommError
CommTimeout = _C.CommTimeout
HeaderMismatch = _C.HeaderMismatch
