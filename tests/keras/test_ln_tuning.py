"""LN tuning (``LN_TUNING``, SPEC.md 15.3) on keras-hub models, exact against PEFT 0.21 in both directions.

Llama and Qwen2 (RMSNorm ``scale``), Gemma (RMSNorm computing ``1 + scale`` in both frameworks: the tensor is
copied as it is) and GPT-2 (LayerNorm ``gamma``/``beta``): the active adapter's copy of each targeted norm runs
instead of it. A folder PEFT saved gives PEFT's logits; our save holds PEFT's keys and bytes, and PEFT loads it
with nothing missing or unexpected, no warning and the same logits; merge gives PEFT's merged logits, unmerge and
disable the base back bit for bit; two adapters switch, two active at once are refused. Bad folders are refused
typed, the model unchanged.
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
from adapterspec.errors import ShapeMismatchError, TargetNotFoundError, UnsupportedError  # noqa: E402
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
    """Element-unique norm weights around 1 and biases around 0."""
    import torch

    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(peft_model.named_parameters())):
            if "ln_tuning_layers" not in name and "modules_to_save" not in name:
                continue
            around = 1.0 if name.endswith("weight") and param.dim() == 1 else 0.0
            param.copy_(torch.from_numpy(unique_values(tuple(param.shape), 80 + salt + index, around=around,
                                                       scale=0.3)))


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
    return peft.LNTuningConfig(**kw)


CASES: dict[str, tuple[str, Any]] = {
    "llama-default-targets": ("llama", lambda: _config(task_type="CAUSAL_LM")),
    "llama-listed-and-excluded": ("llama", lambda: _config(target_modules=["input_layernorm", "norm"],
                                                           exclude_modules=["layers.1.input_layernorm"])),
    "llama-norm-and-lm-head-saved": ("llama", lambda: _config(target_modules=["norm"], modules_to_save=["lm_head"])),
    "qwen2-default-targets": ("qwen2", lambda: _config(task_type="CAUSAL_LM")),
    "gemma-default-targets": ("gemma", lambda: _config(task_type="CAUSAL_LM")),
    "gpt2-default-targets": ("gpt2", lambda: _config(task_type="CAUSAL_LM")),
    # a Linear copied whole: keras-hub holds o_proj as an EinsumDense kernel [heads, head_dim, hidden], the weight
    # [hidden, heads * head_dim] transposed and reshaped (before: refused as not a plain copy)
    "llama-attention-output": ("llama", lambda: _config(target_modules=r".*\.0\.self_attn\.o_proj")),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_folder_roundtrip(case: str, checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    arch, make_config = CASES[case]
    peft_model = _peft_adapter(checkpoints[arch], tmp_path / "peft", make_config())
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "LN_TUNING"
    expected = torch_logits(peft_model, token_ids)
    with peft_model.disable_adapter():
        assert np.abs(expected - torch_logits(peft_model, token_ids)).max() > 1e-2  # the copies matter
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, token_ids)
    values = {v.path: np.array(v.numpy()) for v in model.variables}
    assert adapterspec.validate_adapter(tmp_path / "peft") == []

    adapterspec.load_adapter(model, tmp_path / "peft")
    got = keras_logits(model, token_ids)
    print(f"{case}: max abs diff vs PEFT {float(np.abs(got - expected).max()):.3g}")
    assert_near(got, expected)
    with adapterspec.disabled_adapters(model):
        assert np.array_equal(keras_logits(model, token_ids), base)

    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    ours, theirs = adapterspec.read_adapter(saved), adapterspec.read_adapter(tmp_path / "peft")
    assert sorted(ours.tensors) == sorted(theirs.tensors)
    assert all(".ln_tuning_layers." in key or key == "base_model.model.lm_head.weight" for key in ours.tensors)
    a, b = ours.load_tensors("numpy"), theirs.load_tensors("numpy")
    for key in b:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    assert _data(saved) == _data(tmp_path / "peft")  # same order, same bytes
    loaded, said = peft_load_exactly(checkpoints[arch], saved)
    # PEFT warns about the norm's type ("Unsupported layer type ... proceed at your own risk") for its own folder too
    assert said == peft_load_exactly(checkpoints[arch], tmp_path / "peft")[1]
    assert all("Unsupported layer type" in w for w in said)
    assert_near(torch_logits(loaded, token_ids), expected)

    again = keras_model(arch, checkpoints[arch])  # round trip: bit-exact
    adapterspec.load_adapter(again, saved)
    assert np.array_equal(keras_logits(again, token_ids), got)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.merge_adapter()
    merged_expected = torch_logits(peft_model, token_ids)
    adapterspec.merge_adapters(model)
    assert_near(keras_logits(model, token_ids), merged_expected)
    adapterspec.unmerge_adapters(model)
    assert np.array_equal(keras_logits(model, token_ids), got)
    adapterspec.delete_adapter(model, "default")  # every variable as it was
    for v in model.variables:
        assert np.array_equal(v.numpy(), values[v.path]), v.path


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random transformers ``BertModel`` as keras-hub's converter reads it."""
    import torch
    import transformers

    from keras_helpers import save_for_keras_hub

    torch.manual_seed(3)
    config = transformers.AutoConfig.for_model("bert", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, vocab_size=128, max_position_embeddings=64,
                                               hidden_act="gelu_pytorch_tanh")
    return save_for_keras_hub(transformers.AutoModel.from_config(config).eval(), tmp_path_factory.mktemp("bert"))


def _bert_hidden(model: Any, ids: np.ndarray) -> np.ndarray:
    from keras import ops

    inputs = {"token_ids": ids.astype("int32"), "padding_mask": np.ones_like(ids, dtype="int32"),
              "segment_ids": np.zeros_like(ids, dtype="int32")}
    return np.asarray(ops.convert_to_numpy(model(inputs)["sequence_output"]))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("make_config", [
    lambda: _config(target_modules=["LayerNorm"]),
    # the embeddings' norm saved whole: keyed LayerNorm.weight/bias as PEFT keys it, though keras-hub's converter
    # reads BERT's legacy LayerNorm.gamma/beta names
    lambda: _config(target_modules=["attention.output.LayerNorm"], modules_to_save=["embeddings.LayerNorm"]),
], ids=["layer-norms", "attention-norms-and-embedding-norm-saved"])
def test_bert_layer_norms_gamma_beta(make_config: Any, bert: Path, token_ids: np.ndarray, tmp_path: Path) -> None:
    """keras-hub's BERT LayerNormalization: ``gamma`` is the weight, ``beta`` the bias."""
    import keras_hub
    import torch
    import transformers

    from keras_helpers import assert_peft_close

    def hidden(torch_model: Any) -> np.ndarray:
        ids = torch.from_numpy(token_ids.astype(np.int64))
        with torch.no_grad():
            return torch_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.numpy()

    def load_bert() -> Any:
        return transformers.AutoModel.from_pretrained(bert).eval()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(load_bert(), make_config())
    _fill(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    expected = hidden(peft_model)
    with peft_model.disable_adapter():
        base_torch = hidden(peft_model)
    assert np.abs(expected - base_torch).max() > 1e-1  # the copies matter
    model = keras_hub.models.Backbone.from_preset(str(bert))
    base = _bert_hidden(model, token_ids)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_peft_close(_bert_hidden(model, token_ids), expected, base, base_torch)
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    ours, theirs = adapterspec.read_adapter(saved), adapterspec.read_adapter(tmp_path / "peft")
    assert sorted(ours.tensors) == sorted(theirs.tensors)
    assert _data(saved) == _data(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(load_bert(), saved).eval()
    state, stored = peft.utils.get_peft_model_state_dict(loaded), theirs.load_tensors("numpy")
    assert sorted(state) == sorted(stored)  # nothing missing or unexpected
    assert all(np.array_equal(state[key].numpy(), stored[key]) for key in stored)
    assert_near(hidden(loaded), expected)
    adapterspec.delete_adapter(model, "default")
    assert np.array_equal(_bert_hidden(model, token_ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_null_target_modules_take_peft_default(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """PEFT writes the resolved list; a null one (PEFT loads it too) resolves to the same table entry."""
    peft_model = _peft_adapter(checkpoints["llama"], tmp_path, _config(task_type="CAUSAL_LM"))
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": None}))
    model = keras_model("llama", checkpoints["llama"])
    adapterspec.load_adapter(model, tmp_path)
    assert_near(keras_logits(model, token_ids), torch_logits(peft_model, token_ids))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_two_adapters_switch_and_merge(arch: str, checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """Each active adapter runs its copies, none the base; two active on one layer are refused (PEFT raises too);
    ``unload(merge=True)`` keeps the running copies (PEFT's ``merge_and_unload``)."""
    first = _peft_adapter(checkpoints[arch], tmp_path / "a", _config(task_type="CAUSAL_LM"))
    second = _peft_adapter(checkpoints[arch], tmp_path / "b", _config(task_type="CAUSAL_LM"), salt=40)
    expected = {"a": torch_logits(first, token_ids), "b": torch_logits(second, token_ids)}
    assert np.abs(expected["a"] - expected["b"]).max() > 1e-2
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, token_ids)
    adapterspec.load_adapter(model, tmp_path / "a", adapter_name="a")
    adapterspec.load_adapter(model, tmp_path / "b", adapter_name="b")
    for name in ("a", "b", "a"):
        adapterspec.set_active_adapters(model, [name])
        assert_near(keras_logits(model, token_ids), expected[name])
    assert_refused_unchanged(model, lambda: adapterspec.set_active_adapters(model, ["a", "b"]), UnsupportedError,
                             "one adapter at a time")
    adapterspec.set_active_adapters(model, [])
    assert np.array_equal(keras_logits(model, token_ids), base)
    adapterspec.set_active_adapters(model, ["b"])
    adapterspec.unload(model, merge=True)
    assert adapterspec.adapter_names(model) == []
    assert_near(keras_logits(model, token_ids), expected["b"])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_wrong_shape_is_refused(checkpoints: Any, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    _peft_adapter(checkpoints["llama"], tmp_path, _config(target_modules=["norm"]))
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.norm.ln_tuning_layers.weight"
    tensors[key] = np.ascontiguousarray(tensors[key][:-1])
    save_file(tensors, file, metadata={"format": "pt"})
    model = keras_model("llama", checkpoints["llama"])
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, tmp_path), ShapeMismatchError,
                             "ln_tuning_layers.weight")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("config, options, error, needle", [
    ({"target_modules": ["no_such_norm"]}, {}, TargetNotFoundError, "/target_modules"),
    ({"target_modules": ["input_layernorm"]}, {"trainable": True}, UnsupportedError, "train"),
    ({"target_modules": r"model\.layers\.0(\.input_layernorm)?"}, {}, UnsupportedError, "inside"),
])
def test_unsupported_targets_are_refused_and_change_nothing(config: dict[str, Any], options: dict[str, Any],
                                                            error: type[Exception], needle: str,
                                                            checkpoints: Any) -> None:
    model = keras_model("llama", checkpoints["llama"])
    options = {"trainable": False, **options}
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(model, {"peft_type": "LN_TUNING", **config},
                                                                       **options), error, needle)


def test_docstring_examples() -> None:
    import doctest

    from adapterspec_keras import ln_tuning

    result = doctest.testmod(ln_tuning, optionflags=doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_refusal_hint_names_the_field_that_selected_the_module() -> None:
    """LN tuning selects modules with target_modules: its refusal must not tell to edit modules_to_save (review). A
    converter that reshapes a tensor whose shape in PEFT's file is not known is refused (the shape it would be saved
    in is unknown), naming the field."""
    import keras

    from adapterspec_keras.modules_to_save import converter_layout

    variable = keras.Variable(np.zeros((2, 3, 4), dtype="float32"), name="kernel")
    with pytest.raises(UnsupportedError) as info:
        converter_layout("model.layers.0.self_attn.o_proj.weight", variable,
                         lambda tensor, shape: np.reshape(tensor, shape), "target_modules")
    assert "reshapes" in str(info.value)
    assert "target_modules" in (info.value.hint or "") and "modules_to_save" not in (info.value.hint or "")
    layout = converter_layout("o_proj.weight", variable, lambda tensor, shape: np.reshape(tensor, shape),
                              "target_modules", (6, 4))  # with PEFT's shape: the reshape is the layout
    assert layout.spec_shape == (6, 4) and layout.perm == (0, 1, 2)