"""Looking a path up so that "it is not there" and "you may not look" are told apart.

``Path.exists()`` and ``Path.is_dir()`` raise a bare ``PermissionError`` (Python up to 3.13) or say ``False``
(3.14) when a folder on the way may not be searched; the readers then raised it as it was, or said "no such
adapter folder" about a folder that exists. Here a refused look-up is a :class:`FileFormatError` naming the
folder that refuses and the permission to get.

>>> exists(Path("no/such/folder"))
False
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import FileFormatError

__all__ = ["denied", "entries", "exists", "is_dir", "is_file", "lookup"]

#: What a look-up failing with these means: the path is not there (or cannot name anything).
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EBADF})
_REFUSED = frozenset({errno.EACCES, errno.EPERM})


def _unsearchable(path: Path) -> Path | None:
    """The first folder on the way to ``path`` (``path`` itself included) that this process may not search."""
    absolute = Path(os.path.abspath(path))
    for folder in [*reversed(absolute.parents), absolute]:
        if not os.access(folder, os.X_OK):
            return folder
    return None


def denied(path: str | Path, exc: OSError, *, listing: bool = False) -> FileFormatError:
    """The error for a look-up of ``path`` refused by the file system's permissions (``exc``).

    :param listing: the refusal was to list ``path``'s entries (no read permission on the folder).

    >>> str(denied("out/lora", PermissionError(13, "Permission denied"), listing=True))  # doctest: +ELLIPSIS
    'out/lora: permission denied: the folder cannot be listed (fix: get read permission on out/lora ...)'
    """
    if listing:
        return FileFormatError("permission denied: the folder cannot be listed", path=path,
                               hint=f"get read permission on {path} (chmod a+r), or run as a user who has it")
    blocked = _unsearchable(Path(path))
    if blocked is None:
        return FileFormatError(f"permission denied: {exc.strerror or exc}", path=path,
                               hint="get read permission on it, or run as a user who has it")
    return FileFormatError(f"permission denied: the folder {blocked} may not be searched", path=path,
                           hint=f"get search (x) permission on {blocked} (chmod a+x), or run as a user who has it")


def lookup(path: str | Path) -> os.stat_result | None:
    """``os.stat(path)`` (links followed), or ``None`` if nothing is there.

    :raises FileFormatError: the look-up was refused (no permission) or failed otherwise (an I/O error).
    """
    try:
        return os.stat(path)
    except ValueError:  # a NUL byte: names nothing
        return None
    except OSError as exc:
        if exc.errno in _ABSENT:
            return None
        if exc.errno in _REFUSED:
            raise denied(path, exc) from None
        raise FileFormatError(f"cannot look it up: {exc.strerror or exc}", path=path,
                              hint="check the file system (an I/O error) and the path") from None


def exists(path: str | Path) -> bool:
    """Whether something is at ``path`` (links followed): :func:`lookup` not ``None``."""
    return lookup(path) is not None


def is_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder (links followed); a refused look-up raises as in :func:`lookup`."""
    info = lookup(path)
    return info is not None and stat.S_ISDIR(info.st_mode)


def is_file(path: str | Path) -> bool:
    """Whether ``path`` is a regular file (links followed); a refused look-up raises as in :func:`lookup`."""
    info = lookup(path)
    return info is not None and stat.S_ISREG(info.st_mode)


def entries(folder: Path) -> list[Path]:
    """``folder``'s entries, sorted by name.

    :raises FileFormatError: the folder may not be listed (or searched), naming it and the permission to get.
    """
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        if exc.errno in _REFUSED:
            raise denied(folder, exc, listing=os.access(folder, os.X_OK)) from None
        raise FileFormatError(f"cannot list the folder: {exc.strerror or exc}", path=folder,
                              hint="check the file system (an I/O error) and the path") from None
