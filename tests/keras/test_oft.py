"""OFT and BOFT (SPEC.md 15.6, 15.7) on keras-hub models, exact against PEFT 0.21 (fp32): a folder PEFT saved loads
and gives PEFT's logits, a folder Keras saves holds PEFT's tensors bit for bit and loads in PEFT (no missing/unexpected
keys, no warning) with Keras' logits, a round trip is bit-exact; merge/unmerge, switching, training and the refusals
(embeddings, block sizes PEFT refuses, coft, several butterfly factors, training with dropouts)."""

from __future__ import annotations

import json
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
    unique_values,
)

_MARKERS = ("oft_R", "boft_R", "boft_s")
_TARGETS = list(ARCHS["llama"].linear_targets)


def _oft(**kw: Any) -> Any:
    return peft.OFTConfig(**{"r": 0, "oft_block_size": 8, "target_modules": _TARGETS, **kw})


def _boft(**kw: Any) -> Any:
    return peft.BOFTConfig(**{"boft_block_size": 4, "target_modules": _TARGETS, **kw})


CASES: dict[str, tuple[str, Any]] = {
    "llama-oft": ("llama", lambda: _oft()),
    "llama-oft-rank-3-terms": ("llama", lambda: _oft(r=4, oft_block_size=0, target_modules=["k_proj", "o_proj"],
                                                     num_cayley_neumann_terms=3)),
    "llama-oft-cayley-shared": ("llama", lambda: _oft(oft_block_size=16, target_modules=["q_proj", "gate_proj"],
                                                      use_cayley_neumann=False, block_share=True)),
    "llama-boft": ("llama", lambda: _boft()),
    "gemma-oft": ("gemma", lambda: _oft(oft_block_size=4, num_cayley_neumann_terms=7)),
    "gemma-boft-block-num": ("gemma", lambda: _boft(boft_block_size=0, boft_block_num=8)),
}


def _fill(peft_model: Any, salt: int = 0) -> None:
    """Element-unique rotations far from the identity, BOFT scales around 1 (PEFT starts at the identity)."""
    import torch

    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(peft_model.named_parameters())):
            if "boft_s" in name:
                param.copy_(torch.from_numpy(unique_values(tuple(param.shape), salt + index, around=1.0, scale=0.3)))
            elif "oft_R" in name or "boft_R" in name:
                param.copy_(torch.from_numpy(unique_values(tuple(param.shape), salt + index, scale=0.3)))


def _peft_adapter(folder: Path, out: Path, config: Any, salt: int = 0) -> Any:
    peft_model = peft.get_peft_model(hf_model(folder), config)
    _fill(peft_model, salt)
    peft_model.eval()
    peft_model.save_pretrained(out)
    return peft_model


def _adapted(peft_model: Any) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, module in peft_model.named_modules()
            if any(len(getattr(module, attr, ())) for attr in ("oft_R", "boft_R"))}


def _peft_load(folder: Path, adapter: Path) -> Any:
    """PEFT loads ``adapter`` on the checkpoint: no missing or unexpected adapter key, no warning of its own
    (transformers' deprecation notices and BOFT's environment notices aside)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # PEFT's BOFT says these on any machine (as tests/torch/test_oft.py filters them): no CUDA kernel here,
        # and its own factor count convention
        warnings.filterwarnings("ignore", message=".*CUDA extension")
        warnings.filterwarnings("ignore", message=".*boft_n_butterfly_factor to 1")
        model = peft.PeftModel.from_pretrained(hf_model(folder), adapter).eval()
        result: Any = set_peft_model_state_dict(model, load_file(adapter / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if any(m in k for m in _MARKERS)]
    return model




@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_oft_adapter_gives_peft_logits_in_keras(case: str, checkpoints: Any, token_ids: np.ndarray,
                                                     tmp_path: Path) -> None:
    arch, make_config = CASES[case]
    peft_model = _peft_adapter(checkpoints[arch], tmp_path / "peft", make_config())
    expected = torch_logits(peft_model, token_ids)
    base_torch = torch_logits(hf_model(checkpoints[arch]), token_ids)
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, token_ids)

    modules = adapterspec.load_adapter(model, tmp_path / "peft")

    assert set(modules) == _adapted(peft_model)  # nothing missing, nothing extra
    got = keras_logits(model, token_ids)
    assert_peft_close(got, expected, base, base_torch)
    assert np.abs(expected - base).max() > 1e-2  # the adapter changes the output: the comparison means something
    with adapterspec.disabled_adapters(model):
        assert np.abs(keras_logits(model, token_ids) - base).max() == 0.0

    # Keras saves exactly the tensors PEFT wrote, and PEFT loads them cleanly with the same logits
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    ours, theirs = adapterspec.read_adapter(saved), adapterspec.read_adapter(tmp_path / "peft")
    assert set(ours.tensors) == set(theirs.tensors)
    ours_np, theirs_np = ours.load_tensors("numpy"), theirs.load_tensors("numpy")
    for key in theirs_np:
        assert np.array_equal(ours_np[key], theirs_np[key]), key
    reloaded = _peft_load(checkpoints[arch], saved)
    assert_near(torch_logits(reloaded, token_ids), expected)

    # merged: PEFT's merged logits; unmerged: back to the unmerged forward
    peft_model.merge_adapter()
    merged_expected = torch_logits(peft_model, token_ids)
    adapterspec.merge_adapters(model)
    assert_peft_close(keras_logits(model, token_ids), merged_expected, base, base_torch)
    adapterspec.unmerge_adapters(model)
    assert_near(keras_logits(model, token_ids), got)
    with adapterspec.disabled_adapters(model):
        assert_near(keras_logits(model, token_ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["OFT", "BOFT"])
def test_null_target_modules_take_peft_default_for_the_architecture(method: str, checkpoints: Any,
                                                                    token_ids: np.ndarray, tmp_path: Path) -> None:
    """PEFT's own method_comparison config boft/llama-3.2-3B-default has ``target_modules: null``: PEFT fills its
    per-architecture table (OFT's and BOFT's copy LoRA's: llama -> q_proj, v_proj). It was a TargetNotFoundError
    whose message began with a stray "None:" ("None: no module of this Llama3CausalLM matches ...")."""
    config = _oft(r=32, oft_block_size=0, target_modules=None) if method == "OFT" else \
        _boft(boft_block_num=0, target_modules=None)
    _peft_adapter(checkpoints["llama"], tmp_path / "peft", config)
    path = tmp_path / "peft" / "adapter_config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "target_modules": None}))  # as in the published config
    expected = torch_logits(_peft_load(checkpoints["llama"], tmp_path / "peft"), token_ids)
    model = keras_model("llama", checkpoints["llama"])
    base = keras_logits(model, token_ids)
    modules = adapterspec.load_adapter(model, tmp_path / "peft")
    assert sorted(modules) == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert np.abs(expected - base).max() > 1e-2
    assert_peft_close(keras_logits(model, token_ids), expected, base,
                      torch_logits(hf_model(checkpoints["llama"]), token_ids))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["OFT", "BOFT"])
def test_adapter_made_in_keras_loads_in_peft_and_round_trips(method: str, checkpoints: Any, token_ids: np.ndarray,
                                                             tmp_path: Path) -> None:
    """``init_weights: false``: every tensor random, away from the identity (standing in for training)."""
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
    config: dict[str, Any] = {"peft_type": "OFT", "r": 0, "oft_block_size": 8, "init_weights": False,
                              "target_modules": targets} if method == "OFT" else \
        {"peft_type": "BOFT", "boft_block_size": 8, "init_weights": False, "target_modules": targets}
    model = keras_model("gemma", checkpoints["gemma"])
    base = keras_logits(model, token_ids)
    modules = adapterspec.inject_adapter(model, config)
    assert len(modules) == 8
    got = keras_logits(model, token_ids)
    assert np.abs(got - base).max() > 1e-3
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    peft_model = _peft_load(checkpoints["gemma"], saved)
    assert _adapted(peft_model) == set(modules)
    assert_near(got, torch_logits(peft_model, token_ids))

    again = keras_model("gemma", checkpoints["gemma"])  # Keras -> save -> load: bit-exact
    adapterspec.load_adapter(again, saved)
    assert np.array_equal(keras_logits(again, token_ids), got)
    first, second = adapterspec.extract_adapter(model), adapterspec.extract_adapter(again)
    a, b = first.load_tensors("numpy"), second.load_tensors("numpy")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_oft_and_boft_adapters_switch_merge_and_delete(checkpoints: Any, token_ids: np.ndarray,
                                                       tmp_path: Path) -> None:
    """Two rotation methods on the same modules: each alone gives its own PEFT logits; activating both at once is
    refused, nothing changed (PEFT holds one method per layer); the base comes back."""
    folder = checkpoints["llama"]
    oft = _peft_adapter(folder, tmp_path / "oft", _oft(target_modules=["q_proj", "up_proj"]))
    boft = _peft_adapter(folder, tmp_path / "boft", _boft(target_modules=["q_proj", "down_proj"]), salt=5)
    expected = {"oft": torch_logits(oft, token_ids), "boft": torch_logits(boft, token_ids)}
    model = keras_model("llama", folder)
    base = keras_logits(model, token_ids)
    adapterspec.load_adapter(model, tmp_path / "oft", adapter_name="oft")
    adapterspec.load_adapter(model, tmp_path / "boft", adapter_name="boft")
    for name in ("boft", "oft", "boft"):
        adapterspec.set_active_adapters(model, [name])
        assert_near(keras_logits(model, token_ids), expected[name])
    assert_refused_unchanged(model, lambda: adapterspec.set_active_adapters(model, ["oft", "boft"]), UnsupportedError,
                             "one method per layer")  # when activated (it raised at the forward)
    adapterspec.set_active_adapters(model, [])
    assert np.array_equal(keras_logits(model, token_ids), base)
    adapterspec.set_active_adapters(model, ["oft"])
    adapterspec.merge_adapters(model, ["oft"])
    assert_near(keras_logits(model, token_ids), expected["oft"])
    adapterspec.unmerge_adapters(model)
    adapterspec.delete_adapter(model, "oft")
    adapterspec.delete_adapter(model, "boft")
    assert_near(keras_logits(model, token_ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", ["embedding", "lm-head", "boft-block-size", "coft", "butterfly",
                                  "train-module-dropout", "train-boft-dropout"])
def test_unsupported_oft_forms_are_refused_and_leave_the_model_unchanged(case: str, checkpoints: Any) -> None:
    model = keras_model("llama", checkpoints["llama"])
    before = snapshot(model)
    config: dict[str, Any] = {"peft_type": "OFT", "r": 0, "oft_block_size": 8, "target_modules": ["q_proj"]}
    boft: dict[str, Any] = {"peft_type": "BOFT", "boft_block_size": 4, "target_modules": ["q_proj"]}
    pointer = None
    if case == "embedding":
        config["target_modules"] = ["q_proj", "embed_tokens"]
    elif case == "lm-head":
        config["target_modules"] = ["lm_head"]
    elif case == "boft-block-size":
        config, pointer = dict(boft, boft_block_size=6), "/boft_block_size"
    elif case == "coft":
        config, pointer = dict(config, coft=True), "/coft"
    elif case == "butterfly":
        config, pointer = dict(boft, boft_n_butterfly_factor=2), "/boft_n_butterfly_factor"
    elif case == "train-module-dropout":
        config, pointer = dict(config, module_dropout=0.1), "/module_dropout"
    else:
        config, pointer = dict(boft, boft_dropout=0.1), "/boft_dropout"
    with pytest.raises(UnsupportedError) as caught:
        adapterspec.inject_adapter(model, config)
    if pointer is not None:
        assert caught.value.pointer == pointer
    else:
        assert caught.value.key in ("model.embed_tokens", "lm_head")
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["OFT", "BOFT"])
def test_gpt2_conv1d_modules_are_refused_as_peft_refuses_them(method: str, checkpoints: Any) -> None:
    """PEFT's OFT/BOFT adapt nn.Linear and nn.Conv2d: on GPT-2's transformers Conv1D it raises TypeError, so a Keras
    adapter there could never load in PEFT (the keras-hub Dense/EinsumDense layers alone would not tell)."""
    model = keras_model("gpt2", checkpoints["gpt2"])
    before = snapshot(model)
    config: dict[str, Any] = {"peft_type": "OFT", "r": 0, "oft_block_size": 8, "target_modules": ["c_attn"]} \
        if method == "OFT" else {"peft_type": "BOFT", "boft_block_size": 4, "target_modules": ["c_attn"]}
    with pytest.raises(UnsupportedError, match="transformers Conv1D") as caught:
        adapterspec.inject_adapter(model, config)
    assert caught.value.key is not None and caught.value.key.endswith("c_attn")
    assert_same_snapshot(before, snapshot(model))
    with pytest.raises(TypeError, match="not supported"):  # PEFT itself
        peft.get_peft_model(hf_model(checkpoints["gpt2"]), peft.OFTConfig(r=0, oft_block_size=8,
                                                                          target_modules=["c_attn"]))


def test_every_oft_and_boft_case_of_the_corpus_passes() -> None:
    """Dense and Conv2D layers (OFT 1x1, BOFT 3x3; Cayley-Neumann, exact Cayley, shared blocks), numeric (against
    the reference, itself checked against PEFT), round-trip and folder cases: all pass, none is unsupported."""
    from adapterspec.conformance import Status, load_corpus, run_suite
    from adapterspec_keras.conformance import KerasImplementation

    corpus = load_corpus(Path(__file__).parents[2] / "conformance_tests" / "v1")
    report = run_suite(KerasImplementation(), corpus, include=[r"oft"])
    names = {r.name: r.status for r in report.results}
    assert len(names) >= 16 and any("boft-conv2d" in n for n in names) and any("oft-conv2d-1x1" in n for n in names)
    assert {n: s for n, s in names.items() if s is not Status.PASSED} == {}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["OFT", "BOFT"])
def test_fit_trains_only_the_rotations_and_peft_loads_the_result(method: str, checkpoints: Any,
                                                                 token_ids: np.ndarray, tmp_path: Path) -> None:
    import keras

    from keras_helpers import keras_inputs

    model = keras_model("llama", checkpoints["llama"])
    base_values = {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.variables}
    base = keras_logits(model, token_ids)
    targets = ["q_proj", "v_proj", "down_proj"]
    config: dict[str, Any] = {"peft_type": "OFT", "r": 0, "oft_block_size": 8, "target_modules": targets} \
        if method == "OFT" else {"peft_type": "BOFT", "boft_block_size": 4, "target_modules": targets}
    adapterspec.inject_adapter(model, config)
    assert np.array_equal(keras_logits(model, token_ids), base)  # PEFT's init: the identity rotation
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

    from adapterspec_keras import oft

    result = doctest.testmod(oft, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0
