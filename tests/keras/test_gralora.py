"""GraLoRA (SPEC.md 17.5) on keras-hub models, exact against PEFT 0.21.2 (fp32) in both directions; the layers and
configs PEFT or this backend refuse refused typed, with the model unchanged.

Each case: a PEFT GraLoRA model with element-unique blocks (and hybrid pair) is saved. A keras-hub model converted
from the same checkpoint loads the folder and gives PEFT's logits within the base conversion error; ``save_adapter``
writes bit-identical tensors that PEFT loads with no warning of its own; merging gives PEFT's merged logits,
unmerging the unmerged ones, deleting the base ones. Models and PEFT references are built once per module (the
TensorFlow run stays near 20 s).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from adapterspec.errors import UnsupportedError  # noqa: E402
from keras_helpers import (  # noqa: E402
    assert_near,
    assert_peft_close,
    assert_refused_unchanged,
    hf_model,
    keras_logits,
    keras_model,
    peft_load_exactly,
    torch_logits,
    unique_values,
)

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
GPT2 = ["c_attn", "c_proj", "c_fc"]


def _fill(model: Any, salt: int = 0, adapter: str = "") -> None:
    """Element-unique block and hybrid values: a transposed block, a swapped slice or key shows."""
    with torch.no_grad():
        for index, (name, tensor) in enumerate(sorted(model.named_parameters())):
            if "gralora_" in name and f".{adapter}" in name:
                tensor.copy_(torch.from_numpy(unique_values(tuple(tensor.shape), salt + index, scale=0.2)))


def _peft_folder(checkpoint: Path, config: Any, folder: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(hf_model(checkpoint), config)
        _fill(model)
        model.eval()
        model.save_pretrained(str(folder))
    return model


CASES: dict[str, tuple[str, Callable[[], Any]]] = {
    # the hybrid pair beside 2 x 2 blocks; k_proj's 32 outputs are GQA's (2 heads of 16)
    "llama-hybrid-k2": ("llama", lambda: peft.GraloraConfig(r=4, gralora_k=2, hybrid_r=2, alpha=6,
                                                            target_modules=LLAMA)),
    # 4 x 4 blocks, no hybrid pair: the EinsumDense (heads, head_dim) index maps cut across blocks
    "llama-k4": ("llama", lambda: peft.GraloraConfig(r=8, gralora_k=4, alpha=16,
                                                     target_modules=["q_proj", "v_proj", "o_proj", "gate_proj",
                                                                     "down_proj"])),
    # GPT-2's Conv1D; the fused c_attn (192 outputs in 4 blocks of 48) split over three Keras layers of 64
    "gpt2-conv1d-k4-hybrid": ("gpt2", lambda: peft.GraloraConfig(r=8, gralora_k=4, hybrid_r=1, alpha=12,
                                                                 target_modules=GPT2)),
}


@pytest.fixture(scope="module")
def llama(checkpoints: Any) -> Any:
    """One keras-hub Llama for the tests that leave it as they found it (each deletes its adapters)."""
    return keras_model("llama", checkpoints["llama"])


@pytest.fixture(scope="module")
def gpt2(checkpoints: Any) -> Any:
    return keras_model("gpt2", checkpoints["gpt2"])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_gralora_folder_in_keras(case: str, checkpoints: Any, token_ids: np.ndarray, tmp_path: Path,
                                      request: pytest.FixtureRequest) -> None:
    arch, make_config = CASES[case]
    reference = _peft_folder(checkpoints[arch], make_config(), tmp_path / "peft")
    theirs = adapterspec.read_adapter(tmp_path / "peft")
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    _, said_peft = peft_load_exactly(checkpoints[arch], tmp_path / "peft")
    expected = torch_logits(reference, token_ids)
    base_torch = torch_logits(hf_model(checkpoints[arch]), token_ids)
    model = request.getfixturevalue(arch)
    base = keras_logits(model, token_ids)
    assert np.abs(expected - base_torch).max() > 1e-2  # the adapter changes the logits

    adapterspec.load_adapter(model, tmp_path / "peft")
    got = keras_logits(model, token_ids)
    assert_peft_close(got, expected, base, base_torch)
    with adapterspec.disabled_adapters(model):
        assert np.abs(keras_logits(model, token_ids) - base).max() == 0.0

    # Keras saves exactly PEFT's tensors and config; PEFT loads them cleanly, with the same logits
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    ours = adapterspec.read_adapter(saved)
    ours_np, theirs_np = ours.load_tensors("numpy"), theirs.load_tensors("numpy")
    assert set(ours_np) == set(theirs_np)
    for key in theirs_np:
        assert ours_np[key].dtype == theirs_np[key].dtype and np.array_equal(ours_np[key], theirs_np[key]), key
    ours_config = json.loads((saved / "adapter_config.json").read_text())
    assert {k: v for k, v in ours_config.items() if k in peft_config} == peft_config
    reloaded, said_ours = peft_load_exactly(checkpoints[arch], saved)
    assert said_ours == said_peft  # no warning of its own
    assert np.array_equal(torch_logits(reloaded, token_ids), expected)

    # merged: PEFT's merged logits; unmerged: back to the unmerged forward; deleted: the base model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model)
    assert_peft_close(keras_logits(model, token_ids), torch_logits(reference, token_ids), base, base_torch)
    adapterspec.unmerge_adapters(model)
    assert_near(keras_logits(model, token_ids), got)
    adapterspec.delete_adapter(model, "default")
    assert adapterspec.adapter_names(model) == []
    assert_near(keras_logits(model, token_ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_gralora_adapters_together_and_a_keras_made_one(llama: Any, checkpoints: Any, token_ids: np.ndarray,
                                                            tmp_path: Path) -> None:
    """Two GraLoRA adapters active on one layer add their terms as PEFT's do; GraLoRA with LoRA on one layer is
    refused when activated together (model unchanged); a new adapter made on Keras (``init_weights: false``:
    Keras' draws of PEFT's distributions) loads in PEFT with Keras' logits."""
    folder = checkpoints["llama"]
    fields = dict(r=4, gralora_k=2, hybrid_r=1, alpha=5, target_modules=["q_proj", "up_proj"])
    reference = _peft_folder(folder, peft.GraloraConfig(**fields), tmp_path / "ab")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.add_adapter("b", peft.GraloraConfig(**{**fields, "r": 8, "gralora_k": 4,
                                                         "target_modules": ["q_proj", "down_proj"]}))
    _fill(reference, 11, adapter="b")
    reference.save_pretrained(str(tmp_path / "ab"))
    reference.base_model.set_adapter(["default", "b"])
    expected = torch_logits(reference, token_ids)
    base = keras_logits(llama, token_ids)
    adapterspec.load_adapter(llama, tmp_path / "ab")
    adapterspec.load_adapter(llama, tmp_path / "ab" / "b", adapter_name="b")
    adapterspec.set_active_adapters(llama, ["default", "b"])
    assert_peft_close(keras_logits(llama, token_ids), expected, base, torch_logits(hf_model(folder), token_ids))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(hf_model(folder), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
            tmp_path / "lora")
    adapterspec.load_adapter(llama, tmp_path / "lora", adapter_name="l")
    assert_refused_unchanged(llama, lambda: adapterspec.set_active_adapters(llama, ["default", "l"]),
                             UnsupportedError, "cannot run together with")
    for name in ("default", "b", "l"):
        adapterspec.delete_adapter(llama, name)
    assert_near(keras_logits(llama, token_ids), base)

    modules = adapterspec.inject_adapter(llama, {"peft_type": "GRALORA", "r": 4, "gralora_k": 2, "hybrid_r": 2,
                                                 "alpha": 3, "init_weights": False,
                                                 "target_modules": ["k_proj", "o_proj", "gate_proj"]})
    assert len(modules) == 6
    got = keras_logits(llama, token_ids)
    assert np.abs(got - base).max() > 1e-3
    saved = adapterspec.save_adapter(llama, tmp_path / "keras")
    peft_model, said = peft_load_exactly(folder, saved)
    assert not said, said
    assert_near(got, torch_logits(peft_model, token_ids))
    adapterspec.delete_adapter(llama, "default")
    assert_near(keras_logits(llama, token_ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_float_alpha_null_booleans_negative_dropout_as_peft(llama: Any, checkpoints: Any, token_ids: np.ndarray,
                                                            tmp_path: Path) -> None:
    """A config PEFT takes as written (SPEC.md 4.1, 17.5): alpha 5.5, null fan_in_fan_out and init_weights,
    gralora_dropout -0.5 load with PEFT's logits; a new adapter with a null init_weights draws B (PEFT's truth
    test), unlike true."""
    folder = checkpoints["llama"]
    fields = dict(r=4, gralora_k=2, hybrid_r=1, alpha=5.5, gralora_dropout=-0.5, target_modules=["q_proj", "up_proj"])
    reference = _peft_folder(folder, peft.GraloraConfig(**fields), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config | {"fan_in_fan_out": None,
                                                                             "init_weights": None}))
    base = keras_logits(llama, token_ids)
    adapterspec.load_adapter(llama, tmp_path / "a")
    assert_peft_close(keras_logits(llama, token_ids), torch_logits(reference, token_ids), base,
                      torch_logits(hf_model(folder), token_ids))
    adapterspec.delete_adapter(llama, "default")
    for init, drawn in ((None, True), (True, False)):
        adapterspec.inject_adapter(llama, {"peft_type": "GRALORA", "r": 4, "hybrid_r": 1, "init_weights": init,
                                           "target_modules": ["q_proj"]})
        tensors = adapterspec.extract_adapter(llama, "default").load_tensors("numpy")
        assert all(bool(np.any(v)) == drawn for k, v in tensors.items() if "_B" in k), init
        adapterspec.delete_adapter(llama, "default")
    assert_near(keras_logits(llama, token_ids), base)


@pytest.mark.parametrize(("arch", "config", "needle"), [
    ("llama", {"target_modules": ["embed_tokens"]}, "Dense/EinsumDense"),
    ("gpt2", {"target_modules": ["wte"]}, "Dense/EinsumDense"),
    ("llama", {"r": 3, "gralora_k": 3, "target_modules": ["q_proj"]}, "/gralora_k"),  # 64 % 3
    ("llama", {"bias": "all", "target_modules": ["q_proj"]}, "/bias"),
])
def test_refused_and_the_model_unchanged(arch: str, config: dict[str, Any], needle: str,
                                         request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(arch)
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(model, {"peft_type": "GRALORA", "r": 4,
                                                                               **config}), UnsupportedError, needle)
    assert adapterspec.adapter_names(model) == []


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_one_training_step_equals_peft(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """Loaded trainable, one SGD step on the same loss gives PEFT's blocks and hybrid pair after its step
    (TensorFlow's tape; other backends train through the same forward); the trainable count is PEFT's."""
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the gradient tape of this test is TensorFlow's")
    import tensorflow as tf
    from keras_helpers import keras_inputs
    from peft.utils import get_peft_model_state_dict

    reference = _peft_folder(checkpoints["llama"], peft.GraloraConfig(r=4, gralora_k=2, hybrid_r=2, alpha=6,
                                                                      target_modules=["q_proj", "up_proj"]),
                             tmp_path / "peft")
    weights = unique_values((2, 9, 128), 5, around=0.0, scale=1.0)
    lr = 0.5
    optimiser = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=lr)
    logits = reference(input_ids=torch.from_numpy(np.asarray(token_ids, dtype=np.int64))).logits
    (logits * torch.from_numpy(weights)).sum().backward()
    optimiser.step()
    expected = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(reference).items()}

    model = keras_model("llama", checkpoints["llama"])
    adapterspec.load_adapter(model, tmp_path / "peft", trainable=True)
    before = adapterspec.extract_adapter(model, "default").load_tensors("numpy")
    variables = model.trainable_variables
    assert sum(int(np.prod(v.shape)) for v in variables) == reference.get_nb_trainable_parameters()[0]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(keras_inputs(token_ids), training=False) * weights)
    for variable, grad in zip(variables, tape.gradient(loss, variables)):
        variable.assign_sub(lr * grad)
    after = adapterspec.extract_adapter(model, "default").load_tensors("numpy")
    assert set(after) == set(expected)
    worst = 0.0
    for key, value in expected.items():
        assert np.abs(value - before[key]).max() > 1e-3, key  # the step moved it
        worst = max(worst, float(np.abs(after[key] - value).max() / np.abs(value).max()))
    print(f"GraLoRA tensors after one step: max relative diff vs PEFT {worst:.3g}")
    assert worst < 1e-4


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_quantized_layer_is_refused_as_on_torch(llama: Any) -> None:
    """PEFT 0.21 has no quantized GraLoRA layer and the torch backend refuses one: so does this backend, the model
    unchanged (the module's last use of ``llama``: one layer of it is quantized here)."""
    llama.backbone.get_layer("transformer_layer_0")._self_attention_layer._query_dense.quantize("int8")
    assert_refused_unchanged(llama, lambda: adapterspec.inject_adapter(
        llama, {"peft_type": "GRALORA", "r": 4, "target_modules": ["q_proj"]}), UnsupportedError,
        "quantized layer (int8")


def test_docstring_examples() -> None:
    import doctest

    from adapterspec_keras import gralora

    result = doctest.testmod(gralora, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 3
