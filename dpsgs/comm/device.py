"""Where a job runs (--device auto|cpu|cuda), GPU choice per rank and the one-rank-per-GPU
check, done before NCCL initialises.

--device: every rank reads what it sees of CUDA (a CudaView: GPUs, CUDA build of torch, the
NCCL build of dpsgs._C), the job gathers them, and `resolve_device` decides for all at once:
'auto' takes CUDA only where every rank can have a GPU of its own, else the CPU with the
reason; 'cuda' without what it needs names the first thing missing.

Device = local rank (from the launcher's environment, else from an allgather of host names,
as nccl-tests does) modulo the GPUs visible to the process. Two ranks on one GPU of one host
make NCCL fail ("Duplicate GPU detected") or, from 2.30, hang; so every rank allgathers
(host, GPU identity) first and all raise the same `SharedGPUError` naming both ranks and the
GPU. A host is what NCCL takes it to be: `NCCL_HOSTID` where set, else the host name. So
several ranks may share a GPU for testing when each has its own NCCL_HOSTID (NCCL then
connects them over its network transport); dpsgs never sets it itself.

The decision, the mapping and the duplicate detection are pure functions (tested without a
GPU); `gather_views` and `select_device` are the collectives that feed them.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LOCAL_RANK_VARS", "CudaView", "DeviceChoice", "DeviceDecision", "GpuSlot",
           "SharedGPUError", "check_unique_gpus", "cuda_missing", "driver_gpu_count", "gather_views", "probe_cuda",
           "resolve_device", "device_for", "find_shared_gpus", "gpu_identity", "host_identity", "local_rank_from_env",
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


@dataclass(frozen=True)
class CudaView:
    """What one process sees of CUDA: the facts `--device auto|cuda` is decided on.
    `probe_cuda()` reads them here; a test builds one by hand (the seam: nothing live is
    patched), and a job gathers every rank's before it decides."""

    host: str                        # as NCCL sees it (host_identity)
    local_rank: int | None = None    # the launcher's (local_rank_from_env); None if unset
    gpus: tuple[str, ...] = ()       # identities of the visible GPUs, by CUDA ordinal
    torch_cuda: bool = False         # torch is a CUDA build
    torch_version: str = ""
    nccl: bool = False               # dpsgs._C was built with the NCCL backend


@dataclass(frozen=True)
class DeviceDecision:
    device: str      # "cpu" | "cuda" | "sim"
    why: str         # --device auto: why it chose `device` (one clause); "" when named


def probe_cuda(env: Mapping[str, str] | None = None) -> CudaView:
    """This process's CudaView; never raises (what cannot be read counts as absent)."""
    env = os.environ if env is None else env
    try:
        local = local_rank_from_env(env)
    except ValueError:
        local = None
    try:
        from dpsgs import _C

        info = _C.build_info()
        nccl = bool(info.get("nccl")) and not info.get("cuda_simulated")   # the simulator is no GPU backend
    except ImportError:
        nccl = False
    try:
        import torch

        torch_cuda, version = torch.version.cuda is not None, str(torch.__version__)
    except ImportError:
        torch_cuda, version = False, "not installed"
    gpus = tuple(gpu_identity(d, env) for d in range(visible_gpu_count(env)))
    return CudaView(host_identity(env), local[0] if local else None, gpus, torch_cuda, version, nccl)


def resolve_device(requested: str, views: Sequence[CudaView], nccl: bool = True,
                   labels: Sequence[str] | None = None) -> DeviceDecision:
    """Where a job runs, from every rank's CudaView (views[r] is rank r's; `labels` name the
    ranks). 'auto' is cuda only where every rank can have a GPU of its own and (with `nccl`:
    ranks talk over it) dpsgs._C has the NCCL backend, else cpu with the reason; 'cuda'
    without them is a ValueError naming the first thing missing, in the order GPU, CUDA build
    of torch, NCCL build. A pure function: every rank, given the same views, decides alike.
    'sim', the CPU simulator of a DPSGS_CUDA=sim build (a test device), is taken only when
    named (this process's build decides), never by 'auto'."""
    if requested == "cpu":
        return DeviceDecision("cpu", "")
    if requested == "sim":
        from dpsgs.comm.nccl import available    # (nccl imports this module: not at the top)

        ok, why = available("sim")
        if not ok:
            raise ValueError(f"--device sim: {why}")
        return DeviceDecision("sim", "")
    if requested not in ("auto", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or sim, got {requested!r}")
    why = cuda_missing(views, nccl, labels)
    if why is None:
        return DeviceDecision("cuda", "" if requested == "cuda" else
                              "every rank has a GPU of its own" if len(views) > 1 else "a GPU is visible")
    if requested == "cuda":
        raise ValueError(f"--device cuda: {why}")
    return DeviceDecision("cpu", why)


def cuda_missing(views: Sequence[CudaView], nccl: bool = True,
                 labels: Sequence[str] | None = None) -> str | None:
    """Why these ranks cannot train on CUDA (the first missing thing, and where), or None."""
    if not views:
        raise ValueError("cuda_missing: no CudaView given")
    names = list(labels) if labels else [f"rank {r}" for r in range(len(views))]
    checks: list[tuple[Any, Any]] = [
        (lambda v: not v.gpus, lambda v: "no GPU is visible"),
        (lambda v: not v.torch_cuda, lambda v: f"this torch ({v.torch_version}) is a CPU build, "
                                               "not a CUDA one"),
        (lambda v: nccl and not v.nccl, lambda v: "dpsgs._C was built without the NCCL backend "
                                                  "(rebuild: DPSGS_CUDA=1 bash scripts/setup.sh)"),
    ]
    for lacks, text in checks:
        bad = [r for r, v in enumerate(views) if lacks(v)]
        if bad:
            if len(bad) == len(views):
                return text(views[bad[0]])
            where = ", ".join(f"{names[r]} on host {views[r].host}" for r in bad[:3]) \
                + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            return f"{where}: {text(views[bad[0]])}"
    return _shared(views, names) if nccl else None


def _shared(views: Sequence[CudaView], names: Sequence[str]) -> str | None:
    """The GPU two ranks would be given by select_device's mapping (local rank mod GPUs, on
    a host as NCCL sees it), said in one clause; None when every rank gets its own."""
    placed = [(v.host, v.local_rank) for v in views]
    slots = []
    for r, v in enumerate(views):
        own = (v.local_rank, "launcher") if v.local_rank is not None else None
        local, _ = _local_rank(placed, own, r)
        device = local % len(v.gpus)
        slots.append(GpuSlot(r, v.host, device, v.gpus[device]))
    pairs = find_shared_gpus(slots)
    if not pairs:
        return None
    a, b = pairs[0]
    ranks = sum(1 for s in slots if s.host == a.host)
    gpus = len({s.gpu for s in slots if s.host == a.host})
    return (f"{ranks} ranks on host {a.host} share {gpus} GPU(s): {names[b.rank]} would use "
            f"{names[a.rank]}'s GPU {a.gpu} (NCCL needs one GPU per rank)")


def gather_views(comm: Any, view: CudaView, timeout: float) -> list[CudaView]:
    """Collective over `comm` (mpi4py): every rank's CudaView, rank order, behind a deadline."""
    from dpsgs.comm.waits import barrier

    barrier(comm, timeout, "device choice")
    return comm.allgather(view)


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


def visible_gpu_count(env: Mapping[str, str] | None = None) -> int:
    """CUDA devices this process can see (0 without a GPU or driver); never raises. Asked of
    the CUDA runtime where a library here can (dpsgs._C's NCCL build, a CUDA torch, CuPy),
    else counted from the driver's list, so a CPU build of torch does not hide a GPU. A
    simulated build's devices (DPSGS_CUDA=sim) are no GPUs and do not count."""
    try:
        from dpsgs import _C

        info = _C.build_info()
        if info["nccl"] and not info.get("cuda_simulated"):   # a CUDA build can ask the runtime
            return int(_C.cuda_device_count())
    except ImportError:
        pass
    try:
        import torch

        if torch.version.cuda is not None:
            return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except ImportError:
        pass
    try:
        import cupy  # type: ignore[import-not-found]

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - no cupy, no driver: ask the driver's list
        pass
    return driver_gpu_count(os.environ if env is None else env)


def driver_gpu_count(env: Mapping[str, str], root: Path = Path("/proc/driver/nvidia/gpus")) -> int:
    """GPUs the NVIDIA driver lists under `root`, as CUDA_VISIBLE_DEVICES narrows them (CUDA
    stops at its first entry that names no GPU: "-1" or "" hides them all)."""
    try:
        listed = sum(1 for _ in root.iterdir())
    except OSError:
        return 0
    mask = env.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return listed
    count = 0
    for entry in (e.strip() for e in mask.split(",")):
        if not (entry.isdigit() and int(entry) < listed or entry.startswith(("GPU-", "MIG-"))):
            break
        count += 1
    return min(count, listed)


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
