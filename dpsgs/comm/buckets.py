"""DDP-style gradient bucket assignment (pure): which parameters share one all-reduce."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

__all__ = ["assign_buckets"]


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
