"""Reducer under real ranks: averages equal a NumPy reference on every rank, dtype and algorithm."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launcher import run_ranks  # noqa: E402

pytest.importorskip("dpsgs._C", reason="dpsgs._C not built")


@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
def test_allreduce_matches_numpy_reference(nprocs: int) -> None:
    # Sizes: zero, tiny (fewer elements than ranks), odd, primes spanning many ring chunks.
    sizes = "0,1,2,3,7,1001,65537" if nprocs == 4 else "0,1,2,3,7,1001,4099,65537,300007"
    run = run_ranks(nprocs, "reducer_sums_ranks.py", sizes, timeout=90)
    assert f"checked on {nprocs} ranks: PASS" in run.stdout, run.tail()
