"""4 ranks on the simulator (K = 2 stages x N = 2 replicas, the trainer's layout): connect()
warms up the all-reduce only on the communicator a reducer was made on (the stage group),
channel communicators only their one transfer, and dpsgs leaves NCCL_RUNTIME_CONNECT alone
(NCCL's lazy connect: an eager one made every communicator connect every collective
algorithm at init, the 2-rank channel ones too).

    mpirun -n 4 python -m mpi4py tests/gpu/ranks/nccl_connect_ranks.py
"""

from __future__ import annotations

import os
import sys

from mpi4py import MPI

from dpsgs import _C
from dpsgs.comm import nccl


def main() -> int:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    world = nccl.init(comm, timeout=60.0)
    stage, _pipe = nccl.split_grid(world, stages=2)
    transport = nccl.NcclTransport(world, stage)        # makes the stage group's reducer
    k = rank % 2
    channels = []
    if k == 0:
        channels += [transport.channel(rank + 1, 1, True, "act"), transport.channel(rank + 1, 2, False, "grad")]
    else:
        channels += [transport.channel(rank - 1, 1, False, "act"), transport.channel(rank - 1, 2, True, "grad")]
    transport.connect()
    calls = _C.sim.submitted()
    problems = []
    if "NCCL_RUNTIME_CONNECT" in os.environ:
        problems.append(f"NCCL_RUNTIME_CONNECT={os.environ['NCCL_RUNTIME_CONNECT']} is set")
    for name, kinds in sorted(calls.items()):
        reduces = kinds.get("ncclAllReduce", 0)
        if name == "dpsgs-4ranks" and reduces:          # the world: channels only
            problems.append(f"{name}: {reduces} all-reduces at connect (no reducer on it)")
        if name.startswith("dpsgs-chan-") and (reduces or sum(kinds.values()) != 1):
            problems.append(f"{name}: {dict(kinds)} at connect (one transfer expected)")
    stage_calls = calls.get(f"dpsgs-4ranks/{k}", {})
    if stage_calls.get("ncclAllReduce", 0) != 6:
        problems.append(f"stage group: {dict(stage_calls)} at connect (6 warm-up all-reduces expected)")
    for p in problems:
        print(f"rank {rank}: {p}", flush=True)
    ok = comm.allreduce(not problems, op=MPI.LAND)
    transport.close()
    print(f"rank {rank}: connect warm-ups {'OK' if ok else 'FAIL'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
