"""StageCompute: one stage's forward/stash/backward math, shared by the worker and the reference.

No communication here: the caller moves activations and gradients and decides when to
update. A stage takes the tensors crossing its incoming cut and returns those crossing its
outgoing cut (dpsgs.pipeline.split): forward and backward carry tuples. The backward takes a
gradient for every floating output and returns one for every floating input (zeros where
none reached it: an input that only passes through to a non-differentiable use). Each
in-flight batch is stashed under a key (its batch id) between its forward and its delayed
backward:

- stash='weights': the forward runs on a snapshot of the parameters taken at forward time
  (an autograd function whose forward is a copy and whose backward routes the gradient to
  the live parameter), and the graph is kept. The delayed backward therefore sees the
  weights the forward used, while the gradient still lands in `p.grad` (so gradient hooks
  and bucketed all-reduce work as in DDP). Memory: the graph's saved tensors plus one
  weight copy per batch in flight (grows with the staleness).
- stash='recompute': only the input (and, if the stage has dropout, the RNG state) is kept;
  the backward redoes the forward with the current weights. One extra forward, little memory.
- live=True (the last stage, and the sync schedule, whose backward comes before any
  update): the graph is built on the live parameters directly; nothing is copied.

Stash accounting (`stash_bytes`, `peak_stash_bytes`) counts the storage the stash keeps
alive: tensors autograd saved for the backward (deduplicated by storage, live parameters
excluded), the held output, or the stashed input. Autograd saves only what the backward
needs: on stage 0 (input without gradient) a Linear keeps its input but no weight copy.

BatchNorm running statistics are updated once, at forward time; a recompute forward runs
on copies of the buffers so it never updates them twice.
amp (e.g. torch.bfloat16): every forward, the recompute included, runs under autocast on the
module's device; the backward runs outside it, as PyTorch prescribes; the loss is computed
in float32 from the logits.
Shrink: every incoming output-gradient is multiplied by beta at every stage boundary, so
stage k's gradient is scaled by beta**(K-1-k) (FDG's gradient shrinking).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dpsgs.comm.accelerator import Accelerator, accelerator_of_device
from dpsgs.pipeline.split import is_random

__all__ = ["StageCompute", "STASH_MODES"]

# torch's default generator is per process; see StageCompute._rng_guard
_RNG_LOCK = threading.RLock()

STASH_MODES = ("weights", "recompute")


class _Snapshot(torch.autograd.Function):
    """y = copy of p now; dL/dp = dL/dy. Saves nothing, so later in-place updates of p
    do not invalidate the graph."""

    @staticmethod
    def forward(ctx: Any, p: torch.Tensor) -> torch.Tensor:
        return p.detach().clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g


@dataclass
class _Stash:
    xs: tuple[torch.Tensor, ...]         # stage inputs (floating ones require grad on stages > 0)
    out: tuple[torch.Tensor, ...] | None = None   # graph roots (weights/live); None: recompute
    rng: torch.Tensor | None = None      # CPU RNG state at forward time (recompute)
    device_rng: Any = None               # and the device generator's, where it has one (CUDA)
    root: torch.Tensor | None = None     # scaled loss (last stage)
    nbytes: int = 0


def _tuple(out: Any) -> tuple[torch.Tensor, ...]:
    """A stage returns one tensor alone, else a tuple."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class StageCompute:
    """Forward, stash and backward of stage `stage` of `stages` (see module docstring)."""

    def __init__(self, module: nn.Module, stage: int, stages: int, stash: str = "weights",
                 shrink: float = 1.0, amp: torch.dtype | None = None,
                 accel: Accelerator | None = None) -> None:
        if stash not in STASH_MODES:
            raise ValueError(f"stash must be one of {STASH_MODES}, got {stash!r}")
        if not 0 <= stage < stages:
            raise ValueError(f"stage {stage} out of range for {stages} stages")
        self.module = module
        self.stage, self.stages = stage, stages
        self.stash_mode = stash
        self.shrink = float(shrink)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._names = [n for n, p in module.named_parameters() if p.requires_grad]
        self._live_ptrs = {p.data_ptr() for p in module.parameters()}
        # a recompute replays the forward's RNG state only where the stage draws random
        # numbers (5 KB per batch in flight otherwise wasted)
        self._random = is_random(module)
        self._stash: dict[Any, _Stash] = {}
        self.stash_bytes = 0
        self.peak_stash_bytes = 0
        # given by the executor: a stage without parameters (a lone activation) still runs
        # on its rank's device, so its autocast and recompute RNG are the device's
        first = next(iter(module.parameters()), None)
        self.accel = accel if accel is not None else accelerator_of_device(
            first.device if first is not None else "cpu")
        self.device = self.accel.device
        self.amp = amp

    def autocast(self) -> Any:
        """Autocast to the stage's amp dtype on its device (a no-op without amp)."""
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    @property
    def in_flight(self) -> list[Any]:
        return list(self._stash)

    def run(self, xs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The module on `xs` as it stands, no stash (evaluation)."""
        return _tuple(self.module(*xs))

    def warm_up(self, xs: Sequence[torch.Tensor], y: torch.Tensor | None = None) -> None:
        """One forward and backward of the stage on `xs` (the last stage: its loss against
        `y`) that leaves no trace: parameters and their .grad, buffers (BatchNorm
        statistics), the CPU and device RNG states and the stash are as they were. On CUDA
        the first launch of each kernel loads it and waits for the whole device; run before
        the communicators connect, that wait cannot stall against NCCL kernels spinning on
        their peers. The gradients come from torch.autograd.grad: no .grad is written and no
        post-accumulate-grad hook (the reducer's) fires."""
        buffers = [b.detach().clone() for b in self.module.buffers()]
        cpu_rng, device_rng = torch.get_rng_state(), self.accel.rng_state()
        try:
            xs = tuple(x.detach().requires_grad_(not self.is_first and x.is_floating_point())
                       for x in xs)
            with self._rng_guard(), self.autocast():
                outs = _tuple(self.module(*xs))
            if self.is_last:
                out = outs[0]
                root = F.cross_entropy(out if out.element_size() >= 4 else out.float(), y)
            else:
                root = sum((o.float().sum() for o in outs if o.requires_grad),
                           torch.zeros((), device=self.device))
            wrt = [x for x in xs if x.requires_grad] + self.params
            if wrt and root.requires_grad:
                torch.autograd.grad(root, wrt, allow_unused=True)
            self.accel.synchronize()
        finally:
            with torch.no_grad():
                for b, saved in zip(self.module.buffers(), buffers):
                    b.copy_(saved)
            torch.set_rng_state(cpu_rng)
            if device_rng is not None:
                self.accel.set_rng_state(device_rng)

    # -- forward -------------------------------------------------------------------------
    def _rng_guard(self) -> Any:
        """Held while a stage that draws random numbers forwards or replays: the threads of
        one process (the reference's virtual ranks) share torch's generator, and a draw of
        another stage between a recorded state and its forward would make the recompute
        replay another dropout mask than the one that made the activation."""
        return _RNG_LOCK if self._random else contextlib.nullcontext()

    def forward(self, key: Any, xs: Sequence[torch.Tensor],
                live: bool = False) -> tuple[torch.Tensor, ...]:
        """Run batch `key` (the stage's input tensors) through the stage, stash what its
        backward needs, and return the outputs (detached: safe to send)."""
        with self._rng_guard():
            return self._forward(key, tuple(xs), live)

    def _forward(self, key: Any, xs: tuple[torch.Tensor, ...], live: bool) -> tuple[torch.Tensor, ...]:
        if key in self._stash:
            raise ValueError(f"stage {self.stage}: batch {key!r} forwarded twice "
                             f"(still in flight: {self.in_flight})")
        xs = tuple(x.detach() for x in xs)
        if not self.is_first:
            for x in xs:
                if x.is_floating_point():
                    x.requires_grad_(True)
        entry = _Stash(xs=xs)
        if self.stash_mode == "recompute" and not live:
            if self._random:
                entry.rng = torch.get_rng_state()
                entry.device_rng = self.accel.rng_state()
            with torch.no_grad(), self.autocast():
                outs = _tuple(self.module(*xs))
            entry.nbytes = (sum(_nbytes(x) for x in xs) + _nbytes(entry.rng)
                            + _nbytes(entry.device_rng))
        else:
            saved: dict[tuple[int, int], int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                if t.data_ptr() not in self._live_ptrs:
                    saved[(t.data_ptr(), t.untyped_storage().nbytes())] = \
                        t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), self.autocast():
                if live:
                    outs = _tuple(self.module(*xs))
                else:
                    snap = {n: _Snapshot.apply(p) for n, p in zip(self._names, self.params)}
                    outs = _tuple(functional_call(self.module, snap, xs))
            entry.out = outs   # held as the graph roots: count them unless a node saved them
            for o in outs:
                saved[(o.data_ptr(), o.untyped_storage().nbytes())] = o.untyped_storage().nbytes()
            entry.nbytes = sum(saved.values())
        self._stash[key] = entry
        self.stash_bytes += entry.nbytes
        self.peak_stash_bytes = max(self.peak_stash_bytes, self.stash_bytes)
        return tuple(o.detach() for o in outs)

    def loss(self, key: Any, y: torch.Tensor, scale: float = 1.0) -> tuple[float, int]:
        """Last stage: cross-entropy (mean over the batch) of the stashed logits of `key`
        against labels `y`; the backward of `key` then starts from loss*scale.
        Returns (loss, number of correct predictions)."""
        if not self.is_last:
            raise ValueError(f"stage {self.stage}: loss() belongs to the last stage")
        entry = self._get(key)
        if entry.out is None:
            raise ValueError(f"stage {self.stage}: loss of batch {key!r} needs a live or "
                             f"weights-stashed forward")
        out = entry.out[0]
        logits = out if out.element_size() >= 4 else out.float()
        loss = F.cross_entropy(logits, y)      # at least float32, also under autocast
        entry.root = loss * scale if scale != 1.0 else loss
        # one host read for both figures (a device sync each otherwise)
        both = self.accel.to_host(torch.stack([loss.detach().to(torch.float64),
                                               (out.detach().argmax(dim=1) == y).sum().to(torch.float64)]))
        return float(both[0]), int(both[1])

    # -- backward ------------------------------------------------------------------------
    def backward(self, key: Any, grads: Sequence[torch.Tensor] | None = None,
                 accumulate: bool = True) -> tuple[torch.Tensor, ...] | None:
        """Backpropagate batch `key`; parameter gradients are added to `p.grad`.

        grads: the gradients of the stage's floating outputs, in order (None on the last
        stage: the loss); each is multiplied by the shrink factor here. accumulate=False
        uses torch.autograd.grad and adds into p.grad by hand, so post-accumulate-grad hooks
        (the reducer's) do not fire. Returns the gradients of the floating inputs (None on
        stage 0)."""
        entry = self._get(key)
        if self.is_last:
            if entry.root is None:
                raise ValueError(f"stage {self.stage}: backward of batch {key!r} before loss()")
            roots, gs = [entry.root], [None]
        else:
            if grads is None:
                raise ValueError(f"stage {self.stage}: backward of batch {key!r} needs the "
                                 f"output gradients")
            outs = entry.out if entry.out is not None else self._recompute(entry)
            floating = [o for o in outs if o.is_floating_point()]
            if len(floating) != len(grads):
                raise ValueError(f"stage {self.stage}: batch {key!r} has {len(floating)} "
                                 f"floating outputs, got {len(grads)} gradients")
            roots, gs = [], []
            for i, (o, g) in enumerate(zip(floating, grads)):
                if o.shape != g.shape:
                    raise ValueError(f"stage {self.stage}: batch {key!r} output {i} has shape "
                                     f"{tuple(o.shape)}, its gradient has {tuple(g.shape)}")
                if o.requires_grad:         # an output made without parameters or inputs
                    roots.append(o)         # that need a gradient gets none
                    gs.append(g * self.shrink if self.shrink != 1.0 else g)
        want = [x for x in entry.xs if x.requires_grad]
        if accumulate:
            if roots:
                torch.autograd.backward(roots, gs)
            grad_in = [x.grad for x in want]
        else:
            got = (torch.autograd.grad(roots, want + self.params, gs, allow_unused=True)
                   if roots else [None] * (len(want) + len(self.params)))
            grad_in = list(got[:len(want)])
            with torch.no_grad():
                for p, g in zip(self.params, got[len(want):]):
                    if g is None:
                        continue
                    if p.grad is None:
                        p.grad = g.clone()
                    else:
                        p.grad.add_(g)
        self._drop(key)
        if self.is_first:
            return None
        return tuple((g if g is not None else torch.zeros_like(x)).detach()
                     for x, g in zip(want, grad_in))

    def _recompute(self, entry: _Stash) -> tuple[torch.Tensor, ...]:
        """Redo the forward with the current weights, the forward-time RNG state, and
        copies of the buffers (running statistics are not updated twice)."""
        buffers = {n: b.clone() for n, b in self.module.named_buffers()}
        if entry.rng is None:
            with self.autocast():
                return _tuple(functional_call(self.module, buffers, entry.xs))
        with self._rng_guard(), torch.random.fork_rng(devices=[]), self._device_rng(entry.device_rng), \
                self.autocast():
            torch.set_rng_state(entry.rng)
            return _tuple(functional_call(self.module, buffers, entry.xs))

    @contextlib.contextmanager
    def _device_rng(self, state: Any) -> Any:
        """The device generator at `state` inside, as it was after (fork_rng's, for the
        device: None where the CPU generator is the only one)."""
        if state is None:
            yield
            return
        before = self.accel.rng_state()
        self.accel.set_rng_state(state)
        try:
            yield
        finally:
            self.accel.set_rng_state(before)

    def drop_all(self) -> None:
        """Forget every stashed batch (e.g. after an aborted step)."""
        for key in list(self._stash):
            self._drop(key)

    def _get(self, key: Any) -> _Stash:
        try:
            return self._stash[key]
        except KeyError:
            raise ValueError(f"stage {self.stage}: batch {key!r} is not in flight "
                             f"(in flight: {self.in_flight})") from None

    def _drop(self, key: Any) -> None:
        entry = self._stash.pop(key)
        self.stash_bytes -= entry.nbytes


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()
