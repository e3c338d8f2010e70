"""``adapterspec validate``: PEFT-written folders pass unchanged; each kind of breakage fails naming its place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from adapterspec.cli import main

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["validate", *args])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prefix"])
def test_peft_written_folders_are_valid(peft_folders: dict[str, Path], method: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, str(peft_folders[method]))
    assert code == 0, out
    assert "1 valid, 0 invalid" in out


@pytest.fixture
def lora(peft_folders: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(peft_folders["lora"], tmp_path / "lora"))


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def edit_tensors(folder: Path, drop: str | None = None, add: dict | None = None) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    if drop:
        del tensors[drop]
    tensors.update(add or {})
    save_file(tensors, path, metadata={"format": "pt"})


def test_wrong_type_names_the_pointer(lora: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_config(lora, r="4")
    code, out = run(capsys, str(lora))
    assert code == 1
    assert "adapter_config.json: /r: '4' is not of type 'integer'" in out


def test_missing_required_field(lora: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_config(lora, peft_type=None)
    code, out = run(capsys, str(lora))
    assert code == 1
    assert "'peft_type' is a required property" in out and "(config root)" in out


def test_missing_tensor_names_the_key(lora: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_tensors(lora, drop=Q_B)
    code, out = run(capsys, str(lora))
    assert code == 1
    assert f"{Q_B}: missing" in out


def test_unexpected_tensor_names_the_key(lora: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"
    edit_tensors(lora, add={key: np.zeros((4, 64), np.float32)})
    code, out = run(capsys, str(lora))
    assert code == 1
    assert f"{key}: not a LORA parameter" in out


def test_untargeted_module_is_unexpected(lora: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    other = key.replace("lora_A", "lora_B")
    edit_tensors(lora, add={key: np.zeros((4, 64), np.float32), other: np.zeros((32, 4), np.float32)})
    code, out = run(capsys, str(lora))
    assert code == 1
    assert f"{key}: module 'model.layers.0.self_attn.k_proj' is not targeted" in out


def test_shape_disagreeing_with_r(lora: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_config(lora, r=8)
    code, out = run(capsys, str(lora))
    assert code == 1
    assert f"{Q_A}: rank 4 disagrees with the config's r=8" in out


def test_transposed_b_is_refused(lora: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = load_file(lora / "adapter_model.safetensors")
    edit_tensors(lora, add={Q_B: tensors[Q_B].T.copy()})
    code, out = run(capsys, str(lora))
    assert code == 1
    assert f"{Q_B}: shape [4, 64]: dimension 1 must equal lora_A's rank 4" in out


def test_truncated_safetensors(lora: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = lora / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    code, out = run(capsys, str(lora))
    assert code == 1
    assert "adapter_model.safetensors: not a valid safetensors file" in out


LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 40960\n")


@pytest.mark.parametrize("weights", ["adapter_model.safetensors", "adapter_model.bin"])
def test_git_lfs_pointer_is_named(lora: Path, capsys: pytest.CaptureFixture[str], weights: str) -> None:
    """A clone without git-lfs holds pointer files: the refusal says so (not "corrupt" or "unsafe pickle")."""
    (lora / "adapter_model.safetensors").unlink()
    (lora / weights).write_bytes(LFS_POINTER)
    code, out = run(capsys, str(lora))
    assert code == 1
    assert (f"{weights}: a git-LFS pointer (oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393, "
            "size 40960), not the tensors it stands for") in out
    assert "git lfs pull" in out


@pytest.mark.parametrize(("name", "what"), [("adapter_config.json", "config"), ("adapterspec.json", "manifest")])
def test_git_lfs_pointer_in_place_of_a_json_file_is_named(lora: Path, capsys: pytest.CaptureFixture[str],
                                                          name: str, what: str) -> None:
    """Public adapter repos hold adapter_config.json files that are pointers too: it read "not valid JSON: Expecting
    value ... (fix: fix the JSON syntax)". The manifest the same way; the config file validated alone too."""
    import adapterspec

    (lora / name).write_bytes(LFS_POINTER)
    want = (f"{name}: a git-LFS pointer (oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393, "
            f"size 40960), not the {what} it stands for")
    for target in (lora, lora / name):
        code, out = run(capsys, str(target))
        assert code == 1 and want in out and "git lfs pull" in out, out
        assert "not valid JSON" not in out
    with pytest.raises(adapterspec.errors.FileFormatError) as info:
        (adapterspec.read_adapter if what == "config" else adapterspec.read_adapters)(lora)
    assert info.value.path == str(lora / name) and f"not the {what} it stands for" in info.value.message


def test_strict_reports_unknown_fields(lora: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_config(lora, use_doar=True)
    code, out = run(capsys, str(lora))
    assert code == 0 and "use_doar" in out  # a warning
    code, out = run(capsys, "--strict", str(lora))
    assert code == 1 and "/use_doar: unknown field 'use_doar' (strict mode)" in out


def test_config_file_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"], "r": 8}))
    bad.write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"], "lora_dropout": 1.0}))
    code, out = run(capsys, str(good), str(bad))
    assert code == 1
    assert f"{good}: ok" in out and f"{bad}: /lora_dropout:" in out and "1 valid, 1 invalid" in out


def test_json_and_github_formats(lora: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_tensors(lora, drop=Q_B)
    code, out = run(capsys, "--format", "json", str(lora))
    report = json.loads(out)
    assert code == 1 and report["valid"] is False
    assert report["results"][0]["errors"][0]["key"] == Q_B
    assert report["results"][0]["errors"][0]["type"] == "MissingTensorError"
    code, out = run(capsys, "--format", "github", str(lora))
    assert out.startswith(f"::error file={lora / 'adapter_model.safetensors'},title={Q_B}::")


def test_several_adapters_in_one_folder(peft_folders: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(shutil.copytree(peft_folders["lora"], tmp_path / "many"))
    shutil.copytree(peft_folders["ia3"], root / "ia3")
    shutil.copytree(peft_folders["dora"], root / "dora")
    (root / "dora" / "adapter_model.safetensors").write_bytes(b"garbage")
    code, out = run(capsys, str(root))
    assert code == 1
    assert "2 valid, 1 invalid" in out and "[dora]" in out


def test_schema_and_inspect_commands(peft_folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert main(["inspect", "--format", "json", str(peft_folders["lora"])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "LORA" and info["ranks"] == {"4": 4} and info["tensors"] == 8
    assert info["parameters"] == 2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4)
    assert info["scaling"] == [2.0]
