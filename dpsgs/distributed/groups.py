"""The dpsgs backend's creator: an MPI communicator and an OpEngine for each torch group.

- The default group runs on the rendezvous communicator (`mpi://`'s, MPI.COMM_WORLD unless
  `use_communicator` named another), in torch's rank order: when torch's ranks differ from
  MPI's (another init_method), the communicator is split to match.
- A sub-group (`new_group`, DeviceMesh) is an MPI sub-communicator of the default group's,
  made with MPI_Comm_create_group, which only the members call (torch calls the creator
  on members only). Its members first meet through the group's store with a deadline, so a
  member that never comes is named instead of blocking MPI forever.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist

from dpsgs import _C
from dpsgs.distributed.process_group import DpsgsProcessGroup
from dpsgs.distributed.rendezvous import rendezvous_communicator
from dpsgs.distributed.uncaught import abort_on_uncaught

__all__ = ["create_process_group", "world_communicator"]

_world: list[Any] = []   # the default dpsgs group's mpi4py communicator, in torch's rank order
_CREATE_GROUP_TAG = 7301


def world_communicator() -> Any:
    """The mpi4py communicator whose rank r is torch's global rank r."""
    if _world:
        return _world[0]
    comm = rendezvous_communicator()
    if dist.is_initialized() and (comm.Get_size() != dist.get_world_size()
                                  or comm.Get_rank() != dist.get_rank()):
        raise RuntimeError(
            f"dpsgs backend: torch's world (rank {dist.get_rank()} of {dist.get_world_size()}) is not the MPI "
            f"communicator's (rank {comm.Get_rank()} of {comm.Get_size()}); make the default group a dpsgs "
            "one or use init_method='mpi://'")
    return comm


def _default_comm(rank: int, size: int, timeout: timedelta) -> Any:
    comm = rendezvous_communicator()
    if comm.Get_size() != size:
        raise ValueError(f"dpsgs backend: the default group has {size} ranks but the MPI communicator "
                         f"{comm.Get_size()}; launch with mpirun -n {size} (or init_method='mpi://')")
    if comm.Get_rank() != rank:   # torch numbered the ranks differently: follow torch's order
        comm = comm.Split(0, rank)
    _world[:] = [comm]
    return comm


def _meet(store: dist.Store, members: list[int], me: int, timeout: timedelta) -> None:
    """Every member of the new group sets its key; wait for all, naming who did not come."""
    store.set(f"dpsgs/arrived/{me}", b"1")
    keys = [f"dpsgs/arrived/{r}" for r in members]
    try:
        store.wait(keys, timeout)
    except Exception as e:   # noqa: BLE001 (re-raised with the names of the missing ranks)
        missing = [r for r, k in zip(members, keys, strict=True) if not store.check([k])]
        raise TimeoutError(f"dpsgs backend: rank {me}: new group of ranks {members}: rank(s) {missing} did not "
                           f"create it within {timeout.total_seconds():.0f} s") from e


def _sub_comm(members: list[int], store: dist.Store, timeout: timedelta) -> Any:
    world = world_communicator()
    _meet(store, members, world.Get_rank(), timeout)
    return world.Create_group(world.Get_group().Incl(members), _CREATE_GROUP_TAG)


def create_process_group(opts: Any, backend_options: Any = None) -> DpsgsProcessGroup:
    """torch's extended-API creator: `opts` is a _DistributedBackendOptions."""
    timeout: timedelta = opts.timeout
    members = list(opts.global_ranks_in_group)
    if members:
        comm = _sub_comm(members, opts.store, timeout)
        labels = [f"rank {r}" for r in members]   # messages name torch's global ranks
    else:
        comm = _default_comm(opts.group_rank, opts.group_size, timeout)
        labels = None
    core = _C.Communicator(comm, timeout=timeout.total_seconds(),
                           warn_after=min(60.0, timeout.total_seconds() / 2))
    if members:
        comm.Free()   # the Communicator holds its own duplicates
    if labels:
        core.set_labels(labels)
    abort_on_uncaught()
    return DpsgsProcessGroup(_C.OpEngine(core), opts.store, timeout)
