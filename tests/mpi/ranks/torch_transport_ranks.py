"""Rank program (2 ranks): dpsgs.comm.torch_dist.TorchTransport over one torch.distributed
backend, every case in one launch.

Arguments: BACKEND [pairs]. BACKEND: gloo or dpsgs, initialised over mpi:// (no environment
variables); `pairs`: the channels use two-rank groups per direction (as on NCCL). Cases:
- conforms: the protocols of dpsgs.comm.protocol; a 1x2 grid's all-reduce is the mean
  (float64, exactly) and a 2x1 grid's (one replica) leaves the tensor as it is.
- exact: 64 ordered messages of 1..16 tensors, every wire dtype, zero-element and
  non-contiguous tensors, by recv and recv_into: byte-exact; at most two in flight.
- count / dtype / shape: HeaderMismatch naming the channel, both ranks, the tensor index
  and both sides; the next message arrives intact.
- too_many: 17 tensors are refused on either end.
- deadline: a recv nobody sends to raises CommTimeout naming the rank, the channel and the
  peer within its timeout.
- existing: the job (dpsgs.job.rank_context) uses the script's initialised group, refuses
  another --torch-backend in one line, and leaves the group to the script when it closes.
"""

import sys
import time

import torch
import torch.distributed as dist
from messages import message, same
from mpi4py import MPI

import dpsgs.distributed  # noqa: F401  (registers "dpsgs" and mpi://)
from dpsgs.comm.errors import CommTimeout, HeaderMismatch
from dpsgs.comm.grid import Grid
from dpsgs.comm.message import spec_of
from dpsgs.comm.protocol import MAX_MESSAGE_TENSORS, Channel, Reducer, Transport, Work
from dpsgs.comm.torch_dist import TorchTransport

BACKEND = sys.argv[1]
PAIRS = len(sys.argv) > 2 and sys.argv[2] == "pairs"
W = MPI.COMM_WORLD
rank = W.Get_rank()
assert W.Get_size() == 2
torch.set_num_threads(1)
dist.init_process_group(BACKEND, init_method="mpi://")


SENT: list[Work] = []     # the sender's Works, waited before the groups go


def send(ch: Channel, msg: tuple) -> None:
    SENT.append(ch.send(msg))


def say(text: str) -> None:
    print(f"rank {rank}: {text}", flush=True)


def conforms() -> None:
    t = TorchTransport(Grid(1, 2), timeout=30.0)
    assert isinstance(t, Transport) and t.device == torch.device("cpu")
    red = t.reducer([torch.nn.Parameter(torch.ones(3))], buffers=2)
    assert isinstance(red, Reducer) and red.buffers == 2
    red.close()
    flat = torch.tensor([1.0, 0.1, -3.0], dtype=torch.float64) * (rank + 1)
    work = t.allreduce(flat)
    assert isinstance(work, Work)
    work.wait()
    want = torch.tensor([1.0, 0.1, -3.0], dtype=torch.float64) * 3 / 2
    assert torch.equal(flat, want), (flat, want)
    t.close()
    one = TorchTransport(Grid(2, 1), timeout=30.0)
    flat = torch.full((4,), 3.0 + rank)
    one.allreduce(flat).wait()
    assert torch.equal(flat, torch.full((4,), 3.0 + rank))
    one.close()
    say("conforms; all-reduce is the mean")


def strided(t: torch.Tensor) -> torch.Tensor:
    v = t.transpose(0, 2).contiguous().transpose(0, 2)
    assert not v.is_contiguous()
    return v


def exact(ch: Channel, n: int = 64) -> None:
    if rank == 0:
        most = 0
        for i in range(n):
            ts, st = message(i)
            send(ch, tuple(strided(t) if s else t for t, s in zip(ts, st)))
            most = max(most, ch.in_flight)
            assert ch.in_flight <= 2, ch.in_flight
        say(f"sent {ch.sent} messages, at most {most} in flight")
        return
    for i in range(n):
        want, _ = message(i)
        if i % 2:
            out = tuple(torch.full_like(t, 1) for t in want)
            got = ch.recv_into(out)
            assert all(g is o for g, o in zip(got, out))
        else:
            got = ch.recv([spec_of(t) for t in want])
        assert isinstance(got, tuple) and len(got) == len(want), (i, len(got))
        for j, (g, w) in enumerate(zip(got, want)):
            assert same(g, w), f"message {i} tensor {j}: {g.dtype} {tuple(g.shape)} vs {w.dtype}"
    say(f"received {ch.received} messages byte-exact")


def mismatch(ch: Channel, case: str) -> None:
    good = (torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.zeros(0, dtype=torch.int64),
            torch.full((20000,), 7.0, dtype=torch.float64))
    after = (torch.tensor([True, False]),)
    if rank == 0:
        send(ch, good)
        send(ch, after)
        return
    expect = [spec_of(t) for t in good]
    if case == "count":
        expect = expect[:2]
    elif case == "dtype":
        expect[1] = (torch.int32, (0,))
    else:
        expect[2] = (torch.float64, (20001,))
    try:
        ch.recv(expect)
        raise AssertionError("the mismatch was accepted")
    except HeaderMismatch as e:
        say(f"{case} got HeaderMismatch: {e}")
    (x,) = ch.recv([spec_of(after[0])])
    assert torch.equal(x, after[0])


def too_many(ch: Channel) -> None:
    n = MAX_MESSAGE_TENSORS + 1
    try:
        if rank == 0:
            ch.send(tuple(torch.zeros(1) for _ in range(n)))
        else:
            ch.recv([(torch.float32, (1,))] * n)
        raise AssertionError("17 tensors were accepted")
    except ValueError as e:
        say(f"refused: {e}")


def deadline() -> None:
    t = TorchTransport(Grid(2, 1), timeout=1.5, pair_groups=PAIRS)
    if rank == 1:
        ch = t.channel(0, 31, False, "grad r0 s1->s0")
        start = time.monotonic()
        try:
            ch.recv([(torch.float32, (4,))])
            raise AssertionError("a recv nobody sent to completed")
        except CommTimeout as e:
            say(f"after {time.monotonic() - start:.1f} s: CommTimeout: {e}")
    W.Barrier()


def existing() -> None:
    from dpsgs.config import TrainConfig
    from dpsgs.job.rank_context import open_rank

    other = "dpsgs" if BACKEND == "gloo" else "gloo"
    try:
        open_rank(TrainConfig(stages=2, replicas=1, transport="torch", torch_backend=other,
                              timeout=30.0), W)
        raise AssertionError("another backend than the initialised one was accepted")
    except ValueError as e:
        say(f"refused: {e}")
    ctx = open_rank(TrainConfig(stages=2, replicas=1, transport="torch", timeout=30.0), W)
    assert isinstance(ctx.transport, TorchTransport) and ctx.transport.backend == BACKEND
    ctx.close()
    assert dist.is_initialized() and str(dist.get_backend()) == BACKEND
    say("the job used the script's group and left it")


def main() -> None:
    conforms()
    t = TorchTransport(Grid(2, 1), timeout=60.0, pair_groups=PAIRS)
    ch = t.channel(1 - rank, 21, rank == 0, "act s0->s1")
    exact(ch)
    for case in ("count", "dtype", "shape"):
        mismatch(ch, case)
    too_many(ch)
    for w in SENT:
        w.wait()
    W.Barrier()
    t.close()
    existing()
    deadline()
    W.Barrier()
    if rank == 0:
        print("PASS", flush=True)


main()
