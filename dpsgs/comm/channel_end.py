"""What every tensor channel end shows of its core channel: counters, name, the raw handle."""

from __future__ import annotations

from typing import Any

__all__ = ["ChannelEnd"]


class ChannelEnd:
    """Base of the torch-facing channels (`dpsgs.comm.mpi.TensorChannel` over MPI,
    `dpsgs.comm.nccl.TensorChannel` over NCCL): subclasses set `self._ch` to the `_C` channel."""

    _ch: Any

    @property
    def in_flight(self) -> int:
        return self._ch.in_flight

    @property
    def sent(self) -> int:
        return self._ch.sent

    @property
    def received(self) -> int:
        return self._ch.received

    @property
    def name(self) -> str:
        return self._ch.name

    @property
    def raw(self) -> Any:
        return self._ch
