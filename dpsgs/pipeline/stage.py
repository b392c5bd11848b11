"""StageCompute: one stage's forward/stash/backward math, shared by the worker and the reference.

No communication here: the caller moves activations and gradients and decides when to
update. Each in-flight batch is stashed under a key (its batch id) between its forward and
its delayed backward:

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
Shrink: the incoming output-gradient is multiplied by beta at every stage boundary, so stage
k's gradient is scaled by beta**(K-1-k) (FDG's gradient shrinking).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

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
    x: torch.Tensor                      # stage input (requires grad on stages > 0)
    out: torch.Tensor | None = None      # graph root (weights/live); None for recompute
    rng: torch.Tensor | None = None      # CPU RNG state at forward time (recompute)
    cuda_rng: torch.Tensor | None = None  # and the device's, when the stage runs on CUDA
    root: torch.Tensor | None = None     # scaled loss (last stage)
    nbytes: int = 0


class StageCompute:
    """Forward, stash and backward of stage `stage` of `stages` (see module docstring)."""

    def __init__(self, module: nn.Module, stage: int, stages: int, stash: str = "weights",
                 shrink: float = 1.0, amp: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
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
        self._random = any(isinstance(m, (nn.modules.dropout._DropoutNd, nn.RReLU))
                           for m in module.modules())
        self._stash: dict[Any, _Stash] = {}
        self.stash_bytes = 0
        self.peak_stash_bytes = 0
        # given by the executor: a stage without parameters (a lone activation) still runs
        # on its rank's device, so its autocast and recompute RNG are the device's
        first = next(iter(module.parameters()), None)
        self.device = torch.device(device) if device is not None else (
            first.device if first is not None else torch.device("cpu"))
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

    # -- forward -------------------------------------------------------------------------
    def _rng_guard(self) -> Any:
        """Held while a stage that draws random numbers forwards or replays: the threads of
        one process (the reference's virtual ranks) share torch's generator, and a draw of
        another stage between a recorded state and its forward would make the recompute
        replay another dropout mask than the one that made the activation."""
        return _RNG_LOCK if self._random else contextlib.nullcontext()

    def forward(self, key: Any, x: torch.Tensor, live: bool = False) -> torch.Tensor:
        """Run batch `key` through the stage, stash what its backward needs, and return
        the output (detached: safe to send)."""
        with self._rng_guard():
            return self._forward(key, x, live)

    def _forward(self, key: Any, x: torch.Tensor, live: bool) -> torch.Tensor:
        if key in self._stash:
            raise ValueError(f"stage {self.stage}: batch {key!r} forwarded twice "
                             f"(still in flight: {self.in_flight})")
        x = x.detach()
        if not self.is_first and x.is_floating_point():
            x.requires_grad_(True)
        if self.stash_mode == "recompute" and not live:
            entry = _Stash(x=x)
            if self._random:
                entry.rng = torch.get_rng_state()
                if self.device.type == "cuda":
                    entry.cuda_rng = torch.cuda.get_rng_state(self.device)
            with torch.no_grad(), self.autocast():
                out = self.module(x)
            entry.nbytes = _nbytes(x) + _nbytes(entry.rng) + _nbytes(entry.cuda_rng)
        else:
            entry = _Stash(x=x)
            saved: dict[tuple[int, int], int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                if t.data_ptr() not in self._live_ptrs:
                    saved[(t.data_ptr(), t.untyped_storage().nbytes())] = \
                        t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), self.autocast():
                if live:
                    out = self.module(x)
                else:
                    snap = {n: _Snapshot.apply(p) for n, p in zip(self._names, self.params)}
                    out = functional_call(self.module, snap, (x,))
            entry.out = out   # held as the graph root: count it unless a node saved it
            saved[(out.data_ptr(), out.untyped_storage().nbytes())] = \
                out.untyped_storage().nbytes()
            entry.nbytes = sum(saved.values())
        self._stash[key] = entry
        self.stash_bytes += entry.nbytes
        self.peak_stash_bytes = max(self.peak_stash_bytes, self.stash_bytes)
        return out.detach()

    def loss(self, key: Any, y: torch.Tensor, scale: float = 1.0) -> tuple[float, int]:
        """Last stage: cross-entropy (mean over the batch) of the stashed output of `key`
        against labels `y`; the backward of `key` then starts from loss*scale.
        Returns (loss, number of correct predictions)."""
        if not self.is_last:
            raise ValueError(f"stage {self.stage}: loss() belongs to the last stage")
        entry = self._get(key)
        if entry.out is None:
            raise ValueError(f"stage {self.stage}: loss of batch {key!r} needs a live or "
                             f"weights-stashed forward")
        logits = entry.out if entry.out.element_size() >= 4 else entry.out.float()
        loss = F.cross_entropy(logits, y)      # at least float32, also under autocast
        entry.root = loss * scale if scale != 1.0 else loss
        correct = int((entry.out.detach().argmax(dim=1) == y).sum())
        return float(loss.detach()), correct

    # -- backward ------------------------------------------------------------------------
    def backward(self, key: Any, grad_out: torch.Tensor | None = None,
                 accumulate: bool = True) -> torch.Tensor | None:
        """Backpropagate batch `key`; parameter gradients are added to `p.grad`.

        grad_out: the gradient of the stage output (None on the last stage: the loss).
        It is multiplied by the shrink factor here. accumulate=False uses
        torch.autograd.grad and adds into p.grad by hand, so post-accumulate-grad hooks
        (the reducer's) do not fire. Returns the gradient of the stage input (None on
        stage 0)."""
        entry = self._get(key)
        if self.is_last:
            if entry.root is None:
                raise ValueError(f"stage {self.stage}: backward of batch {key!r} before loss()")
            root, grad = entry.root, None
        else:
            if grad_out is None:
                raise ValueError(f"stage {self.stage}: backward of batch {key!r} needs grad_out")
            grad = grad_out * self.shrink if self.shrink != 1.0 else grad_out
            root = entry.out if entry.out is not None else self._recompute(entry)
            if root.shape != grad.shape:
                raise ValueError(f"stage {self.stage}: batch {key!r} output has shape "
                                 f"{tuple(root.shape)}, gradient has {tuple(grad.shape)}")
        x = entry.x
        want_x = x.requires_grad
        if accumulate:
            root.backward(grad)
            grad_in = x.grad if want_x else None
        else:
            inputs = ([x] if want_x else []) + self.params
            grads = torch.autograd.grad(root, inputs, grad, allow_unused=True)
            grad_in = grads[0] if want_x else None
            with torch.no_grad():
                for p, g in zip(self.params, grads[1 if want_x else 0:]):
                    if g is None:
                        continue
                    if p.grad is None:
                        p.grad = g.clone()
                    else:
                        p.grad.add_(g)
        self._drop(key)
        if self.is_first:
            return None
        if grad_in is None:
            raise ValueError(f"stage {self.stage}: batch {key!r}: no gradient reached the "
                             f"stage input")
        return grad_in.detach()

    def _recompute(self, entry: _Stash) -> torch.Tensor:
        """Redo the forward with the current weights, the forward-time RNG state, and
        copies of the buffers (running statistics are not updated twice)."""
        buffers = {n: b.clone() for n, b in self.module.named_buffers()}
        if entry.rng is None:
            with self.autocast():
                return functional_call(self.module, buffers, (entry.x,))
        devices = [self.device] if entry.cuda_rng is not None else []
        with self._rng_guard(), torch.random.fork_rng(devices=devices), self.autocast():
            torch.set_rng_state(entry.rng)
            if entry.cuda_rng is not None:
                torch.cuda.set_rng_state(entry.cuda_rng, self.device)
            return functional_call(self.module, buffers, (entry.x,))

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
