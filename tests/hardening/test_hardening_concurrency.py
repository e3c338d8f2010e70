"""Processes sharing one folder: a reader sees one whole adapter, never a mix; two creators, one winner.

A writer process saves two adapters into one folder in turn (``overwrite=True``) while this process
reads it in a loop, for a bounded time. Adapter A and adapter B have tensors of the same shapes but
different values and different ``lora_alpha``, so a config paired with the other adapter's tensors
passes every check -- only the values tell. Each read must be exactly A or exactly B.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hardening_harness import LORA_CONFIG, STATS, deadline, lora_tensors

import adapterspec
from adapterspec import _snapshot
from adapterspec import folder as folder_mod

pytestmark = [pytest.mark.filterwarnings("ignore::adapterspec.AdapterSpecWarning"),
              pytest.mark.skipif(sys.platform != "linux", reason="forks writer processes (Linux)")]

CONFIG_B = {**LORA_CONFIG, "lora_alpha": 16}
SECONDS = 1.5  # how long the writer keeps saving


def tensors_b() -> dict[str, np.ndarray]:
    return {k: (v * 10 + 1).astype(np.float32) for k, v in lora_tensors().items()}


ADAPTERS = [(LORA_CONFIG, lora_tensors()), (CONFIG_B, tensors_b())]


def _which(config: Any, tensors: dict[str, Any]) -> str:
    """``"A"``, ``"B"``, or ``"mixed"``."""
    for name, (cfg, values) in zip("AB", ADAPTERS):
        if config["lora_alpha"] == cfg["lora_alpha"] and sorted(tensors) == sorted(values) and all(
                np.array_equal(np.asarray(tensors[k]), values[k]) for k in values):
            return name
    return "mixed"


def _save_in_turn(folder: str, until: float, subfolder: bool) -> None:
    """The writer process: A, B, A, B... into ``folder`` until the monotonic clock reaches ``until``."""
    i = 0
    while time.monotonic() < until:
        config, values = ADAPTERS[i % 2]
        if subfolder:
            adapterspec.write_adapters(folder, {"default": (config, values), "fr": (config, values)}, overwrite=True)
        else:
            adapterspec.write_adapter(folder, config, values, overwrite=True)
        i += 1


def _in_process(target: Callable[..., None], *args: Any) -> Any:
    """``target(*args)`` in a forked process, started."""
    process = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
    process.start()
    return process


def _stop(process: Any, timeout: float = 10.0) -> None:
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join(5)
        raise AssertionError("the writer process did not finish in time")
    assert process.exitcode == 0, f"the writer process failed ({process.exitcode})"


def _reads_while_writing(folder: Path, read: Callable[[Path], str], *, multi: bool,
                         writers: int = 1) -> Iterator[str]:
    """Run the writer(s) for :data:`SECONDS` and yield the outcome of each read made meanwhile."""
    running = [_in_process(_save_in_turn, str(folder), time.monotonic() + SECONDS, multi) for _ in range(writers)]
    try:
        with deadline(SECONDS + 20):
            while any(writer.is_alive() for writer in running):
                yield read(folder)
    finally:
        for writer in running:
            _stop(writer)


def _read_numpy(folder: Path) -> str:
    try:
        adapter = adapterspec.read_adapter(folder, prefetch=True)  # the tensors of the file read, whatever comes
        return _which(adapter.config, adapter.load_tensors("numpy"))
    except adapterspec.AdapterSpecError as exc:
        return f"refused: {exc.message[:60]}"


@pytest.mark.parametrize("layout", ["single", "multi-root", "no folder handle", "multi-root, two writers"])
def test_a_reader_sees_one_adapter_or_the_other(tmp_path: Path, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``no folder handle``: as on systems without ``dir_fd`` (Windows), files are opened by path. ``two writers``:
    two processes saving over the root of other adapters at once (files put in one by one) left one save's config
    with the other's weights on disk, for every later read (49 mixed reads in 1,960 over 10 s)."""
    if layout == "no folder handle":
        monkeypatch.setattr(_snapshot, "_DIR_FD", False)
    folder = tmp_path / "a"
    multi = layout.startswith("multi-root")
    if not multi:
        adapterspec.write_adapter(folder, *ADAPTERS[0])
    else:
        adapterspec.write_adapters(folder, {"default": ADAPTERS[0], "fr": ADAPTERS[0]})
    seen = {"A": 0, "B": 0}
    for outcome in _reads_while_writing(folder, _read_numpy, multi=multi, writers=2 if "two" in layout else 1):
        seen[outcome] = seen.get(outcome, 0) + 1
    STATS.count("concurrency", sum(seen.values()))
    assert set(seen) == {"A", "B"}, seen  # no mix, no refusal
    assert seen["A"] and seen["B"], seen  # the reads did overlap the saves


def test_load_adapter_gives_one_adapter_or_the_other(tmp_path: Path) -> None:
    """The model's output after each load equals its output with adapter A or with adapter B, exactly."""
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.v = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4)

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = torch.nn.ModuleList([Block()])

        def forward(self, x):  # type: ignore[no-untyped-def]
            return self.l[0].q(x) + 2 * self.l[0].v(x)

    torch.manual_seed(0)
    model, x = Tiny().eval(), torch.linspace(-1, 1, 6).reshape(2, 3)

    def output(folder: Path) -> Any:
        adapterspec.load_adapter(model, folder, "x")
        try:
            with torch.no_grad():
                return model(x)
        finally:
            adapterspec.delete_adapter(model, "x")

    expected = {}
    for name, adapter in zip("AB", ADAPTERS):
        expected[name] = output(adapterspec.write_adapter(tmp_path / name, *adapter))
    assert not torch.equal(expected["A"], expected["B"])
    folder = adapterspec.write_adapter(tmp_path / "shared", *ADAPTERS[0])

    def load(folder: Path) -> str:
        try:
            out = output(folder)
        except adapterspec.AdapterSpecError as exc:
            return f"refused: {exc.message[:60]}"
        return next((name for name, value in expected.items() if torch.equal(out, value)), "neither")

    seen: dict[str, int] = {}
    for outcome in _reads_while_writing(folder, load, multi=False):
        seen[outcome] = seen.get(outcome, 0) + 1
    STATS.count("concurrency", sum(seen.values()))
    assert set(seen) == {"A", "B"}, seen


# -- two saves creating one folder ------------------------------------------------------------
ROUNDS = 15


def _create(folder: str, which: int, barrier: Any, results: Any) -> None:
    """A creator process: wait for the other, then save adapter ``which`` without overwrite."""
    barrier.wait(10)
    try:
        adapterspec.write_adapter(folder, *ADAPTERS[which])
        results.put((which, "saved"))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        results.put((which, f"{type(exc).__name__}: {exc}"))


@pytest.mark.parametrize("place", ["new folder", "empty folder", "new folder, plain rename", "root of other adapters"])
def test_two_saves_creating_one_folder_one_wins(tmp_path: Path, place: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly one save succeeds; the other gets AdapterExistsError; the folder holds the winner's adapter.
    ``plain rename``: as without ``renameat2`` (other systems), where ``rename`` refuses a non-empty folder."""
    if place.endswith("plain rename"):
        monkeypatch.setattr(folder_mod, "_renameat2", lambda: None)  # the forked creators inherit it
    context = multiprocessing.get_context("fork")
    for round_ in range(ROUNDS):
        folder = tmp_path / f"round{round_}"
        if place == "empty folder":
            folder.mkdir()
        elif place == "root of other adapters":  # files are put in one by one there (no folder swap)
            adapterspec.write_adapter(folder / "fr", *ADAPTERS[0])
        barrier, results = context.Barrier(2), context.Queue()
        creators = [context.Process(target=_create, args=(str(folder), i, barrier, results), daemon=True)
                    for i in (0, 1)]
        for process in creators:
            process.start()
        try:
            outcomes = dict(results.get(timeout=20) for _ in creators)
        finally:
            for process in creators:
                _stop(process)
        STATS.count("concurrency")
        winners = [i for i, outcome in outcomes.items() if outcome == "saved"]
        assert len(winners) == 1, f"round {round_}: {outcomes}"
        loser = outcomes[1 - winners[0]]
        assert loser.startswith("AdapterExistsError") and str(folder) in loser, f"round {round_}: {loser}"
        adapter = adapterspec.read_adapter(folder, prefetch=True)
        assert _which(adapter.config, adapter.load_tensors("numpy")) == "AB"[winners[0]]
        folder_mod.wait_for_removals()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_saves_among_other_adapters_take_turns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              overwrite: bool) -> None:
    """At the root of other adapters files are put in one by one (no folder swap): a save paused just
    before putting its files in keeps a second one waiting, which then finds the first one's adapter (a
    creator) or replaces it whole (``overwrite``; it used to run meanwhile, and the first then put its config
    beside the second's weights: a folder of no save, which every check passed)."""
    folder = tmp_path / "root"
    adapterspec.write_adapter(folder / "fr", *ADAPTERS[0])
    replace, paused, go_on = os.replace, threading.Event(), threading.Event()

    def paused_replace(source: Any, target: Any) -> None:
        if threading.current_thread().name == "first" and not go_on.is_set():
            paused.set()
            assert go_on.wait(20)
        replace(source, target)

    monkeypatch.setattr(os, "replace", paused_replace)
    outcomes: dict[str, str] = {}

    def create(which: int) -> None:
        name = threading.current_thread().name
        try:
            adapterspec.write_adapter(folder, *ADAPTERS[which], overwrite=overwrite)
            outcomes[name] = "saved"
        except BaseException as exc:  # noqa: BLE001 - checked below
            outcomes[name] = type(exc).__name__

    first = threading.Thread(target=create, args=(0,), name="first", daemon=True)
    second = threading.Thread(target=create, args=(1,), name="second", daemon=True)
    first.start()
    try:
        assert paused.wait(20)
        second.start()
        second.join(0.5)
        waited = second.is_alive()
    finally:
        go_on.set()
        first.join(20)
        second.join(20)
    STATS.count("concurrency")
    second_outcome = "saved" if overwrite else "AdapterExistsError"
    assert outcomes == {"first": "saved", "second": second_outcome} and waited, (outcomes, waited)
    adapter = adapterspec.read_adapter(folder, prefetch=True)
    assert _which(adapter.config, adapter.load_tensors("numpy")) == ("B" if overwrite else "A")


@pytest.mark.parametrize("layout", ["manifest", "PEFT folder"])
def test_listing_waits_for_a_save_putting_its_files_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        layout: str) -> None:
    """A save at the root of other adapters moves its config aside first and puts the new one in last; a listing
    meanwhile refused the folder ("the manifest lists adapter 'default' but ... holds no adapter_config.json",
    71 of 2,300 ``read_adapters`` with one writer) or, without a manifest, left ``default`` out silently. It waits
    for that save now."""
    folder = tmp_path / "root"
    adapterspec.write_adapters(folder, {"default": ADAPTERS[0], "fr": ADAPTERS[0]})
    if layout == "PEFT folder":
        (folder / "adapterspec.json").unlink()
    replace, paused, go_on = os.replace, threading.Event(), threading.Event()

    def paused_replace(source: Any, target: Any) -> None:
        if threading.current_thread().name == "saver" and str(target).endswith("adapter_config.json"):
            paused.set()
            assert go_on.wait(20)
        replace(source, target)

    monkeypatch.setattr(os, "replace", paused_replace)
    saver = threading.Thread(target=adapterspec.write_adapter, args=(folder, *ADAPTERS[1]),
                             kwargs={"overwrite": True}, name="saver", daemon=True)
    saver.start()
    try:
        assert paused.wait(20) and not (folder / "adapter_config.json").exists()  # the save is half-way
        threading.Timer(0.3, go_on.set).start()
        started = time.monotonic()
        adapters = adapterspec.read_adapters(folder, prefetch=True)
        waited = time.monotonic() - started
    finally:
        go_on.set()
        saver.join(20)
    STATS.count("concurrency")
    assert sorted(adapters) == ["default", "fr"] and waited >= 0.2, (sorted(adapters), waited)
    default = adapters["default"]
    assert _which(default.config, default.load_tensors("numpy")) == "B"


def test_a_killed_save_is_named_in_the_refusal(tmp_path: Path) -> None:
    """A save killed between moving the old config aside and putting its own in leaves a folder without a config;
    the refusal says so (it used to say to pass the adapter's own folder, or to save that adapter again)."""
    folder = adapterspec.write_adapter(tmp_path / "a", *ADAPTERS[0])
    dead = 4_194_303  # above Linux's default pid_max: never a running process
    (folder / "adapter_config.json").rename(folder / f".adapter_config.json.{dead}-0123abcd.old")
    for read in (adapterspec.read_adapter, adapterspec.list_adapters):
        with pytest.raises(adapterspec.AdapterSpecError) as caught:
            read(folder)
        assert "interrupted" in (caught.value.hint or "") and f"{dead}-0123abcd" in caught.value.hint


# -- validating while another process saves over the folder ----------------------------------------
def _validate(folder: Path) -> str:
    errors = adapterspec.validate_adapter(folder)
    return "valid" if not errors else f"{type(errors[0]).__name__}: {errors[0].message[:70]}"


@pytest.mark.parametrize("layout", ["single", "multi-root"])
def test_validate_never_calls_a_valid_folder_invalid_while_it_is_saved_over(tmp_path: Path, layout: str) -> None:
    """Every save writes a valid adapter, so every validation meanwhile says valid. It read the config and the
    header as one snapshot, then opened the weights again by path for the checksum (check 7) and the finite
    values (check 14): a save in between made it report 'the file was replaced or changed since the adapter was
    read' (44 of 241 validations of a folder saved over for 4 s; 9-25% in probes)."""
    folder = tmp_path / "a"
    multi = layout == "multi-root"
    if multi:
        adapterspec.write_adapters(folder, {"default": ADAPTERS[0], "fr": ADAPTERS[0]})
    else:
        adapterspec.write_adapter(folder, *ADAPTERS[0])
    seen: dict[str, int] = {}
    for outcome in _reads_while_writing(folder, _validate, multi=multi):
        seen[outcome] = seen.get(outcome, 0) + 1
    STATS.count("concurrency", sum(seen.values()))
    assert set(seen) == {"valid"} and seen["valid"] >= 5, seen


def _saved_over_after_read(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """Make the adapter reader's ``_open`` save ``ADAPTERS[1]`` over ``folder`` right after each read of it (the
    moment a concurrent save lands between validation's read and its checks); returns the original ``_open``."""
    from adapterspec import adapter as adapter_mod

    read: Callable[..., Any] = adapter_mod._open

    def read_then_saved_over(*args: Any, **kwargs: Any) -> Any:
        result = read(*args, **kwargs)
        adapterspec.write_adapter(folder, *ADAPTERS[1], overwrite=True)
        return result

    monkeypatch.setattr(adapter_mod, "_open", read_then_saved_over)
    return read


def test_validate_judges_the_files_it_read_when_a_save_comes_between(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic: a save lands right after validation has read the config and the header. The checksum and
    the finite values are those of the file read (A's: valid), not the new one by path (a false error before)."""
    from adapterspec import adapter as adapter_mod

    folder = adapterspec.write_adapter(tmp_path / "a", *ADAPTERS[0])
    read = _saved_over_after_read(folder, monkeypatch)
    assert adapterspec.validate_adapter(folder) == []
    monkeypatch.setattr(adapter_mod, "_open", read)
    adapter = adapterspec.read_adapter(folder, prefetch=True)
    assert _which(adapter.config, adapter.load_tensors("numpy")) == "B"  # the save did land


def test_validate_still_reports_a_corrupt_file_read_before_a_save(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The file validation read holds a flipped data byte; a valid save lands after it was opened: the checksum
    error of the file read is reported (not hidden by the newer file, nor turned into 'replaced')."""
    from adapterspec import adapter as adapter_mod

    folder = adapterspec.write_adapter(tmp_path / "a", *ADAPTERS[0])
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    read = _saved_over_after_read(folder, monkeypatch)
    errors = adapterspec.validate_adapter(folder)
    assert [type(e).__name__ for e in errors] == ["IntegrityError"], errors
    assert "does not match" in errors[0].message and errors[0].path == str(weights)
    monkeypatch.setattr(adapter_mod, "_open", read)
    assert adapterspec.validate_adapter(folder) == []  # the save that landed is valid


# -- a set of adapters read while another process saves a new set over it --------------------------
def _read_set(folder: Path) -> str:
    """``"A"``/``"B"``: every adapter of ``read_adapters`` is that one; ``"mixed ..."`` otherwise."""
    try:
        adapters = adapterspec.read_adapters(folder, prefetch=True)
    except adapterspec.AdapterSpecError as exc:
        return f"refused {type(exc).__name__}: {exc.message[:60]}"
    seen = {name: _which(a.config, a.load_tensors("numpy")) for name, a in adapters.items()}
    return seen["default"] if len(set(seen.values())) == 1 and len(seen) == 2 else f"mixed {seen}"


def _list_set(folder: Path) -> str:
    """``list_adapters`` then each adapter's save as its metadata records it: one save, or ``"mixed ..."``."""
    try:
        found = adapterspec.list_adapters(folder)
    except adapterspec.AdapterSpecError as exc:
        return f"refused {type(exc).__name__}: {exc.message[:60]}"
    return "listed" if sorted(found) == ["default", "fr"] else f"listed {sorted(found)}"


def test_a_set_reader_sees_one_save_or_the_other(tmp_path: Path) -> None:
    """A writer process saves sets A and B in turn (write_adapters, 'default' in the root and 'fr'): every
    read_adapters meanwhile is all A or all B. It gave 'default' from one save and 'fr' from the other, with no
    error (224 of 868 reads in 4 s; 252 of 814 in the probe)."""
    folder = tmp_path / "set"
    adapterspec.write_adapters(folder, {"default": ADAPTERS[0], "fr": ADAPTERS[0]})
    seen: dict[str, int] = {}
    for outcome in _reads_while_writing(folder, _read_set, multi=True):
        seen[outcome] = seen.get(outcome, 0) + 1
    STATS.count("concurrency", sum(seen.values()))
    assert set(seen) == {"A", "B"}, seen  # no mix, no refusal
    for outcome in _reads_while_writing(folder, _list_set, multi=True):
        assert outcome == "listed", outcome  # a save under way is waited for, not refused


def test_a_set_read_waits_for_a_set_save_under_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A set save paused after its first adapter (the root) is in: a read meanwhile waits for it and gives the new
    set (it gave the new 'default' with the old 'fr'), rather than refusing the set as interrupted."""
    folder = tmp_path / "set"
    adapterspec.write_adapters(folder, {"default": ADAPTERS[0], "fr": ADAPTERS[0]})
    install, paused, go_on = folder_mod._install, threading.Event(), threading.Event()

    def install_then_pause(*args: Any, **kwargs: Any) -> None:
        install(*args, **kwargs)
        if threading.current_thread().name == "saver" and not paused.is_set():
            paused.set()
            assert go_on.wait(20)

    monkeypatch.setattr(folder_mod, "_install", install_then_pause)
    saver = threading.Thread(target=adapterspec.write_adapters, name="saver", daemon=True,
                             args=(folder, {"default": ADAPTERS[1], "fr": ADAPTERS[1]}), kwargs={"overwrite": True})
    saver.start()
    try:
        assert paused.wait(20)
        threading.Timer(0.3, go_on.set).start()
        started = time.monotonic()
        outcome = _read_set(folder)
        waited = time.monotonic() - started
    finally:
        go_on.set()
        saver.join(20)
    STATS.count("concurrency")
    assert outcome == "B" and waited >= 0.2, (outcome, waited)
