"""One error hierarchy for everything adapterspec refuses.

Every error is an :class:`AdapterSpecError` and also a ``ValueError`` or ``TypeError``
(so ``except ValueError`` in existing code keeps working). Each carries *where* the problem
is -- a JSON pointer into the config, a tensor key, a module path or a file -- and *what would
fix it*, and prints them in one line::

    >>> raise ConfigError("must be >= 1, got 0", pointer="/r", hint="use a rank of 1 or more")
    Traceback (most recent call last):
    adapterspec.errors.ConfigError: /r: must be >= 1, got 0 (fix: use a rank of 1 or more)
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "AdapterExistsError",
    "AdapterNotFoundError",
    "AdapterSpecError",
    "AdapterSpecWarning",
    "BackendError",
    "BaseModelMismatchError",
    "BaseModelMismatchWarning",
    "ConfigError",
    "DTypeMismatchError",
    "FileFormatError",
    "HubError",
    "IntegrityError",
    "MissingTensorError",
    "ShapeMismatchError",
    "TargetNotFoundError",
    "TensorError",
    "UnexpectedTensorError",
    "UnsafeFileError",
    "UnsupportedError",
    "VersionError",
    "WriteError",
    "shorten",
]

#: The most characters of a value from a file that an error message echoes (see :func:`shorten`).
ECHO_LIMIT = 80
#: The most characters of a file path, JSON pointer or tensor key an error prints.
LOCATION_LIMIT = 300
#: The most characters an error prints (its message, pointer and key; a hostile file can make them megabytes).
MESSAGE_LIMIT = 2000


def shorten(value: object, limit: int = ECHO_LIMIT, *, plain: bool = False) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters with the full length said.

    Values come from files (a 20 MB version string): echoing them whole floods a terminal or a CI log.
    ``plain``: a string is echoed as it is, not as its ``repr`` (a list of names already joined).

    >>> shorten("1." + "1" * 5000)
    "'1.111111111111111111111111111111111111111111111111111111111111111111111111111111'... (5002 characters)"
    >>> shorten("q_proj")
    "'q_proj'"
    """
    if isinstance(value, str) and plain:
        return value if len(value) <= limit else f"{value[:limit]}... ({len(value)} characters)"
    if isinstance(value, str) and len(value) > limit:  # cut before repr: no 20 MB copy
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _cut(text: str, limit: int = MESSAGE_LIMIT) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


class AdapterSpecError(Exception):
    """Base class of every error adapterspec raises on bad input.

    :param message: what is wrong, in one sentence.
    :param pointer: JSON pointer into the adapter config (``"/rank_pattern/q_proj"``).
    :param key: tensor key (``"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"``)
        or module path the problem is about.
    :param path: the file or folder the problem was found in.
    :param hint: what the user can do to fix it.
    """

    def __init__(
        self,
        message: str,
        *,
        pointer: str | None = None,
        key: str | None = None,
        path: str | Path | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.pointer = pointer
        self.key = key
        self.path = str(path) if path is not None else None
        self.hint = hint
        super().__init__(str(self))

    @property
    def location(self) -> str:
        """``file: pointer-or-key``, whatever of them is known (control characters escaped)."""
        parts = [_printable(_cut(p, LOCATION_LIMIT)) for p in (self.path, self.pointer if self.pointer is not None else self.key) if p]
        if self.pointer == "":
            parts.append("(config root)")
        return ": ".join(parts)

    def __str__(self) -> str:
        message = _cut(self.message)
        text = f"{self.location}: {message}" if self.location else message
        return f"{text} (fix: {_cut(self.hint)})" if self.hint else text

    def __reduce__(self) -> tuple[object, ...]:  # keep kwargs through pickling (multiprocessing, pytest-xdist)
        return (_rebuild, (type(self), self.message, self.pointer, self.key, self.path, self.hint))


def _printable(text: str) -> str:
    """Escape what could spoof a terminal (NUL, newlines, ANSI escapes, bidi overrides) in names from files."""
    return text if text.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _rebuild(
    cls: type[AdapterSpecError], message: str, pointer: str | None, key: str | None, path: str | None, hint: str | None
) -> AdapterSpecError:
    return cls(message, pointer=pointer, key=key, path=path, hint=hint)


class ConfigError(AdapterSpecError, ValueError):
    """The adapter config is invalid; ``pointer`` names the offending field."""


class VersionError(ConfigError):
    """The adapter was written by a newer major version of the spec than this reader knows."""


class FileFormatError(AdapterSpecError, ValueError):
    """A file is not what it claims to be: bad JSON, a corrupt or truncated safetensors file, bad metadata."""


class IntegrityError(FileFormatError):
    """The tensor data does not match the sha256 recorded in the safetensors metadata, or a file from the
    Hub does not match the digest the Hub announced for it."""


class UnsafeFileError(AdapterSpecError, ValueError):
    """Reading this would be unsafe: a pickle without opt-in, a path leaving the folder, a hostile name."""


class TensorError(AdapterSpecError, ValueError):
    """A tensor disagrees with the config or with the spec's naming convention; ``key`` names it."""


class MissingTensorError(TensorError):
    """A tensor the config requires is not in the file (or not in the model)."""


class UnexpectedTensorError(TensorError):
    """The file holds a tensor the config does not account for."""


class ShapeMismatchError(TensorError):
    """A tensor's shape disagrees with the config (rank), with its partner tensor, or with the model."""


class DTypeMismatchError(TensorError, TypeError):
    """A tensor's dtype is not allowed by the spec, or not what the caller asked for."""


class TargetNotFoundError(AdapterSpecError, ValueError):
    """A module the adapter targets does not exist in the model (or has no mapping to it)."""


class UnsupportedError(AdapterSpecError, ValueError):
    """Valid per the spec, but this backend or layer kind cannot do it."""


class BackendError(AdapterSpecError, TypeError):
    """No installed backend plugin handles this model object (or a plugin misbehaved)."""


class AdapterNotFoundError(AdapterSpecError, ValueError):
    """No adapter of that name is loaded in the model, or present in the folder."""


class AdapterExistsError(AdapterSpecError, ValueError):
    """An adapter of that name already exists (in the model, or on disk without ``overwrite=True``)."""


class HubError(AdapterSpecError, ValueError):
    """The Hugging Face Hub could not provide the adapter (not found, offline and not cached, ...)."""


class AdapterSpecWarning(UserWarning):
    """Something loads but deserves attention: unknown config fields, a newer minor spec version."""


class BaseModelMismatchError(AdapterSpecError, ValueError):
    """The model is not the base the adapter was trained on (its fingerprint differs, SPEC.md 9.1)."""


class BaseModelMismatchWarning(AdapterSpecWarning):
    """An adapter is loaded onto a base whose fingerprint differs from the one it was trained on."""


class WriteError(AdapterSpecError, OSError):
    """Saving failed in the file system -- no space left, no permission, a name too long -- and changed
    nothing: the adapter saved there before, if any, is intact. Also an ``OSError`` with its ``errno``.

    >>> import errno
    >>> error = WriteError("no space left on the device", errno=errno.ENOSPC, path="out/lora")
    >>> error.errno == errno.ENOSPC, isinstance(error, OSError)
    (True, True)
    """

    def __init__(self, message: str, *, errno: int | None = None, pointer: str | None = None, key: str | None = None,
                 path: str | Path | None = None, hint: str | None = None) -> None:
        super().__init__(message, pointer=pointer, key=key, path=path, hint=hint)
        self.errno = errno
        self.strerror = message
        self.filename = self.path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_rebuild_write_error, (self.message, self.errno, self.pointer, self.key, self.path, self.hint))


def _rebuild_write_error(message, errno, pointer, key, path, hint):  # type: ignore[no-untyped-def]
    return WriteError(message, errno=errno, pointer=pointer, key=key, path=path, hint=hint)
