"""The file system refusing a save (no space, no permission, a name too long) is a typed WriteError, and changes nothing.

``WriteError`` is an ``AdapterSpecError`` and an ``OSError`` with the original ``errno``; the adapter saved
there before (if any) is byte for byte intact and no staging litter remains. ENOSPC is real where a small
tmpfs can be mounted (root on Linux), and injected everywhere; EACCES is injected (root ignores modes).
"""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hardening_harness import LORA_CONFIG, STATS, lora_tensors, snapshot

import adapterspec
from adapterspec import folder as folder_mod

pytestmark = pytest.mark.filterwarnings("ignore::adapterspec.AdapterSpecWarning")

NEW_CONFIG = {**LORA_CONFIG, "lora_alpha": 16}


def _litter(*folders: Path) -> list[str]:
    folder_mod.wait_for_removals()
    return [p.name for f in folders if f.exists() for p in f.iterdir() if p.name.startswith(".")]


def _failing(monkeypatch: pytest.MonkeyPatch, name: str, code: int) -> None:
    """Make ``os.<name>`` fail with ``code`` from its first call on."""
    def fail(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(code, os.strerror(code), str(args[0]) if args and isinstance(args[0], (str, Path)) else None)

    monkeypatch.setattr(os, name, fail)


CASES = [("write", errno.ENOSPC, "free space"), ("write", errno.EDQUOT, "quota"), ("mkdir", errno.EACCES, "permission"),
         ("mkdir", errno.EROFS, "read-only"), ("open", errno.EACCES, "permission")]


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("call, code, hint", CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_file_system_errors_are_typed_and_change_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         existing: bool, call: str, code: int, hint: str) -> None:
    folder = tmp_path / "a"
    if existing:
        adapterspec.write_adapter(folder, LORA_CONFIG, lora_tensors())
    before = snapshot(tmp_path)
    _failing(monkeypatch, call, code)
    with pytest.raises(adapterspec.WriteError) as info:
        adapterspec.write_adapter(folder, NEW_CONFIG, lora_tensors(), overwrite=True)
    monkeypatch.undo()
    STATS.count("write-errors")
    error = info.value
    assert isinstance(error, OSError) and isinstance(error, adapterspec.AdapterSpecError)
    assert error.errno == code and str(folder) in str(error) and hint in error.hint
    assert snapshot(tmp_path) == before
    assert _litter(tmp_path, folder) == []


def test_write_errors_of_several_adapters_are_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _failing(monkeypatch, "write", errno.ENOSPC)
    with pytest.raises(adapterspec.WriteError) as info:
        adapterspec.write_adapters(tmp_path / "m", {"default": (LORA_CONFIG, lora_tensors()),
                                                    "fr": (LORA_CONFIG, lora_tensors())})
    STATS.count("write-errors")
    assert info.value.errno == errno.ENOSPC


def test_write_error_pickles_with_its_errno() -> None:
    error = adapterspec.WriteError("no space", errno=errno.ENOSPC, path="out/a", hint="free space")
    again = pickle.loads(pickle.dumps(error))
    assert (type(again), again.errno, again.path, str(again)) == (adapterspec.WriteError, errno.ENOSPC, "out/a",
                                                                   str(error))


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """A 64 KiB tmpfs (root on Linux only)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    where = Path(tempfile.mkdtemp(prefix="adapterspec-enospc-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True,
                             timeout=30)
    if mounted.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True, timeout=30)
        where.rmdir()


def test_a_full_disk_is_a_typed_error_and_keeps_the_old_adapter(small_tmpfs: Path) -> None:
    folder = adapterspec.write_adapter(small_tmpfs / "a", LORA_CONFIG, lora_tensors())
    before = snapshot(small_tmpfs)
    big = {k: np.full((2, 4096) if ".lora_A." in k else (4096, 2), 0.5, np.float32)
           for k in lora_tensors()}  # r stays 2; 128 KiB in all
    with pytest.raises(adapterspec.WriteError) as info:
        adapterspec.write_adapter(folder, LORA_CONFIG, big, overwrite=True)
    STATS.count("write-errors")
    assert info.value.errno == errno.ENOSPC and "free space" in info.value.hint
    assert snapshot(small_tmpfs) == before
    assert _litter(small_tmpfs, folder) == []
    assert adapterspec.read_adapter(folder, verify=True).config["lora_alpha"] == LORA_CONFIG["lora_alpha"]


@pytest.mark.parametrize("length", [240, 255])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_a_name_the_file_system_takes_can_be_saved(tmp_path: Path, length: int, existing: bool) -> None:
    """Staging names keep within NAME_MAX whenever the final name does."""
    folder = tmp_path / ("n" * length)
    if existing:
        adapterspec.write_adapter(folder, LORA_CONFIG, lora_tensors())
    adapterspec.write_adapter(folder, NEW_CONFIG, lora_tensors(), overwrite=True)
    STATS.count("write-errors")
    assert adapterspec.read_adapter(folder).config["lora_alpha"] == 16
    assert _litter(tmp_path, folder) == []


def test_a_name_too_long_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(adapterspec.WriteError) as info:
        adapterspec.write_adapter(tmp_path / ("n" * 256), LORA_CONFIG, lora_tensors())
    STATS.count("write-errors")
    assert info.value.errno == errno.ENAMETOOLONG and "shorter name" in info.value.hint
    assert list(tmp_path.iterdir()) == []
