"""Shared machinery of the hardening tests: run one hostile input, classify what happened, count it.

Every generated input goes through :func:`probe`, which runs the call under a deadline (SIGALRM:
Python's regex engine and the interpreter check signals, so a regex bomb or a loop is stopped)
and records the outcome. The session totals are printed by ``conftest.pytest_terminal_summary``,
and each test asserts its own inputs produced no untyped exception, no hang and no mutation.

>>> outcome = probe("demo", lambda: int("x"))    # doctest: +SKIP
>>> outcome.kind                                  # doctest: +SKIP
'untyped'
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import adapterspec

__all__ = [
    "LONG",
    "LORA_CONFIG",
    "SCALE",
    "STATS",
    "Hang",
    "Outcome",
    "deadline",
    "expect_clean",
    "long_mode_extra",
    "lora_tensors",
    "probe",
    "scratch_root",
    "snapshot",
]

#: ``ADAPTERSPEC_FUZZ_LONG=1`` (nightly CI) multiplies every generated-input count by 10.
LONG = os.environ.get("ADAPTERSPEC_FUZZ_LONG", "") not in ("", "0")
SCALE = 10 if LONG else 1

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


def scratch_root() -> Path | None:
    """A tmpfs folder for the byte-level fuzzers, which rewrite small files thousands of times
    (100x faster than a journaled disk), or ``None`` where there is none."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


#: Seconds one call may take before it counts as a hang.
DEADLINE_S = 10.0


class Hang(BaseException):
    """Raised by the SIGALRM handler; a BaseException so that ``except Exception`` cannot swallow it."""


@dataclass
class Outcome:
    """What one call on one hostile input did."""

    label: str
    kind: str  # "ok", "typed", "untyped", "hang"
    value: Any = None
    error: BaseException | None = None
    trace: str = ""


@dataclass
class Stats:
    """Session totals, printed at the end of the run."""

    inputs: int = 0
    calls: int = 0
    typed: int = 0
    accepted: int = 0
    untyped: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    mutations: list[str] = field(default_factory=list)
    known: list[str] = field(default_factory=list)  # untyped, but a known issue outside this suite's files (xfail)
    by_group: dict[str, int] = field(default_factory=dict)

    def known_issue(self, outcome: Outcome) -> None:
        """Move ``outcome`` (an xfailed known issue) from the untyped list to the known list."""
        line = next((u for u in self.untyped if u.startswith(outcome.label[:200])), None)
        if line is not None:
            self.untyped.remove(line)
            self.known.append(line)

    def count(self, group: str, n: int = 1) -> None:
        """Count ``n`` generated inputs of ``group``."""
        self.inputs += n
        self.by_group[group] = self.by_group.get(group, 0) + n


STATS = Stats()


@contextlib.contextmanager
def deadline(seconds: float = DEADLINE_S) -> Iterator[None]:
    """Raise :class:`Hang` in the block if it runs longer than ``seconds`` (main thread only)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def probe(label: str, call: Callable[[], Any], *, seconds: float = DEADLINE_S) -> Outcome:
    """Run ``call`` on a hostile input: ``ok`` (returned), ``typed`` (an AdapterSpecError), ``untyped``, ``hang``."""
    STATS.calls += 1
    try:
        with deadline(seconds):
            value = call()
    except Hang as exc:
        STATS.hangs.append(label[:300])
        return Outcome(label, "hang", error=exc)
    except adapterspec.AdapterSpecError as exc:
        STATS.typed += 1
        return Outcome(label, "typed", error=exc)
    except Exception as exc:  # noqa: BLE001 - exactly what the suite hunts for
        STATS.untyped.append(f"{label[:200]}: {type(exc).__name__}: {str(exc)[:300]}")
        return Outcome(label, "untyped", error=exc, trace=traceback.format_exc())
    if isinstance(value, list) and value and all(isinstance(v, adapterspec.AdapterSpecError) for v in value):
        STATS.typed += 1  # validate_adapter reports its refusals as a list
    else:
        STATS.accepted += 1
    return Outcome(label, "ok", value=value)


def long_mode_extra(raw: bytes, count: int, *, seed: int) -> list[bytes]:
    """In long mode, ``(SCALE - 1) * count`` more variants of ``raw``: seeded random multi-byte
    mutations (1-8 bytes set to random values, sometimes also truncated or extended); ``[]`` otherwise."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range((SCALE - 1) * count):
        blob = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        if rng.random() < 0.2:
            blob = blob[: rng.randrange(len(blob) + 1)] + bytes(rng.randrange(256) for _ in range(rng.randint(0, 16)))
        out.append(bytes(blob))
    return out


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 (or link target) of everything under ``folder``, to detect mutation."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = "special"
    return out


def expect_clean(outcomes: list[Outcome], *, allow_ok: bool = True) -> None:
    """Fail with the first few offending inputs if any outcome is untyped, a hang, or an accepted input
    that should have been refused."""
    bad = [o for o in outcomes if o.kind in ("untyped", "hang") or (o.kind == "ok" and not allow_ok)]
    if bad:
        lines = [f"{o.label[:300]}: {o.kind}: {type(o.error).__name__ if o.error else ''} {str(o.error)[:500]}\n"
                 f"{o.trace[-3000:]}" for o in bad[:5]]
        raise AssertionError(f"{len(bad)} of {len(outcomes)} hostile inputs misbehaved:\n" + "\n".join(lines))
