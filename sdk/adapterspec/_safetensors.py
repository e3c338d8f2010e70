"""safetensors plumbing: header reading, the spec's sha256, serialisation from any framework.

safetensors itself validates files (bounded header, offsets in range, no overlap) -- every read goes
through :func:`safetensors.safe_open` first. This module adds what the library has no call for: the
spec's layout-independent checksum (SPEC.md section 9) and adding it to the metadata of a file
safetensors serialised, which needs the header's data offsets.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from .checks import TensorInfo
from .errors import FileFormatError, UnsupportedError

__all__ = ["load_numpy", "read_header", "save_file", "sha256_of_blob", "sha256_of_file"]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Keys with shape and dtype, and the metadata, of a safetensors file -- no tensor data is read.

    :raises FileFormatError: not a valid safetensors file (truncated, corrupt header, bad offsets).
    """
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            infos = {}
            for key in f.keys():
                piece = f.get_slice(key)
                infos[key] = TensorInfo(tuple(piece.get_shape()), piece.get_dtype())
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(f"not a valid safetensors file: {exc}", path=path,
                              hint="the file is truncated or corrupt; download or save it again") from None
    return infos, metadata


def _digest(data: memoryview | bytes, header: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for key in sorted((k for k in header if k != "__metadata__"), key=lambda k: k.encode("utf-8")):
        begin, end = header[key]["data_offsets"]
        h.update(data[begin:end])
    return h.hexdigest()


def _split(blob: memoryview) -> tuple[dict[str, Any], memoryview]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(bytes(blob[8 : 8 + n])), blob[8 + n :]


def sha256_of_blob(blob: bytes | memoryview) -> str:
    """The spec's checksum of serialised safetensors bytes: sha256 over each tensor's bytes in key order."""
    header, data = _split(memoryview(blob))
    return _digest(data, header)


def sha256_of_file(path: Path) -> str:
    """The spec's checksum of a safetensors file (call :func:`read_header` first: it validates the file)."""
    with open(path, "rb") as fh:
        if fh.seek(0, 2) == 0:
            return hashlib.sha256().hexdigest()
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return sha256_of_blob(mm)


def _framework_save_file(tensors: Mapping[str, Any]) -> Any:
    module = type(next(iter(tensors.values()))).__module__ if tensors else "numpy"
    if module.startswith("torch"):
        from safetensors.torch import save_file
    elif module.startswith(("tensorflow", "keras")):
        from safetensors.tensorflow import save_file
    elif module.startswith(("jax", "jaxlib")):
        from safetensors.flax import save_file
    else:
        from safetensors.numpy import save_file
    return save_file


def save_file(tensors: Mapping[str, Any], path: Path, metadata: Mapping[str, str]) -> str:
    """Write ``tensors`` (NumPy, torch, TensorFlow or JAX) to ``path`` with ``metadata`` and the spec's sha256.

    safetensors writes the file directly (no copy of the data in Python) with a fixed-width
    placeholder for the checksum; the digest is then computed from the written data and patched
    into the header in place -- same length, so no offset moves. The file is fsynced.

    :returns: the checksum.
    """
    from .spec import METADATA_SHA256

    placeholder = "0" * 64
    _framework_save_file(tensors)(dict(tensors), str(path), metadata={**metadata, METADATA_SHA256: placeholder})
    needle = json.dumps({METADATA_SHA256: placeholder}, separators=(",", ":"))[1:-1].encode()
    with open(path, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mm:
        digest = sha256_of_blob(mm)  # its views of the map are gone when it returns
        n = struct.unpack("<Q", mm[:8])[0]
        at = mm.find(needle, 8, 8 + n)
        if at < 0 or mm.find(needle, at + 1, 8 + n) >= 0:
            raise FileFormatError("could not place the checksum in the safetensors header", path=path,
                                  hint="report this: the header layout was unexpected")
        end = at + len(needle) - 1  # the closing quote
        mm[end - 64 : end] = digest.encode("ascii")
        mm.flush()
        os.fsync(fh.fileno())
    return digest


def load_numpy(path: Path, keys: list[str] | None = None) -> dict[str, Any]:
    """Tensors of a safetensors file as NumPy arrays; BF16 as ``ml_dtypes.bfloat16`` (NumPy has none)."""
    infos, _ = read_header(path)
    keys = list(infos) if keys is None else keys
    if not any(infos[k].dtype == "BF16" for k in keys):
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in keys}
    try:
        import ml_dtypes
        import numpy as np
    except ImportError:
        raise UnsupportedError("BF16 tensors need the ml_dtypes package to be read as NumPy arrays",
                               path=path, hint="pip install ml_dtypes, or load with a framework backend") from None
    out = {}
    with open(path, "rb") as fh:
        blob = fh.read()
    header, data = _split(memoryview(blob))
    dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
    for k in keys:
        begin, end = header[k]["data_offsets"]
        dtype = dtypes.get(infos[k].dtype)
        if dtype is None:
            raise UnsupportedError(f"dtype {infos[k].dtype} cannot be read as NumPy here", key=k, path=path)
        out[k] = np.frombuffer(data[begin:end], dtype=dtype).reshape(infos[k].shape).copy()
    return out
