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


# -- mlx-lm adapters ----------------------------------------------------------------------------------------------
#: The adapter_config.json mlx_lm.lora wrote for a real adapter (Rmonofee1122/mlx-data), paths shortened.
MLX_CONFIG = {"adapter_path": "adapters", "batch_size": 1, "config": None, "data": "data", "fine_tune_type": "lora",
              "grad_checkpoint": False, "iters": 3000, "learning_rate": 0.0001,
              "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 10.0}, "lr_schedule": None,
              "mask_prompt": False, "max_seq_length": 2048, "model": "models/Llama-3.3-Swallow-70B-v0.4",
              "num_layers": 16, "optimizer": "adam", "optimizer_config": {"adam": {}, "adamw": {}},
              "resume_adapter_file": None, "save_every": 100, "seed": 0, "steps_per_eval": 200,
              "steps_per_report": 10, "test": False, "test_batches": 500, "train": True, "val_batches": 25}
#: An older mlx-lm's config (before fine_tune_type): lora_layers and lora_parameters.
OLD_MLX_CONFIG = {"model": "mlx-community/Mistral-7B-v0.1", "train": True, "data": "data", "seed": 0,
                  "lora_layers": 16, "batch_size": 4, "iters": 1000, "adapter_path": "adapters",
                  "lora_parameters": {"keys": ["self_attn.q_proj", "self_attn.v_proj"], "rank": 8, "alpha": 16.0,
                                      "scale": 10.0, "dropout": 0.0}}
Q = "model.layers.0.self_attn.q_proj"
MLX = {f"{Q}.lora_a": (64, 8), f"{Q}.lora_b": (8, 64)}  # mlx-lm's LoRALinear: lora_a is [in, r]
MLX_FIX = "mlx_lm.fuse --model <base model> --adapter-path"


def _mlx_folder(path: Path, config: dict[str, object] | None = MLX_CONFIG) -> Path:
    _save(path / "adapters.safetensors", MLX)
    if config is not None:
        (path / "adapter_config.json").write_text(json.dumps(config, indent=4))
    return path


@pytest.mark.parametrize("config", [MLX_CONFIG, OLD_MLX_CONFIG], ids=["fine_tune_type", "lora_parameters"])
def test_an_mlx_lm_adapter_folder_is_named_as_such(config: dict[str, object], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """It said "'peft_type' is a required property (fix: add the field 'peft_type')": adding it loads nothing (the
    weights are adapters.safetensors, keys lora_a [in, r] / lora_b). read_adapter (load_adapter's reader), validate
    (the folder, its config alone, the dict) and inspect name it an mlx-lm adapter, with mlx-lm's own tools as fix."""
    folder = _mlx_folder(tmp_path / "adapter1", config)
    marker = "fine_tune_type" if "fine_tune_type" in config else "lora_parameters"
    with pytest.raises(adapterspec.ConfigError) as info:
        adapterspec.read_adapter(folder)
    error = info.value
    assert error.pointer == f"/{marker}" and error.path == str(folder / "adapter_config.json")
    assert error.message.startswith(f"an mlx-lm adapter config ({marker}), not a PEFT adapter_config.json"), error
    assert "peft_type" in error.message and "add the field" not in (error.hint or "")
    assert MLX_FIX in (error.hint or "") and "mlx_lm.load(" in (error.hint or "")
    with pytest.raises(adapterspec.ConfigError) as again:
        adapterspec.validate_config(config)
    assert (again.value.pointer, again.value.message, again.value.hint) == (error.pointer, error.message, error.hint)
    for target in (folder, folder / "adapter_config.json"):
        code, out = _validate(capsys, target)
        assert code == 1 and "an mlx-lm adapter config" in out and MLX_FIX in out and "add the field" not in out
        assert out.count("mlx-lm adapter config") == 1, out  # the one problem, not the schema's list after it
    assert main(["inspect", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "an mlx-lm adapter config" in err and MLX_FIX in err


def test_a_peft_config_with_mlx_lm_fields_is_read_as_peft(tmp_path: Path) -> None:
    """Only a config without peft_type is mlx-lm's: one with it (and a field mlx-lm also writes) is PEFT's."""
    config = adapterspec.AdapterConfig.from_dict({**CONFIG, "lora_parameters": {"rank": 4}})
    assert config.peft_type == "LORA"
    with pytest.raises(adapterspec.ConfigError) as info:
        adapterspec.validate_config({"r": 4, "target_modules": ["q"]})
    assert info.value.hint == "add the field 'peft_type'"


def test_mlx_lm_weights_without_their_config_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """adapters.safetensors alone (the folder, or the file given for it) is named an mlx-lm file with a key."""
    folder = _mlx_folder(tmp_path / "weights_only", config=None)
    for target, start in ((folder, "no adapter_config.json in the folder: it holds adapters.safetensors, an mlx-lm "),
                          (folder / "adapters.safetensors", "an mlx-lm ")):
        with pytest.raises(FileFormatError) as info:
            adapterspec.read_adapter(target)
        message = info.value.message
        assert message.startswith(start) and f"(keys such as '{Q}.lora_a')" in message, message
        assert "load_lora_weights" not in (info.value.hint or "") and MLX_FIX in (info.value.hint or "")
        code, out = _validate(capsys, target)
        assert code == 1 and "mlx-lm" in out and MLX_FIX in out
    assert main(["inspect", str(folder / "adapters.safetensors")]) == 1
    assert "an mlx-lm LoRA file" in capsys.readouterr().err


@pytest.mark.parametrize("prefix", ["", "base_model.model."], ids=["bare", "prefixed"])
def test_mlx_lm_keys_under_a_peft_config_are_named_as_such(prefix: str, tmp_path: Path) -> None:
    """mlx-lm's weights renamed adapter_model.safetensors next to a PEFT config: "prefix every key with
    'base_model.model.'" was offered for keys that would not load prefixed either (lora_a is no PEFT suffix; a
    prefixed one was told to go to modules_to_save)."""
    folder = tmp_path / "renamed"
    _save(folder / "adapter_model.safetensors", {prefix + key: shape for key, shape in MLX.items()})
    (folder / "adapter_config.json").write_text(json.dumps({**CONFIG, "r": 8, "target_modules": ["q_proj"]}))
    errors = adapterspec.validate_adapter(folder)
    first = errors[0]
    assert isinstance(first, UnexpectedTensorError) and first.key == f"{prefix}{Q}.lora_a"
    assert first.message.startswith("an mlx-lm LoRA key (lora_a/lora_b, lora_a stored [in, r]), not PEFT's"), first
    assert "prefix every key" not in (first.hint or "") and MLX_FIX in (first.hint or "")
    assert "modules_to_save" not in (first.hint or "")


def test_an_unprefixed_key_that_would_not_parse_prefixed_gets_no_prefix_hint(tmp_path: Path) -> None:
    """Prefixing is offered only where the prefixed key is a tensor of the method; otherwise the error says what
    else is wrong with it."""
    folder = tmp_path / "bare"
    _save(folder / "adapter_model.safetensors", {"model.q.lora_A.weight": (4, 8), "model.q.lora_B.weight": (8, 4),
                                                 "model.q.scaling": (1,)})
    (folder / "adapter_config.json").write_text(json.dumps({**CONFIG, "target_modules": ["q"]}))
    errors = {e.key: e for e in adapterspec.validate_adapter(folder)}
    assert errors["model.q.lora_A.weight"].hint == ("prefix every key with 'base_model.model.': "
                                                    "'base_model.model.model.q.lora_A.weight'")
    odd = errors["model.q.scaling"]
    assert "prefix" not in (odd.hint or "") and odd.hint == "remove the tensor, or add its module to modules_to_save"
    assert odd.message == ("key does not start with 'base_model.model.', nor would it be a LORA tensor with it: "
                           "not a LORA parameter (expected a key ending in one of: lora_A.weight, lora_B.weight, "
                           "lora_B.bias, lora_embedding_A, lora_embedding_B, lora_magnitude_vector, "
                           "lora_velora_embed) nor an auxiliary tensor the config accounts for (modules_to_save, "
                           "bias, trainable_token_indices)"), odd.message
