"""Rank program (2 ranks): messages of several tensors through a torch-facing channel.

Arguments: TRANSPORT CASE [MESSAGES]. TRANSPORT: `core` (dpsgs.comm.mpi.TensorChannel over the
C++ core, small slots so they grow) or `mpi4py` (the baseline's channel). CASE:
- exact: MESSAGES ordered messages (default 300) of 1..16 tensors, every dtype mix, shapes
  from zero elements to past the slot capacity, some sent non-contiguous, received by recv,
  recv_into and (core) zero-copy views: byte-exact; at most two messages in flight.
- bound: a sleeping receiver; the sender's in_flight counts messages (of 3 tensors) and its
  third send waits for the oldest.
- count / dtype / shape: the receiver expects another count, another dtype of tensor 1,
  another shape of tensor 2; HeaderMismatch names the channel, both ranks, the index and
  both sides, and the next message arrives intact.
- too_many: 17 tensors are refused on either end before anything is sent.
"""

import sys
import time

import torch
from messages import message, same
from mpi4py import MPI

from dpsgs import _C
from dpsgs.comm.errors import HeaderMismatch
from dpsgs.comm.message import spec_of
from dpsgs.comm.mpi import TensorChannel
from dpsgs.comm.mpi4py_baseline import Mpi4pyTransport
from dpsgs.comm.protocol import MAX_MESSAGE_TENSORS

TRANSPORT, CASE = sys.argv[1], sys.argv[2]
MESSAGES = int(sys.argv[3]) if len(sys.argv) > 3 else 300
W = MPI.COMM_WORLD
rank = W.Get_rank()
assert W.Get_size() == 2
NAME = "act s0->s1"


def channel(sending: bool):
    if TRANSPORT == "core":
        comm = _C.Communicator(W, timeout=30.0, warn_after=10.0)
        return TensorChannel(comm, 1 - rank, 21, sending, NAME, capacity=16384)
    return Mpi4pyTransport(W, W, timeout=30.0).channel(1 - rank, 21, sending, NAME)


def strided(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view equal to t."""
    v = t.transpose(0, 2).contiguous().transpose(0, 2)
    assert not v.is_contiguous()
    return v


def exact(ch) -> None:
    if rank == 0:
        most = 0
        for i in range(MESSAGES):
            ts, st = message(i)
            ch.send(tuple(strided(t) if s else t for t, s in zip(ts, st)))
            most = max(most, ch.in_flight)
            assert ch.in_flight <= 2, ch.in_flight
        while ch.in_flight:
            time.sleep(0.001)
        print(f"rank 0: sent {ch.sent} messages, max in flight {most}", flush=True)
        return
    for i in range(MESSAGES):
        want, _ = message(i)
        how = i % 3
        if how == 0:
            got = ch.recv([spec_of(t) for t in want])
        elif how == 1:
            out = tuple(torch.full_like(t, 1) for t in want)
            got = ch.recv_into(out)
            assert all(g is o for g, o in zip(got, out))
        else:
            view = {"copy": False} if TRANSPORT == "core" else {}      # zero-copy slot views
            got = ch.recv([spec_of(t) for t in want], **view)
        assert isinstance(got, tuple) and len(got) == len(want), (i, len(got))
        for j, (g, w) in enumerate(zip(got, want)):
            assert same(g, w), \
                f"message {i} tensor {j}: {g.dtype} {tuple(g.shape)} vs {w.dtype} {tuple(w.shape)}"
    print(f"rank 1: received {ch.received} messages byte-exact", flush=True)


def bound(ch) -> None:
    sleep, n = 0.4, 6
    big = torch.arange(1 << 18, dtype=torch.float32)       # 1 MiB: rendezvous, stays in flight
    if rank == 0:
        W.Barrier()
        seen, took = [], []
        for i in range(n):
            t0 = time.monotonic()
            ch.send((big + i, torch.tensor([i], dtype=torch.int64), -big))
            took.append(time.monotonic() - t0)
            seen.append(ch.in_flight)
        while ch.in_flight:
            time.sleep(0.01)
        print(f"rank 0: in_flight after each send {seen}; "
              f"send seconds {[round(t, 2) for t in took]}", flush=True)
        assert seen[1] == 2 and max(seen) == 2, seen
        assert took[0] < sleep / 2 and took[1] < sleep / 2, took
        assert took[2] > sleep * 0.6, took                  # the third send waited for the oldest
    else:
        W.Barrier()
        for i in range(n):
            time.sleep(sleep)
            a, b, c = ch.recv([(torch.float32, big.shape), (torch.int64, (1,)),
                               (torch.float32, big.shape)])
            assert torch.equal(a, big + i) and b.item() == i and torch.equal(c, -big), i
        assert ch.received == n


def mismatch(ch) -> None:
    good = (torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.zeros(0, dtype=torch.int64),
            torch.full((20000,), 7.0, dtype=torch.float64))          # inline, empty, separate
    after = (torch.tensor([True, False]),)
    if rank == 0:
        ch.send(good)
        ch.send(after)
        while ch.in_flight:
            time.sleep(0.001)
        return
    expect = [spec_of(t) for t in good]
    if CASE == "count":
        expect = expect[:2]
    elif CASE == "dtype":
        expect[1] = (torch.int32, (0,))
    else:
        expect[2] = (torch.float64, (20001,))
    try:
        ch.recv(expect)
        raise AssertionError("the mismatch was accepted")
    except HeaderMismatch as e:
        print(f"rank 1 got HeaderMismatch: {e}", flush=True)
    (x,) = ch.recv([spec_of(after[0])])                     # the stream is whole
    assert torch.equal(x, after[0])
    print("rank 1: the next message arrived intact", flush=True)


def too_many(ch) -> None:
    n = MAX_MESSAGE_TENSORS + 1
    try:
        if rank == 0:
            ch.send(tuple(torch.zeros(1) for _ in range(n)))
        else:
            ch.recv([(torch.float32, (1,))] * n)
        raise AssertionError("17 tensors were accepted")
    except ValueError as e:
        print(f"rank {rank} refused: {e}", flush=True)
    assert (ch.sent, ch.received) == (0, 0)


ch = channel(rank == 0)
{"exact": exact, "bound": bound, "count": mismatch, "dtype": mismatch, "shape": mismatch,
 "too_many": too_many}[CASE](ch)
W.Barrier()
if rank == 0:
    print("PASS", flush=True)
