"""Hardening suite: shared fixtures, and the session summary of generated bad inputs.

The summary line (``pytest_terminal_summary``) appears in plain ``pytest -q`` output::

    ==== adapterspec hardening: 10532 generated bad inputs, 0 untyped exceptions, 0 hangs, 0 partial mutations,
    304 regex bombs matched in bounded time ====
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hardening_harness import LONG, LORA_CONFIG, STATS, lora_tensors, scratch_root

import adapterspec


@pytest.fixture(scope="session")
def good_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid adapter folder written by :func:`adapterspec.write_adapter` (never modified: copy it)."""
    folder = tmp_path_factory.mktemp("good") / "lora"
    adapterspec.write_adapter(folder, LORA_CONFIG, lora_tensors())
    return folder


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """An empty folder on tmpfs when available (else ``tmp_path``), removed afterwards."""
    root = scratch_root()
    if root is None:
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="adapterspec-hardening-", dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def adapter_copy(good_adapter: Path, scratch: Path) -> Path:
    """A private copy of :func:`good_adapter` the test may damage."""
    return Path(shutil.copytree(good_adapter, scratch / "lora"))


@pytest.fixture
def lean_copy(adapter_copy: Path) -> Path:
    """:func:`adapter_copy` with the minimal config PEFT accepts (schema validation is most of a read's time)."""
    (adapter_copy / "adapter_config.json").write_text(json.dumps(LORA_CONFIG), "utf-8")
    return adapter_copy


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    if not (STATS.calls or STATS.inputs):
        return
    terminalreporter.write_sep(
        "=", f"adapterspec hardening{' (long mode)' if LONG else ''}: {STATS.inputs} generated bad inputs, "
             f"{len(STATS.untyped)} untyped exceptions"
             f"{f' (+{len(STATS.known)} known, xfailed)' if STATS.known else ''}, {len(STATS.hangs)} hangs, "
             f"{len(STATS.mutations)} partial mutations, {STATS.by_group.get('regex-budget', 0)} regex bombs matched in "
             "bounded time")
    groups = ", ".join(f"{k} {v}" for k, v in sorted(STATS.by_group.items()))
    terminalreporter.write_line(f"inputs by group: {groups}")
    terminalreporter.write_line(f"calls: {STATS.calls} ({STATS.typed} typed refusals, {STATS.accepted} accepted)")
    for line in (STATS.untyped + STATS.hangs + STATS.mutations + [f"known: {k}" for k in STATS.known])[:20]:
        terminalreporter.write_line(f"  {line}")
