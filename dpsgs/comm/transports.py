"""Transports a StageWorker talks through: the C++ core (default) or plain mpi4py.

A transport makes `channel(peer, tag, sending, name)` objects with `send(tensor) -> work`
and `recv(dtype, shape) -> tensor` (a tensor the caller owns: it may be stashed), and
`reducer(params[, buffers=2])` objects with `zero_grad() / start_all() / wait()` that leave
the replica mean in every `p.grad`. `buffers=2` asks for two gradient sets (see
`dpsgs.comm.mpi.GradientReducer`); a reducer whose `buffers` attribute is not 2 has one, and the
worker then never backpropagates while it reduces.
`Mpi4pyTransport` is the plain-MPI baseline (no progress thread, no buckets, no overlap):
tests use it to check the trainer's algorithm independently of the C++ core, benchmarks to
show what the core adds.
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["CoreTransport", "Mpi4pyTransport"]


class CoreTransport:
    """Channels over `comm` (a dpsgs._C.Communicator spanning the grid) and reducers over
    `stage_comm` (this rank's stage group), via dpsgs.comm.mpi."""

    def __init__(self, comm: Any, stage_comm: Any, config: Any) -> None:
        self.comm, self.stage_comm, self.config = comm, stage_comm, config

    def channel(self, peer: int, tag: int, sending: bool, name: str) -> Any:
        from dpsgs.comm.mpi import TensorChannel

        return TensorChannel(self.comm, peer, tag, sending, name)

    def reducer(self, params: list[torch.nn.Parameter], buffers: int = 1) -> Any:
        from dpsgs.comm.mpi import GradientReducer

        c = self.config
        return GradientReducer(params, self.stage_comm, bucket_cap_mb=c.bucket_cap_mb,
                               first_bucket_mb=c.first_bucket_mb, algorithm=c.allreduce,
                               buffers=buffers)


def _poll(req: Any, timeout: float, what: str) -> None:
    """Wait for an mpi4py request without spinning a core (yield, then short sleeps)."""
    start = time.monotonic()
    delay = 0.0
    while not req.Test():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: no progress after {timeout:.0f}s")
        time.sleep(delay)
        delay = min(0.002, delay * 2 + 1e-5)


class _Work:
    def __init__(self, req: Any, keep: Any, timeout: float, what: str) -> None:
        self.req, self.keep, self.timeout, self.what = req, keep, timeout, what

    def is_completed(self) -> bool:
        return bool(self.req.Test())

    def wait(self, timeout: float | None = None) -> None:
        _poll(self.req, timeout or self.timeout, self.what)


class _Mpi4pyChannel:
    def __init__(self, comm: Any, peer: int, tag: int, sending: bool, name: str,
                 timeout: float) -> None:
        self.comm, self.peer, self.tag, self.name, self.timeout = comm, peer, tag, name, timeout
        self.sent = self.received = 0

    def send(self, t: torch.Tensor) -> _Work:
        a = t.detach().contiguous().numpy()
        req = self.comm.Isend(a, dest=self.peer, tag=self.tag)
        self.sent += 1
        return _Work(req, a, self.timeout, f"channel {self.name!r} send #{self.sent - 1}")

    def recv(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        req = self.comm.Irecv(out.numpy(), source=self.peer, tag=self.tag)
        _poll(req, self.timeout, f"channel {self.name!r} recv #{self.received} "
                                 f"from rank {self.peer}")
        self.received += 1
        return out


class _Mpi4pyReducer:
    """Sum-then-divide all-reduce of every gradient, started at start_all()."""

    def __init__(self, params: list[torch.nn.Parameter], comm: Any, timeout: float) -> None:
        self.params, self.comm, self.timeout = params, comm, timeout
        self._reqs: list[Any] = []
        for p in params:
            p.grad = torch.zeros_like(p)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad.zero_()

    def start_all(self) -> None:
        from mpi4py import MPI

        self._reqs = [self.comm.Iallreduce(MPI.IN_PLACE, p.grad.numpy(), op=MPI.SUM)
                      for p in self.params]

    def wait(self) -> None:
        for r in self._reqs:
            _poll(r, self.timeout, "gradient all-reduce")
        self._reqs = []
        n = self.comm.Get_size()
        for p in self.params:
            p.grad.div_(n)


class Mpi4pyTransport:
    """Plain mpi4py channels and reducer (see the module docstring)."""

    def __init__(self, comm: Any, stage_comm: Any, config: Any) -> None:
        self.comm, self.stage_comm = comm, stage_comm
        self.timeout = float(config.timeout)

    def channel(self, peer: int, tag: int, sending: bool, name: str) -> _Mpi4pyChannel:
        return _Mpi4pyChannel(self.comm, peer, tag, sending, name, self.timeout)

    def reducer(self, params: list[torch.nn.Parameter], buffers: int = 1) -> _Mpi4pyReducer:
        """One gradient set whatever `buffers` asks: the baseline does not overlap."""
        return _Mpi4pyReducer(params, self.stage_comm, self.timeout)

