"""Auxiliary tensors of PEFT folders (SPEC.md 5.3, 8.8), against PEFT 0.21 on tiny random Llamas.

Trained biases (``bias="lora_only"``, ``bias="all"`` with ``modules_to_save`` and PEFT's bookkeeping copies),
trainable token rows (``trainable_token_indices``: list, dict, tied output layer), VeLoRA's state and
full embedding matrices: each folder is written by PEFT with element-unique values, loaded with
adapterspec (logits equal to PEFT's, with the adapter on and off), saved again (the same tensors, and PEFT
loads them back to the same state), and deleted (the model's parameters are the original objects again).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch_helpers import (  # noqa: E402
    assert_close,
    assert_same_snapshot,
    fill_adapter_weights,
    fresh,
    logits,
    snapshot,
    tiny_llama_config,
    unique_values,
)

PREFIX = "base_model.model."


def _llama(**overrides: Any) -> Any:
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(4)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama_bias() -> Any:
    return _llama(attention_bias=True, mlp_bias=True)


@pytest.fixture(scope="module")
def llama_tied() -> Any:
    return _llama(tie_word_embeddings=True)


def _fill(model: Any, *, biases: bool = False, embeddings: bool = False) -> None:
    """Element-unique values for the adapter, the token rows, and (as if trained) biases and embeddings."""
    fill_adapter_weights(model)
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(model.named_parameters())):
            if "trainable_tokens_delta" in name:
                param.copy_(unique_values(tuple(param.shape), 200 + index, scale=0.5))
            elif biases and param.requires_grad and name.endswith("bias") and "lora_" not in name \
                    and "original_module" not in name:  # the biases PEFT trains (and saves) for this `bias`
                param.copy_(unique_values(tuple(param.shape), 100 + index, scale=0.3))
            elif embeddings and name.endswith(("embed_tokens.weight", "lm_head.weight")):
                param.copy_(unique_values(tuple(param.shape), 300 + index, scale=0.2))
        for name, buffer in model.named_buffers():  # VeLoRA's projection: give it values too
            if "lora_velora_embed" in name:
                buffer.copy_(unique_values(tuple(buffer.shape), 7))


def _peft(base: Any, config: Any, folder: Path, fill: Callable[[Any], None], **save: Any) -> Any:
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(fresh(base), config)
        fill(model)
        model.eval()
        model.save_pretrained(str(folder), **save)
    return model


def _param_ids(model: Any) -> list[tuple[str, int]]:
    return [(name, id(p)) for name, p in model.named_parameters(remove_duplicate=False)]


def _check_roundtrip(base: Any, config: Any, tmp_path: Path, inputs: dict[str, Any], *,
                     fill: Callable[[Any], None], save_embedding_layers: bool | str = "auto") -> Any:
    reference = _peft(base, config, tmp_path / "peft", fill, save_embedding_layers=save_embedding_layers)
    expected = logits(reference, inputs)
    with reference.disable_adapter():
        expected_off = logits(reference, inputs)
    base_out = logits(base, inputs)
    assert (expected - base_out).abs().max() > 1e-3, "the adapter must change the output"

    model = fresh(base)
    before_modules = [(name, id(m)) for name, m in model.named_modules()]
    before_params = _param_ids(model)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_close(logits(model, inputs), expected)
    with adapterspec.disabled_adapters(model):  # what PEFT switches off with the adapter, and what it keeps
        assert_close(logits(model, inputs), expected_off)

    adapterspec.save_adapter(model, tmp_path / "ours")
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(saved[key], tensor), key
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: v for k, v in ours_config.items() if k in peft_config} == peft_config

    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(fresh(base), str(tmp_path / "ours")).eval()
        state = get_peft_model_state_dict(loaded, save_embedding_layers=save_embedding_layers)
    assert sorted(state) == sorted(saved)
    for key, tensor in state.items():
        assert torch.equal(tensor, saved[key]), key
    assert_close(logits(loaded, inputs), expected)

    adapterspec.delete_adapter(model, "default")
    assert [(name, id(m)) for name, m in model.named_modules()] == before_modules
    assert _param_ids(model) == before_params  # the original parameter objects (tied ones tied again)
    for key, value in model.state_dict().items():
        assert torch.equal(value, base.state_dict()[key]), key
    assert not hasattr(model, "_adapterspec_state")
    return original


# -- biases -------------------------------------------------------------------------------
def test_bias_lora_only(llama_bias: Any, tmp_path: Path, token_inputs: dict[str, Any]) -> None:
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="lora_only")
    original = _check_roundtrip(llama_bias, config, tmp_path, token_inputs, fill=lambda m: _fill(m, biases=True))
    assert f"{PREFIX}model.layers.1.self_attn.v_proj.base_layer.bias" in original


def test_bias_all_with_modules_to_save(llama_bias: Any, tmp_path: Path, token_inputs: dict[str, Any]) -> None:
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all",
                        modules_to_save=["o_proj"])
    original = _check_roundtrip(llama_bias, config, tmp_path, token_inputs, fill=lambda m: _fill(m, biases=True))
    o_proj = f"{PREFIX}model.layers.0.self_attn.o_proj"
    assert {f"{o_proj}.original_module.bias", f"{o_proj}.modules_to_save.bias", f"{o_proj}.bias",
            f"{PREFIX}model.layers.0.mlp.gate_proj.bias", f"{PREFIX}model.layers.0.self_attn.q_proj.base_layer.bias"} \
        <= set(original)


def test_modules_to_save_entry_is_a_plain_suffix(llama: Any, tmp_path: Path, token_inputs: dict[str, Any]) -> None:
    """SPEC 4.3: ``norm`` saves every module whose name ends with it -- both layer norms of each layer and the
    final ``model.norm`` -- as PEFT does (the sdk once took entries as whole '.'-separated names and refused
    PEFT's file)."""
    from peft import LoraConfig

    def fill(model: Any) -> None:
        _fill(model)
        with torch.no_grad():
            for index, (name, param) in enumerate(sorted(model.named_parameters())):
                if ".modules_to_save.default." in name:
                    param.copy_(unique_values(tuple(param.shape), 400 + index, around=1.0, scale=0.3))

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"])
    original = _check_roundtrip(llama, config, tmp_path, token_inputs, fill=fill)
    saved_whole = {k for k in original if "lora_" not in k}
    assert saved_whole == {f"{PREFIX}model.norm.weight"} | {
        f"{PREFIX}model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}


def test_new_adapter_with_bias_all_saves_what_peft_saves(llama_bias: Any, tmp_path: Path) -> None:
    """An adapter injected fresh (to train) owns trainable copies of the biases, and saves PEFT's key set."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    config = {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "bias": "all", "modules_to_save": ["o_proj"]}
    model = fresh(llama_bias)
    before = _param_ids(model)
    adapterspec.inject_adapter(model, config)
    bias = model.model.layers[0].mlp.up_proj.bias
    assert bias.requires_grad and bias is not llama_bias.model.layers[0].mlp.up_proj.bias
    tensors = adapterspec.extract_adapter(model).tensors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(fresh(llama_bias), LoraConfig(r=2, target_modules=["q_proj"], bias="all",
                                                                 modules_to_save=["o_proj"]))
    assert sorted(tensors) == sorted(get_peft_model_state_dict(reference))
    adapterspec.delete_adapter(model, "default")
    assert _param_ids(model) == before


# -- trainable tokens -----------------------------------------------------------------------
def _tokens_cases() -> list[Any]:
    from peft import LoraConfig

    return [
        pytest.param("llama", lambda: LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 7, 1]),
                     id="list"),
        pytest.param("llama_tied", lambda: LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 7, 1]),
                     id="list-tied"),
        pytest.param("llama", lambda: LoraConfig(r=4, target_modules=["v_proj"],
                                                 trainable_token_indices={"embed_tokens": [3, 7], "lm_head": [5]}),
                     id="dict"),
        pytest.param("llama_tied", lambda: LoraConfig(r=4, target_modules=["v_proj"],
                                                      trainable_token_indices={"embed_tokens": [2, 9],
                                                                               "lm_head": [2, 9]}),
                     id="dict-tied-same"),
        pytest.param("llama_tied", lambda: LoraConfig(r=4, target_modules=["v_proj"],
                                                      trainable_token_indices={"embed_tokens": [3, 7], "lm_head": [5]}),
                     id="dict-tied-other"),
    ]


@pytest.mark.parametrize(("kind", "make_config"), _tokens_cases())
def test_trainable_tokens(kind: str, make_config: Any, request: pytest.FixtureRequest, tmp_path: Path,
                          token_inputs: dict[str, Any]) -> None:
    base = request.getfixturevalue(kind)
    inputs = {**token_inputs, "input_ids": token_inputs["input_ids"] % 10}  # the adapted rows are in use
    original = _check_roundtrip(base, make_config(), tmp_path, inputs, fill=_fill)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight", ".token_adapter.trainable_tokens_delta"))
               for k in original)


def test_trainable_tokens_merge_and_switch(llama_tied: Any, tmp_path: Path, token_inputs: dict[str, Any]) -> None:
    """Two token adapters (overlapping rows) switch as in PEFT; merging writes the rows once into the shared
    weight, unmerging restores them exactly."""
    from peft import LoraConfig, PeftModel

    inputs = {**token_inputs, "input_ids": token_inputs["input_ids"] % 10}
    _peft(llama_tied, LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 7, 1]),
          tmp_path / "a", _fill)
    _peft(llama_tied, LoraConfig(r=2, target_modules=["k_proj"], trainable_token_indices=[1, 2]), tmp_path / "b",
          lambda m: (fill_adapter_weights(m, salt=50), _fill_tokens(m, 9)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(fresh(llama_tied), str(tmp_path / "a"), adapter_name="a").eval()
        reference.load_adapter(str(tmp_path / "b"), adapter_name="b")
    model = fresh(llama_tied)
    embedding = model.model.embed_tokens.weight.detach().clone()
    adapterspec.load_adapter(model, tmp_path / "a", "a")
    adapterspec.load_adapter(model, tmp_path / "b", "b")
    outputs = {}
    for name in ("a", "b", "a"):
        reference.set_adapter(name)
        adapterspec.set_active_adapters(model, name)
        outputs[name] = logits(reference, inputs)
        assert_close(logits(model, inputs), outputs[name])
    assert (outputs["a"] - outputs["b"]).abs().max() > 1e-3
    adapterspec.merge_adapters(model, "a")
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.base_layer.weight
    assert_close(logits(model, inputs), outputs["a"])
    adapterspec.unmerge_adapters(model)
    assert torch.equal(model.model.embed_tokens.base_layer.weight, embedding)
    assert_close(logits(model, inputs), outputs["a"])


def _fill_tokens(model: Any, salt: int) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.copy_(unique_values(tuple(param.shape), salt, scale=0.5))


def test_new_trainable_tokens_start_as_the_rows(llama: Any, token_inputs: dict[str, Any]) -> None:
    model = fresh(llama)
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"],
                                       "trainable_token_indices": {"embed_tokens": [4, 0]}})
    rows = adapterspec.extract_adapter(model).tensors
    key = f"{PREFIX}model.embed_tokens.token_adapter.trainable_tokens_delta"
    assert rows[key].shape == (2, 64)
    params = dict(model.named_parameters())
    delta = next(p for n, p in params.items() if "token_adapter" in n)
    assert delta.requires_grad and torch.equal(delta.detach(), llama.model.embed_tokens.weight[[4, 0]])


# -- VeLoRA, embeddings -----------------------------------------------------------------------
def test_velora_state_is_kept(llama: Any, tmp_path: Path, token_inputs: dict[str, Any]) -> None:
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], velora_config={"num_groups": 4})
    original = _check_roundtrip(llama, config, tmp_path, token_inputs, fill=_fill)
    assert f"{PREFIX}model.layers.0.self_attn.q_proj.lora_velora_embed" in original


@pytest.mark.parametrize("init_type", ["batch_average", "random"])
def test_velora_fresh_adapter_saves_peft_state(init_type: str, llama: Any, gpt2: Any, tmp_path: Path) -> None:
    """A new adapter with ``velora_config`` saves the ``lora_velora_embed`` PEFT creates with the adapter (zeros, or a
    random unit vector; ``[ceil(in_features / num_groups)]``): PEFT loads the folder without a missing key (before:
    "Found missing adapter keys"). GPT-2's Conv1D takes its inputs from the weight's first axis."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    for base, targets in ((llama, ["q_proj", "down_proj"]), (gpt2, ["c_attn"])):
        velora = {"num_groups": 5, "init_type": init_type}
        config = {"peft_type": "LORA", "r": 2, "target_modules": targets, "velora_config": velora}
        model = fresh(base)
        adapterspec.inject_adapter(model, config, trainable=False)
        folder = adapterspec.save_adapter(model, tmp_path / type(base).__name__)
        ours = load_file(folder / "adapter_model.safetensors")
        theirs = get_peft_model_state_dict(get_peft_model(fresh(base), LoraConfig(
            r=2, target_modules=targets, velora_config=velora, fan_in_fan_out=base is gpt2)))
        assert sorted(ours) == sorted(theirs)
        states = [k for k in ours if k.endswith(".lora_velora_embed")]
        assert states
        for key in states:
            assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype, key
            if init_type == "random":
                assert abs(float(torch.linalg.vector_norm(ours[key])) - 1.0) < 1e-6, key
            else:
                assert not ours[key].any(), key
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft.PeftModel.from_pretrained(fresh(base), folder)
        assert [str(w.message) for w in caught if not issubclass(w.category, (FutureWarning, DeprecationWarning))
                and "fan_in_fan_out" not in str(w.message)] == []


@pytest.mark.parametrize("case", ["train", "embedding", "dora", "shape"])
def test_velora_refusals_are_peft_s(case: str, llama: Any, tmp_path: Path) -> None:
    """What PEFT refuses (VeLoRA on an embedding, with DoRA; a state of the wrong shape fails its load_state_dict) and
    training with VeLoRA's approximate backward pass (not done here): typed, naming the field or tensor, the model
    unchanged."""
    from peft import LoraConfig

    config = {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "velora_config": {"num_groups": 4}}
    model = fresh(llama)
    before = snapshot(model)
    if case in ("train", "embedding"):
        if case == "embedding":
            config["target_modules"] = ["embed_tokens"]
        with pytest.raises(adapterspec.UnsupportedError) as info:
            adapterspec.inject_adapter(model, config, trainable=case == "train")
        assert info.value.pointer == "/velora_config"
    else:
        folder = tmp_path / "peft"
        _peft(llama, LoraConfig(r=2, target_modules=["q_proj"], velora_config={"num_groups": 4}), folder, _fill)
        if case == "dora":
            raw = json.loads((folder / "adapter_config.json").read_text())
            (folder / "adapter_config.json").write_text(json.dumps({**raw, "use_dora": True}))
            error: type[Exception] = adapterspec.UnsupportedError
        else:
            tensors = load_file(folder / "adapter_model.safetensors")
            key = f"{PREFIX}model.layers.1.self_attn.q_proj.lora_velora_embed"
            tensors[key] = torch.cat([tensors[key], tensors[key]])
            save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
            error = adapterspec.ShapeMismatchError
        with pytest.raises(error) as info:
            adapterspec.load_adapter(model, folder)
        assert "velora" in str(info.value)
    assert_same_snapshot(model, before)


def test_full_embeddings(llama: Any, tmp_path: Path, token_inputs: dict[str, Any]) -> None:
    """``save_embedding_layers=True`` with untargeted embeddings: ``<emb>.weight`` replaces the model's."""
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    original = _check_roundtrip(llama, config, tmp_path, token_inputs, fill=lambda m: _fill(m, embeddings=True),
                                save_embedding_layers=True)
    assert {f"{PREFIX}model.embed_tokens.weight", f"{PREFIX}lm_head.weight"} <= set(original)


def test_resized_vocabulary(llama: Any, tmp_path: Path, token_inputs: dict[str, Any]) -> None:
    """A file whose embeddings have more rows than the model's is refused naming the resize to do; after
    ``resize_token_embeddings`` it loads as in PEFT."""
    from peft import LoraConfig

    resized = fresh(llama)
    resized.resize_token_embeddings(131)
    reference = _peft(resized, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "peft",
                      lambda m: _fill(m, embeddings=True), save_embedding_layers=True)
    model = fresh(llama)
    before = snapshot(model)
    with pytest.raises(adapterspec.ShapeMismatchError, match=r"resize_token_embeddings\(131\)") as info:
        adapterspec.load_adapter(model, tmp_path / "peft")
    assert info.value.key.endswith(("embed_tokens.weight", "lm_head.weight"))
    assert_same_snapshot(model, before)
    model = fresh(resized)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_close(logits(model, token_inputs), logits(reference, token_inputs))


def test_tied_full_embedding_stays_tied(llama_tied: Any, tmp_path: Path, token_inputs: dict[str, Any]) -> None:
    """One tied matrix saved once (``<emb>.weight``) replaces it in both layers, as PEFT's in-place load does."""
    from peft import LoraConfig

    reference = _peft(llama_tied, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "peft",
                      lambda m: _fill(m, embeddings=True), save_embedding_layers=True)
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    tensors.pop(f"{PREFIX}lm_head.weight", None)
    save_file(tensors, tmp_path / "peft" / "adapter_model.safetensors", metadata={"format": "pt"})
    model = fresh(llama_tied)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_close(logits(model, token_inputs), logits(reference, token_inputs))
    adapterspec.delete_adapter(model, "default")
    assert model.lm_head.weight is model.model.embed_tokens.weight is not None
    assert torch.equal(model.lm_head.weight, llama_tied.lm_head.weight)


# -- embeddings saved whole under the model's own names (SPEC.md 5.4 step 4) ----------------------------
@pytest.fixture(scope="module")
def bert_mlm() -> Any:
    """A masked-LM BERT: its output embedding ``cls.predictions.decoder`` has a bias, which PEFT saves too."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(5)
    return BertForMaskedLM(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, vocab_size=128, max_position_embeddings=64)).eval()


def _fill_embeddings(model: Any) -> None:
    """Element-unique values for the adapter and every parameter of the input and output embeddings (as if
    trained; a tied matrix once)."""
    fill_adapter_weights(model)
    base = model.get_base_model()
    seen: set[int] = set()
    with torch.no_grad():
        for index, layer in enumerate((base.get_input_embeddings(), base.get_output_embeddings())):
            for param in (layer.parameters() if layer is not None else ()):
                if id(param) not in seen:
                    seen.add(id(param))
                    param.copy_(unique_values(tuple(param.shape), 400 + 13 * index + len(seen), scale=0.2))


_EMBEDDING_CASES = {  # fixture, LoRA config, the keys PEFT saves of the embeddings
    "gpt2": ("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True),
             {"transformer.wte.weight", "lm_head.weight"}),
    "bert-mlm": ("bert_mlm", dict(target_modules=["query", "value"]),
                 {"bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight",
                  "cls.predictions.decoder.bias"}),
    "bert-classifier": ("bert", dict(target_modules=["query", "value"], modules_to_save=["classifier"]),
                        {"bert.embeddings.word_embeddings.weight"}),
    "llama": ("llama", dict(target_modules=["q_proj"]), {"model.embed_tokens.weight", "lm_head.weight"}),
}


@pytest.mark.parametrize("case", list(_EMBEDDING_CASES))
def test_embeddings_saved_whole_under_the_models_names(case: str, request: Any, tmp_path: Path,
                                                       token_inputs: dict[str, Any]) -> None:
    """PEFT's ``save_embedding_layers=True`` saves ``get_input_embeddings()`` / ``get_output_embeddings()`` under
    the model's own module names (GPT-2 ``transformer.wte``, BERT ``word_embeddings`` and the masked-LM head's
    ``decoder`` with its bias): they load with PEFT's logits and save back to PEFT's keys (refused before: only
    ``embed_tokens`` / ``lm_head`` were taken)."""
    from peft import LoraConfig

    fixture, options, keys = _EMBEDDING_CASES[case]
    base = request.getfixturevalue(fixture)
    original = _check_roundtrip(base, LoraConfig(r=4, lora_alpha=8, **options), tmp_path, token_inputs,
                                fill=_fill_embeddings, save_embedding_layers=True)
    assert {k for k in original if "lora_" not in k and "classifier" not in k} == {PREFIX + k for k in keys}


def test_stray_weight_of_another_module_is_refused(gpt2: Any, tmp_path: Path, token_inputs: dict[str, Any]) -> None:
    """``<m>.weight`` of a module that is not the model's input or output embedding (nor adapted, nor saved), under
    a name outside transformers' embedding names, is an ``UnexpectedTensorError`` naming the key; the model is left
    unchanged. The load reports what ``read_adapter`` reports (a load never names a spec problem differently)."""
    from peft import LoraConfig

    _peft(gpt2, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True), tmp_path / "peft",
          _fill_embeddings, save_embedding_layers=True)
    stray = f"{PREFIX}transformer.h.0.ln_1.weight"
    folder = _edited(tmp_path / "peft", tmp_path, lambda t: t.update({stray: torch.arange(64.0)}))
    model = fresh(gpt2)
    before = snapshot(model)
    with pytest.raises(adapterspec.UnexpectedTensorError, match="with the model") as info:
        adapterspec.load_adapter(model, folder)
    assert info.value.key == stray
    assert_same_snapshot(model, before)
    with pytest.raises(adapterspec.UnexpectedTensorError, match="with the model") as info:
        adapterspec.read_adapter(folder)
    assert info.value.key == stray
    adapterspec.read_adapter(tmp_path / "peft")  # PEFT's own folder: wte and lm_head are transformers' names


# -- refusals (SPEC.md 10, checks 18-21) ---------------------------------------------------------
@pytest.fixture(scope="module")
def bias_folder(llama_bias: Any, tmp_path_factory: Any) -> Path:
    from peft import LoraConfig

    folder = tmp_path_factory.mktemp("bias")
    _peft(llama_bias, LoraConfig(r=2, target_modules=["q_proj"], bias="all"), folder, lambda m: _fill(m, biases=True))
    return folder


def _edited(folder: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    tensors = load_file(out / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(("edit", "error", "key"), [
    (lambda t: t.update({f"{PREFIX}model.layers.9.mlp.up_proj.bias": torch.ones(128)}),
     adapterspec.TargetNotFoundError, f"{PREFIX}model.layers.9.mlp.up_proj.bias"),
    (lambda t: t.update({f"{PREFIX}model.norm.bias": torch.ones(64)}),
     adapterspec.UnexpectedTensorError, f"{PREFIX}model.norm.bias"),
    (lambda t: t.update({f"{PREFIX}model.layers.0.mlp.up_proj.bias": torch.ones(7)}),
     adapterspec.ShapeMismatchError, f"{PREFIX}model.layers.0.mlp.up_proj.bias"),
], ids=["absent-module", "module-without-bias", "bias-shape"])
def test_bad_auxiliary_tensor(llama_bias: Any, bias_folder: Path, tmp_path: Path, edit: Any, error: type,
                              key: str) -> None:
    folder = _edited(bias_folder, tmp_path, edit)
    model = fresh(llama_bias)
    before = snapshot(model)
    with pytest.raises(error) as info:
        adapterspec.load_adapter(model, folder)
    assert info.value.key == key
    assert_same_snapshot(model, before)


def test_absent_module_is_reported_before_other_problems(llama: Any, tmp_path: Path) -> None:
    """Check 18 (the module exists) comes before 19 and 20, whatever the order of the keys."""
    from peft import LoraConfig

    _peft(llama, LoraConfig(r=2, target_modules=["q_proj", "o_proj"]), tmp_path / "peft", _fill)
    folder = _edited(tmp_path / "peft", tmp_path, lambda t: t.update({
        f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 3),
        f"{PREFIX}model.layers.5.self_attn.o_proj.lora_A.weight": torch.ones(2, 64),
        f"{PREFIX}model.layers.5.self_attn.o_proj.lora_B.weight": torch.ones(64, 2)}))
    with pytest.raises(adapterspec.TargetNotFoundError, match="model.layers.5.self_attn.o_proj"):
        adapterspec.load_adapter(fresh(llama), folder)


def test_method_tensor_on_a_layer_the_method_cannot_adapt(llama: Any) -> None:
    """Check 18's second half, at the backend (the core's own checks bypassed): the layer a method tensor
    names exists but is no layer LoRA adapts -> UnsupportedError naming it."""
    from adapterspec.checks import TensorInfo
    from adapterspec_torch.inject import inject
    from adapterspec_torch.state import load_state
    from adapterspec_torch.switch import delete

    config = adapterspec.AdapterConfig.from_dict({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]})
    model = fresh(llama)
    options = adapterspec.LoadOptions(initialize=False)
    inject(model, config, "default", options)
    arrays = {f"{PREFIX}model.layers.{i}.self_attn.q_proj.{p}": unique_values(shape, i)
              for i in range(2) for p, shape in (("lora_A.weight", (2, 64)), ("lora_B.weight", (64, 2)))}
    arrays[f"{PREFIX}model.norm.lora_A.weight"] = unique_values((2, 64), 9)
    adapter = adapterspec.Adapter(config, {k: TensorInfo(tuple(v.shape), "F32") for k, v in arrays.items()},
                                  arrays=arrays)
    with pytest.raises(adapterspec.UnsupportedError) as info:
        load_state(model, adapter, "default", options)
    assert info.value.key == "model.norm"
    delete(model, "default")


# -- unload(merge=True) keeps what PEFT's merge_and_unload keeps ----------------------------------
@pytest.fixture(scope="module")
def roberta() -> Any:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(5)
    config = RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           vocab_size=128, max_position_embeddings=72, num_labels=3)
    return RobertaForSequenceClassification(config).eval()


def _merge_cases() -> list[Any]:
    from peft import LoraConfig

    return [
        pytest.param("roberta", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                   modules_to_save=["classifier"]), {}, id="modules_to_save"),
        pytest.param("llama", lambda: LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 7, 1]),
                     {}, id="trainable-tokens"),
        pytest.param("llama_tied", lambda: LoraConfig(r=4, target_modules=["v_proj"], trainable_token_indices=[3, 7]),
                     {}, id="trainable-tokens-tied"),
        pytest.param("llama_bias", lambda: LoraConfig(r=4, target_modules=["q_proj"], bias="lora_only"),
                     {"biases": True}, id="bias-lora-only"),
        pytest.param("llama_bias", lambda: LoraConfig(r=4, target_modules=["q_proj"], bias="all",
                                                      modules_to_save=["o_proj"]),
                     {"biases": True}, id="bias-all-modules-to-save"),
        pytest.param("llama", lambda: LoraConfig(r=4, target_modules=["q_proj"]), {"embeddings": True},
                     id="full-embeddings"),
    ]


@pytest.mark.parametrize(("kind", "make_config", "fill"), _merge_cases())
def test_unload_merge_matches_peft_merge_and_unload(kind: str, make_config: Any, fill: dict[str, bool],
                                                    request: pytest.FixtureRequest, tmp_path: Path,
                                                    token_inputs: dict[str, Any]) -> None:
    """``unload(model, merge=True)`` leaves the plain model PEFT's ``merge_and_unload()`` leaves: the trained
    copy of a module saved whole, the trainable token rows, the trained biases, the saved embeddings."""
    base = request.getfixturevalue(kind)
    inputs = {**token_inputs, "input_ids": token_inputs["input_ids"] % 10 + 2}  # adapted rows in use; no pad id
    embeddings = fill.get("embeddings", False)
    reference = _peft(base, make_config(), tmp_path / "peft", lambda m: _fill(m, **fill),
                      save_embedding_layers=True if embeddings else "auto")
    adapted = logits(reference, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = logits(reference.merge_and_unload(), inputs)
    assert (adapted - logits(base, inputs)).abs().max() > 1e-3, "the adapter must change the output"
    assert_close(expected, adapted)

    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert adapterspec.unload(model, merge=True) is model
    assert not hasattr(model, "_adapterspec_state")
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    assert_close(logits(model, inputs), expected)


def test_unload_merge_keeps_the_copy_that_runs(roberta: Any, tmp_path: Path, token_inputs: dict[str, Any]) -> None:
    """Two adapters saving the same module whole: the active one's copy runs, and is the one kept (both active at
    once are refused, as PEFT refuses them: SPEC.md 8.9)."""
    from peft import LoraConfig

    config = LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"])
    _peft(roberta, config, tmp_path / "a", _fill)
    _peft(roberta, config, tmp_path / "b", lambda m: fill_adapter_weights(m, salt=40))
    inputs = {**token_inputs, "input_ids": token_inputs["input_ids"] % 10 + 2}
    outputs = {}
    for active in ("a", "b"):
        model = fresh(roberta)
        adapterspec.load_adapter(model, tmp_path / "a", "a")
        adapterspec.load_adapter(model, tmp_path / "b", "b")
        with pytest.raises(adapterspec.UnsupportedError, match="classifier"):
            adapterspec.set_active_adapters(model, ["a", "b"])
        adapterspec.set_active_adapters(model, [active])
        expected = logits(model, inputs)
        adapterspec.unload(model, merge=True)
        assert_close(logits(model, inputs), expected)
        outputs[active] = expected
    assert (outputs["a"] - outputs["b"]).abs().max() > 1e-3


@pytest.mark.parametrize("active", ["a", "b"])
def test_unload_merge_keeps_the_biases_in_place(llama_bias: Any, tmp_path: Path, token_inputs: dict[str, Any],
                                                active: str) -> None:
    """Two adapters replacing the biases (PEFT refuses two such adapters in one model): the ones loaded last are in
    place whichever adapter is active, and ``unload(merge=True)`` keeps what the forward pass used."""
    from peft import LoraConfig

    config = LoraConfig(r=2, target_modules=["q_proj"], bias="all")
    _peft(llama_bias, config, tmp_path / "a", lambda m: _fill(m, biases=True))
    _peft(llama_bias, config, tmp_path / "b", lambda m: (fill_adapter_weights(m, salt=30), _fill_biases(m, 500)))
    model = fresh(llama_bias)
    adapterspec.load_adapter(model, tmp_path / "a", "a")
    adapterspec.load_adapter(model, tmp_path / "b", "b")
    adapterspec.set_active_adapters(model, active)
    expected = logits(model, token_inputs)
    bias = model.model.layers[0].mlp.up_proj.bias.detach().clone()
    adapterspec.unload(model, merge=True)
    assert not hasattr(model, "_adapterspec_state")
    assert torch.equal(model.model.layers[0].mlp.up_proj.bias, bias)
    assert_close(logits(model, token_inputs), expected)


def _fill_biases(model: Any, salt: int) -> None:
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(model.named_parameters())):
            if param.requires_grad and name.endswith("bias") and "lora_" not in name:
                param.copy_(unique_values(tuple(param.shape), salt + index, scale=0.3))


def test_deleting_an_adapter_gives_its_biases_back_while_another_is_merged(llama_bias: Any, tmp_path: Path,
                                                                          token_inputs: dict[str, Any]) -> None:
    """delete_adapter unmerged every merged adapter to delete one that is not merged. It no longer does: the merged
    one stays merged (its weights bit for bit) and the biases the deleted adapter's file replaced come back (the
    original objects). A replaced bias of a module a merged adapter is merged into cannot come back exactly: refused,
    nothing changed; after unmerge_adapters the delete goes through."""
    from peft import LoraConfig

    _peft(llama_bias, LoraConfig(r=2, target_modules=["v_proj"]), tmp_path / "a", lambda m: _fill(m))
    for name, target, salt in (("q", "q_proj", 400), ("v", "v_proj", 600)):
        _peft(llama_bias, LoraConfig(r=2, target_modules=[target], bias="lora_only"), tmp_path / name,
              lambda m, salt=salt: (fill_adapter_weights(m, salt=salt), _fill_biases(m, salt + 50)))
    model = fresh(llama_bias)
    q_proj = model.model.layers[0].self_attn.q_proj
    original = (q_proj.bias, q_proj.bias.detach().clone())
    adapterspec.load_adapter(model, tmp_path / "a", "a")
    adapterspec.load_adapter(model, tmp_path / "q", "q", activate=False)
    adapterspec.load_adapter(model, tmp_path / "v", "v", activate=False)
    assert not torch.equal(q_proj.bias, original[1])  # the file's bias, in place while "q" is loaded
    adapterspec.merge_adapters(model)
    merged_weight = model.model.layers[0].self_attn.v_proj.base_layer.weight.detach().clone()

    before = snapshot(model)
    with pytest.raises(adapterspec.UnsupportedError, match=r"'v'.*'a' is merged") as info:
        adapterspec.delete_adapter(model, "v")
    assert info.value.key == "base_model.model.model.layers.0.self_attn.v_proj.base_layer.bias"
    assert "unmerge_adapters" in (info.value.hint or "")
    assert_same_snapshot(model, before)

    adapterspec.delete_adapter(model, "q")
    assert model.model.layers[0].self_attn.q_proj.bias is original[0]
    assert torch.equal(original[0], original[1])
    assert model.model.layers[0].self_attn.v_proj.merged_adapters == ["a"]
    assert torch.equal(model.model.layers[0].self_attn.v_proj.base_layer.weight, merged_weight)
    adapterspec.unmerge_adapters(model)
    adapterspec.delete_adapter(model, "v")
    assert adapterspec.adapter_names(model) == ["a"]
