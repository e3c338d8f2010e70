"""Training with the Keras backend: a frozen base, base identity, adapter-only checkpoints with ``fit``, resume."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import keras  # noqa: E402

import adapterspec  # noqa: E402
from keras_helpers import ATOL, hf_model, keras_inputs, keras_logits, keras_model, torch_logits  # noqa: E402

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def test_freeze_base_false_keeps_the_base_trainable(checkpoints: Any) -> None:
    model = keras_model("llama", checkpoints["llama"])
    base = {id(v) for v in model.trainable_variables}
    adapterspec.inject_adapter(model, LORA, "frozen")
    assert not base & {id(v) for v in model.trainable_variables}
    adapterspec.delete_adapter(model, "frozen")
    assert {id(v) for v in model.trainable_variables} == base
    adapterspec.inject_adapter(model, LORA, freeze_base=False)
    assert base < {id(v) for v in model.trainable_variables}


def _fingerprint_of(folder: Path) -> str:
    from adapterspec.identity import FINGERPRINT_KEY

    return adapterspec.read_adapter(folder).metadata[FINGERPRINT_KEY]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_keras_and_torch_fingerprint_the_same_base_alike(arch: str, checkpoints: Any, tmp_path: Path) -> None:
    """keras-hub's kernels ([in, heads, head_dim] einsums, GPT-2's fused c_attn split in three) read in the spec's
    layout give the fingerprint transformers' weights give."""
    targets = ["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    config = {**LORA, "target_modules": targets}
    model = keras_model(arch, checkpoints[arch])
    adapterspec.inject_adapter(model, config)
    adapterspec.save_adapter(model, tmp_path / "keras")
    reference = hf_model(checkpoints[arch])
    adapterspec.inject_adapter(reference, config)
    adapterspec.save_adapter(reference, tmp_path / "torch")
    assert _fingerprint_of(tmp_path / "keras") == _fingerprint_of(tmp_path / "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapterspec.load_adapter(hf_model(checkpoints[arch]), tmp_path / "keras", strict=True)
        adapterspec.load_adapter(keras_model(arch, checkpoints[arch]), tmp_path / "torch", strict=True)


def test_another_base_warns_and_strict_refuses(checkpoints: Any, tmp_path: Path) -> None:
    model = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(model, LORA)
    adapterspec.save_adapter(model, tmp_path / "a")
    other = keras_model("llama", checkpoints["llama"])
    kernel = other.backbone.transformer_layers[1]._self_attention_layer._value_dense.kernel
    kernel.assign(kernel + 0.01 * np.sin(np.arange(np.prod(kernel.shape))).reshape(kernel.shape))
    with pytest.warns(adapterspec.BaseModelMismatchWarning):
        adapterspec.load_adapter(other, tmp_path / "a")
    adapterspec.delete_adapter(other, "default")
    with pytest.raises(adapterspec.BaseModelMismatchError):
        adapterspec.load_adapter(other, tmp_path / "a", strict=True)
    assert adapterspec.adapter_names(other) == []


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_autopeft_loads_a_keras_saved_folder(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    model = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(model, LORA)
    for v in model.trainable_variables:
        v.assign(0.05 * np.sin(np.arange(np.prod(v.shape)) * 0.7).reshape(v.shape))
    adapterspec.save_adapter(model, tmp_path / "a", base_model_name_or_path=str(checkpoints["llama"]))
    config = adapterspec.read_adapter(tmp_path / "a").config
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(checkpoints["llama"])
    reference = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a")).eval()
    assert np.abs(torch_logits(reference, token_ids) - keras_logits(model, token_ids)).max() <= ATOL


def test_model_save_refuses_while_adapters_are_in(checkpoints: Any, tmp_path: Path) -> None:
    model = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(model, LORA)
    with pytest.raises(adapterspec.UnsupportedError, match="save_adapter"):
        model.save(tmp_path / "m.keras")
    assert not (tmp_path / "m.keras").exists()
    adapterspec.delete_adapter(model, "default")
    assert "save" not in model.__dict__  # the model's own save is back


def _fit_model(checkpoints: Any) -> Any:
    from adapterspec_keras import training  # noqa: F401 - imported here: it imports keras

    model = keras_model("llama", checkpoints["llama"])
    keras.utils.set_random_seed(5)
    adapterspec.inject_adapter(model, {**LORA, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    return model


def _adapter(model: Any) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in adapterspec.extract_adapter(model).load_tensors("numpy").items()}


def test_fit_resume_ends_with_the_uninterrupted_adapter(checkpoints: Any, token_ids: np.ndarray,
                                                        tmp_path: Path) -> None:
    from adapterspec_keras.training import AdapterCheckpoints

    ids = np.concatenate([token_ids, token_ids[::-1]])
    x, y = keras_inputs(ids), np.roll(ids, -1, axis=1)
    whole = _fit_model(checkpoints)
    saver = AdapterCheckpoints(tmp_path / "run", keep=3, monitor="loss", mode="max")  # the worst: the first
    whole.fit(x, y, epochs=4, batch_size=2, shuffle=False, verbose=0, callbacks=[saver])
    assert saver.best_checkpoint == tmp_path / "run" / "checkpoint-2"
    assert [p.name for p in saver.checkpoints()] == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoint-8").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "optimizer.npz", "trainer_state.json"]
    assert not list((tmp_path / "run").glob(".*"))  # no staged folder left behind
    expected = _adapter(whole)
    saved = adapterspec.read_adapter(tmp_path / "run" / "checkpoint-8").load_tensors("numpy")
    assert sorted(saved) == sorted(expected) and all(np.array_equal(saved[k], v) for k, v in expected.items())

    resumed = _fit_model(checkpoints)  # a new process: same model, a fresh adapter, compiled
    resumed.optimizer.build(resumed.trainable_variables)
    variables = [id(v) for v in resumed.trainable_variables]
    epoch = AdapterCheckpoints(tmp_path / "run").resume(resumed, tmp_path / "run" / "checkpoint-4")
    assert epoch == 2 and [id(v) for v in resumed.trainable_variables] == variables
    halfway = _adapter(resumed)
    resumed.fit(x, y, epochs=4, initial_epoch=epoch, batch_size=2, shuffle=False, verbose=0)
    final = _adapter(resumed)
    assert sorted(final) == sorted(expected)
    for key, value in expected.items():
        assert np.abs(final[key] - value).max() <= 1e-6, key
    assert max(np.abs(v - halfway[k]).max() for k, v in expected.items()) > 1e-4


def test_half_precision_base_keeps_the_adapter_in_float32(checkpoints: Any, token_ids: np.ndarray,
                                                          tmp_path: Path) -> None:
    """SPEC.md 7.5 as in the torch backend: float32 adapter variables on a bfloat16 keras-hub model, the LoRA part
    computed in float32, the file's float16 values saved back bit for bit; ``dtype=`` still decides."""
    import keras_hub
    from safetensors.numpy import load_file, save_file

    reference = hf_model(checkpoints["llama"])
    adapterspec.inject_adapter(reference, LORA)
    for i, p in enumerate(q for q in reference.parameters() if q.requires_grad):
        p.data.copy_(p.data.new_tensor(0.05 * np.sin(np.arange(p.numel()) * 0.7 + i).reshape(tuple(p.shape))))
    adapterspec.save_adapter(reference, tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    save_file({k: v.astype(np.float16) for k, v in load_file(file).items()}, str(file), metadata={"format": "pt"})

    def half() -> Any:
        return keras_hub.models.Llama3CausalLM.from_preset(str(checkpoints["llama"]), preprocessor=None,
                                                           dtype="bfloat16")

    model = half()
    adapterspec.load_adapter(model, tmp_path / "a")
    variables = [v for v in model.variables if "adapterspec_" in v.path]
    assert variables and {v.dtype for v in variables} == {"float32"}
    full = keras_model("llama", checkpoints["llama"])
    adapterspec.load_adapter(full, tmp_path / "a")
    got, want = keras_logits(model, token_ids), keras_logits(full, token_ids)
    assert np.abs(got.astype(np.float32) - want).max() < 0.1  # a bfloat16 model's rounding, not a wrong adapter
    adapterspec.save_adapter(model, tmp_path / "again")
    stored, saved = load_file(file), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(stored)
    assert all(saved[k].dtype == np.float16 and np.array_equal(saved[k], v) for k, v in stored.items())
    pinned = half()
    adapterspec.load_adapter(pinned, tmp_path / "a", dtype="bfloat16")
    assert {v.dtype for v in pinned.variables if "adapterspec_" in v.path} == {"bfloat16"}
