"""Mpi4pyTransport: plain mpi4py (Isend/Irecv, Iallreduce), no C++ core and no progress thread.

A baseline: tests run the trainer over it to check the algorithm independently of the core,
and benchmarks use it to show what the core adds. Its channels carry no header (a wrong
shape is MPI's truncation error, not a HeaderMismatch); its all-reduce is MPI's own
Iallreduce(SUM) of each GradientReducer bucket, divided after the wait, progressing only
while some rank tests it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from dpsgs.comm.gradient_reducer import GradientReducer
from dpsgs.comm.waits import wait_for

__all__ = ["Mpi4pyTransport"]


class _Work:
    """An mpi4py request; `then` runs once after completion (e.g. the division of a sum)."""

    def __init__(self, req: Any, keep: Any, timeout: float, what: str, then: Any = None) -> None:
        self.req, self.keep, self.timeout, self.what, self.then = req, keep, timeout, what, then
        self._done = False

    def _finish(self) -> bool:
        if not self._done and self.req.Test():
            self._done = True
            if self.then is not None:
                self.then()
        return self._done

    def is_completed(self) -> bool:
        return self._finish()

    def wait(self, timeout: float | None = None) -> None:
        wait_for(self._finish, timeout or self.timeout, self.what)


class _Channel:
    def __init__(self, comm: Any, peer: int, tag: int, name: str, timeout: float) -> None:
        self.comm, self.peer, self.tag, self.name, self.timeout = comm, peer, tag, name, timeout
        self.sent = self.received = 0
        self._works: list[_Work] = []

    @property
    def in_flight(self) -> int:
        self._works = [w for w in self._works if not w.is_completed()]
        return len(self._works)

    def send(self, t: torch.Tensor) -> _Work:
        while self.in_flight >= 2:          # the transport contract's bound
            self._works[0].wait()
        a = t.detach().contiguous().numpy()
        work = _Work(self.comm.Isend(a, dest=self.peer, tag=self.tag), a, self.timeout,
                     f"channel {self.name!r} send #{self.sent} to rank {self.peer}")
        self.sent += 1
        self._works.append(work)
        return work

    def recv_into(self, out: torch.Tensor) -> torch.Tensor:
        req = self.comm.Irecv(out.numpy(), source=self.peer, tag=self.tag)
        wait_for(req.Test, self.timeout, f"channel {self.name!r} recv #{self.received} from rank {self.peer}")
        self.received += 1
        return out

    def recv(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self.recv_into(torch.empty(shape, dtype=dtype))


class Mpi4pyTransport:
    """Channels over `comm` (the grid), all-reduce over `stage_comm` (mpi4py communicators)."""

    device = torch.device("cpu")

    def __init__(self, comm: Any, stage_comm: Any, *, timeout: float = 300.0,
                 bucket_cap_mb: float = 25.0, first_bucket_mb: float = 1.0) -> None:
        self.comm, self.stage_comm, self.timeout = comm, stage_comm, float(timeout)
        self.bucket_cap_mb, self.first_bucket_mb = bucket_cap_mb, first_bucket_mb
        self._issued = 0

    def channel(self, peer: int, tag: int, sending: bool, name: str) -> _Channel:
        return _Channel(self.comm, peer, tag, name, self.timeout)

    def allreduce(self, flat: torch.Tensor) -> _Work:
        from mpi4py import MPI

        a = flat.numpy()
        n = self.stage_comm.Get_size()
        req = self.stage_comm.Iallreduce(MPI.IN_PLACE, a, op=MPI.SUM)
        self._issued += 1
        return _Work(req, a, self.timeout, f"gradient all-reduce #{self._issued - 1} over {n} ranks",
                     then=lambda: flat.div_(n))

    def reducer(self, params: Iterable[torch.nn.Parameter], buffers: int = 1) -> GradientReducer:
        return GradientReducer(params, self.allreduce, bucket_cap_mb=self.bucket_cap_mb,
                               first_bucket_mb=self.first_bucket_mb, buffers=buffers)

    def connect(self) -> None:
        """MPI connects on first use."""

    def close(self) -> None:
        """The communicators belong to the caller."""
