"""Reading the files of one adapter folder as one snapshot while another process may be saving over it.

A save replaces the folder by swapping in a complete new one, or (the root of a multi-adapter folder,
systems without that swap) renames new files in one by one (see :mod:`adapterspec.folder`). A reader
that opened ``adapter_config.json`` by path and then, a few milliseconds later,
``adapter_model.safetensors`` by path could pair one save's config with the next save's tensors.

:class:`Snapshot` opens every file relative to one handle of the folder (``O_DIRECTORY`` + ``dir_fd``,
where the system has them): a folder swapped out keeps its own files. And it checks, after the reads,
that every name still names the file that was read (same device and inode, while that file is held
open, so the number cannot have been reused). A writer moves the old config aside before it puts in
new weights and puts a config back last, so a config still in place after the weights were opened
was in place when they were opened: the pair is from one save. Otherwise :func:`read_consistently`
reads again.

>>> from pathlib import Path
>>> def first_byte(snapshot: Snapshot) -> bytes:
...     with snapshot.open("adapter_config.json", Path("my-lora/adapter_config.json")) as fh:
...         return fh.read(1)
>>> read_consistently(Path("my-lora"), first_byte)               # doctest: +SKIP
b'{'
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from .errors import AdapterSpecError, FileFormatError

__all__ = ["Changed", "Snapshot", "file_id", "read_consistently"]

T = TypeVar("T")

#: How often a read is tried again while the folder keeps changing under it, and how long it waits between.
ATTEMPTS = 60
_PAUSES = (0.0, 0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)

_DIR_FD = os.open in os.supports_dir_fd and os.stat in os.supports_dir_fd and hasattr(os, "O_DIRECTORY")


class Changed(Exception):
    """A file of the snapshot was replaced while it was read; reading again will tell."""


def file_id(info: os.stat_result) -> tuple[int, int, int, int]:
    """What identifies a file's content cheaply: device, inode, size and modification time."""
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


class Snapshot:
    """One handle of ``folder`` and the files opened through it (closed on exit)."""

    def __init__(self, folder: Path, watch: tuple[str, ...] = ()) -> None:
        self.folder = folder
        self._dir: int | None = None
        self._opened: dict[str, tuple[BinaryIO, os.stat_result]] = {}
        self._kept: list[BinaryIO] = []
        self._watch = [os.path.join(folder, name) for name in watch]
        if _DIR_FD:
            try:
                self._dir = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                self._dir = None  # the path-based reads that follow report what is wrong
        self.before = self.picture()

    def picture(self) -> tuple[tuple[int, int] | None, ...]:
        """Which file each watched name names in the folder's path now (``None``: none)."""
        out: list[tuple[int, int] | None] = []
        for path in self._watch:
            try:
                info = os.stat(path)
            except (OSError, ValueError):
                out.append(None)
            else:
                out.append((info.st_dev, info.st_ino))
        return tuple(out)

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        for fh, _ in self._opened.values():
            fh.close()
        self._opened.clear()
        while self._kept:  # the read was not returned: nobody else will close them
            self._kept.pop().close()
        if self._dir is not None:
            os.close(self._dir)
            self._dir = None

    def open(self, name: str, resolved: Path) -> BinaryIO:
        """Open ``name`` of the folder for reading (never blocking on a FIFO); it must be the file at
        ``resolved``, the path the caller checked (else :class:`Changed`)."""
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(name, flags, dir_fd=self._dir) if self._dir is not None else os.open(resolved, flags)
        except OSError as exc:
            raise FileFormatError(f"cannot open {name}: {exc.strerror}", path=resolved,
                                  hint="check that the file exists and is readable") from None
        fh = os.fdopen(fd, "rb", buffering=0)
        info = os.fstat(fd)
        self._opened[name] = (fh, info)
        try:
            checked = os.stat(resolved)
        except OSError:
            raise Changed(name) from None
        if (checked.st_dev, checked.st_ino) != (info.st_dev, info.st_ino):
            raise Changed(name)
        if stat.S_ISREG(info.st_mode):
            os.set_blocking(fd, True)
        return fh

    def share(self, fh: BinaryIO) -> BinaryIO:
        """Another handle of the open file ``fh`` (sharing its position), which the caller closes."""
        return os.fdopen(os.dup(fh.fileno()), "rb", buffering=0)

    def keep(self, fh: BinaryIO) -> BinaryIO:
        """Another handle of the open file ``fh``, which outlives the snapshot when :func:`read_consistently`
        returns this read (the caller then closes it), and is closed with the snapshot when the read is read again.

        What is read through it later is the file of this snapshot, whatever is saved over its name meanwhile."""
        kept = self.share(fh)
        self._kept.append(kept)
        return kept

    def hand_over(self) -> None:
        """The read is returned: the handles :meth:`keep` gave are the caller's to close from now on."""
        self._kept.clear()

    def intact(self) -> bool:
        """Whether every file opened is still in place under its name."""
        for name, (_, info) in self._opened.items():
            try:
                now = os.stat(name, dir_fd=self._dir) if self._dir is not None else os.stat(os.path.join(self.folder, name))
            except OSError:
                return False
            if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
                return False
        return True

    def moved(self) -> bool:
        """Whether the folder's path now names another folder than the one read (a save swapped it)."""
        if self._dir is None:
            return False
        try:
            now, then = os.stat(self.folder), os.fstat(self._dir)
        except OSError:
            return True
        return (now.st_dev, now.st_ino) != (then.st_dev, then.st_ino)


def read_consistently(folder: Path, read: Callable[[Snapshot], T], *, watch: tuple[str, ...] = (),
                      in_progress: Callable[[Path], bool] = lambda folder: False) -> T:
    """``read(snapshot)`` of ``folder``, again until every file it opened is still in place afterwards.

    An error ``read`` raises is raised as it is, unless the folder changed meanwhile: a file it opened
    was replaced, the folder was swapped, one of the ``watch`` names names another file (or none) than
    when the read began, or ``in_progress(folder)`` says a save is under way. Then it reads again.

    :raises FileFormatError: the folder kept changing for every one of :data:`ATTEMPTS` reads.
    """
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(_PAUSES[min(attempt - 1, len(_PAUSES) - 1)])
        with Snapshot(folder, watch) as snapshot:
            try:
                result = read(snapshot)
            except Changed:
                continue
            except AdapterSpecError:
                # the picture again after in_progress: a save that ended meanwhile changed it
                if snapshot.intact() and not snapshot.moved() and snapshot.picture() == snapshot.before \
                        and not in_progress(folder) and snapshot.picture() == snapshot.before:
                    raise
                continue
            if snapshot.intact():
                snapshot.hand_over()
                return result
    raise FileFormatError(f"the adapter changed under each of {ATTEMPTS} reads", path=folder,
                          hint="another process keeps saving here; read it when the save is done")
