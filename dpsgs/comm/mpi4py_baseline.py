"""Mpi4pyTransport: plain mpi4py (Isend/Irecv, Iallreduce), no C++ core and no progress thread.

A baseline: tests run the trainer over it to check the algorithm independently of the core,
and benchmarks use it to show what the core adds. Its channels send each message as a small
int64 header (dpsgs.comm.message_header: seq, count, each tensor's dtype code and shape) and
then one message per non-empty tensor, on the channel's tag; the receiver takes the header,
then the tensors, and checks them as every transport does (HeaderMismatch). Its all-reduce
is MPI's own Iallreduce(SUM) of each GradientReducer bucket, divided after the wait,
progressing only while some rank tests it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from dpsgs.comm.gradient_reducer import GradientReducer
from dpsgs.comm.message import as_message, as_specs, check_received, spec_of
from dpsgs.comm.message_header import (HEADER_WORDS, check_dims, copy_back, pack_header,
                                       parse_header, receive_buffers)
from dpsgs.comm.protocol import TensorSpec
from dpsgs.comm.waits import wait_for

__all__ = ["Mpi4pyTransport"]


class _Work:
    """mpi4py requests; `then` runs once after they complete (e.g. the division of a sum)."""

    def __init__(self, reqs: list[Any], keep: Any, timeout: float, what: str,
                 then: Any = None) -> None:
        self.reqs, self.keep, self.timeout, self.what, self.then = reqs, keep, timeout, what, then
        self._done = False

    def _finish(self) -> bool:
        from mpi4py import MPI

        if not self._done and MPI.Request.Testall(self.reqs):
            self._done = True
            if self.then is not None:
                self.then()
        return self._done

    def is_completed(self) -> bool:
        return self._finish()

    def wait(self, timeout: float | None = None) -> None:
        wait_for(self._finish, timeout or self.timeout, self.what)


def _raw(t: torch.Tensor) -> Any:
    """The bytes of a contiguous tensor as a NumPy view (every dtype, bfloat16 and bool too)."""
    return t.reshape(-1).view(torch.uint8).numpy()


class _Channel:
    def __init__(self, comm: Any, rank: int, peer: int, tag: int, name: str,
                 timeout: float) -> None:
        self.comm, self.rank, self.peer, self.tag = comm, rank, peer, tag
        self.name, self.timeout = name, timeout
        self.sent = self.received = 0
        self._works: list[_Work] = []

    def _where(self, op: str, seq: int) -> str:
        return f"rank {self.rank}: channel {self.name!r} {op} #{seq}"

    @property
    def in_flight(self) -> int:
        self._works = [w for w in self._works if not w.is_completed()]
        return len(self._works)

    def send(self, message: Sequence[torch.Tensor]) -> _Work:
        msg = as_message(message, self._where("send", self.sent))
        check_dims(msg, self._where("send", self.sent))
        while self.in_flight >= 2:          # the transport contract's bound, in messages
            self._works[0].wait()
        header = pack_header(self.sent, msg, padded=False)
        keep = [header] + [_raw(t.detach().contiguous()) for t in msg if t.numel()]
        reqs = [self.comm.Isend(a, dest=self.peer, tag=self.tag) for a in keep]
        what = f"{self._where('send', self.sent)} to rank {self.peer}"
        work = _Work(reqs, keep, self.timeout, what)
        self.sent += 1
        self._works.append(work)
        return work

    def _take(self, expected: tuple[TensorSpec, ...], into: tuple[torch.Tensor, ...] | None
              ) -> tuple[torch.Tensor, ...]:
        """The next message, into `into` when it matches (else fresh tensors, so the stream
        stays whole), then HeaderMismatch if it differs from `expected`."""
        seq = self.received
        what = f"{self._where('recv', seq)} from rank {self.peer}"
        header = np.zeros(HEADER_WORDS, dtype=np.int64)
        req = self.comm.Irecv(header, source=self.peer, tag=self.tag)
        wait_for(req.Test, self.timeout, what)
        self.received += 1
        received = parse_header(header, seq, what)
        bufs = receive_buffers(into, received)
        reqs = [self.comm.Irecv(_raw(b), source=self.peer, tag=self.tag) for b in bufs if b.numel()]
        wait_for(lambda: MPI.Request.Testall(reqs), self.timeout, what)
        check_received(expected, received, f"channel {self.name!r} message #{seq} on rank "
                                           f"{self.rank} from rank {self.peer}")
        return bufs

    def recv(self, specs: Sequence[TensorSpec]) -> tuple[torch.Tensor, ...]:
        return self._take(as_specs(specs, self._where("recv", self.received)), None)

    def recv_into(self, out: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = as_message(out, self._where("recv", self.received))
        return copy_back(out, self._take(tuple(spec_of(o) for o in out), out))


class Mpi4pyTransport:
    """Channels over `comm` (the grid), all-reduce over `stage_comm` (mpi4py communicators)."""

    device = torch.device("cpu")

    def __init__(self, comm: Any, stage_comm: Any, *, timeout: float = 300.0,
                 bucket_cap_mb: float = 25.0, first_bucket_mb: float = 1.0) -> None:
        self.comm, self.stage_comm, self.timeout = comm, stage_comm, float(timeout)
        self.bucket_cap_mb, self.first_bucket_mb = bucket_cap_mb, first_bucket_mb
        self._issued = 0

    def channel(self, peer: int, tag: int, sending: bool, name: str) -> _Channel:
        return _Channel(self.comm, self.comm.Get_rank(), peer, tag, name, self.timeout)

    def allreduce(self, flat: torch.Tensor) -> _Work:
        a = flat.numpy()
        n = self.stage_comm.Get_size()
        req = self.stage_comm.Iallreduce(MPI.IN_PLACE, a, op=MPI.SUM)
        self._issued += 1
        return _Work([req], a, self.timeout, f"gradient all-reduce #{self._issued - 1} over {n} ranks",
                     then=lambda: flat.div_(n))

    def reducer(self, params: Iterable[torch.nn.Parameter], buffers: int = 1) -> GradientReducer:
        return GradientReducer(params, self.allreduce, bucket_cap_mb=self.bucket_cap_mb,
                               first_bucket_mb=self.first_bucket_mb, buffers=buffers)

    def connect(self) -> None:
        """MPI connects on first use."""

    def close(self) -> None:
        """The communicators belong to the caller."""
