"""Adapters on the Hugging Face Hub: download only the files an adapter needs, push only valid adapters.

Everything goes through ``huggingface_hub`` (its cache, its token handling, its progress bars).

Where an adapter is on the Hub (``source`` of :func:`adapterspec.load_adapter` and of the functions here):

* ``"org/name"`` or ``"org/name@revision"`` -- a model repo, the adapter in its root;
* ``"hf://org/name"``, ``"hf://org/name@revision"``, ``"hf://org/name/sub/folder"``,
  ``"hf://org/name@revision/sub/folder"`` -- the same, with an optional subfolder in the path.

A revision is a branch, a tag or a full commit sha; one with a ``/`` is percent-encoded
(``hf://org/name@refs%2Fpr%2F1``). ``subfolder=`` and ``revision=`` arguments may be given instead
(not both ways at once). In a repo of several adapters written by :func:`adapterspec.write_adapters`,
``subfolder`` may also be an adapter *name* listed in its manifest ``adapterspec.json``.

Environment, read at each call: ``HF_ENDPOINT`` (another Hub), ``HF_HUB_OFFLINE=1`` (no network:
the adapter must be in the cache), ``HF_TOKEN``, ``ADAPTERSPEC_HUB_TIMEOUT`` (seconds without progress
before a download gives up, default 20); and the rest of huggingface_hub's settings
(``HF_HUB_CACHE``, ``HF_HUB_DISABLE_PROGRESS_BARS``, ...).

Every downloaded or cached file is checked against the digest the Hub announced for it, and every
request is bounded in time (see :mod:`adapterspec._hubsafety` and README's "Safety").

>>> folder = download_adapter("hf://org/my-lora@v2/french")               # doctest: +SKIP
>>> push_to_hub("out/my-lora", "org/my-lora", private=True)               # doctest: +SKIP
'https://huggingface.co/org/my-lora/commit/0123abcd...'
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from . import _access, _safetensors, _snapshot, _staging
from ._foreign import DIFFUSERS_FILE, FOREIGN_HINT
from ._hubsafety import DEFAULT_TIMEOUT, TIMEOUT_ENV, check_cached, check_not_pointer, fetch, watching
from .errors import AdapterSpecError, HubError, UnsafeFileError
from .spec import CONFIG_NAME, MANIFEST_NAME, METADATA_SAVE_ID, PICKLE_NAME, SAFETENSORS_NAME

if TYPE_CHECKING:
    import argparse

    from huggingface_hub import HfApi

__all__ = [
    "DEFAULT_TIMEOUT",
    "TIMEOUT_ENV",
    "HubRef",
    "add_push_parser",
    "download_adapter",
    "download_adapters",
    "parse_hub_ref",
    "push_to_hub",
    "resolve_for_validation",
    "run_push",
]

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_SOURCE_HELP = "name a Hub repo as 'org/name' or 'hf://org/name[@revision][/subfolder]'"


# -- where -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HubRef:
    """An adapter's place on the Hub: repo, revision (``None``: the default branch) and subfolder."""

    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    @property
    def url(self) -> str:
        """The ``hf://`` form, e.g. ``hf://org/name@v2/fr``.

        >>> HubRef("org/name", "refs/pr/1", "fr").url
        'hf://org/name@refs%2Fpr%2F1/fr'
        """
        rev = f"@{quote(self.revision, safe='')}" if self.revision else ""
        return f"hf://{self.repo_id}{rev}" + (f"/{self.subfolder}" if self.subfolder else "")


def _clean_subfolder(subfolder: str | None, spec: str) -> str | None:
    if subfolder is None:
        return None
    parts = [p for p in str(subfolder).replace("\\", "/").split("/") if p not in ("", ".")]
    for part in parts:
        if part == ".." or not _SEGMENT.match(part):
            raise UnsafeFileError(f"subfolder {subfolder!r} is not a safe path inside the repo", path=spec,
                                  hint="use folder names of letters, digits, '.', '_' and '-', without '..'")
    return "/".join(parts) or None


def parse_hub_ref(source: str, *, subfolder: str | None = None, revision: str | None = None) -> HubRef:
    """Parse ``"org/name"``, ``"org/name@rev"`` or ``"hf://org/name[@rev][/subfolder]"``.

    :raises HubError: not a repo id, or the same thing given twice with different values.

    >>> parse_hub_ref("hf://org/name@v2/fr")
    HubRef(repo_id='org/name', revision='v2', subfolder='fr')
    >>> parse_hub_ref("org/name", subfolder="fr/", revision="main")
    HubRef(repo_id='org/name', revision='main', subfolder='fr')
    """
    text = str(source).strip()
    is_url = text.startswith("hf://")
    parts = text[5:].strip("/").split("/") if is_url else text.split("/")
    if is_url and parts and parts[0] in ("datasets", "spaces", "buckets", "kernels"):
        raise HubError(f"{parts[0]} repos do not hold adapters", path=text, hint="adapters live in model repos: hf://org/name")
    if len(parts) < 2 or (not is_url and len(parts) != 2):
        raise HubError("neither an existing local folder nor a Hub repo id", path=text,
                       hint=f"check the local path, or {_SOURCE_HELP}")
    name, _, url_rev = parts[1].partition("@")
    repo_id = f"{parts[0]}/{name}"
    if not (_SEGMENT.match(parts[0]) and _SEGMENT.match(name)) or len(repo_id) > 96 or ".." in repo_id or "--" in repo_id:
        raise HubError(f"{repo_id!r} is not a valid Hub repo id", path=text, hint=_SOURCE_HELP)
    url_sub = _clean_subfolder("/".join(parts[2:]), text) if len(parts) > 2 else None
    url_revision = unquote(url_rev) if url_rev else None
    if revision is not None and url_revision is not None and revision != url_revision:
        raise HubError(f"two revisions given: {url_revision!r} in the source and revision={revision!r}", path=text,
                       hint="give the revision once")
    sub = _clean_subfolder(subfolder, text)
    if sub is not None and url_sub is not None and sub != url_sub:
        raise HubError(f"two subfolders given: {url_sub!r} in the source and subfolder={subfolder!r}", path=text,
                       hint="give the subfolder once")
    rev = revision or url_revision
    if rev is not None and (not rev.strip() or rev.startswith("/") or ".." in rev.split("/") or "\\" in rev):
        raise HubError(f"{rev!r} is not a valid revision", path=text, hint="use a branch, tag or commit sha")
    return HubRef(repo_id, rev, sub or url_sub)


# -- environment -----------------------------------------------------------------------------------
def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or _is_true(os.environ.get("HF_HUB_OFFLINE")) or _is_true(
        os.environ.get("TRANSFORMERS_OFFLINE"))


def _endpoint() -> str | None:
    """``HF_ENDPOINT`` now (huggingface_hub reads it once, at import)."""
    value = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return value or None


def _endpoint_name() -> str:
    from huggingface_hub import constants

    return _endpoint() or constants.ENDPOINT


def _api(token: str | bool | None) -> HfApi:
    from huggingface_hub import HfApi

    return HfApi(endpoint=_endpoint(), token=token, library_name="adapterspec")


def _redirect_errors() -> tuple[type[BaseException], ...]:
    """httpx's ``TooManyRedirects`` (a redirect loop), from whichever httpx huggingface_hub uses."""
    import importlib

    types: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):
        try:
            types.append(importlib.import_module(module).TooManyRedirects)
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions meaning "the Hub cannot be reached" (huggingface_hub 1.x+ uses httpx / httpx2)."""
    import importlib

    types: list[type[BaseException]] = [ConnectionError, TimeoutError]  # OfflineModeIsEnabled is a ConnectionError
    for module in ("httpx2", "httpx"):
        try:
            types.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(types)


@contextmanager
def _hub_errors(ref: HubRef, *, plain: bool = False, action: str = "download") -> Iterator[None]:
    """Turn huggingface_hub's exceptions for expected failures into :class:`HubError` naming what and the fix."""
    from huggingface_hub import errors as hf

    where = ref.url
    try:
        yield
    except AdapterSpecError:
        raise
    except hf.GatedRepoError:
        raise HubError(f"repository {ref.repo_id!r} is gated", path=where,
                       hint="accept its conditions on its Hub page, then pass token= (or set HF_TOKEN)") from None
    except hf.RepositoryNotFoundError:
        local = f" (and there is no local folder {ref.repo_id!r})" if plain else ""
        raise HubError(f"repository {ref.repo_id!r} not found on {_endpoint_name()}{local}", path=where,
                       hint="check the repo id; a private repo needs token= (or HF_TOKEN / `hf auth login`)"
                       + ("" if action == "download" else "; create it or pass create_repo=True")) from None
    except hf.RevisionNotFoundError:
        raise HubError(f"revision {ref.revision!r} not found in {ref.repo_id!r}", path=where,
                       hint="use an existing branch, tag or full commit sha (HfApi().list_repo_refs lists them)") from None
    except hf.RemoteEntryNotFoundError as exc:
        raise HubError(f"file not found in {ref.repo_id!r} at revision {ref.revision or 'main'!r}: "
                       f"{str(exc).splitlines()[-1][:200]}", path=where,
                       hint="check subfolder= and the revision; the repo's files are listed on its Hub page") from None
    except (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled):
        if action != "download":
            raise _offline_error(ref, action) from None
        raise _not_cached(ref, "offline mode is on (HF_HUB_OFFLINE=1)" if _offline() else
                          f"{_endpoint_name()} cannot be reached") from None
    except hf.HFValidationError as exc:
        raise HubError(f"not a valid Hub repo id or revision: {exc}", path=where, hint=_SOURCE_HELP) from None
    except RuntimeError as exc:
        failed = _failed_upload(ref, exc)
        if failed is None:
            raise
        raise failed from None
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if getattr(exc, "response", None) is not None else "?"
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        hint = ("your token is invalid or lacks write access: pass token= with write rights" if status in (401, 403)
                else "retry later; if it persists, check HF_ENDPOINT and the Hub's status")
        raise HubError(f"the Hub refused to {action} (HTTP {status}): {first}", path=where, hint=hint) from None
    except _redirect_errors() as exc:
        raise HubError(f"the Hub redirected in a loop: {str(exc).splitlines()[0][:300]}", path=where,
                       hint="retry later; if it persists, check HF_ENDPOINT and any proxy in between") from None
    except _network_errors() as exc:
        if action == "download":
            raise _not_cached(ref, f"{_endpoint_name()} cannot be reached ({type(exc).__name__})") from None
        raise HubError(f"cannot reach {_endpoint_name()}: {exc}", path=where,
                       hint="check your connection, proxy and HF_ENDPOINT") from None


_UPLOAD_WRAPPER = re.compile(r"^Error while uploading '(.*)' to the Hub\.$", re.DOTALL)


def _failed_upload(ref: HubRef, exc: RuntimeError) -> HubError | None:
    """The :class:`HubError` for huggingface_hub's ``RuntimeError("Error while uploading 'NAME' to the Hub.")``
    (its wrapper around one file's LFS upload, sent before the commit), or ``None`` for a ``RuntimeError`` that is
    not that wrapper around a Hub refusal or a transport failure (a bug somewhere: left as it is)."""
    from huggingface_hub import errors as hf

    cause, match = exc.__cause__, _UPLOAD_WRAPPER.match(str(exc))
    if match is None or not isinstance(cause, (hf.HfHubHTTPError, *_redirect_errors(), *_network_errors())):
        return None
    retry = "then retry the push (the repo is unchanged)"
    if isinstance(cause, hf.HfHubHTTPError):
        status = cause.response.status_code if getattr(cause, "response", None) is not None else "?"
        why = f"HTTP {status}: {' '.join(str(cause).split())[:300] or type(cause).__name__}"
        hint = (f"pass token= with write rights to {ref.repo_id!r}, {retry}" if status in (401, 403)
                else "retry the push; if it persists, check HF_ENDPOINT and the Hub's status (the repo is unchanged)")
    else:
        why = f"the connection broke ({type(cause).__name__}: {' '.join(str(cause).split())[:300]})"
        hint = f"check your connection, proxy and HF_ENDPOINT, {retry}"
    return HubError(f"uploading {match.group(1)!r} failed: {why}; nothing was committed", path=ref.url, hint=hint)


def _offline_error(ref: HubRef, action: str) -> HubError:
    return HubError(f"cannot {action}: offline mode is on (HF_HUB_OFFLINE=1)", path=ref.url,
                    hint="unset HF_HUB_OFFLINE (or set it to 0) to reach the Hub")


def _not_cached(ref: HubRef, reason: str) -> HubError:
    return HubError(f"the adapter is not in the local Hugging Face cache and {reason}", path=ref.url,
                    hint="download it once online (unset HF_HUB_OFFLINE), or pass cache_dir= where it is cached")


# -- download ----------------------------------------------------------------------------------------
def _join(*parts: str | None) -> str:
    """Repo paths joined with ``/``, empty parts (the root) left out."""
    return "/".join(p for p in parts if p)


def _manifest_adapters(text: str) -> dict[str, str]:
    """name -> folder (relative to the manifest, ``""`` for its own) of a manifest's adapters; ``{}`` if
    unreadable, and entries leaving the folder are left out (the full check happens when it is read)."""
    try:
        entries = json.loads(text)["adapters"]
        paths = {str(name): PurePosixPath(str(entry["path"])).parts for name, entry in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}
    return {name: _join(*(p for p in parts if p != ".")) for name, parts in paths.items()
            if ".." not in parts and not (parts and parts[0] == "/")}


def _adapter_folders(files: set[str], container: str) -> list[str]:
    """The folders (relative to the repo root) in or under ``container`` that hold an adapter config."""
    prefix = f"{container}/" if container else ""
    return sorted(f[: -len(CONFIG_NAME)].rstrip("/") for f in files
                  if f.startswith(prefix) and f.rpartition("/")[2] == CONFIG_NAME)


def _pick_files(ref: HubRef, files: set[str], folder: str) -> list[str]:
    """The files one adapter in ``folder`` needs: its config and its weights (safetensors, else the pickle)."""
    for weights in (SAFETENSORS_NAME, PICKLE_NAME):
        if _join(folder, weights) in files:
            return [_join(folder, CONFIG_NAME), _join(folder, weights)]
    raise HubError(f"{_join(folder, CONFIG_NAME)} has no {SAFETENSORS_NAME} (nor {PICKLE_NAME}) beside it in "
                   f"{ref.repo_id!r}", path=ref.url, hint="push the adapter's weights too (adapterspec push uploads both)")


def _locate(ref: HubRef, files: set[str], read: Callable[[str], str]) -> tuple[str, list[str]]:
    """The adapter's folder in the repo, and the manifests to download with it.

    :param read: repo path -> text of that file (to read a manifest).
    """
    sub = ref.subfolder or ""
    if _join(sub, CONFIG_NAME) in files:
        return sub, [m for m in [_join(sub, MANIFEST_NAME)] if m in files]
    # ``subfolder`` may name an adapter listed in the manifest of the folder above it
    parent, _, name = sub.rpartition("/")
    manifest = _join(parent, MANIFEST_NAME)
    if sub and manifest in files:
        path = _manifest_adapters(read(manifest)).get(name)
        if path is not None and _join(parent, path, CONFIG_NAME) in files:
            return _join(parent, path), [manifest]
    where = repr(sub) if sub else "the repo root"
    found = [(f.removeprefix(f"{sub}/") if sub else f) or "." for f in _adapter_folders(files, sub)]
    if found:
        raise HubError(f"no {CONFIG_NAME} in {where} of {ref.repo_id!r}; it holds adapters in: {', '.join(found[:10])}",
                       path=ref.url, hint="choose one with subfolder= (or hf://org/name/<subfolder>)")
    if _join(sub, DIFFUSERS_FILE) in files:  # a Stable Diffusion LoRA repo: say what it holds (by name, not read)
        raise HubError(f"no {CONFIG_NAME} in {where} of {ref.repo_id!r}: it holds {DIFFUSERS_FILE}, a diffusers-format "
                       "LoRA file, not a PEFT-format adapter", path=ref.url, hint=FOREIGN_HINT)
    raise HubError(f"no adapter in {where} of {ref.repo_id!r} (no {CONFIG_NAME})", path=ref.url,
                   hint="check the repo id, subfolder and revision; push an adapter with `adapterspec push`")


def _cached(ref: HubRef, filename: str, cache_dir: str | Path | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(ref.repo_id, filename, cache_dir=cache_dir, revision=ref.revision or "main")
    return found if isinstance(found, str) else None


def _from_cache(ref: HubRef, cache_dir: str | Path | None, reason: str) -> Path:
    """The adapter's folder in the cache, found without any network call."""
    folder = ref.subfolder or ""
    config = _cached(ref, _join(folder, CONFIG_NAME), cache_dir)
    if config is None and folder:  # an adapter name listed in the manifest above it?
        parent, _, name = folder.rpartition("/")
        manifest = _cached(ref, _join(parent, MANIFEST_NAME), cache_dir)
        path = _manifest_adapters(Path(manifest).read_text("utf-8")).get(name) if manifest else None
        if path is not None:
            folder = _join(parent, path)
            config = _cached(ref, _join(folder, CONFIG_NAME), cache_dir)
    if config is None:
        raise _not_cached(ref, reason)
    if not any(_cached(ref, _join(folder, weights), cache_dir) for weights in (SAFETENSORS_NAME, PICKLE_NAME)):
        raise _not_cached(ref, f"only its config is cached, and {reason}")
    _check_folder(ref, Path(config).parent, [CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME])
    return Path(config).parent


def _storage(ref: HubRef, cache_dir: str | Path | None) -> Path:
    """The repo's folder in huggingface_hub's cache (``<cache>/models--org--name``)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=ref.repo_id, repo_type="model")


def _file_url(ref: HubRef, filename: str) -> str:
    return f"{HubRef(ref.repo_id, ref.revision).url}/{filename}"


def _download(ref: HubRef, wanted: list[str], sha: str, *, token: str | bool | None,
              cache_dir: str | Path | None) -> Path:
    """Download ``wanted`` (repo paths) at commit ``sha``, each checked (:func:`fetch`); the snapshot folder.

    One file at a time, in this thread (where the download's watchdog is); huggingface_hub shows a bar
    of the files, as its ``snapshot_download`` does, and one of the bytes of each file on a terminal.
    """
    from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

    bar = hf_tqdm(total=len(wanted), desc=f"Fetching {len(wanted)} files",  # type: ignore[no-untyped-call]  # unannotated
                  name="huggingface_hub.snapshot_download")
    with bar:
        for filename in wanted:
            fetch(ref.repo_id, filename, revision=sha, where=_file_url(ref, filename), token=token,
                  cache_dir=cache_dir, endpoint=_endpoint())
            bar.update()
    # what huggingface_hub's snapshot_download records, so that the revision is found offline too
    storage = _storage(ref, cache_dir)
    ref_file = storage / "refs" / (ref.revision or "main")
    if ref.revision != sha and (not ref_file.is_file() or ref_file.read_text().strip() != sha):
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(sha)
    return storage / "snapshots" / sha


def _check_folder(ref: HubRef, folder: Path, files: list[str]) -> None:
    """Check cached files (paths relative to the snapshot's ``folder``) against the Hub's digests, offline."""
    snapshot = folder
    while snapshot.parent.name != "snapshots" and snapshot.parent != snapshot:
        snapshot = snapshot.parent
    for name in files:
        path = folder / name
        if path.exists():
            filename = path.relative_to(snapshot).as_posix()
            check_cached(path, filename, _file_url(ref, filename), online=False)
            check_not_pointer(path, filename, _file_url(ref, filename))


def download_adapter(repo_id_or_hf_url: str, *, subfolder: str | None = None, revision: str | None = None,
                     token: str | bool | None = None, cache_dir: str | Path | None = None,
                     timeout: float | None = None) -> Path:
    """Download one adapter from the Hub (only its config and weights) and return its local folder.

    Files go to huggingface_hub's cache and are reused: a cached adapter loads with no network call
    when ``HF_HUB_OFFLINE=1`` (or when the Hub cannot be reached). Only ``adapter_config.json`` and
    ``adapter_model.safetensors`` are fetched -- ``adapter_model.bin`` only when the repo has no
    safetensors file -- plus the manifest ``adapterspec.json`` of a multi-adapter repo.

    Every file is checked against the digest the Hub announced for it (its ETag: the sha256 of an LFS
    file, the git blob id of a regular one) before it is returned, online and from the cache; a
    mismatch removes that file from the cache (a retry downloads it again) and raises
    :class:`~adapterspec.IntegrityError`. Every request is bounded by ``timeout``, and the download
    gives up when ``timeout`` seconds pass without progress (a response, a finished file, or 64 KiB of
    a body); huggingface_hub shows its progress bars meanwhile.

    :param repo_id_or_hf_url: ``"org/name"``, ``"org/name@rev"`` or ``"hf://org/name[@rev][/subfolder]"``.
    :param subfolder: the adapter's folder in the repo, or an adapter name from the repo's manifest.
    :param revision: branch, tag or commit sha (default: the default branch).
    :param token: Hub token (default: ``HF_TOKEN`` or the saved login); ``False`` sends none.
    :param cache_dir: huggingface_hub cache folder (default: ``HF_HUB_CACHE``).
    :param timeout: seconds without progress before giving up (default: ``ADAPTERSPEC_HUB_TIMEOUT``, else 20).
    :raises HubError: repo, revision or file not found, not cached while offline, the Hub failed, a
        transfer ended early or stalled; the message names the repo, revision and file, and the fix.
    :raises IntegrityError: a file is not what the Hub announced (the bad copy is removed from the cache).

    >>> download_adapter("hf://org/my-lora@v2", subfolder="fr")                # doctest: +SKIP
    PosixPath('~/.cache/huggingface/hub/models--org--my-lora/snapshots/<sha>/fr')
    """
    ref = parse_hub_ref(repo_id_or_hf_url, subfolder=subfolder, revision=revision)
    plain = not str(repo_id_or_hf_url).startswith("hf://")
    if _offline():
        return _from_cache(ref, cache_dir, "offline mode is on (HF_HUB_OFFLINE=1)")
    with _hub_errors(ref, plain=plain), watching(ref.url, timeout) as dog:
        try:
            info = _api(token).model_info(ref.repo_id, revision=ref.revision, timeout=dog.timeout)
        except _network_errors() as exc:  # the Hub is unreachable: use the cache, like huggingface_hub does
            return _from_cache(ref, cache_dir, _unreachable(exc, dog.timeout))
        files, sha = {s.rfilename for s in info.siblings or []}, _commit(ref, info.sha)
        folder, manifests = _locate(ref, files, lambda name: _read(ref, name, sha, token, cache_dir))
        snapshot = _download(ref, _pick_files(ref, files, folder) + manifests, sha, token=token, cache_dir=cache_dir)
    return snapshot / folder if folder else snapshot


def _commit(ref: HubRef, sha: str | None) -> str:
    if sha is None or not _COMMIT_SHA.match(sha):
        raise HubError(f"the Hub named no commit for {ref.repo_id!r} (got {sha!r})", path=ref.url,
                       hint="check HF_ENDPOINT: it must point at a Hugging Face Hub (or a mirror of its API)")
    return sha


def _unreachable(exc: BaseException, timeout: float) -> str:
    """Why the Hub's API did not answer, for a "not in the cache and ..." message."""
    if "Timeout" in type(exc).__name__:
        return f"{_endpoint_name()} did not answer within {timeout:g} s ({type(exc).__name__})"
    return f"{_endpoint_name()} cannot be reached ({type(exc).__name__})"


def _read(ref: HubRef, filename: str, commit: str, token: str | bool | None, cache_dir: str | Path | None) -> str:
    """One (small) file of the repo at ``commit``, through the cache."""
    path = fetch(ref.repo_id, filename, revision=commit, where=_file_url(ref, filename), token=token,
                 cache_dir=cache_dir, endpoint=_endpoint())
    return path.read_text("utf-8")


def download_adapters(repo_id_or_hf_url: str, *, subfolder: str | None = None, revision: str | None = None,
                      token: str | bool | None = None, cache_dir: str | Path | None = None,
                      timeout: float | None = None) -> Path:
    """Download every adapter of a repo (or of one of its subfolders) and return the local folder holding them.

    The folder reads with :func:`adapterspec.read_adapters` / :func:`adapterspec.list_adapters`: its
    manifest and each adapter it lists (or, without a manifest, the adapter at the top and those in
    its immediate subfolders, PEFT's layout). Only config and weights files are fetched, each checked
    and bounded in time as by :func:`download_adapter` (same errors, same ``timeout``).

    >>> adapterspec.read_adapters(download_adapters("org/several"))            # doctest: +SKIP
    {'default': Adapter(...), 'fr': Adapter(...)}
    """
    ref = parse_hub_ref(repo_id_or_hf_url, subfolder=subfolder, revision=revision)
    plain = not str(repo_id_or_hf_url).startswith("hf://")
    if _offline():
        return _cached_container(ref, cache_dir, "offline mode is on (HF_HUB_OFFLINE=1)")
    with _hub_errors(ref, plain=plain), watching(ref.url, timeout) as dog:
        try:
            info = _api(token).model_info(ref.repo_id, revision=ref.revision, timeout=dog.timeout)
        except _network_errors() as exc:
            return _cached_container(ref, cache_dir, _unreachable(exc, dog.timeout))
        files, sha = {s.rfilename for s in info.siblings or []}, _commit(ref, info.sha)
        container = ref.subfolder or ""
        manifest = _join(container, MANIFEST_NAME)
        if manifest in files:
            listed = _manifest_adapters(_read(ref, manifest, sha, token, cache_dir)).values()
            folders, extra = [_join(container, path) for path in listed], [manifest]
        else:  # PEFT's layout: the adapter on top and those one folder down
            depth = len(container.split("/")) if container else 0
            folders = [f for f in _adapter_folders(files, container) if len(f.split("/")) <= depth + 1 or not f]
            extra = []
        if not folders:
            _locate(ref, files, lambda name: "{}")  # raises the right "no adapter here" error
        wanted = [f for folder in folders for f in _pick_files(ref, files, folder)] + extra
        snapshot = _download(ref, wanted, sha, token=token, cache_dir=cache_dir)
    return snapshot / container if container else snapshot


def _cached_container(ref: HubRef, cache_dir: str | Path | None, reason: str) -> Path:
    """The snapshot folder of ``ref`` in the cache (whatever of it was downloaded), without network."""
    storage = _storage(ref, cache_dir)
    revision = ref.revision or "main"
    ref_file = storage / "refs" / revision
    sha = revision if _COMMIT_SHA.match(revision) else (ref_file.read_text().strip() if ref_file.is_file() else None)
    folder = storage / "snapshots" / sha / (ref.subfolder or "") if sha else None
    if folder is None or not folder.is_dir():
        raise _not_cached(ref, reason)
    _check_folder(ref, folder, [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()])
    return folder


def resolve_for_validation(spec: str, *, revision: str | None = None, token: str | bool | None = None,
                           cache_dir: str | Path | None = None, timeout: float | None = None) -> Path:
    """The local path to validate for ``spec``: itself if it exists locally, else every adapter of the
    Hub repo (``hf://org/name[@rev][/subfolder]`` or ``org/name``) downloaded (see :func:`download_adapters`).

    >>> resolve_for_validation("hf://org/my-lora")                              # doctest: +SKIP
    PosixPath('~/.cache/huggingface/hub/models--org--my-lora/snapshots/<sha>')
    """
    if not spec.startswith("hf://") and _access.exists(spec):
        return Path(spec)
    return download_adapters(spec, revision=revision, token=token, cache_dir=cache_dir, timeout=timeout)


# -- push --------------------------------------------------------------------------------------------
def _copy_files(source: Path, target: Path, snapshot: _snapshot.Snapshot) -> None:
    """Copy ``source``'s config and weights into ``target`` through ``snapshot`` (files of one save)."""
    from .adapter import _refuse_dangling

    weights = SAFETENSORS_NAME if (source / SAFETENSORS_NAME).exists() or not (source / PICKLE_NAME).exists() \
        else PICKLE_NAME
    for name in (CONFIG_NAME, weights):
        if name == weights and not (source / name).exists():
            _refuse_dangling(source, source / name)
            continue  # no weights: the validation of the copy says so
        with open(target / name, "wb") as out:
            shutil.copyfileobj(snapshot.open(name, source / name), out)  # held open until the snapshot ends


def _upload_plan(folder: Path, stage: Path, *, allow_pickle: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """Copy every adapter of ``folder`` into ``stage`` and validate the copies: (name -> Adapter, name -> relative
    path). Each adapter's config and weights are copied as one snapshot (from one save, whatever another process
    saves there meanwhile: copied one after the other by path, they could pair one save's config with the next
    save's weights), the adapters and the manifest as one save of the set (:func:`adapterspec.folder.read_set`:
    copied one after the other, they could be of two saves of it), and what is validated is what is uploaded.

    :raises AdapterSpecError: the first validation error, naming the file in ``folder`` (nothing is uploaded).
    :raises IntegrityError: the folder holds adapters of two saves of its set (nothing is uploaded).
    """
    from .adapter import read_adapter, validate_adapter
    from .folder import read_set

    if not _access.is_dir(folder):
        from .errors import FileFormatError

        raise FileFormatError("no such adapter folder", path=folder, hint="pass a folder written by save_adapter")
    scratch = stage.parent / "copies"
    scratch.mkdir(parents=True, exist_ok=True)

    def copy(path: Path) -> tuple[Path, Path]:
        """(the adapter's folder, its copy): a fresh one for each read, as a set read again may list others."""
        target = Path(tempfile.mkdtemp(dir=scratch))
        _snapshot.read_consistently(path, functools.partial(_copy_files, path, target),
                                    watch=(CONFIG_NAME, SAFETENSORS_NAME), in_progress=_staging.save_in_progress)
        return path, target

    copies, manifest = read_set(folder, copy, lambda pair: _safetensors.read_metadata_value(
        pair[1] / SAFETENSORS_NAME, METADATA_SAVE_ID))
    stage.mkdir(parents=True, exist_ok=True)
    adapters, paths = {}, {}
    for name, (path, copied) in copies.items():
        rel = path.resolve().relative_to(folder.resolve()).as_posix()
        target = stage / rel
        target.mkdir(parents=True, exist_ok=True)
        for file in copied.iterdir():
            os.replace(file, target / file.name)
        errors = validate_adapter(target, allow_pickle=allow_pickle)
        if errors:
            error = errors[0]
            if error.path and Path(error.path).is_relative_to(target):  # name the user's file, not the copy
                error.path = str(path / Path(error.path).relative_to(target))
            raise error
        adapters[name] = read_adapter(target, allow_pickle=allow_pickle)
        paths[name] = rel
    if manifest is not None:  # the very manifest the copies were checked against
        (stage / MANIFEST_NAME).write_bytes(manifest)
    return adapters, paths


def push_to_hub(folder_or_model: Any, repo_id: str, *, adapter_name: str | list[str] = "default",
                subfolder: str | None = None, revision: str | None = None, token: str | bool | None = None,
                private: bool | None = None, commit_message: str | None = None, create_repo: bool = True,
                model_card: str | None = None, allow_pickle: bool = False) -> str:
    """Validate an adapter (or a folder of several) and upload it to a Hub model repo, with a model card.

    A model is first saved with :func:`adapterspec.save_adapter` (``adapter_name`` a list: with
    :func:`adapterspec.save_adapters`) into a temporary folder. Every adapter is validated
    (:func:`adapterspec.validate_adapter`, checksum included) before anything is sent: an invalid
    one is refused with its validation error and nothing is uploaded. Only the adapter files go up
    (config, weights, the manifest of a multi-adapter folder) plus a ``README.md`` model card, in one
    commit; huggingface_hub shows upload progress bars.

    :param folder_or_model: an adapter folder, a folder written by :func:`adapterspec.write_adapters`,
        or a model holding adapters.
    :param repo_id: ``"org/name"`` (or ``"hf://org/name"``).
    :param subfolder: put the adapter(s) in this folder of the repo (several adapters can share a repo).
    :param revision: the branch to commit to; created from the default branch if missing.
    :param private: visibility of a repo created now (an existing repo keeps its own).
    :param create_repo: create the repo if it does not exist.
    :param model_card: the README.md text to upload instead of the generated card.
    :param allow_pickle: push an adapter whose weights are only ``adapter_model.bin``.
    :returns: the commit URL (a :class:`huggingface_hub.CommitInfo`, a ``str`` with ``.oid``).
    :raises AdapterSpecError: the adapter is invalid (nothing uploaded).
    :raises HubError: the Hub refused (no write access, repo missing with ``create_repo=False``, ...), or
        a file's upload failed (refused, connection broken: nothing committed).

    >>> push_to_hub(model, "org/my-lora", subfolder="fr", revision="v2")      # doctest: +SKIP
    'https://huggingface.co/org/my-lora/commit/...'
    """
    ref = parse_hub_ref(repo_id, subfolder=subfolder, revision=revision)
    with tempfile.TemporaryDirectory(prefix="adapterspec-push-") as tmp:
        if isinstance(folder_or_model, (str, os.PathLike)):
            folder = Path(folder_or_model)
            if folder.name == CONFIG_NAME and _access.is_file(folder):
                folder = folder.parent
        elif isinstance(adapter_name, str):
            from .api import save_adapter

            folder = save_adapter(folder_or_model, Path(tmp) / "model", adapter_name)
        else:
            from .api import save_adapters

            folder = save_adapters(folder_or_model, Path(tmp) / "model", list(adapter_name))
        stage = Path(tmp) / "stage"
        adapters, paths = _upload_plan(folder, stage, allow_pickle=allow_pickle)
        if model_card is None:
            from ._modelcard import build_model_card

            model_card = str(build_model_card(adapters, ref.repo_id, paths=paths, subfolder=ref.subfolder))
        (stage / "README.md").write_text(model_card, "utf-8")
        if _offline():
            raise _offline_error(ref, "upload")
        names = ", ".join(adapters)
        message = commit_message or f"Upload adapter{'s' if len(adapters) > 1 else ''} {names} with adapterspec"
        api = _api(token)
        with _hub_errors(ref, action="upload"):
            if create_repo:
                api.create_repo(ref.repo_id, private=private, exist_ok=True)
            if ref.revision and ref.revision != "main" and not _COMMIT_SHA.match(ref.revision):
                api.create_branch(ref.repo_id, branch=ref.revision, exist_ok=True)
            return api.upload_folder(repo_id=ref.repo_id, folder_path=stage, path_in_repo=ref.subfolder,
                                     revision=ref.revision, commit_message=message)


def add_push_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``adapterspec push FOLDER REPO_ID [--subfolder] [--revision] [--private] [--token] [-m]``."""
    p = subparsers.add_parser("push", help="validate an adapter folder and upload it to the Hugging Face Hub",
                              description="Validate every adapter in FOLDER (refused if invalid: nothing is uploaded), "
                              "then upload its config and weights with a model card to the Hub model repo REPO_ID.")
    p.add_argument("folder", metavar="FOLDER", help="an adapter folder, or a folder of several with adapterspec.json")
    p.add_argument("repo_id", metavar="REPO_ID", help="org/name (created if missing)")
    p.add_argument("--subfolder", help="folder inside the repo to upload into")
    p.add_argument("--revision", help="branch to commit to (created if missing)")
    p.add_argument("--private", action="store_true", default=None, help="create the repo private")
    p.add_argument("--token", help="Hub token with write access (default: HF_TOKEN or the saved login)")
    p.add_argument("-m", "--message", dest="commit_message", help="commit message")
    p.add_argument("--no-create", dest="create_repo", action="store_false", help="fail if the repo does not exist")
    p.add_argument("--allow-pickle", action="store_true", help="push adapters stored as adapter_model.bin")
    p.set_defaults(func=run_push)
    return p


def run_push(args: argparse.Namespace) -> int:
    """Run ``adapterspec push``: print the commit URL; 0 on success (errors propagate to the CLI's handler)."""
    url = push_to_hub(args.folder, args.repo_id, subfolder=args.subfolder, revision=args.revision, token=args.token,
                      private=args.private, commit_message=args.commit_message, create_repo=args.create_repo,
                      allow_pickle=args.allow_pickle)
    print(url)
    return 0
