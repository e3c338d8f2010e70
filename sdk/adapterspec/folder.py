"""Writing adapter folders atomically, and folders of several adapters with their manifest.

Layout (SPEC.md section 3): adapter ``default`` in the root, adapter ``name`` in ``<dir>/<name>/``
(PEFT's layout), and ``adapterspec.json`` listing them (PEFT has no such list).

A write never leaves a half-written adapter: files are written to temporary names, flushed to disk,
then renamed into place; a new folder appears by one rename. If anything fails before the renames,
the previous adapter is untouched.

>>> import numpy as np
>>> write_adapter("out/ia3", {"peft_type": "IA3", "target_modules": ["q"], "feedforward_modules": []},
...               {"base_model.model.l.q.ia3_l": np.ones((4, 1), np.float32)})  # doctest: +SKIP
PosixPath('out/ia3')
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Union

from . import _safetensors
from .adapter import Adapter, check_adapter_name
from .checks import TensorInfo, tensor_errors
from .config import AdapterConfig, _validator, read_json_file
from .errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterSpecWarning,
    ConfigError,
    FileFormatError,
    UnsafeFileError,
)
from .spec import (
    CONFIG_NAME,
    MANIFEST_NAME,
    METADATA_FORMAT,
    METADATA_VERSION,
    SAFETENSORS_NAME,
    SPEC_VERSION,
    check_version,
)

__all__ = ["list_adapters", "write_adapter", "write_adapters"]

DEFAULT_ADAPTER = "default"


#: What goes into a file: its bytes, or a function that writes (and fsyncs) the file at a path.
Content = Union[bytes, Callable[[Path], object]]


def _write_file(path: Path, content: Content) -> None:
    if not isinstance(content, bytes):
        content(path)
        return
    with open(path, "wb") as fh:
        fh.write(content)
        fh.flush()
        os.fsync(fh.fileno())


def _prepare(config: AdapterConfig | Mapping[str, Any], tensors: Mapping[str, Any],
             metadata: Mapping[str, str] | None) -> dict[str, Content]:
    """The files of one adapter folder, checked: a folder that would not validate is never written."""
    cfg = config if isinstance(config, AdapterConfig) else AdapterConfig.from_dict(config)
    infos = {k: TensorInfo(tuple(int(d) for d in v.shape), _dtype(v)) for k, v in tensors.items()}
    errors = tensor_errors(cfg, infos)
    if errors:
        raise errors[0]
    meta = {**(metadata or {}), METADATA_FORMAT: "pt", METADATA_VERSION: SPEC_VERSION}
    return {
        SAFETENSORS_NAME: functools.partial(_safetensors.save_file, tensors, metadata=meta),
        CONFIG_NAME: cfg.to_json().encode("utf-8"),
    }


def _dtype(tensor: Any) -> str:
    from .adapter import _dtype_name

    return _dtype_name(tensor)


def _is_adapter(folder: Path) -> bool:
    return (folder / CONFIG_NAME).exists() or (folder / SAFETENSORS_NAME).exists()


def _install(files: Mapping[str, Content], folder: Path, *, overwrite: bool) -> None:
    """Put ``files`` into ``folder`` all-or-nothing (config last: it is what readers look for first)."""
    if folder.exists() and not folder.is_dir():
        raise FileFormatError("exists and is not a folder", path=folder, hint="choose another path")
    if folder.is_dir() and _is_adapter(folder) and not overwrite:
        raise AdapterExistsError("an adapter is already saved here", path=folder,
                                 hint="pass overwrite=True to replace it, or choose another path")
    folder.parent.mkdir(parents=True, exist_ok=True)
    if not folder.exists():
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        try:
            for name, data in files.items():
                _write_file(staging / name, data)
            os.rename(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return
    written: list[tuple[Path, Path]] = []
    try:
        for name, data in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            os.close(fd)
            written.append((Path(tmp), folder / name))
            _write_file(Path(tmp), data)
        for tmp, final in written:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise


def write_adapter(path: str | Path, config: AdapterConfig | Mapping[str, Any], tensors: Mapping[str, Any], *,
                  overwrite: bool = False, metadata: Mapping[str, str] | None = None) -> Path:
    """Write one adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``, atomically.

    The adapter is checked first (a folder that would not validate is never written). The
    safetensors metadata gets ``format: pt``, ``adapterspec_version`` and the sha256 of the data.

    :param tensors: canonical key -> NumPy array or torch/TensorFlow/JAX tensor.
    :param overwrite: replace an adapter already at ``path`` (otherwise refused).
    :raises AdapterExistsError: an adapter is at ``path`` and ``overwrite`` is false.
    :raises AdapterSpecError: the config or tensors are invalid (nothing is written).
    """
    folder = Path(path)
    _install(_prepare(config, tensors, metadata), folder, overwrite=overwrite)
    return folder


def write_adapters(path: str | Path, adapters: Mapping[str, tuple[AdapterConfig | Mapping[str, Any], Mapping[str, Any]]],
                   *, overwrite: bool = False) -> Path:
    """Write several adapters into one folder, PEFT's way, plus the manifest ``adapterspec.json``.

    ``"default"`` goes to the root (if present), every other name to ``<path>/<name>/``.

    :param adapters: name -> (config, tensors).
    :raises UnsafeFileError: a name is not a safe folder name.
    """
    folder = Path(path)
    prepared = {check_adapter_name(name): _prepare(cfg, tensors, None) for name, (cfg, tensors) in adapters.items()}
    entries = {name: {"path": "." if name == DEFAULT_ADAPTER else name} for name in prepared}
    for name, files in prepared.items():
        _install(files, folder if name == DEFAULT_ADAPTER else folder / name, overwrite=overwrite)
    manifest = {"adapterspec_version": SPEC_VERSION, "adapters": entries}
    _install({MANIFEST_NAME: (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()}, folder, overwrite=True)
    return folder


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
            raise UnsafeFileError(f"adapter {name!r} path {where!r} leaves the folder", path=manifest_file,
                                  hint="use a relative subfolder path without '..'")


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
        raise ConfigError(f"default adapter {default!r} is not listed in adapters ({', '.join(names)})",
                          pointer="/default", path=manifest_file, hint="name a listed adapter, or remove 'default'")
    lowered: dict[str, str] = {}
    for name in names:
        if name.lower() in lowered:
            raise ConfigError(f"adapter names {lowered[name.lower()]!r} and {name!r} differ only in letter case "
                              "(their folders collide on case-insensitive file systems)",
                              pointer=f"/adapters/{name}", path=manifest_file, hint="rename one of them")
        lowered[name.lower()] = name


def list_adapters(path: str | Path) -> dict[str, Path]:
    """The adapters in a folder: from its manifest, or else (PEFT folders) the root and its subfolders.

    >>> list_adapters("several")                                           # doctest: +SKIP
    {'default': PosixPath('several'), 'fr': PosixPath('several/fr')}

    :raises FileFormatError: the manifest is not JSON (or has duplicate keys, or exceeds 16 MiB).
    :raises ConfigError: the manifest breaks its schema or SPEC.md 3.4 (``default`` not listed, two
        entries with one folder, names differing only in case), with the JSON pointer.
    :raises AdapterNotFoundError: the manifest names a missing adapter, or the folder holds none.
    :raises UnsafeFileError: a manifest path leaves the folder.
    """
    folder = Path(path)
    manifest_file = folder / MANIFEST_NAME
    found: dict[str, Path] = {}
    if manifest_file.exists():
        manifest = read_json_file(manifest_file, what="manifest")  # strict JSON, at most 16 MiB
        errors = sorted(_validator("manifest").iter_errors(manifest), key=lambda e: list(e.absolute_path))
        if errors:
            _refuse_unsafe_entries(manifest, manifest_file)
            pointer = "".join(f"/{p}" for p in errors[0].absolute_path)
            raise ConfigError(f"manifest: {errors[0].message}", pointer=pointer, path=manifest_file,
                              hint=f"fix {pointer or 'the root'} (see spec/v1/manifest.schema.json)")
        check_version(manifest.get("adapterspec_version"), path=str(manifest_file))
        _check_manifest_names(manifest, manifest_file)
        for name, entry in manifest["adapters"].items():
            check_adapter_name(name)
            target = folder / entry["path"]
            if not target.resolve().is_relative_to(folder.resolve()):
                raise UnsafeFileError(f"adapter {name!r} path {entry['path']!r} leaves the folder", path=manifest_file,
                                      hint="use a relative subfolder path without '..'")
            if not (target / CONFIG_NAME).exists():
                raise AdapterNotFoundError(f"the manifest lists adapter {name!r} but {target} holds no {CONFIG_NAME}",
                                           path=manifest_file, hint="save that adapter again or remove it from the manifest")
            twin = next((other for other, seen in found.items() if seen.resolve() == target.resolve()), None)
            if twin is not None:  # SPEC 3.4: two entries never name the same folder
                raise ConfigError(f"adapters {twin!r} and {name!r} have the same folder {entry['path']!r}",
                                  pointer=f"/adapters/{name}/path", path=manifest_file,
                                  hint="give every adapter its own folder")
            found[name] = target
        return found
    if (folder / CONFIG_NAME).exists():
        found[DEFAULT_ADAPTER] = folder
    if folder.is_dir():
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and (p / CONFIG_NAME).exists()):
            if not _valid_name(sub.name):  # SPEC 3.5: skipped, with a warning
                warnings.warn(f"{sub}: skipped, {sub.name!r} is not a valid adapter name", AdapterSpecWarning,
                              stacklevel=2)
                continue
            found[sub.name] = sub
    if not found:
        raise AdapterNotFoundError(f"no {CONFIG_NAME} in the folder or its subfolders", path=folder,
                                   hint="pass a folder written by save_pretrained or adapterspec")
    return found

