"""Rank program (2-3 ranks): dpsgs.comm.mpi with torch — GradientReducer leaves the replica mean in
every p.grad for odd bucket splits (issued in bucket order, a never-used parameter does not hang
it, p.grad stays a view into its bucket), and TensorChannel moves every dtype incl. bfloat16."""

import numpy as np
import torch
from mpi4py import MPI

from dpsgs import _C

from dpsgs.comm.gradient_reducer import GradientReducer
from dpsgs.comm.mpi import MpiTransport, TensorChannel, as_communicator

W = MPI.COMM_WORLD
comm = as_communicator(W, timeout=30.0)
r, n = comm.rank, comm.size
allreduce = MpiTransport(comm, comm).allreduce     # the stage group here: every rank


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(37, 61)
        self.b = torch.nn.Linear(61, 13)
        self.unused = torch.nn.Linear(5, 3)      # never gets a gradient
        self.c = torch.nn.Linear(13, 7, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.c(h.double()).sum(dim=1)


torch.manual_seed(0)
net = Net()
for cap_mb, first_mb in [(0.004, 0.001), (0.01, 0.003), (25.0, 1.0)]:
    red = GradientReducer(net.parameters(), allreduce, bucket_cap_mb=cap_mb, first_bucket_mb=first_mb)
    for step in range(3):
        red.zero_grad()
        torch.manual_seed(100 * step + r)
        x = torch.randn(9, 37)
        net(x).square().sum().backward()
        red.wait()
        mine = {k: p.grad.clone() for k, p in net.named_parameters()}
        everyone = W.allgather({k: v.numpy() for k, v in mine.items()})
        for k, v in mine.items():
            want = np.mean([e[k] for e in everyone], axis=0)
            assert np.allclose(v.numpy(), want, rtol=1e-6, atol=1e-7), (cap_mb, step, k)
        assert float(net.unused.weight.grad.abs().sum()) == 0.0
        for b in red.buckets:   # p.grad are views into the bucket, still
            for p, v in zip(b.params, b.views):
                assert p.grad.data_ptr() == v.data_ptr()
    if r == 0:
        print(f"cap {cap_mb} MB first {first_mb} MB: buckets {red.bucket_sizes} OK", flush=True)
    red.close()

# start_all() with no backward at all: all ranks issue every bucket, no hang, mean of what is there.
red = GradientReducer(net.parameters(), allreduce, bucket_cap_mb=0.004, first_bucket_mb=0.001)
red.zero_grad()
for p in net.parameters():
    p.grad.fill_(float(r))
red.start_all()
red.wait()
assert all(torch.all(p.grad == (n - 1) / 2) for p in net.parameters())

# TensorChannel between rank 0 and rank 1 for every dtype (copy and zero-copy view).
if r < 2:
    ch = TensorChannel(comm, 1 - r, 6, r == 0, "tensors")
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64,
              torch.uint8]
    for i, dt in enumerate(dtypes):
        t = (torch.arange(3 * 4000) % 251).to(dt).reshape(3, 4000) + i
        if r == 0:
            ch.send((t,)).wait()
            ch.send((t.t(),)).wait()              # non-contiguous: sent from a copy
        else:
            (a,) = ch.recv([(dt, (3, 4000))])
            (b,) = ch.recv([(dt, (4000, 3))], copy=False)
            assert a.dtype == dt and torch.equal(a, t), dt
            assert torch.equal(b, t.t()), dt
    # recv_into (the transport contract's) fills a given tensor; a wrong shape is named
    if r == 0:
        ch.send((torch.arange(12, dtype=torch.float32).reshape(3, 4),)).wait()
        ch.send((torch.zeros(5),)).wait()
    else:
        out = torch.empty(3, 4)
        assert ch.recv_into((out,))[0] is out and torch.equal(out, torch.arange(12.0).reshape(3, 4))
        try:
            ch.recv_into((torch.empty(6),))
            raise AssertionError("a wrong shape was accepted")
        except _C.HeaderMismatch as e:
            assert "tensor 0 of 1: expected dtype float32 shape (6,) but received dtype float32 shape (5,)" \
                in str(e), e
W.Barrier()
if r == 0:
    print("PASS", flush=True)
