"""Unbounded strings from files: refused with a typed error whose message echoes a short, marked cut of them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import adapterspec
from adapterspec.cli import main
from adapterspec.config import AdapterConfig, load_schema
from adapterspec.errors import shorten
from adapterspec.spec import MAX_VERSION_LENGTH, check_version

LONG_VERSIONS = {
    "5000 digits": "1." + "1" * 5000,        # int() of it raised Python's integer-digit-limit ValueError
    "12 MB junk": "1." + "x" * (12 * 2**20),  # echoed whole by the CLI
}


def test_shorten_cuts_and_says_the_length() -> None:
    assert shorten("q_proj") == "'q_proj'"
    assert shorten("a" * 81) == repr("a" * 80) + "... (81 characters)"
    assert shorten(list(range(100)), limit=10) == "[0, 1, 2, ... (390 characters)"


@pytest.mark.parametrize("version", LONG_VERSIONS.values(), ids=LONG_VERSIONS.keys())
def test_long_version_is_a_version_error_everywhere(peft_folders: dict[str, Path], tmp_path: Path, version: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder = Path(shutil.copytree(peft_folders["lora"], tmp_path / "lora"))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "adapterspec_version": version}))
    calls = {
        "check_version": lambda: check_version(version),
        "from_file": lambda: AdapterConfig.from_file(folder / "adapter_config.json"),
        "read_adapter": lambda: adapterspec.read_adapter(folder),
    }
    for what, call in calls.items():
        with pytest.raises(adapterspec.VersionError) as info:
            call()
        assert info.value.pointer == "/adapterspec_version", what
        assert f"is {len(version)} characters long, more than {MAX_VERSION_LENGTH}" in str(info.value), what
        assert len(str(info.value)) < 500, what
    errors = adapterspec.validate_adapter(folder)
    assert [type(e) for e in errors] == [adapterspec.VersionError]
    assert main(["validate", str(folder)]) == 1
    out = capsys.readouterr().out
    assert f"/adapterspec_version: is {len(version)} characters long" in out and len(out) < 1000


def test_long_manifest_version_is_a_version_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    manifest = {"adapterspec_version": "1." + "1" * 5000, "adapters": {"a": {"path": "a"}}}
    (tmp_path / "adapterspec.json").write_text(json.dumps(manifest))
    with pytest.raises(adapterspec.VersionError, match="5002 characters long") as info:
        adapterspec.list_adapters(tmp_path)
    assert len(str(info.value)) < 500


@pytest.mark.parametrize(("field", "value", "pointer"), [
    ("revision", "r" * 257, "/revision"),
    ("base_model_name_or_path", "m" * 4097, "/base_model_name_or_path"),
    ("target_modules", ["q" * 1025], "/target_modules/0"),
    ("target_modules", "q" * 65537, "/target_modules"),
    ("modules_to_save", ["s" * 1025], "/modules_to_save/0"),
    ("rank_pattern", {"k" * 4097: 2}, "/rank_pattern/" + "k" * 4097),
])
def test_free_strings_are_bounded_by_the_schema(field: str, value: object, pointer: str) -> None:
    with pytest.raises(adapterspec.ConfigError) as info:
        AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q"], field: value})
    assert info.value.pointer == pointer
    assert "characters)" in str(info.value) and len(str(info.value)) < 1000


def test_schema_bounds_are_the_sdks() -> None:
    schema = load_schema()
    assert schema["properties"]["adapterspec_version"]["maxLength"] == MAX_VERSION_LENGTH
    assert load_schema("manifest")["properties"]["adapterspec_version"]["maxLength"] == MAX_VERSION_LENGTH


def test_every_error_prints_a_bounded_text() -> None:
    error = adapterspec.ConfigError("x" * 10_000, pointer="/rank_pattern/" + "k" * 10_000, hint="h" * 10_000)
    assert len(str(error)) < 7000 and "more characters)" in str(error)
    assert error.message == "x" * 10_000  # the full message stays available to code


def test_unknown_field_names_are_echoed_cut(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = "x" * 100_000
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q"], name: 1, "y": 2}))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fields unknown to adapterspec" in out and "(100003 characters)" in out and len(out) < 1000
    with pytest.warns(adapterspec.AdapterSpecWarning, match=r"\(100003 characters\)") as caught:
        AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q"], name: 1, "y": 2})
    assert len(str(caught[0].message)) < 1000
