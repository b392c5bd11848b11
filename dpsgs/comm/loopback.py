"""LoopbackTransport: the K x N grid inside one process (one thread per virtual rank).

The single-process reference runs the very step executor the distributed trainer runs, over
this transport: channels are in-process queues of messages (tuples of tensors) that check
the count, dtypes and shapes like the real ones, and the stage all-reduce is a rendezvous
that sums the replicas' buckets in replica order and divides by N (what the MPI core
computes). Every wait has the deadline of the
real transports and ends early when another virtual rank has failed, so an error in one
thread never leaves the others waiting.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from dpsgs.comm.errors import CommError, CommTimeout, HeaderMismatch
from dpsgs.comm.gradient_reducer import GradientReducer
from dpsgs.comm.grid import Grid
from dpsgs.comm.message import as_message, as_specs, check_received, spec_of
from dpsgs.comm.protocol import TensorSpec

__all__ = ["LoopbackGroup", "LoopbackTransport", "PeerFailed"]


class PeerFailed(CommError):
    """Another virtual rank of the group failed; this one stops waiting."""


class _Done:
    def is_completed(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> None:
        return None


@dataclass
class _Round:
    parts: dict[int, torch.Tensor] = field(default_factory=dict)   # replica -> its flat bucket
    done: bool = False


class LoopbackGroup:
    """Shared state of the grid's virtual ranks: message queues and all-reduce rounds."""

    def __init__(self, stages: int, replicas: int, timeout: float = 300.0,
                 device: torch.device | str = "cpu") -> None:
        self.grid = Grid(stages, replicas)
        self.timeout = timeout
        self.device = torch.device(device)     # every virtual rank's tensors live there
        self._cv = threading.Condition()
        self._queues: dict[tuple[int, int, int], deque] = {}
        self._rounds: dict[tuple[int, int], _Round] = {}
        self._failed: BaseException | None = None

    def transport(self, rank: int) -> "LoopbackTransport":
        return LoopbackTransport(self, rank)

    def fail(self, error: BaseException) -> None:
        """Record the first failure and wake every waiter."""
        with self._cv:
            if self._failed is None:
                self._failed = error
            self._cv.notify_all()

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        """Wait under the lock until ready(); CommTimeout at the deadline, PeerFailed early."""
        if not self._cv.wait_for(lambda: ready() or self._failed is not None, self.timeout):
            raise CommTimeout(f"{what}: no progress after {self.timeout:.1f} s")
        if not ready():
            raise PeerFailed(f"{what}: stopped, another virtual rank failed: "
                             f"{type(self._failed).__name__}: {self._failed}")

    # -- channels --------------------------------------------------------------------------
    def put(self, key: tuple[int, int, int], message: tuple[torch.Tensor, ...]) -> None:
        with self._cv:
            self._queues.setdefault(key, deque()).append(message)
            self._cv.notify_all()

    def take(self, key: tuple[int, int, int], what: str) -> tuple[torch.Tensor, ...]:
        with self._cv:
            q = self._queues.setdefault(key, deque())
            self._wait(lambda: bool(q), what)
            return q.popleft()

    # -- all-reduce ------------------------------------------------------------------------
    def contribute(self, stage: int, seq: int, replica: int, flat: torch.Tensor) -> _Round:
        with self._cv:
            r = self._rounds.setdefault((stage, seq), _Round())
            r.parts[replica] = flat
            n = self.grid.replicas
            if len(r.parts) == n:
                parts = [r.parts[i] for i in range(n)]
                with torch.no_grad():
                    acc = parts[0].clone()
                    for p in parts[1:]:
                        acc += p
                    mean = acc / n if n > 1 else acc
                    for p in parts:
                        p.copy_(mean)
                r.done = True
                del self._rounds[(stage, seq)]
                self._cv.notify_all()
            return r

    def finish(self, r: _Round, what: str) -> None:
        with self._cv:
            self._wait(lambda: r.done, what)


class _RoundWork:
    def __init__(self, group: LoopbackGroup, r: _Round, what: str) -> None:
        self.group, self.r, self.what = group, r, what

    def is_completed(self) -> bool:
        return self.r.done

    def wait(self, timeout: float | None = None) -> None:
        self.group.finish(self.r, self.what)


class _Channel:
    def __init__(self, group: LoopbackGroup, rank: int, peer: int, tag: int, sending: bool,
                 name: str) -> None:
        self.group, self.rank, self.peer, self.name = group, rank, peer, name
        src, dst = (rank, peer) if sending else (peer, rank)
        self.key = (src, dst, tag)
        self.sent = self.received = 0
        self.in_flight = 0          # a send completes at once: the queue holds a copy

    def send(self, message: Sequence[torch.Tensor]) -> _Done:
        msg = as_message(message, f"rank {self.rank}: channel {self.name!r} send #{self.sent}")
        self.group.put(self.key, tuple(t.detach().clone() for t in msg))
        self.sent += 1
        return _Done()

    def recv(self, specs: Sequence[TensorSpec]) -> tuple[torch.Tensor, ...]:
        seq = self.received
        expected = as_specs(specs, f"rank {self.rank}: channel {self.name!r} recv #{seq}")
        msg = self.group.take(self.key, f"rank {self.rank}: channel {self.name!r} recv #{seq} "
                                        f"from rank {self.peer}")
        self.received += 1          # taken off the queue, as the real channels count it
        check_received(expected, [spec_of(t) for t in msg],
                       f"channel {self.name!r} message #{seq} on rank {self.rank} from rank {self.peer}")
        return msg

    def recv_into(self, out: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = as_message(out, f"rank {self.rank}: channel {self.name!r} recv #{self.received}")
        with torch.no_grad():
            for o, t in zip(out, self.recv([spec_of(o) for o in out])):
                o.copy_(t)
        return out


class LoopbackTransport:
    """One virtual rank's face of a LoopbackGroup."""

    def __init__(self, group: LoopbackGroup, rank: int) -> None:
        self.group, self.rank = group, rank
        self.device = group.device
        self.replica, self.stage = group.grid.coords(rank)
        self._seq = 0

    def channel(self, peer: int, tag: int, sending: bool, name: str) -> _Channel:
        return _Channel(self.group, self.rank, peer, tag, sending, name)

    def allreduce(self, flat: torch.Tensor) -> _RoundWork:
        seq, self._seq = self._seq, self._seq + 1
        r = self.group.contribute(self.stage, seq, self.replica, flat)
        return _RoundWork(self.group, r, f"rank {self.rank}: all-reduce #{seq} of stage {self.stage}")

    def reducer(self, params: Iterable[torch.nn.Parameter], buffers: int = 1) -> GradientReducer:
        # one bucket per dtype: the reference's arithmetic does not depend on bucketing
        return GradientReducer(params, self.allreduce, bucket_cap_mb=1e6, first_bucket_mb=1e6,
                               buffers=buffers)

    def connect(self) -> None:
        """Nothing to connect."""

    def close(self) -> None:
        """Nothing to release."""
