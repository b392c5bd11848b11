"""Python face of the NCCL backend: descriptors of torch CUDA tensors / CuPy arrays, and
communicator, channel and all-reduce wrappers in the style of `dpsgs.comm.mpi`.

Status: see docs/gpu.md (the fixes after the first GPU run have not been run on a GPU yet).

    from mpi4py import MPI
    from dpsgs.comm import nccl
    ncomm = nccl.init(MPI.COMM_WORLD)                  # picks + checks the GPU, NCCL bootstrap
    stage, pipe = nccl.split_grid(ncomm, stages=K)     # ncclCommSplit, the DESIGN §2 grid
    out = nccl.TensorChannel(ncomm, peer=rank + 1, tag=1, is_sender=True, name="act")
    for c in (ncomm, stage, pipe):                     # collective warm-up, after the channels
        c.connect()
    out.send((x, skip))                                # ordered after x's producer stream
    y, = back.recv([(torch.float32, (64, 128))])       # current stream waits for it on the GPU
    nccl.TensorReducer(stage).allreduce(grad).wait()   # mean over the stage's replicas
    stage.close(); ncomm.close()                       # or at exit: _C.nccl_close_all (atexit)

Every NCCL call of a device is issued by one C++ thread in call order, so every rank must
make its channel and all-reduce calls in the same order (the schedule does).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from dpsgs.comm.channel_end import ChannelEnd
from dpsgs.comm.device import select_device
from dpsgs.comm.dtypes import WIRE_CODES
from dpsgs.comm.grid import Grid, make_groups

__all__ = ["NcclTransport", "TensorChannel", "TensorReducer", "available", "describe", "init",
           "split_grid"]

# __cuda_array_interface__ type strings of the wire dtypes (bfloat16 has none)
_TYPESTR_CODES = {np.dtype(name).str: code for name, code in WIRE_CODES.items() if name != "bfloat16"}


def available() -> tuple[bool, str]:
    """(True, "") when NCCL collectives can run here, else (False, the reason)."""
    try:
        from dpsgs import _C
    except ImportError as e:
        return False, f"dpsgs._C does not import: {e}"
    if not _C.build_info().get("nccl"):
        return False, "dpsgs._C was built without the NCCL backend (rebuild with DPSGS_CUDA=1)"
    if _C.cuda_device_count() < 1:
        return False, "no CUDA device is visible"
    return True, ""


def _torch_descriptor(t: Any, stream: int | None) -> tuple:
    import torch

    if not t.is_cuda:
        raise ValueError(f"expected a CUDA tensor, got one on {t.device} (use dpsgs.comm.mpi for host tensors)")
    if not t.is_contiguous():
        raise ValueError(f"non-contiguous CUDA tensor of shape {tuple(t.shape)}; call .contiguous() first")
    name = str(t.dtype).removeprefix("torch.")
    if name not in WIRE_CODES:
        raise ValueError(f"unsupported dtype {t.dtype}; supported: {', '.join(WIRE_CODES)}")
    if stream is None:
        stream = torch.cuda.current_stream(t.device).cuda_stream
    nbytes = t.numel() * t.element_size()
    return (t.data_ptr(), nbytes, WIRE_CODES[name], tuple(t.shape), t.device.index, int(stream))


def _cai_descriptor(x: Any, stream: int | None) -> tuple:
    cai = x.__cuda_array_interface__
    typestr = cai["typestr"]
    if typestr not in _TYPESTR_CODES:
        raise ValueError(f"unsupported CUDA array type {typestr!r}")
    shape = tuple(int(s) for s in cai["shape"])
    itemsize = int(typestr[2:])
    strides = cai.get("strides")
    if strides is not None:
        expect, ok = itemsize, True
        for size, stride in zip(reversed(shape), reversed(strides)):
            if size != 1 and stride != expect:
                ok = False
            expect *= size
        if not ok and 0 not in shape:
            raise ValueError(f"non-contiguous CUDA array of shape {shape}; make it contiguous first")
    numel = 1
    for s in shape:
        numel *= s
    if stream is None:
        # CAI v3: 1 = legacy default stream, 2 = per-thread default: equal to CUDA's own handles.
        stream = cai.get("stream") or 0
    device = getattr(getattr(x, "device", None), "id", -1)  # CuPy: .device.id; else locate the pointer
    return (int(cai["data"][0]), numel * itemsize, _TYPESTR_CODES[typestr], shape, int(device), int(stream))


def describe(x: Any, stream: int | None = None) -> tuple:
    """(ptr, nbytes, dtype_code, shape, device, stream) of a contiguous torch CUDA tensor or a
    __cuda_array_interface__ array (CuPy). `stream` defaults to the array library's current
    stream: the one the producing kernels ran on, which the transfer is ordered after."""
    if type(x).__module__.startswith("torch"):
        return _torch_descriptor(x, stream)
    if hasattr(x, "__cuda_array_interface__"):
        return _cai_descriptor(x, stream)
    raise ValueError(f"expected a torch CUDA tensor or a CUDA array, got {type(x).__name__}")


def init(comm: Any = None, device: int | None = None, timeout: float = 300.0) -> Any:
    """Collective: choose and check this rank's GPU (dpsgs.comm.device.select_device, before NCCL
    initialises), make it current for torch/CuPy, and create the NcclCommunicator over `comm`
    (an mpi4py communicator, default COMM_WORLD; a dpsgs._C.Communicator needs `device`)."""
    from dpsgs import _C

    ok, why = available()
    if not ok:
        raise RuntimeError(f"NCCL backend unavailable: {why}")
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    if device is None:
        from mpi4py import MPI

        if not isinstance(comm, MPI.Comm):
            raise ValueError("nccl.init: pass device= when comm is not an mpi4py communicator")
        device = select_device(comm).device
    _make_current(device)
    return _C.NcclCommunicator(comm, device, timeout)


def split_grid(world: Any, stages: int) -> tuple[Any, Any]:
    """Collective: (stage communicator, pipeline communicator) of the K x N grid of DESIGN §2
    (rank = replica*K + stage), both by ncclCommSplit of `world`."""
    if world.size % stages:
        raise ValueError(f"world size {world.size} is not a multiple of {stages} stages")
    return make_groups(Grid(stages, world.size // stages), world.rank, world.split)


def _make_current(device: int) -> None:
    """Make `device` current for the array libraries, so their allocations land on it."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(device)
    except ImportError:
        pass
    # CuPy only where the program uses it (imported it already): importing it here would
    # make a broken or mismatched CuPy install fail every torch rank
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        cupy.cuda.Device(device).use()


def _current_stream(x: Any) -> int:
    if type(x).__module__.startswith("torch"):
        import torch

        return torch.cuda.current_stream(x.device).cuda_stream
    import cupy  # type: ignore[import-not-found]

    return cupy.cuda.get_current_stream().ptr


class TensorChannel(ChannelEnd):
    """One end of an NcclChannel for messages of torch CUDA tensors or CuPy arrays.

    send(message) returns a Work; the arrays stay alive in the channel until their transfer
    completes. recv(specs) allocates the results with torch on this communicator's device and
    makes the current stream wait for the transfer (the host does not wait); recv_into(out)
    fills given arrays (torch or CuPy) the same way. A message is a tuple of 1..16 arrays
    (dpsgs.comm.protocol), all produced on one stream.
    """

    def __init__(self, comm: Any, peer: int, tag: int, is_sender: bool, name: str = "") -> None:
        from dpsgs import _C

        self.comm = comm
        self._ch = _C.NcclChannel(comm, peer, tag, is_sender, name)

    def _where(self, op: str, seq: int) -> str:
        return f"rank {self.comm.rank}: channel {self.name!r} {op} #{seq}"

    def send(self, message: Sequence[Any]) -> Any:
        msg = _as_arrays(message, self._where("send", self.sent))
        return self._ch.send([describe(x) for x in msg], msg)

    def recv_into(self, out: Sequence[Any]) -> tuple[Any, ...]:
        out = _as_arrays(out, self._where("recv", self.received))
        work = self._ch.recv_into([describe(x) for x in out], out)
        work.wait_stream(_current_stream(out[0]))
        return out

    def recv(self, specs: Sequence[Any]) -> tuple[Any, ...]:
        import torch

        from dpsgs.comm.message import as_specs

        specs = as_specs(specs, self._where("recv", self.received))
        device = f"cuda:{self.comm.device}"
        return self.recv_into(tuple(torch.empty(shape, dtype=dt, device=device) for dt, shape in specs))


def _as_arrays(message: Sequence[Any], where: str) -> tuple[Any, ...]:
    """The message as a tuple of arrays (its length the core checks), or ValueError."""
    if hasattr(message, "__cuda_array_interface__") or type(message).__module__.startswith("torch") \
            or not isinstance(message, (tuple, list)):
        raise ValueError(f"{where}: a message is a tuple or list of arrays, got {type(message).__name__} "
                         "(send one array as (x,))")
    return tuple(message)


class TensorReducer:
    """Ordered, asynchronous in-place mean (ncclAvg) of CUDA tensors over a communicator.
    Keep the returned Work until it completes: it keeps the tensor alive."""

    def __init__(self, comm: Any) -> None:
        from dpsgs import _C

        self._r = _C.NcclReducer(comm)

    def allreduce(self, x: Any, average: bool = True) -> Any:
        return self._r.allreduce(describe(x), x, average)


class NcclTransport:
    """One rank's transport over NCCL, for device memory (dpsgs.comm.protocol): channels over
    `world` (an NcclCommunicator of the grid), the bucketed all-reduce (ncclAvg) over `stage`
    (this rank's stage group, from ncclCommSplit)."""

    def __init__(self, world: Any, stage: Any, *, bucket_cap_mb: float = 25.0,
                 first_bucket_mb: float = 1.0) -> None:
        import torch

        self.world, self.stage = world, stage
        self.device = torch.device("cuda", world.device)
        self.bucket_cap_mb, self.first_bucket_mb = bucket_cap_mb, first_bucket_mb
        self._reducer = TensorReducer(stage)

    def channel(self, peer: int, tag: int, sending: bool, name: str) -> TensorChannel:
        return TensorChannel(self.world, peer, tag, sending, name)

    def allreduce(self, flat: Any) -> Any:
        return self._reducer.allreduce(flat)

    def reducer(self, params: Any, buffers: int = 1) -> Any:
        from dpsgs.comm.gradient_reducer import GradientReducer

        return GradientReducer(params, self.allreduce, bucket_cap_mb=self.bucket_cap_mb,
                               first_bucket_mb=self.first_bucket_mb, buffers=buffers)

    def connect(self) -> None:
        """Collective: warm up every channel made so far and both communicators."""
        self.world.connect()
        self.stage.connect()

    def close(self) -> None:
        """Collective: finalize and destroy the NCCL communicators (bounded)."""
        self.stage.close()
        self.world.close()
