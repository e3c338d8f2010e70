"""RoAd (SPEC.md 17.1) on keras-hub models, exact against PEFT 0.21 (fp32) in both directions; refusals typed, as the
torch backend's.

Each case: a PEFT RoAd model with element-unique angles and scales is saved. A keras-hub model converted from the
same checkpoint loads the folder and gives PEFT's logits within the base conversion error (the pairs of outputs
rotated on keras-hub's EinsumDense ``(heads, head_dim)`` and Dense layers by their index maps); ``save_adapter``
writes bit-identical tensors that PEFT loads with nothing missing or unexpected and no warning of its own; merging
gives PEFT's merged logits (Qwen2: q/k/v biases rotated too), unmerging the unmerged ones.
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
from adapterspec.errors import MissingTensorError, ShapeMismatchError, UnsupportedError  # noqa: E402
from keras_helpers import (  # noqa: E402
    assert_near,
    assert_peft_close,
    assert_refused_unchanged,
    hf_model,
    keras_inputs,
    keras_logits,
    keras_model,
    peft_load_exactly,
    torch_logits,
    unique_values,
)

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _fill(model: Any, salt: int = 0) -> None:
    """Element-unique angles (around 0) and scales (around 1): a swapped half, a transpose or a wrong key shows."""
    with torch.no_grad():
        for index, (name, tensor) in enumerate(sorted(model.named_parameters())):
            if "road_theta" in name:
                tensor.copy_(torch.from_numpy(unique_values(tuple(tensor.shape), salt + index, scale=0.6)))
            elif "road_alpha" in name:
                tensor.copy_(torch.from_numpy(unique_values(tuple(tensor.shape), salt + index, around=1.0, scale=0.3)))


def _peft_folder(checkpoint: Path, config: Any, folder: Path, salt: int = 0) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(hf_model(checkpoint), config)
        _fill(model, salt)
        model.eval()
        model.save_pretrained(str(folder))
    return model


CASES: dict[str, tuple[str, Callable[[], Any]]] = {
    "road_1-llama-q-v": ("llama", lambda: peft.RoadConfig(variant="road_1", group_size=8,
                                                          target_modules=["q_proj", "v_proj"])),
    "road_2-llama-all": ("llama", lambda: peft.RoadConfig(variant="road_2", group_size=16, target_modules=LLAMA)),
    "road_4-llama-mlp": ("llama", lambda: peft.RoadConfig(variant="road_4", group_size=4,
                                                          target_modules=["gate_proj", "up_proj", "down_proj"])),
    "road_2-qwen2-biases": ("qwen2", lambda: peft.RoadConfig(variant="road_2", group_size=32, target_modules=LLAMA)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_road_gives_peft_logits_in_keras_and_round_trips(case: str, checkpoints: Any, token_ids: np.ndarray,
                                                              tmp_path: Path) -> None:
    arch, make_config = CASES[case]
    reference = _peft_folder(checkpoints[arch], make_config(), tmp_path / "peft")
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    theirs = adapterspec.read_adapter(tmp_path / "peft")
    _, said_peft = peft_load_exactly(checkpoints[arch], tmp_path / "peft")
    expected = torch_logits(reference, token_ids)
    base_torch = torch_logits(hf_model(checkpoints[arch]), token_ids)
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, token_ids)
    assert np.abs(expected - base_torch).max() > 1e-2  # the adapter changes the output: the comparison means something

    modules = adapterspec.load_adapter(model, tmp_path / "peft")
    assert len(modules) == len([k for k in theirs.tensors if k.endswith(".road_theta")])
    got = keras_logits(model, token_ids)
    assert_peft_close(got, expected, base, base_torch)
    with adapterspec.disabled_adapters(model):
        assert np.abs(keras_logits(model, token_ids) - base).max() == 0.0

    # Keras saves exactly PEFT's tensors and config; PEFT loads them cleanly, same logits
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    ours = adapterspec.read_adapter(saved)
    assert set(ours.tensors) == set(theirs.tensors)
    ours_np, theirs_np = ours.load_tensors("numpy"), theirs.load_tensors("numpy")
    for key in theirs_np:
        assert ours_np[key].dtype == theirs_np[key].dtype and np.array_equal(ours_np[key], theirs_np[key]), key
    ours_config = json.loads((saved / "adapter_config.json").read_text())
    assert {k: v for k, v in ours_config.items() if k in peft_config} == peft_config
    reloaded, said_ours = peft_load_exactly(checkpoints[arch], saved)
    assert said_ours == said_peft  # no warning of its own
    assert np.array_equal(torch_logits(reloaded, token_ids), expected)

    # round trip in Keras: bit-exact
    again = keras_model(arch, checkpoints[arch])
    adapterspec.load_adapter(again, saved)
    assert np.array_equal(keras_logits(again, token_ids), got)

    # merged: PEFT's merged logits; unmerged: back to the unmerged forward (an fp32 inverse: within rounding)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    merged_expected = torch_logits(reference, token_ids)
    adapterspec.merge_adapters(model)
    assert_peft_close(keras_logits(model, token_ids), merged_expected, base, base_torch)
    adapterspec.unmerge_adapters(model)
    assert_near(keras_logits(model, token_ids), got)
    with adapterspec.disabled_adapters(model):
        assert_near(keras_logits(model, token_ids), base)

    # deleting the adapter leaves the model as it was (up to the unmerge's rounding)
    adapterspec.delete_adapter(model, "default")
    assert adapterspec.adapter_names(model) == []
    assert_near(keras_logits(model, token_ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_merged_kernels_are_pefts_and_unmerge_is_its_inverse(checkpoints: Any, tmp_path: Path) -> None:
    """The merged q_proj kernel (an EinsumDense ``(hidden, heads, head_dim)``) is PEFT's ``R @ W`` in Keras layout
    within fp32 rounding; a wrong pairing (a swapped half, the transposed R) would be off by the weights' size."""
    reference = _peft_folder(checkpoints["llama"], peft.RoadConfig(variant="road_2", group_size=8,
                                                                   target_modules=["q_proj"]), tmp_path / "peft")
    model = keras_model("llama", checkpoints["llama"])
    adapterspec.load_adapter(model, tmp_path / "peft")
    layer = model.backbone.transformer_layers[0]._self_attention_layer._query_dense
    before = np.asarray(layer.kernel.numpy() if hasattr(layer.kernel, "numpy") else layer.kernel).copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    want = reference.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().numpy()
    adapterspec.merge_adapters(model)
    from keras import ops

    got = ops.convert_to_numpy(layer.kernel)  # [hidden, heads, head_dim]
    got_w = got.reshape(got.shape[0], -1).T  # [out, in]
    assert np.abs(got_w - want).max() <= 1e-6 * np.abs(want).max()
    assert np.abs(got.reshape(before.shape) - before).max() > 1e-3
    adapterspec.unmerge_adapters(model)
    back = ops.convert_to_numpy(layer.kernel)
    print(f"unmerged kernel vs base: {np.abs(back - before).max():.3g}")
    assert np.abs(back - before).max() <= 1e-6 * np.abs(before).max()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_road_adapters_switch_and_delete(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """Two RoAd adapters on the same model: active alone, each gives its PEFT model's logits; both active they
    rotate in order (PEFT's loop over active adapters); deleting one leaves the other whole."""
    configs = {"one": peft.RoadConfig(variant="road_1", group_size=8, target_modules=["q_proj", "v_proj"]),
               "two": peft.RoadConfig(variant="road_4", group_size=16, target_modules=["v_proj", "down_proj"])}
    expected = {name: torch_logits(_peft_folder(checkpoints["llama"], config, tmp_path / name, salt=i * 5), token_ids)
                for i, (name, config) in enumerate(configs.items())}
    base_torch = torch_logits(hf_model(checkpoints["llama"]), token_ids)
    model = keras_model("llama", checkpoints["llama"])
    base = keras_logits(model, token_ids)
    for name in configs:
        adapterspec.load_adapter(model, tmp_path / name, name)
    for name in configs:
        adapterspec.set_active_adapters(model, [name])
        assert_peft_close(keras_logits(model, token_ids), expected[name], base, base_torch)

    with warnings.catch_warnings():  # both: PEFT's model with both adapters active, on v_proj one after the other
        warnings.simplefilter("ignore")
        both = peft.PeftModel.from_pretrained(hf_model(checkpoints["llama"]), str(tmp_path / "one"), "one")
        both.load_adapter(str(tmp_path / "two"), "two")
        both.base_model.set_adapter(["one", "two"])
        both.eval()
    adapterspec.set_active_adapters(model, ["one", "two"])
    assert_peft_close(keras_logits(model, token_ids), torch_logits(both, token_ids), base, base_torch)

    adapterspec.delete_adapter(model, "one")
    adapterspec.set_active_adapters(model, ["two"])
    assert_peft_close(keras_logits(model, token_ids), expected["two"], base, base_torch)
    ours = adapterspec.extract_adapter(model, "two").load_tensors("numpy")
    theirs = adapterspec.read_adapter(tmp_path / "two").load_tensors("numpy")
    assert set(ours) == set(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_injected_road_trains_its_vectors_and_loads_in_peft(checkpoints: Any, token_ids: np.ndarray,
                                                             tmp_path: Path) -> None:
    """Injected (PEFT's identity init), the output is the base's; the trainable variables are exactly the theta
    and alpha vectors (PEFT's trainable parameters: 2 per module); one step moves them, and the saved folder loads
    in PEFT with Keras' logits."""
    import keras

    model = keras_model("llama", checkpoints["llama"])
    base = keras_logits(model, token_ids)
    adapterspec.inject_adapter(model, {"peft_type": "ROAD", "variant": "road_2", "group_size": 8,
                                       "target_modules": ["q_proj", "v_proj"]}, trainable=True)
    adapterspec.set_active_adapters(model, ["default"])
    assert np.array_equal(keras_logits(model, token_ids), base)
    variables = model.trainable_variables
    count = sum(int(np.prod(v.shape)) for v in variables)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.RoadConfig(variant="road_2", group_size=8, target_modules=["q_proj", "v_proj"])
        theirs = peft.get_peft_model(hf_model(checkpoints["llama"]), config)
    assert count == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    weights = unique_values((2, 9, 128), 5, scale=1.0)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(keras_inputs(token_ids), training=False) * weights)
        grads = tape.gradient(loss, variables)
    else:
        import jax

        stateless = [v.value for v in model.trainable_variables]
        others = [v.value for v in model.non_trainable_variables]

        def loss_of(train: Any) -> Any:
            out, _ = model.stateless_call(train, others, keras_inputs(token_ids), training=False)
            return (out * weights).sum()

        grads = jax.grad(loss_of)(stateless)
    for variable, grad in zip(variables, grads):
        variable.assign(variable - 0.05 * np.asarray(grad))
    got = keras_logits(model, token_ids)
    assert np.abs(got - base).max() > 1e-3
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    reloaded, _ = peft_load_exactly(checkpoints["llama"], saved)
    base_torch = torch_logits(hf_model(checkpoints["llama"]), token_ids)
    assert_peft_close(got, torch_logits(reloaded, token_ids), base, base_torch)


def _edited(checkpoint: Path, folder: Path, edit: Callable[[dict[str, np.ndarray]], Any], **fields: Any) -> Path:
    from safetensors.numpy import load_file, save_file

    _peft_folder(checkpoint, peft.RoadConfig(target_modules=["q_proj", "v_proj"], group_size=8, **fields), folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def test_missing_or_misshapen_vectors_are_refused(checkpoints: Any, tmp_path: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.road_alpha"
    missing = _edited(checkpoints["llama"], tmp_path / "a", lambda t: t.pop(key))
    model = keras_model("llama", checkpoints["llama"])
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, missing), MissingTensorError, "road_alpha")
    short = _edited(checkpoints["llama"], tmp_path / "b", lambda t: t.update({key: np.ascontiguousarray(t[key][:-4])}))
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, short), ShapeMismatchError, "road_alpha")


def test_unsupported_layers_and_group_sizes_are_refused_naming_the_module(checkpoints: Any) -> None:
    model = keras_model("llama", checkpoints["llama"])
    for config, needle in (
            ({"peft_type": "ROAD", "group_size": 48, "target_modules": ["q_proj"]}, "/group_size"),
            ({"peft_type": "ROAD", "group_size": 8, "target_modules": ["embed_tokens"]}, "model.embed_tokens"),
            ({"peft_type": "ROAD", "group_size": 8, "target_modules": ["lm_head"]}, "lm_head: RoAd on the logits")):
        assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(model, config), UnsupportedError, needle)
    gpt2 = keras_model("gpt2", checkpoints["gpt2"])  # transformers Conv1D: PEFT's RoAd adapts nn.Linear only
    assert_refused_unchanged(gpt2, lambda: adapterspec.inject_adapter(
        gpt2, {"peft_type": "ROAD", "group_size": 8, "target_modules": ["c_fc"]}), UnsupportedError, "Conv1D")


def test_a_pair_across_two_keras_layers_is_refused() -> None:
    """A module computed by two Dense layers (a converter's split of a fused projection): pairs inside one layer
    are fine, a pair spanning the two is refused naming the module."""
    import keras

    from adapterspec import AdapterConfig
    from adapterspec_keras import road
    from adapterspec_keras.sites import ModuleSite, Piece

    first, second = keras.layers.Dense(8), keras.layers.Dense(8)
    first.build((None, 4))
    second.build((None, 4))
    site = ModuleSite("qkv", "linear", 4, 16, pieces=[
        Piece(first, "dense", np.arange(4), np.arange(8)), Piece(second, "dense", np.arange(4), np.arange(8, 16))])
    road.check(site, "qkv", AdapterConfig.from_dict({"peft_type": "ROAD", "target_modules": ["qkv"], "group_size": 8}))
    with pytest.raises(UnsupportedError, match="qkv: .*falls in two Keras layers"):
        road.check(site, "qkv", AdapterConfig.from_dict({"peft_type": "ROAD", "target_modules": ["qkv"],
                                                         "group_size": 16}))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_singular_matrix_unmerge_is_refused_before_any_change(checkpoints: Any, token_ids: np.ndarray,
                                                              tmp_path: Path) -> None:
    folder = _edited(checkpoints["llama"], tmp_path / "zero",
                     lambda t: t["base_model.model.model.layers.1.self_attn.v_proj.road_alpha"].__setitem__(0, 0.0),
                     variant="road_2")
    model = keras_model("llama", checkpoints["llama"])
    adapterspec.load_adapter(model, folder)
    adapterspec.merge_adapters(model)
    assert_refused_unchanged(model, lambda: adapterspec.unmerge_adapters(model), UnsupportedError, "singular")


def test_every_road_case_of_the_corpus_passes() -> None:
    """The numeric (against the float64 reference, itself checked against PEFT), round-trip and folder cases: all
    pass on this backend, none is unsupported."""
    from adapterspec.conformance import Status, load_corpus, run_suite
    from adapterspec_keras.conformance import KerasImplementation

    corpus = load_corpus(Path(__file__).parents[2] / "conformance_tests" / "v1")
    report = run_suite(KerasImplementation(), corpus, include=[r"road"])
    names = {r.name: r.status for r in report.results}
    assert len(names) >= 9
    assert {n: s for n, s in names.items() if s is not Status.PASSED} == {}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bf16_model_keeps_the_adapter_in_float32_and_equals_peft(checkpoints: Any, token_ids: np.ndarray,
                                                                 tmp_path: Path) -> None:
    """On a bfloat16 keras-hub model the vectors stay float32 (SPEC.md 7.5), the rotation runs in float32 and is
    rounded once (PEFT's cast to theta's dtype and back); the logits are PEFT's on its bfloat16 model within the
    frameworks' own bfloat16 gap, merged too (R rounded to bfloat16, as PEFT's merge); saved back, the file's tensors."""
    import keras_hub
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "peft"
    _peft_folder(checkpoints["llama"], peft.RoadConfig(variant="road_2", group_size=8, target_modules=LLAMA), folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf: Any = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], dtype=torch.bfloat16)
        hf.eval()
        base_hf = torch_logits_float(hf, token_ids)
        reference = peft.PeftModel.from_pretrained(hf, str(folder)).eval()
    plain = keras_hub.models.Llama3CausalLM.from_preset(str(checkpoints["llama"]), preprocessor=None,
                                                        dtype="bfloat16")
    gap = float(np.abs(keras_logits(plain, token_ids).astype(np.float32) - base_hf).max())
    model = keras_hub.models.Llama3CausalLM.from_preset(str(checkpoints["llama"]), preprocessor=None,
                                                        dtype="bfloat16")
    adapterspec.load_adapter(model, folder)
    for roundings, merge in ((4, False), (16, True)):
        if merge:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reference.merge_adapter()
            adapterspec.merge_adapters(model)
        want = torch_logits_float(reference, token_ids)
        got = keras_logits(model, token_ids).astype(np.float32)
        diff, step = float(np.abs(got - want).max()), 2.0 ** -8 * float(np.abs(want).max())
        print(f"bfloat16 {'merged' if merge else 'unmerged'}: max abs diff vs PEFT {diff:.3g} (base gap {gap:.3g}, "
              f"one rounding {step:.3g})")
        assert float(np.abs(want - base_hf).max()) > 8 * step  # the adapter shows above the roundings
        assert diff <= gap + roundings * step
    saved = adapterspec.read_adapter(adapterspec.save_adapter(model, tmp_path / "keras")).load_tensors("numpy")
    for key, value in adapterspec.read_adapter(folder).load_tensors("numpy").items():
        assert saved[key].dtype == np.float32 and np.array_equal(saved[key], value), key


def torch_logits_float(model: Any, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out: np.ndarray = model(input_ids=torch.from_numpy(np.asarray(ids, dtype=np.int64))).logits.float().numpy()
    return out
