"""A save killed midway leaves hidden staging behind; the next save into the same place removes it,
and never what a live save is working on.

The writers here are real processes stopped at a chosen step of the save and killed with SIGKILL (no
handler runs), or left running while another save goes on beside them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hardening_harness import LORA_CONFIG, STATS, lora_tensors, snapshot

import adapterspec
from adapterspec import _staging
from adapterspec import folder as folder_mod
from adapterspec.spec import CONFIG_NAME

pytestmark = [pytest.mark.filterwarnings("ignore::adapterspec.AdapterSpecWarning"),
              pytest.mark.skipif(sys.platform != "linux", reason="kills forked writer processes (Linux)")]

NEW_CONFIG = {**LORA_CONFIG, "lora_alpha": 16}


def new_tensors() -> dict[str, np.ndarray]:
    return {k: (v * 10 + 1).astype(np.float32) for k, v in lora_tensors().items()}


def _hidden(*folders: Path) -> list[str]:
    return sorted(p.name for f in folders if f.exists() for p in f.iterdir() if p.name.startswith("."))


def _alpha(folder: Path) -> int:
    adapter = adapterspec.read_adapter(folder, verify=True)
    return int(adapter.config["lora_alpha"])


def _save_until(folder: str, step: tuple[Any, str], ready: Any, multi: bool) -> None:
    """The writer process: save the new adapter, and stop for good at ``step`` (object, function name)."""
    target, name = step

    def stop(*args: Any, **kwargs: Any) -> Any:
        ready.set()
        while True:
            time.sleep(1)

    setattr(target, name, stop)
    if multi:
        adapterspec.write_adapters(folder, {"default": (NEW_CONFIG, new_tensors())}, overwrite=True)
    else:
        adapterspec.write_adapter(folder, NEW_CONFIG, new_tensors(), overwrite=True)


@pytest.fixture
def stuck_writer() -> Iterator[Callable[..., Any]]:
    """Start a writer process stopped at a step of its save; every one is killed and reaped afterwards."""
    started: list[Any] = []
    context = multiprocessing.get_context("fork")

    def start(folder: Path, step: tuple[Any, str], multi: bool = False) -> Any:
        ready = context.Event()
        process = context.Process(target=_save_until, args=(str(folder), step, ready, multi), daemon=True)
        process.start()
        started.append(process)
        assert ready.wait(20), "the writer did not reach the step"
        return process

    yield start
    for process in started:
        if process.is_alive():
            process.kill()
        process.join(10)


def _kill(process: Any) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.join(10)
    assert process.exitcode == -signal.SIGKILL


STOPS = {  # layout -> where the writer is killed, after its staging is written
    "swap": (folder_mod, "_exchange"),
    "create": (folder_mod, "_rename_new"),
    "files one by one": (os, "replace"),
}


@pytest.mark.parametrize("layout", list(STOPS))
def test_the_next_save_removes_what_a_killed_save_left(tmp_path: Path, stuck_writer: Callable[..., Any],
                                                       layout: str) -> None:
    folder = tmp_path / "a"
    if layout == "files one by one":  # the root of a multi-adapter folder: files are replaced in place
        adapterspec.write_adapters(folder, {"default": (LORA_CONFIG, lora_tensors()),
                                            "fr": (LORA_CONFIG, lora_tensors())})
    elif layout == "swap":
        adapterspec.write_adapter(folder, LORA_CONFIG, lora_tensors())
    _kill(stuck_writer(folder, STOPS[layout], multi=layout == "files one by one"))
    STATS.count("crash-cleanup")
    left = _hidden(tmp_path, folder)
    assert left, "the killed save left nothing to clean up"
    if layout == "swap":
        assert _alpha(folder) == LORA_CONFIG["lora_alpha"]  # the old adapter, untouched
    if layout == "files one by one":
        assert not (folder / CONFIG_NAME).exists()
        started = time.monotonic()
        with pytest.raises(adapterspec.FileFormatError, match=CONFIG_NAME):
            adapterspec.read_adapter(folder)  # refused at once: the save that moved the config is dead
        assert time.monotonic() - started < 1.0
    adapterspec.write_adapter(folder, NEW_CONFIG, new_tensors(), overwrite=True)
    folder_mod.wait_for_removals()
    assert _hidden(tmp_path, folder) == [], f"left by the killed save: {left}"
    assert _alpha(folder) == 16


def test_a_live_save_s_staging_is_never_removed(tmp_path: Path, stuck_writer: Callable[..., Any]) -> None:
    folder = adapterspec.write_adapter(tmp_path / "a", LORA_CONFIG, lora_tensors())
    writer = stuck_writer(folder, STOPS["swap"])
    staging = [tmp_path / name for name in _hidden(tmp_path)]
    assert len(staging) == 1
    before = snapshot(staging[0])
    adapterspec.write_adapter(folder, {**LORA_CONFIG, "lora_alpha": 32}, lora_tensors(), overwrite=True)
    folder_mod.wait_for_removals()
    STATS.count("crash-cleanup")
    assert _hidden(tmp_path) == [staging[0].name] and snapshot(staging[0]) == before  # the live save's, intact
    assert _alpha(folder) == 32
    _kill(writer)
    adapterspec.write_adapter(folder, NEW_CONFIG, new_tensors(), overwrite=True)
    folder_mod.wait_for_removals()
    assert _hidden(tmp_path) == []


def test_a_save_on_another_thread_keeps_its_staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's own saves: a thread's staging is locked while it works, so a save beside it keeps it."""
    folder = adapterspec.write_adapter(tmp_path / "a", LORA_CONFIG, lora_tensors())
    write_file, reached, go_on = folder_mod._write_file, threading.Event(), threading.Event()

    def slow_write(path: Path, content: Any, **kwargs: Any) -> None:
        if threading.current_thread().name == "slow-save":
            reached.set()
            assert go_on.wait(20)
        write_file(path, content, **kwargs)

    monkeypatch.setattr(folder_mod, "_write_file", slow_write)
    errors: list[BaseException] = []

    def save() -> None:
        try:
            adapterspec.write_adapter(folder, NEW_CONFIG, new_tensors(), overwrite=True)
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    thread = threading.Thread(target=save, name="slow-save", daemon=True)
    thread.start()
    try:
        assert reached.wait(20)
        staging = _hidden(tmp_path)
        adapterspec.write_adapter(folder, {**LORA_CONFIG, "lora_alpha": 32}, lora_tensors(), overwrite=True)
        STATS.count("crash-cleanup")
        assert set(staging) <= set(_hidden(tmp_path))
    finally:
        go_on.set()
        thread.join(20)
    assert not thread.is_alive() and errors == []
    folder_mod.wait_for_removals()
    assert _hidden(tmp_path) == [] and _alpha(folder) == 16


def test_an_old_adapter_that_cannot_be_removed_is_reported_and_removed_later(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    folder = adapterspec.write_adapter(tmp_path / "a", LORA_CONFIG, lora_tensors())

    def refuse(path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(_staging, "remove_tree", refuse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapterspec.write_adapter(folder, NEW_CONFIG, new_tensors(), overwrite=True)
        folder_mod.wait_for_removals()
    monkeypatch.undo()
    STATS.count("crash-cleanup")
    assert any("cannot be removed" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert len(_hidden(tmp_path)) == 1
    adapterspec.write_adapter(folder, LORA_CONFIG, lora_tensors(), overwrite=True)
    folder_mod.wait_for_removals()
    assert _hidden(tmp_path) == [] and _alpha(folder) == LORA_CONFIG["lora_alpha"]


def _overwrite_read_only(base: str) -> None:
    """Save, make the folder read-only (0555), overwrite it, wait for the removal; exit 0 if nothing is left."""
    folder = Path(base) / "a"
    adapterspec.write_adapter(folder, LORA_CONFIG, lora_tensors())
    os.chmod(folder, 0o555)
    adapterspec.write_adapter(folder, NEW_CONFIG, new_tensors(), overwrite=True)
    folder_mod.wait_for_removals()
    os._exit(0 if _hidden(Path(base)) == [] and _alpha(folder) == 16 else 3)


def test_overwriting_a_read_only_folder_removes_the_old_adapter(tmp_path: Path) -> None:
    """As a user the folder's mode binds (root ignores it: the save then runs as ``nobody``)."""
    base = tmp_path
    if os.geteuid() == 0:  # a folder nobody may use, in a world-writable one nobody can reach
        shared = next((Path(p) for p in ("/tmp", "/dev/shm") if os.path.isdir(p)
                       and os.stat(p).st_mode & 0o1007 == 0o1007), None)
        if shared is None:
            pytest.skip("no world-writable folder to save in as nobody")
        base = shared / f"adapterspec-ro-{os.getpid()}"
        base.mkdir(mode=0o755)
        os.chown(base, 65534, 65534)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                _overwrite_read_only(str(base))
            finally:
                os._exit(2)
        deadline = time.monotonic() + 30
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the save did not finish in time")
        STATS.count("crash-cleanup")
        assert os.waitstatus_to_exitcode(done[1]) == 0, "the old adapter was left behind (or the save failed)"
    finally:
        if base != tmp_path:
            for path in sorted(base.rglob("*"), reverse=True):
                if path.is_dir():
                    path.chmod(0o755)
            import shutil

            shutil.rmtree(base)


def test_cleanup_racing_another_removal_is_quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale name another cleaner (or the old adapter's own removal) removes first is no failure."""
    stale = tmp_path / _staging.staging_name("a", ".tmp")
    stale.mkdir()
    (stale / CONFIG_NAME).write_text("{}")

    def removed_meanwhile(path: Path, pid: int) -> bool:
        import shutil

        shutil.rmtree(path)
        return True

    monkeypatch.setattr(_staging, "owner_gone", removed_meanwhile)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _staging.remove_stale(tmp_path, ["a"]) == []
    STATS.count("crash-cleanup")


def test_many_overwrites_in_a_row_leave_nothing_and_warn_nothing(tmp_path: Path) -> None:
    """Each save's cleanup runs while the previous old adapters are still being removed on their threads."""
    folder = adapterspec.write_adapter(tmp_path / "a", LORA_CONFIG, lora_tensors())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(100):
            adapterspec.write_adapter(folder, {**LORA_CONFIG, "lora_alpha": 4 + i % 2}, lora_tensors(), overwrite=True)
        folder_mod.wait_for_removals()
    STATS.count("crash-cleanup", 100)
    assert _hidden(tmp_path, folder) == []
