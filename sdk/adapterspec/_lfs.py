"""Git-LFS pointer files: what a clone without git-lfs (or a pointer committed as a file) holds in place of a large
file -- the weights, and sometimes ``adapter_config.json`` or the manifest too. Named as such wherever they are read.

>>> lfs_pointer_error(b"version https://git-lfs.github.com/spec/v1\\noid sha256:ab\\nsize 3\\n", "c.json", "config").message
'a git-LFS pointer (oid sha256:ab, size 3), not the config it stands for'
"""

from __future__ import annotations

from pathlib import Path

from .errors import FileFormatError

__all__ = ["LFS_HINT", "LFS_POINTER", "lfs_pointer_error"]

#: How every pointer file starts (the git-lfs spec's first line, whatever its version).
LFS_POINTER = b"version https://git-lfs.github.com/spec/"

#: The fix for a pointer found in a local folder.
LFS_HINT = ("the repository was cloned without git-lfs: run 'git lfs install' and 'git lfs pull' in it, or load the "
            "adapter from the Hub by name (hf://org/name)")


def lfs_pointer_error(head: bytes, path: str | Path, what: str, *, hint: str | None = None) -> FileFormatError | None:
    """The refusal of a file whose first bytes ``head`` are a git-LFS pointer, naming its ``oid`` and ``size``;
    ``None`` for any other file.

    :param path: the name the error gives the file (a path, or its ``hf://`` address).
    :param what: what the file should have held ("tensors", "config", "manifest").
    """
    if not head.startswith(LFS_POINTER):
        return None
    fields = dict(line.split(" ", 1) for line in head[:1024].decode("ascii", "replace").splitlines()[1:] if " " in line)
    pointer = ", ".join(f"{k} {fields[k][:80]}" for k in ("oid", "size") if k in fields) or "no oid"
    return FileFormatError(f"a git-LFS pointer ({pointer}), not the {what} it stands for", path=path,
                           hint=hint or LFS_HINT)
