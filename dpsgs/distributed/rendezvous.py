"""The `mpi://` rendezvous: `init_process_group(backend, init_method="mpi://")` under mpirun.

Rank and world size come from the MPI communicator and the store is an `MpiStore` over it,
so a job needs no MASTER_ADDR/PORT, no RANK/WORLD_SIZE and no TCP store, and opens no port.
Any backend can use it (dpsgs, gloo, nccl: the store only carries their set-up). The
communicator is MPI.COMM_WORLD unless `use_communicator(comm)` named another first (a
sub-communicator of a larger MPI workflow); dpsgs never initialises or finalises MPI itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlparse

from dpsgs.distributed.store import MpiStore
from dpsgs.distributed.uncaught import abort_on_uncaught

__all__ = ["SCHEME", "use_communicator", "rendezvous_communicator", "mpi_rendezvous_handler"]

SCHEME = "mpi"
_chosen: list[Any] = []          # the communicator use_communicator() named, if any


def use_communicator(comm: Any) -> None:
    """Rendezvous over `comm` (an mpi4py communicator) instead of MPI.COMM_WORLD: call on
    every rank of `comm`, before `init_process_group(..., init_method="mpi://")`."""
    _chosen[:] = [comm]


def rendezvous_communicator() -> Any:
    """The mpi4py communicator `mpi://` rendezvouses over (and the dpsgs backend's world)."""
    if _chosen:
        return _chosen[0]
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _given(query: str, name: str) -> int | None:
    values = parse_qs(query).get(name)
    return int(values[0]) if values else None


def mpi_rendezvous_handler(url: str, timeout: timedelta = timedelta(minutes=5),
                           **_: Any) -> Iterator[tuple[MpiStore, int, int]]:
    """torch's rendezvous handler protocol: yield (store, rank, world_size) once. A rank or
    world size passed to init_process_group must be MPI's: ValueError otherwise."""
    comm = rendezvous_communicator()
    rank, size = comm.Get_rank(), comm.Get_size()
    query = urlparse(url).query
    for name, mine in (("rank", rank), ("world_size", size)):
        given = _given(query, name)
        if given is not None and given != mine:
            raise ValueError(f"init_process_group(init_method='mpi://'): {name}={given} was given but "
                             f"the MPI communicator says {mine}; leave {name} out (mpi:// takes MPI's)")
    abort_on_uncaught()
    yield MpiStore(comm, timeout), rank, size
    raise RuntimeError("mpi:// rendezvous happens once per process group initialisation")
