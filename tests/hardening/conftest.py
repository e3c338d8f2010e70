"""Hardening suite: shared fixtures, and the session summary of generated bad inputs.

The summary line (``pytest_terminal_summary``) appears in plain ``pytest -q`` output::

    ==== adapterspec hardening: 10532 generated bad inputs, 0 untyped exceptions, 0 hangs, 0 partial mutations ====
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hardening_harness import LONG, STATS

import adapterspec

#: The small LoRA adapter every byte-level fuzzer starts from: two modules, r=2, F32.
LORA_CONFIG = {"peft_type": "LORA", "target_modules": ["q", "v"], "r": 2, "lora_alpha": 4}


def lora_tensors() -> dict[str, np.ndarray]:
    """Element-unique values (sin of an index ramp), so a swapped key or transpose cannot pass."""
    shapes = {"lora_A.weight": (2, 3), "lora_B.weight": (4, 2)}
    out, offset = {}, 0
    for module in ("l.0.q", "l.0.v"):
        for param, shape in shapes.items():
            n = int(np.prod(shape))
            out[f"base_model.model.{module}.{param}"] = np.sin(np.arange(offset, offset + n, dtype=np.float64)).reshape(shape).astype(np.float32)
            offset += n
    return out


@pytest.fixture(scope="session")
def good_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid adapter folder written by :func:`adapterspec.write_adapter` (never modified: copy it)."""
    folder = tmp_path_factory.mktemp("good") / "lora"
    adapterspec.write_adapter(folder, LORA_CONFIG, lora_tensors())
    return folder


def scratch_root() -> Path | None:
    """A tmpfs folder for the byte-level fuzzers, which rewrite small files thousands of times
    (100x faster than a journaled disk), or ``None`` where there is none."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


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
             f"{len(STATS.mutations)} partial mutations")
    groups = ", ".join(f"{k} {v}" for k, v in sorted(STATS.by_group.items()))
    terminalreporter.write_line(f"inputs by group: {groups}")
    terminalreporter.write_line(f"calls: {STATS.calls} ({STATS.typed} typed refusals, {STATS.accepted} accepted)")
    for line in (STATS.untyped + STATS.hangs + STATS.mutations + [f"known: {k}" for k in STATS.known])[:20]:
        terminalreporter.write_line(f"  {line}")
