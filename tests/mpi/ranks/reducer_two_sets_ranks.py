"""Rank program (2 ranks): GradientReducer(buffers=2) overlaps a step's all-reduce with the next
backward. Rank 1 holds back its step-0 reduce until rank 0 has run its step-1 backward, so on
rank 0 every step-0 all-reduce is provably pending while step 1's gradients are written (into a
second, disjoint set of buckets); after wait() the step-0 set still holds exactly the mean of the
step-0 gradients, and each later wait() yields its own step's mean, in order."""

import torch
from mpi4py import MPI

from dpsgs.comm.gradient_reducer import GradientReducer
from dpsgs.comm.mpi import MpiTransport, as_communicator

W = MPI.COMM_WORLD
comm = as_communicator(W, timeout=30.0)
allreduce = MpiTransport(comm, comm).allreduce
r = comm.rank
assert comm.size == 2, "run on 2 ranks"

torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(37, 61), torch.nn.ReLU(), torch.nn.Linear(61, 13))
params = list(net.parameters())


def loss_of(step: int, rank: int) -> torch.Tensor:
    torch.manual_seed(100 * step + rank)
    return net(torch.randn(9, 37)).square().sum()


def mean(step: int) -> list[torch.Tensor]:
    """What the all-reduce must give: (g0 + g1) / 2, from torch.autograd.grad (no hooks)."""
    g0, g1 = (torch.autograd.grad(loss_of(step, q), params) for q in (0, 1))
    return [(a + b) / 2 for a, b in zip(g0, g1)]


def ptrs(buckets: list) -> set[int]:
    return {b.flat.data_ptr() for b in buckets}


def grads_are(buckets: list) -> bool:
    return all(p.grad.data_ptr() == v.data_ptr()
               for b in buckets for p, v in zip(b.params, b.views))


want = [mean(t) for t in range(3)]      # weights never change here, so means are known up front
try:
    GradientReducer(params, allreduce, buffers=3)
    raise AssertionError("buffers=3 accepted")
except ValueError:
    pass
red = GradientReducer(params, allreduce, bucket_cap_mb=0.004, first_bucket_mb=0.001, buffers=2)
assert len(red.buckets) > 2, red.bucket_sizes

if r == 1:
    W.recv(source=0, tag=7)             # rank 0's step-1 backward has run: now issue step 0
red.zero_grad()
loss_of(0, r).backward()                # hooks issue set A's buckets as they fill
red.start_all()
set_a = red.buckets
red.zero_grad()                         # set A stays in flight; backward moves to set B
set_b = red.buckets
assert set_a is not set_b and not ptrs(set_a) & ptrs(set_b)
assert grads_are(set_b)
loss_of(1, r).backward()                # writes set B while set A's all-reduce is pending
if r == 0:
    assert all(b.work is not None and not b.work.is_completed() for b in set_a), \
        "step-0 all-reduce completed before rank 1 issued it?"
    W.send("go", dest=1, tag=7)
red.start_all()
red.wait()                              # the older set: step 0
assert grads_are(set_a)
assert all(torch.equal(p.grad, w) for p, w in zip(params, want[0])), "step 0 mean"
assert all(b.work is not None for b in set_b)      # step 1 still in flight

red.zero_grad()                         # back to set A, zeroed; set B stays in flight
assert red.buckets is set_a and all(float(b.flat.abs().sum()) == 0.0 for b in set_a)
loss_of(2, r).backward()
red.start_all()
try:
    red.zero_grad()                     # both sets in flight: nowhere to put a backward
    raise AssertionError("zero_grad with both sets in flight accepted")
except RuntimeError:
    pass
red.wait()
assert grads_are(set_b) and all(torch.equal(p.grad, w) for p, w in zip(params, want[1])), "step 1"
red.wait()
assert grads_are(set_a) and all(torch.equal(p.grad, w) for p, w in zip(params, want[2])), "step 2"
assert all(b.work is None for s in red.sets for b in s)
red.close()
W.Barrier()
if r == 0:
    print(f"two gradient sets, {len(set_a)} buckets each: PASS", flush=True)
