"""The pre-commit hook runs on every file of an adapter folder, so a commit that breaks the weights is stopped."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

import adapterspec
from adapterspec.cli import main
from adapterspec.folder import write_adapter

REPO = Path(adapterspec.__file__).resolve().parents[2]


def hook() -> dict:
    (entry,) = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    return entry


@pytest.mark.parametrize("path, runs", [
    ("adapter_config.json", True), ("my-lora/adapter_config.json", True),
    ("my-lora/adapter_model.safetensors", True), ("legacy/adapter_model.bin", True),
    ("adapters/adapterspec.json", True), ("adapters/fr/adapter_model.safetensors", True),
    ("model.safetensors", False), ("my-lora/README.md", False), ("my-lora/adapter_config.json.bak", False),
    ("not_adapter_config.json", False),
])
def test_hook_files_cover_the_adapter_folder(path: str, runs: bool) -> None:
    # pre-commit matches `files` with Python's re.search on the repository-relative path
    assert bool(re.search(hook()["files"], path)) is runs


def test_hook_entry_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert hook()["entry"].split()[:2] == ["adapterspec", "validate"] and hook()["pass_filenames"] is True


def folder_with_checksum(root: Path) -> Path:
    """An adapterspec-written folder (its safetensors metadata holds the sha256 of the data)."""
    tensors = {"base_model.model.q.lora_A.weight": np.arange(8, dtype=np.float32).reshape(2, 4),
               "base_model.model.q.lora_B.weight": np.arange(6, dtype=np.float32).reshape(3, 2) + 8}
    return write_adapter(root / "my-lora", {"peft_type": "LORA", "target_modules": ["q"], "r": 2}, tensors)


@pytest.mark.parametrize("damage, error", [
    (lambda data: data[:-4], "FileFormatError"),  # truncated
    (lambda data: data[:-1] + bytes([data[-1] ^ 0x01]), "IntegrityError"),  # one bit of the data flipped
])
def test_damaged_weights_file_alone_fails(damage, error: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = folder_with_checksum(tmp_path)
    weights = folder / "adapter_model.safetensors"
    assert main(["validate", str(weights)]) == 0
    assert "1 valid, 0 invalid" in capsys.readouterr().out
    weights.write_bytes(damage(weights.read_bytes()))
    assert main(["validate", "--format", "json", str(weights)]) == 1
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert [e["type"] for e in result["errors"]] == [error]
    assert result["errors"][0]["file"] == str(weights)


def test_files_of_one_folder_validate_it_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = folder_with_checksum(tmp_path)
    assert main(["validate", str(folder / "adapter_config.json"), str(folder / "adapter_model.safetensors"),
                 str(folder)]) == 0
    assert capsys.readouterr().out.count(": ok (LORA, 2 tensors") == 1
