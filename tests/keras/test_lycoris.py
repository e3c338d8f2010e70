"""LoHa and LoKr on keras-hub models, exact against PEFT 0.21 (fp32): a folder PEFT saved loads and gives PEFT's
logits, a folder Keras saves loads in PEFT (no missing/unexpected keys, no warning) with Keras' logits, a round trip
is bit-exact; merge/unmerge, switching and the refusals (convolutions, embeddings, training with dropouts)."""

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
    ARCHS,
    assert_near,
    assert_peft_close,
    assert_same_snapshot,
    hf_model,
    keras_logits,
    keras_model,
    snapshot,
    torch_logits,
    unique_values,
)

_MARKERS = ("hada_", "lokr_")
_TARGETS = list(ARCHS["llama"].linear_targets)


def _loha(**kw: Any) -> Any:
    return peft.LoHaConfig(**{"r": 4, "alpha": 8, "target_modules": _TARGETS, **kw})


def _lokr(**kw: Any) -> Any:
    return peft.LoKrConfig(**{"r": 4, "alpha": 8, "target_modules": _TARGETS, **kw})


CASES: dict[str, tuple[str, Any]] = {
    "llama-loha": ("llama", lambda: _loha()),
    "llama-loha-patterns-dropouts": ("llama", lambda: _loha(
        rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.1\..*v_proj": 3}, rank_dropout=0.3, module_dropout=0.2)),
    "llama-lokr-full": ("llama", lambda: _lokr()),  # r=4: lokr_w1 and lokr_w2 whole (64 = 8 x 8)
    "llama-lokr-decompose-both": ("llama", lambda: _lokr(r=2, decompose_both=True)),  # both factored
    "llama-lokr-factor-patterns": ("llama", lambda: _lokr(
        decompose_factor=4, rank_pattern={"q_proj": 1}, alpha_pattern={"up_proj": 5}, rank_dropout=0.1)),
    "gemma-loha": ("gemma", lambda: _loha(r=3, alpha=5)),
    "gemma-lokr": ("gemma", lambda: _lokr(r=2, alpha=3, decompose_both=True, decompose_factor=8)),
}


def _fill(peft_model: Any, salt: int = 0) -> None:
    """Element-unique values in every LoHa/LoKr tensor (PEFT zeroes one factor at initialisation)."""
    import torch

    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(peft_model.named_parameters())):
            if any(m in name for m in _MARKERS):
                param.copy_(torch.from_numpy(unique_values(tuple(param.shape), salt + index, scale=0.4)))


def _peft_adapter(arch: str, folder: Path, out: Path, config: Any) -> Any:
    peft_model = peft.get_peft_model(hf_model(folder), config)
    _fill(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(out)
    return peft_model


def _adapted(peft_model: Any) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, module in peft_model.named_modules()
            if any(len(getattr(module, attr, ())) for attr in ("hada_w1_a", "lokr_w1", "lokr_w1_a"))}


def _peft_load(folder: Path, adapter: Path) -> Any:
    """PEFT loads ``adapter`` on the checkpoint: no missing or unexpected adapter key, no warning of its own
    (transformers' deprecation notices aside)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        model = peft.PeftModel.from_pretrained(hf_model(folder), adapter).eval()
        result: Any = set_peft_model_state_dict(model, load_file(adapter / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if any(m in k for m in _MARKERS)]
    return model




@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_lycoris_adapter_gives_peft_logits_in_keras(case: str, checkpoints: Any, token_ids: np.ndarray,
                                                         tmp_path: Path) -> None:
    arch, make_config = CASES[case]
    peft_model = _peft_adapter(arch, checkpoints[arch], tmp_path / "peft", make_config())
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

    # merged: the same logits; unmerged: back to the unmerged forward
    adapterspec.merge_adapters(model)
    assert_peft_close(keras_logits(model, token_ids), expected, base, base_torch)
    adapterspec.unmerge_adapters(model)
    assert_near(keras_logits(model, token_ids), got)
    with adapterspec.disabled_adapters(model):
        assert_near(keras_logits(model, token_ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["LOHA", "LOKR"])
def test_adapter_made_in_keras_loads_in_peft_and_round_trips(method: str, checkpoints: Any, token_ids: np.ndarray,
                                                             tmp_path: Path) -> None:
    """``init_weights: false``: every factor random and non-zero (standing in for training)."""
    config = {"peft_type": method, "r": 2, "alpha": 6, "init_weights": False,
              "target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj"]}
    if method == "LOKR":
        config["decompose_both"] = True
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
def test_lycoris_adapters_switch_merge_and_delete(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """Two methods on the same modules: each alone gives its own PEFT logits, the base comes back bit-exact."""
    folder = checkpoints["llama"]
    loha = _peft_adapter("llama", folder, tmp_path / "loha", _loha(target_modules=["q_proj", "up_proj"]))
    lokr = _peft_adapter("llama", folder, tmp_path / "lokr", _lokr(r=2, decompose_both=True,
                                                                   target_modules=["q_proj", "down_proj"]))
    expected = {"loha": torch_logits(loha, token_ids), "lokr": torch_logits(lokr, token_ids)}
    model = keras_model("llama", folder)
    base = keras_logits(model, token_ids)
    adapterspec.load_adapter(model, tmp_path / "loha", adapter_name="loha")
    adapterspec.load_adapter(model, tmp_path / "lokr", adapter_name="lokr")
    for name in ("lokr", "loha", "lokr"):
        adapterspec.set_active_adapters(model, [name])
        assert_near(keras_logits(model, token_ids), expected[name])
    adapterspec.set_active_adapters(model, [])
    assert np.array_equal(keras_logits(model, token_ids), base)
    adapterspec.set_active_adapters(model, ["loha"])
    adapterspec.merge_adapters(model, ["loha"])
    assert_near(keras_logits(model, token_ids), expected["loha"])
    adapterspec.unmerge_adapters(model)
    adapterspec.delete_adapter(model, "loha")
    adapterspec.delete_adapter(model, "lokr")
    assert_near(keras_logits(model, token_ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", ["embedding", "lm-head", "train-rank-dropout", "train-module-dropout"])
def test_unsupported_lycoris_forms_are_refused_and_leave_the_model_unchanged(case: str, checkpoints: Any) -> None:
    model = keras_model("llama", checkpoints["llama"])
    before = snapshot(model)
    config: dict[str, Any] = {"peft_type": "LOHA", "r": 2, "target_modules": ["q_proj"]}
    if case == "embedding":
        config["target_modules"] = ["q_proj", "embed_tokens"]
    elif case == "lm-head":
        config["target_modules"] = ["lm_head"]
    elif case == "train-rank-dropout":
        config["rank_dropout"] = 0.1
    else:
        config["module_dropout"] = 0.1
    with pytest.raises(UnsupportedError) as caught:
        adapterspec.inject_adapter(model, config)
    if case.startswith("train"):
        assert caught.value.pointer == "/" + case.removeprefix("train-").replace("-", "_")
    else:
        assert caught.value.key in ("model.embed_tokens", "lm_head")
    assert_same_snapshot(before, snapshot(model))


def test_every_loha_and_lokr_case_of_the_corpus_passes() -> None:
    """Dense and Conv1D/Conv2D layers (plain and ``use_effective_conv2d`` forms, full and factored LoKr, the
    Conv1d full-``lokr_w2`` rule of SPEC.md 8.7), numeric (against the reference, itself checked against PEFT),
    round-trip and folder cases: all pass on this backend, none is unsupported."""
    from pathlib import Path as _Path

    from adapterspec.conformance import Status, load_corpus, run_suite
    from adapterspec_keras.conformance import KerasImplementation

    corpus = load_corpus(_Path(__file__).parents[2] / "conformance_tests" / "v1")
    report = run_suite(KerasImplementation(), corpus, include=[r"lo(ha|kr)"])
    names = {r.name: r.status for r in report.results}
    assert len(names) >= 30 and any("conv2d-effective" in n for n in names) and any("conv1d" in n for n in names)
    assert {n: s for n, s in names.items() if s is not Status.PASSED} == {}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["LOHA", "LOKR"])
def test_fit_trains_only_the_lycoris_factors_and_peft_loads_the_result(method: str, checkpoints: Any,
                                                                       token_ids: np.ndarray, tmp_path: Path) -> None:
    import keras

    from keras_helpers import keras_inputs

    model = keras_model("llama", checkpoints["llama"])
    base_values = {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.variables}
    base = keras_logits(model, token_ids)
    config = {"peft_type": method, "r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    if method == "LOKR":
        config["decompose_both"] = True
    adapterspec.inject_adapter(model, config)
    assert np.array_equal(keras_logits(model, token_ids), base)  # PEFT's init: ΔW = 0
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


@pytest.mark.parametrize("method", ["LOHA", "LOKR"])
def test_gpt2_conv1d_modules_are_refused_as_peft_and_torch_refuse_them(method: str, checkpoints: Any) -> None:
    """PEFT's LoHa/LoKr adapt nn.Linear, Conv1d and Conv2d: on GPT-2's transformers Conv1D it raises TypeError and the
    torch backend refuses, so the Keras backend refuses too (a Keras adapter there could never load in PEFT)."""
    model = keras_model("gpt2", checkpoints["gpt2"])
    before = snapshot(model)
    config: dict[str, Any] = {"peft_type": method, "r": 2, "alpha": 4, "target_modules": ["c_attn"]}
    with pytest.raises(UnsupportedError, match="transformers Conv1D") as caught:
        adapterspec.inject_adapter(model, config)
    assert caught.value.key is not None and caught.value.key.endswith("c_attn")
    assert_same_snapshot(before, snapshot(model))
    peft_config = (peft.LoHaConfig if method == "LOHA" else peft.LoKrConfig)(r=2, target_modules=["c_attn"])
    with pytest.raises(TypeError, match="not supported"):  # PEFT itself
        peft.get_peft_model(hf_model(checkpoints["gpt2"]), peft_config)
