"""Saving never destroys the previous good copy.

Failures are injected at every step of ``write_adapter`` (exceptions, KeyboardInterrupt, and real
crashes: a forked child that ``os._exit``\\ s in the middle of the save); afterwards the folder holds
the old adapter or the new one -- never a mix, never temp litter.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hardening_harness import LORA_CONFIG, lora_tensors
from hardening_harness import STATS, snapshot

import adapterspec
from adapterspec import folder as folder_mod
from adapterspec.spec import CONFIG_NAME, SAFETENSORS_NAME

pytestmark = pytest.mark.filterwarnings("ignore::adapterspec.AdapterSpecWarning")

NEW_CONFIG = {**LORA_CONFIG, "lora_alpha": 16, "r": 2}


def new_tensors() -> dict[str, np.ndarray]:
    return {k: (v * 10 + 1).astype(np.float32) for k, v in lora_tensors().items()}


def _state(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    adapter = adapterspec.read_adapter(folder, verify=True)
    return dict(adapter.config), adapter.load_tensors("numpy")


def _is(folder: Path, config: dict, tensors: dict[str, np.ndarray]) -> bool:
    cfg, loaded = _state(folder)
    return cfg["lora_alpha"] == config["lora_alpha"] and sorted(loaded) == sorted(tensors) and all(
        np.array_equal(loaded[k], tensors[k]) for k in tensors)


def _litter(*folders: Path) -> list[str]:
    folder_mod.wait_for_removals()  # an overwrite removes the old adapter in the background
    return [p.name for f in folders if f.exists() for p in f.iterdir() if p.name.startswith(".")]


class Boom(Exception):
    pass


def _fail_on(monkeypatch: pytest.MonkeyPatch, target: object, name: str, call: int, exc: BaseException) -> None:
    original = getattr(target, name)
    count = {"n": 0}

    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        count["n"] += 1
        if count["n"] == call:
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)


STEPS = [("_write_file", 1), ("_write_file", 2), ("_fsync_dir", 1), ("_exchange", 1), ("_link_or_copy", 1)]
EXCEPTIONS = [Boom("injected"), KeyboardInterrupt(), OSError(28, "No space left on device")]


@pytest.mark.parametrize("exc", EXCEPTIONS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("step", STEPS, ids=lambda s: f"{s[0]}#{s[1]}")
def test_failure_while_overwriting_keeps_the_old_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           step: tuple[str, int], exc: BaseException) -> None:
    folder = adapterspec.write_adapter(tmp_path / "a", LORA_CONFIG, lora_tensors())
    (folder / "README.md").write_text("model card")  # other files survive an overwrite too
    before = snapshot(folder)
    _fail_on(monkeypatch, folder_mod, step[0], step[1], exc)
    with pytest.raises(type(exc)):  # folders are fsynced only for a durable write
        adapterspec.write_adapter(folder, NEW_CONFIG, new_tensors(), overwrite=True, durable=step[0] == "_fsync_dir")
    monkeypatch.undo()
    STATS.count("atomic-write")
    if step[0] == "_fsync_dir" and snapshot(folder) != before:  # failed after the swap: the new adapter is complete
        assert _is(folder, NEW_CONFIG, new_tensors())
    else:
        assert snapshot(folder) == before, "the old adapter changed"
        assert _is(folder, LORA_CONFIG, lora_tensors())
    assert (folder / "README.md").read_text() == "model card"
    assert _litter(tmp_path, folder) == []


@pytest.mark.parametrize("exc", EXCEPTIONS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("step", [("_write_file", 1), ("_write_file", 2), ("_rename_new", 1)],
                         ids=lambda s: f"{s[0]}#{s[1]}")
def test_failure_while_creating_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               step: tuple[str, int], exc: BaseException) -> None:
    target = folder_mod.os if step[0] == "rename" else folder_mod
    _fail_on(monkeypatch, target, step[0], step[1], exc)
    with pytest.raises(type(exc)):
        adapterspec.write_adapter(tmp_path / "new", LORA_CONFIG, lora_tensors())
    monkeypatch.undo()
    STATS.count("atomic-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _multi_root(tmp_path: Path) -> Path:
    """A root adapter with a subfolder adapter: overwriting the root cannot swap folders."""
    return adapterspec.write_adapters(tmp_path / "multi", {"default": (LORA_CONFIG, lora_tensors()),
                                                           "fr": (LORA_CONFIG, lora_tensors())})


@pytest.mark.parametrize("exc", EXCEPTIONS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("step", [("_write_file", 1), ("_write_file", 2), ("replace", 1), ("replace", 2),
                                  ("rename", 1), ("_link_or_copy", 1)], ids=lambda s: f"{s[0]}#{s[1]}")
def test_failure_while_replacing_files_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  step: tuple[str, int], exc: BaseException) -> None:
    root = _multi_root(tmp_path)
    before = snapshot(root)
    target = folder_mod.os if step[0] in ("replace", "rename", "link") else folder_mod
    _fail_on(monkeypatch, target, step[0], step[1], exc)
    with pytest.raises(type(exc)):
        adapterspec.write_adapter(root, NEW_CONFIG, new_tensors(), overwrite=True)
    monkeypatch.undo()
    STATS.count("atomic-write")
    assert snapshot(root) == before
    assert _is(root, LORA_CONFIG, lora_tensors())
    assert _litter(tmp_path, root, root / "fr") == []


def test_existing_adapter_needs_overwrite(tmp_path: Path) -> None:
    folder = adapterspec.write_adapter(tmp_path / "a", LORA_CONFIG, lora_tensors())
    before = snapshot(folder)
    with pytest.raises(adapterspec.AdapterExistsError) as info:
        adapterspec.write_adapter(folder, NEW_CONFIG, new_tensors())
    assert str(folder) in str(info.value)
    assert snapshot(folder) == before
    adapterspec.write_adapter(folder, NEW_CONFIG, new_tensors(), overwrite=True)
    assert _is(folder, NEW_CONFIG, new_tensors())
    assert _litter(tmp_path, folder) == []


@pytest.mark.parametrize("layout", ["single", "multi-root", "no-exchange"])
def test_overwrite_succeeds_and_keeps_other_files(tmp_path: Path, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _multi_root(tmp_path) if layout == "multi-root" else adapterspec.write_adapter(tmp_path / "a", LORA_CONFIG, lora_tensors())
    if layout == "no-exchange":
        monkeypatch.setattr(folder_mod, "_exchange", lambda a, b: False)
    (folder / "README.md").write_text("card")
    adapterspec.write_adapter(folder, NEW_CONFIG, new_tensors(), overwrite=True)
    assert _is(folder, NEW_CONFIG, new_tensors())
    assert (folder / "README.md").read_text() == "card"
    assert _litter(tmp_path, folder) == []
    if layout == "multi-root":
        assert _is(folder / "fr", LORA_CONFIG, lora_tensors())
        assert set(adapterspec.list_adapters(folder)) == {"default", "fr"}


def test_modes_follow_the_umask(tmp_path: Path) -> None:
    """Not tempfile's 0700/0600: a saved adapter is as readable as any file the user writes."""
    old = os.umask(0o022)
    try:
        folder = adapterspec.write_adapter(tmp_path / "a", LORA_CONFIG, lora_tensors())
        modes = [stat.S_IMODE(folder.stat().st_mode)] + [stat.S_IMODE((folder / n).stat().st_mode)
                                                          for n in (CONFIG_NAME, SAFETENSORS_NAME)]
        adapterspec.write_adapter(folder, NEW_CONFIG, new_tensors(), overwrite=True)
        root = _multi_root(tmp_path)
        adapterspec.write_adapter(root, NEW_CONFIG, new_tensors(), overwrite=True)
        modes += [stat.S_IMODE(folder.stat().st_mode), stat.S_IMODE((folder / CONFIG_NAME).stat().st_mode),
                  stat.S_IMODE((root / CONFIG_NAME).stat().st_mode), stat.S_IMODE((root / SAFETENSORS_NAME).stat().st_mode)]
    finally:
        os.umask(old)
    assert modes == [0o755, 0o644, 0o644, 0o755, 0o644, 0o644, 0o644]


def test_write_through_a_symlinked_folder(tmp_path: Path) -> None:
    real = adapterspec.write_adapter(tmp_path / "real", LORA_CONFIG, lora_tensors())
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    adapterspec.write_adapter(link, NEW_CONFIG, new_tensors(), overwrite=True)
    assert link.is_symlink() and _is(real, NEW_CONFIG, new_tensors())


@pytest.mark.parametrize("kind", ["file", "dangling symlink", "symlink to file"])
def test_path_that_is_not_a_folder(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x"
    if kind == "file":
        path.write_text("not a folder")
    elif kind == "dangling symlink":
        path.symlink_to(tmp_path / "nowhere")
    else:
        (tmp_path / "f").write_text("x")
        path.symlink_to(tmp_path / "f")
    before = snapshot(tmp_path)
    with pytest.raises(adapterspec.FileFormatError) as info:
        adapterspec.write_adapter(path, LORA_CONFIG, lora_tensors(), overwrite=True)
    assert str(path) in str(info.value)
    assert snapshot(tmp_path) == before
    STATS.count("atomic-write")


# -- real crashes ---------------------------------------------------------------------------
CRASH_POINTS = ["_write_file", "_fsync_dir", "_exchange", "_link_or_copy", "rename", "replace", "link", "unlink", "rmtree"]


def _in_child(body: Callable[[], None]) -> int:
    """Fork; the child runs ``body`` and leaves with ``os._exit`` (0 done, 1 raised; ``body`` may ``os._exit``
    itself): no cleanup, no exception handlers -- like SIGKILL or a power cut. Returns the child's exit code."""
    pid = os.fork()
    if pid == 0:
        try:
            body()
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _crash_child(folder: Path, crash_at: int) -> int:
    """Fork; the child saves the new adapter and dies (``os._exit``) at the ``crash_at``-th file-system step."""
    def body() -> None:
        count = {"n": 0}

        def hook(target: object, name: str) -> None:
            original = getattr(target, name)

            def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
                count["n"] += 1
                if count["n"] == crash_at:
                    os._exit(77)
                result = original(*args, **kwargs)
                return result

            setattr(target, name, wrapper)

        for name in CRASH_POINTS:
            for target in (folder_mod, folder_mod.os, folder_mod.shutil, folder_mod.Path):
                if name in vars(target) if isinstance(target, type) else hasattr(target, name):
                    if target is folder_mod.Path and name != "unlink":
                        continue
                    hook(target, name)
        adapterspec.write_adapter(folder, NEW_CONFIG, new_tensors(), overwrite=True)

    return _in_child(body)


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="needs fork (Linux)")
@pytest.mark.parametrize("layout", ["single", "multi-root", "no-exchange"])
def test_crash_at_every_step_leaves_old_or_new(tmp_path: Path, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill the writer at each file-system step: the folder reads as the old adapter or the new one. Where
    folders cannot be swapped (the root of a multi-adapter folder), a crash between the renames may
    instead leave no config at all -- refused with a clear error, the old config kept as a hidden backup --
    but never new weights with the old config."""
    if layout == "no-exchange":
        monkeypatch.setattr(folder_mod, "_renameat2", lambda: None)
    crash_at, outcomes = 1, []
    while True:
        base = tmp_path / f"run{crash_at}"
        base.mkdir()
        folder = _multi_root(base) if layout == "multi-root" else adapterspec.write_adapter(base / "a", LORA_CONFIG, lora_tensors())
        code = _crash_child(folder, crash_at)
        assert code in (0, 77), f"child failed ({code}) at step {crash_at}"
        STATS.count("atomic-crash")
        try:
            if _is(folder, LORA_CONFIG, lora_tensors()):
                outcomes.append("old")
            elif _is(folder, NEW_CONFIG, new_tensors()):
                outcomes.append("new")
            else:
                raise AssertionError(f"step {crash_at}: neither the old nor the new adapter")
        except adapterspec.AdapterSpecError as exc:
            assert layout != "single", f"step {crash_at}: {exc}"
            assert not (folder / CONFIG_NAME).exists(), f"step {crash_at}: mixed adapter: {exc}"
            backups = [p for p in folder.iterdir() if p.name.startswith(f".{CONFIG_NAME}.") and p.suffix == ".old"]
            assert backups and json.loads(backups[0].read_text())["lora_alpha"] == LORA_CONFIG["lora_alpha"]
            outcomes.append("no-config")
        if code == 0:
            break
        crash_at += 1
        assert crash_at < 60
    assert outcomes[0] == "old" and outcomes[-1] == "new", outcomes
    if layout == "single":
        assert set(outcomes) == {"old", "new"}


# -- a set of adapters saved together ---------------------------------------------------------
SET_NAMES = ("default", "fr", "de")


def _set_alphas(root: Path) -> dict[str, int]:
    """name -> lora_alpha of each adapter ``read_adapters`` gives, after checking its tensors are its own save's."""
    out = {}
    for name, adapter in adapterspec.read_adapters(root, prefetch=True).items():
        values = adapter.load_tensors("numpy")
        old = adapter.config["lora_alpha"] == LORA_CONFIG["lora_alpha"]
        expected = lora_tensors() if old else new_tensors()
        assert all(np.array_equal(values[k], expected[k]) for k in expected), name
        out[name] = adapter.config["lora_alpha"]
    return out


def _set_save_killed_after(root: Path, k: int) -> int:
    """Fork; the child saves the new set over ``root`` and dies (``os._exit``, as SIGKILL) right after its k-th
    adapter (or, k = 4, its manifest) is in place."""
    def body() -> None:
        install, count = folder_mod._install, [0]

        def install_then_die(*args, **kwargs):  # type: ignore[no-untyped-def]
            install(*args, **kwargs)
            count[0] += 1
            if count[0] == k:
                os._exit(77)

        folder_mod._install = install_then_die
        adapterspec.write_adapters(root, {n: (NEW_CONFIG, new_tensors()) for n in SET_NAMES}, overwrite=True)

    return _in_child(body)


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="needs fork (Linux)")
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_a_set_save_killed_midway_is_refused_not_read_as_a_mix(tmp_path: Path, k: int) -> None:
    """write_adapters of three adapters over three, killed after the k-th adapter is in: the folder held e.g.
    {'default': new, 'fr': old, 'de': old} and read_adapters / list_adapters / validate returned it silently (probe:
    6 mixed sets in 30 random kills). Now the manifest (written last) records the save of each adapter, which
    records it too: a set of two saves is refused with IntegrityError naming the folder and the adapters of the
    other save, and saving the set again repairs it. k = 4: the manifest is in too, the set is the new one."""
    root = adapterspec.write_adapters(tmp_path / "set", {n: (LORA_CONFIG, lora_tensors()) for n in SET_NAMES})
    assert _set_alphas(root) == dict.fromkeys(SET_NAMES, LORA_CONFIG["lora_alpha"])
    code = _set_save_killed_after(root, k)
    STATS.count("atomic-crash")
    if k == 4:
        assert code == 77 and _set_alphas(root) == dict.fromkeys(SET_NAMES, NEW_CONFIG["lora_alpha"])
        return
    assert code == 77
    installed = sorted(SET_NAMES[:k])  # the root first, then the subfolders in the order given
    for read in (adapterspec.read_adapters, adapterspec.list_adapters):
        with pytest.raises(adapterspec.IntegrityError) as caught:
            read(root)
        error = caught.value
        assert error.path == str(root) and error.key == installed[0], error
        assert all(repr(name) in error.message for name in installed), error.message
        assert "interrupted" in error.message and "save the set again" in (error.hint or ""), error
    from adapterspec.cli import main as cli

    assert cli(["validate", str(root)]) == 1
    adapterspec.write_adapters(root, {n: (NEW_CONFIG, new_tensors()) for n in SET_NAMES}, overwrite=True)
    assert _set_alphas(root) == dict.fromkeys(SET_NAMES, NEW_CONFIG["lora_alpha"])
    folder_mod.wait_for_removals()
    assert _litter(tmp_path, root, *(root / n for n in SET_NAMES[1:])) == []


def test_a_set_save_that_fails_midway_is_refused_not_read_as_a_mix(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception (a full disk) in the second adapter's install: the first is the new one, the others old; the
    WriteError said so, but read_adapters returned the mix silently afterwards. Now it is refused."""
    root = adapterspec.write_adapters(tmp_path / "set", {n: (LORA_CONFIG, lora_tensors()) for n in SET_NAMES})
    install, count = folder_mod._install, [0]

    def full_disk_second(*args, **kwargs):  # type: ignore[no-untyped-def]
        count[0] += 1
        if count[0] == 2:
            raise OSError(28, "No space left on device")
        return install(*args, **kwargs)

    monkeypatch.setattr(folder_mod, "_install", full_disk_second)
    with pytest.raises(adapterspec.WriteError):
        adapterspec.write_adapters(root, {n: (NEW_CONFIG, new_tensors()) for n in SET_NAMES}, overwrite=True)
    monkeypatch.undo()
    with pytest.raises(adapterspec.IntegrityError, match="'default'"):
        adapterspec.read_adapters(root)
    assert _litter(tmp_path, root, *(root / n for n in SET_NAMES[1:])) == []
