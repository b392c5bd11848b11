"""What an NCCL averaging all-reduce guarantees, checked on every rank of a group.

Rank j of m contributes the pattern with salt 2j, so the exact mean is the pattern with salt
m - 1 (computed here in float64). NCCL's ncclAvg multiplies every contribution by 1/m and
sums for floating types (integers: sum, then divide). So:
- every rank of the group holds identical bits (one rank reduces each chunk and the result
  is broadcast; compared through a digest gathered over MPI);
- integers are exact;
- floats are exact when m is a power of two (1/m and every product are exact, and the sums
  of these small integers are exact);
- otherwise each element lies within (m + 1) * u * max_j |x_j| of the exact mean, u the unit
  roundoff of the dtype (one rounding of 1/m, one per product, m - 1 per sum).
"""

from __future__ import annotations

import hashlib

import numpy as np
from mpi4py import MPI

__all__ = ["UNIT_ROUNDOFF", "check_mean"]

UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -24,
                 "float64": 2.0 ** -53}


def check_mean(arr, x, dtype: str, n: int, mpi_group, label: str) -> list[str]:
    """Problems with `x`, the all-reduced mean of this rank's pattern (empty when none).
    Collective over `mpi_group` (the MPI twin of the NCCL group, ranks in the same order)."""
    m, j = mpi_group.Get_size(), mpi_group.Get_rank()
    problems = []
    digests = mpi_group.allgather(hashlib.sha256(arr.raw(x)).hexdigest())
    if len(set(digests)) != 1:
        problems.append(f"{label} rank {j}/{m}: {dtype}[{n}] bits differ between ranks")
    got = arr.host(x).astype(np.float64).reshape(-1)
    base = np.arange(n, dtype=np.float64) % 61
    exact = base + (m - 1)
    if dtype not in UNIT_ROUNDOFF or m & (m - 1) == 0:
        if not np.array_equal(got, exact):
            problems.append(f"{label} rank {j}/{m}: {dtype}[{n}] mean differs "
                            f"(max error {np.abs(got - exact).max() if n else 0})")
        return problems
    bound = (m + 1) * UNIT_ROUNDOFF[dtype] * (base + 2 * (m - 1))
    err = np.abs(got - exact)
    if np.any(err > bound):
        i = int(np.argmax(err - bound))
        problems.append(f"{label} rank {j}/{m}: {dtype}[{n}] element {i} = {got[i]} is {err[i]:.3g} "
                        f"from the exact mean {exact[i]} (bound {bound[i]:.3g})")
    return problems


def all_agree(comm, ok: bool) -> bool:
    return bool(comm.allreduce(ok, op=MPI.LAND))
