"""Auxiliary tensors on keras-hub models, exact against PEFT 0.21 (fp32): LoRA's ``trainable_token_indices`` (rows
of the embedding -- and of a tied or untied ``lm_head`` -- replaced while the adapter is active) and
``modules_to_save`` (a module's weights replaced while the adapter is active, restored after). A folder PEFT saved
loads and gives PEFT's logits; a folder Keras saves loads in PEFT with no missing/unexpected key and no warning;
a round trip is bit-exact; merge/unmerge and switching restore the base exactly."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from adapterspec.errors import AdapterSpecError, ShapeMismatchError, UnsupportedError  # noqa: E402
from keras_helpers import (  # noqa: E402
    assert_near,
    assert_peft_close,
    assert_same_snapshot,
    hf_model,
    keras_logits,
    keras_model,
    snapshot,
    torch_logits,
    unique_values,
)


def _fill(peft_model: Any, markers: tuple[str, ...], salt: int = 0, scale: float = 0.5) -> None:
    """Element-unique values in every adapter tensor whose name holds one of ``markers``."""
    import torch

    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(peft_model.named_parameters())):
            if param.requires_grad and any(m in name for m in markers):
                param.copy_(torch.from_numpy(unique_values(tuple(param.shape), salt + index, scale=scale)))


_MARKERS = ("lora_", "trainable_tokens_delta", "modules_to_save.")


def _peft_adapter(folder: Path, out: Path, config: Any, scale: float = 0.5) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note about tied weights
        peft_model = peft.get_peft_model(hf_model(folder), config)
    _fill(peft_model, _MARKERS, scale=scale)
    peft_model.eval()
    peft_model.save_pretrained(out)
    return peft_model


def _peft_load(folder: Path, adapter: Path) -> Any:
    """PEFT loads ``adapter``: no missing or unexpected adapter key, no warning of its own (transformers'
    deprecation notices aside, and PEFT's note about tied weights, which it gives for its own folders too)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        model = peft.PeftModel.from_pretrained(hf_model(folder), adapter).eval()
        result: Any = set_peft_model_state_dict(model, load_file(adapter / "adapter_model.safetensors"))
        # PEFT's own save of this model leaves out a tied head's rows (the embedding's): those count as missing
        # for its own folders too
        own = peft.utils.get_peft_model_state_dict(model)
        baseline: Any = set_peft_model_state_dict(model, own)
    assert not result.unexpected_keys
    assert set(result.missing_keys) == set(baseline.missing_keys)
    return model


def _diff(got: np.ndarray, expected: np.ndarray) -> float:
    diff = float(np.abs(got - expected).max())
    print(f"max abs diff vs PEFT {diff:.3g}")
    return diff


def _lora(**kw: Any) -> Any:
    return peft.LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], **kw})


TOKEN_CASES: dict[str, tuple[str, Any]] = {
    "llama-list": ("llama", lambda: _lora(trainable_token_indices=[3, 7, 11, 40])),
    "llama-embedding-and-head": ("llama", lambda: _lora(
        trainable_token_indices={"embed_tokens": [3, 17], "lm_head": [5, 9, 17]})),
    "gemma-tied-list": ("gemma", lambda: _lora(trainable_token_indices=[3, 7, 11])),  # lm_head shares the rows
    "gemma-tied-own-head-rows": ("gemma", lambda: _lora(
        trainable_token_indices={"embed_tokens": [3, 7], "lm_head": [5, 9]})),
}


def _token_ids(ids: np.ndarray) -> np.ndarray:
    out = np.array(ids)
    out[0, :4] = [3, 7, 11, 17]  # the replaced rows are looked up
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_trainable_tokens_give_peft_logits_both_ways(case: str, checkpoints: Any, token_ids: np.ndarray,
                                                     tmp_path: Path) -> None:
    arch, make_config = TOKEN_CASES[case]
    ids = _token_ids(token_ids)
    peft_model = _peft_adapter(checkpoints[arch], tmp_path / "peft", make_config())
    expected = torch_logits(peft_model, ids)
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, ids)
    print(f"base conversion {float(np.abs(base - torch_logits(hf_model(checkpoints[arch]), ids)).max()):.3g}")

    adapterspec.load_adapter(model, tmp_path / "peft")
    got = keras_logits(model, ids)
    _diff(got, expected)
    assert_near(got, expected)
    with peft_model.disable_adapter():
        assert np.abs(expected - torch_logits(peft_model, ids)).max() > 1e-2  # the rows matter
    with adapterspec.disabled_adapters(model):
        assert np.array_equal(keras_logits(model, ids), base)

    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    ours, theirs = adapterspec.read_adapter(saved), adapterspec.read_adapter(tmp_path / "peft")
    assert set(ours.tensors) == set(theirs.tensors)
    a, b = ours.load_tensors("numpy"), theirs.load_tensors("numpy")
    assert all(np.array_equal(a[k], b[k]) for k in b)
    assert_near(torch_logits(_peft_load(checkpoints[arch], saved), ids), expected)
    if arch == "gpt2":  # a fresh adapter saves the module in PEFT's shape too (before: the Keras kernel's)
        fresh = keras_model(arch, checkpoints[arch])
        adapterspec.inject_adapter(fresh, make_config().to_dict(), trainable=False)
        shapes = {k: v.shape for k, v in adapterspec.read_adapter(adapterspec.save_adapter(
            fresh, tmp_path / "fresh")).tensors.items()}
        assert {k: shapes[k] for k in b if k in shapes} == {k: v.shape for k, v in b.items()}

    again = keras_model(arch, checkpoints[arch])  # round trip: bit-exact
    adapterspec.load_adapter(again, saved)
    assert np.array_equal(keras_logits(again, ids), got)

    if case == "gemma-tied-own-head-rows":  # the rows of the tied head cannot go into the shared matrix
        before = snapshot(model)
        with pytest.raises(UnsupportedError, match="tied"):
            adapterspec.merge_adapters(model)
        assert_same_snapshot(before, snapshot(model))
        return
    adapterspec.merge_adapters(model)
    assert_near(keras_logits(model, ids), expected)
    adapterspec.unmerge_adapters(model)  # the token rows come back exactly, LoRA's kernels up to rounding
    assert_near(keras_logits(model, ids), got)
    adapterspec.delete_adapter(model, "default")
    assert_near(keras_logits(model, ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_trainable_tokens_injected_in_keras_start_as_the_base_rows_and_train(checkpoints: Any, token_ids: np.ndarray,
                                                                              tmp_path: Path) -> None:
    ids = _token_ids(token_ids)
    model = keras_model("gemma", checkpoints["gemma"])
    base = keras_logits(model, ids)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
              "trainable_token_indices": [3, 7]}
    adapterspec.inject_adapter(model, config)
    # rows = base rows, B = 0: the lookup is exact, the tied head's columns computed apart round alike (TensorFlow)
    # or within fp32 rounding (JAX's XLA blocks the full matmul differently)
    assert_near(keras_logits(model, ids), base)
    rows = [v for v in model.trainable_variables if "trainable_tokens_delta" in v.path]
    assert len(rows) == 1 and tuple(rows[0].shape)[-2:] == (2, 64)
    rows[0].assign(unique_values(tuple(rows[0].shape), 5, scale=0.5))
    got = keras_logits(model, ids)
    assert np.abs(got - base).max() > 1e-2
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    assert_near(torch_logits(_peft_load(checkpoints["gemma"], saved), ids), got)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("config, error, where", [
    ({"trainable_token_indices": [3, 500]}, ShapeMismatchError, "trainable_tokens_delta"),
    ({"trainable_token_indices": [3, 3]}, UnsupportedError, "/trainable_token_indices"),
    ({"trainable_token_indices": {"no_such_layer": [1]}}, adapterspec.TargetNotFoundError, "/trainable_token_indices"),
    ({"trainable_token_indices": {"q_proj": [1]}}, UnsupportedError, "q_proj"),
])
def test_bad_trainable_tokens_are_refused_and_change_nothing(config: dict[str, Any], error: type[AdapterSpecError],
                                                             where: str, checkpoints: Any) -> None:
    model = keras_model("llama", checkpoints["llama"])
    before = snapshot(model)
    with pytest.raises(error) as caught:
        adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "target_modules": ["v_proj"], **config})
    assert where in (caught.value.pointer or "") + (caught.value.key or "")
    assert_same_snapshot(before, snapshot(model))


SAVE_CASES: dict[str, tuple[str, Any]] = {
    "llama-lm-head": ("llama", lambda: _lora(modules_to_save=["lm_head"])),  # untied: a transposed copy
    "llama-norms-and-tokens": ("llama", lambda: _lora(modules_to_save=["input_layernorm", "model.norm"],
                                                      trainable_token_indices=[3, 7])),
    "gemma-norms": ("gemma", lambda: _lora(modules_to_save=["post_attention_layernorm", "model.norm"])),
    # GPT-2's attention output: keras-hub reshapes the Conv1D weight [in, out] into the EinsumDense kernel
    # [heads, head_dim, out] (before: loading refused with a wrong ShapeMismatchError, and a fresh adapter saved
    # the Keras shape, which PEFT could not load)
    "gpt2-attention-output": ("gpt2", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                              modules_to_save=["attn.c_proj"])),
}
# (an entry "norm" would select every *norm module, as PEFT matches; the SDK's key check takes only whole-segment
# matches as saved modules and refuses such a folder before any backend sees it -- reported to the lead)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_modules_to_save_give_peft_logits_both_ways(case: str, checkpoints: Any, token_ids: np.ndarray,
                                                    tmp_path: Path) -> None:
    arch, make_config = SAVE_CASES[case]
    ids = _token_ids(token_ids)
    # GPT-2's attention output copy at 0.5 drives the residual stream to where the final layer norm turns fp32
    # rounding into 2e-5 (keras-hub's own conversion of PEFT's merged model is as far): copies at the base's scale
    peft_model = _peft_adapter(checkpoints[arch], tmp_path / "peft", make_config(), 0.05 if arch == "gpt2" else 0.5)
    expected = torch_logits(peft_model, ids)
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, ids)
    values = {v.path: np.array(v.numpy()) for v in model.variables}

    adapterspec.load_adapter(model, tmp_path / "peft")
    got = keras_logits(model, ids)
    _diff(got, expected)
    assert_peft_close(got, expected, base, torch_logits(hf_model(checkpoints[arch]), ids))  # keras-hub's base error
    with peft_model.disable_adapter():
        assert np.abs(expected - torch_logits(peft_model, ids)).max() > 1e-2  # the copies matter
    with adapterspec.disabled_adapters(model):  # the original values come back, bit-exact
        assert np.array_equal(keras_logits(model, ids), base)
    assert np.array_equal(keras_logits(model, ids), got)

    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    ours, theirs = adapterspec.read_adapter(saved), adapterspec.read_adapter(tmp_path / "peft")
    assert set(ours.tensors) == set(theirs.tensors)
    a, b = ours.load_tensors("numpy"), theirs.load_tensors("numpy")
    assert all(np.array_equal(a[k], b[k]) for k in b)
    assert_near(torch_logits(_peft_load(checkpoints[arch], saved), ids), expected)

    again = keras_model(arch, checkpoints[arch])  # round trip: bit-exact
    adapterspec.load_adapter(again, saved)
    assert np.array_equal(keras_logits(again, ids), got)

    adapterspec.delete_adapter(model, "default")  # every variable as it was
    for v in model.variables:
        assert np.array_equal(v.numpy(), values[v.path]), v.path


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_modules_to_save_switch_and_merge_like_peft(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """Two adapters with their own copy of ``lm_head``: each active one runs its copy; none restores the original;
    ``unload(merge=True)`` keeps the running copy (PEFT's ``merge_and_unload``)."""
    folder = checkpoints["llama"]
    first = _peft_adapter(folder, tmp_path / "a", _lora(modules_to_save=["lm_head"]))
    second = peft.get_peft_model(hf_model(folder), _lora(modules_to_save=["lm_head"], target_modules=["k_proj"]))
    _fill(second, _MARKERS, salt=40)
    second.eval()
    second.save_pretrained(tmp_path / "b")
    expected = {"a": torch_logits(first, token_ids), "b": torch_logits(second, token_ids)}
    model = keras_model("llama", folder)
    base = keras_logits(model, token_ids)
    adapterspec.load_adapter(model, tmp_path / "a", adapter_name="a")
    adapterspec.load_adapter(model, tmp_path / "b", adapter_name="b")
    for name in ("a", "b", "a"):
        adapterspec.set_active_adapters(model, [name])
        assert_near(keras_logits(model, token_ids), expected[name])
    adapterspec.set_active_adapters(model, [])
    assert np.array_equal(keras_logits(model, token_ids), base)
    adapterspec.set_active_adapters(model, ["b"])
    adapterspec.unload(model, merge=True)
    assert adapterspec.adapter_names(model) == []
    assert_near(keras_logits(model, token_ids), expected["b"])
    head = np.array(model.backbone.token_embedding.reverse_embeddings.numpy())
    copy = adapterspec.read_adapter(tmp_path / "b").load_tensors("numpy")["base_model.model.lm_head.weight"]
    assert np.array_equal(head, copy.T)  # the merged copy is the module now


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", ["train", "tied-lm-head", "adapted-by-another", "saved-by-another",
                                  "tied-embedding", "tied-embedding-gpt2"])
def test_unsupported_modules_to_save_are_refused_and_change_nothing(case: str, checkpoints: Any,
                                                                    tmp_path: Path) -> None:
    """``tied-embedding``: the copy of an input embedding whose matrix is also the logits projection went into that
    one variable, so the logits ran it too; PEFT swaps in the input embedding alone (2.9 off, GPT-2 and Gemma)."""
    arch = {"tied-lm-head": "gemma", "tied-embedding": "gemma", "tied-embedding-gpt2": "gpt2"}.get(case, "llama")
    model = keras_model(arch, checkpoints[arch])
    config: dict[str, Any] = {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}
    if case.startswith("tied-embedding"):
        config = {"peft_type": "LORA", "r": 2, "target_modules": ["c_attn" if arch == "gpt2" else "q_proj"],
                  "modules_to_save": ["wte" if arch == "gpt2" else "embed_tokens"]}
    options: dict[str, Any] = {"trainable": False}
    if case == "train":
        options = {}
    elif case == "adapted-by-another":
        adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "target_modules": ["lm_head"]}, "other")
    elif case == "saved-by-another":
        adapterspec.inject_adapter(model, config, "other", trainable=False)
        config = {"peft_type": "LORA", "r": 2, "target_modules": ["lm_head"]}
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as caught:
        adapterspec.inject_adapter(model, config, "new", **options)
    assert "lm_head" in (caught.value.key or "") or caught.value.pointer == "/modules_to_save"
    if case.startswith("tied-embedding"):
        assert "tied weights" in caught.value.message and "torch backend" in (caught.value.hint or "")
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fit_trains_the_token_rows_and_peft_loads_the_result(checkpoints: Any, token_ids: np.ndarray,
                                                            tmp_path: Path) -> None:
    import keras

    from keras_helpers import keras_inputs

    ids = _token_ids(token_ids)
    model = keras_model("llama", checkpoints["llama"])
    embeddings = np.array(model.backbone.token_embedding.embeddings.numpy())
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                                       "trainable_token_indices": [3, 7]})
    rows = [v for v in model.trainable_variables if "trainable_tokens_delta" in v.path]
    assert len(rows) == 1
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    model.fit(keras_inputs(ids), np.roll(ids, -1, axis=1), epochs=2, batch_size=2, verbose=0)
    trained = np.array(rows[0].numpy()).reshape(2, 64)
    assert np.abs(trained - embeddings[[3, 7]]).max() > 1e-4  # the rows moved
    assert np.array_equal(model.backbone.token_embedding.embeddings.numpy(), embeddings)  # the base did not
    got = keras_logits(model, ids)
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    assert_near(torch_logits(_peft_load(checkpoints["llama"], saved), ids), got)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_task_head_keras_hub_builds_afresh_is_named_in_the_refusal(tmp_path: Path) -> None:
    """A SEQ_CLS adapter saves its ``classifier`` whole; keras-hub's ``BertTextClassifier`` builds its head afresh (its
    converter ports the backbone only): refused naming the module and why (the fix said to add it to target_modules)."""
    import keras_hub
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    config = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     vocab_size=128, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(config).eval()
    base.save_pretrained(tmp_path / "hf")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    peft_model.save_pretrained(tmp_path / "adapter")
    model = keras_hub.models.BertTextClassifier.from_preset(str(tmp_path / "hf"), num_classes=3, preprocessor=None)
    before = snapshot(model)
    with pytest.raises(adapterspec.TargetNotFoundError) as caught:  # check 18, as torch's
        adapterspec.load_adapter(model, tmp_path / "adapter")
    assert caught.value.key in ("base_model.model.classifier.weight", "base_model.model.classifier.bias")
    assert "module 'classifier', saved whole (modules_to_save), is not a module of this Keras model" in caught.value.message
    assert "torch backend" in (caught.value.hint or "")
    assert_same_snapshot(before, snapshot(model))
