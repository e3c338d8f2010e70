"""What ``adapterspec`` prints for CI and shells: GitHub annotations (escaped, with line/col), the versioned JSON
report (checked against its shipped schema), every error of a config, warnings at their files, ``--version``, and
a clean exit when the reader of a pipe leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from safetensors.numpy import save_file

import adapterspec
from adapterspec.cli import MAX_ERRORS, REPORT_VERSION, _annotation, main
from adapterspec.config import load_schema
from adapterspec.spec import SPEC_VERSION

SDK = Path(adapterspec.__file__).resolve().parents[1]
REPO = SDK.parent
BAD = '{\n  "peft_type": "LORA",\n  "target_modules": ["q"],\n  "r": 0,\n  "lora_alpha": "16"\n}\n'


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["validate", *args])
    return code, capsys.readouterr().out


def report(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    _, out = run(capsys, "--format", "json", *args)
    data = json.loads(out)
    jsonschema.validate(data, load_schema("validate_report"), cls=jsonschema.Draft202012Validator)
    return data


def lora_folder(folder: Path, **config: object) -> Path:
    """A valid 1-module LoRA folder (r=2, in 4, out 3), element-unique values, plus ``config`` changes."""
    folder.mkdir(parents=True)
    data = {"peft_type": "LORA", "target_modules": ["q"], "r": 2, "lora_alpha": 4, **config}
    (folder / "adapter_config.json").write_text(json.dumps(data, indent=2))
    save_file({"base_model.model.q.lora_A.weight": np.arange(8, dtype=np.float32).reshape(2, 4),
               "base_model.model.q.lora_B.weight": np.arange(6, dtype=np.float32).reshape(3, 2) + 8},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def test_every_schema_error_of_a_config_file_in_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.json").write_text(BAD)
    result = report(capsys, str(tmp_path / "c.json"))["results"][0]
    assert [(e["pointer"], e["hint"], e["line"], e["col"]) for e in result["errors"]] == [
        ("/r", "use a value >= 1", 4, 3), ("/lora_alpha", "use a number", 5, 3)]
    assert result["errors_omitted"] == 0 and result["ok"] is False


def test_every_schema_error_of_a_folder_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = lora_folder(tmp_path / "a", r=0, lora_alpha="16")
    result = report(capsys, str(folder))["results"][0]
    assert [(e["pointer"], e["file"]) for e in result["errors"]] == [
        ("/r", str(folder / "adapter_config.json")), ("/lora_alpha", str(folder / "adapter_config.json"))]


def test_errors_are_capped_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = {"peft_type": "LORA", "target_modules": ["q"], "rank_pattern": {f"m{i}": "x" for i in range(70)}}
    (tmp_path / "c.json").write_text(json.dumps(config))
    result = report(capsys, str(tmp_path / "c.json"))["results"][0]
    assert len(result["errors"]) == MAX_ERRORS and result["errors_omitted"] == 70 - MAX_ERRORS
    _, out = run(capsys, "--format", "github", str(tmp_path / "c.json"))
    assert out.count("::error ") == MAX_ERRORS + 1 and f"{70 - MAX_ERRORS} more errors not shown" in out


def test_report_is_versioned_and_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = lora_folder(tmp_path / "good", use_future_thing=True)
    (tmp_path / "broken.json").write_text("{")
    data = report(capsys, str(good), str(tmp_path / "broken.json"), str(tmp_path / "missing"))
    assert data["report_version"] == REPORT_VERSION and data["spec_version"] == SPEC_VERSION
    assert data["adapterspec_version"] == adapterspec.__version__ and data["valid"] is False
    ok, broken, missing = data["results"]
    assert ok["ok"] and ok["summary"].startswith("LORA, 2 tensors")
    assert ok["warnings"] == [{"message": ok["warnings"][0]["message"], "file": str(good / "adapter_config.json")}]
    assert "use_future_thing" in ok["warnings"][0]["message"]
    assert (broken["errors"][0]["type"], broken["errors"][0]["line"], broken["errors"][0]["col"]) == (
        "FileFormatError", 1, 2)
    assert missing["errors"][0]["type"] == "FileFormatError" and "line" not in missing["errors"][0]


def test_github_annotations_escape_and_locate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "pct%,dir:x"
    folder.mkdir()
    (folder / "c.json").write_text(BAD)
    code, out = run(capsys, "--format", "github", str(folder / "c.json"))
    file = str(folder / "c.json").replace("%", "%25").replace(",", "%2C").replace(":", "%3A")
    lines = out.splitlines()
    assert code == 1 and len(lines) == 2
    message = f"{folder}/c.json: /r: 0 is less than the minimum of 1 (fix: use a value >= 1)".replace("%", "%25")
    assert lines[0] == f"::error file={file},line=4,col=3,title=/r::{message}"
    assert lines[1].startswith(f"::error file={file},line=5,col=3,title=/lora_alpha::")


def test_github_syntax_error_has_the_parser_position(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.json").write_text('{\n  "peft_type": "LORA",\n  "r": 1,\n}\n')
    _, out = run(capsys, "--format", "github", str(tmp_path / "c.json"))
    assert out.startswith(f"::error file={tmp_path}/c.json,line=4,col=1,title=FileFormatError::")


def test_github_warnings_point_at_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = lora_folder(tmp_path / "a", use_future_thing=True)
    code, out = run(capsys, "--format", "github", str(folder))
    assert code == 0
    assert out.startswith(f"::warning file={folder}/adapter_config.json::")


def test_annotation_escapes_data_and_properties() -> None:
    assert _annotation("error", "50% done\r\nnext: a,b", "d:1,2%\n", "t,i:t", 3, 7) == (
        "::error file=d%3A1%2C2%25%0A,line=3,col=7,title=t%2Ci%3At::50%25 done%0D%0Anext: a,b")


def test_version_names_package_and_spec(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"adapterspec {version('adapterspec')} (spec {SPEC_VERSION})"


def test_closed_pipe_exits_without_traceback() -> None:
    read, write = os.pipe()
    os.close(read)  # the reader (`head`) is gone before anything is written
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SDK), str(REPO / "plugins")])}
    try:
        proc = subprocess.run([sys.executable, "-c", "import sys; from adapterspec.cli import main; "
                               "sys.exit(main(['schema']))"], stdout=write, stderr=subprocess.PIPE, env=env,
                              timeout=60, check=False)
    finally:
        os.close(write)
    assert proc.stderr.decode() == "" and proc.returncode == 1


def test_every_report_member_is_documented() -> None:
    schema = load_schema("validate_report")
    docs = (REPO / "docs" / "cli.md").read_text()
    members = set(schema["properties"]) | {m for d in schema["$defs"].values() for m in d["properties"]}
    missing = sorted(m for m in members if f"`{m}`" not in docs and f"`{m}[]`" not in docs)
    assert missing == []


# -- docs/cli.md shows what the command prints: its examples are run here and compared -------------------------

def _doc_block(heading: str, language: str = "") -> str:
    """The first fenced block (```language) under ``heading`` in docs/cli.md."""
    section = (REPO / "docs" / "cli.md").read_text("utf-8").split(heading, 1)[1]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def _documented_folders(root: Path) -> None:
    """The files the examples name, in ``root``: ``bad.json`` and ``configs/bad.json`` (r 0, lora_alpha '16'),
    ``my-lora`` (a written LoRA adapter of 56 tensors) and ``warn/my-lora`` (a config field unknown to the spec)."""
    (root / "configs").mkdir(parents=True)
    for name in ("bad.json", "configs/bad.json"):
        (root / name).write_text(BAD)
    tensors = {}
    for layer in range(28):
        tensors[f"base_model.model.layers.{layer}.q.lora_A.weight"] = np.arange(8, dtype=np.float32).reshape(2, 4) + layer
        tensors[f"base_model.model.layers.{layer}.q.lora_B.weight"] = np.arange(6, dtype=np.float32).reshape(3, 2) - layer
    adapterspec.write_adapter(root / "my-lora", {"peft_type": "LORA", "target_modules": ["q"], "r": 2,
                                                 "lora_alpha": 4}, tensors)
    lora_folder(root / "warn" / "my-lora", use_future_thing=True)


def test_the_documented_text_output_is_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _documented_folders(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out = run(capsys, "my-lora", "bad.json")
    assert code == 1 and out == _doc_block("## `--format text` (default)")


def test_the_documented_github_annotations_are_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _documented_folders(tmp_path)
    monkeypatch.chdir(tmp_path / "warn")
    (tmp_path / "warn" / "configs").mkdir()
    (tmp_path / "warn" / "configs" / "bad.json").write_text(BAD)
    _, out = run(capsys, "--format", "github", "configs/bad.json", "my-lora")
    documented = _doc_block("## `--format github`").splitlines()
    assert documented and set(documented) <= set(out.splitlines()), out


def test_the_documented_json_report_is_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _documented_folders(tmp_path)
    monkeypatch.chdir(tmp_path)
    documented = json.loads(_doc_block("## `--format json`", "json"))
    jsonschema.validate(documented, load_schema("validate_report"), cls=jsonschema.Draft202012Validator)
    data = report(capsys, "bad.json")
    assert {k: documented[k] for k in ("report_version", "adapterspec_version", "spec_version", "valid")} == {
        "report_version": REPORT_VERSION, "adapterspec_version": adapterspec.__version__,
        "spec_version": SPEC_VERSION, "valid": False}
    assert data["results"][0]["errors"][0] == documented["results"][0]["errors"][0]
    assert data["results"][0]["target"] == documented["results"][0]["target"]


def test_the_documented_version_line_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    docs = (REPO / "docs" / "cli.md").read_text("utf-8")
    with pytest.raises(SystemExit):
        main(["--version"])
    printed = capsys.readouterr().out.strip()
    assert f"spec version: `{printed}`." in docs, printed


# -- adapterspec inspect: an error in the format asked for, and a file said to be a file ------------------------

def test_inspect_json_reports_an_error_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nonexistent"
    assert main(["inspect", "--format", "json", str(missing)]) == 1
    captured = capsys.readouterr()
    assert captured.err == ""
    data = json.loads(captured.out)
    assert data == {"target": str(missing), "ok": False, "error": {
        "type": "FileFormatError", "message": f"{missing}: no such adapter folder (fix: pass a folder holding "
                                              "adapter_config.json and adapter_model.safetensors)",
        "pointer": None, "key": None, "file": str(missing),
        "hint": "pass a folder holding adapter_config.json and adapter_model.safetensors"}}


def test_inspect_json_reports_a_config_error_at_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = lora_folder(tmp_path / "a")
    (folder / "adapter_config.json").write_text(BAD)
    assert main(["inspect", "--format", "json", str(folder)]) == 1
    error = json.loads(capsys.readouterr().out)["error"]
    assert (error["type"], error["pointer"], error["line"], error["col"]) == ("ConfigError", "/r", 4, 3)


def test_inspect_of_a_file_says_it_is_a_file_and_what_inspect_takes(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "bad.json").write_text(BAD)
    assert main(["inspect", str(tmp_path / "configs" / "bad.json")]) == 1
    assert capsys.readouterr().err == (
        f"error: {tmp_path}/configs/bad.json: a file, not an adapter folder (fix: inspect takes an adapter folder "
        "(holding adapter_config.json and adapter_model.safetensors) or hf://org/name; check a config file alone "
        "with 'adapterspec validate')\n")


def test_inspect_of_a_file_of_an_adapter_folder_inspects_the_folder(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder = lora_folder(tmp_path / "a")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert main(["inspect", "--format", "json", str(folder / name)]) == 0
        info = json.loads(capsys.readouterr().out)
        assert (info["path"], info["tensors"], info["parameters"]) == (str(folder), 2, 8 + 6)


def test_the_documented_inspect_error_is_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _documented_folders(tmp_path)
    monkeypatch.chdir(tmp_path)
    documented = json.loads(_doc_block("## `adapterspec inspect`", "json"))
    assert main(["inspect", "--format", "json", "configs/bad.json"]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in printed.items() if k != "error"} == {k: v for k, v in documented.items() if k != "error"}
    for member, value in documented["error"].items():
        if isinstance(value, str) and "..." in value:  # the doc cuts a long text short
            head, tail = value.split("...", 1)
            assert printed["error"][member].startswith(head) and printed["error"][member].endswith(tail), member
        else:
            assert printed["error"][member] == value, member
