"""Per-block profile of an nn.Sequential: forward/backward seconds, activation, parameter bytes."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["LayerProfile", "ModelProfile", "profile_model", "profile_for", "load_layer_times"]


@dataclass
class LayerProfile:
    name: str
    param_bytes: int                 # parameters (= gradient bytes all-reduced per step)
    out_bytes_per_sample: int        # output activation (= channel message after this layer)
    saved_bytes_per_sample: int      # tensors autograd keeps for backward (a stashed forward)
    # measured seconds: {batch: [forward, backward]}; other batches are interpolated
    times: dict[int, list[float]] = field(default_factory=dict)
    update: float = 0.0              # optimizer step on this layer's parameters (any batch)
    snapshot: float = 0.0            # copying the parameters (weight stashing, per forward)
    # adding one backward's gradients into existing ones: what every micro-batch after the
    # first pays (the timed backward writes fresh gradients)
    accumulate: float = 0.0

    def seconds(self, batch: float) -> tuple[float, float]:
        """(forward, backward) seconds at `batch`: linear through the two nearest measurements
        (a fixed per-call overhead plus a per-sample cost), proportional with one measurement."""
        pts = sorted(self.times.items())
        if not pts:
            raise ValueError(f"layer {self.name!r} has no timings")
        if len(pts) == 1:
            b, (f, g) = pts[0]
            return f * batch / b, g * batch / b
        lo, hi = pts[0], pts[-1]
        for a, b in zip(pts, pts[1:]):   # the bracketing pair, else the end pair
            if a[0] <= batch <= b[0]:
                lo, hi = a, b
                break
        else:
            lo, hi = (pts[-2], pts[-1]) if batch > pts[-1][0] else (pts[0], pts[1])
        w = (batch - lo[0]) / (hi[0] - lo[0])
        # Clamp at zero: an extrapolated noisy slope must not produce negative time.
        return tuple(max(0.0, l + w * (h - l)) for l, h in zip(lo[1], hi[1]))  # type: ignore


@dataclass
class ModelProfile:
    model: str
    in_shape: list[int]
    in_bytes_per_sample: int
    threads: int
    layers: list[LayerProfile]

    @property
    def param_bytes(self) -> int:
        return sum(lay.param_bytes for lay in self.layers)

    def scaled(self, factor: float) -> "ModelProfile":
        """A copy with every measured second multiplied by `factor` (a faster or slower
        device, or a calibration against a measured run)."""
        layers = [LayerProfile(lay.name, lay.param_bytes, lay.out_bytes_per_sample,
                               lay.saved_bytes_per_sample,
                               {b: [t * factor for t in v] for b, v in lay.times.items()},
                               lay.update * factor, lay.snapshot * factor,
                               lay.accumulate * factor)
                  for lay in self.layers]
        return ModelProfile(self.model, list(self.in_shape), self.in_bytes_per_sample,
                            self.threads, layers)

    def to_json(self) -> dict:
        d = asdict(self)
        for lay in d["layers"]:   # JSON object keys are strings
            lay["times"] = {str(b): t for b, t in lay["times"].items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelProfile":
        layers = [LayerProfile(**{**lay, "times": {int(b): list(t) for b, t in
                                                   lay.get("times", {}).items()}})
                  for lay in d["layers"]]
        return cls(d.get("model", "?"), list(d.get("in_shape", [])),
                   int(d.get("in_bytes_per_sample", 0)), int(d.get("threads", 1)), layers)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def _shape_pass(model: nn.Sequential, x: torch.Tensor) -> list[tuple[int, int]]:
    """(output bytes, saved-for-backward bytes) per child at batch x.shape[0]."""
    params = {p.data_ptr() for p in model.parameters()}
    out: list[tuple[int, int]] = []
    for layer in model:
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            # Parameters are saved by reference, not stashed per batch: leave them out.
            if t.data_ptr() not in params:
                saved[t.data_ptr()] = t.numel() * t.element_size()
            return t

        x = x.detach().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        out.append((y.numel() * y.element_size(), sum(saved.values())))
        x = y
    return out


def _time_layers(model: nn.Sequential, x: torch.Tensor, reps: int) -> list[list[float]]:
    """Median forward and backward seconds of each child at the batch of x (after a warm-up)."""
    per: list[list[list[float]]] = [[[], []] for _ in model]
    for rep in range(reps + 1):
        h = x
        for i, layer in enumerate(model):
            h = h.detach().requires_grad_(i > 0)
            t0 = time.perf_counter()
            y = layer(h)
            t1 = time.perf_counter()
            grad = torch.ones_like(y)
            t2 = time.perf_counter()
            y.backward(grad)
            t3 = time.perf_counter()
            if rep > 0:   # rep 0 warms caches and the allocator
                per[i][0].append(t1 - t0)
                per[i][1].append(t3 - t2)
            h = y
        model.zero_grad(set_to_none=True)
    return [[sorted(f)[len(f) // 2], sorted(b)[len(b) // 2]] for f, b in per]


def _median_seconds(fn: Any, reps: int) -> float:
    """Median of `reps` timed calls of fn() after one untimed warm-up call."""
    ts = []
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        fn()
        if rep > 0:
            ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def _time_updates(model: nn.Sequential, reps: int) -> list[tuple[float, float, float]]:
    """Median seconds, per child, of an SGD step (momentum, weight decay: the trainer's
    default) on its parameters (on CPU it streams them several times, which is not free), of
    a copy of them (what weight stashing pays per forward), and of adding a gradient into
    the existing ones (what a micro-batch after the first pays: measured 55 vs 40 ms for 4
    micro-batches of the mlp-wide stage 0, accumulating vs fresh)."""
    out = []
    for layer in model:
        params = [p for p in layer.parameters() if p.requires_grad]
        if not params:
            out.append((0.0, 0.0, 0.0))
            continue
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = torch.optim.SGD(params, lr=1e-9, momentum=0.9, weight_decay=5e-4)
        update = _median_seconds(opt.step, reps)
        copy = _median_seconds(lambda: [p.detach().clone() for p in params], reps)
        # autograd's accumulation: a fresh gradient tensor, added into the existing one
        accumulate = _median_seconds(
            lambda: [p.grad.add_(torch.zeros_like(p)) for p in params], reps)
        out.append((update, copy, accumulate))
        for p in params:
            p.grad = None
    return out


def profile_model(model: nn.Sequential, in_shape: tuple[int, ...], batches: list[int],
                  name: str = "?", reps: int = 3, threads: int = 1,
                  seed: int = 0) -> ModelProfile:
    """Time every child of `model` at each batch in `batches` with `threads` intra-op threads
    (one rank per core here), and measure its activation and saved-tensor sizes."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(seed)
        model.train()
        x1 = torch.randn(2, *in_shape, generator=g)
        sizes = _shape_pass(model, x1)
        layers = [LayerProfile(type(m).__name__ + f"[{i}]",
                               sum(p.numel() * p.element_size() for p in m.parameters()),
                               o // 2, s // 2)
                  for i, (m, (o, s)) in enumerate(zip(model, sizes))]
        with torch.no_grad():
            state = [p.detach().clone() for p in model.parameters()]
        for lay, (u, c, a) in zip(layers, _time_updates(model, reps)):
            lay.update, lay.snapshot, lay.accumulate = u, c, a
        with torch.no_grad():   # the updates used lr 1e-9, but leave the model as it was
            for p, s in zip(model.parameters(), state):
                p.copy_(s)
        for b in sorted(set(batches)):
            x = torch.randn(b, *in_shape, generator=g)
            for lay, t in zip(layers, _time_layers(model, x, reps)):
                lay.times[b] = t
    finally:
        torch.set_num_threads(old_threads)
    return ModelProfile(name, list(in_shape), x1[0].numel() * x1.element_size(), threads,
                        layers)


def load_layer_times(path: str | Path) -> ModelProfile:
    """Read a profile given by the user (the format `ModelProfile.save` writes; see
    docs/planner.md). A layer without byte fields is taken as having none."""
    d = json.loads(Path(path).read_text())
    for lay in d.get("layers", []):
        lay.setdefault("param_bytes", 0)
        lay.setdefault("out_bytes_per_sample", 0)
        lay.setdefault("saved_bytes_per_sample", 0)
    return ModelProfile.from_json(d)


def profile_for(model: str, in_shape: tuple[int, ...], num_classes: int, batches: list[int],
                reps: int = 2, threads: int = 1) -> ModelProfile:
    """Build `model` from dpsgs.job.models and profile it at `batches`."""
    import torch

    from dpsgs.job.models import build_model

    torch.manual_seed(0)
    net = build_model(model, in_shape, num_classes)
    return profile_model(net, in_shape, batches, name=model, reps=reps, threads=threads)
