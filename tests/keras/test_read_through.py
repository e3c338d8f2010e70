"""Every method whose unmerged forward is a change of the kernel runs on a kernel a parent layer reads itself
(issue #16: keras-hub's Gemma 4 MLP ``ops.matmul(x, self.gating_ffw.kernel)`` and vision tower
``Gemma4ClippableEinsumDense`` never enter the wrapped ``call``): LoRA, rsLoRA, DoRA, IA3 (and feed-forward), LoHa,
LoKr, OFT, BOFT, VeRA, AdaLoRA, and several adapters at once, each against PEFT's own model on the same tiny random
transformers checkpoint, both ways (PEFT's folder loads in ours with PEFT's logits; ours loads in PEFT with no
missing or unexpected key and the same logits). Before, every method but plain LoRA was refused there
(UnsupportedError "only plain LoRA"/"never runs the call"). What a kernel cannot carry stays refused, typed, before
anything changes."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from keras import ops

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from adapterspec.errors import UnsupportedError  # noqa: E402
from keras_helpers import (  # noqa: E402
    assert_near,
    assert_same_snapshot,
    hf_model,
    keras_inputs,
    keras_model,
    peft_load_exactly,
    snapshot,
    torch_logits,
    unique_values,
)

MLP = ["gate_proj", "up_proj", "down_proj"]

#: method -> PEFT config on Gemma 4's MLP (every layer of it: the parent reads all three kernels)
METHODS: dict[str, Callable[[], Any]] = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=MLP),
    "rslora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=MLP),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=MLP),
    "ia3": lambda: peft.IA3Config(target_modules=MLP, feedforward_modules=[]),
    "ia3_feedforward": lambda: peft.IA3Config(target_modules=MLP, feedforward_modules=["down_proj"]),
    "loha": lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=MLP),
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=MLP),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=MLP),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=MLP),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=MLP, save_projection=True),
    "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_r=4, total_step=10, target_modules=MLP),
}


def fill(peft_model: Any, salt: int = 0) -> None:
    """Element-unique values in every adapter tensor of any method (scales, magnitudes and singular values around
    1): a transpose, a swapped key or a dropped adapter cannot pass."""
    near_one = ("ia3_l", "boft_s", "lora_E", "vera_lambda_b")
    tensors = sorted([*peft_model.named_parameters(),  # VeRA's projections are buffers (BOFT's permutations too)
                      *((n, b) for n, b in peft_model.named_buffers() if "vera_A" in n or "vera_B" in n)])
    with torch.no_grad():
        for index, (name, tensor) in enumerate(tensors):
            shape = tuple(tensor.shape)
            if not any(m in name for m in ("lora_", "ia3_", "hada_", "lokr_", "oft_", "boft_", "vera_")):
                continue
            if "lora_magnitude_vector" in name:
                tensor.mul_(torch.from_numpy(unique_values(shape, salt + index, around=1.0, scale=0.2)))
            elif any(m in name for m in near_one):
                tensor.copy_(torch.from_numpy(unique_values(shape, salt + index, around=1.0, scale=0.3)))
            elif "vera_lambda_d" in name:
                tensor.copy_(torch.from_numpy(unique_values(shape, salt + index, around=0.5, scale=0.5)))
            elif tensor.is_floating_point():
                tensor.copy_(torch.from_numpy(unique_values(shape, salt + index, scale=0.3)))


def peft_folder(checkpoint: Path, config: Any, folder: Path, salt: int = 0) -> Any:
    """PEFT's model with ``config`` on ``checkpoint``, filled (:func:`fill`), saved to ``folder``, in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(hf_model(checkpoint), config)
        fill(model, salt)
        model.eval()
        model.save_pretrained(str(folder))
    return model


def gemma4_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype="int32"), ids.shape)
    return np.asarray(ops.convert_to_numpy(model({**keras_inputs(ids), "position_ids": positions})))


def values(variables: list[Any]) -> list[np.ndarray]:
    return [np.array(ops.convert_to_numpy(v)) for v in variables]


@pytest.fixture(scope="module")
def gemma4(checkpoints: Any) -> Any:
    """One keras-hub Gemma 4 for the module: each test leaves it as it found it (checked, bit for bit)."""
    return keras_model("gemma4_text", checkpoints["gemma4_text"])


def _mlp_layers(model: Any) -> list[Any]:
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if layer.name.startswith("ffw_") and hasattr(type(layer), "kernel")]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", list(METHODS))
def test_a_method_on_kernels_gemma4s_mlp_reads_gives_peft_logits_both_ways(
        method: str, gemma4: Any, checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """PEFT's folder loads (before: UnsupportedError for all but LoRA), the MLP kernels read give PEFT's logits; the
    folder we save is PEFT's tensor for tensor and PEFT loads it (no missing or unexpected key, no warning) with the
    same logits; deleting the adapter gives the model back bit for bit, its layers their own class."""
    checkpoint = checkpoints["gemma4_text"]
    peft_model = peft_folder(checkpoint, METHODS[method](), tmp_path / "peft")
    expected = torch_logits(peft_model, token_ids)
    base = torch_logits(hf_model(checkpoint), token_ids)
    before, keras_base = snapshot(gemma4), gemma4_logits(gemma4, token_ids)
    classes = [type(layer) for layer in _mlp_layers(gemma4)]

    modules = adapterspec.load_adapter(gemma4, tmp_path / "peft")
    try:
        _check_both_ways(gemma4, checkpoint, method, modules, classes, expected, base, keras_base, token_ids, tmp_path)
    finally:
        adapterspec.delete_adapter(gemma4, "default")
    assert [type(layer) for layer in _mlp_layers(gemma4)] == classes
    assert all("_adapterspec_kernel_entries" not in layer.__dict__ for layer in _mlp_layers(gemma4))
    assert_same_snapshot(before, snapshot(gemma4))
    assert np.array_equal(gemma4_logits(gemma4, token_ids), keras_base)


def _check_both_ways(gemma4: Any, checkpoint: Path, method: str, modules: list[str], classes: list[type],
                     expected: np.ndarray, base: np.ndarray, keras_base: np.ndarray, token_ids: np.ndarray,
                     tmp_path: Path) -> None:
    assert sorted(modules) == sorted(f"model.layers.{i}.mlp.{m}" for i in range(2) for m in MLP)
    actual = gemma4_logits(gemma4, token_ids)
    diff = float(np.abs(actual - expected).max())
    print(f"READ-THROUGH gemma4_text {method}: max abs diff vs PEFT {diff:.2e} (adapter effect "
          f"{float(np.abs(expected - base).max()):.2e}, base conversion {float(np.abs(keras_base - base).max()):.2e})")
    assert np.abs(expected - base).max() > 1e-2  # the adapter moves PEFT's logits: a no-op cannot pass
    assert_near(actual, expected)
    assert all(type(layer) is not cls for layer, cls in zip(_mlp_layers(gemma4), classes))  # read through

    adapterspec.save_adapter(gemma4, tmp_path / "ours")
    from safetensors.numpy import load_file

    ours, theirs = load_file(tmp_path / "ours" / "adapter_model.safetensors"), \
        load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    reloaded, said = peft_load_exactly(checkpoint, tmp_path / "ours")
    # PEFT's BOFT says it runs without its CUDA extension on this CPU machine (one butterfly factor: the config's)
    assert [w for w in said if not w.startswith(("Failed to load the CUDA extension",
                                                 "Setting boft_n_butterfly_factor to 1"))] == []
    assert_near(torch_logits(reloaded, token_ids), expected)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["dora", "ia3_feedforward", "lokr", "oft", "vera"])
def test_merge_and_unmerge_on_kernels_a_parent_reads(method: str, gemma4: Any, checkpoints: Any,
                                                     token_ids: np.ndarray, tmp_path: Path) -> None:
    """Merged, the kernels hold the adapter (the read adds nothing more: PEFT's logits once, not twice); unmerged,
    the kernels are the base's again within fp32 rounding and the reads give PEFT's logits again."""
    peft_model = peft_folder(checkpoints["gemma4_text"], METHODS[method](), tmp_path / "peft", salt=3)
    expected = torch_logits(peft_model, token_ids)
    variables = list(gemma4.weights)
    base_kernels = values(variables)
    adapterspec.load_adapter(gemma4, tmp_path / "peft")
    try:
        adapterspec.merge_adapters(gemma4)
        merged = gemma4_logits(gemma4, token_ids)
        assert_near(merged, expected)
        assert any(not np.array_equal(a, b) for a, b in zip(values(variables), base_kernels))
        adapterspec.unmerge_adapters(gemma4)
        for now, was in zip(values(variables), base_kernels):
            assert_near(now, was, length=128)
        assert_near(gemma4_logits(gemma4, token_ids), expected)
    finally:
        adapterspec.delete_adapter(gemma4, "default")
        for variable, value in zip(variables, base_kernels):
            variable.assign(value)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_adapters_switching_and_stacked_in_peft_order(gemma4: Any, checkpoints: Any, token_ids: np.ndarray,
                                                          tmp_path: Path) -> None:
    """A LoRA ``a`` and a DoRA ``b`` on the same kernels: each alone gives PEFT's logits of that adapter, both
    active give PEFT's with both active (``b``'s DoRA rescales the output ``a`` already changed, PEFT's order), and
    deleting both gives the model back bit for bit."""
    checkpoint = checkpoints["gemma4_text"]
    lora, dora = METHODS["lora"](), METHODS["dora"]()
    peft_folder(checkpoint, lora, tmp_path / "a", salt=1)
    peft_folder(checkpoint, dora, tmp_path / "b", salt=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(hf_model(checkpoint), tmp_path / "a", adapter_name="a").eval()
        reference.load_adapter(tmp_path / "b", adapter_name="b")
    before = snapshot(gemma4)

    adapterspec.load_adapter(gemma4, tmp_path / "a", "a")
    adapterspec.load_adapter(gemma4, tmp_path / "b", "b")
    try:
        results = {}
        for active in (["a"], ["b"], ["a", "b"]):
            reference.base_model.set_adapter(active)
            adapterspec.set_active_adapters(gemma4, active)
            expected = torch_logits(reference, token_ids)
            results["+".join(active)] = expected
            diff = float(np.abs(gemma4_logits(gemma4, token_ids) - expected).max())
            print(f"READ-THROUGH gemma4_text active {active}: max abs diff vs PEFT {diff:.2e}")
            assert_near(gemma4_logits(gemma4, token_ids), expected)
        assert np.abs(results["a"] - results["b"]).max() > 1e-2
        assert np.abs(results["a+b"] - results["b"]).max() > 1e-2
    finally:
        adapterspec.delete_adapter(gemma4, "a")
        adapterspec.delete_adapter(gemma4, "b")
    assert_same_snapshot(before, snapshot(gemma4))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("config", [
    {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["gate_proj", "q_proj"], "lora_bias": True},
], ids=["lora_bias"])
def test_what_a_kernel_cannot_carry_is_refused_on_gemma4_before_anything_changes(gemma4: Any, config: Any,
                                                                                 token_ids: np.ndarray) -> None:
    before, logits = snapshot(gemma4), gemma4_logits(gemma4, token_ids)
    with pytest.raises(UnsupportedError) as caught:
        adapterspec.inject_adapter(gemma4, config)
    message = str(caught.value)
    assert "model.layers.0.mlp.gate_proj -> decoder_block_0/ffw_gating" in message
    assert "lora_bias adds a bias of its own, which a kernel cannot carry" in message
    assert "q_proj" not in message  # called by its parent: it takes lora_bias in its call
    assert_same_snapshot(before, snapshot(gemma4))
    assert np.array_equal(gemma4_logits(gemma4, token_ids), logits)


def test_training_with_dropout_on_a_kernel_a_parent_reads_is_refused(gemma4: Any) -> None:
    before = snapshot(gemma4)
    with pytest.raises(UnsupportedError, match=r"ffw_gating.*training with lora_dropout > 0 drops the input of "
                                               r"the adapter's term alone"):
        adapterspec.inject_adapter(gemma4, {"peft_type": "LORA", "r": 2, "target_modules": ["gate_proj"],
                                            "lora_dropout": 0.1}, trainable=True)
    assert_same_snapshot(before, snapshot(gemma4))


# ---------------------------------------------------------------------------------------------------------------
# A layer with a bias whose kernel (and bias) a parent reads: IA3 on its output would scale the bias too


class _ReadsKernelAndBias(keras.layers.Layer):  # type: ignore[misc]
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.up = keras.layers.Dense(4, name="up")

    def build(self, input_shape: Any) -> None:
        self.up.build(input_shape)

    def call(self, x: Any) -> Any:
        return ops.matmul(x, self.up.kernel) + self.up.bias


def _biased_model() -> Any:
    inputs = keras.Input((3,), name="x")
    model = keras.Model(inputs, _ReadsKernelAndBias(name="mlp")(inputs))
    model.set_weights([np.sin(np.arange(w.size) + i).reshape(w.shape).astype("float32")
                       for i, w in enumerate(model.get_weights())])
    return model


def test_ia3_on_the_output_of_a_layer_with_a_bias_is_refused_feedforward_runs() -> None:
    """IA3 on the output scales ``x @ W + b`` (PEFT), which a kernel cannot (the bias would be scaled too): refused,
    the model unchanged. Feed-forward IA3 scales the input (the kernel's rows): exact."""
    model = _biased_model()
    x = np.linspace(-1, 1, 6, dtype="float32").reshape(2, 3)
    before, out = snapshot(model), ops.convert_to_numpy(model(x))
    with pytest.raises(UnsupportedError, match=r"mlp\.up -> mlp/up.*IA3 scales the output of a layer with a bias"):
        adapterspec.inject_adapter(model, {"peft_type": "IA3", "target_modules": ["up"], "feedforward_modules": []})
    assert_same_snapshot(before, snapshot(model))
    assert np.array_equal(ops.convert_to_numpy(model(x)), out)

    adapterspec.inject_adapter(model, {"peft_type": "IA3", "target_modules": ["up"], "feedforward_modules": ["up"],
                                       "init_ia3_weights": False})  # random vector, not ones
    vector = dict(adapterspec.extract_adapter(model).load_tensors("numpy"))["base_model.model.mlp.up.ia3_l"]
    block = model.get_layer("mlp")
    w, b = (ops.convert_to_numpy(v) for v in (type(block.up)._adapterspec_base_kernel.fget(block.up), block.up.bias))
    assert np.abs(vector - 1).max() > 1e-2
    assert_near(ops.convert_to_numpy(model(x)), (x * vector) @ w + b, length=3)


# ---------------------------------------------------------------------------------------------------------------
# Gemma 4's vision tower: ``Gemma4ClippableEinsumDense`` reads ``self.dense.kernel`` (the multimodal model's image
# input has an open size, so each layer's parent is run alone to find it)

VISION = r"model\.vision_tower\..*_proj\.linear"

#: method -> PEFT config on every linear layer of the vision tower (attention and MLP)
VISION_METHODS: dict[str, Callable[[], Any]] = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=VISION),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=VISION),
    "ia3_feedforward": lambda: peft.IA3Config(target_modules=VISION, feedforward_modules=r".*mlp\.down_proj\.linear"),
    "loha": lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=VISION),
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=VISION),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=VISION),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=VISION),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=VISION),
    "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_r=4, total_step=10, target_modules=VISION),
}


@pytest.fixture(scope="module")
def gemma4_vision(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The tiny multimodal Gemma 4 checkpoint of the converter matrix and its keras-hub twin (one for the module)."""
    import keras_hub
    from test_converter_matrix import _gemma4

    folder = tmp_path_factory.mktemp("gemma4_mm") / "hf"
    _gemma4(folder)
    return folder, keras_hub.models.Gemma4CausalLM.from_preset(str(folder), preprocessor=None)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", list(VISION_METHODS))
def test_a_method_on_gemma4s_vision_kernels_gives_peft_logits(method: str, gemma4_vision: tuple[Path, Any],
                                                              tmp_path: Path) -> None:
    """Every linear layer of the vision tower (before: UnsupportedError for all but LoRA): the language model's
    logits (the image placed among the text tokens) equal PEFT's; delete gives the model back bit for bit."""
    import transformers
    from test_converter_matrix import _mm_keras, _mm_torch

    folder, model = gemma4_vision
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf: Any = transformers.Gemma4ForConditionalGeneration.from_pretrained(folder)
        hf.eval()
        base = _mm_torch("gemma4", hf)
        peft_model = peft.get_peft_model(hf, VISION_METHODS[method]())
        fill(peft_model)
        peft_model.eval().save_pretrained(str(tmp_path / "peft"))
    expected = _mm_torch("gemma4", peft_model)
    before, keras_base = snapshot(model), _mm_keras("gemma4", model)

    modules = adapterspec.load_adapter(model, tmp_path / "peft")
    try:
        assert len(modules) == 7 and all(m.startswith("model.vision_tower.") for m in modules)
        actual = _mm_keras("gemma4", model)
        diff = float(np.abs(actual - expected).max())
        print(f"READ-THROUGH gemma4 vision {method}: max abs diff vs PEFT {diff:.2e} (adapter effect "
              f"{float(np.abs(expected - base).max()):.2e}, base conversion {float(np.abs(keras_base - base).max()):.2e})")
        assert np.abs(expected - base).max() > 1e-3
        assert_near(actual, expected)
    finally:
        adapterspec.delete_adapter(model, "default")
    assert_same_snapshot(before, snapshot(model))


def test_what_no_kernel_can_carry_is_named() -> None:
    """The reasons :func:`read_through_refusal` gives (and inject puts in its UnsupportedError): a fused kernel's
    slice, an embedding, lora_bias, IA3 on the output of a layer with a bias, a dropout while training; every method
    whose forward is a change of the kernel passes."""
    from adapterspec import AdapterConfig
    from adapterspec_keras.reach import read_through_refusal
    from adapterspec_keras.sites import Piece

    dense, plain = keras.layers.Dense(4), keras.layers.Dense(4, use_bias=False)
    dense.build((None, 3))
    plain.build((None, 3))
    embedding = keras.layers.Embedding(5, 4)
    embedding.build((None,))
    index_in, index_out = np.arange(3), np.arange(4)

    def why(config: dict[str, Any], piece: Piece, trainable: bool = False) -> str | None:
        return read_through_refusal(AdapterConfig.from_dict({"target_modules": ["m"], **config}), "m", [piece],
                                    trainable)

    whole, bare = Piece(dense, "dense", index_in, index_out), Piece(plain, "dense", index_in, index_out)
    lora = {"peft_type": "LORA", "r": 2}
    assert why(lora, Piece(dense, "dense", index_in, np.arange(2), out_slice=(0, 2))) == \
        "the module is a slice of a fused kernel, which the adapters of its other modules share"
    assert why(lora, Piece(embedding, "embedding", np.arange(5), index_out)) == \
        "Embedding is not a Dense / EinsumDense whose kernel can carry an adapter"
    assert why({**lora, "lora_bias": True}, bare) == "lora_bias adds a bias of its own, which a kernel cannot carry"
    assert why({"peft_type": "IA3", "feedforward_modules": []}, whole) == \
        "IA3 scales the output of a layer with a bias, which changes the bias too; a kernel cannot carry that"
    assert why({**lora, "lora_dropout": 0.1}, whole, trainable=True) == \
        "training with lora_dropout > 0 drops the input of the adapter's term alone, which a kernel cannot"
    for config in ({**lora, "lora_dropout": 0.1}, {**lora, "use_dora": True}, {**lora, "use_rslora": True},
                   {"peft_type": "IA3", "feedforward_modules": ["m"]}, {"peft_type": "LOHA", "r": 2},
                   {"peft_type": "LOKR", "r": 2}, {"peft_type": "VERA", "r": 2}):
        assert why(config, whole) is None, config
    assert why({"peft_type": "IA3", "feedforward_modules": []}, bare) is None


class _ReadsKernel(keras.layers.Layer):  # type: ignore[misc]
    """keras-hub's Gemma 4 MLP in small: ``up``'s kernel is read, its ``call`` never runs."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.up = keras.layers.Dense(4, use_bias=False, name="up")

    def build(self, input_shape: Any) -> None:
        self.up.build(input_shape)

    def call(self, x: Any) -> Any:
        return ops.tanh(ops.matmul(x, self.up.kernel))


@pytest.mark.parametrize("config", [
    {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True, "init_lora_weights": False},
    {"peft_type": "LOHA", "r": 2, "alpha": 4},
    {"peft_type": "IA3", "feedforward_modules": ["up"]},
], ids=["dora", "loha", "ia3_feedforward"])
def test_training_runs_through_the_kernel_a_parent_reads(config: dict[str, Any]) -> None:
    """``fit`` trains the adapter through the kernel read (its variables move, the loss falls), the base kernel stays."""
    inputs = keras.Input((3,), name="x")
    model = keras.Model(inputs, _ReadsKernel(name="mlp")(inputs))
    model.set_weights([np.sin(np.arange(w.size) + 1.0).reshape(w.shape).astype("float32") * 0.5
                       for w in model.get_weights()])
    kernel = np.array(ops.convert_to_numpy(model.get_layer("mlp").up.kernel))
    x = unique_values((16, 3), 1, scale=1.0)
    y = unique_values((16, 4), 2, scale=0.5)
    adapterspec.inject_adapter(model, {**config, "target_modules": ["up"]}, trainable=True)
    start = {k: np.array(v) for k, v in dict(adapterspec.extract_adapter(model).load_tensors("numpy")).items()}
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    loss_before = float(model.evaluate(x, y, verbose=0))

    model.fit(x, y, epochs=5, batch_size=16, verbose=0)

    trained = dict(adapterspec.extract_adapter(model).load_tensors("numpy"))
    assert all(not np.array_equal(trained[k], v) for k, v in start.items()), sorted(start)
    assert float(model.evaluate(x, y, verbose=0)) < loss_before
    up = model.get_layer("mlp").up
    assert np.array_equal(ops.convert_to_numpy(type(up)._adapterspec_base_kernel.fget(up)), kernel)
