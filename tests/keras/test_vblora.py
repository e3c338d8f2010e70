"""VB-LoRA (SPEC.md 17.4) on keras-hub models, exact against PEFT 0.21 (fp32) in both directions; the vector bank
stored once; the top-k form and the layers PEFT refuses refused typed, with the model unchanged.

Each case: a PEFT VB-LoRA model with element-unique logits and bank is saved (logits form). A keras-hub model
converted from the same checkpoint loads the folder and gives PEFT's logits within the base conversion error;
``save_adapter`` writes bit-identical tensors (the bank once) that PEFT loads with no warning of its own; merging
gives PEFT's merged logits, unmerging the unmerged ones. The top-k form (integer indices) is torch-only.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from adapterspec.errors import MissingTensorError, ShapeMismatchError, TensorError, UnsupportedError  # noqa: E402
from keras_helpers import (  # noqa: E402
    assert_near,
    assert_peft_close,
    assert_refused_unchanged,
    hf_model,
    keras_logits,
    keras_model,
    peft_load_exactly,
    torch_logits,
    unique_values,
)

GPT2 = ["c_attn", "c_proj", "c_fc"]
BANK = "base_model.vblora_vector_bank"


def _fill(model: Any) -> None:
    """Element-unique logits (spread: distinct top-k) and bank: a transpose or a swapped key shows."""
    with torch.no_grad():
        for index, (name, tensor) in enumerate(sorted(model.named_parameters())):
            shape = tuple(tensor.shape)
            if "vblora_logits" in name:
                tensor.copy_(torch.from_numpy(unique_values(shape, index, scale=2.0)))
            elif "vblora_vector_bank" in name:
                tensor.copy_(torch.from_numpy(unique_values(shape, index, scale=0.4)))


def _peft_folder(checkpoint: Path, config: Any, folder: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(hf_model(checkpoint), config)
        _fill(model)
        model.eval()
        model.save_pretrained(str(folder))
    return model


def _peft_load(checkpoint: Path, adapter: Path) -> tuple[Any, list[str]]:
    """PEFT's model of ``adapter`` and its warnings. The logits form: :func:`peft_load_exactly` (its state dict is
    the file's); the top-k form: PEFT re-derives the top-k weights from the logits it rebuilt, which differ from the
    file's by rounding, so only the logits are compared."""
    if not json.loads((adapter / "adapter_config.json").read_text()).get("save_only_topk_weights"):
        return peft_load_exactly(checkpoint, adapter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf_model(checkpoint), adapter).eval()
    return model, sorted({str(w.message) for w in caught
                          if not issubclass(w.category, (FutureWarning, DeprecationWarning))})


CASES: dict[str, tuple[str, Callable[[], Any]]] = {
    "llama": ("llama", lambda: peft.VBLoRAConfig(r=3, num_vectors=12, vector_length=16, topk=3,
                                                 target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2-fused-c_attn-topk": ("gpt2", lambda: peft.VBLoRAConfig(r=2, num_vectors=10, vector_length=16, topk=3,
                                                                 target_modules=GPT2, save_only_topk_weights=True)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_vblora_gives_peft_logits_in_keras_and_round_trips(case: str, checkpoints: Any, token_ids: np.ndarray,
                                                                tmp_path: Path) -> None:
    arch, make_config = CASES[case]
    reference = _peft_folder(checkpoints[arch], make_config(), tmp_path / "peft")
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    theirs = adapterspec.read_adapter(tmp_path / "peft")
    assert BANK in theirs.tensors
    reference, said_peft = _peft_load(checkpoints[arch], tmp_path / "peft")  # PEFT's own model of the folder
    expected = torch_logits(reference, token_ids)
    base_torch = torch_logits(hf_model(checkpoints[arch]), token_ids)
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, token_ids)
    assert np.abs(expected - base_torch).max() > 1e-2  # the adapter changes the output: the comparison means something

    adapterspec.load_adapter(model, tmp_path / "peft")
    got = keras_logits(model, token_ids)
    assert_peft_close(got, expected, base, base_torch)
    with adapterspec.disabled_adapters(model):
        assert np.abs(keras_logits(model, token_ids) - base).max() == 0.0

    # Keras saves exactly PEFT's tensors (the bank once) and config; PEFT loads them cleanly, same logits
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    ours = adapterspec.read_adapter(saved)
    assert set(ours.tensors) == set(theirs.tensors)
    ours_np, theirs_np = ours.load_tensors("numpy"), theirs.load_tensors("numpy")
    for key in theirs_np:
        assert ours_np[key].dtype == theirs_np[key].dtype and np.array_equal(ours_np[key], theirs_np[key]), key
    ours_config = json.loads((saved / "adapter_config.json").read_text())
    assert {k: v for k, v in ours_config.items() if k in peft_config} == peft_config
    reloaded, said_ours = _peft_load(checkpoints[arch], saved)
    assert said_ours == said_peft  # no warning of its own
    assert np.array_equal(torch_logits(reloaded, token_ids), expected)

    # merged: PEFT's merged logits; unmerged: back to the unmerged forward
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    merged_expected = torch_logits(reference, token_ids)
    adapterspec.merge_adapters(model)
    assert_peft_close(keras_logits(model, token_ids), merged_expected, base, base_torch)
    adapterspec.unmerge_adapters(model)
    assert_near(keras_logits(model, token_ids), got)

    adapterspec.delete_adapter(model, "default")
    assert adapterspec.adapter_names(model) == []
    assert_near(keras_logits(model, token_ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_adapter_made_in_keras_loads_in_peft(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """A VB-LoRA injected on Keras (Keras' draws of PEFT's distributions) saves its bank once; PEFT loads the folder
    with nothing missing or unexpected and gives Keras' logits."""
    fields = dict(r=2, num_vectors=8, vector_length=16, topk=2, target_modules=GPT2)
    import keras

    keras.utils.set_random_seed(3)  # Keras' draws: the same adapter each run
    model = keras_model("gpt2", checkpoints["gpt2"])
    adapterspec.inject_adapter(model, {"peft_type": "VBLORA", **fields, "init_vector_bank_bound": 0.2,
                                       "init_logits_std": 1.0}, trainable=True)
    adapterspec.set_active_adapters(model, ["default"])
    got = keras_logits(model, token_ids)
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    assert tuple(adapterspec.read_adapter(saved).tensors[BANK].shape) == (8, 16)
    reloaded, _ = peft_load_exactly(checkpoints["gpt2"], saved)
    base = keras_logits(keras_model("gpt2", checkpoints["gpt2"]), token_ids)
    base_torch = torch_logits(hf_model(checkpoints["gpt2"]), token_ids)
    assert np.abs(got - base).max() > 1e-3
    assert_peft_close(got, torch_logits(reloaded, token_ids), base, base_torch)


def test_training_the_topk_form_is_refused_unchanged(checkpoints: Any, tmp_path: Path) -> None:
    """PEFT raises at the first training forward of a top-k adapter; Keras refuses trainable (and a new one) upfront."""
    config = dict(r=2, num_vectors=8, vector_length=16, topk=2, target_modules=["q_proj"], save_only_topk_weights=True)
    _peft_folder(checkpoints["llama"], peft.VBLoRAConfig(**config), tmp_path)
    model = keras_model("llama", checkpoints["llama"])
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, tmp_path, trainable=True),
                             UnsupportedError, "/save_only_topk_weights")
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(model, {"peft_type": "VBLORA", **config}),
                             UnsupportedError, "/save_only_topk_weights")


@pytest.mark.parametrize(("value", "needle"), [(8, "outside [0, num_vectors=8)"),
                                               ("repeat", "repeats a top-k index beside another")])
def test_topk_indices_out_of_range_or_repeated_are_refused_unchanged(checkpoints: Any, tmp_path: Path, value: Any,
                                                                     needle: str) -> None:
    """An index past the bank (PEFT's loader fails; JAX's gather would clamp it silently) or repeated in a row (PEFT
    keeps one of the weights; topk 3) is refused at load naming the key, the model unchanged, as on torch."""
    from safetensors.numpy import load_file, save_file

    config = dict(r=2, num_vectors=8, vector_length=16, topk=3, target_modules=["q_proj", "v_proj"],
                  save_only_topk_weights=True)
    _peft_folder(checkpoints["llama"], peft.VBLoRAConfig(**config), tmp_path)
    index = "base_model.model.model.layers.1.self_attn.v_proj.vblora_logits_B_topk_indices"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    if value == "repeat":
        tensors[index][0, 1, 1] = tensors[index][0, 1, 0]
    else:
        tensors[index][-1, -1, -1] = value
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    model = keras_model("llama", checkpoints["llama"])
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, tmp_path), TensorError, needle)
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, tmp_path), TensorError, index)
    assert adapterspec.adapter_names(model) == []


def test_a_bank_of_another_shape_is_refused_naming_the_bank(checkpoints: Any, tmp_path: Path) -> None:
    """A transposed bank: ShapeMismatchError naming the key (the SDK's check); the backend's own comparison (its
    load_state, the file's checks left to it) names VB-LoRA's vector bank, not VeRA's projections."""
    from adapterspec import LoadOptions
    from adapterspec.checks import TensorInfo
    from adapterspec_keras.state import load_state
    from safetensors.numpy import load_file, save_file

    config = dict(r=2, num_vectors=8, vector_length=16, topk=2, target_modules=["q_proj", "v_proj"])
    _peft_folder(checkpoints["llama"], peft.VBLoRAConfig(**config), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors[BANK] = np.ascontiguousarray(tensors[BANK].T)
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    model = keras_model("llama", checkpoints["llama"])
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, tmp_path), ShapeMismatchError, BANK)
    adapterspec.inject_adapter(model, {"peft_type": "VBLORA", **config})
    saved_config = adapterspec.AdapterConfig.from_dict(json.loads((tmp_path / "adapter_config.json").read_text()))
    infos = {k: TensorInfo(tuple(v.shape), "F32") for k, v in tensors.items()}
    unchecked = adapterspec.Adapter(saved_config, infos, arrays=tensors)  # the SDK's checks not run
    with pytest.raises(ShapeMismatchError) as info:
        load_state(model, unchecked, "default", LoadOptions())
    assert info.value.key == BANK and "VeRA" not in str(info.value)
    assert "VB-LoRA vector bank: expected [8, 16] (num_vectors, vector_length)" in str(info.value)
    del tensors[BANK], infos[BANK]
    with pytest.raises(MissingTensorError, match="no shared VB-LoRA vector bank"):
        load_state(model, adapterspec.Adapter(saved_config, infos, arrays=tensors), "default", LoadOptions())


def test_embeddings_and_undividable_sizes_are_refused_as_in_peft(checkpoints: Any) -> None:
    model = keras_model("llama", checkpoints["llama"])
    config = {"peft_type": "VBLORA", "r": 2, "num_vectors": 4, "vector_length": 16, "target_modules": ["embed_tokens"]}
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(model, config), UnsupportedError,
                             "model.embed_tokens")
    config = {**config, "vector_length": 48, "target_modules": ["q_proj"]}
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(model, config), UnsupportedError,
                             "/vector_length")


def test_a_quantized_layer_is_refused_as_on_torch(checkpoints: Any, tmp_path: Path) -> None:
    """PEFT 0.21 has no quantized VB-LoRA layer and the torch backend refuses one: so does this backend (it ran the
    adapter on an int8 Dense), model unchanged."""
    _peft_folder(checkpoints["llama"], peft.VBLoRAConfig(r=2, num_vectors=8, vector_length=16, topk=2,
                                                         target_modules=["q_proj"]), tmp_path)
    model = keras_model("llama", checkpoints["llama"])
    model.quantize("int8")
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, tmp_path), UnsupportedError,
                             "quantized layer (int8")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_one_training_step_equals_peft(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """Loaded trainable (TensorFlow), one SGD step on the same loss gives PEFT's bank and logits after its step: the
    gradients flow through the top-k softmax and the bank's gather as in PEFT."""
    import tensorflow as tf
    from keras_helpers import keras_inputs
    from peft.utils import get_peft_model_state_dict

    if not hasattr(tf, "GradientTape") or __import__("keras").backend.backend() != "tensorflow":
        pytest.skip("the step is taken with TensorFlow's GradientTape")
    config = peft.VBLoRAConfig(r=2, num_vectors=8, vector_length=16, topk=3, target_modules=["q_proj", "down_proj"])
    reference = _peft_folder(checkpoints["llama"], config, tmp_path / "peft")
    weights = unique_values((2, 9, 128), 5, around=0.0, scale=1.0)
    lr = 0.5
    optimiser = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=lr)
    out = reference(input_ids=torch.from_numpy(np.asarray(token_ids, dtype=np.int64))).logits
    (out * torch.from_numpy(weights)).sum().backward()
    optimiser.step()
    expected = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(reference).items()}

    model = keras_model("llama", checkpoints["llama"])
    adapterspec.load_adapter(model, tmp_path / "peft", trainable=True)
    before = adapterspec.extract_adapter(model, "default").load_tensors("numpy")
    variables = model.trainable_variables
    assert variables
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(keras_inputs(token_ids), training=False) * weights)
    for variable, grad in zip(variables, tape.gradient(loss, variables)):
        variable.assign_sub(lr * grad)
    after = adapterspec.extract_adapter(model, "default").load_tensors("numpy")
    assert set(after) == set(expected)
    worst = 0.0
    for key, value in expected.items():
        assert np.abs(value - before[key]).max() > 1e-6, key  # the step moved the bank and every logits tensor
        worst = max(worst, float(np.abs(after[key] - value).max() / np.abs(value - before[key]).max()))
    print(f"bank and logits after one step: max diff vs PEFT {worst:.3g} of the step")
    assert worst < 1e-3


def test_topk_weights_summing_above_one_are_refused_unchanged(checkpoints: Any, tmp_path: Path) -> None:
    """PEFT's loader computes log(1 - sum) = NaN for them (SPEC.md 17.4): refused before anything is assigned."""
    from safetensors.numpy import load_file, save_file

    config = dict(r=2, num_vectors=8, vector_length=16, topk=2, target_modules=["q_proj"], save_only_topk_weights=True)
    _peft_folder(checkpoints["llama"], peft.VBLoRAConfig(**config), tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.vblora_logits_A_topk_weights"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors[key] = np.full_like(tensors[key], 1.25)
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    model = keras_model("llama", checkpoints["llama"])
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, tmp_path), TensorError, key)


def test_a_file_whose_vector_length_does_not_divide_a_layer_is_refused_naming_the_field(checkpoints: Any,
                                                                                       tmp_path: Path) -> None:
    """Check 18 (/vector_length) comes before check 20 (the axes in / L, out / L), as on torch (SPEC.md 17.4)."""
    import torch
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "VBLORA", "r": 2, "num_vectors": 4,
                                                               "vector_length": 48, "target_modules": ["q_proj"]}))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{key}.vblora_logits_A": torch.ones(2, 1, 4), f"{key}.vblora_logits_B": torch.ones(1, 2, 4),
               "base_model.vblora_vector_bank": torch.ones(4, 48)}, tmp_path / "adapter_model.safetensors",
              metadata={"format": "pt"})
    model = keras_model("llama", checkpoints["llama"])
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, tmp_path), UnsupportedError,
                             "/vector_length")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_vblora_adapters_and_vblora_with_lora_run_together_as_peft(checkpoints: Any, token_ids: np.ndarray,
                                                                       tmp_path: Path) -> None:
    """Two VB-LoRA adapters active (each its own bank; one of the top-k form): PEFT's PeftModel with both active.
    VB-LoRA with LoRA on one layer: PEFT's PeftMixedModel takes no VB-LoRA, so PEFT's reference is the VB-LoRA
    merged into the base (merge_and_unload) under the LoRA adapter -- the sum of the two added terms (SPEC.md 8.9)."""
    checkpoint = checkpoints["llama"]
    _peft_folder(checkpoint, peft.VBLoRAConfig(r=2, num_vectors=8, vector_length=16, topk=2,
                                               target_modules=["q_proj", "v_proj"]), tmp_path / "a")
    _peft_folder(checkpoint, peft.VBLoRAConfig(r=3, num_vectors=10, vector_length=16, topk=3,
                                               target_modules=["q_proj", "down_proj"], save_only_topk_weights=True),
                 tmp_path / "b")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.get_peft_model(hf_model(checkpoint), peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                                         target_modules=["q_proj"]))
        lora.save_pretrained(str(tmp_path / "l"))
        reference = peft.PeftModel.from_pretrained(hf_model(checkpoint), str(tmp_path / "a"), adapter_name="a").eval()
        reference.load_adapter(str(tmp_path / "b"), adapter_name="b")
        reference.base_model.set_adapter(["a", "b"])
        both = torch_logits(reference, token_ids)
        merged = peft.PeftModel.from_pretrained(hf_model(checkpoint), str(tmp_path / "a")).merge_and_unload()
        with_lora = torch_logits(peft.PeftModel.from_pretrained(merged, str(tmp_path / "l")).eval(), token_ids)
    base_torch = torch_logits(hf_model(checkpoint), token_ids)
    model = keras_model("llama", checkpoint)
    base = keras_logits(model, token_ids)
    for name in ("a", "b", "l"):
        adapterspec.load_adapter(model, tmp_path / name, adapter_name=name)
    adapterspec.set_active_adapters(model, ["a", "b"])
    assert np.abs(both - base_torch).max() > 1e-2
    assert_peft_close(keras_logits(model, token_ids), both, base, base_torch)
    adapterspec.set_active_adapters(model, ["a", "l"])
    assert np.abs(with_lora - both).max() > 1e-2
    assert_peft_close(keras_logits(model, token_ids), with_lora, base, base_torch)
