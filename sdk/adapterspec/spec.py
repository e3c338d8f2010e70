"""The versions of the adapterspec format and the rules for reading them.

A writer records ``adapterspec_version`` in the safetensors metadata (spec 1.0 writers also wrote it
in ``adapter_config.json``, where PEFT warns about it; a reader takes the config's value when there is
one). A reader compares it with :data:`SPEC_VERSION`:

* absent -- the folder was written by PEFT (or another tool before adapterspec); it is read
  as spec 1.0, which is a superset-compatible reading of PEFT's format;
* same major, same or older minor -- read silently;
* same major, newer minor -- read, with an :class:`~adapterspec.errors.AdapterSpecWarning`
  (fields the reader does not know are kept but not acted on);
* newer major -- refused with :class:`~adapterspec.errors.VersionError`.

>>> check_version("1.0")
(1, 0)
"""

from __future__ import annotations

import re
import warnings

from .errors import AdapterSpecWarning, VersionError, shorten

__all__ = [
    "CONFIG_NAME",
    "MANIFEST_NAME",
    "METADATA_FORMAT",
    "METADATA_SAVE_ID",
    "METADATA_SHA256",
    "METADATA_VERSION",
    "MAX_VERSION_LENGTH",
    "PEFT_PREFIX",
    "SAFETENSORS_NAME",
    "PICKLE_NAME",
    "SPEC_VERSION",
    "SUPPORTED_MAJOR",
    "check_version",
]

SPEC_VERSION = "1.2"
SUPPORTED_MAJOR = 1

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
MANIFEST_NAME = "adapterspec.json"

PEFT_PREFIX = "base_model.model."

METADATA_FORMAT = "format"  # PEFT writes {"format": "pt"}; kept for compatibility
METADATA_VERSION = "adapterspec_version"
METADATA_SHA256 = "adapterspec_sha256"
#: The save of several adapters this adapter was written by; the manifest's entry for it records the same (SPEC.md 3.4).
METADATA_SAVE_ID = "adapterspec_save_id"

#: The longest ``adapterspec_version`` accepted (the schemas' ``maxLength``): ``int()`` of a 5,000-digit
#: minor would raise Python's integer-digit limit, and a junk megabyte would be echoed in the error.
MAX_VERSION_LENGTH = 32

_VERSION_RE = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")


def check_version(version: object, *, pointer: str = "/adapterspec_version", path: str | None = None) -> tuple[int, int]:
    """Parse a spec version and decide whether this reader may read it.

    :param version: the recorded version, ``None`` for a PEFT-written folder.
    :returns: ``(major, minor)``; ``(1, 0)`` for ``None``.
    :raises VersionError: malformed (or longer than :data:`MAX_VERSION_LENGTH`), or a newer major version.

    >>> check_version(None)
    (1, 0)
    """
    if version is None:
        return (1, 0)
    if isinstance(version, str) and len(version) > MAX_VERSION_LENGTH:
        raise VersionError(
            f"is {len(version)} characters long, more than {MAX_VERSION_LENGTH}: {shorten(version)}",
            pointer=pointer, path=path, hint=f'write "{SPEC_VERSION}" or leave the field out',
        )
    match = _VERSION_RE.fullmatch(version) if isinstance(version, str) else None
    if match is None:
        raise VersionError(
            f"must be a version string 'MAJOR.MINOR', got {shorten(version)}",
            pointer=pointer, path=path, hint=f'write "{SPEC_VERSION}" or leave the field out',
        )
    major, minor = int(match[1]), int(match[2])
    current_minor = int(SPEC_VERSION.split(".")[1])
    if major > SUPPORTED_MAJOR:
        raise VersionError(
            f"written for adapterspec {version}, but this reader supports major version {SUPPORTED_MAJOR} only",
            pointer=pointer, path=path, hint="upgrade adapterspec (pip install -U adapterspec)",
        )
    if major == SUPPORTED_MAJOR and minor > current_minor:
        warnings.warn(
            f"{path + ': ' if path else ''}adapter written for adapterspec {version}, newer than this reader's "
            f"{SPEC_VERSION}; fields added since are ignored (upgrade adapterspec to use them)",
            AdapterSpecWarning, stacklevel=3,
        )
    return (major, minor)
