"""The ``TRAINABLE_TOKENS`` method (SPEC.md 15.2) on keras-hub models, exact against PEFT 0.21 in both directions.

Untied Llama and Qwen2 (the embedding, or the embedding and ``lm_head`` with rows of their own), tied Gemma and
GPT-2 (the output layer follows the embedding; PEFT saves the same tensor under its name too): a folder PEFT saved
gives PEFT's logits; our save holds PEFT's keys and bytes, and PEFT loads it with nothing missing or unexpected, no
warning and the same logits; merge gives PEFT's merged logits, unmerge and disable give the base back bit for bit;
two adapters switch. Bad folders are refused typed, the model unchanged.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from adapterspec.errors import ShapeMismatchError, UnexpectedTensorError, UnsupportedError  # noqa: E402
from keras_helpers import (  # noqa: E402
    assert_near,
    assert_refused_unchanged,
    hf_model,
    keras_logits,
    keras_model,
    peft_load_exactly,
    torch_logits,
    unique_values,
)


def _fill(peft_model: Any, salt: int = 0) -> None:
    """Element-unique rows, far from the ones they replace."""
    import torch

    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(peft_model.named_parameters())):
            if "trainable_tokens_delta" in name and param.requires_grad:
                param.copy_(torch.from_numpy(unique_values(tuple(param.shape), 70 + salt + index, scale=0.5)))


def _peft_adapter(folder: Path, out: Path, config: Any, salt: int = 0) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on the tiny configs
        peft_model = peft.get_peft_model(hf_model(folder), config)
    _fill(peft_model, salt)
    peft_model.eval()
    peft_model.save_pretrained(out)
    return peft_model


def _data(folder: Path) -> bytes:
    """The tensor bytes of a folder's safetensors file (after its header: ours adds adapterspec metadata)."""
    raw = (folder / "adapter_model.safetensors").read_bytes()
    return raw[8 + int.from_bytes(raw[:8], "little"):]


def _config(**kw: Any) -> Any:
    return peft.TrainableTokensConfig(**kw)


CASES: dict[str, tuple[str, Any]] = {
    "llama-default-target": ("llama", lambda: _config(token_indices=[5, 10, 31])),
    "llama-embedding-and-head": ("llama", lambda: _config(token_indices=[10, 5],
                                                          target_modules=["embed_tokens", "lm_head"])),
    "qwen2-embedding": ("qwen2", lambda: _config(token_indices=[31, 5], target_modules=["embed_tokens"])),
    "gemma-tied": ("gemma", lambda: _config(token_indices=[5, 10, 31])),
    "gpt2-tied": ("gpt2", lambda: _config(token_indices=[5, 15])),
}


def _ids(token_ids: np.ndarray) -> np.ndarray:
    out = np.array(token_ids)
    out[0, :4] = [5, 10, 31, 15]  # the replaced rows are looked up
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_folder_roundtrip(case: str, checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    arch, make_config = CASES[case]
    ids = _ids(token_ids)
    peft_model = _peft_adapter(checkpoints[arch], tmp_path / "peft", make_config())
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "TRAINABLE_TOKENS"
    expected = torch_logits(peft_model, ids)
    with peft_model.disable_adapter():
        assert np.abs(expected - torch_logits(peft_model, ids)).max() > 1e-2  # the rows matter
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, ids)
    assert adapterspec.validate_adapter(tmp_path / "peft") == []

    adapterspec.load_adapter(model, tmp_path / "peft")
    got = keras_logits(model, ids)
    print(f"{case}: max abs diff vs PEFT {float(np.abs(got - expected).max()):.3g}")
    assert_near(got, expected)
    with adapterspec.disabled_adapters(model):
        assert np.array_equal(keras_logits(model, ids), base)

    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    ours, theirs = adapterspec.read_adapter(saved), adapterspec.read_adapter(tmp_path / "peft")
    assert sorted(ours.tensors) == sorted(theirs.tensors)
    a, b = ours.load_tensors("numpy"), theirs.load_tensors("numpy")
    for key in b:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    assert _data(saved) == _data(tmp_path / "peft")  # same order, same bytes
    loaded, said = peft_load_exactly(checkpoints[arch], saved)
    assert said == []
    assert_near(torch_logits(loaded, ids), expected)

    again = keras_model(arch, checkpoints[arch])  # round trip: bit-exact
    adapterspec.load_adapter(again, saved)
    assert np.array_equal(keras_logits(again, ids), got)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.merge_adapter()
    merged_expected = torch_logits(peft_model, ids)
    adapterspec.merge_adapters(model)
    assert_near(keras_logits(model, ids), merged_expected)
    adapterspec.unmerge_adapters(model)  # the base rows come back exactly
    assert np.array_equal(keras_logits(model, ids), got)
    adapterspec.delete_adapter(model, "default")
    assert np.array_equal(keras_logits(model, ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_two_adapters_switch(arch: str, checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """Two adapters on the same rows and on others: each active one gives its PEFT logits, none the base."""
    ids = _ids(token_ids)
    first = _peft_adapter(checkpoints[arch], tmp_path / "a", _config(token_indices=[5, 10]))
    second = _peft_adapter(checkpoints[arch], tmp_path / "b", _config(token_indices=[10, 31, 15]), salt=40)
    expected = {"a": torch_logits(first, ids), "b": torch_logits(second, ids)}
    assert np.abs(expected["a"] - expected["b"]).max() > 1e-2
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, ids)
    adapterspec.load_adapter(model, tmp_path / "a", adapter_name="a")
    adapterspec.load_adapter(model, tmp_path / "b", adapter_name="b")
    for name in ("a", "b", "a"):
        adapterspec.set_active_adapters(model, [name])
        assert_near(keras_logits(model, ids), expected[name])
    adapterspec.set_active_adapters(model, [])
    assert np.array_equal(keras_logits(model, ids), base)
    adapterspec.set_active_adapters(model, ["b"])
    adapterspec.merge_adapters(model)
    assert_near(keras_logits(model, ids), expected["b"])
    adapterspec.unmerge_adapters(model)
    adapterspec.set_active_adapters(model, [])
    assert np.array_equal(keras_logits(model, ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tied_layer_shares_the_rows(checkpoints: Any, tmp_path: Path) -> None:
    _peft_adapter(checkpoints["gemma"], tmp_path, _config(token_indices=[5, 10]))
    model = keras_model("gemma", checkpoints["gemma"])
    adapterspec.load_adapter(model, tmp_path)
    from adapterspec_keras.switch import get_state

    state = get_state(model)
    assert state is not None
    layers = {layer.path_of("default"): layer for layer in state.adapter_layers.values()}
    assert sorted(layers) == ["lm_head", "model.embed_tokens"]
    assert layers["lm_head"].refs("default") == layers["model.embed_tokens"].refs("default")  # one bank row
    bank = state.banks["default"][0]
    assert sum(int(np.prod(v.shape)) for v in bank.variables) == 2 * 64  # the rows once


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tied_rows_that_disagree_are_refused(checkpoints: Any, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    _peft_adapter(checkpoints["gemma"], tmp_path, _config(token_indices=[5, 10]))
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.lm_head.trainable_tokens_delta"
    tensors[key] = tensors[key] + np.float32(1.0)
    save_file(tensors, file, metadata={"format": "pt"})
    model = keras_model("gemma", checkpoints["gemma"])
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, tmp_path), UnexpectedTensorError,
                             "lm_head.trainable_tokens_delta")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_selecting_a_tied_layer_is_refused(checkpoints: Any, tmp_path: Path) -> None:
    """PEFT 0.21 wraps a tied layer it also selects twice (``lm_head.base_layer.trainable_tokens_delta``)."""
    _peft_adapter(checkpoints["gemma"], tmp_path, _config(token_indices=[5], target_modules=["embed_tokens", "lm_head"]))
    model = keras_model("gemma", checkpoints["gemma"])
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, tmp_path), UnsupportedError, "lm_head")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_rows_outside_the_vocabulary_are_a_shape_error(checkpoints: Any, tmp_path: Path) -> None:
    _peft_adapter(checkpoints["llama"], tmp_path, _config(token_indices=[5]))
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "token_indices": [128 + 3]}))
    model = keras_model("llama", checkpoints["llama"])
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, tmp_path), ShapeMismatchError,
                             "trainable_tokens_delta")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_injected_rows_start_as_the_base_rows_and_peft_loads_them(checkpoints: Any, token_ids: np.ndarray,
                                                                  tmp_path: Path) -> None:
    ids = _ids(token_ids)
    model = keras_model("gemma", checkpoints["gemma"])
    base = keras_logits(model, ids)
    adapterspec.inject_adapter(model, {"peft_type": "TRAINABLE_TOKENS", "token_indices": [5, 10]})
    assert_near(keras_logits(model, ids), base)
    rows = [v for v in model.trainable_variables if "trainable_tokens_delta" in v.path]
    assert len(rows) == 1 and tuple(rows[0].shape)[-2:] == (2, 64)
    rows[0].assign(unique_values(tuple(rows[0].shape), 5, scale=0.5))
    got = keras_logits(model, ids)
    assert np.abs(got - base).max() > 1e-2
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    tensors = adapterspec.read_adapter(saved).load_tensors("numpy")
    assert sorted(tensors) == ["base_model.model.lm_head.trainable_tokens_delta",
                               "base_model.model.model.embed_tokens.trainable_tokens_delta"]
    loaded, said = peft_load_exactly(checkpoints["gemma"], saved)
    assert said == []
    assert_near(torch_logits(loaded, ids), got)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fit_trains_the_rows_and_peft_loads_the_result(checkpoints: Any, token_ids: np.ndarray,
                                                       tmp_path: Path) -> None:
    """Tied Gemma: the one rows tensor trains (the embedding's and the head's rows move together), the base does
    not; PEFT gives the trained model's logits."""
    import keras

    from keras_helpers import keras_inputs

    ids = _ids(token_ids)
    model = keras_model("gemma", checkpoints["gemma"])
    embeddings = np.array(model.backbone.token_embedding.embeddings.numpy())
    adapterspec.inject_adapter(model, {"peft_type": "TRAINABLE_TOKENS", "token_indices": [5, 10]})
    rows = [v for v in model.trainable_variables if "trainable_tokens_delta" in v.path]
    assert len(rows) == 1
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    model.fit(keras_inputs(ids), np.roll(ids, -1, axis=1), epochs=2, batch_size=2, verbose=0)
    trained = np.array(rows[0].numpy()).reshape(2, 64)
    assert np.abs(trained - embeddings[[5, 10]]).max() > 1e-4  # the rows moved
    assert np.array_equal(model.backbone.token_embedding.embeddings.numpy(), embeddings)  # the base did not
    got = keras_logits(model, ids)
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    loaded, said = peft_load_exactly(checkpoints["gemma"], saved)
    assert said == []
    assert_near(torch_logits(loaded, ids), got)


def test_docstring_examples() -> None:
    import doctest

    from adapterspec_keras import tokens

    result = doctest.testmod(tokens, optionflags=doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL)
    assert result.failed == 0


@pytest.mark.parametrize("init", [True, False, None])
def test_new_adapter_rows_start_as_peft_s_init_weights_says(init: Any, checkpoints: Any, tmp_path: Path) -> None:
    """init_weights true: the rows start as the current ones (the identity); false or null (PEFT's truth test):
    standard normals (PEFT's torch.randn, here from Keras' generator), as the torch backend. Both had copied the rows."""
    model = keras_model("llama", checkpoints["llama"])
    indices = [1, 5, 9, 11]
    adapterspec.inject_adapter(model, {"peft_type": "TRAINABLE_TOKENS", "token_indices": indices,
                                       "init_weights": init})
    adapterspec.save_adapter(model, tmp_path / "new")
    (rows,) = adapterspec.read_adapter(tmp_path / "new").load_tensors("numpy").values()
    base = np.asarray(model.backbone.token_embedding.embeddings)[indices]
    if init:
        assert np.array_equal(rows, base)
    else:
        assert rows.shape == base.shape and not np.allclose(rows, base)
        assert 0.5 < float(rows.std()) < 1.5  # N(0, 1) rows, not the small base embeddings
