"""Quantized layers on Keras (SPEC.md 6.8): Keras' own ``model.quantize`` (int8, int4, float8) keeps a kernel that is
packed, scaled or rounded; the keras backend refuses to adapt such a layer with a typed error naming it, the model
unchanged (the torch backend runs adapters on bitsandbytes layers: tests/torch/test_quantized.py). A merge any
layer cannot do is refused before any kernel moves, as on torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("keras_hub")
pytest.importorskip("peft")

import adapterspec  # noqa: E402
from keras_helpers import assert_refused_unchanged, keras_model, make_peft_adapter  # noqa: E402


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_keras_layer_is_refused_unchanged(mode: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from peft import LoraConfig

    _, folder = make_peft_adapter(checkpoints["llama"], tmp_path / "peft",
                                  LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = keras_model("llama", checkpoints["llama"])
    model.quantize(mode)
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, folder), adapterspec.UnsupportedError,
                             f"quantized ({mode}); the keras backend does not adapt quantized layers")


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
