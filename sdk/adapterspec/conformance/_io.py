"""A minimal safetensors reader/writer for the corpus: raw bytes per tensor, and NumPy arrays (BF16 included).

The conformance runner compares round-tripped tensors byte for byte and reads BF16 without extra
packages, so it parses the format itself: 8-byte little-endian header length, JSON header, data.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RawTensor", "read_arrays", "read_raw", "to_float64", "write_arrays"]

_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v).str: k for k, v in _NUMPY.items()}


@dataclass(frozen=True)
class RawTensor:
    """One tensor as stored: safetensors dtype name, shape, and its bytes (little-endian, row-major)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def to_numpy(self) -> np.ndarray:
        """The tensor as a NumPy array; BF16 becomes float32 (exactly: BF16 is the top half of a float32)."""
        if self.dtype == "BF16":
            bits = np.frombuffer(self.data, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(self.shape)
        return np.frombuffer(self.data, dtype=np.dtype(_NUMPY[self.dtype]).newbyteorder("<")).reshape(self.shape).copy()


def read_raw(path: str | Path) -> tuple[dict[str, RawTensor], dict[str, str]]:
    """Every tensor of a safetensors file, raw, and the file's metadata.

    :raises ValueError: the file is not a well-formed safetensors file.
    """
    blob = Path(path).read_bytes()
    if len(blob) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise ValueError(f"{path}: header length {n} runs past the end of the file")
    header = json.loads(blob[8 : 8 + n])
    data = blob[8 + n :]
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for key, entry in header.items():
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end <= len(data):
            raise ValueError(f"{path}: tensor {key!r} data runs past the end of the file")
        tensors[key] = RawTensor(entry["dtype"], tuple(entry["shape"]), bytes(data[begin:end]))
    return tensors, metadata


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a NumPy array (BF16 as float32)."""
    tensors, _ = read_raw(path)
    return {k: t.to_numpy() for k, t in tensors.items()}


def to_float64(value: Any) -> np.ndarray:
    """A NumPy array, torch/TensorFlow/JAX tensor (any float dtype, any device), or nested list, as float64."""
    if hasattr(value, "detach"):  # torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    elif hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # TensorFlow, Keras
        value = value.numpy()
    return np.asarray(value, dtype=np.float64)


def write_arrays(path: str | Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write NumPy arrays as a safetensors file (no BF16: pass those through a framework)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    chunks, offset = [], 0
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        a = a.astype(a.dtype.newbyteorder("<"))
        raw = a.tobytes()
        header[key] = {"dtype": _NAMES[a.dtype.str], "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))
