"""Check 14 of SPEC.md section 10: every floating-point tensor is finite (no NaN, no infinity).

A value is not finite exactly when all bits of its exponent field are set, so the check reads the
stored bits as unsigned integers -- no float conversion, no ``ml_dtypes`` for BF16, and the file is
memory-mapped and scanned in bounded chunks (validating a large adapter does not load it into memory).

>>> import numpy as np
>>> nonfinite_arrays({"a": np.array([1.0, np.nan], np.float32), "b": np.zeros(2, np.float16)})
['a']
"""

from __future__ import annotations

import contextlib
import json
import mmap
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["nonfinite_arrays", "nonfinite_keys"]

#: safetensors float dtype -> (unsigned integer of the same width, exponent mask).
_EXPONENT: dict[str, tuple[np.dtype[Any], int]] = {
    "F16": (np.dtype("<u2"), 0x7C00),
    "BF16": (np.dtype("<u2"), 0x7F80),
    "F32": (np.dtype("<u4"), 0x7F80_0000),
    "F64": (np.dtype("<u8"), 0x7FF0_0000_0000_0000),
}
_CHUNK = 1 << 22  # elements scanned at a time


def nonfinite_keys(path: str | Path, file: BinaryIO | None = None) -> list[str]:
    """The keys of the floating-point tensors of a safetensors file that hold NaN or an infinity.

    Call it on a file :func:`adapterspec._safetensors.read_header` has accepted (offsets in bounds).

    :param file: the file already open (left open), instead of ``path``.
    """
    bad: list[str] = []
    with contextlib.nullcontext(file) if file is not None else open(path, "rb") as fh:
        if fh.seek(0, 2) == 0:
            return bad
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            (n,) = struct.unpack("<Q", mm[:8])
            header = json.loads(mm[8 : 8 + n])
            for key in sorted(k for k in header if k != "__metadata__"):
                kind = _EXPONENT.get(header[key]["dtype"])
                begin, end = header[key]["data_offsets"]
                if kind is not None and _any_nonfinite(mm, 8 + n + begin, 8 + n + end, *kind):
                    bad.append(key)
    return bad


def _any_nonfinite(buffer: mmap.mmap, begin: int, end: int, dtype: np.dtype, mask: int) -> bool:
    count = (end - begin) // dtype.itemsize
    for start in range(0, count, _CHUNK):
        view = np.frombuffer(buffer, dtype=dtype, count=min(_CHUNK, count - start), offset=begin + start * dtype.itemsize)
        found = bool(np.any((view & mask) == mask))
        del view  # the map cannot close while a view of it exists
        if found:
            return True
    return False


def nonfinite_arrays(arrays: Mapping[str, Any]) -> list[str]:
    """The keys of the floating-point NumPy arrays in ``arrays`` that hold NaN or an infinity."""
    return sorted(k for k, v in arrays.items()
                  if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all())
