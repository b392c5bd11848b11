"""The transport seam: every backend implements dpsgs.comm.protocol, and the in-process
loopback (the reference's transport) behaves like the real ones — ordered, checked channels,
the replicas' mean, deadlines, and no thread left waiting after a failure."""

from __future__ import annotations

import threading

import pytest
import torch
from mpi4py import MPI

from dpsgs import _C
from dpsgs.comm.errors import CommTimeout, HeaderMismatch
from dpsgs.comm.loopback import LoopbackGroup, PeerFailed
from dpsgs.comm.mpi import MpiTransport
from dpsgs.comm.mpi4py_baseline import Mpi4pyTransport
from dpsgs.comm.protocol import MAX_MESSAGE_TENSORS, Channel, Reducer, Transport, Work


def _conforms(t: Transport) -> None:
    assert isinstance(t, Transport)
    assert isinstance(t.device, torch.device)
    params = [torch.nn.Parameter(torch.ones(3))]
    red = t.reducer(params, buffers=2)
    assert isinstance(red, Reducer) and red.buffers == 2
    red.close()
    flat = torch.full((5,), 3.0)
    work = t.allreduce(flat)
    assert isinstance(work, Work)
    work.wait()
    assert torch.equal(flat, torch.full((5,), 3.0))        # the mean over a group of one


def test_core_and_protocol_agree_on_the_message_length() -> None:
    assert _C.MAX_MESSAGE_TENSORS == MAX_MESSAGE_TENSORS == 16


def test_mpi_core_transport_conforms() -> None:
    core = _C.Communicator(MPI.COMM_SELF, timeout=10.0)
    _conforms(MpiTransport(core, core))


def test_mpi4py_baseline_conforms() -> None:
    _conforms(Mpi4pyTransport(MPI.COMM_SELF, MPI.COMM_SELF, timeout=10.0))


def test_loopback_conforms() -> None:
    _conforms(LoopbackGroup(1, 1, timeout=5.0).transport(0))


def _run(fns: list) -> list:
    """Run one function per virtual rank in threads; their results (or exceptions)."""
    out: list = [None] * len(fns)

    def call(i: int) -> None:
        try:
            out[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001
            out[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    return out


def test_loopback_channels_are_ordered_and_checked() -> None:
    group = LoopbackGroup(2, 1, timeout=5.0)
    a, b = group.transport(0), group.transport(1)
    tx = a.channel(1, 11, True, "act s0->s1")
    rx = b.channel(0, 11, False, "act s0->s1")
    assert isinstance(tx, Channel) and isinstance(rx, Channel)
    sent = [torch.arange(6, dtype=torch.float64).reshape(2, 3) + i for i in range(3)]
    for t in sent:
        tx.send((t,))
    sent[0].zero_()                          # the sender may reuse its tensor: the queue has a copy
    got = [rx.recv([(torch.float64, (2, 3))])[0] for _ in range(2)]
    assert torch.equal(got[0], torch.arange(6.0).reshape(2, 3)) and torch.equal(got[1], sent[1])
    with pytest.raises(HeaderMismatch, match=r"tensor 0 of 1: expected dtype float32 shape \(2, 3\) "
                                             r"but received dtype float64 shape \(2, 3\)"):
        rx.recv([(torch.float32, (2, 3))])
    assert (tx.sent, rx.received) == (3, 3)


def test_loopback_allreduce_is_the_replica_mean_in_replica_order() -> None:
    group = LoopbackGroup(1, 3, timeout=5.0)
    flats = [torch.tensor([1.0, 2.0]) * (r + 1) for r in range(3)]

    def rank(r: int):
        def fn():
            group.transport(r).allreduce(flats[r]).wait()
            return flats[r]
        return fn

    results = _run([rank(r) for r in range(3)])
    for res in results:
        assert torch.equal(res, torch.tensor([2.0, 4.0]))


def test_loopback_wait_has_a_deadline_and_failures_wake_every_waiter() -> None:
    group = LoopbackGroup(2, 1, timeout=0.3)
    rx = group.transport(1).channel(0, 12, False, "grad s1->s0")
    with pytest.raises(CommTimeout, match=r"rank 1: channel 'grad s1->s0' recv #0 from rank 0: "
                                          r"no progress after 0.3 s"):
        rx.recv([(torch.float32, (1,))])
    group = LoopbackGroup(2, 1, timeout=30.0)
    rx = group.transport(1).channel(0, 12, False, "grad s1->s0")

    def waiter():
        return rx.recv([(torch.float32, (1,))])

    def failer():
        group.fail(RuntimeError("boom on rank 0"))

    results = _run([waiter, failer])
    assert isinstance(results[0], PeerFailed) and "boom on rank 0" in str(results[0])
