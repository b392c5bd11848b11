"""GradientReducer: DDP-style bucketed, overlapped gradient averaging over any transport."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch

from dpsgs.comm.buckets import assign_buckets
from dpsgs.comm.dtypes import code_of
from dpsgs.comm.protocol import Work

__all__ = ["GradientReducer"]


class _Bucket:
    def __init__(self, index: int, params: list[torch.nn.Parameter]) -> None:
        self.index = index
        self.params = params
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype,
                                device=params[0].device)
        self.views: list[torch.Tensor] = []
        off = 0
        for p in params:
            self.views.append(self.flat[off:off + p.numel()].view_as(p))
            off += p.numel()
        self.ready: set[int] = set()
        self.work: Work | None = None


class GradientReducer:
    """Averages gradients over a stage group, bucket by bucket, overlapping backward.

    Written once for every transport: `allreduce(flat) -> Work` starts an in-place mean of
    one flat bucket over the group (dpsgs.comm.protocol), so the MPI core, NCCL, mpi4py and
    the in-process loopback all get buckets, hooks and two gradient sets from this class.

    Buckets follow DDP: reverse parameter order, `first_bucket_mb` for the first bucket (of each
    dtype), `bucket_cap_mb` after. Each bucket is one flat tensor and every `p.grad` is a view
    into it (set once; autograd accumulates in place), so no pack/unpack. A post-accumulate-grad
    hook marks a parameter ready; when every parameter of the next bucket in order is ready,
    that bucket's averaging all-reduce is queued — strictly in bucket order on every rank (a
    later bucket that is ready early waits for the earlier ones).

    Per step: backward(); [start_all()]; wait(); optimizer.step(); zero_grad().
    - start_all() marks every remaining bucket ready (gradients produced outside hooks).
    - wait() first calls start_all(), so a parameter that received no gradient this step never
      hangs the reducer: its slot contributes whatever it holds — zeros after zero_grad().
    - Use this zero_grad() (or optimizer.zero_grad(set_to_none=False)): setting p.grad to None
      breaks the views (it is repaired, at the cost of a copy, when the hook sees it).
    - Inside no_sync() hooks only accumulate (gradient accumulation across micro-batches).

    buffers=2 keeps two sets of buckets, so the all-reduce of one step's gradients can run
    while the next backward writes the other set (update one step later; twice the gradient
    memory). Per step: zero_grad(); backward(); start_all(); wait(); optimizer.step().
    - zero_grad() after a set was issued moves backward to the other set (finishing the issue
      of the one it leaves, so every rank issues set after set, bucket by bucket, in order).
    - wait() waits for the older set if one is in flight besides the current one, else for
      the current set (as with buffers=1), and points every p.grad at the set it waited for.
    Every rank must hold the same parameters (same shapes, dtypes, order) and make the same
    calls. `consume(work)` is how wait() takes a bucket's result: work.wait() by default; a
    device transport passes its accelerator's (the stream waits, not the host).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], allreduce: Callable[[torch.Tensor], Work],
                 bucket_cap_mb: float = 25.0, first_bucket_mb: float = 1.0, buffers: int = 1,
                 consume: Callable[[Work], None] | None = None) -> None:
        if buffers not in (1, 2):
            raise ValueError(f"GradientReducer: buffers must be 1 or 2, got {buffers}")
        seen: set[int] = set()  # a parameter listed twice (tied weights) is reduced once
        self.params = [p for p in params
                       if p.requires_grad and not (id(p) in seen or seen.add(id(p)))]
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"GradientReducer: parameters on several devices {sorted(map(str, devices))}")
        for p in self.params:
            code_of(p.dtype)
        self._allreduce = allreduce
        # how wait() takes a finished bucket: the host waits (default), or a device's stream
        # does (Accelerator.consume: on CUDA the optimizer's kernels wait, not the host)
        self._consume = consume if consume is not None else _host_wait
        mb = 1024 * 1024
        plan = assign_buckets([p.numel() * p.element_size() for p in self.params],
                              int(bucket_cap_mb * mb), int(first_bucket_mb * mb),
                              [p.dtype for p in self.params])
        self.buffers = buffers
        self.sets = [[_Bucket(b, [self.params[i] for i in idx]) for b, idx in enumerate(plan)]
                     for _ in range(buffers)]
        self._where: dict[int, tuple[int, int]] = {}  # id(param) -> (bucket, slot)
        for b in self.sets[0]:
            for s, p in enumerate(b.params):
                self._where[id(p)] = (b.index, s)
                if p.grad is not None:
                    b.views[s].copy_(p.grad)
                p.grad = b.views[s]
        self._cur = 0                            # the set backward accumulates into
        self._next = [0] * buffers               # per set: next bucket to issue
        self._sync = True
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    @property
    def buckets(self) -> list[_Bucket]:
        """The buckets backward accumulates into now."""
        return self.sets[self._cur]

    # -- hooks and issue order -------------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        b, s = self._where[id(p)]
        bucket = self.buckets[b]
        view = bucket.views[s]
        if p.grad is None or p.grad.data_ptr() != view.data_ptr():
            if bucket.work is not None:
                raise RuntimeError(f"GradientReducer: a gradient for bucket {b} arrived after the "
                                   "bucket was issued; call wait() (buffers=1) or zero_grad() "
                                   "(buffers=2) before the next backward (or use no_sync())")
            view.copy_(p.grad if p.grad is not None else torch.zeros_like(view))
            p.grad = view
        if not self._sync:
            return
        if bucket.work is not None:
            raise RuntimeError(f"GradientReducer: a second gradient for bucket {b} arrived while "
                               "its all-reduce is in flight; call wait() between backward passes "
                               "or use no_sync()")
        bucket.ready.add(s)
        self._issue_ready()

    def _issue_ready(self) -> None:
        c = self._cur
        while self._next[c] < len(self.sets[c]):
            b = self.sets[c][self._next[c]]
            if len(b.ready) < len(b.params):
                return
            self._issue(c, b)

    def _issue(self, c: int, b: _Bucket) -> None:
        b.work = self._allreduce(b.flat)
        self._next[c] += 1

    def _point_grads(self, c: int) -> None:
        for b in self.sets[c]:
            for p, v in zip(b.params, b.views):
                if p.grad is None or p.grad.data_ptr() != v.data_ptr():
                    p.grad = v

    # -- public ----------------------------------------------------------------------------
    def start_all(self) -> None:
        """Issue every bucket of the current set not yet issued this step, in order (missing
        gradients count as whatever their slots hold)."""
        c = self._cur
        while self._next[c] < len(self.sets[c]):
            self._issue(c, self.sets[c][self._next[c]])

    def wait(self) -> None:
        """Wait for one set (see the class docstring; with buffers=1 the only one: issue what
        is left, then wait); p.grad then holds the mean."""
        c = 1 - self._cur if self.buffers == 2 and self._next[1 - self._cur] else self._cur
        if c == self._cur:
            self.start_all()
        try:
            for b in self.sets[c]:
                if b.work is not None:
                    self._consume(b.work)
        finally:
            for b in self.sets[c]:
                b.work = None
                b.ready.clear()
            self._next[c] = 0
        if self.buffers == 2:
            self._point_grads(c)   # optimizer.step() applies the set just waited for

    def zero_grad(self) -> None:
        """Zero the set the next backward accumulates into and point every p.grad at it. With
        buffers=2, a set already issued is left in flight and the other set is taken."""
        if self._next[self._cur]:
            if self.buffers == 1 or self._next[1 - self._cur]:
                raise RuntimeError("GradientReducer.zero_grad() while all-reduces are in flight "
                                   "in every gradient set; call wait() first")
            self.start_all()
            self._cur = 1 - self._cur
        for b in self.buckets:
            b.flat.zero_()
        self._point_grads(self._cur)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate into the buckets (no all-reduce)."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def close(self) -> None:
        """Remove the hooks (the p.grad views stay)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def bucket_sizes(self) -> list[int]:
        return [b.flat.numel() * b.flat.element_size() for b in self.buckets]


def _host_wait(work: Work) -> None:
    work.wait()
