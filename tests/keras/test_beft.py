"""BEFT (SPEC.md 17.8) on keras-hub models, against PEFT 0.21.2: a ``beft_bias`` added to a Linear's output, merged
into its bias; the layers and merges PEFT refuses refused typed, with the model unchanged.

A PEFT BEFT adapter (element-unique ``beft_bias`` on q_proj and v_proj of a tiny Qwen2, whose q/k/v carry biases:
keras-hub EinsumDense layers with ``(heads, head_dim)`` outputs and biases) loads in the keras-hub model converted
from the same checkpoint with PEFT's logits within the base conversion error, unmerged and merged (the merged biases
PEFT's to the bit); ``save_adapter`` writes PEFT's tensors byte for byte, which PEFT loads without a warning of its own.
A merge into a layer without a bias (Llama's) is refused before any change, as PEFT refuses it.
"""

from __future__ import annotations

import json
import warnings
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

TARGETS = ["q_proj", "v_proj"]


def _fill(model: Any, adapter: str = "default", salt: int = 0) -> None:
    with torch.no_grad():
        for index, (name, tensor) in enumerate(sorted(model.named_parameters())):
            if name.endswith(f"beft_bias.{adapter}"):
                tensor.copy_(torch.from_numpy(unique_values(tuple(tensor.shape), salt + index, scale=0.5)))


@pytest.fixture(scope="module")
def qwen(checkpoints: Any) -> Path:
    return checkpoints["qwen2"]


@pytest.fixture(scope="module")
def saved(qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("beft") / "peft"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(hf_model(qwen), peft.BeftConfig(target_modules=TARGETS))
        _fill(model)
        model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def two(qwen: Path, saved: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A second BEFT adapter "b" (q_proj and k_proj) saved beside the first; PEFT with both active."""
    folder = tmp_path_factory.mktemp("beft-two")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(hf_model(qwen), str(saved)).eval()
        reference.add_adapter("b", peft.BeftConfig(target_modules=["q_proj", "k_proj"]))
        _fill(reference, "b", salt=40)
        reference.save_pretrained(str(folder), selected_adapters=["b"])
        reference.base_model.set_adapter(["default", "b"])
    return folder / "b", reference


@pytest.fixture(scope="module")
def bases(qwen: Path, token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """keras-hub's and transformers' logits of the base Qwen2, for the conversion error."""
    return keras_logits(keras_model("qwen2", qwen), token_ids), torch_logits(hf_model(qwen), token_ids)


def _query(model: Any) -> Any:
    return model.backbone.transformer_layers[0]._self_attention_layer._query_dense


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_beft_gives_peft_logits_unmerged_and_merged_and_round_trips(
        saved: Path, qwen: Path, bases: tuple[np.ndarray, np.ndarray], token_ids: np.ndarray, tmp_path: Path) -> None:
    base, base_torch = bases
    reference, said_peft = peft_load_exactly(qwen, saved)
    expected = torch_logits(reference, token_ids)
    assert np.abs(expected - base_torch).max() > 1e-2  # the adapter changes the output: the comparison means something
    model = keras_model("qwen2", qwen)
    adapterspec.load_adapter(model, saved)
    got = keras_logits(model, token_ids)
    assert_peft_close(got, expected, base, base_torch)

    # Keras saves PEFT's tensors byte for byte and its config; PEFT loads it with no warning of its own
    out = adapterspec.save_adapter(model, tmp_path / "keras")
    ours = adapterspec.read_adapter(out).load_tensors("numpy")
    theirs = adapterspec.read_adapter(saved).load_tensors("numpy")
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():  # the tensors' bytes, not the header (whose metadata is the writer's)
        assert ours[key].dtype == value.dtype and ours[key].tobytes() == value.tobytes(), key
    peft_config = json.loads((saved / "adapter_config.json").read_text())
    ours_config = json.loads((out / "adapter_config.json").read_text())
    assert {k: v for k, v in ours_config.items() if k in peft_config} == peft_config
    reloaded, said_ours = peft_load_exactly(qwen, out)
    assert said_ours == said_peft
    assert np.array_equal(torch_logits(reloaded, token_ids), expected)

    # merged: the biases PEFT's to the bit, PEFT's merged logits; unmerged: the unmerged forward again
    before = np.array(_query(model).bias.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model)
    peft_bias = reference.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias.detach().numpy()
    assert np.array_equal(np.asarray(_query(model).bias.numpy()).reshape(-1), peft_bias)
    assert_peft_close(keras_logits(model, token_ids), torch_logits(reference, token_ids), base, base_torch)
    adapterspec.unmerge_adapters(model)
    np.testing.assert_allclose(_query(model).bias.numpy(), before, atol=1e-6)
    assert_near(keras_logits(model, token_ids), got)

    # delete restores the base
    adapterspec.delete_adapter(model, "default")
    assert np.array_equal(keras_logits(model, token_ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_beft_adapters_active_give_peft_s_logits(saved: Path, two: tuple[Path, Any], qwen: Path,
                                                     bases: tuple[np.ndarray, np.ndarray],
                                                     token_ids: np.ndarray) -> None:
    """Two BEFT adapters on shared layers: PEFT's PeftModel with both active (their biases summed), merged too."""
    folder, reference = two
    base, base_torch = bases
    expected = torch_logits(reference, token_ids)
    model = keras_model("qwen2", qwen)
    adapterspec.load_adapter(model, saved)
    adapterspec.load_adapter(model, folder, "b")
    adapterspec.set_active_adapters(model, ["default", "b"])
    got = keras_logits(model, token_ids)
    assert_peft_close(got, expected, base, base_torch)
    adapterspec.merge_adapters(model)
    assert_peft_close(keras_logits(model, token_ids), expected, base, base_torch)
    adapterspec.unmerge_adapters(model)
    assert_near(keras_logits(model, token_ids), got)
    adapterspec.delete_adapter(model, "b")
    adapterspec.delete_adapter(model, "default")
    # the biases are now (b + x + y) - y - x: float32 rounding, as PEFT's, not b itself
    assert_near(keras_logits(model, token_ids), base)


def test_bfloat16_merged_bias_is_peft_s_to_the_bit(saved: Path, qwen: Path) -> None:
    """On a bfloat16 model PEFT adds the float32 beft_bias into the bfloat16 bias in float32, rounded once: Keras'
    merged q_proj bias equals PEFT's bit for bit, and the unmerged one too."""
    import keras
    import keras_hub

    from keras_helpers import ARCHS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(hf_model(qwen).to(torch.bfloat16), str(saved)).eval()
    model = getattr(keras_hub.models, ARCHS["qwen2"].keras_task).from_preset(str(qwen), preprocessor=None,
                                                                             dtype="bfloat16")
    adapterspec.load_adapter(model, saved)
    peft_layer = reference.base_model.model.model.layers[0].self_attn.q_proj.base_layer

    def bias() -> np.ndarray:
        return keras.ops.convert_to_numpy(keras.ops.cast(_query(model).bias, "float32")).reshape(-1)

    for step in ("merge", "unmerge"):
        if step == "merge":
            adapterspec.merge_adapters(model)
            reference.merge_adapter()
        else:
            adapterspec.unmerge_adapters(model)
            reference.unmerge_adapter()
        assert np.array_equal(bias(), peft_layer.bias.detach().float().numpy()), step


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_merge_into_layer_without_bias_refused_unchanged(checkpoints: Any, token_ids: np.ndarray,
                                                         tmp_path: Path) -> None:
    """Llama has no attention biases: BEFT runs unmerged there (PEFT's logits), and a merge is refused typed before
    any change, as PEFT raises on it."""
    llama = checkpoints["llama"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(hf_model(llama), peft.BeftConfig(target_modules=["v_proj"]))
        _fill(theirs)
        theirs.save_pretrained(str(tmp_path / "peft"))
        with pytest.raises(ValueError, match="no bias"):
            theirs.merge_adapter()
    model = keras_model("llama", llama)
    base = keras_logits(model, token_ids)
    adapterspec.load_adapter(model, tmp_path / "peft")
    got = keras_logits(model, token_ids)
    reference, _ = peft_load_exactly(llama, tmp_path / "peft")
    assert_peft_close(got, torch_logits(reference, token_ids), base, torch_logits(hf_model(llama), token_ids))
    assert_refused_unchanged(model, lambda: adapterspec.merge_adapters(model), UnsupportedError, "without a bias")
    assert np.array_equal(keras_logits(model, token_ids), got)


def test_layers_peft_refuses_are_refused_unchanged(checkpoints: Any) -> None:
    """GPT-2's Conv1D and an embedding: PEFT's BEFT adapts nn.Linear only (it raises), so does Keras, typed."""
    with pytest.raises(TypeError):
        peft.get_peft_model(hf_model(checkpoints["gpt2"]), peft.BeftConfig(target_modules=["c_attn"]))
    model = keras_model("gpt2", checkpoints["gpt2"])
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(
        model, {"peft_type": "BEFT", "target_modules": ["c_fc"]}), UnsupportedError, "Conv1D")
    llama = keras_model("llama", checkpoints["llama"])
    assert_refused_unchanged(llama, lambda: adapterspec.inject_adapter(
        llama, {"peft_type": "BEFT", "target_modules": ["embed_tokens"]}), UnsupportedError, "BEFT")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_adapter_made_in_keras_loads_in_peft(qwen: Path, bases: tuple[np.ndarray, np.ndarray],
                                             token_ids: np.ndarray, tmp_path: Path) -> None:
    """A new BEFT adapter: zeros by default (the output unchanged); with init_weights false PEFT's standard normal
    (Keras' draws), which PEFT loads with Keras' logits; the trainable count is PEFT's."""
    import keras

    base, base_torch = bases
    keras.utils.set_random_seed(5)
    model = keras_model("qwen2", qwen)
    adapterspec.inject_adapter(model, {"peft_type": "BEFT", "target_modules": TARGETS}, "zero")
    assert np.array_equal(keras_logits(model, token_ids), base)
    adapterspec.delete_adapter(model, "zero")
    adapterspec.inject_adapter(model, {"peft_type": "BEFT", "target_modules": TARGETS, "init_weights": False},
                               trainable=True)
    got = keras_logits(model, token_ids)
    assert np.abs(got - base).max() > 1e-3
    out = adapterspec.save_adapter(model, tmp_path / "keras")
    values = np.concatenate([v.ravel() for v in adapterspec.read_adapter(out).load_tensors("numpy").values()])
    assert 0.5 < values.std() < 1.5 and abs(values.mean()) < 0.3  # a standard normal draw
    reloaded, said = peft_load_exactly(qwen, out)
    assert not [m for m in said if "missing" in m.lower() or "unexpected" in m.lower()], said
    assert_peft_close(got, torch_logits(reloaded, token_ids), base, base_torch)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(hf_model(qwen), peft.BeftConfig(target_modules=TARGETS))
    assert trainable == theirs.get_nb_trainable_parameters()[0]
