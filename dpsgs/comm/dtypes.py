"""The one dtype table: the wire codes of csrc/buffer.h, read from dpsgs._C, by torch dtype."""

from __future__ import annotations

from typing import Any

from dpsgs import _C

__all__ = ["WIRE_CODES", "code_of", "name_of", "torch_dtype_of_code"]

# name -> stable code carried in channel headers (docs/api.md); defined once, in C++.
WIRE_CODES: dict[str, int] = dict(_C.DTYPE_CODES)


def name_of(dtype: Any) -> str:
    """'float32' for torch.float32, numpy.float32 or the string itself."""
    return str(dtype).removeprefix("torch.")


def code_of(dtype: Any) -> int:
    """The wire code of a dtype (torch, NumPy or name); ValueError for unsupported ones."""
    try:
        return WIRE_CODES[name_of(dtype)]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not supported by dpsgs channels/reducers; supported: "
                         f"{', '.join(WIRE_CODES)}") from None


def torch_dtype_of_code(code: int) -> Any:
    import torch

    names = {c: n for n, c in WIRE_CODES.items()}
    return getattr(torch, names[code])
