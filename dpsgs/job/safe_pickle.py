"""Read a data file in Python's pickle format without letting it run code.

`pickle.load` calls any function a file names (`os.system`, `builtins.eval`, ...): a crafted
`data_batch_1` in a shared data folder would run on every rank that reads it. The CIFAR-10
files hold only dicts, lists, bytes, strings, numbers and NumPy arrays; the unpickler here
resolves only the few globals those need (NumPy's array and dtype constructors, and
`_codecs.encode`, which protocol 2 uses for bytes) and refuses every other one with
`UnsafePickle`, before anything is called.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ALLOWED", "UnsafePickle", "load_restricted"]


def _numpy(module: str, name: str) -> Any:
    """numpy._core.<module>.<name> (NumPy 2), else numpy.core.<module>.<name> (NumPy 1)."""
    import importlib

    try:
        return getattr(importlib.import_module(f"numpy._core.{module}"), name)
    except ImportError:             # pragma: no cover - NumPy 1.x
        return getattr(importlib.import_module(f"numpy.core.{module}"), name)


def _codecs_encode() -> Any:
    import _codecs

    return _codecs.encode


# (module, name) -> the object; a file's globals are looked up here, never imported.
ALLOWED: dict[tuple[str, str], Any] = {
    # an array: written by NumPy 1 (numpy.core) or 2 (numpy._core); _frombuffer: protocol 5
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _numpy("multiarray", "_reconstruct")
       for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _numpy("numeric", "_frombuffer")
       for core in ("core", "_core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs_encode(),                       # bytes in protocol 2
}


class UnsafePickle(pickle.UnpicklingError):
    """The file names a global outside ALLOWED (code, or a type the format never holds)."""


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickle(f"it refers to {module}.{name}, which a data file never holds "
                               "(refused without running it)") from None


def load_restricted(path: str | Path, encoding: str = "bytes") -> Any:
    """The object pickled in `path`, built from dicts, lists, tuples, bytes, strings, numbers
    and NumPy arrays only; UnsafePickle for any other global, other pickle errors as
    pickle raises them. `encoding` as pickle.load's (CIFAR-10's Python 2 files: "bytes")."""
    with open(path, "rb") as f:
        return _Restricted(f, encoding=encoding).load()
