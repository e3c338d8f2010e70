"""HRA (SPEC.md 17.3) on keras-hub models, exact against PEFT 0.21 (fp32): a folder PEFT saved loads and gives PEFT's
logits (Householder products, Gram-Schmidt), a folder Keras saves holds PEFT's tensors bit for bit and loads in PEFT
(no missing/unexpected keys, no warning) with Keras' logits; merge/unmerge (reverse reflections), switching, training
and the refusals (embeddings, GPT-2 Conv1D, bias, HRA with another method on one layer)."""

from __future__ import annotations

import math
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
    ARCHS,
    assert_near,
    assert_peft_close,
    assert_refused_unchanged,
    assert_same_snapshot,
    hf_model,
    keras_logits,
    keras_model,
    snapshot,
    torch_logits,
)

_TARGETS = list(ARCHS["llama"].linear_targets)

CASES: dict[str, tuple[str, Any]] = {
    "llama": ("llama", lambda: peft.HRAConfig(r=4, target_modules=_TARGETS)),
    "llama-gs-odd-r": ("llama", lambda: peft.HRAConfig(r=3, apply_GS=True, target_modules=["k_proj", "o_proj",
                                                                                           "gate_proj"])),
    "gemma": ("gemma", lambda: peft.HRAConfig(r=2, target_modules=_TARGETS)),
}


def _vectors(shape: tuple[int, ...], salt: int) -> np.ndarray:
    """Element-unique values with linearly independent columns (a quadratic phase)."""
    k = np.arange(math.prod(shape), dtype=np.float64)
    return np.sin(1.0 + salt * 0.37 + k * 0.731 + k * k * 0.013).reshape(shape).astype(np.float32)


def _fill(peft_model: Any, salt: int = 0) -> None:
    import torch

    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(peft_model.named_parameters())):
            if "hra_u" in name:
                param.copy_(torch.from_numpy(_vectors(tuple(param.shape), salt + index)))


def _peft_adapter(folder: Path, out: Path, config: Any, salt: int = 0) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(hf_model(folder), config)
    _fill(peft_model, salt)
    peft_model.eval()
    peft_model.save_pretrained(out)
    return peft_model


def _adapted(peft_model: Any) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, module in peft_model.named_modules()
            if len(getattr(module, "hra_u", ()))}


def _peft_load(folder: Path, adapter: Path) -> Any:
    """PEFT loads ``adapter``: no missing or unexpected adapter key, no warning of its own."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # PEFT builds the layers before loading: an odd r warns about its own initialisation, overwritten by the load
        warnings.filterwarnings("ignore", message="The symmetric initialization can NOT be performed")
        model = peft.PeftModel.from_pretrained(hf_model(folder), adapter).eval()
        result: Any = set_peft_model_state_dict(model, load_file(adapter / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "hra_u" in k]
    return model


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_hra_adapter_gives_peft_logits_in_keras(case: str, checkpoints: Any, token_ids: np.ndarray,
                                                     tmp_path: Path) -> None:
    arch, make_config = CASES[case]
    peft_model = _peft_adapter(checkpoints[arch], tmp_path / "peft", make_config())
    expected = torch_logits(peft_model, token_ids)
    base_torch = torch_logits(hf_model(checkpoints[arch]), token_ids)
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, token_ids)

    modules = adapterspec.load_adapter(model, tmp_path / "peft")

    assert set(modules) == _adapted(peft_model)
    got = keras_logits(model, token_ids)
    assert_peft_close(got, expected, base, base_torch)
    assert np.abs(expected - base).max() > 1e-2
    with adapterspec.disabled_adapters(model):
        assert np.abs(keras_logits(model, token_ids) - base).max() == 0.0

    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    ours, theirs = adapterspec.read_adapter(saved), adapterspec.read_adapter(tmp_path / "peft")
    assert set(ours.tensors) == set(theirs.tensors)
    ours_np, theirs_np = ours.load_tensors("numpy"), theirs.load_tensors("numpy")
    for key in theirs_np:
        assert np.array_equal(ours_np[key], theirs_np[key]), key
    reloaded = _peft_load(checkpoints[arch], saved)
    assert_near(torch_logits(reloaded, token_ids), expected)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.merge_adapter()
    merged_expected = torch_logits(peft_model, token_ids)
    adapterspec.merge_adapters(model)
    assert_peft_close(keras_logits(model, token_ids), merged_expected, base, base_torch)
    adapterspec.unmerge_adapters(model)
    assert_near(keras_logits(model, token_ids), got)
    with adapterspec.disabled_adapters(model):
        assert_near(keras_logits(model, token_ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_hra_adapters_compose_switch_and_refuse_lora_beside_them(checkpoints: Any, token_ids: np.ndarray,
                                                                     tmp_path: Path) -> None:
    """Active together, ``W @ H_a @ H_b`` in the active order (PEFT's); with a LoRA on the same layer: refused,
    nothing changed; deleting brings the base back."""
    folder = checkpoints["llama"]
    config = peft.HRAConfig(r=2, target_modules=["q_proj", "up_proj"])
    reference = _peft_adapter(folder, tmp_path / "a", config)
    reference.add_adapter("b", config)
    _fill_named(reference, "b", 7)
    reference.save_pretrained(str(tmp_path / "ab"))
    reference.base_model.set_adapter(["default", "b"])
    expected = torch_logits(reference, token_ids)
    lora = peft.get_peft_model(hf_model(folder), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(str(tmp_path / "lora"))
    model = keras_model("llama", folder)
    base = keras_logits(model, token_ids)
    adapterspec.load_adapter(model, tmp_path / "ab")
    adapterspec.load_adapter(model, tmp_path / "ab" / "b", adapter_name="b")
    adapterspec.load_adapter(model, tmp_path / "lora", adapter_name="lora")
    adapterspec.set_active_adapters(model, ["default", "b"])
    assert_near(keras_logits(model, token_ids), expected)
    adapterspec.merge_adapters(model)
    assert_near(keras_logits(model, token_ids), expected)
    adapterspec.unmerge_adapters(model)
    assert_refused_unchanged(model, lambda: adapterspec.set_active_adapters(model, ["default", "lora"]),
                             UnsupportedError, "one method per layer")
    for name in ("b", "default", "lora"):
        adapterspec.delete_adapter(model, name)
    assert_near(keras_logits(model, token_ids), base)


def _fill_named(model: Any, adapter: str, salt: int) -> None:
    import torch

    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(model.named_parameters())):
            if "hra_u" in name and f".{adapter}" in name:
                param.copy_(torch.from_numpy(_vectors(tuple(param.shape), salt + index)))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", ["embedding", "lm-head", "bias", "gs-init", "gpt2"])
def test_unsupported_hra_forms_are_refused_and_leave_the_model_unchanged(case: str, checkpoints: Any) -> None:
    model = keras_model("gpt2" if case == "gpt2" else "llama", checkpoints["gpt2" if case == "gpt2" else "llama"])
    before = snapshot(model)
    config: dict[str, Any] = {"peft_type": "HRA", "r": 2, "target_modules": ["q_proj"]}
    pointer, key = None, None
    if case == "embedding":
        config["target_modules"], key = ["q_proj", "embed_tokens"], "model.embed_tokens"
    elif case == "lm-head":
        config["target_modules"], key = ["lm_head"], "lm_head"
    elif case == "bias":
        config, pointer = dict(config, bias="hra_only"), "/bias"
    elif case == "gs-init":
        config, pointer = dict(config, apply_GS=True), "/apply_GS"
    else:
        config["target_modules"] = ["c_attn"]
    with pytest.raises(UnsupportedError) as caught:
        adapterspec.inject_adapter(model, config)
    if pointer is not None:
        assert caught.value.pointer == pointer
    elif key is not None:
        assert caught.value.key == key
    else:
        assert "transformers Conv1D" in caught.value.message and str(caught.value.key).endswith("c_attn")
    assert_same_snapshot(before, snapshot(model))


def test_every_hra_case_of_the_corpus_passes() -> None:
    from adapterspec.conformance import Status, load_corpus, run_suite
    from adapterspec_keras.conformance import KerasImplementation

    corpus = load_corpus(Path(__file__).parents[2] / "conformance_tests" / "v1")
    report = run_suite(KerasImplementation(), corpus, include=[r"hra"])
    names = {r.name: r.status for r in report.results}
    assert len(names) >= 12 and any("hra-conv2d" in n for n in names)
    assert {n: s for n, s in names.items() if s is not Status.PASSED} == {}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fit_trains_only_hra_u_and_peft_loads_the_result(checkpoints: Any, token_ids: np.ndarray,
                                                          tmp_path: Path) -> None:
    import keras

    from keras_helpers import keras_inputs

    model = keras_model("llama", checkpoints["llama"])
    base_values = {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.variables}
    base = keras_logits(model, token_ids)
    adapterspec.inject_adapter(model, {"peft_type": "HRA", "r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    assert_near(keras_logits(model, token_ids), base)  # PEFT's init: each column twice, H = I (up to rounding)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(hf_model(checkpoints["llama"]),
                                        peft.HRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert trainable == reference.get_nb_trainable_parameters()[0]
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    history = model.fit(keras_inputs(token_ids), np.roll(token_ids, -1, axis=1), epochs=3, batch_size=2, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    for v in model.variables:
        if v.path in base_values:
            assert np.array_equal(keras.ops.convert_to_numpy(v), base_values[v.path]), v.path
    got = keras_logits(model, token_ids)
    assert np.abs(got - base).max() > 1e-4
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    assert_near(torch_logits(_peft_load(checkpoints["llama"], saved), token_ids), got)


def test_docstring_examples_of_the_module_run() -> None:
    import doctest

    from adapterspec_keras import hra

    result = doctest.testmod(hra, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2 and result.failed == 0
