"""The hidden files and folders a save works in, who owns them, and removing those whose owner died.

A save stages its work in hidden names beside what it replaces -- a folder
``.<name>.<pid>-<random>.tmp``, files ``.<file>.<pid>-<random>.tmp`` and backups ``.<file>.<pid>-<random>.old``
(see :mod:`adapterspec.folder`) -- and holds an ``flock`` on each while it works. A writer killed
(SIGKILL, power loss) leaves them behind; the next save into the same place removes those whose owner
is gone: not locked, and the process named in the name no longer runs (or is this process; a
process-wide lock orders this process's own creations and removals). A live save's names are never
removed: it holds their lock, and its pid runs. (Checking the pid too covers the instant between
creating a name and locking it; a writer in another pid namespace or on another machine sharing the
folder is seen only by its lock.)

The name keeps within ``NAME_MAX`` (255 bytes) whenever the target's name does: the target's part is
shortened to make room for the tag.

>>> name = staging_name("my-lora", ".tmp")
>>> name.startswith(".my-lora.") and name.endswith(".tmp")
True
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import AdapterSpecWarning

__all__ = ["CREATE_LOCK", "NAME_MAX", "Lease", "await_save", "exclusive", "missing_config_hint", "owner_gone",
           "remove_stale", "remove_tree", "save_in_progress", "set_save_in_progress", "staging_name"]

#: The longest file name (in bytes) that Linux, macOS and Windows file systems take.
NAME_MAX = 255

#: Held while this process creates and locks a staging name, or judges one stale (see the module's docs).
CREATE_LOCK = threading.RLock()

_PATTERN = re.compile(r"\.(?P<stem>.*)\.(?P<pid>[0-9]{1,10})-[0-9a-f]{8}\.(?:tmp|old)", re.DOTALL)

try:
    import fcntl
except ImportError:  # Windows: no flock; names are then never judged stale (nothing is removed)
    fcntl = None  # type: ignore[assignment]


def staging_name(target: str, suffix: str) -> str:
    """A fresh hidden name for staging ``target`` (``suffix``: ``.tmp`` or ``.old``), owned by this process."""
    tag = f".{os.getpid()}-{secrets.token_hex(4)}{suffix}"
    room = NAME_MAX - 1 - len(tag.encode())
    stem = os.fsencode(target)[:room].decode("utf-8", "ignore") if len(os.fsencode(target)) > room else target
    return f".{stem}{tag}"


def _stages(name: str, targets: Iterable[str]) -> int | None:
    """The pid of the owner if ``name`` is a staging name of one of ``targets``, else ``None``."""
    match = _PATTERN.fullmatch(name)
    if match is None:
        return None
    stem = match["stem"]
    for target in targets:  # a shortened name is a prefix of its target
        if stem == target or (len(os.fsencode(name)) >= NAME_MAX - 4 and target.startswith(stem)):
            return int(match["pid"])
    return None


class Lease:
    """The ``flock`` s this save holds on its staging names; :meth:`release` lets them go."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def hold(self, path: Path) -> None:
        """Lock ``path`` (a file or folder this save just created) for as long as the lease lasts."""
        if fcntl is None:
            return
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        for _ in range(50):  # another process judging it holds the lock for an instant
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            except OSError:
                break  # a file system without flock (some network ones)
            self._fds.append(fd)
            return
        os.close(fd)  # unlocked (a backup is a link of a file someone else locks): its pid tells it is alive

    def release(self) -> None:
        """Unlock and close everything held."""
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s ``flock`` through the block (waiting for another save that holds it; a dead
    one's is released by the system). Where the file system has no flock, the block runs unlocked."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock (some network ones): unlocked, as documented above
            pass
        yield
    finally:
        os.close(fd)


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # runs as another user (or cannot tell): alive
    return True


@contextlib.contextmanager
def _unlocked(path: Path) -> Iterator[bool]:
    """Whether nobody holds ``path``'s flock; if so it is held (by this process) through the block."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        yield False  # gone already, or a link: not ours to judge
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # still under that name: a save that removed it and let go of the lock leaves a nameless file
            named = os.path.samestat(os.fstat(fd), os.lstat(path))
        except OSError:
            yield False
            return
        yield named
    finally:
        os.close(fd)


def owner_gone(path: Path, pid: int) -> bool:
    """Whether the save that staged ``path`` (its owner's ``pid`` from the name) is over: nobody locks it, and
    that process no longer runs, or is this one (call under :data:`CREATE_LOCK`)."""
    if fcntl is None:
        return False
    with _unlocked(path) as free:
        return free and (pid == os.getpid() or not _pid_runs(pid))


def remove_stale(folder: Path, targets: Iterable[str]) -> list[Path]:
    """Remove from ``folder`` the staging names of ``targets`` whose owner is gone; the paths removed.

    A name that cannot be removed (permissions) is reported with an :class:`AdapterSpecWarning` and kept.
    """
    removed: list[Path] = []
    if fcntl is None:
        return removed
    targets = tuple(targets)
    try:
        hidden = [name for name in os.listdir(folder) if name.startswith(".")]  # a folder may hold thousands
    except OSError:
        return removed  # nothing to clean where nothing can be listed
    for name in hidden:
        pid = _stages(name, targets)
        if pid is None:
            continue
        path = folder / name
        with CREATE_LOCK:
            if not owner_gone(path, pid):
                continue
            try:
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    remove_tree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                continue  # another save removed it first
            except OSError as exc:
                warnings.warn(f"{path}: left by an interrupted save, and cannot be removed: {exc.strerror}",
                              AdapterSpecWarning, stacklevel=3)
                continue
        removed.append(path)
    return removed


def remove_tree(path: Path) -> None:
    """Remove the folder ``path`` (an old adapter or a dead save's staging), read-only or not.

    :raises OSError: something in it cannot be removed.
    """
    def allow_and_retry(function, failed, exc_info):  # type: ignore[no-untyped-def]
        if isinstance(exc_info[1], FileNotFoundError):
            return  # removed meanwhile (by another save's cleanup): as good
        parent = os.path.dirname(failed)
        os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | stat.S_IRWXU)  # a 0555 folder: removable again
        function(failed)

    if not os.access(path, os.W_OK | os.X_OK):
        os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | stat.S_IRWXU)
    shutil.rmtree(path, onerror=allow_and_retry)


def _configs_aside(folder: Path) -> Iterator[tuple[Path, bool]]:
    """Each config a save moved aside in ``folder`` (``.adapter_config.json.<pid>-<random>.old``), and whether its
    owner is gone (a killed save left it)."""
    from .spec import CONFIG_NAME

    if fcntl is None:
        return
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        pid = _stages(name, (CONFIG_NAME,))
        if pid is not None and name.endswith(".old"):
            with CREATE_LOCK:
                gone = owner_gone(folder / name, pid)
            yield folder / name, gone


def save_in_progress(folder: Path) -> bool:
    """Whether a save is replacing ``folder``'s files one by one right now (its config is moved aside:
    a live owner's ``.adapter_config.json.<pid>-<random>.old`` is there)."""
    return any(not gone for _, gone in _configs_aside(folder))


def set_save_in_progress(folder: Path) -> bool:
    """Whether a save of several adapters is writing into ``folder`` right now: a live owner's
    ``.adapterspec.json.<pid>-<random>.tmp`` is there (:func:`adapterspec.folder.write_adapters` holds one from its
    first adapter to its manifest, which it writes last), or the staging of its manifest. Where there is no
    ``flock`` (Windows), its owner's pid tells."""
    from .spec import MANIFEST_NAME

    try:
        names = os.listdir(folder)
    except OSError:
        return False
    for name in names:
        pid = _stages(name, (MANIFEST_NAME,))
        if pid is None:
            continue
        if fcntl is None:
            if _pid_runs(pid):
                return True
            continue
        with CREATE_LOCK:
            if not owner_gone(folder / name, pid):
                return True
    return False


def await_save(folder: Path, seconds: float = 5.0) -> None:
    """Wait (at most ``seconds``) while a save is replacing ``folder``'s files one by one: its config is back at
    the end. (A lister would otherwise take the folder for one without an adapter.)"""
    end, pause = time.monotonic() + seconds, 0.0005
    while save_in_progress(folder) and time.monotonic() < end:
        time.sleep(pause)
        pause = min(2 * pause, 0.05)


def missing_config_hint(folder: Path, otherwise: str) -> str:
    """The fix for a folder without ``adapter_config.json``: ``otherwise``, unless a killed save left the folder
    so (its old config moved aside, the new one never put in)."""
    left = next((path for path, gone in _configs_aside(folder) if gone), None)
    if left is None:
        return otherwise
    return (f"a save here was interrupted before it put its config in (the old one is {left.name}); save the "
            "adapter again (the next save also removes what the interrupted one left)")
