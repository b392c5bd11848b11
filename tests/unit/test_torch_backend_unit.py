"""The "dpsgs" torch.distributed backend in one process (MPI singleton, world size 1): the MPI
store's semantics and deadlines, tensor staging, the refusals, a Work's explicit timeout, and
the mpi:// rendezvous refusing a rank/world size that is not MPI's."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import dpsgs.distributed
from dpsgs.comm.errors import CommTimeout
from dpsgs.distributed import tensors
from dpsgs.distributed.store import MpiStore


@pytest.fixture(scope="module")
def store() -> MpiStore:
    from mpi4py import MPI

    return MpiStore(MPI.COMM_SELF, timedelta(seconds=1))


def test_store_follows_torch_semantics(store: MpiStore) -> None:
    store.set("k", "v1")
    assert store.get("k") == b"v1"
    assert store.add("n", 3) == 3 and store.add("n", -5) == -2 and store.get("n") == b"-2"
    assert store.compare_set("k", "wrong", "x") == b"v1"          # mismatch: the current value
    assert store.compare_set("k", "v1", "v2") == b"v2" and store.get("k") == b"v2"
    assert store.compare_set("new", "", "first") == b"first"       # missing + empty expected: set
    assert store.compare_set("absent", "e", "d") == b"e" and not store.check(["absent"])
    assert store.check(["k", "n"]) and not store.check(["k", "nope"])
    store.append("log", b"a")
    store.append("log", b"b")
    assert store.get("log") == b"ab"
    store.multi_set(["m1", "m2"], [b"1", b"2"])
    assert store.multi_get(["m1", "m2"]) == [b"1", b"2"]
    assert store.num_keys() == 6                                    # k, n, new, log, m1, m2
    assert store.delete_key("m1") and not store.delete_key("m1")
    assert store.clone().get("k") == b"v2"                         # one store behind both faces
    prefixed = dist.PrefixStore("pre", store)                      # torch's C++ side calls it too
    prefixed.set("x", "1")
    assert prefixed.get("x") == b"1" and store.get("pre/x") == b"1"


def test_store_waits_have_deadlines_naming_the_key(store: MpiStore) -> None:
    t0 = time.monotonic()
    with pytest.raises(dist.DistStoreError, match=r"get\('never'\).*rank 0 serves the store.*within 1 s"):
        store.get("never")
    with pytest.raises(dist.DistStoreError, match=r"wait\('k', 'never2'\)"):
        store.wait(["k", "never2"], timedelta(seconds=0.3))
    assert time.monotonic() - t0 < 4
    store.wait(["k"], timedelta(seconds=0.3))   # present: returns at once


def test_reduction_ops_and_staging() -> None:
    assert tensors.reduction_of(dist.ReduceOp.AVG, "x") == ("sum", True)
    assert tensors.reduction_of(dist.ReduceOp.PRODUCT, "x") == ("product", False)
    with pytest.raises(NotImplementedError, match="reduce op .*BXOR.*not implemented"):
        tensors.reduction_of(dist.ReduceOp.BXOR, "all_reduce")
    half = torch.ones(4, dtype=torch.float16)
    s = tensors.stage_for_reduction(half, "max", "x")          # reduced in float32, written back
    assert s.buf.dtype == torch.float32 and s.copy
    s.buf.fill_(2.5)
    s.back()
    assert torch.equal(half, torch.full((4,), 2.5, dtype=torch.float16))
    strided = torch.zeros(3, 4)[:, 1]
    s = tensors.stage(strided)
    assert s.buf.is_contiguous() and s.copy
    s.buf.copy_(torch.arange(3.0))
    s.back()
    assert torch.equal(strided, torch.arange(3.0))
    c = torch.ones(3, dtype=torch.complex64)
    s = tensors.stage_for_reduction(c, "sum", "x")             # a view of its real pairs
    assert s.buf.dtype == torch.float32 and s.buf.shape == (3, 2) and not s.copy
    with pytest.raises(ValueError, match="cannot reduce torch.int16"):
        tensors.stage_for_reduction(torch.ones(2, dtype=torch.int16), "sum", "all_reduce")
    with pytest.raises(ValueError, match="max of torch.complex64 is not defined"):
        tensors.stage_for_reduction(c, "max", "all_reduce")


def test_rendezvous_refuses_a_rank_that_is_not_mpis() -> None:
    it = dpsgs.distributed.rendezvous.mpi_rendezvous_handler("mpi://?rank=0&world_size=2")
    with pytest.raises(ValueError, match="world_size=2 was given but the MPI communicator says 1"):
        next(it)


@pytest.fixture(scope="module")
def group() -> dist.ProcessGroup:
    dist.init_process_group("dpsgs", init_method="mpi://", timeout=timedelta(seconds=20))
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_size_one_group_runs_every_operation(group: dist.ProcessGroup) -> None:
    assert dist.get_backend() == "dpsgs" and isinstance(group, dpsgs.distributed.DpsgsProcessGroup)
    t = torch.arange(5.0)
    dist.all_reduce(t, op=dist.ReduceOp.AVG)
    assert torch.equal(t, torch.arange(5.0))
    out = torch.empty(5)
    dist.all_gather_into_tensor(out, torch.arange(5.0))
    assert torch.equal(out, torch.arange(5.0))
    out = torch.empty(4, dtype=torch.int16)
    dist.all_to_all_single(out, torch.arange(4, dtype=torch.int16))
    assert torch.equal(out, torch.arange(4, dtype=torch.int16))
    out = torch.empty(3)
    dist.reduce_scatter_tensor(out, torch.arange(3.0))
    assert torch.equal(out, torch.arange(3.0))
    got = torch.empty(6)   # send to oneself: MPI matches it like any other
    works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, got, 0, tag=2),
                                    dist.P2POp(dist.isend, torch.arange(6.0), 0, tag=2)])
    for w in works:
        w.wait()
    assert torch.equal(got, torch.arange(6.0))
    fut = dist.all_reduce(torch.ones(2), async_op=True).get_future()
    assert torch.equal(fut.wait()[0], torch.ones(2))
    t = torch.arange(4.0)
    dist.reduce(t, dst=0, op=dist.ReduceOp.AVG)
    assert torch.equal(t, torch.arange(4.0))
    outs = [torch.zeros(3, dtype=torch.int16)]   # gather and scatter move bytes, even alone
    dist.gather(torch.arange(3, dtype=torch.int16), outs, dst=0)
    assert torch.equal(outs[0], torch.arange(3, dtype=torch.int16))
    out = torch.zeros(3)
    dist.scatter(out, [torch.arange(3.0)], src=0)
    assert torch.equal(out, torch.arange(3.0))
    dist.barrier()


def test_refusals_are_one_clear_error(group: dist.ProcessGroup) -> None:
    with pytest.raises(NotImplementedError,
                       match="dpsgs backend: recv from any source is not implemented; supported: allreduce"):
        dist.recv(torch.ones(2))
    with pytest.raises(ValueError, match="AVG of torch.int32 is not defined"):
        dist.all_reduce(torch.ones(2, dtype=torch.int32), op=dist.ReduceOp.AVG)
    with pytest.raises(ValueError, match="send and a recv of different sizes"):
        got = torch.empty(3)
        works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, got, 0, tag=3),
                                        dist.P2POp(dist.isend, torch.ones(2), 0, tag=3)])
        for w in works:
            w.wait()


def test_an_explicit_wait_timeout_raises_commtimeout(group: dist.ProcessGroup) -> None:
    w = group.recv([torch.empty(2)], 0, 99)   # nobody sends (yet); torch's dist.* refuse self p2p
    t0 = time.monotonic()
    with pytest.raises(CommTimeout, match=r"recv from rank 0 \(tag 99, 8 bytes\).*0.5 s"):
        w.wait(timedelta(seconds=0.5))
    assert 0.45 < time.monotonic() - t0 < 3
    group.send([torch.ones(2)], 0, 99).wait()       # match it, so the group ends clean
    w.wait()
