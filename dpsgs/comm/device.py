"""GPU choice per rank and the one-rank-per-GPU check, done before NCCL initialises.

Device = local rank (from the launcher's environment, else from an allgather of host names,
as nccl-tests does) modulo the GPUs visible to the process. Two ranks on one GPU of one host
make NCCL fail ("Duplicate GPU detected") or, from 2.30, hang; so every rank allgathers
(host, GPU identity) first and all raise the same `SharedGPUError` naming both ranks and the
GPU. A host is what NCCL takes it to be: `NCCL_HOSTID` where set, else the host name. So
several ranks may share a GPU for testing when each has its own NCCL_HOSTID (NCCL then
connects them over its network transport); dpsgs never sets it itself.

The mapping and the duplicate detection are pure functions (tested without a GPU);
`select_device` is the collective that feeds them.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LOCAL_RANK_VARS", "DeviceChoice", "GpuSlot", "SharedGPUError", "check_unique_gpus",
           "resolve_device",
           "device_for", "find_shared_gpus", "gpu_identity", "host_identity", "local_rank_from_env",
           "local_rank_from_hosts", "physical_gpu_id", "select_device", "visible_gpu_count"]

# MPICH/Hydra, Open MPI, Cray PALS, MVAPICH, Slurm: the launcher's own count of this process
# on its node. SLURM_LOCALID comes last: a batch script's own step sets it, and ranks started
# by another launcher inside it inherit one value (select_device then counts by host name).
LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "PALS_LOCAL_RANKID",
                   "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")


class SharedGPUError(ValueError):
    """Two or more ranks were mapped to one GPU."""


@dataclass(frozen=True)
class GpuSlot:
    """Where one rank runs: its rank, host, CUDA ordinal and a GPU identity (UUID if known)."""

    rank: int
    host: str
    device: int
    gpu: str


@dataclass(frozen=True)
class DeviceChoice:
    device: int        # CUDA ordinal in this process (after CUDA_VISIBLE_DEVICES)
    local_rank: int
    host: str
    gpu: str           # identity used for the duplicate check
    source: str        # where local_rank came from: an env variable name or "hostnames..."


def host_identity(env: Mapping[str, str] | None = None) -> str:
    """The host as NCCL sees it: NCCL_HOSTID when set (NCCL hashes it in place of the host
    name), else the host name."""
    env = os.environ if env is None else env
    return env.get("NCCL_HOSTID", "").strip() or socket.gethostname()


def resolve_device(requested: str, nccl: bool = True) -> str:
    """'cpu', 'cuda' or 'sim' for a --device setting, from what this process can see. 'auto'
    is cuda when a GPU is visible to a CUDA torch and (with `nccl`: ranks talk over it)
    dpsgs._C has the real NCCL backend, else cpu — never 'sim', the CPU simulator of a
    DPSGS_CUDA=sim build, a test device asked for by name; 'cuda' or 'sim' without what they
    need is a ValueError saying what is missing. (Ranks compare their answers at start.)"""
    if requested == "cpu":
        return "cpu"
    if requested == "sim":
        from dpsgs.comm.nccl import available    # (nccl imports this module: not at the top)

        ok, why = available("sim")
        if not ok:
            raise ValueError(f"--device sim: {why}")
        return "sim"
    if requested not in ("auto", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or sim, got {requested!r}")
    why = _cuda_missing(nccl)
    if why is None:
        return "cuda"
    if requested == "cuda":
        raise ValueError(f"--device cuda: {why}")
    return "cpu"


def _cuda_missing(nccl: bool) -> str | None:
    """Why this process cannot train on CUDA, or None when it can."""
    if nccl:
        from dpsgs.comm.nccl import available    # (nccl imports this module: not at the top)

        ok, why = available("cuda")
        if not ok:
            return why
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return ("no CUDA device is visible" if torch.version.cuda
                else f"this torch ({torch.__version__}) is a CPU build")
    return None


def local_rank_from_env(env: Mapping[str, str]) -> tuple[int, str] | None:
    """(local rank, variable name) from the first launcher variable set, else None."""
    for var in LOCAL_RANK_VARS:
        value = env.get(var, "").strip()
        if value:
            try:
                rank = int(value)
            except ValueError:
                raise ValueError(f"{var}={value!r} is not an integer local rank") from None
            if rank < 0:
                raise ValueError(f"{var}={value!r}: a local rank must be >= 0")
            return rank, var
    return None


def local_rank_from_hosts(hosts: Sequence[str], rank: int) -> int:
    """Position of `rank` among the ranks on the same host (hosts[i] = host name of rank i)."""
    if not 0 <= rank < len(hosts):
        raise ValueError(f"rank {rank} outside the {len(hosts)} gathered host names")
    return sum(1 for h in hosts[:rank] if h == hosts[rank])


def device_for(local_rank: int, visible: int) -> int:
    """CUDA ordinal for a local rank: local_rank mod visible GPUs."""
    if visible < 1:
        raise ValueError("no CUDA device is visible to this process (check the driver, "
                         "CUDA_VISIBLE_DEVICES and that the node has a GPU)")
    if local_rank < 0:
        raise ValueError(f"local rank must be >= 0, got {local_rank}")
    return local_rank % visible


def physical_gpu_id(device: int, cuda_visible_devices: str | None) -> str:
    """The GPU an ordinal denotes when no UUID is available: the CUDA_VISIBLE_DEVICES entry
    (an index or a UUID) when that variable is set, else the ordinal itself."""
    if cuda_visible_devices is not None and cuda_visible_devices.strip():
        entries = [e.strip() for e in cuda_visible_devices.split(",") if e.strip()]
        if 0 <= device < len(entries):
            return entries[device]
    return str(device)


def find_shared_gpus(slots: Sequence[GpuSlot]) -> list[tuple[GpuSlot, GpuSlot]]:
    """Pairs (first rank on a GPU, another rank on the same GPU of the same host)."""
    first: dict[tuple[str, str], GpuSlot] = {}
    pairs = []
    for slot in slots:
        key = (slot.host, slot.gpu)
        if key in first:
            pairs.append((first[key], slot))
        else:
            first[key] = slot
    return pairs


def check_unique_gpus(slots: Sequence[GpuSlot], visible: Mapping[str, int] | None = None) -> None:
    """Raise SharedGPUError naming every pair of ranks that share a GPU (and, per host, how
    many ranks run there against how many GPUs are visible, when `visible` gives it)."""
    pairs = find_shared_gpus(slots)
    if not pairs:
        return
    lines = [f"rank {b.rank} and rank {a.rank} both map to GPU {a.gpu} (cuda:{a.device}) on host {a.host}"
             for a, b in pairs]
    ranks_per_host = Counter(s.host for s in slots)
    hosts = sorted({a.host for a, _ in pairs})
    for host in hosts:
        gpus = f"{visible[host]} visible GPU(s)" if visible and host in visible else \
            f"{len({s.gpu for s in slots if s.host == host})} distinct GPU(s) in use"
        lines.append(f"host {host}: {ranks_per_host[host]} ranks, {gpus}")
    raise SharedGPUError(
        "two ranks on one GPU (NCCL cannot run two ranks of a communicator on one GPU):\n  "
        + "\n  ".join(lines)
        + "\nlaunch at most one rank per GPU on each host (e.g. mpirun -ppn <GPUs per node>), "
          "or use the CPU/MPI backend (tests may share a GPU by giving each rank its own "
          "NCCL_HOSTID)")


def visible_gpu_count() -> int:
    """CUDA devices this process can see (0 without a GPU or driver; a simulated build's
    devices do not count); never raises."""
    try:
        from dpsgs import _C

        info = _C.build_info()
        if info["nccl"] and not info.get("cuda_simulated"):   # a CUDA build can ask the runtime
            return int(_C.cuda_device_count())
    except ImportError:
        pass
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except ImportError:
        pass
    try:
        import cupy  # type: ignore[import-not-found]

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - no cupy, no driver: no GPU
        return 0


def gpu_identity(device: int, env: Mapping[str, str] | None = None) -> str:
    """A name for the physical GPU behind ordinal `device`: its UUID when torch or CuPy can
    tell, else the CUDA_VISIBLE_DEVICES entry or the ordinal (see physical_gpu_id)."""
    env = os.environ if env is None else env
    try:
        import torch

        if torch.cuda.is_available():
            uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
            if uuid is not None:
                return f"GPU-{uuid}"
    except (ImportError, RuntimeError, AssertionError):
        pass
    try:
        import cupy  # type: ignore[import-not-found]

        raw = cupy.cuda.runtime.getDeviceProperties(device).get("uuid")
        if raw:
            return "GPU-" + bytes(raw).hex()
    except Exception:  # noqa: BLE001 - best effort only
        pass
    return physical_gpu_id(device, env.get("CUDA_VISIBLE_DEVICES"))


def _local_rank(placed: Sequence[tuple[str, int | None]], from_env: tuple[int, str] | None,
                rank: int) -> tuple[int, str]:
    """The launcher's local rank where every rank has one and none repeats on a host (the
    same answer on every rank: `placed` is gathered); else the rank's place among its host's."""
    pairs = list(placed)
    if from_env and all(local is not None for _, local in pairs) and len(set(pairs)) == len(pairs):
        return from_env
    why = "" if not from_env else f" ({from_env[1]} is unset on some rank or repeats on a host)"
    return local_rank_from_hosts([h for h, _ in placed], rank), "hostnames" + why


def select_device(comm: Any = None, visible: int | None = None,
                  env: Mapping[str, str] | None = None) -> DeviceChoice:
    """Collective over `comm` (an mpi4py communicator; default COMM_WORLD): pick this rank's
    GPU and check, on every rank alike, that no two ranks share one. Call before creating an
    NcclCommunicator. Raises ValueError (SharedGPUError for sharing) on every rank."""
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    env = os.environ if env is None else env
    host = host_identity(env)
    from_env = local_rank_from_env(env)
    placed = comm.allgather((host, from_env[0] if from_env else None))
    local, source = _local_rank(placed, from_env, comm.Get_rank())
    count = visible_gpu_count() if visible is None else visible
    error, device, gpu = None, -1, ""
    try:
        device = device_for(local, count)
        gpu = gpu_identity(device, env)
    except ValueError as e:
        error = str(e)
    # Everyone sees the same gathered list, so every rank raises the same error: no rank is
    # left waiting in NCCL init for a peer that gave up.
    gathered = comm.allgather((host, device, gpu, count, error))
    failures = [f"rank {r} on {h}: {e}" for r, (h, _, _, _, e) in enumerate(gathered) if e]
    if failures:
        raise ValueError("cannot choose a GPU:\n  " + "\n  ".join(failures))
    slots = [GpuSlot(r, h, d, g) for r, (h, d, g, _, _) in enumerate(gathered)]
    check_unique_gpus(slots, visible={h: c for h, _, _, c, _ in gathered})
    return DeviceChoice(device=device, local_rank=local, host=host, gpu=gpu, source=source)
