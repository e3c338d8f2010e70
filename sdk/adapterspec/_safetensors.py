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
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from .checks import TensorInfo
from .errors import FileFormatError, UnsupportedError

__all__ = ["read_header", "serialize", "sha256_of_file", "sha256_of_blob", "load_numpy"]


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
            view = memoryview(mm)
            try:
                return sha256_of_blob(view)
            finally:
                view.release()


def _framework_save(tensors: Mapping[str, Any]) -> Any:
    module = type(next(iter(tensors.values()))).__module__ if tensors else "numpy"
    if module.startswith("torch"):
        from safetensors.torch import save
    elif module.startswith(("tensorflow", "keras")):
        from safetensors.tensorflow import save
    elif module.startswith(("jax", "jaxlib")):
        from safetensors.flax import save
    else:
        from safetensors.numpy import save
    return save


def serialize(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> tuple[bytes, str]:
    """safetensors bytes of ``tensors`` (NumPy, torch, TensorFlow or JAX), with ``metadata`` and the checksum.

    :param metadata: string metadata; the spec's sha256 is added under ``adapterspec_sha256``.
    :returns: the file's bytes and the checksum.
    """
    from .spec import METADATA_SHA256

    blob = memoryview(_framework_save(tensors)(dict(tensors), metadata=dict(metadata)))
    header, data = _split(blob)
    digest = _digest(data, header)
    header["__metadata__"] = {**header.get("__metadata__", {}), METADATA_SHA256: digest}
    # Offsets are relative to the data section, so a new header leaves the data untouched.
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return b"".join((struct.pack("<Q", len(raw)), raw, data)), digest


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
