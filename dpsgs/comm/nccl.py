"""Python face of the NCCL backend: descriptors of torch CUDA tensors / CuPy arrays, and
communicator, channel and all-reduce wrappers in the style of `dpsgs.comm.mpi`.

Status: see docs/gpu.md (the fixes after the first GPU run have not been run on a GPU yet).
The same code runs on the CPU simulator of a DPSGS_CUDA=sim build (`kind="sim"`, the
build's only kind there; csrc/sim/sim.h): every device-specific step goes through the
rank's accelerator (dpsgs.comm.accelerator).

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

from collections.abc import Sequence
from typing import Any

import numpy as np

from dpsgs.comm.accel_cuda import cuda_descriptor
from dpsgs.comm.accelerator import Accelerator, accelerator, simulated_build
from dpsgs.comm.channel_end import ChannelEnd
from dpsgs.comm.device import select_device
from dpsgs.comm.dtypes import WIRE_CODES
from dpsgs.comm.grid import Grid, make_groups

__all__ = ["NcclTransport", "TensorChannel", "TensorReducer", "accelerator_of", "available",
           "build_kind", "describe", "init", "split_grid"]

# __cuda_array_interface__ type strings of the wire dtypes (bfloat16 has none)
_TYPESTR_CODES = {np.dtype(name).str: code for name, code in WIRE_CODES.items() if name != "bfloat16"}


def build_kind() -> str | None:
    """"cuda" or "sim": what dpsgs._C's NCCL backend runs on; None without one."""
    try:
        from dpsgs import _C
    except ImportError:
        return None
    info = _C.build_info()
    if not info.get("nccl"):
        return None
    return "sim" if info.get("cuda_simulated") else "cuda"


def available(kind: str = "cuda") -> tuple[bool, str]:
    """(True, "") when NCCL collectives can run here on `kind` ("cuda": GPUs; "sim": the
    CPU simulator), else (False, the reason)."""
    try:
        from dpsgs import _C  # noqa: F401
    except ImportError as e:
        return False, f"dpsgs._C does not import: {e}"
    built = build_kind()
    if built is None:
        return False, "dpsgs._C was built without the NCCL backend (rebuild with DPSGS_CUDA=1, or =sim)"
    if built != kind:
        return False, ("dpsgs._C was built with the simulated CUDA/NCCL (DPSGS_CUDA=sim), a test device; "
                       "rebuild with DPSGS_CUDA=1 for GPUs" if built == "sim" else
                       "dpsgs._C was built with the real CUDA/NCCL; rebuild with DPSGS_CUDA=sim for the simulator")
    if kind == "cuda" and _C.cuda_device_count() < 1:
        return False, "no CUDA device is visible"
    return True, ""


def accelerator_of(comm: Any) -> Accelerator:
    """The accelerator of an NcclCommunicator's device (the build's kind)."""
    return accelerator(build_kind() or "cuda", comm.device)


def _torch_descriptor(t: Any, stream: int | None) -> tuple:
    return cuda_descriptor(t, stream)


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


def init(comm: Any = None, device: int | None = None, timeout: float = 300.0,
         warn_after: float = 60.0) -> Any:
    """Collective: choose and check this rank's GPU (dpsgs.comm.device.select_device, before NCCL
    initialises; on a simulated build among the simulated devices), make it current, and
    create the NcclCommunicator over `comm` (an mpi4py communicator, default COMM_WORLD; a
    dpsgs._C.Communicator needs `device`). Its waits time out after `timeout` s and report a
    stall after `warn_after` s."""
    from dpsgs import _C

    kind = build_kind() or "cuda"
    ok, why = available(kind)
    if not ok:
        raise RuntimeError(f"NCCL backend unavailable: {why}")
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    if device is None:
        from mpi4py import MPI

        if not isinstance(comm, MPI.Comm):
            raise ValueError("nccl.init: pass device= when comm is not an mpi4py communicator")
        visible = _C.cuda_device_count() if kind == "sim" else None
        device = select_device(comm, visible=visible).device
    accelerator(kind, device).make_current()
    return _C.NcclCommunicator(comm, device, timeout, warn_after)


def split_grid(world: Any, stages: int) -> tuple[Any, Any]:
    """Collective: (stage communicator, pipeline communicator) of the K x N grid of DESIGN §2
    (rank = replica*K + stage), both by ncclCommSplit of `world`."""
    if world.size % stages:
        raise ValueError(f"world size {world.size} is not a multiple of {stages} stages")
    return make_groups(Grid(stages, world.size // stages), world.rank, world.split)


def _current_stream(x: Any) -> int:
    """The current stream of a CuPy array's device (torch tensors go through the accelerator)."""
    import cupy  # type: ignore[import-not-found]

    return cupy.cuda.get_current_stream().ptr


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


class TensorChannel(ChannelEnd):
    """One end of an NcclChannel for messages of torch CUDA tensors or CuPy arrays.

    send(message) returns a Work; the arrays stay alive in the channel until their transfer
    completes. recv(specs) allocates the results on this communicator's device and makes the
    current stream wait for the transfer (accelerator.consume: on CUDA the host does not
    wait); recv_into(out) fills given arrays (torch or CuPy) the same way. A message is a
    tuple of 1..16 arrays (dpsgs.comm.protocol), all produced on one stream.
    """

    def __init__(self, comm: Any, peer: int, tag: int, is_sender: bool, name: str = "") -> None:
        from dpsgs import _C

        self.comm = comm
        self.accel = accelerator_of(comm)
        self._ch = _C.NcclChannel(comm, peer, tag, is_sender, name)

    def _where(self, op: str, seq: int) -> str:
        return f"rank {self.comm.rank}: channel {self.name!r} {op} #{seq}"

    def _describe(self, x: Any) -> tuple:
        return self.accel.describe(x) if _is_torch(x) else describe(x)

    def send(self, message: Sequence[Any]) -> Any:
        msg = _as_arrays(message, self._where("send", self.sent))
        return self._ch.send([self._describe(x) for x in msg], msg)

    def recv_into(self, out: Sequence[Any]) -> tuple[Any, ...]:
        out = _as_arrays(out, self._where("recv", self.received))
        work = self._ch.recv_into([self._describe(x) for x in out], out)
        if _is_torch(out[0]):
            self.accel.consume(work)
        else:
            work.wait_stream(_current_stream(out[0]))
        return out

    def recv(self, specs: Sequence[Any]) -> tuple[Any, ...]:
        from dpsgs.comm.message import as_specs

        specs = as_specs(specs, self._where("recv", self.received))
        return self.recv_into(tuple(self.accel.empty(tuple(shape), dt) for dt, shape in specs))


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

        self.accel = accelerator_of(comm)
        self._r = _C.NcclReducer(comm)

    def allreduce(self, x: Any, average: bool = True) -> Any:
        return self._r.allreduce(self.accel.describe(x) if _is_torch(x) else describe(x), x, average)


class NcclTransport:
    """One rank's transport over NCCL, for device memory (dpsgs.comm.protocol): channels over
    `world` (an NcclCommunicator of the grid), the bucketed all-reduce (ncclAvg) over `stage`
    (this rank's stage group, from ncclCommSplit)."""

    def __init__(self, world: Any, stage: Any, *, bucket_cap_mb: float = 25.0,
                 first_bucket_mb: float = 1.0) -> None:
        self.world, self.stage = world, stage
        self.accel = accelerator_of(world)
        self.device = self.accel.device
        self.bucket_cap_mb, self.first_bucket_mb = bucket_cap_mb, first_bucket_mb
        self._reducer = TensorReducer(stage)

    def channel(self, peer: int, tag: int, sending: bool, name: str) -> TensorChannel:
        return TensorChannel(self.world, peer, tag, sending, name)

    def allreduce(self, flat: Any) -> Any:
        return self._reducer.allreduce(flat)

    def reducer(self, params: Any, buffers: int = 1) -> Any:
        from dpsgs.comm.gradient_reducer import GradientReducer

        # the optimizer's stream waits for each bucket, not the host (accelerator.consume)
        return GradientReducer(params, self.allreduce, bucket_cap_mb=self.bucket_cap_mb,
                               first_bucket_mb=self.first_bucket_mb, buffers=buffers,
                               consume=self.accel.consume)

    def connect(self) -> None:
        """Collective: warm up every channel made so far and both communicators."""
        self.world.connect()
        self.stage.connect()

    def close(self) -> None:
        """Collective: finalize and destroy the NCCL communicators (bounded)."""
        self.stage.close()
        self.world.close()
