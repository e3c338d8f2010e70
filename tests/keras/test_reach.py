"""An adapter the model's forward does not run is refused at injection, naming the layer, and the model is left as
it was (issue #16: keras-hub's Gemma 4 MLP reads ``self.gating_ffw.kernel`` itself, so a LoRA on gate_proj loaded,
was listed as adapted, and changed nothing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from keras import ops

import adapterspec
from adapterspec.errors import UnsupportedError
from adapterspec_keras.reach import dummy_inputs
from keras_helpers import assert_same_snapshot, keras_inputs, keras_model, make_peft_adapter, snapshot

LORA = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "init_lora_weights": False}


class _ReadsKernel(keras.layers.Layer):
    """Like keras-hub's Gemma 4 MLP: ``gate`` is called, ``up``'s kernel is read without calling ``up``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = keras.layers.Dense(4, name="gate")
        self.up = keras.layers.Dense(4, use_bias=False, name="up")

    def build(self, input_shape: Any) -> None:
        self.gate.build(input_shape)
        self.up.build(input_shape)

    def call(self, x: Any) -> Any:
        return self.gate(x) * ops.matmul(x, self.up.kernel)


def _model() -> Any:
    inputs = keras.Input((3,), name="x")
    model = keras.Model(inputs, _ReadsKernel(name="mlp")(inputs))
    model.set_weights([np.sin(np.arange(w.size) + i).reshape(w.shape).astype("float32")
                       for i, w in enumerate(model.get_weights())])
    return model


def test_a_layer_whose_call_never_runs_is_refused_and_the_model_is_unchanged() -> None:
    model = _model()
    x = np.linspace(-1, 1, 6, dtype="float32").reshape(2, 3)
    before, out = snapshot(model), ops.convert_to_numpy(model(x))

    with pytest.raises(UnsupportedError, match=r"mlp\.up -> mlp/up") as caught:
        adapterspec.inject_adapter(model, dict(LORA, target_modules=["gate", "up"]))

    assert caught.value.key == "mlp.up" and "mlp.gate" not in str(caught.value)
    assert_same_snapshot(before, snapshot(model))
    assert np.array_equal(ops.convert_to_numpy(model(x)), out)


def test_a_layer_whose_call_runs_takes_the_adapter() -> None:
    model = _model()
    x = np.linspace(-1, 1, 6, dtype="float32").reshape(2, 3)
    base = ops.convert_to_numpy(model(x))
    assert adapterspec.inject_adapter(model, dict(LORA, target_modules=["gate"])) == ["mlp.gate"]
    assert np.abs(ops.convert_to_numpy(model(x)) - base).max() > 1e-3  # the adapter is used


def test_inputs_are_two_tokens_or_the_check_says_why_not() -> None:
    ids = keras.Input((None,), dtype="int32", name="token_ids")
    mask = keras.Input((None,), dtype="int32", name="padding_mask")
    text = keras.Model({"token_ids": ids, "padding_mask": mask}, keras.layers.Embedding(8, 2)(ids))
    made, why = dummy_inputs(text)
    assert why is None
    assert made["token_ids"].tolist() == [[0, 0]] and made["padding_mask"].tolist() == [[1, 1]]
    image = keras.Input((None, None, 3), name="images")
    assert dummy_inputs(keras.Model(image, keras.layers.Conv2D(2, 1)(image)))[1] == \
        "Functional takes a float input of open size (an image?): its size is unknown"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_gemma4_mlp_adapter_is_refused_naming_the_layers(checkpoints: Any, token_ids: np.ndarray,
                                                          tmp_path: Path) -> None:
    """The issue's case: on keras-hub 0.32's Gemma 4 a LoRA on gate/up/down_proj loaded and did nothing."""
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    _, folder = make_peft_adapter(checkpoints["gemma4_text"], tmp_path / "a",
                                  peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj", "down_proj"]))
    model = keras_model("gemma4_text", checkpoints["gemma4_text"])
    before, logits = snapshot(model), _gemma4_logits(model, token_ids)

    with pytest.raises(UnsupportedError) as caught:
        adapterspec.load_adapter(model, folder)

    message = str(caught.value)
    assert "model.layers.0.mlp.gate_proj -> decoder_block_0/ffw_gating;" in message
    assert "model.layers.1.mlp.down_proj -> decoder_block_1/ffw_linear" in message
    assert "q_proj" not in message  # the attention projections are called: they are not refused
    assert_same_snapshot(before, snapshot(model))
    assert np.array_equal(_gemma4_logits(model, token_ids), logits)


def _gemma4_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype="int32"), ids.shape)
    return np.asarray(ops.convert_to_numpy(model({**keras_inputs(ids), "position_ids": positions})))
