"""GradientReducer over a fake in-process all-reduce (no MPI): buckets issued from autograd
hooks in bucket order during backward, the mean left in p.grad, two gradient sets, no_sync.

The fake plays a group of two replicas whose other member contributed `other` (a closed
form), and records every call, so the order and timing of the issues are visible."""

from __future__ import annotations

import pytest
import torch

from dpsgs.comm.gradient_reducer import GradientReducer


class FakeGroup:
    """allreduce(flat) -> Work: the mean with a peer whose bucket holds `other` everywhere;
    the result lands when the Work is waited for (as a real in-flight all-reduce would)."""

    def __init__(self, other: float = 1.0) -> None:
        self.other = other
        self.calls: list[tuple[int, int]] = []    # (flat.data_ptr(), numel) per issue
        self.events: list[str] = []

    def allreduce(self, flat: torch.Tensor) -> "FakeWork":
        self.calls.append((flat.data_ptr(), flat.numel()))
        self.events.append(f"issue {len(self.calls) - 1}")
        return FakeWork(self, flat, len(self.calls) - 1)


class FakeWork:
    def __init__(self, group: FakeGroup, flat: torch.Tensor, index: int) -> None:
        self.group, self.flat, self.index, self.done = group, flat, index, False

    def is_completed(self) -> bool:
        return self.done

    def wait(self, timeout: float | None = None) -> None:
        if not self.done:
            self.flat.add_(self.group.other).div_(2)
            self.group.events.append(f"wait {self.index}")
            self.done = True


def _net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(), torch.nn.Linear(30, 10),
                               torch.nn.Tanh(), torch.nn.Linear(10, 4))


def _grads(net: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return [g.clone() for g in torch.autograd.grad(net(x).square().sum(), list(net.parameters()))]


def test_buckets_issue_during_backward_in_order_and_leave_the_mean():
    net, group = _net(), FakeGroup(other=1.0)
    # tiny caps: one bucket per one or two parameters, reverse parameter order
    red = GradientReducer(net.parameters(), group.allreduce, bucket_cap_mb=0.0005, first_bucket_mb=0.0002)
    assert len(red.buckets) >= 3
    x = torch.randn(8, 20)
    want = [(g + 1.0) / 2 for g in _grads(net, x)]
    red.zero_grad()

    issued_during_backward = []
    last = list(net.parameters())[0]         # the first layer's weight: produced last
    last.register_post_accumulate_grad_hook(lambda p: issued_during_backward.append(len(group.calls)))
    net(x).square().sum().backward()
    # every bucket but the last was issued by the hooks before backward finished
    assert issued_during_backward and issued_during_backward[0] >= len(red.buckets) - 1
    red.wait()
    # issued in bucket order (bucket b's flat), each exactly once, then waited in order
    assert group.calls == [(b.flat.data_ptr(), b.flat.numel()) for b in red.buckets]
    assert group.events == [f"issue {i}" for i in range(len(red.buckets))] + \
                           [f"wait {i}" for i in range(len(red.buckets))]
    for p, w in zip(net.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=0, atol=1e-6)
    for b in red.buckets:                    # p.grad are views into the buckets
        for p, v in zip(b.params, b.views):
            assert p.grad.data_ptr() == v.data_ptr()


def test_missing_gradient_never_hangs_and_start_all_issues_the_rest():
    net, group = _net(), FakeGroup(other=4.0)
    red = GradientReducer(net.parameters(), group.allreduce, bucket_cap_mb=0.0005, first_bucket_mb=0.0002)
    red.zero_grad()
    red.start_all()                          # no backward at all: zeros averaged with the peer's
    red.wait()
    assert len(group.calls) == len(red.buckets)
    assert all(torch.all(p.grad == 2.0) for p in net.parameters())


def test_two_sets_overlap_a_step_and_wait_returns_the_older():
    net, group = _net(), FakeGroup(other=0.0)
    red = GradientReducer(net.parameters(), group.allreduce, buffers=2)
    x0, x1 = torch.randn(8, 20), torch.randn(8, 20)
    g0, g1 = _grads(net, x0), _grads(net, x1)
    red.zero_grad()
    net(x0).square().sum().backward()
    red.start_all()
    set_a = red.buckets
    red.zero_grad()                          # set A stays in flight; backward goes to set B
    assert red.buckets is not set_a
    net(x1).square().sum().backward()
    red.start_all()
    red.wait()                               # the older set: step 0's mean
    for p, g in zip(net.parameters(), g0):
        torch.testing.assert_close(p.grad, g / 2, rtol=0, atol=1e-6)
    red.wait()                               # then step 1's
    for p, g in zip(net.parameters(), g1):
        torch.testing.assert_close(p.grad, g / 2, rtol=0, atol=1e-6)


def test_no_sync_accumulates_and_issues_once():
    net, group = _net(), FakeGroup(other=0.0)
    red = GradientReducer(net.parameters(), group.allreduce)
    x0, x1 = torch.randn(4, 20), torch.randn(4, 20)
    want = [(a + b) / 2 for a, b in zip(_grads(net, x0), _grads(net, x1))]
    red.zero_grad()
    with red.no_sync():
        net(x0).square().sum().backward()
    assert group.calls == []                 # held: micro-batches before the last
    net(x1).square().sum().backward()
    red.wait()
    assert len(group.calls) == len(red.buckets)
    for p, w in zip(net.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=0, atol=1e-6)


def test_second_backward_while_in_flight_is_an_error():
    net, group = _net(), FakeGroup()
    red = GradientReducer(net.parameters(), group.allreduce)
    red.zero_grad()
    x = torch.randn(4, 20)
    net(x).square().sum().backward()
    with pytest.raises(RuntimeError, match="while its all-reduce is in flight"):
        net(x).square().sum().backward()


def test_bad_arguments_are_named():
    net = _net()
    with pytest.raises(ValueError, match="buffers must be 1 or 2, got 3"):
        GradientReducer(net.parameters(), FakeGroup().allreduce, buffers=3)
    with pytest.raises(ValueError, match="not supported"):
        GradientReducer([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))], FakeGroup().allreduce)
