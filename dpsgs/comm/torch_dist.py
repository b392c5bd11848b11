"""TorchTransport: the trainer over an initialised torch.distributed process group.

Written against torch.distributed's public calls only, so it runs over any backend: gloo
(CPU), NCCL (GPU) or dpsgs's own "dpsgs" backend (dpsgs.distributed). Whoever initialises
the default group (the job: dpsgs.job.rank_context, over `mpi://`) hands it over; the
default group's ranks are the grid's ranks.

- Channels: each message is the int64 header of dpsgs.comm.message_header (HEADER_WORDS,
  always: gloo and NCCL need a send and its receive to have one size) and one `dist.isend`
  per non-empty tensor as bytes, all on the channel's tag; the receiver takes the header,
  then the tensors, and checks them as every transport does (HeaderMismatch). Backends
  match sends and receives in order per peer and tag. On CUDA (NCCL, whose point-to-point
  calls between two ranks share one stream per group whatever the direction), each
  direction of each pipeline edge gets a two-rank group of its own (`pair_groups`):
  otherwise two neighbours both sending a large message first would each wait for the
  other's receive, queued behind its own send.
- allreduce(flat): SUM over the stage group (a `new_group` of the stage's replicas, made
  by every rank in stage order), divided by N once it completes: the mean the reference
  computes, on every backend.
- Waits: on the CPU a Work's own `wait(timeout)` blocks without spinning and has a
  deadline (gloo's point-to-point Works cannot be polled at all: their is_completed()
  stays False until waited). On CUDA `wait()` only orders the current stream, so the
  deadline comes from polling is_completed() politely (dpsgs.comm.waits). Either way a
  wait past the deadline raises CommTimeout naming the rank, the operation and the peer,
  with the backend's own words. The groups are made with a longer timeout than the
  transport's, so this message, not the backend's watchdog, reports a missing peer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dpsgs.comm.errors import CommError, CommTimeout
from dpsgs.comm.gradient_reducer import GradientReducer
from dpsgs.comm.grid import Grid
from dpsgs.comm.message import as_message, as_specs, check_received, spec_of
from dpsgs.comm.message_header import (HEADER_WORDS, check_dims, copy_back, pack_header,
                                       parse_header, receive_buffers)
from dpsgs.comm.protocol import TensorSpec
from dpsgs.comm.waits import wait_for

__all__ = ["TorchTransport", "group_timeout"]


def group_timeout(timeout: float) -> timedelta:
    """The timeout to give torch's groups: past the transport's own deadline, so that its
    message (naming the peer) comes first and no backend watchdog ends the job before it."""
    return timedelta(seconds=timeout * 1.5 + 10.0)


class _Work:
    """The torch Works of one operation; `then` runs once after they all complete (e.g. the
    division of a sum). `host_wait`: Work.wait(timeout) blocks the host with a deadline (CPU
    tensors); else completion is polled and wait() only orders the stream (CUDA).
    `pollable`: is_completed() says when the operation is done (not so for gloo's sends)."""

    def __init__(self, works: list[Any], keep: Any, timeout: float, what: str, *,
                 host_wait: bool, pollable: bool, then: Callable[[], Any] | None = None) -> None:
        self.works, self.keep, self.timeout, self.what = works, keep, timeout, what
        self.host_wait, self.pollable, self.then = host_wait, pollable, then
        self._done = not works
        if self._done and then is not None:
            then()

    def _complete(self) -> None:
        self._done = True
        self.keep = None
        if self.then is not None:
            self.then()

    def is_completed(self) -> bool:
        if not self._done and self.pollable and all(w.is_completed() for w in self.works):
            self.wait()               # raises the backend's error of a failed operation
        return self._done

    def wait(self, timeout: float | None = None) -> None:
        if self._done:
            return
        limit = timeout or self.timeout
        if self.host_wait:
            deadline = time.monotonic() + limit
            for w in self.works:
                _wait_one(w, max(deadline - time.monotonic(), 0.001), limit, self.what)
        else:
            wait_for(lambda: all(w.is_completed() for w in self.works), limit, self.what)
            for w in self.works:
                _wait_one(w, None, limit, self.what)
        self._complete()


def _wait_one(work: Any, seconds: float | None, limit: float, what: str) -> None:
    """work.wait(), its failures in the transport's words: CommTimeout past the deadline,
    CommError otherwise, each with the backend's own message."""
    try:
        work.wait() if seconds is None else work.wait(timedelta(seconds=seconds))
    except TimeoutError as e:         # the dpsgs backend's CommTimeout
        raise CommTimeout(f"{what}: no progress after {limit:.1f} s ({e})") from None
    except RuntimeError as e:
        text = str(e)
        if "timed out" in text.lower() or "timeout" in text.lower():
            raise CommTimeout(f"{what}: no progress after {limit:.1f} s ({text})") from None
        raise CommError(f"{what}: {text}") from e


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view (every dtype moves as bytes)."""
    return t.reshape(-1).view(torch.uint8)


class _Channel:
    def __init__(self, owner: TorchTransport, peer: int, tag: int, group: Any, name: str) -> None:
        self.owner, self.peer, self.tag, self.group, self.name = owner, peer, tag, group, name
        self.rank = owner.rank
        self.sent = self.received = 0
        self._works: list[_Work] = []

    def _where(self, op: str, seq: int) -> str:
        return f"rank {self.rank}: channel {self.name!r} {op} #{seq}"

    @property
    def in_flight(self) -> int:
        self._works = [w for w in self._works if not w.is_completed()]
        return len(self._works)

    def send(self, message: Sequence[torch.Tensor]) -> _Work:
        where = self._where("send", self.sent)
        msg = as_message(message, where)
        check_dims(msg, where)
        while self.in_flight >= 2:          # the transport contract's bound, in messages
            self._works[0].wait()
        dev = self.owner.device
        header = torch.from_numpy(pack_header(self.sent, msg)).to(dev)
        keep = [header] + [_bytes(t.detach().contiguous()) for t in msg if t.numel()]
        works = [dist.isend(x, self.peer, group=self.group, tag=self.tag) for x in keep]
        work = self.owner.work(works, keep, f"{where} to rank {self.peer}", p2p=True)
        self.sent += 1
        self._works.append(work)
        return work

    def _take(self, expected: tuple[TensorSpec, ...], into: tuple[torch.Tensor, ...] | None
              ) -> tuple[torch.Tensor, ...]:
        """The next message, into `into` when it matches (else fresh tensors, so the stream
        stays whole), then HeaderMismatch if it differs from `expected`."""
        seq, dev = self.received, self.owner.device
        what = f"{self._where('recv', seq)} from rank {self.peer}"
        header = torch.empty(HEADER_WORDS, dtype=torch.int64, device=dev)
        self.owner.work([dist.irecv(header, self.peer, group=self.group, tag=self.tag)],
                        header, what, p2p=True).wait()
        self.received += 1
        received = parse_header(header.tolist(), seq, what)
        bufs = receive_buffers(into, received, dev)
        works = [dist.irecv(_bytes(b), self.peer, group=self.group, tag=self.tag)
                 for b in bufs if b.numel()]
        self.owner.work(works, bufs, what, p2p=True).wait()
        check_received(expected, received, f"channel {self.name!r} message #{seq} on rank "
                                           f"{self.rank} from rank {self.peer}")
        return bufs

    def recv(self, specs: Sequence[TensorSpec]) -> tuple[torch.Tensor, ...]:
        return self._take(as_specs(specs, self._where("recv", self.received)), None)

    def recv_into(self, out: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = as_message(out, self._where("recv", self.received))
        return copy_back(out, self._take(tuple(spec_of(o) for o in out), out))


class TorchTransport:
    """One rank of `grid` over torch.distributed's default group, already initialised with
    the grid's ranks (collective: every rank makes it, in the same order as its peers).

    pair_groups: a two-rank group per direction of each pipeline edge for the channels
    (default: on CUDA, where NCCL needs them; see the module docstring); else the default
    group and the channel's tag. device: where the tensors live (default: the current GPU
    on NCCL, else the CPU). owns_default_group: close() destroys the default group too (the
    job initialised it for this transport)."""

    def __init__(self, grid: Grid, *, timeout: float = 300.0, bucket_cap_mb: float = 25.0,
                 first_bucket_mb: float = 1.0, device: torch.device | None = None,
                 pair_groups: bool | None = None, owns_default_group: bool = False) -> None:
        if not dist.is_initialized():
            raise ValueError("TorchTransport: torch.distributed is not initialised "
                             "(init_process_group first, e.g. with init_method='mpi://')")
        if dist.get_world_size() != grid.size:
            raise ValueError(f"TorchTransport: the default group has {dist.get_world_size()} ranks "
                             f"but the grid {grid.stages}x{grid.replicas} needs {grid.size}")
        self.grid, self.timeout = grid, float(timeout)
        self.bucket_cap_mb, self.first_bucket_mb = bucket_cap_mb, first_bucket_mb
        self.rank = dist.get_rank()
        self.backend = str(dist.get_backend())
        self.device = device or (torch.device("cuda", torch.cuda.current_device())
                                 if self.backend == "nccl" else torch.device("cpu"))
        self._owns_default = owns_default_group
        self._issued = 0
        replica, stage = grid.coords(self.rank)
        made: list[Any] = []
        after = group_timeout(timeout)

        def group(ranks: list[int]) -> Any:
            g = dist.new_group(ranks, timeout=after)     # every rank calls, members get a group
            if self.rank in ranks:
                made.append(g)
                return g
            return None

        # every rank makes every group, in one order: new_group is collective over the world
        stage_groups = [group([grid.rank(q, k) for q in range(grid.replicas)])
                        if grid.replicas > 1 else None for k in range(grid.stages)]
        self.stage_group = stage_groups[stage]
        self._pairs: dict[tuple[int, int], Any] = {}
        if self.device.type == "cuda" if pair_groups is None else pair_groups:
            for r in range(grid.replicas):
                for k in range(grid.stages - 1):
                    a, b = grid.rank(r, k), grid.rank(r, k + 1)
                    for src, dst in ((a, b), (b, a)):
                        g = group([a, b])
                        if g is not None:
                            self._pairs[(src, dst)] = g
        self._made = made

    def work(self, works: list[Any], keep: Any, what: str, p2p: bool,
             then: Callable[[], Any] | None = None) -> _Work:
        """The protocol's Work over torch Works (for this transport's channels)."""
        return _Work(works, keep, self.timeout, what, host_wait=self.device.type == "cpu",
                     pollable=not (p2p and self.backend == "gloo"), then=then)

    def channel(self, peer: int, tag: int, sending: bool, name: str) -> _Channel:
        key = (self.rank, peer) if sending else (peer, self.rank)
        return _Channel(self, peer, tag, self._pairs.get(key), name)

    def allreduce(self, flat: torch.Tensor) -> _Work:
        what = f"rank {self.rank}: gradient all-reduce #{self._issued} over {self.grid.replicas} ranks"
        self._issued += 1
        if self.stage_group is None:            # one replica: the mean is the tensor itself
            return self.work([], None, what, p2p=False)
        n = self.grid.replicas
        w = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.stage_group, async_op=True)
        return self.work([w], flat, what, p2p=False, then=lambda: flat.div_(n))

    def reducer(self, params: Iterable[torch.nn.Parameter], buffers: int = 1) -> GradientReducer:
        return GradientReducer(params, self.allreduce, bucket_cap_mb=self.bucket_cap_mb,
                               first_bucket_mb=self.first_bucket_mb, buffers=buffers)

    def connect(self) -> None:
        """The groups connected when they were made."""

    def close(self) -> None:
        """Destroys the groups this transport made (and the default group if it owns it)."""
        for g in self._made:
            dist.destroy_process_group(g)
        self._made, self._pairs, self.stage_group = [], {}, None
        if self._owns_default and dist.is_initialized():
            dist.destroy_process_group()
