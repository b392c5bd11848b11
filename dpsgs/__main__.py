"""`python -m dpsgs ...`: see dpsgs.cli for the commands and their exact command lines."""

import gc
import sys

from dpsgs.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    # Each line reaches mpirun in one write, also under PYTHONUNBUFFERED (common in batch
    # scripts), where print() writes the text and its newline apart and two ranks' lines merge.
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.reconfigure(line_buffering=True, write_through=False)
    code = main()
    # The process ends now, its files closed and MPI finalized: the interpreter's last garbage
    # collections would walk torch's whole module graph for over a second on every rank.
    gc.freeze()
    sys.exit(code)
