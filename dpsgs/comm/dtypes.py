"""The one dtype table: the stable wire codes carried in channel headers (docs/api.md).

The C++ enum (csrc/common/buffer.h) must agree: dpsgs._C compares the two when it is
imported and refuses to load if they differ.
"""

from __future__ import annotations

from typing import Any

__all__ = ["WIRE_CODES", "code_of", "name_of", "torch_dtype_of_code"]

WIRE_CODES: dict[str, int] = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3, "int32": 4,
                              "int64": 5, "uint8": 6, "int8": 7, "bool": 8}


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
