"""Rank program (2 ranks) for the fork server's test: print, as one JSON line per rank, what
a program sees of its process at start, then end as asked (argv[1]: "exit3", "raise",
"sigterm" or "ok"). Run cold and warm, the lines must agree where a cold start fixes them."""

from __future__ import annotations

import json
import os
import signal
import sys

warm_at_start = "torch" in sys.modules                  # imported before this line: forked
import numpy  # noqa: E402
import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

comm = MPI.COMM_WORLD
seen = {
    "rank": comm.Get_rank(), "warm": warm_at_start, "argv": sys.argv, "cwd": os.getcwd(),
    "path": sys.path, "name": __name__, "file": __file__,
    "env": {k: os.environ.get(k) for k in ("PROBE_VALUE", "OMP_NUM_THREADS", "PMI_RANK")},
    "stdin": sys.stdin.read() if comm.Get_rank() == 0 else None,     # hydra feeds rank 0 only
    "ignored": sorted(int(s) for s in signal.valid_signals()
                      if s not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(s) == signal.SIG_IGN),
    "sigint_raises": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
    "umask": os.umask(0o022),
    "hash": hash("dpsgs"), "torch_draw": torch.rand(1).item(), "numpy_draw": float(numpy.random.rand()),
    "threads": torch.get_num_threads(),
}
for turn in range(comm.Get_size()):                     # one at a time: whole lines
    if turn == comm.Get_rank():
        print(json.dumps(seen), flush=True)
    comm.Barrier()
how = sys.argv[1]
if how == "exit3" and comm.Get_rank() == 1:
    sys.exit(3)
if how == "raise" and comm.Get_rank() == 1:
    raise ValueError("probe: raised on rank 1")
if how == "sigterm":                                    # one write per line: lines never merge
    signal.signal(signal.SIGTERM, lambda *_: (os.write(1, f"rank {comm.Get_rank()}: SIGTERM\n".encode()),
                                              sys.exit(5)))
    os.write(1, f"rank {comm.Get_rank()}: waiting\n".encode())
    signal.pause()
