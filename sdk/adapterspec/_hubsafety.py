"""What makes a file downloaded from the Hub safe to use: it is what the Hub announced, and getting it ends.

* **Integrity.** huggingface_hub stores each downloaded file as a blob named after the ETag the Hub
  sent for it -- the sha256 of an LFS (or Xet) file, the git blob id (sha1 of ``b"blob <size>\\0" +
  content``) of a regular one -- and links the snapshot's file name to it. :func:`check_cached`
  recomputes that digest from the bytes; a mismatch removes the blob and the link (so a retry downloads
  it again) and raises :class:`IntegrityError`. A cache without symlinks keeps no ETag: such a file is
  checked online against a fresh ``HEAD`` of the file, and not at all offline.
* **Time.** :func:`watching` puts a :class:`Watchdog` on the current context: every request
  huggingface_hub sends from it gets connect/read/write timeouts of at most ``timeout`` seconds, and
  the download gives up with :class:`HubError` once ``timeout`` seconds pass without progress (a
  response, a file finished, or each 64 KiB of a body -- a body trickling in byte by byte is a stall).
  Xet transfers (hf_xet, outside httpx) are bounded by hf_xet's own timeouts. The checks are two event
  hooks on huggingface_hub's shared HTTP client, inert outside :func:`watching`.

>>> with watching("hf://org/name", timeout=30):                          # doctest: +SKIP
...     path = fetch("org/name", "adapter_config.json", revision=sha, where="hf://org/name")
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from ._safetensors import check_not_lfs_pointer
from .errors import HubError, IntegrityError
from .spec import CONFIG_NAME, MANIFEST_NAME

__all__ = ["DEFAULT_TIMEOUT", "TIMEOUT_ENV", "Watchdog", "check_cached", "fetch", "resolve_timeout", "watching"]

#: Seconds a download may go without progress before it gives up (``timeout=`` and :data:`TIMEOUT_ENV` override it).
DEFAULT_TIMEOUT = 20.0
#: The environment variable giving the download functions' default ``timeout``, in seconds.
TIMEOUT_ENV = "ADAPTERSPEC_HUB_TIMEOUT"
_PROGRESS_BYTES = 64 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_GIT_SHA1 = re.compile(r"^[0-9a-f]{40}$")


def resolve_timeout(timeout: float | None) -> float:
    """``timeout`` if given, else :data:`TIMEOUT_ENV`, else :data:`DEFAULT_TIMEOUT`; a positive number of seconds.

    :raises HubError: not a positive, finite number.

    >>> resolve_timeout(2.5)
    2.5
    """
    source, shown = "timeout", repr(timeout)
    if timeout is None:
        raw = os.environ.get(TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_TIMEOUT
        source, shown = TIMEOUT_ENV, repr(raw)
        try:
            timeout = float(raw)
        except ValueError:
            timeout = math.nan
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not (math.isfinite(timeout) and timeout > 0)):
        raise HubError(f"{source}={shown} is not a positive number of seconds",
                       hint=f"pass timeout= in seconds, or set {TIMEOUT_ENV} (default {DEFAULT_TIMEOUT:g})")
    return float(timeout)


class Watchdog:
    """A download's clock: :meth:`check` raises once ``timeout`` seconds have passed without :meth:`progress`.

    >>> dog = Watchdog("hf://org/name", 30.0)
    >>> dog.progress(1024); dog.check()
    """

    def __init__(self, where: str, timeout: float) -> None:
        self.where, self.timeout = where, timeout
        self.doing = "asking the Hub for the repo's files"
        self._last = time.monotonic()
        self._bytes = 0

    def progress(self, nbytes: int = 0) -> None:
        """Something arrived: a response or a finished file (``nbytes=0``), or ``nbytes`` of a body."""
        if nbytes > 0:
            self._bytes += nbytes
            if self._bytes < _PROGRESS_BYTES:
                return
        self._bytes = 0
        self._last = time.monotonic()

    def check(self) -> None:
        """:raises HubError: no progress for longer than ``timeout``."""
        idle = time.monotonic() - self._last
        if idle > self.timeout:
            raise HubError(f"no progress for {idle:.1f} s (timeout {self.timeout:g} s) while {self.doing}; "
                           "an unfinished file is not kept", path=self.where,
                           hint=f"retry; on a slow connection raise timeout= (or {TIMEOUT_ENV}, in seconds)")


_ACTIVE: ContextVar[Watchdog | None] = ContextVar("adapterspec_hub_watchdog", default=None)


@contextmanager
def watching(where: str, timeout: float | None) -> Iterator[Watchdog]:
    """Bound every huggingface_hub request made in this context (see the module docstring).

    :param where: what is downloaded (``hf://org/name``), for the error message.
    :param timeout: seconds without progress (``None``: :func:`resolve_timeout`'s default).
    """
    dog = Watchdog(where, resolve_timeout(timeout))
    token = _ACTIVE.set(dog)
    try:
        _hook_session()
        yield dog
    finally:
        _ACTIVE.reset(token)


def _on_request(request: Any) -> None:
    dog = _ACTIVE.get()
    if dog is None:
        return
    dog.check()  # a retry after a stall is not sent
    limits = dict(request.extensions.get("timeout") or {})
    bounded = {k: dog.timeout if limits.get(k) is None else min(limits[k], dog.timeout)
               for k in ("connect", "read", "write", "pool")}
    request.extensions = {**request.extensions, "timeout": bounded}


def _on_response(response: Any) -> None:
    dog = _ACTIVE.get()
    if dog is not None:
        dog.progress()
        response.stream = _watched_stream(response.stream, dog)


def _watched_stream(stream: Any, dog: Watchdog) -> Any:
    """``stream`` (a response body), reporting each chunk read from the socket to ``dog`` and stopping on a stall.

    Read at this level because httpx hands huggingface_hub the body in 10 MB pieces: a trickle never gets there.
    """
    base = next((b for b in _sync_byte_streams() if isinstance(stream, b)), None)
    if base is None:  # an async or unknown stream: left as it is (the request's timeouts still bound it)
        return stream

    class Watched(base):  # type: ignore[misc, valid-type]
        def __iter__(self) -> Iterator[bytes]:
            for chunk in stream:
                dog.progress(len(chunk))
                dog.check()
                yield chunk

        def close(self) -> None:
            stream.close()

    return Watched()


@functools.cache
def _sync_byte_streams() -> tuple[type, ...]:
    """httpx's ``SyncByteStream``, of each httpx installed (huggingface_hub 2.x uses httpx2)."""
    import importlib

    bases: list[type] = []
    for module in ("httpx2", "httpx"):
        try:
            bases.append(importlib.import_module(module).SyncByteStream)
        except (ImportError, AttributeError):
            pass
    return tuple(bases)


def _hook_session() -> None:
    """Add the watchdog's hooks to huggingface_hub's shared HTTP client (they do nothing outside :func:`watching`).

    huggingface_hub replaces that client after a connection error, mid-download: its client factory is
    wrapped too, so that the new client has the hooks (a factory set later with ``set_client_factory``
    is wrapped at the next download).
    """
    from huggingface_hub.utils import _http

    factory = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
    if callable(factory) and not getattr(factory, "_adapterspec_hooks", False):
        def hooked() -> Any:
            return _add_hooks(factory())

        hooked._adapterspec_hooks = True  # type: ignore[attr-defined]
        _http._GLOBAL_CLIENT_FACTORY = hooked
    _add_hooks(_http.get_session())


def _add_hooks(client: Any) -> Any:
    hooks = client.event_hooks
    if _on_request not in hooks.get("request", []):
        client.event_hooks = {**hooks, "request": [*hooks.get("request", []), _on_request],
                              "response": [*hooks.get("response", []), _on_response]}
    return client


def fetch(repo_id: str, filename: str, *, revision: str, where: str, token: str | bool | None = None,
          cache_dir: str | Path | None = None, endpoint: str | None = None) -> Path:
    """Download one file of a repo through huggingface_hub's cache (or find it there) and :func:`check_cached` it.

    :param revision: a full commit sha (so every file of an adapter comes from the same commit).
    :param where: the file's ``hf://`` address, for messages.
    :raises IntegrityError: the bytes are not what the Hub announced (the bad copy is removed).
    :raises HubError: the transfer ended early, or stalled (see :func:`watching`).
    """
    from huggingface_hub import hf_hub_download

    dog = _ACTIVE.get()
    if dog is not None:
        dog.doing = f"downloading {filename}"
    try:
        path = Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, token=token,
                                    endpoint=endpoint, library_name="adapterspec",
                                    etag_timeout=dog.timeout if dog is not None else DEFAULT_TIMEOUT))
    except OSError as exc:
        if not str(exc).startswith("Consistency check failed"):  # huggingface_hub's size check (a plain OSError)
            raise
        raise HubError(f"the transfer of {filename} ended early: {str(exc).splitlines()[0]}", path=where,
                       hint="retry (the partial file was not kept); if it persists, check HF_ENDPOINT and any proxy",
                       ) from None
    if dog is not None:
        dog.progress()
    check_cached(path, filename, where, online=dog is not None, token=token, endpoint=endpoint)
    if dog is not None:
        dog.progress()  # hashing a large file is not a stall
    check_not_pointer(path, filename, where)
    return path


def check_not_pointer(path: Path, filename: str, where: str) -> None:
    """Refuse a weights file, config or manifest that is a git-LFS pointer committed as a regular file (the Hub
    serves its text; public adapter repos hold such ``adapter_config.json`` files too).

    :raises FileFormatError: it is one (named by its ``hf://`` address ``where``).
    """
    name = filename.rsplit("/", 1)[-1]
    what = "tensors" if name.endswith((".safetensors", ".bin")) else _JSON_FILES.get(name)
    if what is not None:
        check_not_lfs_pointer(path, where=where, what=what, hint="the repo holds the pointer file itself, committed "
                              f"without git-lfs: push the {'weights' if what == 'tensors' else what} file "
                              "(adapterspec push, or huggingface_hub's upload_folder)")


#: The JSON files of an adapter folder, and what they hold (for the pointer refusal's message).
_JSON_FILES = {CONFIG_NAME: "config", MANIFEST_NAME: "manifest"}


def check_cached(path: Path, filename: str, where: str, *, online: bool, token: str | bool | None = None,
                 endpoint: str | None = None) -> None:
    """Check a file of a huggingface_hub cache snapshot against the digest the Hub announced for it.

    :param path: ``.../snapshots/<commit>/<filename>``.
    :param online: may ask the Hub (a cache without symlinks keeps no ETag to check against).
    :raises IntegrityError: a mismatch (the blob and the snapshot's link to it are removed), or the
        announced ETag is neither a sha256 nor a git blob id.

    >>> check_cached(Path("snapshots/<sha>/adapter_model.safetensors"), "adapter_model.safetensors",
    ...              "hf://org/name", online=False)                       # doctest: +SKIP
    """
    if path.is_symlink():
        blob = Path(os.path.realpath(path))
        announced = blob.name
    elif online:
        blob, announced = path, _etag_now(path, filename, token=token, endpoint=endpoint)
    else:
        return  # checked when it was downloaded; the cache kept no ETag to check it against again
    kind = "sha256" if _SHA256.match(announced) else "git blob id" if _GIT_SHA1.match(announced) else None
    if kind is None:
        raise IntegrityError(f"{filename}: the Hub announced ETag {announced!r}, neither a sha256 nor a git blob id, "
                             "so the download cannot be checked", path=where,
                             hint="download from the Hub, or a mirror that passes its ETags on (HF_ENDPOINT)")
    stat = blob.stat()
    actual = _digest(str(blob), kind, stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if actual == announced:
        return
    for bad in (blob, path):  # a retry downloads it again
        bad.unlink(missing_ok=True)
    raise IntegrityError(f"{filename} is not the file the Hub announced: its {kind} is {actual}, the Hub's "
                         f"(ETag) is {announced}; the corrupt copy was removed from the cache", path=where,
                         hint="retry the download" + ("" if online else " online (unset HF_HUB_OFFLINE)")
                         + "; if it fails again, something between you and the Hub (a proxy, HF_ENDPOINT) alters it")


@functools.lru_cache(maxsize=256)
def _digest(path: str, kind: str, size: int, mtime_ns: int, inode: int) -> str:
    """sha256 or git blob id of a file, remembered while the file stays the same (size, mtime, inode)."""
    with open(path, "rb") as f:
        if kind == "sha256":
            return hashlib.file_digest(f, "sha256").hexdigest()
        return hashlib.file_digest(f, lambda: hashlib.sha1(b"blob %d\0" % size)).hexdigest()


def _etag_now(path: Path, filename: str, *, token: str | bool | None, endpoint: str | None) -> str:
    """The ETag the Hub announces now for ``.../snapshots/<commit>/<filename>`` of ``models--org--name``."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    snapshot = path
    for _ in filename.split("/"):
        snapshot = snapshot.parent
    storage = snapshot.parent.parent.name  # models--org--name
    repo_id = "/".join(storage.split("--")[1:])
    dog = _ACTIVE.get()
    meta = get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=snapshot.name, endpoint=endpoint), token=token,
                                timeout=dog.timeout if dog is not None else DEFAULT_TIMEOUT, endpoint=endpoint)
    return meta.etag or ""
