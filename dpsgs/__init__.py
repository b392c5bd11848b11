"""dpsgs: data-parallel, fully decoupled backpropagation with stale gradients over MPI/NCCL.

    import dpsgs
    config = dpsgs.TrainConfig(stages=2, replicas=2, epochs=10)
    summary = dpsgs.train(config, comm=sub_comm)     # under mpirun, on any mpi4py communicator
    summary = dpsgs.simulate(config)                 # the same schedule in one process, no MPI

The layers (docs/architecture.md): dpsgs.comm (transport) < dpsgs.pipeline (algorithm) <
dpsgs.reliability < dpsgs.job (training job) < dpsgs.planner < dpsgs.bench.
"""

from __future__ import annotations

import importlib
from typing import Any

from dpsgs.config import TrainConfig

__all__ = ["TrainConfig", "__version__", "build_info", "simulate", "train"]

__version__ = "0.1.0"

# Sub-packages load on first attribute access, so `import dpsgs` stays light (no torch, no MPI).
_LAZY = {"comm", "pipeline", "reliability", "job", "planner", "bench", "config", "cli", "_C"}


def train(config: TrainConfig, comm: Any = None, *, model: Any = None, data: Any = None,
          transport: Any = None) -> dict[str, Any]:
    """Train per `config` on `comm` (any mpi4py communicator of exactly K*N ranks; default
    COMM_WORLD) and return the summary dict on every rank.

    model: any nn.Module built identically on every rank (default: config.model); with
    K > 1 its forward is traced and cut into stages (docs/algorithm.md: what is refused);
    data: (train, test), each a pair of tensors (x, y), a TensorDataset, a map-style torch
    Dataset of (input, label) or a dpsgs.job.data.Dataset (default: config.dataset; labels
    are integer class ids; inputs are cast to config.dtype as they are fed; anything else is
    refused in one line: dpsgs.job.user_data);
    transport: "core" (the C++ core), "mpi4py" (plain-MPI baseline), "torch"
    (torch.distributed over config.torch_backend) or a dpsgs.comm.protocol.Transport;
    default config.transport. dpsgs never initialises or finalises MPI. A wrong world
    size raises ValueError on every rank; any other failure is reported with the rank's
    (replica, stage) and aborts the job, so no rank is left waiting."""
    from dpsgs.job.trainer import train as _train

    return _train(config, comm, model=model, data=data, transport=transport)


def simulate(config: TrainConfig, *, model: Any = None, data: Any = None) -> dict[str, Any]:
    """Train per `config` on K x N virtual ranks in this process (one thread each, the same
    step executor as `train`, no MPI); the summary dict."""
    from dpsgs.job.simulate import simulate as _simulate

    return _simulate(config, model, data)


def build_info() -> dict[str, Any]:
    """MPI library and version, whether the NCCL backend is compiled in, NCCL/CUDA versions."""
    from dpsgs import _C

    return dict(_C.build_info())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        if name == "_C":
            # libmpi first, as mpi4py finds it: the extension then binds to that very library
            importlib.import_module("mpi4py.MPI")
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'dpsgs' has no attribute {name!r}")
