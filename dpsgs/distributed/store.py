"""MpiStore: torch.distributed's key-value Store carried by MPI messages (rank 0 serves it).

torch's rendezvous, `new_group`, store-based barriers, DeviceMesh and gloo/NCCL's own
connection set-up all go through a Store. This one needs no socket, port or environment
variable: `dpsgs._C.MpiStore` sends each request to rank 0 of the communicator, whose
server thread answers it (csrc/mpi_store.*). Every call has a deadline (the store's
`timeout`, or the one torch passes to `wait`); a timeout raises torch's DistStoreError
carrying the core's message, which names the call, the key(s) and rank 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from dpsgs import _C
from dpsgs.comm.errors import CommError

__all__ = ["MpiStore"]

# torch holds a store through C++ (PrefixStore) only; without a Python reference the object
# would be collected and its methods fall back to Store's "not implemented". Stores live as
# long as the process (one per mpi:// rendezvous, and their clones).
_alive: list[MpiStore] = []


def _bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


class MpiStore(dist.Store):
    """A torch Store over an mpi4py communicator (collective to create; thread-safe to use).

    `clone()` returns another Python face of the same store (torch clones stores for its
    worker threads)."""

    def __init__(self, comm: Any = None, timeout: timedelta = timedelta(minutes=5), *,
                 _core: Any = None) -> None:
        super().__init__()
        self._core = _core if _core is not None else _C.MpiStore(comm, timeout.total_seconds())
        self.set_timeout(timeout)
        _alive.append(self)

    # ---- what torch calls (the names of its Python Store trampoline)
    def set(self, key: str, value: Any) -> None:
        self._call(self._core.set, key, _bytes(value))

    def get(self, key: str) -> bytes:
        return self._call(self._core.get, key, self._seconds(None))

    def add(self, key: str, value: int) -> int:
        return self._call(self._core.add, key, int(value))

    def compare_set(self, key: str, expected_value: Any, desired_value: Any) -> bytes:
        return self._call(self._core.compare_set, key, _bytes(expected_value), _bytes(desired_value))

    def wait(self, keys: Sequence[str], timeout: timedelta | None = None) -> None:
        self._call(self._core.wait, list(keys), self._seconds(timeout))

    def check(self, keys: Sequence[str]) -> bool:
        return self._call(self._core.check, list(keys))

    def deleteKey(self, key: str) -> bool:  # noqa: N802 (torch's trampoline name)
        return self._call(self._core.delete_key, key)

    def delete_key(self, key: str) -> bool:
        return self.deleteKey(key)

    def getNumKeys(self) -> int:  # noqa: N802 (torch's trampoline name)
        return self._call(self._core.num_keys)

    def num_keys(self) -> int:
        return self.getNumKeys()

    def append(self, key: str, value: Any) -> None:
        self._call(self._core.append, key, _bytes(value))

    def multi_get(self, keys: Sequence[str]) -> list[bytes]:
        return [self.get(k) for k in keys]

    def multi_set(self, keys: Sequence[str], values: Sequence[Any]) -> None:
        for k, v in zip(keys, values, strict=True):
            self.set(k, v)

    def has_extended_api(self) -> bool:
        return True

    def clone(self) -> MpiStore:
        return MpiStore(timeout=self.timeout, _core=self._core)

    # ---- ours
    @property
    def rank(self) -> int:
        return self._core.rank

    @property
    def size(self) -> int:
        return self._core.size

    def shutdown(self) -> None:
        """Stop the server (on rank 0); later calls time out. The atexit hook does it too."""
        self._core.shutdown()

    def _seconds(self, timeout: timedelta | None) -> float:
        if timeout is None or timeout.total_seconds() <= 0:   # torch passes 0 for "the store's"
            timeout = self.timeout
        return max(0.0, timeout.total_seconds())

    def _call(self, fn: Any, *args: Any) -> Any:
        self._core.timeout = self.timeout.total_seconds()
        try:
            return fn(*args)
        except CommError as e:   # torch's callers expect its store error type
            raise dist.DistStoreError(str(e)) from e
