"""Auxiliary tensors on Keras (SPEC.md 5.3, 8.8): base tensors a PEFT file replaces, compared with PEFT itself.

Trained biases (``bias="lora_only"``: ``<m>.base_layer.bias``; ``bias="all"``: also ``<m>.bias`` of every module,
GPT-2's layer norms and its fused ``c_attn`` split by keras-hub over three layers) and an embedding saved whole
(PEFT's ``save_embedding_layers=True``; Gemma's tied ``lm_head``, Llama's untied one, an adapted ``lm_head``): Keras
gives PEFT's logits, saves PEFT's tensors (PEFT loads them with no missing/unexpected key and no warning), deleting
the adapter gives every variable back bit for bit, two adapters stack as on torch, a bad file changes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from keras_helpers import (  # noqa: E402
    assert_near,
    assert_peft_close,
    assert_refused_unchanged,
    fill_adapter_weights,
    hf_model,
    keras_logits,
    keras_model,
    peft_load_exactly,
    torch_logits,
    unique_values,
)


def _peft_adapter(checkpoint: Path, out: Path, config: Any, *, salt: int = 0, embeddings: bool = False) -> Any:
    """A PEFT LoRA with element-unique adapter values, trained biases (every bias PEFT trains) and, with
    ``embeddings``, a trained input (and untied output) embedding saved whole (only the adapted one where one is
    adapted, as PEFT saves); saved to ``out``."""
    import torch

    model = peft.get_peft_model(hf_model(checkpoint), config)
    fill_adapter_weights(model, salt=salt)
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(model.named_parameters())):
            if param.requires_grad and name.endswith("bias") and "lora_" not in name:
                param.copy_(torch.from_numpy(unique_values(tuple(param.shape), salt + 100 + index, scale=0.5)))
        if embeddings:
            base = model.get_base_model()
            layers = list(dict.fromkeys([base.get_input_embeddings(), base.get_output_embeddings()]))
            targeted = any(hasattr(layer, "base_layer") for layer in layers)
            for index, layer in enumerate(layers):
                if targeted and not hasattr(layer, "base_layer"):  # PEFT saves only the adapted one then
                    continue
                weight = getattr(layer, "base_layer", layer).weight
                weight.copy_(weight + torch.from_numpy(unique_values(tuple(weight.shape), salt + 7 * index, scale=0.3)))
    model.eval()
    model.save_pretrained(out, save_embedding_layers=embeddings)
    return model


def _peft_load(checkpoint: Path, folder: Path, embeddings: bool) -> tuple[Any, list[str]]:
    """PEFT loads ``folder`` with no missing or unexpected key (its state dict, embeddings included when saved whole,
    is the file's, tensor for tensor); the model and PEFT's warnings (deprecation notices aside)."""
    if not embeddings:
        return peft_load_exactly(checkpoint, folder)
    import warnings

    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf_model(checkpoint), folder).eval()
    state = get_peft_model_state_dict(model, save_embedding_layers=True)
    stored = load_file(folder / "adapter_model.safetensors")
    assert sorted(state) == sorted(stored)
    for key, tensor in stored.items():
        assert torch.equal(state[key], tensor), key
    return model, sorted({str(w.message) for w in caught
                          if not issubclass(w.category, (FutureWarning, DeprecationWarning))})


def _values(model: Any) -> dict[str, np.ndarray]:
    return {v.path: np.array(v.numpy()) for v in model.variables}


def _assert_values(model: Any, values: dict[str, np.ndarray]) -> None:
    now = _values(model)
    assert sorted(now) == sorted(values)
    for path, value in values.items():
        assert np.array_equal(now[path], value), path


CASES = {
    # q/k/v have biases, o_proj none: only the q_proj biases are trained and saved
    "qwen2-lora-only": ("qwen2", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                                         bias="lora_only"), False),
    # every bias: c_attn's (split over query/key/value layers by keras-hub), c_proj, c_fc, the layer norms'
    "gpt2-all": ("gpt2", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], bias="all"),
                 False),
    "qwen2-all": ("qwen2", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], bias="all"), False),
    # with a module saved whole: PEFT's bookkeeping copies <m>.modules_to_save.bias and <m>.original_module.bias
    # are saved again (before: dropped, and PEFT's load of our folder missed them)
    "gpt2-all-with-saved-norm": ("gpt2", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                                 modules_to_save=["ln_f"], bias="all"), False),
    # tied embed_tokens / lm_head: both keys, one matrix
    "gemma-embeddings-whole": ("gemma", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), True),
    "llama-embeddings-whole": ("llama", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), True),
    # GPT-2's tied transformer.wte / lm_head: saved whole under the model's own names (SPEC 5.4 step 4)
    "gpt2-embeddings-whole": ("gpt2", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]), True),
    # lm_head adapted (its base_layer.weight), embed_tokens saved whole
    "llama-lm-head-targeted": ("llama", lambda: peft.LoraConfig(r=4, lora_alpha=8,
                                                                target_modules=["q_proj", "lm_head"]), True),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_auxiliary_tensors_give_peft_logits_both_ways(case: str, checkpoints: Any, token_ids: np.ndarray,
                                                           tmp_path: Path) -> None:
    arch, make_config, embeddings = CASES[case]
    folder = tmp_path / "peft"
    peft_model = _peft_adapter(checkpoints[arch], folder, make_config(), embeddings=embeddings)
    stored = adapterspec.read_adapter(folder)
    aux = [k for k in stored.tensors if "lora_" not in k]
    assert aux  # the file holds auxiliary tensors
    expected = torch_logits(peft_model, token_ids)
    base_torch = torch_logits(hf_model(checkpoints[arch]), token_ids)
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, token_ids)
    values = _values(model)

    adapterspec.load_adapter(model, folder)
    got = keras_logits(model, token_ids)
    assert_peft_close(got, expected, base, base_torch)
    with peft_model.disable_adapter():  # the replaced tensors stay in place without the adapter, as in PEFT
        without = torch_logits(peft_model, token_ids)
    assert np.abs(without - base_torch).max() > 1e-2  # ... and they matter
    with adapterspec.disabled_adapters(model):
        assert_peft_close(keras_logits(model, token_ids), without, base, base_torch)

    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    ours, theirs = adapterspec.read_adapter(saved).load_tensors("numpy"), stored.load_tensors("numpy")
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert np.array_equal(ours[key], tensor), key
    _, said = _peft_load(checkpoints[arch], folder, embeddings)  # the premise: PEFT's own folder loads so
    assert said == []
    reloaded, said = _peft_load(checkpoints[arch], saved, embeddings)
    assert said == []
    assert_near(torch_logits(reloaded, token_ids), expected)

    adapterspec.delete_adapter(model, "default")  # every variable as it was, bit for bit
    _assert_values(model, values)
    assert np.array_equal(keras_logits(model, token_ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tied_embedding_stays_tied(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """Gemma's lm_head is the embedding matrix: a file whose two keys differ takes the last one for both (as PEFT's
    load_state_dict leaves a tied pair), and the Keras model keeps one matrix."""
    from safetensors.numpy import load_file, save_file

    _peft_adapter(checkpoints["gemma"], tmp_path / "peft", CASES["gemma-embeddings-whole"][1](), embeddings=True)
    file = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(file)
    assert np.array_equal(tensors["base_model.model.lm_head.weight"],
                          tensors["base_model.model.model.embed_tokens.weight"])
    model = keras_model("gemma", checkpoints["gemma"])
    embedding = model.backbone.token_embedding
    assert embedding.tie_weights
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert np.array_equal(embedding.embeddings.numpy(), tensors["base_model.model.model.embed_tokens.weight"])
    assert len([v for v in model.variables if "embeddings" in v.path]) == 1


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("first_deleted", ["a", "b"])
def test_two_adapters_stack_as_on_torch(first_deleted: str, checkpoints: Any, token_ids: np.ndarray,
                                        tmp_path: Path) -> None:
    """Two adapters each with the embeddings saved whole (PEFT refuses two adapters with trained biases): the later
    one's matrices are in place whichever is active, as in PEFT; deleting either leaves the other's; deleting both
    gives the base back."""
    config = CASES["llama-embeddings-whole"][1]
    peft_a = _peft_adapter(checkpoints["llama"], tmp_path / "a", config(), salt=0, embeddings=True)
    _peft_adapter(checkpoints["llama"], tmp_path / "b", config(), salt=50, embeddings=True)
    peft_a.load_adapter(str(tmp_path / "b"), adapter_name="b")
    model = keras_model("llama", checkpoints["llama"])
    values = _values(model)
    adapterspec.load_adapter(model, tmp_path / "a", adapter_name="a")
    with_a = _values(model)
    adapterspec.load_adapter(model, tmp_path / "b", adapter_name="b")
    with_b = _values(model)
    for name in ("a", "b"):
        peft_a.set_adapter("default" if name == "a" else name)
        adapterspec.set_active_adapters(model, [name])
        assert_near(keras_logits(model, token_ids), torch_logits(peft_a, token_ids))
    changed = [p for p in values if not np.array_equal(values[p], with_a[p])]
    assert len(changed) == 2 and all(not np.array_equal(with_a[p], with_b[p]) for p in changed)

    adapterspec.delete_adapter(model, first_deleted)
    other = "b" if first_deleted == "a" else "a"
    for path in changed:  # b's stay (deleting a) or a's come back (deleting b)
        assert np.array_equal(_values(model)[path], with_b[path] if other == "b" else with_a[path]), path
    saved = adapterspec.save_adapter(model, tmp_path / "saved", adapter_name=other)
    ours = adapterspec.read_adapter(saved).load_tensors("numpy")
    theirs = adapterspec.read_adapter(tmp_path / other).load_tensors("numpy")
    assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    adapterspec.delete_adapter(model, other)
    _assert_values(model, values)


def _edit(folder: Path, edit: Any) -> Path:
    from safetensors.numpy import load_file, save_file

    file = folder / "adapter_model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return folder


_BIAS = "base_model.model.transformer.h.0.mlp.c_proj.bias"
_EMBED = "base_model.model.model.embed_tokens.weight"

BAD = {
    "bias-wrong-shape": ("gpt2", lambda t: t.update({_BIAS: t[_BIAS][:10]}), adapterspec.ShapeMismatchError,
                         "does not fit the bias"),
    "bias-of-no-module": ("gpt2", lambda t: t.update({"base_model.model.transformer.h.9.mlp.c_proj.bias": t[_BIAS]}),
                          adapterspec.TargetNotFoundError, "h.9.mlp.c_proj"),
    "base-layer-bias-not-adapted": ("gpt2", lambda t: t.update(
        {"base_model.model.transformer.h.0.mlp.c_proj.base_layer.bias": t[_BIAS]}),
        adapterspec.UnexpectedTensorError, "which has no adapter"),
    # <m>.weight of a module that is not the model's input or output embedding (SPEC 5.4 step 4)
    "not-an-embedding": ("llama", lambda t: t.update({"base_model.model.model.layers.0.input_layernorm.weight":
                                                      t[_EMBED][0] * 0.5}),
                         adapterspec.UnexpectedTensorError, "check it with the model"),  # read_adapter's error
    "resized-vocabulary": ("llama", lambda t: t.update({_EMBED: np.concatenate([t[_EMBED], t[_EMBED][:3]])}),
                           adapterspec.ShapeMismatchError, "keras-hub models cannot be resized"),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_auxiliary_tensor_is_refused_and_changes_nothing(case: str, checkpoints: Any, tmp_path: Path) -> None:
    arch, edit, error, needle = BAD[case]
    config = CASES["gpt2-all"][1]() if arch == "gpt2" else CASES["llama-embeddings-whole"][1]()
    _peft_adapter(checkpoints[arch], tmp_path / "peft", config, embeddings=arch == "llama")
    folder = _edit(tmp_path / "peft", edit)
    model = keras_model(arch, checkpoints[arch])
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, folder), error, needle)
    # with another adapter loaded already, its replacements stay as they were too
    good = tmp_path / "good"
    _peft_adapter(checkpoints[arch], good, config, salt=3, embeddings=arch == "llama")
    adapterspec.load_adapter(model, good, adapter_name="good")
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, folder), error, needle)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_training_biases_is_refused_naming_the_field(bias: str, checkpoints: Any) -> None:
    """PEFT trains the biases ``bias`` names; the Keras backend keeps them frozen, so it refuses rather than train an
    adapter that PEFT would train differently (before: the biases silently stayed frozen and were not saved)."""
    model = keras_model("qwen2", checkpoints["qwen2"])
    config = {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "bias": bias}
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(model, config, trainable=True),
                             adapterspec.UnsupportedError, "/bias")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fingerprint_describes_the_base_not_a_replaced_embedding(checkpoints: Any, tmp_path: Path) -> None:
    """An adapter on lm_head injected after another adapter's file replaced lm_head's matrix records the base's
    fingerprint (SPEC.md 9.1), as on the pristine model: the file's matrix is not the base's."""
    _peft_adapter(checkpoints["llama"], tmp_path / "peft", CASES["llama-embeddings-whole"][1](), embeddings=True)
    config = {"peft_type": "LORA", "r": 2, "target_modules": ["lm_head"]}
    pristine = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(pristine, config, "b", trainable=False)
    model = keras_model("llama", checkpoints["llama"])
    adapterspec.load_adapter(model, tmp_path / "peft")
    adapterspec.inject_adapter(model, config, "b", trainable=False)
    from adapterspec_keras.identity import base_identity

    expected = base_identity(pristine, "b")["fingerprint"]
    assert base_identity(model, "b")["fingerprint"] == expected


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unload_merge_keeps_the_biases_as_peft_merge_and_unload(checkpoints: Any, token_ids: np.ndarray,
                                                               tmp_path: Path) -> None:
    """``unload(merge=True)`` deletes the adapter with its delta merged: the trained biases stay, as after PEFT's
    ``merge_and_unload``."""
    peft_model = _peft_adapter(checkpoints["gpt2"], tmp_path / "peft", CASES["gpt2-all"][1]())
    expected = torch_logits(peft_model.merge_and_unload(), token_ids)
    model = keras_model("gpt2", checkpoints["gpt2"])
    adapterspec.load_adapter(model, tmp_path / "peft")
    adapterspec.unload(model, merge=True)
    assert adapterspec.adapter_names(model) == []
    assert_near(keras_logits(model, token_ids), expected)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random transformers ``BertModel`` as keras-hub's converter reads it (tanh-GELU, as keras-hub's)."""
    import torch
    import transformers

    from keras_helpers import save_for_keras_hub

    torch.manual_seed(6)
    config = transformers.AutoConfig.for_model("bert", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, vocab_size=128, max_position_embeddings=64,
                                               hidden_act="gelu_pytorch_tanh")
    return save_for_keras_hub(transformers.AutoModel.from_config(config).eval(), tmp_path_factory.mktemp("bert"))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bert_word_embeddings_saved_whole(bert: Path, token_ids: np.ndarray, tmp_path: Path) -> None:
    """BERT's input embedding ``embeddings.word_embeddings`` saved whole (PEFT's ``save_embedding_layers=True``,
    keyed by the model's own name, SPEC 5.4 step 4): keras-hub's BERT gives PEFT's hidden states, saves PEFT's
    tensors back (PEFT loads them with nothing missing or unexpected), and deleting gives every variable back."""
    import keras_hub
    import torch
    import transformers
    from keras import ops

    def load_bert() -> Any:
        return transformers.AutoModel.from_pretrained(bert).eval()

    def hidden(torch_model: Any) -> np.ndarray:
        ids = torch.from_numpy(token_ids.astype(np.int64))
        with torch.no_grad():
            return torch_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.numpy()

    def keras_hidden(model: Any) -> np.ndarray:
        inputs = {"token_ids": token_ids.astype("int32"), "padding_mask": np.ones_like(token_ids, dtype="int32"),
                  "segment_ids": np.zeros_like(token_ids, dtype="int32")}
        return np.asarray(ops.convert_to_numpy(model(inputs)["sequence_output"]))

    peft_model = peft.get_peft_model(load_bert(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    fill_adapter_weights(peft_model)
    with torch.no_grad():
        weight = peft_model.get_base_model().get_input_embeddings().weight
        weight.copy_(weight + torch.from_numpy(unique_values(tuple(weight.shape), 11, scale=0.3)))
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    stored = adapterspec.read_adapter(tmp_path / "peft")
    assert [k for k in stored.tensors if "lora_" not in k] == ["base_model.model.embeddings.word_embeddings.weight"]
    expected = hidden(peft_model)
    with peft_model.disable_adapter():
        without = hidden(peft_model)  # the embedding stays replaced without the adapter, as in PEFT
    base_torch = hidden(load_bert())
    model = keras_hub.models.Backbone.from_preset(str(bert))
    values = _values(model)
    base = keras_hidden(model)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_peft_close(keras_hidden(model), expected, base, base_torch)
    with adapterspec.disabled_adapters(model):
        assert_peft_close(keras_hidden(model), without, base, base_torch)
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    ours, theirs = adapterspec.read_adapter(saved).load_tensors("numpy"), stored.load_tensors("numpy")
    assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    loaded = peft.PeftModel.from_pretrained(load_bert(), saved).eval()
    state = peft.utils.get_peft_model_state_dict(loaded, save_embedding_layers=True)
    assert sorted(state) == sorted(theirs) and all(np.array_equal(state[k].numpy(), theirs[k]) for k in theirs)
    assert_near(hidden(loaded), expected)


FRESH = {
    "qwen2-lora-only": ("qwen2", {"target_modules": ["q_proj", "o_proj"], "bias": "lora_only"}),
    "gpt2-all": ("gpt2", {"target_modules": ["c_attn", "c_fc"], "bias": "all", "fan_in_fan_out": True}),
    "qwen2-all": ("qwen2", {"target_modules": ["o_proj"], "bias": "all"}),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(FRESH))
def test_a_fresh_inject_saves_the_biases_peft_saves(case: str, checkpoints: Any, token_ids: np.ndarray,
                                                     tmp_path: Path) -> None:
    """A fresh (untrained) inject with ``bias`` saves the keys PEFT's save of the same fresh config writes, the
    biases bit-identical to PEFT's (the base's), and PEFT loads the folder with no missing/unexpected key and no
    warning (before: no bias tensor was saved, 0 of PEFT's bias keys)."""
    from safetensors.numpy import load_file

    arch, fields = FRESH[case]
    config = peft.LoraConfig(r=4, lora_alpha=8, **fields)
    reference = peft.get_peft_model(hf_model(checkpoints[arch]), config)
    reference.save_pretrained(tmp_path / "peft")
    expected = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert any(key.endswith(".bias") for key in expected)
    model = keras_model(arch, checkpoints[arch])
    values, base = _values(model), keras_logits(model, token_ids)
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, **fields}, trainable=False)
    adapterspec.save_adapter(model, tmp_path / "keras")
    ours = load_file(tmp_path / "keras" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(expected)
    for key in expected:
        if key.endswith(".bias"):
            assert ours[key].dtype == expected[key].dtype and np.array_equal(ours[key], expected[key]), key
    loaded, said = peft_load_exactly(checkpoints[arch], tmp_path / "keras")
    assert said == []
    assert_peft_close(keras_logits(model, token_ids), torch_logits(loaded, token_ids), base,
                      torch_logits(hf_model(checkpoints[arch]), token_ids))
    adapterspec.delete_adapter(model, "default")
    _assert_values(model, values)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_velora_state_is_kept_as_on_torch(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """VeLoRA's ``lora_velora_embed`` (SPEC.md 5.2): accepted, never used in the math, saved again as the file had
    it (a real config from PEFT's method comparison was refused with UnexpectedTensorError); one on a module
    without an adapter is still refused, changing nothing."""
    import torch

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                             velora_config={"num_groups": 4})
    peft_model = peft.get_peft_model(hf_model(checkpoints["llama"]), config)
    fill_adapter_weights(peft_model)
    with torch.no_grad():
        states = [b for n, b in sorted(peft_model.named_buffers()) if "lora_velora_embed" in n]
        for index, buffer in enumerate(states):
            buffer.copy_(torch.from_numpy(unique_values(tuple(buffer.shape), 40 + index)))
    assert states
    folder = tmp_path / "peft"
    peft_model.eval().save_pretrained(folder)
    stored = adapterspec.read_adapter(folder).load_tensors("numpy")
    velora = sorted(k for k in stored if k.endswith(".lora_velora_embed"))
    assert len(velora) == 4  # q_proj and down_proj of both layers

    model = keras_model("llama", checkpoints["llama"])
    base = keras_logits(model, token_ids)
    values = _values(model)
    adapterspec.load_adapter(model, folder)
    assert_peft_close(keras_logits(model, token_ids), torch_logits(peft_model, token_ids), base,
                      torch_logits(hf_model(checkpoints["llama"]), token_ids))
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    ours = adapterspec.read_adapter(saved).load_tensors("numpy")
    assert sorted(ours) == sorted(stored)
    for key, tensor in stored.items():
        assert np.array_equal(ours[key], tensor), key
    reloaded, said = peft_load_exactly(checkpoints["llama"], saved)
    assert said == []
    assert_near(torch_logits(reloaded, token_ids), torch_logits(peft_model, token_ids))
    adapterspec.delete_adapter(model, "default")
    _assert_values(model, values)

    stray = velora[0].replace("self_attn.q_proj", "self_attn.k_proj").replace("mlp.down_proj", "mlp.up_proj")
    folder = _edit(folder, lambda t: t.update({stray: t[velora[0]]}))
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, folder),
                             adapterspec.UnexpectedTensorError, "up_proj.lora_velora_embed: module")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("init_type", ["batch_average", "random"])
def test_velora_fresh_adapter_saves_peft_state(init_type: str, checkpoints: Any, tmp_path: Path) -> None:
    """As on torch: a new adapter with ``velora_config`` saves PEFT's initial ``lora_velora_embed`` per module (zeros,
    or a random unit vector, ``[ceil(in_features / num_groups)]``), so PEFT loads it without a missing key."""
    velora = {"num_groups": 5, "init_type": init_type}
    model = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj", "down_proj"],
                                       "velora_config": velora}, trainable=False)
    folder = adapterspec.save_adapter(model, tmp_path / "keras")
    ours = adapterspec.read_adapter(folder).load_tensors("numpy")
    theirs = peft.get_peft_model_state_dict(peft.get_peft_model(hf_model(checkpoints["llama"]), peft.LoraConfig(
        r=2, target_modules=["q_proj", "down_proj"], velora_config=velora)))
    assert sorted(ours) == sorted(theirs)
    for key in (k for k in ours if k.endswith(".lora_velora_embed")):
        assert ours[key].shape == tuple(theirs[key].shape) and str(ours[key].dtype) == "float32", key
        assert abs(float(np.linalg.norm(ours[key])) - 1) < 1e-6 if init_type == "random" else not ours[key].any()
    _, said = peft_load_exactly(checkpoints["llama"], folder)
    assert said == []


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", ["train", "embedding", "dora", "shape"])
def test_velora_refusals_are_peft_s(case: str, checkpoints: Any, tmp_path: Path) -> None:
    """As on torch: VeLoRA on an embedding or with DoRA (PEFT refuses both), a state of the wrong shape, and training
    (VeLoRA's approximate backward pass is not done here) are refused, typed, the model unchanged."""
    model = keras_model("llama", checkpoints["llama"])
    config = {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "velora_config": {"num_groups": 4}}
    if case in ("train", "embedding"):
        config["target_modules"] = ["embed_tokens"] if case == "embedding" else ["q_proj"]
        assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(model, config, trainable=case == "train"),
                                 adapterspec.UnsupportedError, "velora_config")
        return
    folder = tmp_path / "peft"
    peft_model = peft.get_peft_model(hf_model(checkpoints["llama"]), peft.LoraConfig(
        r=2, target_modules=["q_proj"], velora_config={"num_groups": 4}))
    peft_model.save_pretrained(folder)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_velora_embed"
    if case == "dora":
        import json

        raw = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**raw, "use_dora": True}))
        error: type[Exception] = adapterspec.UnsupportedError
    else:
        _edit(folder, lambda t: t.update({key: np.concatenate([t[key], t[key]])}))
        error = adapterspec.ShapeMismatchError
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, folder), error, "velora")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_deleting_an_adapter_gives_its_biases_back_while_another_is_merged(checkpoints: Any, tmp_path: Path) -> None:
    """As on torch: delete_adapter no longer unmerges the merged adapters to delete one that is not merged; the biases
    the deleted adapter's file replaced come back bit for bit while 'a' stays merged. A replaced bias of a layer 'a'
    is merged into cannot come back exactly: refused, nothing changed."""
    from keras_helpers import snapshot

    from adapterspec_keras.switch import own_state

    _peft_adapter(checkpoints["qwen2"], tmp_path / "a", peft.LoraConfig(r=2, target_modules=["v_proj"]), salt=1)
    for name, salt in (("q", 400), ("v", 600)):
        _peft_adapter(checkpoints["qwen2"], tmp_path / name, peft.LoraConfig(
            r=2, target_modules=[f"{name}_proj"], bias="lora_only"), salt=salt)
    model = keras_model("qwen2", checkpoints["qwen2"])
    base = {id_: (path, value) for id_, path, _, value in snapshot(model)["variables"]}
    adapterspec.load_adapter(model, tmp_path / "a", "a")
    for name in ("q", "v"):
        adapterspec.load_adapter(model, tmp_path / name, name, activate=False)
    adapterspec.merge_adapters(model)
    assert_refused_unchanged(model, lambda: adapterspec.delete_adapter(model, "v"), adapterspec.UnsupportedError,
                             "adapter 'a' is merged into that module ('model.layers.0.self_attn.v_proj')")
    merged = {id_: value for id_, _, _, value in snapshot(model)["variables"]}
    adapterspec.delete_adapter(model, "q")
    assert own_state(model).merged == ["a"]
    restored = []
    for id_, path, _, value in snapshot(model)["variables"]:
        if id_ in base and not np.array_equal(value, merged[id_]):  # 'a' merged, "v"'s biases: as they were
            assert "query/bias" in path and np.array_equal(value, base[id_][1]), path  # "q"'s: the base's again
            restored.append(path)
    assert len(restored) == 2, restored
