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
from adapterspec.errors import AdapterSpecWarning, UnsupportedError
from adapterspec_keras.reach import dummy_inputs
from keras_helpers import (  # noqa: E402
    ARCHS,
    assert_near,
    assert_same_snapshot,
    keras_inputs,
    keras_model,
    make_peft_adapter,
    peft_adapted_modules,
    snapshot,
    torch_logits,
    unique_values,
)

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


def test_a_layer_whose_call_never_runs_refuses_what_its_kernel_cannot_carry_and_the_model_is_unchanged() -> None:
    model = _model()
    x = np.linspace(-1, 1, 6, dtype="float32").reshape(2, 3)
    before, out = snapshot(model), ops.convert_to_numpy(model(x))

    for config, trainable in ((dict(LORA, target_modules=["gate", "up"], lora_bias=True), False),
                              (dict(LORA, target_modules=["gate", "up"], lora_dropout=0.1), True)):
        with pytest.raises(UnsupportedError, match=r"mlp\.up -> mlp/up") as caught:
            adapterspec.inject_adapter(model, config, trainable=trainable)
        assert caught.value.key == "mlp.up" and "mlp.gate" not in str(caught.value)
        assert_same_snapshot(before, snapshot(model))
        assert np.array_equal(ops.convert_to_numpy(model(x)), out)


def test_a_plain_lora_runs_through_the_kernel_its_parent_reads() -> None:
    """``up``'s kernel is read without calling ``up``: the read gives W + s * (B @ A)^T, the LoRA forward exactly."""
    model = _model()
    block = model.get_layer("mlp")
    x = np.linspace(-1, 1, 6, dtype="float32").reshape(2, 3)
    gate = x @ ops.convert_to_numpy(block.gate.kernel) + ops.convert_to_numpy(block.gate.bias)
    w_up = ops.convert_to_numpy(block.up.kernel)
    base = ops.convert_to_numpy(model(x))

    assert adapterspec.inject_adapter(model, dict(LORA, target_modules=["up"])) == ["mlp.up"]
    tensors = dict(adapterspec.extract_adapter(model).load_tensors("numpy"))
    a, b = tensors["base_model.model.mlp.up.lora_A.weight"], tensors["base_model.model.mlp.up.lora_B.weight"]
    expected = gate * (x @ w_up + 2.0 * (x @ a.T) @ b.T)  # lora_alpha / r = 2

    assert_near(ops.convert_to_numpy(model(x)), expected, length=3)
    assert np.abs(expected - gate * (x @ w_up)).max() > 1e-3
    assert type(block.up).__name__ == "Dense" and type(block.up) is not keras.layers.Dense
    with adapterspec.disabled_adapters(model):
        assert np.array_equal(ops.convert_to_numpy(model(x)), base)
    adapterspec.delete_adapter(model, "default")
    assert type(block.up) is keras.layers.Dense and "_adapterspec_kernel_entries" not in block.up.__dict__


def test_a_layer_whose_call_runs_takes_the_adapter() -> None:
    model = _model()
    x = np.linspace(-1, 1, 6, dtype="float32").reshape(2, 3)
    base = ops.convert_to_numpy(model(x))
    assert adapterspec.inject_adapter(model, dict(LORA, target_modules=["gate"])) == ["mlp.gate"]
    assert np.abs(ops.convert_to_numpy(model(x)) - base).max() > 1e-3  # the adapter is used


def test_the_check_runs_one_forward_per_model_and_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a layer's call runs is remembered per model and layer: a second load of the same layers runs no
    forward (and still refuses / reads through as the first did), a load wrapping a layer not checked yet runs one,
    and another model is checked on its own (each forward here on the whole model costs one full inference)."""
    from adapterspec_keras import reach

    calls: list[int] = []
    original = reach.dummy_inputs
    monkeypatch.setattr(reach, "dummy_inputs", lambda m: (calls.append(id(m)), original(m))[1])
    model = _model()
    x = np.linspace(-1, 1, 6, dtype="float32").reshape(2, 3)
    biased = dict(LORA, target_modules=["up"], lora_bias=True)
    for _ in range(2):
        with pytest.raises(UnsupportedError, match=r"mlp\.up -> mlp/up"):
            adapterspec.inject_adapter(model, biased)
    assert len(calls) == 1
    base = ops.convert_to_numpy(model(x))
    for _ in range(2):  # read through up's kernel both times: the adapter changes the output
        adapterspec.inject_adapter(model, dict(LORA, target_modules=["up"]))
        assert np.abs(ops.convert_to_numpy(model(x)) - base).max() > 1e-3
        adapterspec.delete_adapter(model, "default")
    assert len(calls) == 1  # the same layer: the first forward's answer
    adapterspec.inject_adapter(model, dict(LORA, target_modules=["gate"]))
    assert len(calls) == 2  # a layer no forward checked yet
    adapterspec.inject_adapter(_model(), dict(LORA, target_modules=["gate"]))
    assert len(calls) == 3  # another model


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
def test_gemma4_lora_on_every_linear_layer_gives_peft_logits(checkpoints: Any, token_ids: np.ndarray,
                                                            tmp_path: Path) -> None:
    """The issue's case: on keras-hub 0.32's Gemma 4 a LoRA on gate/up/down_proj loaded and changed nothing (2.81
    from PEFT's logits): the MLP reads the kernels itself, which now carry the adapter."""
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    peft_model, folder = make_peft_adapter(checkpoints["gemma4_text"], tmp_path / "a",
                                           peft.LoraConfig(r=4, lora_alpha=8,
                                                           target_modules=list(ARCHS["gemma4_text"].linear_targets)))
    expected = torch_logits(peft_model, token_ids)
    model = keras_model("gemma4_text", checkpoints["gemma4_text"])
    base = _gemma4_logits(model, token_ids)

    modules = adapterspec.load_adapter(model, folder)

    assert set(modules) == peft_adapted_modules(peft_model) and len(modules) == 14
    assert_near(_gemma4_logits(model, token_ids), expected)
    assert np.abs(expected - base).max() > 1e-2
    with adapterspec.disabled_adapters(model):
        assert np.abs(_gemma4_logits(model, token_ids) - base).max() == 0.0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_gemma4_lora_bias_on_the_mlp_is_refused_naming_the_layers(checkpoints: Any, token_ids: np.ndarray,
                                                              tmp_path: Path) -> None:
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    _, folder = make_peft_adapter(checkpoints["gemma4_text"], tmp_path / "a", peft.LoraConfig(
        r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "gate_proj", "down_proj"]))
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


class _NeedsTwo(_ReadsKernel):
    """``_ReadsKernel`` taking a second input: it cannot run alone; and, like Gemma 4's vision tower pooling its
    patches, it does not run on an image of one patch (the size the check guesses for an open image dimension): so
    ``gate`` and ``up`` stay undecided."""

    def build(self, x_shape: Any, y_shape: Any) -> None:  # type: ignore[override]
        super().build(x_shape)

    def call(self, x: Any, y: Any) -> Any:  # type: ignore[override]
        if x.shape[1] == 1:
            raise ValueError("an image of one patch cannot be pooled")
        return super().call(x) + y


def _open_image_model(two: bool = False) -> Any:
    """Like keras-hub's multimodal Gemma 3 / 4: a float input of open size, so the whole model cannot be run on a
    made-up batch; ``two``: the block needs a second input, so no ancestor of ``gate`` / ``up`` runs alone."""
    pixels = keras.Input((None, 3), name="pixel_values")
    out = _NeedsTwo(name="mlp")(pixels, pixels[..., :1]) if two else _ReadsKernel(name="mlp")(pixels)
    model = keras.Model(pixels, out)
    model.set_weights([np.sin(np.arange(w.size) + i).reshape(w.shape).astype("float32")
                       for i, w in enumerate(model.get_weights())])
    return model


def _lora_up_expected(kernels: list[np.ndarray], x: np.ndarray, model: Any) -> np.ndarray:
    """``_ReadsKernel``'s output with the LoRA on ``up`` (kernels: gate's kernel and bias, up's kernel, unadapted)."""
    tensors = dict(adapterspec.extract_adapter(model).load_tensors("numpy"))
    a = next(v for k, v in tensors.items() if k.endswith("up.lora_A.weight"))
    b = next(v for k, v in tensors.items() if k.endswith("up.lora_B.weight"))
    gate_kernel, gate_bias, up_kernel = kernels
    return (x @ gate_kernel + gate_bias) * (x @ up_kernel + 2.0 * (x @ a.T) @ b.T)  # lora_alpha / r = 2


def test_with_an_image_input_of_open_size_each_layers_parent_is_run_alone() -> None:
    """issue #16, keras-hub's multimodal Gemma 4 (its vision tower's ``Gemma4ClippableEinsumDense`` reads
    ``self.dense.kernel``): the model's inputs cannot be made, the check was skipped, and a LoRA on such a layer
    loaded and changed nothing (0.30 from PEFT's logits). Now the parent runs alone, reads the kernel without
    calling the layer: a LoRA runs through the kernel, lora_bias (a bias of its own) is refused, the model
    unchanged."""
    model = _open_image_model()
    kernels = model.get_weights()
    x = np.linspace(-1, 1, 12, dtype="float32").reshape(2, 2, 3)
    before, base = snapshot(model), ops.convert_to_numpy(model(x))
    assert dummy_inputs(model)[0] is None

    with pytest.raises(UnsupportedError, match=r"mlp\.up -> mlp/up") as caught:
        adapterspec.inject_adapter(model, dict(LORA, target_modules=["gate", "up"], lora_bias=True))
    assert "mlp.gate" not in str(caught.value)  # called by its parent: not refused
    assert_same_snapshot(before, snapshot(model))

    assert adapterspec.inject_adapter(model, dict(LORA, target_modules=["up"])) == ["mlp.up"]
    expected = _lora_up_expected(kernels, x, model)
    assert_near(ops.convert_to_numpy(model(x)), expected, length=3)
    assert np.abs(expected - base).max() > 1e-3


def test_a_layer_no_ancestor_can_run_alone_takes_a_plain_lora_through_its_kernel_and_refuses_others() -> None:
    """Undecided (no ancestor runs alone): a plain LoRA runs through the kernel, exact whether or not the layer's
    call runs (``up``: read by its parent; ``gate``: called); an adapter a kernel cannot carry is refused naming
    them (it might load and change nothing: ``up``'s lora_bias would), the model unchanged."""
    model = _open_image_model(two=True)
    kernels = model.get_weights()
    x = np.linspace(-1, 1, 12, dtype="float32").reshape(2, 2, 3)
    base = ops.convert_to_numpy(model(x))

    assert adapterspec.inject_adapter(model, dict(LORA, target_modules=["up"])) == ["mlp.up"]
    expected = _lora_up_expected(kernels, x, model) + x[..., :1]
    assert_near(ops.convert_to_numpy(model(x)), expected, length=3)
    assert np.abs(expected - base).max() > 1e-3
    adapterspec.delete_adapter(model, "default")

    before = snapshot(model)
    with pytest.raises(UnsupportedError, match=r"cannot check that Functional's forward runs the Keras layers "
                                               r"of mlp\.up, mlp\.gate .* this LORA adapter would change nothing"):
        adapterspec.inject_adapter(model, dict(LORA, target_modules=["gate", "up"], lora_bias=True))
    assert_same_snapshot(before, snapshot(model))
    assert adapterspec.adapter_names(model) == []


class _ImageTokens(_ReadsKernel):
    """``_ReadsKernel`` on images of open count that takes the token ids too, and runs only when there are 4 tokens
    per image (T5Gemma 2: ``vision_indices`` hold ``mm_tokens_per_image`` positions per image)."""

    def build(self, x_shape: Any, ids_shape: Any) -> None:  # type: ignore[override]
        super().build(x_shape)

    def call(self, x: Any, ids: Any) -> Any:  # type: ignore[override]
        if x.shape[1] is not None and ids.shape[1] is not None and ids.shape[1] != 4 * x.shape[1]:
            raise ValueError("4 tokens per image")
        return super().call(x)


def test_a_model_of_open_image_count_runs_on_one_image_and_as_many_tokens_as_it_takes() -> None:
    """T5Gemma 2's case: images of open count, and a block that needs two inputs (no ancestor runs alone), so
    neither two tokens nor a parent alone ran it and lora_bias on a layer it calls (``gate``) was refused as
    undecided, while PEFT runs it. The check now runs the model on one image with 2, 4, 8, ... tokens until it runs:
    ``gate``'s call runs, and its lora_bias loads, exact; ``up``'s kernel is read by its parent without its call:
    lora_bias there is refused as such (not as undecided), the model unchanged."""
    images = keras.Input((None, 3), name="images")
    ids = keras.Input((None,), dtype="int32", name="token_ids")
    model = keras.Model({"images": images, "token_ids": ids}, _ImageTokens(name="mlp")(images, ids))
    model.set_weights([np.sin(np.arange(w.size) + i).reshape(w.shape).astype("float32")
                       for i, w in enumerate(model.get_weights())])
    block = model.get_layer("mlp")
    x = np.linspace(-1, 1, 12, dtype="float32").reshape(2, 2, 3)
    inputs = {"images": x, "token_ids": np.zeros((2, 8), dtype="int32")}
    w_gate, b_gate, w_up = (ops.convert_to_numpy(v) for v in (block.gate.kernel, block.gate.bias, block.up.kernel))
    assert dummy_inputs(model)[0] is None
    before = snapshot(model)

    with pytest.raises(UnsupportedError, match=r"never runs the call of the Keras layers .*: mlp\.up -> mlp/up") \
            as caught:
        adapterspec.inject_adapter(model, dict(LORA, target_modules=["gate", "up"], lora_bias=True))
    assert "mlp.gate" not in str(caught.value)
    assert_same_snapshot(before, snapshot(model))

    known = {id(v) for v in model.trainable_variables}
    assert adapterspec.inject_adapter(model, dict(LORA, target_modules=["gate"], lora_bias=True)) == ["mlp.gate"]
    for i, variable in enumerate(sorted((v for v in model.trainable_variables if id(v) not in known),
                                        key=lambda v: v.path)):
        variable.assign(unique_values(tuple(variable.shape), i, scale=0.5))
    tensors = dict(adapterspec.extract_adapter(model).load_tensors("numpy"))
    a, b = tensors["base_model.model.mlp.gate.lora_A.weight"], tensors["base_model.model.mlp.gate.lora_B.weight"]
    bias = tensors["base_model.model.mlp.gate.lora_B.bias"]
    expected = (x @ w_gate + b_gate + 2.0 * ((x @ a.T) @ b.T + bias)) * (x @ w_up)  # lora_alpha / r = 2, as PEFT
    assert np.abs(bias).min() > 1e-3
    assert_near(ops.convert_to_numpy(model(inputs)), expected, length=3)


class _StepOnly(keras.Model):
    """Like keras-hub's Gemma 4 assistant: a functional model whose ``call`` raises (it runs only through
    ``step``, as the assistant runs only through ``call_with_cache``), so no forward can check which layers run."""

    def __init__(self) -> None:
        inputs = keras.Input((3,), name="x")
        block = _ReadsKernel(name="mlp")
        super().__init__(inputs, block(inputs))
        self.block = block

    def call(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("runs only through step()")

    def step(self, x: Any) -> Any:
        return self.block(x)


def test_a_model_whose_forward_cannot_run_takes_a_plain_lora_through_every_kernel() -> None:
    """The check cannot run: a plain LoRA reads through every kernel, exact whether the layer is called (``gate``)
    or its kernel read by its parent (``up``; before: ignored, with a warning only -- the output was the base's)."""
    model = _StepOnly()
    model.set_weights([np.sin(np.arange(w.size) + i).reshape(w.shape).astype("float32")
                       for i, w in enumerate(model.get_weights())])
    block = model.block
    x = np.linspace(-1, 1, 6, dtype="float32").reshape(2, 3)
    w_gate, bias = ops.convert_to_numpy(block.gate.kernel), ops.convert_to_numpy(block.gate.bias)
    w_up = ops.convert_to_numpy(block.up.kernel)

    with pytest.warns(adapterspec.AdapterSpecWarning) as warned:
        modules = adapterspec.inject_adapter(model, dict(LORA, target_modules=["gate", "up"]))
    assert sorted(modules) == ["mlp.gate", "mlp.up"]
    tensors = dict(adapterspec.extract_adapter(model).load_tensors("numpy"))
    a = {m: tensors[f"base_model.model.mlp.{m}.lora_A.weight"] for m in ("gate", "up")}
    b = {m: tensors[f"base_model.model.mlp.{m}.lora_B.weight"] for m in ("gate", "up")}
    gate = x @ w_gate + bias + 2.0 * (x @ a["gate"].T) @ b["gate"].T
    expected = gate * (x @ w_up + 2.0 * (x @ a["up"].T) @ b["up"].T)

    actual = ops.convert_to_numpy(model.step(x))
    assert np.abs(expected - (x @ w_gate + bias) * (x @ w_up)).max() > 1e-3
    assert_near(actual, expected, length=3)
    assert "an adapter on a Dense / EinsumDense runs through its kernel" in str(warned[0].message)


def test_a_model_whose_forward_cannot_run_refuses_other_methods() -> None:
    """The check cannot run: lora_bias (a bias of its own, which a kernel cannot carry) is refused naming the
    layers, the model unchanged -- on ``up`` (its kernel read by its parent) it would load and change nothing."""
    model = _StepOnly()
    before = snapshot(model)
    with pytest.warns(adapterspec.AdapterSpecWarning), \
            pytest.raises(UnsupportedError, match=r"mlp\.up, mlp\.gate .* this LORA adapter would change nothing"):
        adapterspec.inject_adapter(model, dict(LORA, target_modules=["gate", "up"], lora_bias=True))
    assert_same_snapshot(before, snapshot(model))
