"""Loaded by every process the test launchers start (this folder is on their PYTHONPATH, and
Python imports `sitecustomize` at start-up).

0. stdout and stderr write whole lines: each line reaches the pipe to mpirun in one write
   (PYTHONUNBUFFERED, which CI sets, makes print() write the text and the newline apart,
   and two ranks printing at once merged their lines in mpirun's output). Done first, so
   the fork server's children, which inherit its streams, write lines whole too.
   `python -m dpsgs` makes its own streams line-buffered (dpsgs/__main__.py).
1. An MPI rank hands itself to the suite's fork server, if one runs, and, once the server
   has forked it, never returns here (tests/mpi/forkserver.py): it starts warm, without
   importing torch again; otherwise it goes on here and starts cold.
2. At exit, after every atexit handler registered later (mpi4py's MPI_Finalize among them),
   freeze the garbage collector, so the interpreter's last collections do not walk torch's
   whole module graph — over a second per rank, in every launch of the suite.
   `python -m dpsgs` does the same itself (dpsgs/__main__.py)."""

import atexit
import gc
import sys

import forkserver_client

for _stream in (sys.stdout, sys.stderr):
    if _stream is not None:
        _stream.reconfigure(line_buffering=True, write_through=False)
forkserver_client.hand_over()
atexit.register(gc.freeze)
