"""Modules a keras-hub converter fuses into one kernel itself: Swin's query, key and value (issue #16).

keras-hub 0.32's Swin converter reads transformers' separate ``attention.self.query/key/value`` weights and
assigns their concatenation to one Dense kernel (``attn/attention_qkv``). Each of the three modules maps to its own
column range of that kernel (a ``Piece`` with ``out_slice``); the layer hosts the three modules' adapters at once,
each changing only its columns. Checked against PEFT 0.21 itself on a tiny random transformers Swin (two stages of
two blocks: shifted windows and a patch merging): a folder PEFT saved gives PEFT's outputs within 3x keras-hub's
own conversion error + 1e-5 (LoRA on every linear layer, on the query alone, DoRA, ``lora_bias``, IA3, LoHa, LoKr),
saving it again is bit-identical to PEFT's file, a folder Keras saves loads in PEFT with no missing/unexpected key
and no warning and gives Keras' outputs; merge/unmerge, two adapters switching and combined, and the methods left
refused (typed, the model unchanged).
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
transformers = pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from adapterspec.errors import UnsupportedError  # noqa: E402
from adapterspec_keras import converters  # noqa: E402
from keras_helpers import assert_refused_unchanged, unique_values  # noqa: E402

_CONFIG = dict(embed_dim=16, depths=[2, 2], num_heads=[2, 2], image_size=16, patch_size=2, window_size=4)
_QKV = ["q_proj", "k_proj", "v_proj"]
_ALL = [*_QKV, "o_proj", "fc1", "fc2", "reduction"]
_MARKERS = ("lora_", "ia3_", "hada_", "lokr_")

#: case -> the PEFT config (a float scale for the element-unique values: the query alone moves the output little)
CASES: dict[str, tuple[Any, float]] = {
    "lora-every-linear": (lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=_ALL), 0.05),
    "lora-query-alone": (lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), 0.3),
    "lora-bias-rslora": (lambda: peft.LoraConfig(r=2, lora_alpha=4, lora_bias=True, use_rslora=True,
                                                 target_modules=[*_QKV, "fc1"]), 0.1),
    "dora": (lambda: peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=[*_QKV, "fc2"]), 0.1),
    "dora-value-alone": (lambda: peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["v_proj"]), 0.2),
    "ia3": (lambda: peft.IA3Config(target_modules=[*_QKV, "fc2"], feedforward_modules=["fc2"]), 0.3),
    "loha": (lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "o_proj"]), 0.2),
    "lokr": (lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=["k_proj", "v_proj"]), 0.2),
    # SPEC 8.1: each of q, k, v rebuilds its residual in its own columns of the one fused kernel
    "pissa": (lambda: peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights="pissa", target_modules=[*_QKV, "fc1"]),
              0.1),
    "olora": (lambda: peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights="olora", target_modules=_QKV), 0.1),
}


def _images() -> np.ndarray:
    return (np.sin(np.arange(2 * 16 * 16 * 3, dtype=np.float64) * 0.37) * 0.8).reshape(2, 16, 16, 3).astype("float32")


@pytest.fixture(scope="module")
def swin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny random ``SwinForImageClassification`` saved for keras-hub, and its base model's output."""
    folder = tmp_path_factory.mktemp("swin") / "hf"
    torch.manual_seed(16)
    config = transformers.AutoConfig.for_model("swin", **_CONFIG)
    transformers.SwinForImageClassification(config).eval().save_pretrained(folder, safe_serialization=True)
    return {"folder": folder, "base": _run_torch(_hf_base(folder))}


def _hf_base(folder: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.SwinForImageClassification.from_pretrained(folder).swin.eval()


def _run_torch(model: Any) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(_images().transpose(0, 3, 1, 2))).last_hidden_state.numpy()


def _backbone(folder: Path) -> Any:
    import keras_hub

    return keras_hub.models.Backbone.from_preset(str(folder))


def _run_keras(model: Any) -> np.ndarray:
    from keras import ops

    return np.asarray(ops.convert_to_numpy(model(_images())))


def _fill(peft_model: Any, salt: int, scale: float) -> None:
    """Element-unique values in every adapter tensor (IA3 near 1, DoRA's magnitude near ||W||)."""
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(peft_model.named_parameters())):
            if not any(m in name for m in _MARKERS):
                continue
            shape = tuple(param.shape)
            if "ia3_l" in name:
                param.copy_(torch.from_numpy(unique_values(shape, salt + index, around=1.0, scale=scale)))
            elif "lora_magnitude_vector" in name:
                param.copy_(param * torch.from_numpy(unique_values(shape, salt + index, around=1.0, scale=scale)))
            else:
                param.copy_(torch.from_numpy(unique_values(shape, salt + index, scale=scale)))


def _peft_adapter(folder: Path, out: Path, config: Any, *, salt: int = 0, scale: float = 0.05) -> Any:
    peft_model = peft.get_peft_model(_hf_base(folder), config)
    _fill(peft_model, salt, scale)
    peft_model.eval().save_pretrained(out)
    return peft_model


def _peft_loads(folder: Path, adapter: Path) -> tuple[Any, list[str]]:
    """PEFT loads ``adapter`` with its state dict equal to the file, tensor for tensor; the model and its warnings."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    base = _hf_base(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, adapter).eval()
    state, stored = get_peft_model_state_dict(model), load_file(adapter / "adapter_model.safetensors")
    assert sorted(state) == sorted(stored)
    for key, tensor in stored.items():
        assert torch.equal(state[key], tensor), key
    return model, sorted({str(w.message) for w in caught if not issubclass(w.category, (FutureWarning,
                                                                                          DeprecationWarning))})


def _bound(conversion: float) -> float:
    return 3 * conversion + 1e-5


def _same_file(a: Path, b: Path) -> None:
    from safetensors.numpy import load_file

    mine, theirs = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert sorted(mine) == sorted(theirs)
    for key, value in theirs.items():
        assert mine[key].dtype == value.dtype and np.array_equal(mine[key], value), key


def test_fused_query_key_value_are_column_ranges_of_the_qkv_kernel(swin: dict[str, Any]) -> None:
    """The probe replay finds each fused weight's columns (and checks the bias is laid out the same)."""
    backbone = _backbone(swin["folder"])
    sites, model_type = converters.converter_sites(backbone)
    assert model_type == "swin"
    for stage, width in ((0, 16), (1, 32)):
        for block in (0, 1):
            prefix = f"encoder.layers.{stage}.blocks.{block}.attention.self."
            for i, name in enumerate(("query", "key", "value")):
                site = sites[prefix + name]
                assert not site.refused and (site.in_features, site.out_features) == (width, width)
                (piece,) = site.pieces
                assert piece.layer.path == f"stage_{stage}/blocks_{block}/attn/attention_qkv"
                assert piece.out_slice == (i * width, (i + 1) * width)
                assert np.array_equal(piece.in_index, np.arange(width))
                assert np.array_equal(piece.out_index, np.arange(width))
    assert len({s.key for p, s in sites.items() if "attention.self." in p}) == 12  # one adapter layer each


def test_a_fused_layout_that_is_not_column_ranges_is_not_resolved() -> None:
    """Interleaved columns (q0 k0 v0 q1 ...), a transposed weight, or a bias in another order: no pieces."""
    n_in, per = 3, 2
    probes = [np.arange(per * n_in, dtype=np.float64).reshape(per, n_in) + i * per * n_in for i in range(3)]
    bias = np.concatenate([np.arange(per, dtype=np.float64) + i * per for i in range(3)])
    kernel = np.concatenate(probes, axis=0).T
    assert converters._decode_fused(None, kernel, n_in, per, 3, bias) is not None
    assert converters._decode_fused(None, kernel, n_in, per, 3, None) is not None
    interleaved = np.stack(probes, axis=1).reshape(per * 3, n_in).T
    assert converters._decode_fused(None, interleaved, n_in, per, 3, bias) is None
    assert converters._decode_fused(None, kernel[::-1], n_in, per, 3, bias) is not None  # rows permuted: an index
    assert converters._decode_fused(None, kernel.T.reshape(n_in, -1), n_in, per, 3, bias) is None
    assert converters._decode_fused(None, kernel, n_in, per, 3, bias[::-1]) is None
    assert converters._decode_fused(None, None, n_in, per, 3, bias) is None


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_on_fused_modules_matches_peft_both_ways(case: str, swin: dict[str, Any], tmp_path: Path) -> None:
    make, scale = CASES[case]
    peft_model = _peft_adapter(swin["folder"], tmp_path / "peft", make(), scale=scale)
    expected = _run_torch(peft_model)
    model = _backbone(swin["folder"])
    base = _run_keras(model)
    bound = _bound(float(np.abs(base - swin["base"]).max()))

    modules = adapterspec.load_adapter(model, tmp_path / "peft")

    got = _run_keras(model)
    diff, effect = float(np.abs(got - expected).max()), float(np.abs(expected - swin["base"]).max())
    print(f"FUSED {case}: modules={len(modules)} diff={diff:.2e} bound={bound:.2e} effect={effect:.2e}")
    assert diff <= bound and effect > 10 * bound
    # saved again: bit-identical to PEFT's file; PEFT loads it exactly, without a warning, with the same outputs
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    _same_file(saved, tmp_path / "peft")
    reloaded, said = _peft_loads(swin["folder"], saved)
    assert said == []
    assert np.abs(_run_torch(reloaded) - expected).max() <= 1e-6
    # merge: the same outputs from the fused kernel itself; unmerge: back to the unmerged ones and the base kernels
    kernels = {v.path: np.array(v.numpy()) for v in model.variables if "attention_qkv" in v.path}
    adapterspec.merge_adapters(model)
    merged = _run_keras(model)
    assert float(np.abs(merged - expected).max()) <= bound
    assert any(not np.array_equal(v.numpy(), kernels[v.path]) for v in model.variables if v.path in kernels)
    adapterspec.unmerge_adapters(model)
    assert float(np.abs(_run_keras(model) - got).max()) <= 1e-5
    for v in model.variables:
        if v.path in kernels:
            assert np.abs(v.numpy() - kernels[v.path]).max() <= 1e-5 * max(1.0, np.abs(kernels[v.path]).max()), v.path
    adapterspec.delete_adapter(model, "default")
    assert float(np.abs(_run_keras(model) - base).max()) <= 1e-5


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_adapter_made_in_keras_on_fused_modules_gives_keras_outputs_in_peft(swin: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    """Random (non-zero) initialisation stands in for training; the three modules save as PEFT names them."""
    model = _backbone(swin["folder"])
    base = _run_keras(model)
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "lora_alpha": 8, "init_lora_weights": False,
                                       "use_dora": True, "target_modules": ["q_proj", "k_proj", "v_proj", "fc1"]})
    got = _run_keras(model)
    assert np.abs(got - base).max() > 1e-3
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    reloaded, said = _peft_loads(swin["folder"], saved)
    assert said == []
    assert len({k.split(".lora_")[0] for k in _keys(saved)}) == 4 * 4
    conversion = float(np.abs(base - swin["base"]).max())
    # an image backbone records no task_type: PEFT wraps it in a plain PeftModel, which Swin's forward runs under
    # (FEATURE_EXTRACTION's wrapper would pass input_ids= and attention_mask= down to it: a TypeError)
    assert json.loads((saved / "adapter_config.json").read_text())["task_type"] is None
    assert type(reloaded) is peft.PeftModel
    assert float(np.abs(_run_torch(reloaded) - got).max()) <= _bound(conversion)


def _keys(folder: Path) -> list[str]:
    from safetensors.numpy import load_file

    return list(load_file(folder / "adapter_model.safetensors"))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_adapters_on_fused_modules_switch_and_combine_as_peft(swin: dict[str, Any], tmp_path: Path) -> None:
    """"a": LoRA on query and value; "b": DoRA on query and key (query: both adapters on one slice)."""
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    dora = peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "k_proj"])
    pm = _peft_adapter(swin["folder"], tmp_path / "a", lora, salt=1, scale=0.2)
    _peft_adapter(swin["folder"], tmp_path / "b", dora, salt=2, scale=0.2)
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    model = _backbone(swin["folder"])
    bound = _bound(float(np.abs(_run_keras(model) - swin["base"]).max()))
    adapterspec.load_adapter(model, tmp_path / "a", "a")
    adapterspec.load_adapter(model, tmp_path / "b", "b", activate=False)
    outputs = {}
    for active in (["a"], ["b"], ["a", "b"]):
        adapterspec.set_active_adapters(model, active)
        pm.base_model.set_adapter([{"a": "default"}.get(n, n) for n in active])
        expected = _run_torch(pm)
        outputs[tuple(active)] = expected
        assert float(np.abs(_run_keras(model) - expected).max()) <= bound, active
    assert min(float(np.abs(outputs[("a",)] - o).max()) for o in (outputs[("b",)], outputs[("a", "b")])) > 10 * bound
    adapterspec.merge_adapters(model, ["a", "b"])
    assert float(np.abs(_run_keras(model) - outputs[("a", "b")]).max()) <= bound
    adapterspec.unmerge_adapters(model)
    adapterspec.set_active_adapters(model, ["b"])
    assert float(np.abs(_run_keras(model) - outputs[("b",)]).max()) <= bound


_REFUSED: dict[str, Any] = {
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj"]),
    "adalora": lambda: peft.AdaLoraConfig(init_r=2, target_r=2, total_step=10, target_modules=["k_proj"]),
    "vera": lambda: peft.VeraConfig(r=2, target_modules=["v_proj", "fc1"]),
    "ia3-feedforward": lambda: peft.IA3Config(target_modules=["q_proj", "fc2"], feedforward_modules=["q_proj"]),
    "modules-to-save": lambda: peft.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["q_proj"]),
}
_SAYS = {"ia3-feedforward": "scales the input of Dense", "modules-to-save": "cannot save it whole"}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(_REFUSED))
def test_methods_not_made_exact_on_fused_modules_are_refused_unchanged(case: str, swin: dict[str, Any],
                                                                        tmp_path: Path) -> None:
    """OFT rotates, AdaLoRA and VeRA are not checked here on a slice; IA3 feed-forward would scale the input the
    three fused modules share; a module saved whole would be a third of a kernel. Each is refused, typed, naming
    the module (and the fused layer)."""
    _peft_adapter(swin["folder"], tmp_path / case, _REFUSED[case]())
    model = _backbone(swin["folder"])
    needle = _SAYS.get(case, "fused with others into one kernel")
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, tmp_path / case), UnsupportedError,
                             needle)
    assert adapterspec.adapter_names(model) == []
