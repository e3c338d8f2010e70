"""Prompt tuning on keras-hub causal LMs (the prompt run through the decoder as a computed prefix), and prefix
tuning on the Gemma family: PEFT's logits (with left padding, past Gemma 3's sliding window), PEFT's greedy
tokens from ``generate()``, training with ``fit`` and loading the result in PEFT, switching between a prompt
and a prefix, and clear refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import keras  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import adapterspec  # noqa: E402
from keras_helpers import (  # noqa: E402
    ARCHS,
    assert_near,
    assert_same_snapshot,
    hf_model,
    keras_inputs,
    keras_logits,
    keras_model,
    snapshot,
    torch_logits,
    unique_values,
)

NVT = 3


@pytest.fixture(scope="module")
def long_ids() -> np.ndarray:
    """2 x 20 token ids: with the 3 virtual tokens longer than Gemma 3's sliding window (16)."""
    return (np.arange(2 * 20).reshape(2, 20) * 7 + 3) % ARCHS["llama"].vocab


def _peft(folder: Path, config: Any, out: Path, salt: int) -> Any:
    pm = peft.get_peft_model(hf_model(folder), config)
    with torch.no_grad():
        weight = pm.prompt_encoder["default"].embedding.weight
        weight.copy_(torch.from_numpy(unique_values(tuple(weight.shape), salt, scale=1.0)))
    pm.eval()
    pm.save_pretrained(out)
    return pm


def _prompt_config(nvt: int = NVT) -> Any:
    return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=nvt)


def _prefix_config(nvt: int = NVT) -> Any:
    return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=nvt)


def _peft_logits(pm: Any, ids: np.ndarray, padding: np.ndarray | None = None, skip: int = 0) -> np.ndarray:
    kwargs = {} if padding is None else {"attention_mask": torch.from_numpy(padding)}
    with torch.no_grad():
        return pm(input_ids=torch.from_numpy(np.asarray(ids, np.int64)), **kwargs).logits.numpy()[:, skip:]


def _check_against_peft(arch: str, pm: Any, folder: Path, ids: np.ndarray, checkpoints: Any, skip: int) -> Any:
    """Load ``folder`` into a fresh keras-hub model; its logits must be PEFT's (padded and not); returns the model."""
    padding = np.ones_like(ids)
    padding[1, :4] = 0  # left padding on the second row
    model = keras_model(arch, checkpoints[arch])
    before = snapshot(model)
    base = keras_logits(model, ids)
    assert adapterspec.load_adapter(model, folder) == []
    got = keras.ops.convert_to_numpy(model({"token_ids": ids.astype("int32"), "padding_mask": padding.astype("int32")}))
    assert got.shape == (*ids.shape, ARCHS[arch].vocab)
    assert_near(got, _peft_logits(pm, ids, padding, skip), mask=padding.astype(bool))
    assert_near(keras_logits(model, ids), _peft_logits(pm, ids, skip=skip))
    assert np.abs(keras_logits(model, ids) - base).max() > 1e-2  # the adapter does something
    adapterspec.delete_adapter(model, "default")
    assert_same_snapshot(before, snapshot(model))
    assert np.abs(keras_logits(model, ids) - base).max() == 0
    return model


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma", "gemma3_text"])
def test_peft_prompt_tuning_gives_peft_logits(arch: str, checkpoints: Any, long_ids: np.ndarray, tmp_path: Path) -> None:
    """Keras returns the real tokens' logits: PEFT's ``logits[:, num_virtual_tokens:]``."""
    pm = _peft(checkpoints[arch], _prompt_config(), tmp_path / "prompt", salt=7)
    assert _peft_logits(pm, long_ids).shape[1] == NVT + long_ids.shape[1]
    _check_against_peft(arch, pm, tmp_path / "prompt", long_ids, checkpoints, skip=NVT)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_prompt_tuning_init_as_the_enums_str_loads_as_in_peft(checkpoints: Any, long_ids: np.ndarray,
                                                              tmp_path: Path) -> None:
    """A published tutorial config has "prompt_tuning_init": "PromptTuningInit.TEXT" (the str() of PEFT's enum): PEFT
    loads it (the field only matters at initialisation, where any value but exactly TEXT / SAMPLE_VOCAB is random).
    It was a ConfigError ("is not one of ['RANDOM', 'SAMPLE_VOCAB', 'TEXT']"); a fresh one was refused."""
    import json

    _peft(checkpoints["llama"], _prompt_config(), tmp_path / "prompt", salt=7)
    path = tmp_path / "prompt" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prompt_tuning_init": "PromptTuningInit.TEXT",
                                "prompt_tuning_init_text": "Classify:"}))
    pm = peft.PeftModel.from_pretrained(hf_model(checkpoints["llama"]), tmp_path / "prompt").eval()
    _check_against_peft("llama", pm, tmp_path / "prompt", long_ids, checkpoints, skip=NVT)
    model = keras_model("llama", checkpoints["llama"])
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2, "token_dim": 64,
              "prompt_tuning_init": "PromptTuningInit.TEXT"}
    adapterspec.inject_adapter(model, config)  # random, as PEFT initialises it
    assert adapterspec.save_adapter(model, tmp_path / "ours") is not None
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["prompt_tuning_init"] == "PromptTuningInit.TEXT"  # kept as given, as PEFT keeps it


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3_text"])
def test_peft_prefix_on_gemma_gives_peft_logits(arch: str, checkpoints: Any, long_ids: np.ndarray,
                                                tmp_path: Path) -> None:
    """Gemma 1/2 keep their keys with the rotary halves interleaved: the prefix's keys must be too."""
    pm = _peft(checkpoints[arch], _prefix_config(), tmp_path / "prefix", salt=11)
    _check_against_peft(arch, pm, tmp_path / "prefix", long_ids, checkpoints, skip=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("arch", "method"), [("llama", "prefix"), ("llama", "prompt"), ("gpt2", "prompt")])
def test_greedy_generation_gives_peft_tokens(arch: str, method: str, checkpoints: Any, tmp_path: Path) -> None:
    """``generate()`` (keras-hub's cached decoding) with a prefix/prompt active: PEFT's greedy tokens."""
    config = _prompt_config() if method == "prompt" else _prefix_config()
    pm = _peft(checkpoints[arch], config, tmp_path / method, salt=19)
    pm.generation_config.eos_token_id = None  # run all steps, as Keras does with stop_token_ids=None
    ids = (np.arange(2 * 6).reshape(2, 6) * 7 + 3) % ARCHS[arch].vocab
    with torch.no_grad():
        expected = pm.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(2, 6, dtype=torch.long),
                               max_new_tokens=6, do_sample=False, pad_token_id=0).numpy()[:, -12:]
    model = keras_model(arch, checkpoints[arch])
    model.compile(sampler="greedy")
    inputs = {"token_ids": np.pad(ids, ((0, 0), (0, 6))).astype("int32"),
              "padding_mask": np.pad(np.ones_like(ids), ((0, 0), (0, 6))).astype("int32")}
    base = np.asarray(model.generate(inputs, stop_token_ids=None)["token_ids"])
    adapterspec.load_adapter(model, tmp_path / method)
    got = np.asarray(model.generate(inputs, stop_token_ids=None)["token_ids"])
    np.testing.assert_array_equal(got, expected)
    assert (got != base).any()  # the adapter steers generation


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_prompt_trained_with_fit_loads_in_peft(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    model = keras_model("gemma", checkpoints["gemma"])
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "token_dim": 64,
              "num_layers": 2, "num_attention_heads": 4}
    adapterspec.inject_adapter(model, config, trainable=True)
    assert [v.path.rsplit("/", 1)[-1] for v in model.trainable_variables] == ["prompt_embeddings_0"]
    start = keras.ops.convert_to_numpy(model.trainable_variables[0]).copy()
    frozen = [(v.path, keras.ops.convert_to_numpy(v).copy()) for v in model.non_trainable_variables]
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    model.fit(keras_inputs(token_ids), np.roll(token_ids, -1, axis=1), epochs=2, batch_size=2, verbose=0)
    trained = keras.ops.convert_to_numpy(model.trainable_variables[0])
    assert np.abs(trained - start).max() > 0  # it trained
    assert [(p, v.tolist()) for p, v in frozen] == \
        [(v.path, keras.ops.convert_to_numpy(v).tolist()) for v in model.non_trainable_variables]

    saved = adapterspec.save_adapter(model, tmp_path / "keras-prompt")
    tensors = load_file(str(saved / "adapter_model.safetensors"))
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].shape == (4, 64)
    np.testing.assert_array_equal(tensors["prompt_embeddings"], trained[0])
    reloaded = peft.PeftModel.from_pretrained(hf_model(checkpoints["gemma"]), saved).eval()
    result = reloaded.load_adapter(saved, adapter_name="again")
    # PEFT loads prompt_embeddings by its own path and reports it as "unexpected" for its own folders too
    assert result.missing_keys == [] and result.unexpected_keys in ([], ["prompt_embeddings"])
    np.testing.assert_array_equal(reloaded.prompt_encoder["default"].embedding.weight.detach().numpy(), trained[0])
    assert_near(keras_logits(model, token_ids), torch_logits(reloaded, token_ids)[:, 4:])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_switching_between_a_prompt_and_a_prefix(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    prompt = _peft(checkpoints["llama"], _prompt_config(2), tmp_path / "prompt", salt=13)
    prefix = _peft(checkpoints["llama"], _prefix_config(4), tmp_path / "prefix", salt=17)
    model = keras_model("llama", checkpoints["llama"])
    base = keras_logits(model, token_ids)
    adapterspec.load_adapter(model, tmp_path / "prompt", adapter_name="prompt")
    adapterspec.load_adapter(model, tmp_path / "prefix", adapter_name="prefix")
    for _ in range(2):
        adapterspec.set_active_adapters(model, "prompt")
        assert_near(keras_logits(model, token_ids), _peft_logits(prompt, token_ids, skip=2))
        adapterspec.set_active_adapters(model, "prefix")
        assert_near(keras_logits(model, token_ids), _peft_logits(prefix, token_ids))
    with adapterspec.disabled_adapters(model):
        assert np.abs(keras_logits(model, token_ids) - base).max() == 0
    adapterspec.delete_adapter(model, "prefix")
    adapterspec.set_active_adapters(model, "prompt")
    assert_near(keras_logits(model, token_ids), _peft_logits(prompt, token_ids, skip=2))


def test_prompt_tuning_is_refused_where_it_cannot_be_exact(checkpoints: Any) -> None:
    import keras_hub

    backbone = keras_hub.models.Phi3Backbone(vocabulary_size=32, num_layers=2, hidden_dim=16, intermediate_dim=32,
                                             num_query_heads=2, num_key_value_heads=2)
    phi3 = keras_hub.models.Phi3CausalLM(backbone=backbone, preprocessor=None)  # attention_cache: no interface
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2, "token_dim": 16}
    before = snapshot(phi3)
    with pytest.raises(adapterspec.UnsupportedError, match="Phi3Decoder"):
        adapterspec.inject_adapter(phi3, config)
    assert_same_snapshot(before, snapshot(phi3))

    llama = keras_model("llama", checkpoints["llama"])
    before = snapshot(llama)
    with pytest.raises(adapterspec.UnsupportedError, match="hidden size 64") as info:
        adapterspec.inject_adapter(llama, config)
    assert info.value.pointer == "/token_dim"
    text = dict(config, token_dim=64, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi",
                tokenizer_name_or_path="t")
    with pytest.raises(adapterspec.UnsupportedError, match="tokenizer"):
        adapterspec.inject_adapter(llama, text)
    with pytest.raises(adapterspec.UnsupportedError, match="encoder-decoder"):
        adapterspec.inject_adapter(llama, dict(config, token_dim=64, num_transformer_submodules=2))
    assert_same_snapshot(before, snapshot(llama))


def _p_tuning_peft(folder: Path, encoder: str, out: Path, salt: int) -> Any:
    """PEFT's P-tuning model, its virtual-token embedding element-unique, saved (the file holds the encoder's output)."""
    config = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=NVT, encoder_hidden_size=16,
                                      encoder_reparameterization_type=encoder)
    return _peft(folder, config, out, salt)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_p_tuning_gives_peft_logits_and_round_trips(arch: str, encoder: str, checkpoints: Any,
                                                         long_ids: np.ndarray, tmp_path: Path) -> None:
    """P-tuning (SPEC.md 15.8): the file holds the prompt encoder's output, used as prompt tuning's prompt.
    PEFT's folder gives PEFT's logits (the real tokens'); our save is PEFT's file bit for bit, and loads in
    PEFT with no missing/unexpected keys and the same logits."""
    pm = _p_tuning_peft(checkpoints[arch], encoder, tmp_path / "peft", salt=23)
    peft_file = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    encoder_module = pm.prompt_encoder["default"]
    with torch.no_grad():  # the file is head(E), not E (PEFT's LSTM run while saving rounds differently, ~1e-8)
        encoded = encoder_module(torch.arange(NVT)[None])[0].numpy()
    np.testing.assert_allclose(peft_file["prompt_embeddings"], encoded, rtol=0, atol=1e-6)
    assert np.abs(peft_file["prompt_embeddings"] - encoder_module.embedding.weight.detach().numpy()).max() > 1e-2
    model = _check_against_peft(arch, pm, tmp_path / "peft", long_ids, checkpoints, skip=NVT)

    adapterspec.load_adapter(model, tmp_path / "peft")
    saved = adapterspec.save_adapter(model, tmp_path / "ours")
    ours = load_file(str(saved / "adapter_model.safetensors"))
    assert list(ours) == ["prompt_embeddings"]
    np.testing.assert_array_equal(ours["prompt_embeddings"], peft_file["prompt_embeddings"])  # bit-exact
    written, peft_config = adapterspec.read_adapter(saved).config, adapterspec.read_adapter(tmp_path / "peft").config
    for key in ("peft_type", "encoder_reparameterization_type", "encoder_hidden_size", "num_virtual_tokens",
                "token_dim", "num_layers", "num_attention_heads"):
        assert written.get(key) == peft_config.get(key), key
    reloaded = peft.PeftModel.from_pretrained(hf_model(checkpoints[arch]), saved).eval()
    result = reloaded.load_adapter(saved, adapter_name="again")
    # PEFT loads prompt_embeddings by its own path and reports it as "unexpected" for its own folders too
    assert result.missing_keys == [] and result.unexpected_keys in ([], ["prompt_embeddings"])
    got = keras_logits(model, long_ids)
    assert_near(got, _peft_logits(reloaded, long_ids, skip=NVT))
    assert_near(_peft_logits(reloaded, long_ids), _peft_logits(pm, long_ids))
    with torch.no_grad():
        base = pm.get_base_model()(input_ids=torch.from_numpy(np.asarray(long_ids, np.int64))).logits.numpy()
    with adapterspec.disabled_adapters(model):
        conversion = float(np.abs(keras_logits(model, long_ids) - base).max())
    print(f"{arch} {encoder}: max abs diff vs PEFT {np.abs(got - _peft_logits(pm, long_ids, skip=NVT)).max():.2g}, "
          f"base conversion error {conversion:.2g}")


def test_fresh_p_tuning_is_refused_on_keras(checkpoints: Any) -> None:
    """A fresh P-tuning adapter would need PEFT's prompt encoder, which the file does not carry: a typed refusal
    naming ``/peft_type``, the model unchanged (a saved one loads: the test above)."""
    llama = keras_model("llama", checkpoints["llama"])
    before = snapshot(llama)
    config = {"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2, "token_dim": 64}
    with pytest.raises(adapterspec.UnsupportedError, match="prompt encoder") as info:
        adapterspec.inject_adapter(llama, config)
    assert info.value.pointer == "/peft_type"
    assert adapterspec.adapter_names(llama) == []
    assert_same_snapshot(before, snapshot(llama))


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "PREFIX_TUNING"])
def test_classification_prompt_learning_is_refused_on_keras(checkpoints: Any, peft_type: str) -> None:
    """A prompt adapter with its classifier head saved whole (SPEC.md 15.9) is torch-only: a typed refusal."""
    llama = keras_model("llama", checkpoints["llama"])
    before = snapshot(llama)
    config = {"peft_type": peft_type, "task_type": "SEQ_CLS", "num_virtual_tokens": 2,
              "modules_to_save": ["classifier", "score"]}
    with pytest.raises(adapterspec.UnsupportedError, match="classifier head") as info:
        adapterspec.inject_adapter(llama, config)
    assert info.value.pointer == "/task_type"
    assert_same_snapshot(before, snapshot(llama))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_loaded_p_tuning_prompt_trains_with_fit_and_loads_in_peft(checkpoints: Any, token_ids: np.ndarray,
                                                                   tmp_path: Path) -> None:
    """A loaded P-tuning adapter trains its prompt (the encoder's output; the encoder is not in the file) and saves
    as P-tuning, which PEFT loads with the trained prompt and Keras' logits."""
    _p_tuning_peft(checkpoints["llama"], "MLP", tmp_path / "peft", salt=29)
    model = keras_model("llama", checkpoints["llama"])
    adapterspec.load_adapter(model, tmp_path / "peft", trainable=True)
    assert [v.path.rsplit("/", 1)[-1] for v in model.trainable_variables] == ["prompt_embeddings_0"]
    start = keras.ops.convert_to_numpy(model.trainable_variables[0]).copy()
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    model.fit(keras_inputs(token_ids), np.roll(token_ids, -1, axis=1), epochs=2, batch_size=2, verbose=0)
    trained = keras.ops.convert_to_numpy(model.trainable_variables[0])
    assert np.abs(trained - start).max() > 0  # it trained

    saved = adapterspec.save_adapter(model, tmp_path / "keras-p-tuning")
    assert adapterspec.read_adapter(saved).config["peft_type"] == "P_TUNING"
    tensors = load_file(str(saved / "adapter_model.safetensors"))
    assert list(tensors) == ["prompt_embeddings"]
    np.testing.assert_array_equal(tensors["prompt_embeddings"], trained[0])
    reloaded = peft.PeftModel.from_pretrained(hf_model(checkpoints["llama"]), saved).eval()
    np.testing.assert_array_equal(reloaded.prompt_encoder["default"].embedding.weight.detach().numpy(), trained[0])
    assert_near(keras_logits(model, token_ids), torch_logits(reloaded, token_ids)[:, NVT:])
