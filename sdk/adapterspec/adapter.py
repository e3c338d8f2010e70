"""Reading adapter folders: :class:`Adapter` and :func:`read_adapter`, with every check of the spec.

Reading validates the config and checks every tensor's name, shape and dtype from the safetensors
header; tensor data is read only when a backend asks (:meth:`Adapter.load_tensors`), straight
into its framework and onto its device.

>>> adapter = read_adapter("path/to/adapter")                       # doctest: +SKIP
>>> adapter.config.peft_type, adapter.num_parameters                 # doctest: +SKIP
('LORA', 1048576)
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
import stat
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from . import _access, _foreign, _safetensors, _snapshot, _staging, _vblora
from ._safetensors import check_not_lfs_pointer, dtype_name
from ._finite import nonfinite_arrays, nonfinite_keys
from .checks import ALLOWED_DTYPES, TensorInfo, tensor_errors
from ._rules import not_portable
from ._lora_init import init_warnings
from .config import AdapterConfig, read_json_file, unsupported_features
from .errors import (
    AdapterSpecError,
    AdapterSpecWarning,
    ConfigError,
    FileFormatError,
    IntegrityError,
    TensorError,
    UnsafeFileError,
    UnsupportedError,
)
from .naming import PARAMETERS
from .spec import (
    CONFIG_NAME,
    PEFT_PREFIX,
    METADATA_SHA256,
    METADATA_VERSION,
    PICKLE_NAME,
    SAFETENSORS_NAME,
    check_version,
)

__all__ = ["Adapter", "check_adapter_name", "read_adapter", "validate_adapter"]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # always fullmatch: '$' would allow "x\n"


def check_adapter_name(name: object, *, from_caller: bool = False) -> str:
    """Refuse adapter names that are not safe as a folder name (``..``, ``a/b``, empty, too long).

    :param from_caller: the caller passed the name (``load_adapter(adapter_name=...)``): refused with
        :class:`~adapterspec.errors.ConfigError` (SPEC.md 3.3); a name read from a file is an
        :class:`~adapterspec.errors.UnsafeFileError`.

    >>> check_adapter_name("fr-v2")
    'fr-v2'
    >>> check_adapter_name("../x")
    Traceback (most recent call last):
    adapterspec.errors.UnsafeFileError: adapter name '../x': must match ... (fix: ...)
    >>> check_adapter_name("a/b", from_caller=True)
    Traceback (most recent call last):
    adapterspec.errors.ConfigError: adapter_name 'a/b': must match ... (fix: ...)
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        error = ConfigError if from_caller else UnsafeFileError
        raise error(f"{'adapter_name' if from_caller else 'adapter name'} {name!r}: must match {_NAME_RE.pattern} "
                    "(it becomes a folder name)", hint="use letters, digits, '.', '_' and '-', starting with a letter "
                                                       "or digit")
    return name


@dataclass(eq=False)
class Adapter:
    """One adapter: its validated config and its tensors' names, shapes and dtypes.

    :param config: the adapter's config.
    :param tensors: canonical key -> :class:`~adapterspec.checks.TensorInfo`.
    :param metadata: the safetensors metadata (``{}`` for pickles and in-memory adapters).
    :param path: the adapter's folder, if read from disk.
    :param weights_file: the file tensors are read from; ``None`` for in-memory adapters.
    :param arrays: the tensors themselves, for in-memory adapters and opted-in pickles.
    """

    config: AdapterConfig
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    weights_file: Path | None = None
    arrays: dict[str, Any] | None = None
    _header: _safetensors.Header | None = field(default=None, init=False, repr=False)
    _unchecked: bool = field(default=False, init=False, repr=False)  # read_adapter(check_tensors=False)
    _prefetched: Callable[[], tuple[Any, dict[str, tuple[int, int]]]] | None = field(default=None, init=False,
                                                                                  repr=False)  # prefetch()
    _identity: tuple[int, int, int, int] | None = field(default=None, init=False, repr=False)  # of weights_file
    _held: BinaryIO | None = field(default=None, init=False, repr=False)  # the file read, kept open (validate)

    @classmethod
    def from_tensors(cls, config: AdapterConfig | Mapping[str, Any], tensors: Mapping[str, Any]) -> Adapter:
        """An in-memory adapter from a config and NumPy (or framework) tensors, checked like a file.

        >>> import numpy as np
        >>> a = Adapter.from_tensors({"peft_type": "IA3", "target_modules": ["q"], "feedforward_modules": []},
        ...                          {"base_model.model.l.q.ia3_l": np.ones((4, 1), np.float32)})
        >>> a.num_parameters
        4
        """
        cfg = config if isinstance(config, AdapterConfig) else AdapterConfig.from_dict(config)
        infos = _tensor_infos(tensors)
        errors = tensor_errors(cfg, infos)
        if errors:
            raise errors[0]
        return cls(cfg, infos, arrays=dict(tensors))

    @property
    def num_parameters(self) -> int:
        """The number of scalars in all tensors."""
        return sum(math.prod(i.shape) for i in self.tensors.values())

    @property
    def nbytes(self) -> int:
        """The size of all tensor data in bytes."""
        return sum(math.prod(i.shape) * _safetensors.DTYPE_BYTES.get(i.dtype, 0) for i in self.tensors.values())

    def prefetch(self, allocate: Callable[[int], Any] | None = None) -> None:
        """Start reading the tensor data on a thread, for the next :meth:`load_tensors` (NumPy, or torch).

        The read releases the GIL, so the file is read while the caller goes on:
        :func:`~adapterspec.load_adapter` injects the adapter's layers meanwhile (1-1.5 ms less per load
        of the 20 MB benchmark adapter on two cores; from a disk, the whole wait for it may go).
        Errors surface in :meth:`load_tensors`. Does nothing for in-memory adapters, or when a read has
        been started already.

        :param allocate: gives the buffer to read into, from the file's size: a writable NumPy ``uint8``
            array (pinned memory, for a copy to a GPU), or ``None`` for an ordinary one.
        """
        if self.weights_file is None or self._prefetched is not None:
            return
        try:
            self._prefetched = _safetensors.read_buffer_in_background(self.weights_file, self._file_header(),
                                                                      self._weights(), allocate=allocate)
        except AdapterSpecError:  # the file changed: load_tensors reads it again and says so
            pass

    def _file_header(self) -> _safetensors.Header:
        """The header :func:`read_adapter` checked; read now for an :class:`Adapter` made by hand."""
        assert self.weights_file is not None
        if self._header is None:
            with self._weights() as fh:
                header = _safetensors.read_header(self.weights_file, fh)
                self._identity = _snapshot.file_id(os.fstat(fh.fileno()))
            if header.tensors != self.tensors:
                raise FileFormatError("the file's tensors are not those of this Adapter", path=self.weights_file,
                                      hint="read the adapter with read_adapter()")
            self._header = header
        return self._header

    def _weights(self) -> BinaryIO:
        """``weights_file``, open for reading: the very file that was read, not one saved over it since."""
        assert self.weights_file is not None
        if self._held is not None:  # kept open since the read: that file, whatever is saved over its name
            return os.fdopen(os.dup(self._held.fileno()), "rb", buffering=0)
        try:
            fh = open(self.weights_file, "rb", buffering=0)  # noqa: SIM115 - the caller closes it
        except OSError as exc:
            raise FileFormatError(f"cannot open the weights: {exc.strerror}", path=self.weights_file,
                                  hint="the adapter was moved or deleted since it was read; read it again") from None
        if self._identity is not None and _snapshot.file_id(os.fstat(fh.fileno())) != self._identity:
            fh.close()
            raise FileFormatError("the file was replaced or changed since the adapter was read (saved over?)",
                                  path=self.weights_file, hint="read the adapter again")
        return fh

    @property
    def tensors_checked(self) -> bool:
        """Whether the spec's tensor checks have passed (``False`` only after ``read_adapter(check_tensors=False)``,
        until :meth:`check_tensors`)."""
        return not self._unchecked

    def check_tensors(self) -> None:
        """Run the spec's checks of the tensors against the config (SPEC.md 10, checks 8-16), if
        ``read_adapter(check_tensors=False)`` left them out.

        :raises AdapterSpecError: the first problem, naming the tensor.
        """
        if not self._unchecked:
            return
        errors = tensor_errors(self.config, self.tensors)
        for e in errors:
            e.path = e.path or str(self.weights_file or self.path)
        if errors:
            raise errors[0]
        self._unchecked = False

    def load_tensors(self, framework: str = "numpy", device: str = "cpu") -> dict[str, Any]:
        """Read every tensor, as ``framework`` tensors on ``device`` (safetensors' framework names:
        ``"numpy"``, ``"pt"``, ``"tf"``, ``"flax"``...), straight from the file.

        NumPy and torch tensors are views of one read of the whole file (which :meth:`prefetch` may
        have started); torch tensors for another device are views of one copy of all their bytes there
        (read into pinned memory for a GPU, unless prefetched). Other frameworks get theirs from
        safetensors, straight onto the device. Either way the file must still be the one checked (the
        same header).

        :raises FileFormatError: the file changed or broke since it was read.
        :raises UnsupportedError: ``framework`` is not installed (naming the ``pip install`` line), or torch
            cannot use ``device``.
        """
        _require_framework(framework)
        if self.arrays is not None:
            return _convert(self.arrays, framework, device)
        assert self.weights_file is not None
        from safetensors import SafetensorError, safe_open

        elsewhere = framework == "pt" and str(device) != "cpu"
        prefetched, self._prefetched = self._prefetched, None
        if framework in ("numpy", "np", "pt"):
            buffer, spans = prefetched() if prefetched is not None else _safetensors.read_buffer(  # one read
                self.weights_file, self._file_header(), self._weights(),
                allocate=_safetensors.pinned_allocator(device) if elsewhere else None)
            del prefetched  # the buffer's only holders are to be its views (Keras checks)
            return _safetensors.views(buffer, spans, self.tensors, "pt" if framework == "pt" else "numpy",
                                      path=self.weights_file, device=device if elsewhere else None)
        try:
            with safe_open(str(self.weights_file), framework=framework, device=device) as f, self._weights() as fh:
                _safetensors.check_unchanged(self.weights_file, self._file_header(), fh)
                return {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, TypeError, KeyError, ValueError) as exc:
            raise FileFormatError(f"cannot read tensors: {exc}", path=self.weights_file,
                                  hint="the file is corrupt or changed; download or save it again") from None

    def verify_checksum(self) -> bool:
        """Check the tensor data against the sha256 in the metadata.

        :returns: ``True`` if verified, ``False`` if the file records no checksum (PEFT writes none).
        :raises IntegrityError: the data does not match: the file was corrupted or tampered with.
        """
        if self.weights_file is None or self.metadata.get(METADATA_SHA256) is None:
            return False
        with self._weights() as fh:
            return self._check_checksum(fh)

    def _check_checksum(self, file: BinaryIO) -> bool:
        """:meth:`verify_checksum` of the open weights file."""
        recorded = self.metadata.get(METADATA_SHA256)
        if recorded is None or self.weights_file is None:
            return False
        if not re.fullmatch(r"[0-9a-f]{64}", recorded):
            raise FileFormatError(f"metadata {METADATA_SHA256} must be 64 lowercase hex digits, got {recorded[:80]!r}",
                                  path=self.weights_file, hint="write the file again with adapterspec (SPEC.md 9)")
        actual = _safetensors.sha256_of_file(self.weights_file, file)
        if actual != recorded:
            raise IntegrityError(
                f"tensor data sha256 {actual[:16]}... does not match {METADATA_SHA256} {recorded[:16]}... "
                "recorded in the metadata", path=self.weights_file,
                hint="the file was modified after it was written; get the original again")
        return True


def _tensor_infos(tensors: Any) -> dict[str, TensorInfo]:
    """Shapes and dtypes of caller-supplied tensors; anything but a mapping of string keys to arrays is a TensorError."""
    if not isinstance(tensors, Mapping):
        raise TensorError(f"tensors must be a mapping of key -> tensor, got {type(tensors).__name__}",
                          hint="pass a dict of NumPy arrays or framework tensors")
    infos = {}
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise TensorError(f"key {key!r} is not a string", key=repr(key), hint="use the spec's string keys")
        try:
            shape = value.shape  # NumPy's and torch's are tuples of ints; TensorFlow's and others are not
            if not (isinstance(shape, tuple) and all(type(d) is int for d in shape)):
                shape = tuple(int(d) for d in shape)
            value.dtype  # noqa: B018 - only arrays and tensors have both
        except (AttributeError, TypeError, ValueError):
            raise TensorError(f"not a tensor but a {type(value).__name__}", key=key,
                              hint="pass NumPy arrays or torch/TensorFlow/JAX tensors") from None
        infos[key] = TensorInfo(tuple(shape), dtype_name(value))
    return infos


#: safetensors framework name -> (the module it needs, the command that installs it).
_FRAMEWORK_MODULES = {"pt": ("torch", 'pip install "adapterspec[torch]"'),
                      "tf": ("tensorflow", "pip install tensorflow"),
                      "flax": ("jax", "pip install jax"), "jax": ("jax", "pip install jax")}


def _require_framework(framework: str) -> None:
    module, install = _FRAMEWORK_MODULES.get(framework, (None, ""))
    if module is not None and module not in sys.modules and importlib.util.find_spec(module) is None:
        raise UnsupportedError(f"{framework!r} tensors need {module}, which is not installed", hint=install)


def _convert(arrays: Mapping[str, Any], framework: str, device: str) -> dict[str, Any]:
    if framework in ("numpy", "np"):
        out = {}
        for k, v in arrays.items():
            if type(v).__module__.startswith("torch"):
                v = v.detach().cpu()
                out[k] = v.float().numpy() if str(v.dtype) == "torch.bfloat16" else v.numpy()
            else:
                out[k] = v.numpy() if hasattr(v, "numpy") else v
        return out
    if framework == "pt":
        import torch

        return {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(v)).to(device) for k, v in arrays.items()}
    if framework in ("tf", "flax", "jax"):
        as_numpy = _convert(arrays, "numpy", "cpu")
        if framework == "tf":
            import tensorflow as tf

            return {k: tf.convert_to_tensor(v) for k, v in as_numpy.items()}
        import jax.numpy as jnp

        return {k: jnp.asarray(v) for k, v in as_numpy.items()}
    raise UnsupportedError(f"in-memory adapters convert to 'numpy', 'pt', 'tf' or 'flax', not {framework!r}",
                           hint="load the tensors as NumPy and convert them in the backend")


def _inside(folder: Path, file: Path) -> Path:
    """``file`` resolved, if it is a regular file in ``folder``: not a link (or under one) leading out
    of it -- except into the ``blobs/`` of a Hugging Face cache snapshot --, not a FIFO or device."""
    try:
        resolved, root = file.resolve(), folder.resolve()
        regular = stat.S_ISREG(resolved.stat().st_mode)
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise UnsafeFileError(f"{file.name} cannot be resolved: {exc}", path=file,
                              hint="replace the symlink with the file itself") from None
    if not any(resolved.is_relative_to(allowed) for allowed in (root, *_hub_blobs(root))):
        raise UnsafeFileError(f"{file.name} leads outside the adapter folder (to {resolved})", path=file,
                              hint="replace the symlink with the file itself")
    if not regular:
        raise UnsafeFileError(f"{file.name} is not a regular file", path=file,
                              hint="replace it with the file itself (not a pipe, device or folder)")
    return resolved


def _refuse_dangling(folder: Path, file: Path) -> None:
    """If ``file`` (found missing) is a symbolic link to nothing, say so: a :class:`FileFormatError` naming its
    target, or an :class:`UnsafeFileError` if that target is outside ``folder`` (SPEC.md 11.3, even when missing).
    Otherwise do nothing: the file is simply not there."""
    try:
        if not os.path.islink(file) or os.path.exists(file):
            return
        target, real = os.readlink(file), Path(os.path.realpath(file))
        root = folder.resolve()
    except (OSError, ValueError, RuntimeError):  # unreadable meanwhile, a loop: the caller's own error stands
        return
    if not any(real.is_relative_to(allowed) for allowed in (root, *_hub_blobs(root))):
        raise UnsafeFileError(f"{file.name} leads outside the adapter folder (to {real}, which does not exist)",
                              path=file, hint="replace the symlink with the file itself")
    shown = repr(target) if os.path.isabs(target) else f"{target!r} ({real})"
    raise FileFormatError(f"{file.name} is a dangling symbolic link: its target {shown} does not exist", path=file,
                          hint="point the link at the file, or replace it with the file itself")


def _hub_blobs(root: Path) -> list[Path]:
    """``<repo>/blobs`` if ``root`` (resolved) is in ``<repo>/snapshots/<revision>/`` of huggingface_hub's
    cache, whose files are links into ``blobs/``."""
    for folder in (root, *root.parents):
        if folder.parent.name == "snapshots":
            blobs = folder.parent.parent / "blobs"
            return [blobs] if blobs.is_dir() and not blobs.is_symlink() else []
    return []


def _load_pickle(path: Path, file: BinaryIO) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise UnsupportedError("reading adapter_model.bin needs torch", path=path,
                               hint='pip install "adapterspec[torch]", or convert the adapter to safetensors') from None
    import pickle

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(f"refused by torch.load(weights_only=True): {(str(exc).splitlines() or [''])[0][:300]}",
                              path=path, hint="the pickle holds more than tensors; never load it unrestricted") from None
    except Exception as exc:  # a hostile or corrupt file may fail anywhere in the unpickler
        raise FileFormatError(f"not a readable torch pickle: {type(exc).__name__}: {str(exc)[:300]}", path=path,
                              hint="the file is truncated or corrupt; download or save it again") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise FileFormatError("the pickle is not a flat dict of tensors", path=path,
                              hint="save the adapter as safetensors")
    return state


def _plain(config: AdapterConfig, tensors: Mapping[str, TensorInfo]) -> bool:
    """Whether every tensor is a method tensor (``<module>.lora_A.weight``...) of an allowed dtype, and the
    config accounts for no auxiliary tensor: the tensors that a load's comparison with the injected
    adapter checks completely (see :func:`read_adapter`)."""
    params = PARAMETERS.get(config.peft_type)
    if not params or config.get("modules_to_save") or config.get("trainable_token_indices") is not None \
            or config.get("bias", "none") != "none":
        return False
    suffixes = tuple("." + p for p in params)
    return all(key.startswith(PEFT_PREFIX) and key.endswith(suffixes) and info.dtype in ALLOWED_DTYPES
               for key, info in tensors.items())


def _not_a_folder(path: Path) -> FileFormatError:
    """The refusal of a path that is no folder: a file (a config file alone, say) or nothing at all."""
    try:
        is_file = path.is_file()
    except (OSError, ValueError):
        is_file = False
    if is_file:  # a diffusers/kohya/mlx-lm LoRA file and a weights file are named as such
        return _foreign.file_error(path, CONFIG_NAME, hint=f"pass the folder holding {CONFIG_NAME} and "
                                   f"{SAFETENSORS_NAME}; check a config file alone with validate_config or "
                                   "'adapterspec validate'")
    return FileFormatError("no such adapter folder", path=path,
                           hint=f"pass a folder holding {CONFIG_NAME} and {SAFETENSORS_NAME}")


def _open(source: str | Path, *, allow_pickle: bool, strict: bool, prefetch: bool | Callable[[int], Any] = False,
          check_tensors: bool = True, verify: bool = False, hold: bool = False) -> tuple[Adapter, list[AdapterSpecError]]:
    """Read the folder's config and weights as one snapshot (both from one save, whatever another process
    saves there meanwhile), and check them; ``verify`` also checks the sha256 of that same file. ``hold`` keeps
    the weights file read open in the adapter (``_held``, the caller closes it), for later reads of that file."""
    folder = Path(source)
    if folder.name in (CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME) and _access.is_file(folder):
        folder = folder.parent  # a file of the folder stands for it (as in 'adapterspec validate')
    if not _access.is_dir(folder):  # a refused look-up says so (no permission), naming the folder that refuses
        raise _not_a_folder(folder)
    read = functools.partial(_read_files, folder, allow_pickle=allow_pickle, strict=strict, prefetch=prefetch,
                             verify=verify, hold=hold)
    adapter = _snapshot.read_consistently(folder, read, watch=(CONFIG_NAME, SAFETENSORS_NAME),
                                          in_progress=_staging.save_in_progress)
    errors: list[AdapterSpecError] = [  # check 5 first: nothing else matters if no v1 reader can apply it
        UnsupportedError(reason, pointer=pointer, path=folder / CONFIG_NAME,
                         hint="load it with PEFT itself (PeftModel.from_pretrained)" if pointer == "/peft_type" else
                         "use PEFT itself for this adapter, or save it without the feature")
        for pointer, reason in unsupported_features(adapter.config)]
    if not_portable(adapter.config):
        pass  # the spec names no tensor of the method: there is nothing to check them against
    elif check_tensors or not _plain(adapter.config, adapter.tensors):
        # a loader reports what read_adapter reports; its backend also checks each embedding saved whole against
        # its model (SPEC.md 5.4 step 4)
        errors += tensor_errors(adapter.config, adapter.tensors)
    else:
        adapter._unchecked = True
    source_file = adapter.weights_file or (folder / PICKLE_NAME if adapter.arrays is not None else folder)
    for e in errors:
        e.path = e.path or str(source_file)  # name the file the tensors came from (the pickle too)
    return adapter, errors


def _read_files(folder: Path, snapshot: _snapshot.Snapshot, *, allow_pickle: bool, strict: bool,
                prefetch: bool | Callable[[int], Any],
                verify: bool, hold: bool = False) -> Adapter:
    """The adapter in ``folder``, its files opened through ``snapshot``.

    With ``prefetch``, a thread starts reading the tensor data as soon as the safetensors header is read, so
    the read overlaps the config's schema check as well as what the caller does next. A config error is
    still reported before any error of the weights file.
    """
    config_file = folder / CONFIG_NAME
    if not _access.exists(config_file):
        _refuse_dangling(folder, config_file)
        raise _foreign.folder_error(folder, CONFIG_NAME) or FileFormatError(
            f"no {CONFIG_NAME} in the folder", path=folder, hint=_staging.missing_config_hint(
                folder, "pass the adapter's own folder (use subfolder= for one of several)"))
    config_fh = snapshot.open(CONFIG_NAME, _inside(folder, config_file))  # named as given (a relative path stays so)
    weights = folder / SAFETENSORS_NAME
    if not _access.exists(weights):
        config = _read_config(config_file, config_fh, strict=strict)
        _refuse_dangling(folder, weights)  # not a reason to read the pickle instead
        if not _access.exists(folder / PICKLE_NAME):
            _refuse_dangling(folder, folder / PICKLE_NAME)
            raise FileFormatError(f"no {SAFETENSORS_NAME} in the folder", path=folder,
                                  hint="save the adapter's weights next to its config")
        pickle_file = _inside(folder, folder / PICKLE_NAME)
        pickle_fh = snapshot.open(PICKLE_NAME, pickle_file)
        check_not_lfs_pointer(pickle_file, pickle_fh)  # not a pickle at all: allow_pickle would not help
        if not allow_pickle:
            raise UnsafeFileError(
                f"only {PICKLE_NAME} (a pickle) is present; unpickling can run code", path=pickle_file,
                hint="pass allow_pickle=True (--allow-pickle) if you trust the source; it is then read with "
                     "torch.load(weights_only=True)")
        arrays = _load_pickle(pickle_file, pickle_fh)
        infos = {k: TensorInfo(tuple(v.shape), dtype_name(v)) for k, v in arrays.items()}
        return Adapter(config, infos, {}, folder, None, arrays)
    resolved = _inside(folder, weights)
    try:
        fh = snapshot.open(SAFETENSORS_NAME, resolved)
        header = _safetensors.read_header(resolved, fh)
    except AdapterSpecError:
        _read_config(config_file, config_fh, strict=strict)  # its error first
        raise
    readable = all(info.dtype in _safetensors.DTYPE_BYTES for info in header.tensors.values())  # else check 13

    def read_ahead() -> Callable[[], tuple[Any, dict[str, tuple[int, int]]]] | None:
        if not (prefetch and readable):
            return None
        return _safetensors.read_buffer_in_background(resolved, header, snapshot.share(fh),
                                                      allocate=prefetch if callable(prefetch) else None)

    read = None if verify else read_ahead()
    config = _read_config(config_file, config_fh, strict=strict)
    _check_metadata_version(config, header.metadata, weights)
    adapter = Adapter(config, header.tensors, header.metadata, folder, resolved)
    adapter._header = header
    adapter._identity = _snapshot.file_id(os.fstat(fh.fileno()))
    if hold:
        adapter._held = snapshot.keep(fh)
    if verify:
        adapter._check_checksum(fh)  # before any read of the data is handed out
        read = read_ahead()
    adapter._prefetched = read
    return adapter


def _read_config(config_file: Path, fh: Any, *, strict: bool) -> AdapterConfig:
    """The folder's config, parsed and checked against the schema (and a ``lora_ga`` base warned of, SPEC.md 8.1)."""
    config = AdapterConfig.from_dict(read_json_file(config_file, file=fh), strict=strict, path=config_file, _owned=True)
    for pointer, message in init_warnings(config, fresh=False):
        warnings.warn(f"{config_file}: {pointer}: {message}", AdapterSpecWarning, stacklevel=6)
    return config


def _check_metadata_version(config: AdapterConfig, metadata: Mapping[str, str], weights: Path) -> None:
    """SPEC.md 2.3: refuse a metadata version no reader of this major may read (and warn about a newer minor
    when the config records none, as spec 1.1 writers do); warn when it differs from the config's."""
    recorded = metadata.get(METADATA_VERSION)
    if recorded is None:
        return
    if check_version(recorded, pointer=f"metadata/{METADATA_VERSION}", path=str(weights)) != \
            check_version(config.get("adapterspec_version")) and config.get("adapterspec_version") is not None:
        warnings.warn(
            f"{weights}: the safetensors metadata records adapterspec_version {recorded!r} but the config "
            f"{config.get('adapterspec_version') or 'none (read as 1.0)'!r}; the config's version governs",
            AdapterSpecWarning, stacklevel=6)  # read_adapter's caller (via _read_files, read_consistently, _open)


def _nonfinite_errors(adapter: Adapter) -> list[AdapterSpecError]:
    """Check 14: every floating-point tensor is finite (reads all the data, in bounded chunks)."""
    where = adapter.weights_file or adapter.path
    try:
        if adapter.weights_file is not None:
            with adapter._weights() as fh:
                keys = nonfinite_keys(adapter.weights_file, fh)
        else:
            keys = nonfinite_arrays(_convert(adapter.arrays or {}, "numpy", "cpu"))
    except (OSError, ValueError) as exc:
        return [FileFormatError(f"cannot read the tensor data: {exc}", path=where,
                                hint="the file is corrupt or changed; download or save it again")]
    return [TensorError("holds NaN or infinite values", key=key, path=where,
                        hint="the adapter diverged in training or the file is corrupt; train or export it again")
            for key in keys]


def _value_errors(adapter: Adapter) -> list[AdapterSpecError]:
    """Tensor values the spec constrains beyond finiteness: VB-LoRA's top-k indices and weights (SPEC.md 17.4)."""
    if adapter.config.get("peft_type") != "VBLORA" or not _vblora.topk_only(adapter.config):
        return []
    try:
        arrays = adapter.load_tensors("numpy")
    except AdapterSpecError as exc:
        return [exc]
    where = adapter.weights_file or adapter.path
    return _vblora.value_errors(adapter.config, arrays, path=None if where is None else str(where))


def read_adapter(source: str | Path, *, allow_pickle: bool = False, strict: bool = False,
                 verify: bool = False, prefetch: bool | Callable[[int], Any] = False, check_tensors: bool = True) -> Adapter:
    """Read and check an adapter folder (config and tensor headers; no tensor data).

    :param source: the adapter's folder (or its ``adapter_config.json``).
    :param allow_pickle: read a legacy ``adapter_model.bin`` when no safetensors file exists
        (with ``torch.load(weights_only=True)``); refused otherwise.
    :param strict: refuse config fields the schema does not know.
    :param verify: also check the tensor data against the recorded sha256 (reads all data).
    :param prefetch: start reading the tensor data on a thread as soon as the header is checked
        (:meth:`Adapter.prefetch`), for a :meth:`~Adapter.load_tensors` to come; a function instead of
        ``True`` gives the buffer to read into, as :meth:`Adapter.prefetch`'s ``allocate``.
    :param check_tensors: ``False`` leaves the checks of the tensors against the config (SPEC.md 10,
        checks 8-16) to the caller, if every tensor is a method tensor of an allowed dtype and the config
        accounts for no auxiliary tensor (otherwise they run). :func:`~adapterspec.load_adapter` does
        this: the backend compares every tensor with the adapter it injected from the config (each
        key, each shape), which implies those checks; it runs them (:meth:`Adapter.check_tensors`)
        when that comparison fails, to name the problem as the spec does.
    :raises AdapterSpecError: the first problem found, naming the field or tensor.

    >>> read_adapter("my-lora").config["r"]                          # doctest: +SKIP
    16
    """
    adapter, errors = _open(source, allow_pickle=allow_pickle, strict=strict, prefetch=prefetch,
                            check_tensors=check_tensors, verify=verify)
    if errors:
        raise errors[0]
    return adapter


def validate_adapter(source: str | Path, *, allow_pickle: bool = False, strict: bool = False) -> list[AdapterSpecError]:
    """Every problem with an adapter folder; ``[]`` when it is valid.

    Runs checks 1-16 of SPEC.md section 10 (check 17, the manifest, is :func:`~adapterspec.list_adapters`):
    unlike :func:`read_adapter` it also reads all tensor data, to verify the checksum (7) and that every
    floating-point value is finite (14). Features no v1 reader implements (check 5) are errors here too.
    A method that is recognised but not portable (SPEC.md 14) is valid with an
    :class:`~adapterspec.errors.AdapterSpecWarning` saying so; ``strict=True`` makes it an error.

    >>> validate_adapter("my-lora")                                   # doctest: +SKIP
    []
    """
    try:  # the weights file read stays open: checks 7 and 14 read that file, whatever is saved over it meanwhile
        adapter, errors = _open(source, allow_pickle=allow_pickle, strict=strict, hold=True)
    except AdapterSpecError as exc:
        return [exc]
    try:
        if not strict:
            notes = {pointer for pointer, _ in not_portable(adapter.config)}
            for e in [e for e in errors if isinstance(e, UnsupportedError) and e.pointer in notes]:
                errors.remove(e)
                warnings.warn(f"{e.path}: not portable: {e.message} ({e.hint})", AdapterSpecWarning, stacklevel=2)
        try:
            adapter.verify_checksum()
        except FileFormatError as exc:  # IntegrityError, or a malformed checksum
            errors.append(exc)
        return errors + _nonfinite_errors(adapter) + _value_errors(adapter)
    finally:
        if adapter._held is not None:
            adapter._held.close()
            adapter._held = None
