"""safetensors plumbing: header reading, one-read loading, the spec's sha256, writing from any framework.

safetensors itself validates files (bounded header, offsets in range, no overlap) -- every read goes
through :func:`safetensors.safe_open` first. This module adds what the library has no call for:
reading a whole file in one ``readinto`` with tensors as views of it (:func:`read_buffer`,
:func:`views`), and the spec's layout-independent checksum (SPEC.md section 9), computed while the file
is written (:func:`save_file`: for tensors in CPU memory it writes the format itself, because
safetensors' writer holds the GIL for the whole write; the tests read every file back with safetensors).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import mmap
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from safetensors import SafetensorError, safe_open

from ._background import in_background
from ._lfs import lfs_pointer_error
from .checks import TensorInfo
from .errors import FileFormatError, UnsupportedError

__all__ = ["DTYPE_BYTES", "Checksum", "Header", "check_unchanged", "dtype_name", "pinned_allocator", "read_buffer",
           "read_buffer_in_background", "read_header", "read_metadata_value", "save_file", "sha256_of_blob", "sha256_of_file", "start_checksum",
           "views"]

#: Bytes per element of each safetensors dtype the spec allows.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class Header:
    """What :func:`read_header` accepted: the tensors' shapes and dtypes, the metadata, and where each
    tensor's bytes are -- with the header's own bytes, so that a later read of the file can tell it is
    still that file by comparing them (:func:`read_buffer`)."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    raw: bytes = b""  # the file's first 8 + n bytes: length prefix and JSON header
    size: int = 0  # the file's size
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> [begin, end) in the file


def read_header(path: Path, file: BinaryIO | None = None) -> Header:
    """Keys with shape and dtype, the metadata and the data spans of a safetensors file -- no tensor data is read.

    safetensors validates the file (:func:`safetensors.safe_open`): a bounded, well-formed header, known
    dtypes, each tensor's span of its size, the spans contiguous and covering the data exactly. So
    the spans follow from the order of the tensors in the file and their sizes.

    :param file: the file already open (what ``path`` named then; left open), to read instead of ``path``.
        safetensors opens ``path`` to validate it, which must still name that file (same header).
    :raises FileFormatError: not a valid safetensors file (truncated, corrupt header, bad offsets), a name twice
        in the header (SPEC.md 11.2), or it changed while it was read.
    """
    try:
        with contextlib.nullcontext(file) if file is not None else open(path, "rb", buffering=0) as fh:
            raw = _header_bytes(fh)
            with safe_open(str(path), framework="numpy") as f:
                metadata = f.metadata() or {}
                infos, spans, at = {}, {}, len(raw)
                get_slice, width = f.get_slice, DTYPE_BYTES.get
                for key in f.offset_keys():
                    piece = get_slice(key)
                    shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
                    infos[key] = TensorInfo(shape, dtype)
                    end = at + math.prod(shape) * width(dtype, 0)
                    spans[key] = (at, end)
                    at = end
            size = os.fstat(fh.fileno()).st_size
            readable = all(info.dtype in DTYPE_BYTES for info in infos.values())  # else refused by check 13
            if _header_bytes(fh) != raw or (readable and at != size) or not _names(path, fh):
                raise ValueError("the file changed while its header was read")
    except (SafetensorError, OSError, ValueError) as exc:
        check_not_lfs_pointer(path, file)
        raise FileFormatError(f"not a valid safetensors file: {exc}", path=path,
                              hint="the file is truncated or corrupt; download or save it again") from None
    if not _counted_once(raw, len(infos), len(metadata)):
        _refuse_repeated_names(path, raw)
    return Header(infos, metadata, raw, size, spans)


def _counted_once(raw: bytes, tensors: int, members: int) -> bool:
    """Whether counting alone shows that no name repeats in the header ``raw``, of ``tensors`` distinct tensors and
    ``members`` distinct metadata members as safetensors read it (a parse costs ~4 ms per 1 000 tensors; this 0.2).

    Without a backslash in the header no string holds a quote or spells a name with escapes. safetensors has
    required every entry, a repeated one too, to have ``dtype``, ``shape`` and ``data_offsets``: so there are at
    least as many ``"data_offsets"`` strings as entries, and as many as distinct tensors means no tensor repeats.
    The header's strings are then 5 per entry (its name, 3 member names, the dtype) plus, with metadata, its name
    and 2 per member: a count that leaves no room for a metadata member named twice (any other string only adds).
    """
    text = raw[8:]
    if b"\\" in text or text.count(b'"data_offsets"') != tensors:
        return False
    strings = text.count(b'"') // 2
    return strings == 5 * tensors + 1 + 2 * members or (members == 0 and strings == 5 * tensors)


def _refuse_repeated_names(path: Path, raw: bytes) -> None:
    """SPEC.md 11.2: no tensor, and no ``__metadata__`` member, named twice in the header ``raw`` (which safetensors
    has accepted: it keeps the last of each silently, so a first entry pointing at other bytes went unseen).

    :raises FileFormatError: naming the file, and the tensor (``key``) or the metadata member.
    """
    top = json.loads(raw[8:], object_pairs_hook=lambda pairs: pairs)  # every object as its (name, value) pairs
    tensor = _first_repeated(name for name, _ in top)
    if tensor is not None:
        raise FileFormatError(f"the header declares tensor {tensor!r} twice (safetensors reads the last entry, "
                              "another reader may read the first)", key=tensor, path=path, hint=_ONCE)
    metadata = next((value for name, value in top if name == "__metadata__"), None)
    member = _first_repeated(name for name, _ in metadata) if isinstance(metadata, list) else None
    if member is not None:
        raise FileFormatError(f"the header's __metadata__ names {member!r} twice", path=path, hint=_ONCE)


def _first_repeated(names: Iterable[str]) -> str | None:
    """The first name that comes a second time, if any."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


_ONCE = "save the file again with a safetensors writer, which names each tensor and metadata key once"


def check_not_lfs_pointer(path: Path, file: BinaryIO | None = None, *, where: str | None = None,
                          hint: str | None = None, what: str = "tensors") -> None:
    """Refuse a git-LFS pointer file -- what a clone without git-lfs holds in place of a large file.

    :param where: the name the error gives the file (default: ``path``), e.g. its ``hf://`` address.
    :param what: what the file should hold ("tensors"; "config", "manifest" for the JSON files).
    :raises FileFormatError: it is one; the message gives the pointer's ``oid`` and ``size``.
    """
    try:
        with contextlib.nullcontext(file) if file is not None else open(path, "rb", buffering=0) as fh:
            head = os.pread(fh.fileno(), 1024, 0)
    except OSError:
        return
    error = lfs_pointer_error(head, where or path, what, hint=hint)
    if error is not None:
        raise error


def _names(path: Path, fh: Any) -> bool:
    """Whether ``path`` names the open file ``fh`` (which safetensors then read too, by that path)."""
    now, then = os.stat(path), os.fstat(fh.fileno())
    return (now.st_dev, now.st_ino) == (then.st_dev, then.st_ino)


def _header_bytes(fh: Any) -> bytes:
    """The first ``8 + n`` bytes of the open file: the length prefix and the JSON header (as much of it as
    there is: safetensors judges malformed files)."""
    prefix = os.pread(fh.fileno(), 8, 0)
    if len(prefix) < 8:
        return prefix
    n = min(int.from_bytes(prefix, "little"), _MAX_HEADER)
    return prefix + os.pread(fh.fileno(), n, 8)


_MAX_HEADER = 100_000_000  # safetensors' own bound


def read_metadata_value(path: Path, key: str) -> str | None:
    """The string ``key`` of the ``__metadata__`` of the safetensors file at ``path``, from its header alone; ``None``
    if it has none, or the file is not a regular file with a JSON header (nothing is validated: a read of the
    adapter reports what is wrong with it). Never blocks on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except (OSError, ValueError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        prefix = os.pread(fd, 8, 0)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else _MAX_HEADER + 1
        metadata = json.loads(os.pread(fd, n, 8)).get("__metadata__") if n <= _MAX_HEADER else None
    except (OSError, ValueError, AttributeError, RecursionError):  # not JSON, or JSON but not an object
        return None
    finally:
        os.close(fd)
    value = metadata.get(key) if isinstance(metadata, dict) else None
    return value if isinstance(value, str) else None


def check_unchanged(path: Path, header: Header, file: BinaryIO | None = None) -> None:
    """Check that the file at ``path`` (or ``file``, open) still starts with the header :func:`read_header` accepted.

    :raises ValueError: it does not.
    """
    with contextlib.nullcontext(file) if file is not None else open(path, "rb", buffering=0) as fh:
        if _header_bytes(fh) != header.raw:
            raise ValueError("the file changed since it was checked (its header differs)")


def read_buffer(path: Path, header: Header, file: BinaryIO | None = None, *,
                allocate: Callable[[int], Any] | None = None) -> tuple[Any, dict[str, tuple[int, int]]]:
    """The whole file in one NumPy ``uint8`` buffer (one read), and each tensor's byte span in it.

    Backends make their tensors as views of the buffer: one read of the file and no copy, where
    reading tensor by tensor copies each out of a memory map. The file must still be the one
    :func:`read_header` accepted: same size, same header bytes (then the same spans).

    :param file: the file open for reading (closed here), instead of ``path`` (which then names it in errors).
    :param allocate: gives the (writable, NumPy ``uint8``) buffer of a size, e.g. :func:`pinned_allocator`'s
        page-locked memory for a copy to a GPU; default (or when it gives ``None``) ``numpy.empty``.
    :raises FileFormatError: the file changed since it was checked.
    """
    file, buffer = _open_buffer(path, header, file, allocate)
    with file:
        _read_into(file, buffer, path)
    return _checked(buffer, header, path), header.spans


def read_buffer_in_background(path: Path, header: Header, file: BinaryIO | None = None, *,
                              allocate: Callable[[int], Any] | None = None,
                              ) -> Callable[[], tuple[Any, dict[str, tuple[int, int]]]]:
    """Start :func:`read_buffer` on a thread; the function returned waits for the read and gives its result.

    The thread's one call is the read (file opened and buffer allocated here), which releases the
    GIL, so the caller's Python work goes on meanwhile -- from a disk or from the page cache. (A thread
    that had more Python to run first would wait for the caller to let go of the GIL, up to a switch
    interval of 5 ms.) Errors of the read are raised by the function returned, as :func:`read_buffer`'s.

    :param file: as :func:`read_buffer`'s.
    :param allocate: as :func:`read_buffer`'s.
    :raises FileFormatError: the file changed size since it was checked (at once).
    """
    file, buffer = _open_buffer(path, header, file, allocate)
    started = threading.Event()

    def read() -> None:
        started.set()
        with file:
            _read_into(file, buffer, path)

    wait = in_background(read, name="read")
    started.wait()

    def result() -> tuple[Any, dict[str, tuple[int, int]]]:
        wait()
        return _checked(buffer, header, path), header.spans

    return result


def _open_buffer(path: Path, header: Header, file: BinaryIO | None = None,
                 allocate: Callable[[int], Any] | None = None) -> tuple[Any, Any]:
    """The open file (unbuffered; ``file`` if given) and an empty buffer of its size (which must be the size
    :func:`read_header` saw), from ``allocate`` if given."""
    try:
        if file is None:
            file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the caller, or here on failure
        else:
            file.seek(0)
        size = os.fstat(file.fileno()).st_size
        if size != header.size:
            raise ValueError(f"the file changed since it was checked (it is {size} bytes long, not {header.size})")
        if any(info.dtype not in DTYPE_BYTES for info in header.tensors.values()):
            raise ValueError(f"dtypes {sorted({i.dtype for i in header.tensors.values()} - set(DTYPE_BYTES))} "
                             "cannot be read (SPEC.md 7)")
        buffer = allocate(size) if allocate is not None else None
        return file, buffer if buffer is not None else _numpy_empty(size)
    except (OSError, ValueError) as exc:
        if file is not None:
            file.close()
        raise _unreadable(path, exc) from None
    except BaseException:  # from allocate
        if file is not None:
            file.close()
        raise


def _numpy_empty(size: int) -> Any:
    import numpy as np

    return np.empty(size, dtype=np.uint8)


def pinned_allocator(device: Any) -> Callable[[int], Any] | None:
    """For a CUDA ``device``: a function giving page-locked (pinned) host buffers, as NumPy ``uint8`` arrays,
    from torch's caching host allocator (so a buffer freed is reused, not pinned again); else ``None``.

    A copy to the GPU from pinned memory runs at the bus's speed (1.5 ms for 80 MB on an H200, 4.6 ms
    from ordinary memory), and a reused buffer has no page faults left to take while the file is read.

    >>> pinned_allocator("cpu") is None
    True
    """
    import torch

    try:
        if torch.device(device).type != "cuda" or not torch.cuda.is_available():
            return None
    except (RuntimeError, TypeError, ValueError):  # not a device: the backend's option check says so, typed
        return None

    def allocate(size: int) -> Any:
        try:
            return torch.empty(size, dtype=torch.uint8, pin_memory=True).numpy()  # the array keeps the tensor
        except RuntimeError:  # no page-locked memory left: ordinary memory holds the same bytes, copies slower
            return _numpy_empty(size)

    return allocate


def _read_into(file: Any, buffer: Any, path: Path) -> None:
    """Fill ``buffer`` from the open ``file``: a large file in parts read at once on several threads.

    A read from the page cache is a copy by the kernel, which also takes the page faults of a fresh
    buffer; one thread copies 2 GB in 0.5 s on a 2-core machine, two in 0.26 s (each read releases the
    GIL). Each part is read with ``os.preadv`` at its own offset (several reads where one is short: over
    2 GiB on Linux); where that does not exist (Windows), the file is read in one part. Every thread has
    ended when this returns, failed or not: none goes on writing into the buffer or reading the file.
    """
    view = memoryview(buffer)
    parts = _parts(len(view)) if hasattr(os, "preadv") else [(0, len(view))]
    try:
        if len(parts) == 1:
            _read_part(file, view, 0, len(view))
            return
        fd = file.fileno()
        waits = [in_background(functools.partial(_read_part, fd, view, begin, end), name="read-part")
                 for begin, end in parts[1:]]
        errors: list[Exception] = []
        try:
            _read_part(fd, view, *parts[0])
        except (OSError, ValueError) as exc:
            errors.append(exc)
        finally:
            for wait in waits:
                try:
                    wait()
                except (OSError, ValueError) as exc:
                    errors.append(exc)
        if errors:
            raise errors[0]
    except (OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None


#: The least a thread of :func:`_read_into` reads; smaller files are read by one thread.
_PART_BYTES = 64 << 20


def _parts(size: int) -> list[tuple[int, int]]:
    """``[begin, end)`` spans covering ``size`` bytes, one per reading thread: no more than the CPUs this
    process may use (8 at most), each at least :data:`_PART_BYTES` long.

    >>> _parts(10)
    [(0, 10)]
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    count = max(1, min(cpus, 8, size // _PART_BYTES))
    step = -(-size // count)
    return [(begin, min(size, begin + step)) for begin in range(0, size, step)] if size else [(0, 0)]


def _read_part(file: Any, view: memoryview, begin: int, end: int) -> None:
    """Fill ``view[begin:end]`` from the file's bytes at ``begin`` (``file``: an open file read from its
    position, or a descriptor read at ``begin`` with ``os.preadv``)."""
    done = begin
    while done < end:
        if isinstance(file, int):
            got = os.preadv(file, [view[done:end]], done)
        else:
            got = file.readinto(view[done:end])
        if not got:
            raise ValueError(f"the file ended after {done} of {len(view)} bytes (truncated since it was checked)")
        done += got


def _checked(buffer: Any, header: Header, path: Path) -> Any:
    """``buffer``, if it starts with the header bytes :func:`read_header` accepted."""
    if buffer[: len(header.raw)].tobytes() != header.raw:
        raise _unreadable(path, ValueError("the file changed since it was checked (its header differs)"))
    return buffer


def _unreadable(path: Path, exc: Exception) -> FileFormatError:
    return FileFormatError(f"cannot read tensors: {exc}", path=path,
                           hint="the file is corrupt or changed; download or save it again")


def _digest(data: memoryview | bytes, header: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for key in sorted((k for k in header if k != "__metadata__"), key=lambda k: k.encode("utf-8")):
        begin, end = header[key]["data_offsets"]
        h.update(data[begin:end])
    return h.hexdigest()


def _split(blob: memoryview) -> tuple[dict[str, Any], memoryview]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(bytes(blob[8 : 8 + n])), blob[8 + n :]


def sha256_of_blob(blob: bytes | memoryview | mmap.mmap) -> str:
    """The spec's checksum of serialised safetensors bytes: sha256 over each tensor's bytes in key order."""
    header, data = _split(memoryview(blob))
    return _digest(data, header)


def sha256_of_file(path: Path, file: BinaryIO | None = None) -> str:
    """The spec's checksum of a safetensors file (call :func:`read_header` first: it validates the file).

    :param file: the file already open (left open), instead of ``path``.
    """
    with contextlib.nullcontext(file) if file is not None else open(path, "rb") as fh:
        if fh.seek(0, 2) == 0:
            return hashlib.sha256().hexdigest()
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return sha256_of_blob(mm)


def _framework_save_file(tensors: Mapping[str, Any]) -> Callable[..., None]:
    module = type(next(iter(tensors.values()))).__module__ if tensors else "numpy"
    if module.startswith("torch"):
        import safetensors.torch

        return safetensors.torch.save_file
    if module.startswith(("tensorflow", "keras")):
        import safetensors.tensorflow

        return safetensors.tensorflow.save_file
    if module.startswith(("jax", "jaxlib")):
        import safetensors.flax

        return safetensors.flax.save_file
    import safetensors.numpy

    return safetensors.numpy.save_file


_DTYPE_NAMES: dict[Any, str] = {}  # a framework's dtype object -> its safetensors name, as they are met


def dtype_name(tensor: Any) -> str:
    """The safetensors name (``"F32"``, ``"BF16"``...) of a NumPy, torch, TensorFlow or JAX tensor's dtype;
    another dtype's own name, upper-cased (which the spec's dtype check then refuses)."""
    dtype = getattr(tensor, "dtype", "")
    try:
        return _DTYPE_NAMES[dtype]
    except (KeyError, TypeError):  # TypeError: an unhashable dtype
        pass
    name = str(dtype).rsplit(".", 1)[-1].replace("'>", "").lower()
    mapping = {"float64": "F64", "double": "F64", "float32": "F32", "float": "F32", "float16": "F16",
               "half": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
               "uint8": "U8", "bool": "BOOL"}
    found = mapping.get(name, name.upper())
    try:
        _DTYPE_NAMES[dtype] = found
    except TypeError:
        pass
    return found


def _byte_views(tensors: Mapping[str, Any]) -> dict[str, Any] | None:
    """Each tensor's bytes as a flat NumPy ``uint8`` view, keys in the spec's checksum order (sorted as
    UTF-8); ``None`` if that takes a copy (tensors not in CPU memory, or of another framework)."""
    import numpy as np

    out = {}
    for key in sorted(tensors, key=lambda k: k.encode("utf-8")):
        value = tensors[key]
        if type(value).__module__.startswith("torch") and value.is_cpu and value.is_contiguous():
            if value.requires_grad:
                value = value.detach()
            try:
                value = value.numpy()  # then NumPy's reshape and view, cheaper than torch's
            except TypeError:  # bfloat16 has no NumPy dtype: the bytes through torch
                import torch

                out[key] = value.reshape(-1).view(torch.uint8).numpy()
                continue
        if isinstance(value, np.ndarray) and value.flags.c_contiguous:
            out[key] = value.reshape(-1).view(np.uint8)
        else:
            return None
    return out


def _gathered_byte_views(tensors: Mapping[str, Any]) -> dict[str, Any] | None:
    """For torch tensors all on one device other than the CPU: their bytes gathered on the device, copied
    to (pinned) host memory in one transfer, and each tensor's bytes as a NumPy ``uint8`` view of that
    copy, in checksum order; ``None`` for other tensors.

    One transfer, where a copy per tensor pays a transfer's fixed cost (and a synchronisation) each.
    """
    first = next(iter(tensors.values()), None)
    if first is None or not type(first).__module__.startswith("torch"):
        return None
    import torch

    device = first.device
    if device.type in ("cpu", "meta") or not all(
            isinstance(v, torch.Tensor) and v.device == device for v in tensors.values()):
        return None
    return _gather(tensors, pinned_allocator(device) or _numpy_empty)


def _gather(tensors: Mapping[str, Any], allocate: Callable[[int], Any]) -> dict[str, Any]:
    """Each torch tensor's bytes as a NumPy ``uint8`` view of one host buffer from ``allocate``, filled by
    one copy of their bytes gathered (one ``cat``) where they are; in checksum order."""
    import torch

    keys = sorted(tensors, key=lambda k: k.encode("utf-8"))
    pieces = [tensors[k].detach().reshape(-1).view(torch.uint8) for k in keys]
    gathered = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    host = allocate(gathered.numel())
    torch.from_numpy(host).copy_(gathered)  # blocking: the bytes are there when it returns
    out, at = {}, 0
    for key, piece in zip(keys, pieces):
        out[key] = host[at : at + piece.numel()]
        at += piece.numel()
    return out


_PLACEHOLDER = "0" * 64


class Checksum(NamedTuple):
    """The spec's sha256 of some tensors, computing on a thread (:func:`start_checksum`)."""

    pieces: dict[str, Any]  # each tensor's bytes (a NumPy ``uint8`` view), in checksum order
    result: Callable[[], str]  # waits for the hash and gives its hex digest


def start_checksum(tensors: Mapping[str, Any]) -> Checksum | None:
    """Start hashing ``tensors`` on a thread now, for a :func:`save_file` of the same tensors to come; ``None``
    where :func:`save_file` could not write them itself (GPU, TensorFlow or JAX tensors).

    The sha256 of the data is the slowest part of a save (a single stream: ~1 GB/s on one core), so it should
    start as early as it can: while the caller still checks the adapter and stages the folder.
    """
    pieces = _byte_views(tensors)
    return None if pieces is None else _hashing(pieces)


def _hashing(pieces: dict[str, Any]) -> Checksum:
    """The sha256 of ``pieces`` (byte views in checksum order), started on a thread."""

    def sha256() -> str:
        h = hashlib.sha256()
        for piece in pieces.values():
            h.update(piece)  # releases the GIL (over 2 KiB)
        return h.hexdigest()

    return Checksum(pieces, in_background(sha256, name="sha256"))


def save_file(tensors: Mapping[str, Any], path: Path, metadata: Mapping[str, str], *, durable: bool = False,
              checksum: Checksum | None = None) -> str:
    """Write ``tensors`` (NumPy, torch, TensorFlow or JAX) to ``path`` with ``metadata`` and the spec's sha256.

    Tensors in CPU memory are written here, in safetensors' format (a little-endian ``u64`` header
    length, the JSON header padded with spaces to 8 bytes, then the tensors, largest dtype first so
    every tensor is aligned, and by key), while a second thread hashes them: ``os.write`` and
    ``hashlib`` both release the GIL, so on two cores the checksum costs no time. safetensors' own
    writer holds the GIL for the whole write, which left the hash to run after it. torch tensors on
    one GPU come to host memory first, in one transfer (:func:`_gathered_byte_views`). Other tensors
    (TensorFlow's, JAX's, torch's on several devices) are written by safetensors and hashed from the
    file afterwards.
    Either way the checksum goes into a fixed-width placeholder in the header (no offset moves), and
    with ``durable`` the file is fsynced.

    :param checksum: :func:`start_checksum` of these same ``tensors``, started earlier.
    :returns: the checksum.
    """
    from .spec import METADATA_SHA256

    if checksum is None:
        pieces = _byte_views(tensors)
        if pieces is None:
            pieces = _gathered_byte_views(tensors)
        if pieces is not None:
            checksum = _hashing(pieces)  # started after the Python work above, which would stall it
    meta = {**metadata, METADATA_SHA256: _PLACEHOLDER}
    if checksum is None:
        _framework_save_file(tensors)(dict(tensors), str(path), metadata=meta)
        return _place_checksum(path, sha256_of_file(path), durable=durable)
    pieces = checksum.pieces

    names = {key: dtype_name(value) for key, value in tensors.items()}
    order = sorted(pieces, key=lambda k: (-DTYPE_BYTES[names[k]], k.encode("utf-8")))
    header: dict[str, Any] = {"__metadata__": meta}
    at = 0
    for key in order:
        size = pieces[key].nbytes
        header[key] = {"dtype": names[key], "shape": list(tensors[key].shape), "data_offsets": [at, at + size]}
        at += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    # no O_TRUNC: ext4 flushes a file truncated to zero when it is closed (its "auto_da_alloc" heuristic for
    # rewrite-in-place), ~1 ms for 20 MB; an older, longer file is cut to length after the write instead
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
    try:
        _write_all(fd, struct.pack("<Q", len(text)) + text)
        for key in order:
            _write_all(fd, pieces[key])
        if os.fstat(fd).st_size > 8 + len(text) + at:
            os.ftruncate(fd, 8 + len(text) + at)
        value = checksum.result()
        needle = _needle()
        os.pwrite(fd, value.encode("ascii"), 8 + text.index(needle) + len(needle) - 65)  # before the closing '"'
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    return value


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]  # a write may be short (more than 2 GiB on Linux)


def _needle() -> bytes:
    """The placeholder entry as it appears in the JSON header (once: quotes inside other strings are escaped)."""
    from .spec import METADATA_SHA256

    return json.dumps({METADATA_SHA256: _PLACEHOLDER}, separators=(",", ":"))[1:-1].encode()


def _place_checksum(path: Path, value: str, *, durable: bool) -> str:
    """Put ``value`` into the checksum placeholder of the file's header (same length: nothing moves)."""
    needle = _needle()
    with open(path, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = fh.read(n)
        at = header.find(needle)
        if at < 0 or header.find(needle, at + 1) >= 0:
            raise FileFormatError("could not place the checksum in the safetensors header", path=path,
                                  hint="report this: the header layout was unexpected")
        os.pwrite(fh.fileno(), value.encode("ascii"), 8 + at + len(needle) - 65)  # before the closing quote
        if durable:
            os.fsync(fh.fileno())
    return value


def _to_device(data: Any, device: Any, path: Path | None) -> Any:
    """``data`` (a torch ``uint8`` tensor in host memory) copied to ``device`` in one transfer."""
    try:
        return data.to(device)  # blocking: the buffer may be freed, or a pinned one reused, right after
    except (RuntimeError, AssertionError, ValueError) as exc:  # AssertionError: torch built without CUDA
        raise UnsupportedError(f"cannot copy the tensors to device {str(device)!r}: {exc}", path=path,
                               hint="pass a device torch can use in this process") from None


@functools.lru_cache(maxsize=1024)
def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``, in elements."""
    return tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))


_TORCH_DTYPES: dict[str, Any] = {}  # filled on first use: this module imports no framework


def views(buffer: Any, spans: Mapping[str, tuple[int, int]], infos: Mapping[str, TensorInfo], framework: str, *,
          path: Path | None = None, device: Any = None) -> dict[str, Any]:
    """``framework`` (``"numpy"`` or ``"pt"``) tensors viewing their spans of ``buffer`` (:func:`read_buffer`).

    A torch tensor whose span is not aligned to its element size (safetensors aligns them; a
    hand-made file may not) is copied out instead.

    :param device: (torch) a device other than the CPU: the bytes of all the tensors go there in one
        copy, and the tensors are views of that copy (one transfer, where a copy per tensor pays a
        transfer's fixed cost for each: 23 ms for the 448 tensors of a 7B model's LoRA on an H200).
    :raises UnsupportedError: torch cannot use ``device`` here.
    """
    import numpy as np

    if framework == "pt":
        import torch

        if not _TORCH_DTYPES:
            _TORCH_DTYPES.update(F64=torch.float64, F32=torch.float32, F16=torch.float16, BF16=torch.bfloat16,
                                 I64=torch.int64, I32=torch.int32, I16=torch.int16, I8=torch.int8, U8=torch.uint8,
                                 BOOL=torch.bool)
        flat, at = torch.from_numpy(buffer), 0
        if device is not None and str(device) != "cpu" and spans:
            at = min(begin for begin, _ in spans.values())
            data = flat[at : max(end for _, end in spans.values())]
            flat = data.to("meta") if str(device) == "meta" else _to_device(data, device, path)
        typed: dict[str, Any] = {}  # dtype -> the whole buffer as that dtype, for as_strided views
        out = {}
        for key, (begin, end) in spans.items():
            begin, end = begin - at, end - at
            info = infos[key]
            width = DTYPE_BYTES[info.dtype]
            if begin % width:  # unaligned: copy it out
                out[key] = flat[begin:end].clone().view(_TORCH_DTYPES[info.dtype]).view(info.shape)
                continue
            whole = typed.get(info.dtype)
            if whole is None:
                whole = typed[info.dtype] = flat[: len(flat) // width * width].view(_TORCH_DTYPES[info.dtype])
            out[key] = whole.as_strided(info.shape, _strides(info.shape), begin // width)
        return out
    names = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
             "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
    if any(info.dtype == "BF16" for info in infos.values()):
        try:
            import ml_dtypes
        except ImportError:
            raise UnsupportedError("BF16 tensors need the ml_dtypes package to be read as NumPy arrays",
                                   path=path, hint="pip install ml_dtypes, or load with a framework backend") from None
        names["BF16"] = ml_dtypes.bfloat16
    return {key: buffer[begin:end].view(names[infos[key].dtype]).reshape(infos[key].shape)
            for key, (begin, end) in spans.items()}
