"""Quantized layers on Keras (SPEC.md 6.8), the mirror of tests/torch/test_quantized.py: on layers that Keras'
``model.quantize`` made int8 or float8, LoRA-family adapters run unmerged -- as Keras' own LoRA on a quantized
Dense computes, and adding to each adapted layer the term they add on the unquantized model; what reads or writes
the kernel's values is refused with a typed error, the model unchanged. A merge any layer cannot do is refused
before any kernel moves, as on torch."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("keras_hub")
pytest.importorskip("peft")

import adapterspec  # noqa: E402
from adapterspec.identity import FINGERPRINT_KEY  # noqa: E402
from keras_helpers import (  # noqa: E402
    assert_near,
    assert_refused_unchanged,
    keras_logits,
    keras_model,
    make_peft_adapter,
    unique_values,
)

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _dense_model() -> Any:
    inputs = keras.Input((16,))
    hidden = keras.layers.Dense(32, activation="relu", name="up")(inputs)
    return keras.Model(inputs, keras.layers.Dense(8, name="down")(hidden))


@pytest.mark.parametrize("mode", ["int8"])  # Keras' float8 layers have no LoRA of their own to compare with
def test_lora_on_a_quantized_dense_is_keras_own_lora(mode: str, tmp_path: Path) -> None:
    """A PEFT-layout LoRA file on an int8 Dense model gives what Keras' own LoRA (``enable_lora``) on the same
    quantized layers gives; deleting it gives the quantized model back; merging is refused, nothing changed."""
    keras.utils.set_random_seed(0)
    model, reference = _dense_model(), _dense_model()
    reference.set_weights(model.get_weights())
    model.quantize(mode)
    reference.quantize(mode)
    r, alpha = 4, 8
    tensors = {}
    for salt, (name, n_in, n_out) in enumerate([("up", 16, 32), ("down", 32, 8)]):
        a = unique_values((r, n_in), 2 * salt, scale=0.3)
        b = unique_values((n_out, r), 2 * salt + 1, scale=0.3)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        layer = reference.get_layer(name)
        layer.enable_lora(r, lora_alpha=alpha)
        layer.lora_kernel_a.assign(a.T)
        layer.lora_kernel_b.assign(b.T)
    config = adapterspec.AdapterConfig.from_dict({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                  "target_modules": ["up", "down"]})
    adapterspec.write_adapter(tmp_path / "lora", config, tensors)
    x = unique_values((3, 16), 9, scale=1.0)
    base = np.asarray(model(x))
    adapterspec.load_adapter(model, tmp_path / "lora", module_map={"up": "up", "down": "down"})
    got, expected = np.asarray(model(x)), np.asarray(reference(x))
    assert float(np.abs(got - base).max()) > 0.1
    assert_near(got, expected, length=32)
    assert_refused_unchanged(model, lambda: adapterspec.merge_adapters(model), adapterspec.UnsupportedError,
                             f"which is quantized ({mode})")
    adapterspec.save_adapter(model, tmp_path / "saved")
    assert FINGERPRINT_KEY not in adapterspec.read_adapter(tmp_path / "saved").metadata
    adapterspec.delete_adapter(model, "default")
    assert np.array_equal(np.asarray(model(x)), base)


def _peft_configs() -> dict[str, Any]:
    from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, VeraConfig

    return {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
        "loha": LoHaConfig(r=4, target_modules=TARGETS),
        "lokr": LoKrConfig(r=4, target_modules=TARGETS),
        "vera": VeraConfig(r=4, target_modules=["q_proj", "o_proj"], save_projection=True),
        "adalora": AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"]),
        "ia3": IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    }


@pytest.fixture(scope="module")
def llama_pair(checkpoints: dict[str, Path]) -> tuple[Any, Any]:
    """keras-hub's Llama as converted, and a copy quantized int8 (each test deletes what it loads)."""
    quantized = keras_model("llama", checkpoints["llama"])
    quantized.quantize("int8")
    return keras_model("llama", checkpoints["llama"]), quantized


@pytest.mark.parametrize("method", list(_peft_configs()))
def test_peft_adapter_on_an_int8_keras_hub_model(method: str, checkpoints: dict[str, Path], tmp_path: Path,
                                                 token_ids: Any, llama_pair: tuple[Any, Any]) -> None:
    """A PEFT adapter on keras-hub's Llama quantized int8: every adapted layer's output changes by what the adapter
    changes it by on the unquantized model (its term from the layer's input; IA3: the quantized output scaled)."""
    peft_model, folder = make_peft_adapter(checkpoints["llama"], tmp_path / "peft", _peft_configs()[method])
    import torch

    with torch.no_grad():  # LoHa's, LoKr's and VeRA's tensors too (the helper fills LoRA's and IA3's)
        for index, (name, tensor) in enumerate(sorted(peft_model.named_parameters())):
            if any(m in name for m in ("hada_", "lokr_", "vera_lambda")):
                tensor.copy_(torch.from_numpy(unique_values(tuple(tensor.shape), index, around=0.5, scale=0.3)))
    peft_model.save_pretrained(folder)
    plain, quantized = llama_pair
    before = keras_logits(quantized, token_ids)
    adapterspec.load_adapter(quantized, folder)
    adapterspec.load_adapter(plain, folder)
    assert float(np.abs(keras_logits(quantized, token_ids) - before).max()) > 1e-3
    x = unique_values((2, 5, 64), 3, scale=1.0)
    layer_path = "transformer_layer_0/self_attention/query"
    q_layer = next(layer for layer in quantized._flatten_layers() if layer.path == layer_path)
    p_layer = next(layer for layer in plain._flatten_layers() if layer.path == layer_path)
    q_out = np.asarray(q_layer(x))
    p_out = np.asarray(p_layer(x))
    with adapterspec.disabled_adapters(quantized), adapterspec.disabled_adapters(plain):
        q_base, p_base = np.asarray(q_layer(x)), np.asarray(p_layer(x))
    if method == "ia3":  # q_proj is not feed-forward: the output is scaled, l * base(x)
        scale = np.divide(p_out, p_base, out=np.ones_like(p_out), where=np.abs(p_base) > 1e-3)
        assert_near(q_out, q_base * scale, mask=np.abs(p_base) > 1e-3)
    else:
        assert float(np.abs(p_out - p_base).max()) > 1e-3
        assert_near(q_out - q_base, p_out - p_base)
    adapterspec.delete_adapter(quantized, "default")
    adapterspec.delete_adapter(plain, "default")
    assert np.array_equal(keras_logits(quantized, token_ids), before)


#: (PEFT config, what the refusal says, the layers a model quantized without them loads the adapter onto)
KERNEL_READERS = {
    "dora": ({"use_dora": True}, "DoRA's weight norm reads the kernel", r"self_attention/(query|value)$"),
    "pissa": ({"init_lora_weights": "pissa"}, "not int8", None),
    "lm_head": ({"modules_to_save": ["lm_head"]}, "a module saved whole (modules_to_save) cannot hold a quantized",
                r"^token_embedding$"),
    "mlp": ({"modules_to_save": ["model.layers.1.mlp"]}, "cannot hold a quantized layer ('transformer_layer_1/",
            r"^transformer_layer_1/feedforward_"),
    "tokens": ({"trainable_token_indices": [1, 5]}, "trainable token rows replace rows of ReversibleEmbedding",
               r"^token_embedding$"),
    "embedding": ({"target_modules": ["embed_tokens", "q_proj"]}, "a quantized embedding layer", r"^token_embedding$"),
}


@pytest.mark.parametrize("case", list(KERNEL_READERS))
def test_what_reads_a_quantized_kernel_is_refused_unchanged(case: str, checkpoints: dict[str, Path], tmp_path: Path,
                                                            llama_pair: tuple[Any, Any]) -> None:
    """Refused naming the layer, the model unchanged; the fix offered is one that works: the unquantized model, or
    one quantized without those layers (``model.quantize`` refuses a model holding adapters, so loading before
    quantizing is no fix); the torch backend only where it runs the method on bitsandbytes' layers (DoRA)."""
    from peft import LoraConfig

    peft_config, needle, skipped = KERNEL_READERS[case]
    _, folder = make_peft_adapter(checkpoints["llama"], tmp_path / "peft",
                                  LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], **peft_config}))
    model = llama_pair[1]
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, folder), adapterspec.UnsupportedError,
                             needle)
    with pytest.raises(adapterspec.UnsupportedError) as info:
        adapterspec.load_adapter(model, folder)
    hint = str(info.value.hint)
    assert "before model.quantize" not in hint and "leaves adapted layers" not in hint
    if skipped is not None:
        named = re.findall(r"'([^']+)'", info.value.message)
        assert "the unquantized model" in hint
        assert "model.quantize(mode, filters=lambda layer: layer.path not in [" in hint
        assert any(path in hint for path in named if "/" in path or path == "token_embedding"), (named, hint)
        assert ("torch backend" in hint) == (case == "dora")


#: the layers a refusal names -> the cases naming them (one quantized model serves each group: models cost seconds)
LEFT_OUT = {skipped: [c for c, (_, _, s) in KERNEL_READERS.items() if s == skipped]
            for skipped in dict.fromkeys(s for _, _, s in KERNEL_READERS.values() if s)}


@pytest.mark.parametrize("skipped", list(LEFT_OUT))
def test_following_the_quantized_refusals_hint_loads(skipped: str, checkpoints: dict[str, Path], tmp_path: Path,
                                                     token_ids: Any) -> None:
    """The hint's fix: the model quantized int8 without the layers the refusal names loads the adapter (each case
    that names them, in turn), and those layers compute what they compute on the unquantized model with the
    adapter (to the bit: the same layers)."""
    from peft import LoraConfig

    model = keras_model("llama", checkpoints["llama"])
    model.quantize("int8", filters=lambda layer: not re.search(skipped, layer.path or ""))
    left_out = [layer for layer in model._flatten_layers() if re.search(skipped, layer.path or "")]
    assert left_out and not any(getattr(layer, "quantization_mode", None) for layer in left_out)
    before = keras_logits(model, token_ids)
    for case in LEFT_OUT[skipped]:
        peft_config = KERNEL_READERS[case][0]
        _, folder = make_peft_adapter(checkpoints["llama"], tmp_path / case,
                                      LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], **peft_config}))
        adapterspec.load_adapter(model, folder)
        assert float(np.abs(keras_logits(model, token_ids) - before).max()) > 1e-4, case
        saved = adapterspec.extract_adapter(model).load_tensors()
        stored = adapterspec.read_adapter(folder).load_tensors()
        assert sorted(saved) == sorted(stored) and all(np.array_equal(saved[k], stored[k]) for k in stored), case
        if case == "dora":  # the unquantized query and value layers with DoRA: as on the unquantized model
            plain = keras_model("llama", checkpoints["llama"])
            adapterspec.load_adapter(plain, folder)
            x = unique_values((2, 5, 64), 3, scale=1.0)
            for layer in left_out:
                twin = next(t for t in plain._flatten_layers() if t.path == layer.path)
                assert np.array_equal(np.asarray(layer(x)), np.asarray(twin(x)))
        adapterspec.delete_adapter(model, "default")
        assert np.array_equal(keras_logits(model, token_ids), before), case


def _int4_module_map() -> dict[str, str]:
    """keras-hub's Llama layers of q_proj and v_proj, by the transformers module names."""
    return {f"model.layers.{i}.self_attn.{m}_proj": f"transformer_layer_{i}/self_attention/{k}"
            for i in (0, 1) for m, k in (("q", "query"), ("v", "value"))}


def test_int4_kernels_are_found_by_the_converters_maps(checkpoints: dict[str, Path], tmp_path: Path,
                                                      token_ids: Any) -> None:
    """int4 packs two values a byte (the ``kernel`` property unpacks them into a new tensor at each read): the
    converters' maps find the layers all the same, and each adapted int4 layer adds the term it adds on the
    unquantized model -- the same model as with an explicit module_map (quantizing after the load is no fix:
    model.quantize refuses a model holding adapters)."""
    from peft import LoraConfig

    _, folder = make_peft_adapter(checkpoints["llama"], tmp_path / "peft",
                                  LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model, mapped = keras_model("llama", checkpoints["llama"]), keras_model("llama", checkpoints["llama"])
    model.quantize("int4")
    mapped.quantize("int4")
    before = keras_logits(model, token_ids)
    assert sorted(adapterspec.load_adapter(model, folder)) == sorted(_int4_module_map())
    assert sorted(adapterspec.load_adapter(mapped, folder, module_map=_int4_module_map())) == sorted(_int4_module_map())
    assert float(np.abs(keras_logits(model, token_ids) - before).max()) > 1e-3
    assert np.array_equal(keras_logits(model, token_ids), keras_logits(mapped, token_ids))
    plain = keras_model("llama", checkpoints["llama"])
    adapterspec.load_adapter(plain, folder)
    x = unique_values((2, 5, 64), 3, scale=1.0)
    for path in _int4_module_map().values():
        q_layer = next(layer for layer in model._flatten_layers() if layer.path == path)
        p_layer = next(layer for layer in plain._flatten_layers() if layer.path == path)
        q_out, p_out = np.asarray(q_layer(x)), np.asarray(p_layer(x))
        with adapterspec.disabled_adapters(model), adapterspec.disabled_adapters(plain):
            q_base, p_base = np.asarray(q_layer(x)), np.asarray(p_layer(x))
        assert float(np.abs(p_out - p_base).max()) > 1e-3
        assert_near(q_out - q_base, p_out - p_base)
    saved = adapterspec.extract_adapter(model).load_tensors()
    stored = adapterspec.read_adapter(folder).load_tensors()
    assert sorted(saved) == sorted(stored) and all(np.array_equal(saved[k], stored[k]) for k in stored)
    adapterspec.delete_adapter(model, "default")
    assert np.array_equal(keras_logits(model, token_ids), before)


def test_an_int4_model_names_a_missing_target_as_missing_and_an_unmapped_packed_layer_as_packed(
        checkpoints: dict[str, Path]) -> None:
    """The maps find int4 layers, so a target naming nothing on an int4 model is a TargetNotFoundError, not blamed
    on the packing; a packed layer the maps did not find (``refuse_unmapped`` told which layers they found) is
    named as packed, with module_map as the fix."""
    from adapterspec_keras.quantized import refuse_unmapped

    model = keras_model("llama", checkpoints["llama"])
    model.quantize("int4")
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(
        model, {"peft_type": "LORA", "r": 2, "target_modules": ["zz"]}), adapterspec.TargetNotFoundError,
        "match no layer")
    packed_layers = [layer for layer in model._flatten_layers() if getattr(layer, "quantization_mode", None) == "int4"]
    assert len(packed_layers) > 10
    refuse_unmapped(model, packed_layers)  # every packed layer found: nothing to say
    with pytest.raises(adapterspec.UnsupportedError) as info:
        refuse_unmapped(model, packed_layers[1:])
    assert repr(packed_layers[0].path) in info.value.message and "int4" in info.value.message
    assert "module_map=" in str(info.value.hint)


def test_an_int8_model_names_a_missing_target_as_missing(llama_pair: tuple[Any, Any]) -> None:
    """int8 keeps the kernels' shapes and the maps find every layer: a target that names no module is a
    TargetNotFoundError, as on the unquantized model -- not blamed on the quantization."""
    model = llama_pair[1]
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(
        model, {"peft_type": "LORA", "r": 2, "target_modules": ["zz"]}), adapterspec.TargetNotFoundError,
        "match no layer")


def test_a_refused_merge_leaves_every_layer_unmerged() -> None:
    """A layer that cannot merge (lora_bias without a base bias) is found before any other layer merges."""
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(8, name="a")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(8, use_bias=False, name="b")(hidden))
    config = adapterspec.AdapterConfig.from_dict({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "lora_bias": True,
                                                  "target_modules": ["a", "b"]})
    adapterspec.inject_adapter(model, config)
    for variable in model.variables:
        if "lora_B" in variable.path:
            variable.assign(np.linspace(0.1, 0.9, int(np.prod(variable.shape))).reshape(variable.shape))
    x = np.linspace(-1, 1, 16, dtype="float32").reshape(2, 8)
    out: Any = np.asarray(model(x))
    assert_refused_unchanged(model, lambda: adapterspec.merge_adapters(model), adapterspec.UnsupportedError,
                             "lora_bias cannot merge into 'b'")
    assert np.array_equal(np.asarray(model(x)), out)


def test_training_a_new_adapter_on_an_int8_model(checkpoints: dict[str, Path], tmp_path: Path, token_ids: Any) -> None:
    """QLoRA on Keras: a new LoRA on keras-hub's int8 Llama trains (only its variables move, the int8 kernels stay),
    saves without a base fingerprint, and loads back onto a fresh int8 model with the trained logits."""
    from keras_helpers import keras_inputs

    model = keras_model("llama", checkpoints["llama"])
    model.quantize("int8")
    config = adapterspec.AdapterConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                  "target_modules": TARGETS})
    adapterspec.inject_adapter(model, config)
    adapter_ids = {id(v) for v in model.trainable_variables}
    frozen = {v.path: np.asarray(v).copy() for v in model.variables if id(v) not in adapter_ids}
    trainable = [np.asarray(v).copy() for v in model.trainable_variables]
    assert trainable and all("adapterspec" in v.path for v in model.trainable_variables)
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(keras_inputs(token_ids), token_ids, epochs=2, verbose=0)
    assert all(not np.array_equal(np.asarray(v), t) for v, t in zip(model.trainable_variables, trainable)
               if "lora_B" in v.path)
    assert all(np.array_equal(np.asarray(v), frozen[v.path]) for v in model.variables if v.path in frozen)
    out = keras_logits(model, token_ids)
    adapterspec.save_adapter(model, tmp_path / "trained")
    assert FINGERPRINT_KEY not in adapterspec.read_adapter(tmp_path / "trained").metadata
    again = keras_model("llama", checkpoints["llama"])
    again.quantize("int8")
    adapterspec.load_adapter(again, tmp_path / "trained")
    assert np.array_equal(keras_logits(again, token_ids), out)


def test_lora_on_a_float8_dense_adds_its_term(tmp_path: Path) -> None:
    """On a float8 Dense (which has no LoRA of its own in Keras) the output is the quantized layer's plus
    ``s * x A^T B^T``, in float32."""
    keras.utils.set_random_seed(0)
    model = _dense_model()
    model.quantize("float8")
    a, b = unique_values((4, 32), 1, scale=0.3), unique_values((8, 4), 2, scale=0.3)
    config = adapterspec.AdapterConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                  "target_modules": ["down"]})
    adapterspec.write_adapter(tmp_path / "lora", config, {"base_model.model.down.lora_A.weight": a,
                                                          "base_model.model.down.lora_B.weight": b})
    x = unique_values((3, 16), 9, scale=1.0)
    hidden, base = np.asarray(model.get_layer("up")(x)), np.asarray(model(x))
    adapterspec.load_adapter(model, tmp_path / "lora", module_map={"up": "up", "down": "down"})
    got = np.asarray(model(x))
    assert float(np.abs(got - base).max()) > 0.1
    assert_near(got, base + hidden @ a.T @ b.T * 2.0, length=32)
