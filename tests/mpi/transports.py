"""Which transports the trainer tests run: the C++ core when it is built, and plain mpi4py.

The core is what users run, so it gets every case; the mpi4py transport (no C++ at all) runs
one representative case, so a failure there points at the algorithm, not the core."""

from __future__ import annotations

import importlib.util

__all__ = ["HAVE_CORE", "TRANSPORTS", "cases", "each_transport"]

try:
    HAVE_CORE = importlib.util.find_spec("dpsgs._C") is not None
except ImportError:
    HAVE_CORE = False

TRANSPORTS = (["core"] if HAVE_CORE else []) + ["mpi4py"]


def cases(grids: list, representative: object) -> list:
    """(grid, transport) pairs: every grid on the core (mpi4py when the core is not built),
    plus mpi4py on `representative`."""
    import pytest

    main = "core" if HAVE_CORE else "mpi4py"
    pairs = [(g, main) for g in grids] + ([(representative, "mpi4py")] if HAVE_CORE else [])
    return [pytest.param(g, t, id=f"K{g[0]}N{g[1]}-{t}") for g, t in pairs]


def each_transport() -> list:
    """TRANSPORTS as test parameters: mpi4py is `slow` where the core is built (the
    representative case of `cases` runs it in CI; each launch costs seconds of CI time)."""
    import pytest

    return [pytest.param(t, marks=pytest.mark.slow) if t == "mpi4py" and HAVE_CORE else t
            for t in TRANSPORTS]
