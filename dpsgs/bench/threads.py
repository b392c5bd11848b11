"""Benchmark compute on one thread per rank: thread-count variables and the loaded BLAS's pool."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

__all__ = ["THREAD_VARS", "blas_threads", "compute_threads", "pin_compute_threads",
           "threads_line"]

# What OpenMP, OpenBLAS and MKL read when they start: unset, each sizes its pool to every
# core of the machine (16 threads per rank on the 16-core GPU host, all ranks together
# many times the cores).
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# Per BLAS library (a substring of its file name): its variable and the run-time getter and
# setter names it may export (NumPy's wheels bundle OpenBLAS with a scipy_ prefix, 64-bit ints).
_BLAS = {
    "openblas": ("OPENBLAS_NUM_THREADS",
                 ("openblas_get_num_threads", "openblas_get_num_threads64_",
                  "scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads"),
                 ("openblas_set_num_threads", "openblas_set_num_threads64_",
                  "scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads")),
    "mkl_rt": ("MKL_NUM_THREADS", ("MKL_Get_Max_Threads",), ("MKL_Set_Num_Threads",)),
}


def _loaded_blas() -> list[tuple[str, ctypes.CDLL]]:
    """(kind, library) of every BLAS loaded in this process, from /proc/self/maps (none
    where that file does not exist)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths = sorted({ln.split()[-1] for ln in lines if ln.split() and ln.split()[-1][:1] == "/"})
    out = []
    for path in paths:
        kind = next((k for k in _BLAS if k in Path(path).name.lower()), None)
        if kind is None:
            continue
        try:
            out.append((kind, ctypes.CDLL(path)))   # already loaded: the same handle
        except OSError:
            continue
    return out


def _function(lib: ctypes.CDLL, names: tuple[str, ...]) -> Callable[..., Any] | None:
    return next((getattr(lib, n) for n in names if hasattr(lib, n)), None)


def blas_threads() -> int | None:
    """Threads in the loaded BLAS's pool, asked of the library itself (the largest if
    several are loaded); None when no BLAS with a thread query is loaded."""
    counts = [int(fn()) for kind, lib in _loaded_blas()
              if (fn := _function(lib, _BLAS[kind][1])) is not None]
    return max(counts) if counts else None


def _positive(text: str, default: int) -> int:
    try:
        return max(1, int(text))
    except ValueError:
        return default


def pin_compute_threads(env: MutableMapping[str, str] | None = None,
                        threads: int = 1) -> dict[str, str]:
    """One thread per rank for the benchmark's compute unless the user chose: each
    THREAD_VARS variable that is unset or empty is set to `threads`, so libraries loaded
    later start with that pool. With the real environment (env None), a BLAS loaded before
    this call (NumPy imported already) is set at run time to its variable's value, and
    torch, if imported, gets torch.set_num_threads(OMP_NUM_THREADS). Returns {variable:
    "bench" | "user"}: who set each."""
    real = env is None
    env = os.environ if env is None else env
    who: dict[str, str] = {}
    for var in THREAD_VARS:
        if env.get(var, "").strip():
            who[var] = "user"
        else:
            env[var] = str(threads)
            who[var] = "bench"
    if real:
        for kind, lib in _loaded_blas():
            var, _, setters = _BLAS[kind]
            fn = _function(lib, setters)
            if fn is not None:
                fn(_positive(env[var], threads))
        torch = sys.modules.get("torch")
        if torch is not None:    # torch read OMP_NUM_THREADS when it was imported
            torch.set_num_threads(_positive(env["OMP_NUM_THREADS"], threads))
    return who


def compute_threads(who: dict[str, str] | None = None) -> dict[str, Any]:
    """What the compute runs under on this rank: the variables and who set them, the BLAS
    pool (asked of the library), torch's intra-op threads where torch is loaded."""
    torch = sys.modules.get("torch")
    return {"env": {v: os.environ.get(v) for v in THREAD_VARS}, "set_by": dict(who or {}),
            "blas": blas_threads(),
            "torch": torch.get_num_threads() if torch is not None else None}


def threads_line(per_rank: list[dict[str, Any]]) -> str:
    """The header line on the overlap compute's threads (all ranks; each distinct value)."""
    def values(get: Callable[[dict[str, Any]], Any]) -> str:
        return "/".join(sorted({str(get(r)) for r in per_rank}))

    env = ", ".join(f"{v}={values(lambda r, v=v: r['env'][v])} "
                    f"({values(lambda r, v=v: r['set_by'].get(v, '?'))})" for v in THREAD_VARS)
    torch = values(lambda r: r["torch"])
    return (f"# overlap compute threads per rank: NumPy ufunc on the calling thread (1), BLAS "
            f"pool {values(lambda r: r['blas'])}" +
            (f", torch {torch}" if torch != "None" else "") + f"; {env}")
