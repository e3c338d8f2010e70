"""MiSS (SPEC.md 17.2) on keras-hub models against PEFT 0.21.2 (fp32): a folder PEFT saved loads and gives PEFT's
logits in each mode (block, padded block, mini, bat), Keras saves PEFT's tensors bit for bit and PEFT loads them;
merge/unmerge, two adapters together, the mode rule, and the refusals (a GPT-2 Conv1D, sizes PEFT refuses, bias)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from adapterspec.errors import UnsupportedError  # noqa: E402
from keras_helpers import (  # noqa: E402
    assert_near,
    assert_peft_close,
    assert_refused_unchanged,
    assert_same_snapshot,
    hf_model,
    keras_logits,
    keras_model,
    peft_load_exactly,
    snapshot,
    torch_logits,
    unique_values,
)

CASES: dict[str, tuple[str, Any]] = {
    "llama-block": ("llama", lambda: peft.MissConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-block-padded": ("llama", lambda: peft.MissConfig(r=6, target_modules=["k_proj", "o_proj", "up_proj"])),
    "llama-mini": ("llama", lambda: peft.MissConfig(r=8, mini_r=4, init_weights="mini",
                                                    target_modules=["q_proj", "gate_proj", "down_proj"])),
    "llama-bat": ("llama", lambda: peft.MissConfig(r=8, init_weights="bat",
                                                   target_modules=["q_proj", "k_proj", "o_proj", "down_proj"])),
    "gemma-bat": ("gemma", lambda: peft.MissConfig(r=16, init_weights="bat", target_modules=["v_proj", "up_proj"])),
}


def _fill(peft_model: Any, salt: int = 0, adapter: str = "") -> None:
    import torch

    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(peft_model.named_parameters())):
            if "miss_block" in name and f".{adapter}" in name:
                scale = 0.1 if param.dim() == 3 else 0.05
                param.copy_(torch.from_numpy(unique_values(tuple(param.shape), salt + index, scale=scale)))


def _peft_adapter(folder: Path, out: Path, config: Any, salt: int = 0) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(hf_model(folder), config)
    _fill(peft_model, salt)
    peft_model.eval()
    peft_model.save_pretrained(out)
    return peft_model


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_miss_adapter_gives_peft_logits_in_keras(case: str, checkpoints: Any, token_ids: np.ndarray,
                                                      tmp_path: Path) -> None:
    arch, make_config = CASES[case]
    peft_model = _peft_adapter(checkpoints[arch], tmp_path / "peft", make_config())
    expected = torch_logits(peft_model, token_ids)
    base_torch = torch_logits(hf_model(checkpoints[arch]), token_ids)
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, token_ids)

    adapterspec.load_adapter(model, tmp_path / "peft")
    got = keras_logits(model, token_ids)
    assert np.abs(expected - base).max() > 1e-2
    assert_peft_close(got, expected, base, base_torch)
    with adapterspec.disabled_adapters(model):
        assert np.abs(keras_logits(model, token_ids) - base).max() == 0.0

    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    ours, theirs = adapterspec.read_adapter(saved), adapterspec.read_adapter(tmp_path / "peft")
    ours_np, theirs_np = ours.load_tensors("numpy"), theirs.load_tensors("numpy")
    assert set(ours_np) == set(theirs_np)
    for key in theirs_np:
        assert np.array_equal(ours_np[key], theirs_np[key]), key
    reloaded, said = peft_load_exactly(checkpoints[arch], saved)
    assert not [m for m in said if "MISS" in m.upper() or "Unexpected" in m], said
    assert_near(torch_logits(reloaded, token_ids), expected)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.merge_adapter()
    adapterspec.merge_adapters(model)
    assert_peft_close(keras_logits(model, token_ids), torch_logits(peft_model, token_ids), base, base_torch)
    adapterspec.unmerge_adapters(model)
    assert_near(keras_logits(model, token_ids), got)
    with adapterspec.disabled_adapters(model):
        assert_near(keras_logits(model, token_ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("init", [True, "bat"])
def test_two_miss_adapters_run_together_like_peft(init: Any, checkpoints: Any, token_ids: np.ndarray,
                                                  tmp_path: Path) -> None:
    folder = checkpoints["llama"]
    config = peft.MissConfig(r=8, init_weights=init, target_modules=["q_proj", "up_proj"])
    reference = _peft_adapter(folder, tmp_path / "a", config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.add_adapter("b", peft.MissConfig(r=8, init_weights=init, target_modules=["q_proj", "up_proj"]))
    _fill(reference, 7, adapter="b")
    reference.save_pretrained(str(tmp_path / "ab"))
    reference.base_model.set_adapter(["default", "b"])
    expected = torch_logits(reference, token_ids)
    model = keras_model("llama", folder)
    base = keras_logits(model, token_ids)
    adapterspec.load_adapter(model, tmp_path / "ab")
    adapterspec.load_adapter(model, tmp_path / "ab" / "b", adapter_name="b")
    adapterspec.set_active_adapters(model, ["default", "b"])
    assert_peft_close(keras_logits(model, token_ids), expected, base, torch_logits(hf_model(folder), token_ids))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_adapter_made_in_keras_loads_in_peft(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """``init_weights: false``: kaiming-uniform noise (Keras' draws), standing in for training."""
    model = keras_model("gemma", checkpoints["gemma"])
    base = keras_logits(model, token_ids)
    modules = adapterspec.inject_adapter(model, {"peft_type": "MISS", "r": 8, "init_weights": False,
                                                 "target_modules": ["q_proj", "down_proj"]})
    assert len(modules) == 4
    got = keras_logits(model, token_ids)
    assert np.abs(got - base).max() > 1e-3
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    peft_model, _ = peft_load_exactly(checkpoints["gemma"], saved)
    assert_near(got, torch_logits(peft_model, token_ids))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_miss_and_lora_and_two_modes(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """MiSS with LoRA on one layer: refused when activated together; a second MiSS mode on a layer: refused."""
    folder = checkpoints["llama"]
    _peft_adapter(folder, tmp_path / "miss", peft.MissConfig(r=8, target_modules=["q_proj"]))
    _peft_adapter(folder, tmp_path / "bat", peft.MissConfig(r=8, init_weights="bat", target_modules=["q_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(hf_model(folder), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
            tmp_path / "lora")
    model = keras_model("llama", folder)
    adapterspec.load_adapter(model, tmp_path / "miss", adapter_name="m")
    adapterspec.load_adapter(model, tmp_path / "lora", adapter_name="l")
    assert_refused_unchanged(model, lambda: adapterspec.set_active_adapters(model, ["m", "l"]), UnsupportedError,
                             "cannot run together")
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as caught:
        adapterspec.load_adapter(model, tmp_path / "bat", adapter_name="b")
    assert caught.value.pointer == "/init_weights"
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("arch", "config", "pointer"), [
    ("gpt2", {"r": 8, "target_modules": ["c_attn"]}, None),
    ("llama", {"r": 8, "target_modules": ["embed_tokens"]}, None),
    ("llama", {"r": 12, "init_weights": "bat", "target_modules": ["k_proj"]}, "/r"),
    ("llama", {"r": 4, "init_weights": "mini", "mini_r": 3, "target_modules": ["q_proj"]}, "/mini_r"),
    ("llama", {"r": 8, "bias": "all", "target_modules": ["q_proj"]}, "/bias"),
])
def test_refused_and_the_model_unchanged(arch: str, config: dict[str, Any], pointer: str | None,
                                         checkpoints: Any) -> None:
    model = keras_model(arch, checkpoints[arch])
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as caught:
        adapterspec.inject_adapter(model, {"peft_type": "MISS", **config})
    if pointer is not None:
        assert caught.value.pointer == pointer
    assert_same_snapshot(before, snapshot(model))


def test_docstring_examples() -> None:
    import doctest

    from adapterspec_keras import miss

    result = doctest.testmod(miss, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 2


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("init", [True, "bat"])
def test_one_training_step_equals_peft(init: Any, checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """Loaded trainable, one SGD step on the same loss gives PEFT's blocks after its step (TensorFlow's tape; other
    backends train through the same forward)."""
    import keras
    import torch

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the gradient tape of this test is TensorFlow's")
    import tensorflow as tf
    from keras_helpers import keras_inputs
    from peft.utils import get_peft_model_state_dict

    reference = _peft_adapter(checkpoints["llama"], tmp_path / "peft",
                              peft.MissConfig(r=8, init_weights=init, target_modules=["q_proj", "up_proj"]))
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
    print(f"blocks after one step: max relative diff vs PEFT {worst:.3g}")
    assert worst < 1e-4
