"""Writing adapter folders atomically, and folders of several adapters with their manifest.

Layout (SPEC.md section 3): adapter ``default`` in the root, adapter ``name`` in ``<dir>/<name>/``
(PEFT's layout), and ``adapterspec.json`` listing them (PEFT has no such list).

A write never leaves a half-written adapter, and never destroys the previous good copy. Files are
written into a hidden sibling folder first; a new adapter folder then appears by one
rename, and an existing one (holding no subfolders) is swapped with it by one atomic
``renameat2(RENAME_EXCHANGE)`` (Linux) -- readers see the old adapter or the new one, whatever fails
or crashes, and other files in it (a README) are kept. Where folders cannot be swapped (the root of a
multi-adapter folder, which holds the others; other systems), files are replaced one by one, old ones
kept as hard links and put back on any exception. One window remains there: a hard crash (power
loss, SIGKILL) between those renames leaves a folder *without* ``adapter_config.json`` (refused by
readers; the old config kept as ``.adapter_config.json.<pid>-<random>.old``) -- never new weights silently
paired with the old config, since the config is moved aside first and put back last.

A new folder appears by a rename that never replaces one: of two saves creating it, exactly one wins
(the other gets :class:`AdapterExistsError`). File-system failures (no space, no permission) raise
:class:`WriteError`, with nothing changed. What a killed save leaves behind (hidden
``.<name>.<pid>-<random>.tmp`` and ``.old`` entries) is removed by the next save into the same place --
only when its owner is gone (:mod:`adapterspec._staging`).

That holds whatever happens to the writing process. Surviving a power loss or an operating-system
crash too takes ``durable=True``: every file is fsynced before the rename, and the folders after it
(as databases do; it costs about as much again as the write itself -- PEFT, safetensors and
``torch.save`` do not). Without it, a
power loss right after a save can leave the new adapter's files incomplete -- which readers refuse
(truncated file, sha256 mismatch), never load silently wrong.

>>> import numpy as np
>>> write_adapter("out/ia3", {"peft_type": "IA3", "target_modules": ["q"], "feedforward_modules": []},
...               {"base_model.model.l.q.ia3_l": np.ones((4, 1), np.float32)})  # doctest: +SKIP
PosixPath('out/ia3')
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import functools
import json
import os
import secrets
import shutil
import stat
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, Union

from . import _access, _foreign, _safetensors, _snapshot, _staging
from .adapter import Adapter, _refuse_dangling, _tensor_infos, check_adapter_name
from .checks import tensor_errors
from .config import MAX_CONFIG_BYTES, AdapterConfig, _validator, read_json_file
from .errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterSpecError,
    AdapterSpecWarning,
    ConfigError,
    FileFormatError,
    IntegrityError,
    TensorError,
    UnsafeFileError,
    WriteError,
)
from .errors import shorten  # its own line: the block above is edited in parallel
from .spec import (
    CONFIG_NAME,
    MANIFEST_NAME,
    METADATA_FORMAT,
    METADATA_SAVE_ID,
    METADATA_VERSION,
    PICKLE_NAME,
    SAFETENSORS_NAME,
    SPEC_VERSION,
    check_version,
)

__all__ = ["check_set_names", "checkpoint_adapters", "hashing_ahead", "list_adapters", "read_set", "wait_for_removals",
           "write_adapter", "write_adapters"]

DEFAULT_ADAPTER = "default"

#: The field of a manifest entry recording the save that wrote the adapter (SPEC.md 3.4).
SAVE_ID = "save_id"

T = TypeVar("T")

#: File names of the format, which no adapter (sub)folder may take.
_RESERVED = frozenset({CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME, MANIFEST_NAME, "README.md"})


#: What goes into a file: its bytes, or a function that writes the file at a path (and fsyncs it if durable).
Content = Union[bytes, Callable[[Path], object]]


def _write_file(path: Path, content: Content, *, durable: bool = False) -> None:
    if not isinstance(content, bytes):
        # safetensors creates its files 0600; keep the mode an ordinary file gets (0666 less the umask)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o666))
        mode = stat.S_IMODE(path.stat().st_mode)
        content(path)
        os.chmod(path, mode)
        return
    with open(path, "wb") as fh:
        fh.write(content)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())


class _Hashing(dict[str, Any]):
    """Tensors (as safetensors saves them) whose sha256 is being computed on a thread (:func:`hashing_ahead`)."""

    checksum: _safetensors.Checksum | None = None


def hashing_ahead(tensors: Mapping[str, Any]) -> Mapping[str, Any]:
    """``tensors``, their sha256 starting on a thread now, for a :func:`write_adapter` of them to come.

    The checksum is the slowest part of a save; a caller with work left before it can write (a backend's base
    fingerprint, SPEC.md 9.1) starts it first, so that both run at once. Pass the result to
    :func:`write_adapter` / :func:`write_adapters` in place of ``tensors``; the tensors must not change meanwhile.
    Tensors that cannot be hashed ahead (several frameworks, GPU tensors) come back as they are.

    >>> import numpy as np
    >>> ahead = hashing_ahead({"base_model.model.q.lora_A.weight": np.ones((2, 4), np.float32)})
    >>> sorted(ahead)
    ['base_model.model.q.lora_A.weight']
    """
    try:
        savable = _savable(tensors)
    except Exception:  # noqa: BLE001 - not lost: write_adapter's checks report it typed
        return tensors
    ahead = _Hashing(savable)
    ahead.checksum = _safetensors.start_checksum(savable)
    return ahead


def _prepare(config: AdapterConfig | Mapping[str, Any], tensors: Mapping[str, Any],
             metadata: Mapping[str, str] | None, *, durable: bool = False,
             save_id: str | None = None) -> dict[str, Content]:
    """The files of one adapter folder, checked: a folder that would not validate is never written.

    ``save_id``: the save of several adapters it is part of (:func:`write_adapters`); the metadata records that one
    or none (an ``adapterspec_save_id`` the caller passes is dropped: an adapter saved alone is of no set's save).
    """
    cfg = config if isinstance(config, AdapterConfig) else AdapterConfig.from_dict(config)
    savable: dict[str, Any] | None = None
    checksum = None
    if isinstance(tensors, _Hashing):  # hashing since hashing_ahead()
        savable, checksum = tensors, tensors.checksum
    else:
        try:  # the sha256 of the data runs on a thread from here, while the checks run and the folder is staged
            savable = _savable(tensors)
            checksum = _safetensors.start_checksum(savable)
        except Exception:  # noqa: BLE001 - not lost: the checks below report it typed, or _savable again after them
            savable = None
    errors = tensor_errors(cfg, _tensor_infos(tensors))
    if errors:
        raise errors[0]
    if savable is None:
        savable = _savable(tensors)
    if metadata is not None and not (isinstance(metadata, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise FileFormatError("safetensors metadata must map strings to strings", hint="convert the values with str()")
    meta = {**{k: v for k, v in (metadata or {}).items() if k != METADATA_SAVE_ID}, METADATA_FORMAT: "pt",
            METADATA_VERSION: SPEC_VERSION}
    if save_id is not None:
        meta[METADATA_SAVE_ID] = save_id
    return {
        SAFETENSORS_NAME: functools.partial(_safetensors.save_file, savable, metadata=meta, durable=durable,
                                            checksum=checksum),
        CONFIG_NAME: cfg.to_json().encode("utf-8"),
    }


def _family(tensor: Any) -> str:
    module = type(tensor).__module__.split(".")[0]
    return {"keras": "tensorflow", "jaxlib": "jax"}.get(module, module)


def _savable(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """``tensors`` as safetensors saves them: one framework; torch tensors detached, contiguous, not sharing memory."""
    families = {_family(v) for v in tensors.values()}
    if len(families) > 1:
        raise TensorError(f"tensors of several frameworks ({', '.join(sorted(families))}) cannot be saved together",
                          hint="convert them all to one framework (e.g. NumPy) first")
    if families != {"torch"}:
        return dict(tensors)
    out: dict[str, Any] = {}
    spans: list[tuple[int, int, str]] = []  # (first byte, end, key) of each tensor's memory
    for key, value in tensors.items():
        if value.requires_grad:
            value = value.detach()
        if value.is_meta:
            raise TensorError("a tensor on the 'meta' device has no data", key=key,
                              hint="load or initialise the weights before saving")
        if not value.is_contiguous():
            value = value.contiguous()
        out[key] = value
        start = value.data_ptr()
        spans.append((start, start + value.nbytes, key))
    end = -1
    for start, stop, key in sorted(spans):  # views side by side in one buffer (a loaded file) are fine
        if start < end:
            out[key] = out[key].clone()  # tied or overlapping: safetensors refuses shared memory
        end = max(end, stop)
    return out


def _is_adapter(folder: Path) -> bool:
    return (folder / CONFIG_NAME).exists() or (folder / SAFETENSORS_NAME).exists()


def _install(files: Mapping[str, Content], folder: Path, *, overwrite: bool, durable: bool = False) -> None:
    """Put ``files`` into ``folder`` all-or-nothing; on any failure (KeyboardInterrupt included) the
    previous content is left as it was and no temporary file remains.

    * a new folder is staged beside it and appears by one rename that never replaces a folder
      (``renameat2(RENAME_NOREPLACE)`` on Linux): of two saves creating it, one wins and the other
      gets :class:`AdapterExistsError` (or, with ``overwrite``, replaces it as below);
    * an existing folder without subfolders (one adapter, maybe a README) is staged beside it too --
      new files written, its other files hard-linked in -- and the two are swapped by one atomic
      ``renameat2(RENAME_EXCHANGE)`` (Linux); readers see the old adapter or the new one, never a mix;
    * otherwise (the root of a multi-adapter folder, or no RENAME_EXCHANGE) the files are replaced one
      by one, see :func:`_replace_files`.

    Afterwards, what interrupted saves (killed writers) left in these places is removed (:mod:`._staging`).
    """
    for _ in range(3):  # again only if another save created the folder meanwhile
        if os.path.lexists(folder) and not folder.is_dir():
            raise FileFormatError("exists and is not a folder", path=folder, hint="choose another path")
        if folder.is_dir() and _is_adapter(folder) and not overwrite:
            raise AdapterExistsError("an adapter is already saved here", path=folder,
                                     hint="pass overwrite=True to replace it, or choose another path")
        if folder.is_symlink():  # write into the folder the link points to, not over the link
            folder = folder.resolve()
        folder.parent.mkdir(parents=True, exist_ok=True)
        exists = folder.exists()
        if exists and (_renameat2() is None or any(p.is_dir() and not p.is_symlink() for p in folder.iterdir())):
            _replace_files(files, folder, overwrite=overwrite, durable=durable)
            break
        if _stage_and_swap(files, folder, exists=exists, overwrite=overwrite, durable=durable):
            break
    else:
        raise AdapterExistsError("other saves keep creating and removing this folder", path=folder,
                                 hint="save when they are done, or choose another path")
    _staging.remove_stale(folder.parent, [folder.name])
    _staging.remove_stale(folder, [*files, MANIFEST_NAME])  # the manifest's: a killed set save's marker too


def _stage_and_swap(files: Mapping[str, Content], folder: Path, *, exists: bool, overwrite: bool,
                    durable: bool) -> bool:
    """Stage ``files`` beside ``folder`` and put them in place by one rename or one exchange; ``False`` if
    ``folder`` appeared meanwhile (nothing done: look again)."""
    old = _staging.Lease()  # held on the old adapter once it is swapped out, until it is removed
    with _staging.Lease() as lease:
        staging = _new_path(folder.parent, folder.name, ".tmp", directory=True, lease=lease)
        swapped = False
        try:
            for name, data in files.items():
                _write_file(staging / name, data, durable=durable)
            if exists:
                for other in folder.iterdir():
                    if other.name not in files:
                        _link_or_copy(other, staging / other.name)
                os.chmod(staging, stat.S_IMODE(folder.stat().st_mode))
            if durable:
                _fsync_dir(staging)
            if not exists:
                if not _rename_new(staging, folder):
                    _discard(staging)
                    return False
                swapped = True
            else:
                # One atomic step; afterwards staging holds the old adapter, and removing it is all that is left.
                with _staging.CREATE_LOCK:
                    swapped = _exchange(staging, folder)
                    if swapped:
                        old.hold(staging)
                if swapped and not overwrite and _is_adapter(staging):  # another save made one meanwhile
                    _exchange(staging, folder)  # put it back
                    raise AdapterExistsError("another save put an adapter here meanwhile", path=folder,
                                             hint="pass overwrite=True to replace it, or choose another path")
            if durable:
                _fsync_dir(folder.parent)
        except BaseException:
            old.release()
            _discard(staging)
            raise
    if exists and swapped:
        _remove_later(staging, old)  # the old adapter: freeing its blocks takes as long as writing a third of it
        return True
    if exists:  # the file system cannot exchange folders
        _discard(staging)
        _replace_files(files, folder, overwrite=overwrite, durable=durable)
    return True


def _discard(staging: Path) -> None:
    """Remove ``staging`` after a failure (which the caller raises); if that fails too, warn: the next save
    here removes it."""
    try:
        if os.path.lexists(staging):
            _staging.remove_tree(staging)
    except OSError as exc:
        warnings.warn(f"{staging}: left by the failed save, and cannot be removed: {exc}", AdapterSpecWarning,
                      stacklevel=4)


_REMOVALS: list[threading.Thread] = []


def _remove_later(path: Path, lease: _staging.Lease) -> None:
    """Remove ``path`` (an old adapter swapped out of place, locked by ``lease``) on a thread: ``unlink``
    releases the GIL. A removal that fails is reported with an :class:`AdapterSpecWarning`; the next save
    here removes what is left.

    The interpreter waits for these removals at exit (:func:`wait_for_removals`).
    """
    def remove() -> None:
        try:
            _staging.remove_tree(path)
        except OSError as exc:
            warnings.warn(f"{path}: the adapter it replaced cannot be removed: {exc}", AdapterSpecWarning,
                          stacklevel=1)
        finally:
            lease.release()

    _REMOVALS[:] = [t for t in _REMOVALS if t.is_alive()]
    thread = threading.Thread(target=remove, name="adapterspec-remove-old", daemon=True)
    thread.start()
    _REMOVALS.append(thread)
    _wait_in_worker_processes()


_FINALIZED_IN: int | None = None  # the process whose multiprocessing exit waits for the removals


def _wait_in_worker_processes() -> None:
    """Have :mod:`multiprocessing` workers wait for the removals too: a ``Process`` ends with ``os._exit``,
    which runs no :mod:`atexit` handler, so a save in a worker left the replaced adapter on disk. A forked
    worker starts with multiprocessing's finalizers cleared, so each process registers its own."""
    global _FINALIZED_IN
    util = sys.modules.get("multiprocessing.util")  # loaded in every worker; a process without it has none
    if util is not None and _FINALIZED_IN != os.getpid():
        util.Finalize(None, wait_for_removals, exitpriority=0)  # run by a worker's exit (and the parent's)
        _FINALIZED_IN = os.getpid()


@atexit.register
def wait_for_removals() -> None:
    """Wait until the old adapters replaced by overwriting saves are removed from disk.

    Saves return as soon as the new adapter is in place; the old one (in a hidden
    ``.<name>.<pid>-<random>.tmp`` folder beside it) is deleted in the background, read-only or not.
    One that cannot be deleted is reported with an :class:`AdapterSpecWarning`, and the next save into
    the same place deletes it. This runs at exit, of a :mod:`multiprocessing` worker too.

    >>> wait_for_removals()
    """
    while _REMOVALS:
        _REMOVALS.pop().join()


def _replace_files(files: Mapping[str, Content], folder: Path, *, overwrite: bool = True,
                   durable: bool = False) -> None:
    """Replace ``files`` in ``folder`` one by one, keeping the old ones (hard links) until all are in.

    Any exception puts the old files back. The old config is moved aside *first* and the new one put
    in *last*: a crash (power loss, SIGKILL) between the renames leaves a folder without
    ``adapter_config.json`` -- refused by readers with a clear error, the old files kept as hidden
    ``.<name>.<pid>-<random>.old`` until the next save here -- never new weights silently paired with
    the old config.

    Saves here take turns (an ``flock`` on the folder): two saves renaming their files in at once left one
    save's config with the other's weights, a pair readers cannot tell from one save. Without ``overwrite``,
    the second then finds the first's adapter and gets :class:`AdapterExistsError`.
    """
    staged: list[tuple[Path, Path]] = []
    backups: list[tuple[Path, Path]] = []
    order = sorted(files, key=lambda name: name == CONFIG_NAME)  # config last
    with _staging.Lease() as lease, _staging.exclusive(folder):
        try:
            if not overwrite and _is_adapter(folder):
                raise AdapterExistsError("another save put an adapter here meanwhile", path=folder,
                                         hint="pass overwrite=True to replace it, or choose another path")
            for name in order:
                tmp = _new_path(folder, name, ".tmp", lease=lease)
                staged.append((tmp, folder / name))
                _write_file(tmp, files[name], durable=durable)
            for _, final in sorted(staged, key=lambda pair: pair[1].name != CONFIG_NAME):  # config first
                if final.exists():
                    backup = _new_path(folder, final.name, ".old", create=False)
                    with _staging.CREATE_LOCK:  # made and locked as one step for this process's cleaners
                        if final.name == CONFIG_NAME:
                            os.rename(final, backup)  # no config from here until the new one is in
                        else:
                            _link_or_copy(final, backup)
                        backups.append((backup, final))
                        lease.hold(backup)
            for tmp, final in staged:
                os.replace(tmp, final)
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            for backup, final in reversed(backups):
                if final.exists() and os.path.samefile(backup, final):
                    backup.unlink()  # a hard link of the untouched file (renaming onto it would do nothing)
                else:
                    os.replace(backup, final)
            raise
        for backup, _ in backups:
            backup.unlink(missing_ok=True)
    if durable:
        _fsync_dir(folder)


def _new_path(parent: Path, target: str, suffix: str, *, directory: bool = False, create: bool = True,
              lease: _staging.Lease | None = None) -> Path:
    """A fresh hidden staging name for ``target`` in ``parent`` (:func:`._staging.staging_name`), created
    (mode from the umask, unlike ``tempfile``'s 0600/0700) and locked by ``lease`` as one step."""
    for _ in range(100):
        path = parent / _staging.staging_name(target, suffix)
        try:
            if not create:
                if not os.path.lexists(path):
                    return path
                continue
            with _staging.CREATE_LOCK:
                if directory:
                    os.mkdir(path)
                else:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                if lease is not None:
                    try:
                        lease.hold(path)
                    except BaseException:
                        (os.rmdir if directory else os.unlink)(path)  # still empty
                        raise
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name in {parent}", str(parent))


def _link_or_copy(source: Path, target: Path) -> None:
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """libc's ``renameat2`` (Linux, glibc >= 2.28), or ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return getattr(libc, "renameat2", None)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (``renameat2(RENAME_EXCHANGE)``); ``False`` if the file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _rename_new(a: Path, b: Path) -> bool:
    """Rename folder ``a`` to ``b`` if nothing is at ``b``; ``False`` if something is (it is left alone).

    ``renameat2(RENAME_NOREPLACE)`` on Linux; elsewhere ``rename``, which also refuses a non-empty
    folder (and replaces an empty one, which holds no adapter to lose).
    """
    renameat2 = _renameat2()
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_noreplace) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(b))
    try:
        os.rename(a, b)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) or (sys.platform == "win32" and os.path.isdir(b)):
            return False
        raise
    return True


_WRITE_HINTS = {
    errno.ENOSPC: "free space on that file system, then save again",
    errno.EDQUOT: "free space within your disk quota, then save again",
    errno.EACCES: "save where you may write, or get write permission on the folder and the one holding it",
    errno.EPERM: "save where you may write, or get write permission on the folder and the one holding it",
    errno.EROFS: "the file system is read-only; save elsewhere",
    errno.ENAMETOOLONG: f"use a shorter name (at most {_staging.NAME_MAX} bytes per folder name)",
}


@contextlib.contextmanager
def _write_errors_typed(folder: Path) -> Iterator[None]:
    """Raise the file system's errors in the block as :class:`WriteError` naming ``folder`` and the fix."""
    try:
        yield
    except AdapterSpecError:
        raise
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(folder) else ""
        raise WriteError(f"saving failed, nothing was changed: {exc.strerror or exc}{where}", errno=exc.errno,
                         path=folder, hint=_WRITE_HINTS.get(exc.errno or 0, "fix the file-system problem above, "
                                                                               "then save again")) from exc


def write_adapter(path: str | Path, config: AdapterConfig | Mapping[str, Any], tensors: Mapping[str, Any], *,
                  overwrite: bool = False, metadata: Mapping[str, str] | None = None, durable: bool = False) -> Path:
    """Write one adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``, atomically.

    The adapter is checked first (a folder that would not validate is never written). The
    safetensors metadata gets ``format: pt``, ``adapterspec_version`` and the sha256 of the data.

    :param tensors: canonical key -> NumPy array or torch/TensorFlow/JAX tensor.
    :param overwrite: replace an adapter already at ``path`` (otherwise refused).
    :param durable: fsync the files before they appear, so that the adapter survives a power loss or an
        OS crash once this returns (atomic either way; see the module's documentation).
    :raises AdapterExistsError: an adapter is at ``path`` and ``overwrite`` is false (or another save
        created one there first).
    :raises WriteError: the file system failed (no space, no permission...): the old adapter is intact.
    :raises AdapterSpecError: the config or tensors are invalid (nothing is written).
    """
    folder = Path(path)
    files = _prepare(config, tensors, metadata, durable=durable)
    with _write_errors_typed(folder):
        _install(files, folder, overwrite=overwrite, durable=durable)
    return folder


def write_adapters(path: str | Path,
                   adapters: Mapping[str, tuple[AdapterConfig | Mapping[str, Any], Mapping[str, Any]]
                                 | tuple[AdapterConfig | Mapping[str, Any], Mapping[str, Any], Mapping[str, str] | None]],
                   *, overwrite: bool = False, durable: bool = False) -> Path:
    """Write several adapters into one folder, PEFT's way, plus the manifest ``adapterspec.json``.

    ``"default"`` goes to the root (if present), every other name to ``<path>/<name>/``. Each adapter is
    replaced atomically (old or new, see :func:`write_adapter`), one after the other; the set as a whole is one
    save for its readers: every adapter's metadata and its manifest entry record this save's id, and the
    manifest is written last (SPEC.md 3.4). A read meanwhile waits for the save (:func:`read_set`); a save that
    fails or is killed half-way leaves adapters of two saves, which readers refuse
    (:class:`~adapterspec.errors.IntegrityError`) until the set is saved again.

    :param adapters: name -> (config, tensors) or (config, tensors, safetensors metadata).
    :param durable: fsync every file before it appears (see :func:`write_adapter`).
    :raises UnsafeFileError: a name is not a safe folder name.
    :raises ConfigError: two names differ only in letter case (SPEC.md 3.3); nothing is written.
    :raises WriteError: the file system failed (no space, no permission...): each adapter is the old or the new one,
        and the set is refused until it is saved again.
    """
    folder = Path(path)
    check_set_names(adapters)
    save_id = _new_save_id()
    prepared = {name: _prepare(entry[0], entry[1], entry[2] if len(entry) > 2 else None, durable=durable,
                               save_id=save_id)
                for name, entry in adapters.items()}
    entries = {name: {"path": "." if name == DEFAULT_ADAPTER else name, SAVE_ID: save_id} for name in prepared}
    with _write_errors_typed(folder), _staging.Lease() as lease:
        marker = _save_marker(folder, lease)
        try:
            for name in sorted(prepared, key=lambda n: n != DEFAULT_ADAPTER):  # the root first: no subfolders yet
                _install(prepared[name], folder if name == DEFAULT_ADAPTER else folder / name, overwrite=overwrite,
                         durable=durable)
            manifest = {"adapterspec_version": SPEC_VERSION, "adapters": entries}
            _install({MANIFEST_NAME: (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()}, folder,
                     overwrite=True, durable=durable)
        finally:
            if marker is not None:
                with contextlib.suppress(OSError):
                    marker.unlink()
    return folder


def check_set_names(names: Iterable[str]) -> None:
    """Refuse names that cannot be the adapters of one folder (SPEC.md 3.3): each becomes a subfolder's name.

    >>> check_set_names(["default", "fr"])
    >>> check_set_names(["Fr", "fr"])
    Traceback (most recent call last):
    adapterspec.errors.ConfigError: fr: adapter names 'Fr' and 'fr' differ only in letter case ... (fix: ...)

    :raises UnsafeFileError: a name is not a safe folder name, or is the name of a file of the format.
    :raises ConfigError: two names differ only in letter case: on case-insensitive file systems (macOS, Windows) one
        adapter's folder would replace the other's.
    """
    names = list(names)
    for name in names:
        check_adapter_name(name)
        if name in _RESERVED:  # the folder would collide with a file of the root adapter
            raise UnsafeFileError(f"adapter name {name!r} is the name of a file of the format", key=name,
                                  hint="choose another adapter name")
    twins = _case_twins(names)
    if twins is not None:
        raise _case_refusal(*twins, key=twins[1], hint="rename one of them (load it under another adapter_name), or "
                                                        "save them into two folders")


def _case_twins(names: Iterable[str]) -> tuple[str, str] | None:
    """The first two of ``names`` that differ only in letter case, or ``None``."""
    lowered: dict[str, str] = {}
    for name in names:
        if name.lower() in lowered:
            return lowered[name.lower()], name
        lowered[name.lower()] = name
    return None


def _case_refusal(first: str, second: str, **where: Any) -> ConfigError:
    """SPEC.md 3.3's refusal of two adapter names of one folder that differ only in letter case."""
    return ConfigError(f"adapter names {first!r} and {second!r} differ only in letter case (their folders collide on "
                       "case-insensitive file systems)", **where)


def _new_save_id() -> str:
    """A fresh id for one save of several adapters: 128 random bits, in hexadecimal."""
    return secrets.token_hex(16)


def _save_marker(folder: Path, lease: _staging.Lease) -> Path | None:
    """Mark ``folder`` (when it exists already) as being saved into by this set's save, until the marker is
    removed: a hidden ``.adapterspec.json.<pid>-<random>.tmp`` that ``lease`` locks (readers see a live save in
    it, :func:`._staging.set_save_in_progress`; a killed save's is removed by the next save of a manifest)."""
    if not folder.is_dir():
        return None  # a new folder: no set of another save to read meanwhile
    return _new_path(folder, MANIFEST_NAME, ".tmp", lease=lease)


def _refuse_unsafe_entries(manifest: Any, manifest_file: Path) -> None:
    """SPEC 3.3 and 11.3: a hostile adapter name or a path leaving the folder is an UnsafeFileError, not a syntax error."""
    adapters = manifest.get("adapters") if isinstance(manifest, dict) else None
    for name, entry in (adapters.items() if isinstance(adapters, dict) else ()):
        try:
            check_adapter_name(name)
        except UnsafeFileError as exc:
            exc.path = str(manifest_file)
            raise
        where = entry.get("path") if isinstance(entry, dict) else None
        if isinstance(where, str) and (where.startswith(("/", "\\")) or ".." in where.replace("\\", "/").split("/")
                                       or where[1:2] == ":"):
            raise UnsafeFileError(f"adapter {name!r} path {shorten(where)} leaves the folder", path=manifest_file,
                                  hint="use a relative subfolder path without '..'")


def _within(folder: Path, target: Path) -> bool:
    """Whether ``target`` resolves inside ``folder`` (a symlink loop does not)."""
    try:
        return target.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False


def _valid_name(name: str) -> bool:
    try:
        check_adapter_name(name)
    except UnsafeFileError:
        return False
    return True


def _check_manifest_names(manifest: Mapping[str, Any], manifest_file: Path) -> None:
    """SPEC 3.3/3.4: ``default`` is a listed adapter; no two names differ only in letter case."""
    names = list(manifest["adapters"])
    default = manifest.get("default")
    if default is not None and default not in names:
        raise ConfigError(f"default adapter {default!r} is not listed in adapters "
                          f"({shorten(', '.join(names), 300, plain=True)})",
                          pointer="/default", path=manifest_file, hint="name a listed adapter, or remove 'default'")
    twins = _case_twins(names)
    if twins is not None:
        raise _case_refusal(*twins, pointer=f"/adapters/{twins[1]}", path=manifest_file, hint="rename one of them")


def checkpoint_adapters(path: str | Path, names: Sequence[str]) -> dict[str, Path]:
    """The adapters of a training checkpoint at ``path`` for a resume that trains ``names``: one for each, no more.

    A resume restores each trained adapter from the checkpoint's adapter of the same name. An adapter under another
    name (the run injected ``default``, the resume ``sft``) is refused rather than skipped: skipped, training went
    on from the fresh adapter beside the checkpoint's optimizer state and step, and no one was told.

    :raises AdapterNotFoundError: a name has no adapter in the checkpoint, or the checkpoint holds an adapter the
        resume does not train -- naming both sets.

    >>> checkpoint_adapters("out/checkpoint-40", ["default"])             # doctest: +SKIP
    {'default': PosixPath('out/checkpoint-40')}
    """
    found = list_adapters(path)
    missing = [name for name in names if name not in found]
    extra = [name for name in found if name not in names]
    if missing or extra:
        what = (f"has no adapter {missing[0]!r}" if missing else f"holds adapter {extra[0]!r}, which is not trained")
        raise AdapterNotFoundError(
            f"the checkpoint {what} (the checkpoint's adapters: {sorted(found)}; the model's trained adapters: "
            f"{list(names)})", key=(missing or extra)[0], path=Path(path),
            hint="inject the adapters under the names the checkpoint was saved with, then resume")
    return {name: found[name] for name in names}


def list_adapters(path: str | Path) -> dict[str, Path]:
    """The adapters in a folder: from its manifest, or else (PEFT folders) the root and its subfolders.

    When the manifest records the save that wrote each adapter (SPEC.md 3.4), every adapter must record that save
    too (or none): a folder holding adapters of two saves is refused. A save of the set under way is waited for.

    >>> list_adapters("several")                                           # doctest: +SKIP
    {'default': PosixPath('several'), 'fr': PosixPath('several/fr')}

    :raises FileFormatError: the manifest is not JSON (or has duplicate keys, or exceeds 16 MiB).
    :raises ConfigError: the manifest breaks its schema or SPEC.md 3.4 (``default`` not listed, two
        entries with one folder, names differing only in case), with the JSON pointer.
    :raises AdapterNotFoundError: the manifest names a missing adapter, or the folder holds none.
    :raises UnsafeFileError: a manifest path leaves the folder.
    :raises IntegrityError: adapters of two saves (one was interrupted), naming them.
    """
    return read_set(path, lambda folder: folder,
                    lambda folder: _safetensors.read_metadata_value(folder / SAFETENSORS_NAME, METADATA_SAVE_ID))[0]


def read_set(path: str | Path, read: Callable[[Path], T],
             save_of: Callable[[T], str | None]) -> tuple[dict[str, T], bytes | None]:
    """``read(folder)`` of each adapter of the folder ``path`` (name -> what it gives, as :func:`list_adapters` lists
    them), all of one save; and the bytes of the manifest they were listed from and checked against (``None``: the
    folder has none).

    A manifest entry's ``save_id`` is compared with what ``save_of`` tells of that adapter's read (the
    ``adapterspec_save_id`` of its metadata; ``None``: it records none -- saved alone, or by PEFT -- and is taken as
    it is). Adapters of another save mean a save of the set is under way (:func:`write_adapters` marks the folder):
    then the folder is read again, as :func:`._snapshot.read_consistently` reads one adapter again. Otherwise a save
    was interrupted. A manifest without ``save_id`` (older writers) is read as before.

    :raises IntegrityError: adapters of two saves and no save under way, naming the folder and those adapters.
    :raises AdapterSpecError: whatever :func:`list_adapters` and ``read`` raise.
    """
    folder = Path(path)

    def attempt(snapshot: _snapshot.Snapshot) -> tuple[dict[str, T], bytes | None]:
        found, saves, raw = _listing(folder, snapshot)
        got = {name: read(where) for name, where in found.items()}
        _check_one_save(folder, saves, {name: save_of(got[name]) for name in saves})
        return got, raw

    return _snapshot.read_consistently(folder, attempt, watch=(MANIFEST_NAME,),
                                       in_progress=_staging.set_save_in_progress)


def _check_one_save(folder: Path, saves: Mapping[str, str], recorded: Mapping[str, str | None]) -> None:
    """Refuse adapters recording another save than the manifest entry's (``saves``: name -> the entry's save id)."""
    other = [name for name, save in saves.items() if recorded.get(name) not in (None, save)]
    if not other:
        return
    same = [name for name in saves if name not in other]

    def names(group: list[str]) -> str:
        return f"{shorten(', '.join(map(repr, group)), 300, plain=True)} {'are' if len(group) > 1 else 'is'}"

    raise IntegrityError(
        f"the folder holds adapters of two saves: {names(other)} not of the save {MANIFEST_NAME} records"
        f"{f' ({names(same)})' if same else ''}; a save of the set was interrupted", path=folder, key=other[0],
        hint="save the set again (write_adapters / save_adapters); each adapter alone is intact")


def _listing(folder: Path, snapshot: _snapshot.Snapshot) -> tuple[dict[str, Path], dict[str, str], bytes | None]:
    """:func:`list_adapters`' list, the save id each manifest entry records (name -> id), and the manifest's bytes;
    the manifest is read through ``snapshot`` (so a save replacing it meanwhile is seen)."""
    manifest_file = folder / MANIFEST_NAME
    found: dict[str, Path] = {}
    if _access.exists(manifest_file):  # a refused look-up says so (no permission), naming the folder that refuses
        if manifest_file.is_file():
            fh = snapshot.open(MANIFEST_NAME, manifest_file)
            manifest = read_json_file(manifest_file, what="manifest", file=fh)  # bounded, never blocks on a FIFO
            raw: bytes | None = os.pread(fh.fileno(), MAX_CONFIG_BYTES, 0)
        else:
            manifest, raw = read_json_file(manifest_file, what="manifest"), None  # refused, saying what it is
        if isinstance(manifest, dict):  # a VersionError before the schema's errors, as for a config
            check_version(manifest.get("adapterspec_version"), path=str(manifest_file))
        errors = sorted(_validator("manifest").iter_errors(manifest), key=lambda e: list(e.absolute_path))
        if errors:
            _refuse_unsafe_entries(manifest, manifest_file)
            pointer = "".join(f"/{p}" for p in errors[0].absolute_path)
            raise ConfigError(f"manifest: {errors[0].message}", pointer=pointer, path=manifest_file,
                              hint=f"fix {pointer or 'the root'} (see spec/v1/manifest.schema.json)")
        _check_manifest_names(manifest, manifest_file)
        folders: dict[Path, str] = {}  # resolved folder -> the first adapter listed with it
        for name, entry in manifest["adapters"].items():
            check_adapter_name(name)
            target = folder / entry["path"]
            if not _within(folder, target):
                raise UnsafeFileError(f"adapter {name!r} path {entry['path']!r} leaves the folder", path=manifest_file,
                                      hint="use a relative subfolder path without '..'")
            if not _has_config(target):
                raise AdapterNotFoundError(
                    f"the manifest lists adapter {name!r} but {target} holds no {CONFIG_NAME}", path=manifest_file,
                    hint=_staging.missing_config_hint(target, "save that adapter again or remove it from the manifest"))
            twin = folders.setdefault(target.resolve(), name)  # one lookup per entry: linear in the entries
            if twin != name:  # SPEC 3.4: two entries never name the same folder
                raise ConfigError(f"adapters {twin!r} and {name!r} have the same folder {entry['path']!r}",
                                  pointer=f"/adapters/{name}/path", path=manifest_file,
                                  hint="give every adapter its own folder")
            found[name] = target
        saves = {name: entry[SAVE_ID] for name, entry in manifest["adapters"].items() if SAVE_ID in entry}
        return found, saves, raw
    _refuse_dangling(folder, manifest_file)  # a manifest gone missing does not make the folder a PEFT layout
    if _has_config(folder):
        found[DEFAULT_ADAPTER] = folder
    if _access.is_dir(folder):
        for sub in (p for p in _access.entries(folder) if _access.is_dir(p) and _has_config(p)):
            if not _valid_name(sub.name):  # SPEC 3.5: skipped, with a warning
                warnings.warn(f"{sub}: skipped, {sub.name!r} is not a valid adapter name", AdapterSpecWarning,
                              stacklevel=6)  # list_adapters' or read_adapters' caller
                continue
            if not _within(folder, sub):
                raise UnsafeFileError(f"subfolder {sub.name!r} is a link leading outside the folder", path=sub,
                                      hint="replace the link with the adapter folder itself")
            found[sub.name] = sub
    if not found:
        foreign = _foreign.folder_error(folder, CONFIG_NAME) if _access.is_dir(folder) else None
        if foreign is not None:  # a diffusers/kohya/mlx-lm LoRA file: say what it is, not "no adapter here"
            raise foreign
        raise AdapterNotFoundError(f"no {CONFIG_NAME} in the folder or its subfolders", path=folder,
                                   hint=_staging.missing_config_hint(
                                       folder, "pass a folder written by save_pretrained or adapterspec"))
    return found, {}, None


def _has_config(folder: Path) -> bool:
    """Whether ``folder`` holds an adapter's config, after any save putting its files in one by one is done (it
    moves the config aside first: listed meanwhile, the adapter was missing, or the folder refused)."""
    if not _access.exists(folder / CONFIG_NAME):
        _refuse_dangling(folder, folder / CONFIG_NAME)
        _staging.await_save(folder)
    return _access.exists(folder / CONFIG_NAME)

