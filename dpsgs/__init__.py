"""dpsgs: data-parallel, fully decoupled backpropagation with stale gradients over MPI/NCCL."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["__version__", "build_info"]

__version__ = "0.1.0"

# Heavy submodules (torch-dependent ones in particular) load on first attribute access, so
# `import dpsgs` and the comm core work without torch.
_LAZY = {"comm", "pipeline", "reliability", "job", "planner", "bench", "config", "cli"}


def build_info() -> dict[str, Any]:
    """MPI library and version, whether the NCCL backend is compiled in, NCCL/CUDA versions."""
    from dpsgs import _C

    return dict(_C.build_info())


def __getattr__(name: str) -> Any:
    if name in _LAZY or name == "_C":
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'dpsgs' has no attribute {name!r}")
