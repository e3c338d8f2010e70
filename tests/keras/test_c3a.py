"""C3A (SPEC.md 17.7) on a keras-hub Llama against PEFT 0.21.2 (fp32): a folder PEFT saved loads and gives PEFT's
logits (block_size_pattern included), Keras saves PEFT's tensors bit for bit and PEFT loads them; merge/unmerge,
delete; an adapter made in Keras loads in PEFT with Keras' logits; the refusals (bias, block sizes PEFT refuses, two
C3A adapters or C3A with LoRA on one layer, a GPT-2 Conv1D) leave the model unchanged. One Llama per module."""

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
    hf_model,
    keras_logits,
    keras_model,
    peft_load_exactly,
    torch_logits,
    unique_values,
)


def _fill(peft_model: Any, salt: int = 0) -> None:
    import torch

    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(peft_model.named_parameters())):
            if "c3a_kernel" in name:
                param.copy_(torch.from_numpy(unique_values(tuple(param.shape), salt + index, scale=2.0)))


def _peft_adapter(folder: Path, out: Path, config: Any, salt: int = 0) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(hf_model(folder), config)
    _fill(peft_model, salt)
    peft_model.eval()
    peft_model.save_pretrained(out)
    return peft_model


@pytest.fixture(scope="module")
def llama(checkpoints: Any, token_ids: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
    """The keras-hub Llama (adapters deleted by each test), its logits and the transformers model's."""
    model = keras_model("llama", checkpoints["llama"])
    return model, keras_logits(model, token_ids), torch_logits(hf_model(checkpoints["llama"]), token_ids)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_c3a_adapter_gives_peft_logits_in_keras(llama: Any, checkpoints: Any, token_ids: np.ndarray,
                                                     tmp_path: Path) -> None:
    model, base, base_torch = llama
    config = peft.C3AConfig(block_size=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                                           "down_proj"],
                            block_size_pattern={"k_proj": 32, "layers.1.self_attn.q_proj": 8,
                                                "model.layers.0.mlp.down_proj": 64})
    peft_model = _peft_adapter(checkpoints["llama"], tmp_path / "peft", config)
    expected = torch_logits(peft_model, token_ids)
    assert np.abs(expected - base).max() > 1e-2

    adapterspec.load_adapter(model, tmp_path / "peft")
    got = keras_logits(model, token_ids)
    assert_peft_close(got, expected, base, base_torch)
    with adapterspec.disabled_adapters(model):
        assert np.abs(keras_logits(model, token_ids) - base).max() == 0.0

    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    ours = adapterspec.read_adapter(saved).load_tensors("numpy")
    theirs = adapterspec.read_adapter(tmp_path / "peft").load_tensors("numpy")
    assert set(ours) == set(theirs)
    for key in theirs:
        assert np.array_equal(ours[key], theirs[key]), key
    reloaded, said = peft_load_exactly(checkpoints["llama"], saved)
    assert not [m for m in said if "C3A" in m.upper() or "Unexpected" in m], said
    assert_near(torch_logits(reloaded, token_ids), expected)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.merge_adapter()
    adapterspec.merge_adapters(model)
    assert_peft_close(keras_logits(model, token_ids), torch_logits(peft_model, token_ids), base, base_torch)
    adapterspec.unmerge_adapters(model)
    assert_near(keras_logits(model, token_ids), got)
    adapterspec.delete_adapter(model, "default")
    assert_near(keras_logits(model, token_ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_block_size_pattern_order_and_lazy_keys_as_peft(llama: Any, checkpoints: Any, token_ids: np.ndarray,
                                                        tmp_path: Path) -> None:
    """The first block_size_pattern key in the file's order wins, a key that does not compile fails only where a
    module reaches it (PEFT 0.21.2's lazy next(filter(...))), and save_adapter keeps the members' order (PEFT's own
    save sorts them)."""
    import json

    model, base, base_torch = llama
    pattern = {"v_proj": 8, ".*_proj": 16, "q_proj(": 4}
    peft_model = _peft_adapter(checkpoints["llama"], tmp_path / "peft",
                               peft.C3AConfig(block_size=32, target_modules=["q_proj", "v_proj"],
                                              block_size_pattern=pattern))
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"block_size_pattern": pattern}))  # PEFT wrote them sorted
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_peft_close(keras_logits(model, token_ids), torch_logits(peft_model, token_ids), base, base_torch)
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    assert list(json.loads((saved / "adapter_config.json").read_text())["block_size_pattern"]) == list(pattern)
    adapterspec.delete_adapter(model, "default")
    config_path.write_text(json.dumps(config | {"block_size_pattern": {"q_proj(": 4, **pattern}}))
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, tmp_path / "peft"), UnsupportedError,
                             "/block_size_pattern")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_refusals_leave_the_model_unchanged(llama: Any, checkpoints: Any, tmp_path: Path) -> None:
    model, _, _ = llama
    _peft_adapter(checkpoints["llama"], tmp_path / "bias", peft.C3AConfig(block_size=16, target_modules=["q_proj"],
                                                                          bias="all"))
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, tmp_path / "bias"), UnsupportedError,
                             "/bias")
    for config, pointer in (({"block_size": 24, "target_modules": ["q_proj"]}, "/block_size"),
                            ({"block_size": 16, "block_size_pattern": {"v_proj": 64}, "target_modules": ["v_proj"]},
                             "/block_size_pattern")):
        assert_refused_unchanged(model, lambda c=config: adapterspec.inject_adapter(model, {"peft_type": "C3A", **c}),
                                 UnsupportedError, pointer)
    for name, salt in (("a", 0), ("b", 5)):
        _peft_adapter(checkpoints["llama"], tmp_path / name, peft.C3AConfig(block_size=16, target_modules=["q_proj"]),
                      salt)
        adapterspec.load_adapter(model, tmp_path / name, adapter_name=name)
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}, adapter_name="l")
    for names in (["a", "b"], ["b", "l"]):
        assert_refused_unchanged(model, lambda n=names: adapterspec.set_active_adapters(model, n), UnsupportedError,
                                 "cannot run together")
    for name in ("a", "b", "l"):
        adapterspec.delete_adapter(model, name)

    gpt2 = keras_model("gpt2", checkpoints["gpt2"])
    assert_refused_unchanged(gpt2, lambda: adapterspec.inject_adapter(gpt2, {"peft_type": "C3A", "block_size": 16,
                                                                             "target_modules": ["c_fc"]}),
                             UnsupportedError, "C3A adapts Linear modules only")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_adapter_made_in_keras_loads_in_peft(llama: Any, checkpoints: Any, token_ids: np.ndarray,
                                             tmp_path: Path) -> None:
    """``init_weights: "gaussian"`` (Keras' draws) stands in for training; PEFT's trainable count."""
    model, base, _ = llama
    config = {"peft_type": "C3A", "block_size": 16, "init_weights": "gaussian",
              "target_modules": ["q_proj", "down_proj"]}
    modules = adapterspec.inject_adapter(model, config, trainable=True)
    assert len(modules) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(hf_model(checkpoints["llama"]),
                                        peft.C3AConfig(**{k: v for k, v in config.items() if k != "peft_type"}))
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert trainable == reference.get_nb_trainable_parameters()[0]
    got = keras_logits(model, token_ids)
    assert np.abs(got - base).max() > 1e-3
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    peft_model, _ = peft_load_exactly(checkpoints["llama"], saved)
    assert_near(got, torch_logits(peft_model, token_ids))
    adapterspec.delete_adapter(model, "default")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_one_training_step_equals_peft(llama: Any, checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """Loaded trainable, one SGD step on the same loss gives PEFT's kernels after its step (PEFT's hand-written FFT
    backward vs Keras' gradient of the gathered circulant; TensorFlow's tape)."""
    import keras
    import torch

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the gradient tape of this test is TensorFlow's")
    import tensorflow as tf
    from keras_helpers import keras_inputs
    from peft.utils import get_peft_model_state_dict

    model, _, _ = llama
    reference = _peft_adapter(checkpoints["llama"], tmp_path / "peft",
                              peft.C3AConfig(block_size=16, target_modules=["q_proj", "up_proj"]))
    weights = unique_values((2, 9, 128), 5, around=0.0, scale=1.0)
    lr = 0.5
    optimiser = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=lr)
    logits = reference(input_ids=torch.from_numpy(np.asarray(token_ids, dtype=np.int64))).logits
    (logits * torch.from_numpy(weights)).sum().backward()
    optimiser.step()
    expected = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(reference).items()}

    adapterspec.load_adapter(model, tmp_path / "peft", trainable=True)
    before = adapterspec.extract_adapter(model, "default").load_tensors("numpy")
    variables = model.trainable_variables
    assert sum(int(np.prod(v.shape)) for v in variables) == reference.get_nb_trainable_parameters()[0]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(keras_inputs(token_ids), training=False) * weights)
    for variable, grad in zip(variables, tape.gradient(loss, variables)):
        variable.assign_sub(lr * grad)
    after = adapterspec.extract_adapter(model, "default").load_tensors("numpy")
    adapterspec.delete_adapter(model, "default")
    assert set(after) == set(expected)
    worst = 0.0
    for key, value in expected.items():
        assert np.abs(value - before[key]).max() > 1e-3, key  # the step moved it
        worst = max(worst, float(np.abs(after[key] - value).max() / np.abs(value).max()))
    print(f"kernels after one step: max relative diff vs PEFT {worst:.3g}")
    assert worst < 1e-4
