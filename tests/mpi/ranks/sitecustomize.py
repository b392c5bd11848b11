"""Loaded by every process the test launchers start (this folder is on their PYTHONPATH, and
Python imports `sitecustomize` at start-up): at exit, after every atexit handler registered
later (mpi4py's MPI_Finalize among them), freeze the garbage collector, so the interpreter's
last collections do not walk torch's whole module graph — over a second per rank, in every
launch of the suite. `python -m dpsgs` does the same itself (dpsgs/__main__.py)."""

import atexit
import gc

atexit.register(gc.freeze)
