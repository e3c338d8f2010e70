"""diffusers' and kohya's LoRA files (``adapterspec._foreign``) where an adapter folder was expected: every refusal
says what the file is and how to use it. Before, a folder holding ``pytorch_lora_weights.safetensors`` read "no
adapter_config.json in the folder (fix: pass the adapter's own folder (use subfolder= for one of several))", the
file itself "no such adapter folder" (load) or "no such file or folder" (``validate``, of a file that exists), and
kohya keys next to a copied config "prefix every key with 'base_model.model.'"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import adapterspec
from adapterspec.cli import main
from adapterspec.errors import FileFormatError, UnexpectedTensorError

BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA = {f"lora_unet_{BLOCK.replace('.', '_')}.lora_down.weight": (4, 8),
         f"lora_unet_{BLOCK.replace('.', '_')}.lora_up.weight": (8, 4),
         f"lora_unet_{BLOCK.replace('.', '_')}.alpha": ()}
OLD_DIFFUSERS = {f"unet.{BLOCK}.lora.down.weight": (4, 8), f"unet.{BLOCK}.lora.up.weight": (8, 4)}
DIFFUSERS = {f"unet.{BLOCK}.lora_A.weight": (4, 8), f"unet.{BLOCK}.lora_B.weight": (8, 4)}
FORMATS = {"kohya": KOHYA, "old-diffusers": OLD_DIFFUSERS, "diffusers": DIFFUSERS}
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["to_q"]}


def _save(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: np.asarray(np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) * 0.01 + i)
               for i, (key, shape) in enumerate(shapes.items())}, str(path))
    return path


def _validate(capsys: pytest.CaptureFixture[str], target: Path) -> tuple[int, str]:
    code = main(["validate", str(target)])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("file_name", ["pytorch_lora_weights.safetensors", "my_style_v2.safetensors"])
@pytest.mark.parametrize("form", list(FORMATS))
def test_a_folder_with_a_diffusers_or_kohya_lora_says_what_it_holds(form: str, file_name: str, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """read_adapter (load_adapter's reader), list_adapters and ``validate`` of the folder name the file, its format
    and one of its keys, and say how to use it (not "use subfolder=")."""
    folder = tmp_path / "lora"
    _save(folder / file_name, FORMATS[form])
    example = next(iter(FORMATS[form]))
    for call in (adapterspec.read_adapter, adapterspec.list_adapters):
        with pytest.raises(FileFormatError) as info:
            call(folder)
        message = info.value.message
        assert message.startswith(f"no adapter_config.json in the folder: it holds {file_name}, a "), message
        assert "format LoRA file (keys such as " + repr(example) in message and "not a PEFT-format adapter" in message
        assert "load_lora_weights" in (info.value.hint or "") and "subfolder" not in (info.value.hint or "")
    code, out = _validate(capsys, folder)
    assert code == 1 and f"it holds {file_name}" in out and "load_lora_weights" in out


def test_a_folder_without_config_or_foreign_file_keeps_its_message(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "weights.safetensors", {"base_model.model.q.lora_A.weight": (2, 4)})
    with pytest.raises(FileFormatError) as info:
        adapterspec.read_adapter(tmp_path / "a")
    assert info.value.message == "no adapter_config.json in the folder" and "subfolder=" in (info.value.hint or "")


@pytest.mark.parametrize("form", list(FORMATS))
def test_a_lora_file_given_for_a_folder_is_named_as_such(form: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """``load_adapter(model, '.../pytorch_lora_weights.safetensors')`` said "no such adapter folder", ``validate``
    of it "no such file or folder" (exit 1) although it exists: both say it is a diffusers/kohya-format file."""
    file = _save(tmp_path / "lora" / "pytorch_lora_weights.safetensors", FORMATS[form])
    with pytest.raises(FileFormatError) as info:
        adapterspec.read_adapter(file)
    assert info.value.path == str(file) and "format LoRA file (keys such as" in info.value.message
    assert info.value.message.endswith("not a PEFT-format adapter folder") and "load_lora_weights" in info.value.hint
    code, out = _validate(capsys, file)
    assert code == 1 and "format LoRA file" in out and "no such file or folder" not in out


def test_other_files_given_for_a_folder_are_said_to_be_files(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    weights = _save(tmp_path / "w" / "model.safetensors", {"encoder.weight": (2, 2)})
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for file, needle in ((weights, "a weights file, not an adapter folder"), (text, "a file, not an adapter folder")):
        with pytest.raises(FileFormatError) as info:
            adapterspec.read_adapter(file)
        assert info.value.message.startswith(needle) and "adapter_config.json" in (info.value.hint or "")
        code, out = _validate(capsys, file)
        assert code == 1 and needle in out and "no such file or folder" not in out
    code, out = _validate(capsys, tmp_path / "missing")
    assert code == 1 and "no such file or folder" in out


def test_the_weights_file_of_an_adapter_folder_stands_for_its_folder(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """As ``adapter_config.json`` already did (and ``validate`` of either): ``adapter_model.safetensors`` reads its
    folder."""
    a = np.sin(np.arange(8, dtype=np.float32)).reshape(2, 4)
    adapterspec.write_adapter(tmp_path / "a", {**CONFIG, "r": 2, "target_modules": ["q"]},
                              {"base_model.model.q.lora_A.weight": a, "base_model.model.q.lora_B.weight": a.T.copy()})
    adapter = adapterspec.read_adapter(tmp_path / "a" / "adapter_model.safetensors")
    assert np.array_equal(adapter.load_tensors()["base_model.model.q.lora_A.weight"], a)
    assert _validate(capsys, tmp_path / "a" / "adapter_model.safetensors")[0] == 0


@pytest.mark.parametrize("form", ["kohya", "old-diffusers"])
def test_kohya_keys_under_a_peft_config_are_named_as_such(form: str, tmp_path: Path) -> None:
    """A kohya/diffusers file renamed adapter_model.safetensors next to a copied config: not "prefix every key with
    'base_model.model.'" (the prefixed keys would not load either), but what the keys are."""
    folder = tmp_path / "copied"
    _save(folder / "adapter_model.safetensors", FORMATS[form])
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    first = adapterspec.validate_adapter(folder)[0]
    assert isinstance(first, UnexpectedTensorError)
    assert "kohya/diffusers-format LoRA key" in first.message and "prefix every key" not in (first.hint or "")
    assert "load_lora_weights" in (first.hint or "")


def test_diffusers_component_keys_say_to_replace_the_component(tmp_path: Path) -> None:
    folder = tmp_path / "copied"
    _save(folder / "adapter_model.safetensors", DIFFUSERS)
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    errors = adapterspec.validate_adapter(folder)
    first = errors[0]
    assert isinstance(first, UnexpectedTensorError) and first.key == f"unet.{BLOCK}.lora_A.weight"
    assert "key starts with 'unet.', the pipeline component diffusers saves a LoRA under" in first.message
    assert first.hint == (f"replace 'unet.' with 'base_model.model.' in every key ('base_model.model.{BLOCK}."
                          "lora_A.weight') if the model is the pipeline's unet; otherwise prefix every key with "
                          "'base_model.model.'")


def test_peft_keys_without_the_prefix_keep_their_hint(tmp_path: Path) -> None:
    folder = tmp_path / "bare"
    _save(folder / "adapter_model.safetensors", {"model.q.lora_A.weight": (4, 8), "model.q.lora_B.weight": (8, 4)})
    (folder / "adapter_config.json").write_text(json.dumps({**CONFIG, "target_modules": ["q"]}))
    first = adapterspec.validate_adapter(folder)[0]
    assert first.hint == "prefix every key with 'base_model.model.': 'base_model.model.model.q.lora_A.weight'"
    shutil.rmtree(folder)
