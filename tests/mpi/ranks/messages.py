"""Channel messages of several tensors that both ranks can rebuild from the message number:
every wire dtype, shapes from zero elements to past the slot capacity, random bytes."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["DTYPES", "message", "raw", "same"]

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64,
          torch.uint8, torch.int8, torch.bool]


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads included)."""
    return a.dtype == b.dtype and a.shape == b.shape and raw(a) == raw(b)


def _elements(rng: np.random.Generator) -> int:
    kind = rng.random()
    if kind < 0.15:
        return 0
    if kind < 0.55:
        return int(rng.integers(1, 64))                 # travels inline
    if kind < 0.80:
        return int(rng.integers(500, 3000))             # around the 8 KiB inline size
    if kind < 0.95:
        return int(rng.integers(4000, 40000))           # separate, near the slot capacity
    return int(rng.integers(100_000, 400_000))          # past any slot capacity: growth


def _shape(n: int, rng: np.random.Generator) -> tuple[int, ...]:
    if n == 0:
        return [(0,), (3, 0), (0, 2, 5)][int(rng.integers(3))]
    if n == 1 and rng.random() < 0.5:
        return ()
    if n % 6 == 0 and rng.random() < 0.5:
        return (2, 3, n // 6)
    return (n,)


def message(i: int, tensors: int | None = None) -> tuple[list[torch.Tensor], list[bool]]:
    """Message i: (its tensors, which to send non-contiguous). 1..16 tensors (cycling), each
    of a random wire dtype and shape, random bytes (bool: 0 or 1)."""
    rng = np.random.default_rng(1000 + i)
    count = tensors or 1 + i % 16
    out, strided = [], []
    for _ in range(count):
        dt = DTYPES[int(rng.integers(len(DTYPES)))]
        n = _elements(rng)
        size = torch.empty((), dtype=dt).element_size()
        data = torch.from_numpy(rng.integers(0, 256, n * size, dtype=np.uint8))
        if dt == torch.bool:
            data &= 1
        shape = _shape(n, rng)
        out.append(data.view(dt).reshape(shape) if n else torch.empty(shape, dtype=dt))
        strided.append(out[-1].dim() == 3 and n > 0 and out[-1].shape[2] > 1 and rng.random() < 0.5)
    return out, strided
