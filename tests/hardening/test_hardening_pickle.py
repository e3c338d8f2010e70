"""No pickle unless asked, and never code from one: ``adapter_model.bin`` needs ``allow_pickle=True`` and is
read with ``torch.load(weights_only=True)``. Tested with REAL malicious pickles whose payload would
create a marker file: the marker must never appear.
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hardening_harness import LORA_CONFIG, lora_tensors
from hardening_harness import STATS, expect_clean, long_mode_extra, probe

import adapterspec
from adapterspec.spec import CONFIG_NAME, PICKLE_NAME, SAFETENSORS_NAME

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore::adapterspec.AdapterSpecWarning")


class SystemPayload:
    """Unpickling calls ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


class OpenPayload:
    """Unpickling calls ``builtins.open(<marker>, "w")``, creating the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (builtins.open, (str(self.marker), "w"))


class PopenPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (subprocess.Popen, (["touch", str(self.marker)],))


class EvalPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


PAYLOADS = {"os.system": SystemPayload, "builtins.open": OpenPayload, "subprocess.Popen": PopenPayload, "eval": EvalPayload}


def _folder_with_bin(tmp_path: Path, state: object, *, fmt: str) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    (folder / CONFIG_NAME).write_text((tmp_path / "cfg.json").read_text() if (tmp_path / "cfg.json").exists()
                                      else __import__("json").dumps(LORA_CONFIG))
    if fmt == "torch.save":
        torch.save(state, folder / PICKLE_NAME)
    else:  # a bare pickle stream (torch's legacy format reads it too)
        with open(folder / PICKLE_NAME, "wb") as fh:
            pickle.dump(state, fh, protocol=2)
    return folder


def _good_state() -> dict:
    return {k: torch.from_numpy(v) for k, v in lora_tensors().items()}


VARIANTS = [(p, f, w) for p in sorted(PAYLOADS) for f in ("torch.save", "raw pickle") for w in ("whole file", "inside the dict")]


@pytest.fixture(scope="module")
def malicious(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, str], tuple[Path, Path]]:
    """variant -> (adapter folder with a malicious adapter_model.bin, its marker file).

    Each file is first proven malicious: a child process unpickles them all unrestricted
    (``weights_only=False``) and every marker appears; the markers are then removed.
    """
    root = tmp_path_factory.mktemp("evil")
    out = {}
    for i, (payload, fmt, where) in enumerate(VARIANTS):
        base = root / f"v{i}"
        base.mkdir()
        marker = base / "PWNED"
        evil = PAYLOADS[payload](marker)
        state = evil if where == "whole file" else {**_good_state(), "base_model.model.l.0.q.lora_B.weight": evil}
        out[(payload, fmt, where)] = (_folder_with_bin(base, state, fmt=fmt), marker)
    files = [str(folder / PICKLE_NAME) for folder, _ in out.values()]
    code = ("import sys, time, torch\n"
            "for f in sys.argv[1:]:\n"
            "    try: torch.load(f, weights_only=False)\n"
            "    except Exception as e: print(f, e)\n"
            "time.sleep(0.5)\n")  # Popen's child touches its marker asynchronously
    subprocess.run([sys.executable, "-c", code, *files], capture_output=True, timeout=300)
    missing = [v for v, (_, marker) in out.items() if not marker.exists()]
    assert not missing, f"these payloads do not work unrestricted, so they prove nothing: {missing}"
    for _, marker in out.values():
        marker.unlink()
    return out


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v))
def test_malicious_pickle_never_runs(malicious: dict, variant: tuple[str, str, str]) -> None:
    folder, marker = malicious[variant]
    refused = probe(f"{variant} no opt-in", lambda: adapterspec.read_adapter(folder))
    assert refused.kind == "typed" and isinstance(refused.error, adapterspec.UnsafeFileError), refused.error
    assert PICKLE_NAME in str(refused.error) and "allow_pickle" in str(refused.error)
    opted = probe(f"{variant} allow_pickle", lambda: adapterspec.read_adapter(folder, allow_pickle=True))
    assert opted.kind == "typed" and isinstance(opted.error, adapterspec.UnsafeFileError), opted.error
    assert "weights_only" in str(opted.error) and PICKLE_NAME in str(opted.error)
    validated = probe(f"{variant} validate", lambda: adapterspec.validate_adapter(folder, allow_pickle=True))
    expect_clean([refused, opted, validated])
    assert validated.value and isinstance(validated.value[0], adapterspec.UnsafeFileError)
    STATS.count("pickle-malicious", 3)
    time.sleep(0.05 if "Popen" in variant[0] else 0)
    assert not marker.exists(), "THE PICKLE PAYLOAD RAN"


def test_malicious_pickle_beside_safetensors_is_never_opened(tmp_path: Path, good_adapter: Path) -> None:
    folder = Path(shutil.copytree(good_adapter, tmp_path / "a"))
    marker = tmp_path / "PWNED"
    torch.save(SystemPayload(marker), folder / PICKLE_NAME)
    assert adapterspec.validate_adapter(folder, allow_pickle=True) == []
    adapterspec.read_adapter(folder, allow_pickle=True).load_tensors("numpy")
    assert not marker.exists()


def test_legit_pickle_needs_opt_in_and_loads_exactly(tmp_path: Path) -> None:
    folder = _folder_with_bin(tmp_path, _good_state(), fmt="torch.save")
    with pytest.raises(adapterspec.UnsafeFileError):
        adapterspec.read_adapter(folder)
    adapter = adapterspec.read_adapter(folder, allow_pickle=True)
    loaded = adapter.load_tensors("numpy")
    for key, value in lora_tensors().items():
        np.testing.assert_array_equal(loaded[key], value)


@pytest.mark.parametrize("state", ["list", "int values", "int keys", "nested dict", "tensor", "None"])
def test_pickles_that_are_not_a_flat_dict_of_tensors(tmp_path: Path, state: str) -> None:
    good = _good_state()
    value = {"list": list(good.values()), "int values": {k: 1 for k in good}, "int keys": {i: v for i, v in enumerate(good.values())},
             "nested dict": {"state": good}, "tensor": torch.ones(3), "None": None}[state]
    folder = _folder_with_bin(tmp_path, value, fmt="torch.save")
    outcome = probe(f"pickle {state}", lambda: adapterspec.read_adapter(folder, allow_pickle=True))
    STATS.count("pickle-crafted")
    expect_clean([outcome], allow_ok=False)
    assert PICKLE_NAME in str(outcome.error)


def test_pickle_truncation_and_flips(scratch: Path) -> None:
    folder = _folder_with_bin(scratch, _good_state(), fmt="torch.save")
    raw = (folder / PICKLE_NAME).read_bytes()
    variants = [raw[:cut] for cut in range(0, len(raw), 2)]
    for at in range(0, len(raw), 4):
        mutated = bytearray(raw)
        mutated[at] ^= 0xFF
        variants.append(bytes(mutated))
    variants += long_mode_extra(raw, len(variants), seed=5)
    outcomes = []
    for i, blob in enumerate(variants):
        (folder / PICKLE_NAME).write_bytes(blob)
        outcome = probe(f"pickle variant {i}", lambda: adapterspec.validate_adapter(folder, allow_pickle=True))
        outcomes.append(outcome)
        if outcome.kind == "ok" and outcome.value:
            assert any(PICKLE_NAME in str(e) or e.key for e in outcome.value), outcome.value
    STATS.count("pickle-mutation", len(variants))
    expect_clean(outcomes)
