"""Torch-aware face of dpsgs._C: zero-copy views, tensor channels, the bucketed gradient reducer."""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from dpsgs import _C
from .channel_end import ChannelEnd

__all__ = [
    "CommError", "CommTimeout", "Communicator", "DTYPE_CODES", "GradientReducer",
    "MPILibraryMismatch", "TensorChannel", "Work", "as_buffer", "as_communicator", "assign_buckets",
    "check_mpi_match", "dtype_code",
]

Communicator = _C.Communicator
Work = _C.Work
CommError = _C.CommError
CommTimeout = _C.CommTimeout

# Stable codes carried in channel headers (docs/api.md).
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3, torch.int32: 4,
    torch.int64: 5, torch.uint8: 6, torch.int8: 7, torch.bool: 8,
}


class MPILibraryMismatch(ImportError, RuntimeError):
    """dpsgs._C and mpi4py use different MPI libraries."""


def check_mpi_match(ours: str, theirs: str) -> None:
    """Raise MPILibraryMismatch naming both libraries unless the version strings agree."""
    if ours.strip() != theirs.strip():
        raise MPILibraryMismatch(
            "dpsgs._C and mpi4py use different MPI libraries; rebuild dpsgs in this environment.\n"
            f"--- dpsgs._C links:\n{ours.strip()}\n--- mpi4py uses:\n{theirs.strip()}")


def dtype_code(dtype: torch.dtype) -> int:
    """The wire code of a torch dtype; ValueError for unsupported ones."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not supported by dpsgs channels/reducers; supported: "
                         f"{', '.join(str(d) for d in DTYPE_CODES)}") from None


def _code_override(t: torch.Tensor | np.ndarray) -> int | None:
    """bfloat16 travels as uint16 plus this explicit code; everything else as its own dtype."""
    return 1 if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 else None


def as_buffer(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """Zero-copy NumPy view of a CPU tensor (bfloat16 as uint16: pass dtype_code=1 alongside).
    The view keeps the tensor alive. Non-contiguous tensors give strided views."""
    if isinstance(t, np.ndarray):
        return t
    if not isinstance(t, torch.Tensor):
        raise ValueError("as_buffer: expected a torch.Tensor or numpy.ndarray, "
                         f"got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"as_buffer: tensor on {t.device}; the MPI backend takes CPU tensors "
                         "(CUDA tensors go through the NCCL backend)")
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    dtype_code(t.dtype)
    return t.numpy()


def _to_tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def as_communicator(comm: Any, timeout: float = 300.0, warn_after: float = 60.0) -> _C.Communicator:
    """A dpsgs._C.Communicator as is, or a new one over an mpi4py communicator (collective)."""
    if isinstance(comm, _C.Communicator):
        return comm
    return _C.Communicator(comm, timeout=timeout, warn_after=warn_after)


class TensorChannel(ChannelEnd):
    """Directed channel of torch CPU tensors between two ranks (one end per rank).

    send(tensor) is zero-copy (non-contiguous tensors are sent from a contiguous copy); the
    tensor must not be modified until the returned Work completes (at most 2 are in flight; a
    third send waits for the oldest). recv(dtype, shape) returns a **copy** by default, so
    autograd may keep it; recv(..., copy=False) returns a zero-copy view of the receive slot
    that is valid only until the next recv() on this channel.
    """

    def __init__(self, comm: Any, peer: int, tag: int, is_sender: bool, name: str = "",
                 capacity: int | None = None) -> None:
        self.comm = as_communicator(comm)
        kwargs = {} if capacity is None else {"capacity": capacity}
        self._ch = _C.Channel(self.comm, peer, tag, is_sender, name, **kwargs)

    def send(self, tensor: torch.Tensor) -> _C.Work:
        return self._ch.send(as_buffer(tensor), dtype_code=_code_override(tensor))

    def recv(self, dtype: torch.dtype, shape: Sequence[int], copy: bool = True) -> torch.Tensor:
        a = self._ch.recv(dtype_code(dtype), tuple(int(s) for s in shape))
        t = _to_tensor(a, dtype)
        return t.clone() if copy else t


def assign_buckets(sizes: Sequence[int], cap_bytes: int, first_cap_bytes: int,
                   keys: Sequence[Hashable] | None = None) -> list[list[int]]:
    """DDP-style bucket assignment. `sizes[i]` is parameter i's gradient size in bytes (in
    model order); `keys[i]` groups parameters that may share a bucket (their dtype). Walks the
    parameters in reverse order (the order backward produces gradients), filling one open
    bucket per key up to the cap — the first bucket of each key up to `first_cap_bytes` —
    and closing it when the next parameter would overflow it (a parameter larger than the cap
    gets a bucket of its own). Returns buckets as lists of parameter indices, in issue order:
    ordered by the walk position of their first parameter."""
    if cap_bytes <= 0 or first_cap_bytes <= 0:
        raise ValueError(f"bucket caps must be > 0 (cap {cap_bytes}, first {first_cap_bytes})")
    keys = list(keys) if keys is not None else [None] * len(sizes)
    if len(keys) != len(sizes):
        raise ValueError(f"{len(sizes)} sizes but {len(keys)} keys")
    open_: dict[Hashable, tuple[int, list[int], int]] = {}  # key -> (start, indices, bytes)
    count: dict[Hashable, int] = {}
    done: list[tuple[int, list[int]]] = []
    for pos, i in enumerate(reversed(range(len(sizes)))):
        k, size = keys[i], int(sizes[i])
        if size < 0:
            raise ValueError(f"parameter {i}: negative size {size}")
        cap = first_cap_bytes if count.get(k, 0) == 0 else cap_bytes
        if k in open_ and open_[k][2] + size > cap:
            start, idx, _ = open_.pop(k)
            done.append((start, idx))
            count[k] = count.get(k, 0) + 1
        start, idx, total = open_.get(k, (pos, [], 0))
        idx.append(i)
        open_[k] = (start, idx, total + size)
    done.extend((start, idx) for start, idx, _ in open_.values())
    return [idx for _, idx in sorted(done)]


class _Bucket:
    def __init__(self, index: int, params: list[torch.nn.Parameter]) -> None:
        self.index = index
        self.params = params
        dtype = params[0].dtype
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=dtype)
        self.views: list[torch.Tensor] = []
        off = 0
        for p in params:
            self.views.append(self.flat[off:off + p.numel()].view_as(p))
            off += p.numel()
        self.ready: set[int] = set()
        self.work: _C.Work | None = None


class GradientReducer:
    """Averages gradients over the ranks of `comm`, bucket by bucket, overlapping backward.

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
    calls.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], comm: Any, bucket_cap_mb: float = 25.0,
                 first_bucket_mb: float = 1.0, algorithm: str = "auto", buffers: int = 1) -> None:
        if buffers not in (1, 2):
            raise ValueError(f"GradientReducer: buffers must be 1 or 2, got {buffers}")
        seen: set[int] = set()  # a parameter listed twice (tied weights) is reduced once
        self.params = [p for p in params
                       if p.requires_grad and not (id(p) in seen or seen.add(id(p)))]
        if any(p.device.type != "cpu" for p in self.params):
            raise ValueError("GradientReducer (MPI backend) needs CPU parameters")
        for p in self.params:
            dtype_code(p.dtype)
        self.comm = as_communicator(comm)
        self._reducer = _C.Reducer(self.comm, algorithm)
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
        b.work = self._reducer.allreduce(as_buffer(b.flat), True, _code_override(b.flat))
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
                    b.work.wait()
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
