"""LoRA on MoE expert parameters (``target_parameters``, SPEC.md 15.1) and keras-hub 0.32's Mixtral / Qwen3-MoE / Qwen2-MoE.

The Keras backend implements it (``adapterspec_keras.parameters``) for the layout pinned here, measured against
PEFT 0.21's logits: the SPEC.md 15.1 delta of transformers 5's fused expert parameters, mapped onto keras-hub's
stacked expert variables (``expert_bank``):

* transformers 5 holds ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows first, then up) and
  ``mlp.experts.down_proj`` ``[E, H, I]``, ``is_transposed`` false; ``save_pretrained`` writes them back per expert
  (Mixtral ``block_sparse_moe.experts.{e}.w1/w3/w2``, Qwen3-MoE ``mlp.experts.{e}.gate_proj/up_proj/down_proj``),
  the names keras-hub's converters read (convert_mixtral.py, convert_qwen3_moe.py: transpose, stack, ``assign``).
* Mixtral (``_sparse_moe_block.expert_bank``): ``_expert_feedforward_gate_dense`` ``[E, H, I]`` = ``w1.T``,
  ``_expert_feedforward_intermediate_dense`` ``[E, H, I]`` = ``w3.T``, ``_expert_feedforward_output_dense``
  ``[E, I, H]`` = ``w2.T``: gate_up's delta splits, ``delta[:, :I].T`` to gate and ``delta[:, I:].T`` to intermediate.
* Qwen3-MoE (``mlp.expert_bank``): ``_expert_feedforward_gate_dense`` ``[E, H, 2I]`` = ``concat(gate.T, up.T)``,
  ``_expert_feedforward_output_dense`` ``[E, I, H]``: each delta transposed per expert, no split.
* the router ``mlp.gate.weight`` ``[E, H]`` (PEFT 0.21's ``all-linear`` adds ``gate.weight`` to target_parameters) is
  the kernel ``[H, E]`` of ``_sparse_feedforward_gate_dense``.

Tested against PEFT itself in both directions: PEFT's folder loads (unmerged and merged logits, variables changed
exactly by the delta and restored), the folder saved here is PEFT's file tensor for tensor and loads in PEFT with no
missing/unexpected key and no warning; two adapters switch and delete; gradients reach the factors; attention
``target_modules`` in the same adapter; what the table does not map is refused, typed, model unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
keras_hub = pytest.importorskip("keras_hub")

import adapterspec  # noqa: E402
import keras  # noqa: E402
from keras_helpers import (  # noqa: E402
    assert_refused_unchanged,
    assert_same_snapshot,
    build_checkpoint,
    fill_adapter_weights,
    hf_model,
    keras_inputs,
    keras_logits,
    keras_model,
    peft_load_exactly,
    snapshot,
    torch_logits,
)
from safetensors.numpy import load_file  # noqa: E402

_IDS = np.array([[3, 17, 99, 5, 64, 2, 120, 33]])
_EXPERTS = 4
_COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=8, num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
#: model_type -> (keras-hub task, transformers config)
_MOE: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralCausalLM", dict(_COMMON, intermediate_size=48, num_local_experts=_EXPERTS)),
    "qwen3_moe": ("Qwen3MoeCausalLM", dict(_COMMON, intermediate_size=64, moe_intermediate_size=24,
                                           num_experts=_EXPERTS, decoder_sparse_step=1, mlp_only_layers=[])),
    "qwen2_moe": ("QwenMoeCausalLM", dict(_COMMON, intermediate_size=64, moe_intermediate_size=24,
                                          shared_expert_intermediate_size=16, num_experts=_EXPERTS,
                                          decoder_sparse_step=1, mlp_only_layers=[])),
}


def _build(arch: str, folder: Path) -> Any:
    """A tiny random transformers 5 model saved to ``folder`` for keras-hub's ``from_preset``."""
    torch.manual_seed(sum(map(ord, arch)))
    config = transformers.AutoConfig.for_model(arch, **_MOE[arch][1])
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    saved = json.loads((folder / "config.json").read_text())
    if "num_local_experts" in saved and "num_experts" not in saved:
        # keras-hub 0.32's Qwen3-MoE converter reads num_experts; transformers 5 saves num_local_experts
        (folder / "config.json").write_text(json.dumps({**saved, "num_experts": saved["num_local_experts"]}))
    return model


@pytest.fixture(params=sorted(_MOE))
def moe(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Any, Path, Path]:
    """(arch, PEFT model with element-unique LoRA values on both expert parameters, its folder, base folder)."""
    arch = request.param
    base = _build(arch, tmp_path / "hf")
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=[], target_parameters=["gate_up_proj", "down_proj"])
    peft_model = peft.get_peft_model(base, config)
    fill_adapter_weights(peft_model, scale=0.3)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    return arch, peft_model, tmp_path / "peft", tmp_path / "hf"


def _keras(arch: str, folder: Path) -> Any:
    return getattr(keras_hub.models, _MOE[arch][0]).from_preset(str(folder), preprocessor=None)


def _delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """SPEC.md 15.1: ``A_e = A[e*r:(e+1)*r]``, ``B_e = B[:, e::E]``, delta ``[E, out, in]``."""
    r = a.shape[0] // _EXPERTS
    return np.stack([scale * b[:, e::_EXPERTS] @ a[e * r:(e + 1) * r] for e in range(_EXPERTS)])


def _expert_updates(arch: str, model: Any, tensors: dict[str, np.ndarray],
                    scale: float) -> list[tuple[Any, list[tuple[Any, np.ndarray]]]]:
    """Per decoder layer: (its ``expert_bank``, [(expert variable, the adapter's delta in its layout)]), with the
    mapping the module docstring states."""
    out: list[tuple[Any, list[tuple[Any, np.ndarray]]]] = []
    for i, layer in enumerate(model.backbone.transformer_layers):
        prefix = f"base_model.model.model.layers.{i}.mlp.experts"
        gate_up = _delta(tensors[f"{prefix}.base_layer.lora_A.weight"], tensors[f"{prefix}.base_layer.lora_B.weight"],
                         scale)  # [E, 2I, H]: gate_up_proj, the first adapted parameter, one base_layer deeper
        down = _delta(tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"], scale)  # [E, H, I]
        bank = (layer._sparse_moe_block if arch == "mixtral" else layer.mlp).expert_bank
        updates = [(bank._expert_feedforward_output_dense, down.transpose(0, 2, 1))]
        if arch == "mixtral":
            half = gate_up.shape[1] // 2
            updates += [(bank._expert_feedforward_gate_dense, gate_up[:, :half].transpose(0, 2, 1)),
                        (bank._expert_feedforward_intermediate_dense, gate_up[:, half:].transpose(0, 2, 1))]
        else:
            updates += [(bank._expert_feedforward_gate_dense, gate_up.transpose(0, 2, 1))]
        for variable, update in updates:
            assert tuple(variable.shape) == update.shape, variable.path
        out.append((bank, updates))
    return out


def test_expert_layout_maps_onto_keras_hub(moe: tuple[str, Any, Path, Path]) -> None:
    """The SPEC.md 15.1 delta, mapped onto keras-hub's expert variables, gives PEFT's logits (fp32, 1e-5), and
    the adapter moves them far more than that (a wrong split, transpose or expert order would show)."""
    arch, peft_model, peft_folder, hf_folder = moe
    reference = torch_logits(peft_model, _IDS)
    with peft_model.disable_adapter():
        plain = torch_logits(peft_model, _IDS)
    model = _keras(arch, hf_folder)
    assert np.abs(keras_logits(model, _IDS) - plain).max() < 1e-5, "the base conversion differs already"
    for _, updates in _expert_updates(arch, model, load_file(str(peft_folder / "adapter_model.safetensors")), 6 / 2):
        for variable, update in updates:
            variable.assign(np.asarray(variable) + update)
    diff = float(np.abs(keras_logits(model, _IDS) - reference).max())
    assert diff < 1e-5, diff
    assert np.abs(reference - plain).max() > 0.1


def test_stateless_scope_runs_the_unmerged_delta(moe: tuple[str, Any, Path, Path]) -> None:
    """The unmerged forward an implementation can use (SPEC.md 15.1: the module's own forward with ``p`` replaced
    by ``p + delta``): the expert bank's ``call`` run inside ``keras.StatelessScope`` mapping each expert variable
    to variable + delta gives PEFT's logits, leaves the variables as they were, and lets gradients reach the delta."""
    import types

    import keras
    import tensorflow as tf

    arch, peft_model, peft_folder, hf_folder = moe
    reference = torch_logits(peft_model, _IDS)
    model = _keras(arch, hf_folder)
    before = snapshot(model)
    tensors = load_file(str(peft_folder / "adapter_model.safetensors"))
    deltas: list[Any] = []
    for bank, updates in _expert_updates(arch, model, tensors, 6 / 2):
        mapping = [(variable, keras.Variable(update, trainable=True)) for variable, update in updates]
        deltas += [delta for _, delta in mapping]

        def call(self: Any, *args: Any, _mapping: Any = mapping, _call: Any = bank.call, **kwargs: Any) -> Any:
            with keras.StatelessScope(state_mapping=[(v, v + d) for v, d in _mapping]):
                return _call(*args, **kwargs)

        bank.call = types.MethodType(call, bank)
    with tf.GradientTape() as tape:
        logits = model(keras_inputs(_IDS))
        loss = keras.ops.sum(logits)
    diff = float(np.abs(keras.ops.convert_to_numpy(logits) - reference).max())
    assert diff < 1e-5, diff
    grads = tape.gradient(loss, [d.value for d in deltas])
    assert all(g is not None and float(np.abs(g).max()) > 0 for g in grads)
    for layer in model.backbone.transformer_layers:
        del (layer._sparse_moe_block if arch == "mixtral" else layer.mlp).expert_bank.__dict__["call"]
    assert_same_snapshot(before, snapshot(model))


_EXPERT_VARIABLES = ("_expert_feedforward_gate_dense", "_expert_feedforward_intermediate_dense",
                     "_expert_feedforward_output_dense")


def _banks(arch: str, model: Any) -> list[Any]:
    return [(layer._sparse_moe_block if arch == "mixtral" else layer.mlp).expert_bank
            for layer in model.backbone.transformer_layers]


def _expert_values(arch: str, model: Any) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(getattr(bank, name))) for bank in _banks(arch, model)
            for name in _EXPERT_VARIABLES if hasattr(bank, name)]


def _peft_folder(arch: str, hf_folder: Path, out: Path, salt: int, **fields: Any) -> tuple[Any, Path]:
    """PEFT's model and folder for a LoRA config (default: the expert parameters only), element-unique values."""
    config = peft.LoraConfig(**{"r": 2, "lora_alpha": 6, "target_modules": [],
                                "target_parameters": ["gate_up_proj", "down_proj"], **fields})
    peft_model = peft.get_peft_model(hf_model(hf_folder), config)
    fill_adapter_weights(peft_model, salt=salt, scale=0.3)
    peft_model.eval()
    peft_model.save_pretrained(out)
    return peft_model, out


def test_load_runs_peft_unmerged(moe: tuple[str, Any, Path, Path]) -> None:
    """PEFT's folder loads: PEFT's logits (fp32, 1e-5; the adapter moves them > 0.1), the expert variables untouched
    by the load and by the forward pass (the delta runs in a StatelessScope)."""
    arch, peft_model, peft_folder, hf_folder = moe
    reference = torch_logits(peft_model, _IDS)
    with peft_model.disable_adapter():
        plain = torch_logits(peft_model, _IDS)
    model = _keras(arch, hf_folder)
    before = _expert_values(arch, model)
    loaded = adapterspec.load_adapter(model, peft_folder)
    assert loaded == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    diff = float(np.abs(keras_logits(model, _IDS) - reference).max())
    print(f"{arch}: max abs diff vs PEFT {diff:.3g}")
    assert diff < 1e-5, diff
    assert np.abs(reference - plain).max() > 0.1
    assert all(np.array_equal(a, b) for a, b in zip(before, _expert_values(arch, model)))
    adapterspec.set_active_adapters(model, [])
    assert np.abs(keras_logits(model, _IDS) - plain).max() < 1e-5


def test_merge_adds_the_delta_and_unmerge_restores(moe: tuple[str, Any, Path, Path]) -> None:
    """Merging changes each expert variable by exactly its share of the delta (fp32) and gives PEFT's logits;
    unmerging restores the variables within fp32 rounding and the base logits."""
    arch, peft_model, peft_folder, hf_folder = moe
    reference = torch_logits(peft_model, _IDS)
    model = _keras(arch, hf_folder)
    plain = keras_logits(model, _IDS)
    adapterspec.load_adapter(model, peft_folder)
    expected = [(variable, keras.ops.convert_to_numpy(variable) + update) for _, updates in
                _expert_updates(arch, model, load_file(str(peft_folder / "adapter_model.safetensors")), 6 / 2)
                for variable, update in updates]
    before = [keras.ops.convert_to_numpy(variable) for variable, _ in expected]
    adapterspec.merge_adapters(model, ["default"])
    for variable, value in expected:
        assert np.abs(keras.ops.convert_to_numpy(variable) - value).max() < 1e-6, variable.path
    assert np.abs(keras_logits(model, _IDS) - reference).max() < 1e-5
    adapterspec.unmerge_adapters(model)
    restored = max(float(np.abs(keras.ops.convert_to_numpy(variable) - old).max()) for (variable, _), old in zip(expected, before))
    print(f"{arch}: unmerge restores the expert variables within {restored:.3g}")
    assert restored < 1e-6
    assert np.abs(keras_logits(model, _IDS) - reference).max() < 1e-5  # still active, unmerged
    adapterspec.set_active_adapters(model, [])
    assert np.abs(keras_logits(model, _IDS) - plain).max() < 1e-6


def test_save_writes_peft_file_and_peft_loads_it(moe: tuple[str, Any, Path, Path], tmp_path: Path) -> None:
    """save_adapter writes PEFT's tensors bit for bit under PEFT's keys; PEFT loads the folder with no missing or
    unexpected key and no warning, and gives its own logits."""
    arch, peft_model, peft_folder, hf_folder = moe
    reference = torch_logits(peft_model, _IDS)
    model = _keras(arch, hf_folder)
    adapterspec.load_adapter(model, peft_folder)
    out = adapterspec.save_adapter(model, tmp_path / "ours")
    ours, theirs = load_file(str(out / "adapter_model.safetensors")), load_file(str(peft_folder / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and np.array_equal(ours[key], theirs[key]), key
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["down_proj", "gate_up_proj"]
    loaded, caught = peft_load_exactly(hf_folder, out)
    assert caught == []
    assert np.abs(torch_logits(loaded, _IDS) - reference).max() < 1e-6


def test_two_adapters_switch_and_delete(moe: tuple[str, Any, Path, Path], tmp_path: Path) -> None:
    """Two adapters on the same expert parameters: each alone gives its PEFT logits, both together PEFT's sum of
    deltas; deleting them gives the model back as it was (its own ``call`` on every expert bank)."""
    arch, peft_model, peft_folder, hf_folder = moe
    first = torch_logits(peft_model, _IDS)
    other, other_folder = _peft_folder(arch, hf_folder, tmp_path / "other", salt=7)
    second = torch_logits(other, _IDS)
    other.load_adapter(str(peft_folder), adapter_name="first")
    other.base_model.set_adapter(["default", "first"])
    both = torch_logits(other, _IDS)
    model = _keras(arch, hf_folder)
    before = snapshot(model)
    plain = keras_logits(model, _IDS)
    adapterspec.load_adapter(model, peft_folder, adapter_name="first")
    adapterspec.load_adapter(model, other_folder, adapter_name="second")
    assert np.abs(keras_logits(model, _IDS) - second).max() < 1e-5  # the last loaded is active
    adapterspec.set_active_adapters(model, ["first"])
    assert np.abs(keras_logits(model, _IDS) - first).max() < 1e-5
    adapterspec.set_active_adapters(model, ["first", "second"])
    diff = float(np.abs(keras_logits(model, _IDS) - both).max())
    assert diff < 1e-5 and np.abs(both - first).max() > 0.1 and np.abs(both - second).max() > 0.1, diff
    adapterspec.delete_adapter(model, "second")
    assert np.abs(keras_logits(model, _IDS) - first).max() < 1e-5
    adapterspec.delete_adapter(model, "first")
    assert np.abs(keras_logits(model, _IDS) - plain).max() == 0
    assert_same_snapshot(before, snapshot(model))
    assert all("call" not in bank.__dict__ for bank in _banks(arch, model))


def test_trainable_gradients_reach_the_factors(moe: tuple[str, Any, Path, Path]) -> None:
    """Loaded trainable: the adapter's factors are the only trainable variables and every one gets a gradient."""
    import tensorflow as tf

    arch, _, peft_folder, hf_folder = moe
    model = _keras(arch, hf_folder)
    adapterspec.load_adapter(model, peft_folder, trainable=True)
    trainable = model.trainable_variables
    assert trainable and all("adapterspec_default" in v.path for v in trainable)
    assert sum(int(np.prod(v.shape)) for v in trainable) == sum(
        v.size for v in load_file(str(peft_folder / "adapter_model.safetensors")).values())
    with tf.GradientTape() as tape:
        loss = keras.ops.sum(keras.ops.square(model(keras_inputs(_IDS))))
    grads = tape.gradient(loss, [v.value for v in trainable])
    assert all(g is not None and float(np.abs(np.asarray(g)).max()) > 0 for g in grads)


def test_with_attention_modules_and_the_router(moe: tuple[str, Any, Path, Path], tmp_path: Path) -> None:
    """What PEFT 0.21's ``all-linear`` writes on these models: attention projections in target_modules, the experts
    and the router (``gate.weight``) in target_parameters, one adapter. PEFT's logits; saved back bit for bit."""
    arch, _, _, hf_folder = moe
    peft_model, folder = _peft_folder(arch, hf_folder, tmp_path / "all", salt=3,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      target_parameters=["gate_up_proj", "down_proj", "gate.weight"])
    reference = torch_logits(peft_model, _IDS)
    theirs = load_file(str(folder / "adapter_model.safetensors"))
    assert any(".mlp.gate.lora_A" in key for key in theirs) and any("q_proj" in key for key in theirs)
    model = _keras(arch, hf_folder)
    loaded = adapterspec.load_adapter(model, folder)
    assert "model.layers.1.mlp.gate" in loaded and "model.layers.0.self_attn.q_proj" in loaded
    diff = float(np.abs(keras_logits(model, _IDS) - reference).max())
    print(f"{arch}: attention + experts + router, max abs diff vs PEFT {diff:.3g}")
    assert diff < 1e-5, diff
    adapterspec.merge_adapters(model, ["default"])
    assert np.abs(keras_logits(model, _IDS) - reference).max() < 1e-5
    adapterspec.unmerge_adapters(model)
    ours = load_file(str(adapterspec.save_adapter(model, tmp_path / "ours") / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert all(np.array_equal(ours[key], theirs[key]) for key in theirs)
    loaded_peft, caught = peft_load_exactly(hf_folder, tmp_path / "ours")
    assert caught == [] and np.abs(torch_logits(loaded_peft, _IDS) - reference).max() < 1e-6


def test_router_as_a_module_is_refused(moe: tuple[str, Any, Path, Path]) -> None:
    """keras-hub's router is a Dense; transformers 5's is a router module holding ``gate.weight``, which PEFT cannot
    adapt as a module (a folder saved so would not load in PEFT): a module adapter on it is refused naming the
    module and target_parameters, in either order with a target_parameters adapter, the model unchanged."""
    arch, _, peft_folder, hf_folder = moe
    model = _keras(arch, hf_folder)
    router = {"peft_type": "IA3", "target_modules": ["gate"], "feedforward_modules": []}
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(model, router, "router"),
                             adapterspec.UnsupportedError, "is the MoE router")
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "target_modules": [], "target_parameters": ["gate.weight"],
                                       "r": 2}, "param")
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(model, router, "router"),
                             adapterspec.UnsupportedError, "target_parameters: ['gate.weight']")
    if arch == "qwen2_moe":  # not a transformers-4 name there (PEFT 0.21 does not rewrite qwen2_moe): a module
        for targets in (["q_proj", "gate"], r".*\.(q_proj|gate)"):
            assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(
                model, {"peft_type": "LORA", "target_modules": targets, "r": 2}, "lora"),
                adapterspec.UnsupportedError, "/target_modules: module 'model.layers.0.mlp.gate' is the MoE router")


def test_all_linear_on_qwen2_moe_adapts_what_peft_adapts(tmp_path: Path) -> None:
    """PEFT 0.21 does not rewrite qwen2_moe configs; its all-linear takes the attention, the shared expert and its
    gate -- not the router (a router module, not nn.Linear, in transformers 5) nor the experts (parameters)."""
    hf_folder = tmp_path / "hf"
    hf = _build("qwen2_moe", hf_folder)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules="all-linear"))
    theirs = {name.removeprefix("base_model.model.").removesuffix(".lora_A")
              for name, _ in peft_model.named_modules() if name.endswith(".lora_A")}
    ours = adapterspec.inject_adapter(_keras("qwen2_moe", hf_folder), {"peft_type": "LORA", "r": 2,
                                                                       "target_modules": "all-linear"})
    assert sorted(ours) == sorted(theirs)
    assert any(m.endswith("shared_expert_gate") for m in ours) and not any(m.endswith("mlp.gate") for m in ours)


@pytest.mark.parametrize("entry", ["q_proj.weight", "weight", "experts.up_proj", "layers.0.mlp.gate.bias"])
def test_unmapped_parameter_is_refused(moe: tuple[str, Any, Path, Path], entry: str) -> None:
    """A target_parameters entry the table does not map (another module's weight, a name transformers 5 does not
    have) is refused naming it, the model unchanged -- never skipped."""
    arch, _, _, hf_folder = moe
    model = _keras(arch, hf_folder)
    config = {"peft_type": "LORA", "target_modules": [], "target_parameters": ["gate_up_proj", entry], "r": 2}
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(model, config), adapterspec.UnsupportedError,
                             f"{entry!r}")


def test_model_type_without_table_is_refused(tmp_path: Path) -> None:
    """target_parameters on a keras-hub model the table does not cover (Llama): refused naming the model type."""
    model = keras_model("llama", build_checkpoint("llama", tmp_path / "llama"))
    config = {"peft_type": "LORA", "target_modules": [], "target_parameters": ["mlp.up_proj.weight"], "r": 2}
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(model, config), adapterspec.UnsupportedError,
                             "on a llama model")


def test_fit_trains_the_factors_and_peft_loads_them(moe: tuple[str, Any, Path, Path], tmp_path: Path) -> None:
    """``predict`` (traced) gives PEFT's logits; one ``fit`` step moves only the factors; the trained adapter,
    saved, loads in PEFT exactly and gives the Keras model's logits."""
    arch, peft_model, peft_folder, hf_folder = moe
    model = _keras(arch, hf_folder)
    experts = _expert_values(arch, model)
    adapterspec.load_adapter(model, peft_folder, trainable=True)
    assert np.abs(model.predict(keras_inputs(_IDS), verbose=0) - torch_logits(peft_model, _IDS)).max() < 1e-5
    before = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(keras_inputs(_IDS), _IDS, epochs=1, verbose=0)
    assert all(np.abs(keras.ops.convert_to_numpy(v) - b).max() > 0 for v, b in zip(model.trainable_variables, before))
    assert all(np.array_equal(a, b) for a, b in zip(experts, _expert_values(arch, model)))
    trained, caught = peft_load_exactly(hf_folder, adapterspec.save_adapter(model, tmp_path / "trained"))
    assert caught == []
    assert np.abs(torch_logits(trained, _IDS) - keras_logits(model, _IDS)).max() < 1e-5


def test_hand_built_layer_parameters_through_module_map() -> None:
    """A hand-built layer ``module_map`` names (the conformance harness' experts, ``weight`` ``[E, out, in]`` as
    transformers holds it): target_parameters adapts ``weight`` (the corpus' numeric and roundtrip cases check the
    values); merging gives the unmerged outputs and changes ``weight`` by the delta, unmerging restores it; targeting
    it as a module is refused, typed."""
    from adapterspec_keras.conformance import build_model

    model, layers = build_model({"modules": {"mlp.experts": {"kind": "experts", "num_experts": 3, "in_features": 6,
                                                             "out_features": 5}}})
    experts = layers["mlp.experts"]
    x = np.sin(np.arange(3 * 4 * 6, dtype=np.float32)).reshape(3, 4, 6)
    plain, weight = keras.ops.convert_to_numpy(experts(x)), keras.ops.convert_to_numpy(experts.weight)
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(
        model, {"peft_type": "LORA", "target_modules": ["experts"], "r": 2}, module_map=layers),
        adapterspec.UnsupportedError, "only target_parameters can adapt")
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "target_modules": [], "target_parameters": ["experts.weight"],
                                       "r": 2, "lora_alpha": 6, "init_lora_weights": False}, module_map=layers)
    adapted = keras.ops.convert_to_numpy(experts(x))
    assert np.abs(adapted - plain).max() > 0.1
    assert np.array_equal(keras.ops.convert_to_numpy(experts.weight), weight)
    adapterspec.merge_adapters(model)
    assert np.abs(keras.ops.convert_to_numpy(experts(x)) - adapted).max() < 1e-5
    assert np.abs(keras.ops.convert_to_numpy(experts.weight) - weight).max() > 0.01
    adapterspec.unmerge_adapters(model)
    assert np.abs(keras.ops.convert_to_numpy(experts.weight) - weight).max() < 1e-6
    adapterspec.delete_adapter(model, "default")
    assert np.abs(keras.ops.convert_to_numpy(experts(x)) - plain).max() < 1e-6


@pytest.mark.parametrize("moe", ["mixtral", "qwen3_moe"], indirect=True)
@pytest.mark.parametrize("targets", ["all-linear", r".*\.(q_proj|gate)"])
def test_string_target_modules_is_refused(moe: tuple[str, Any, Path, Path], targets: str) -> None:
    """SPEC.md 15.1: PEFT 0.21 rewrites a string target_modules on Mixtral and Qwen3-MoE (the experts and the router
    move to target_parameters); matching it against keras-hub's layers would adapt the router as a module and no
    expert, so it is refused, naming /target_modules (PEFT's saved configs list the names and load). PEFT does not
    rewrite Qwen2-MoE's: its all-linear adapts what PEFT's does, a regex naming the router is refused (the router
    tests)."""
    arch, _, _, hf_folder = moe
    model = _keras(arch, hf_folder)
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(
        model, {"peft_type": "LORA", "target_modules": targets, "r": 2}), adapterspec.UnsupportedError,
        "/target_modules: on a")


@pytest.mark.parametrize("moe", ["mixtral", "qwen3_moe"], indirect=True)  # PEFT 0.21 does not rewrite qwen2_moe
@pytest.mark.parametrize("old", ["gate", "experts"])
def test_transformers_4_moe_names_are_refused(moe: tuple[str, Any, Path, Path], old: str) -> None:
    """SPEC.md 15.1, as the torch backend: PEFT 0.21 moves the transformers-4 router / expert names out of a listed
    target_modules into target_parameters (Qwen2-MoE's gate_proj then no longer adapts the shared expert); matched as
    written here they would adapt the router as a module, or only the shared expert -- not what PEFT does."""
    arch, _, _, hf_folder = moe
    names = {"mixtral": ["w1", "w3", "w2"]}.get(arch, ["gate_proj", "up_proj", "down_proj"])
    targets = ["q_proj", "gate"] if old == "gate" else ["q_proj", *names]
    model = _keras(arch, hf_folder)
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(
        model, {"peft_type": "LORA", "target_modules": targets, "r": 2}), adapterspec.UnsupportedError,
        "/target_modules/1: ")


def test_mixed_precision_runs_the_delta_as_merged(moe: tuple[str, Any, Path, Path]) -> None:
    """Under ``mixed_bfloat16`` (float32 variables, bfloat16 compute) the unmerged delta is computed from the float32
    factors and added to the float32 variables, as a merge does -- not in the compute dtype: unmerged logits equal the
    merged ones (before the fix they differed by ~0.06 on Mixtral, the adapter moving them ~0.5). Against PEFT's
    float32 logits both differ by the bfloat16 model's own error (0.016-0.08 here, routing amplifies it): printed.
    """
    arch, peft_model, peft_folder, hf_folder = moe
    reference = torch_logits(peft_model, _IDS)
    model = getattr(keras_hub.models, _MOE[arch][0]).from_preset(str(hf_folder), preprocessor=None,
                                                                  dtype="mixed_bfloat16")
    plain = keras_logits(model, _IDS).astype("float32")
    adapterspec.load_adapter(model, peft_folder)
    unmerged = keras_logits(model, _IDS).astype("float32")
    adapterspec.merge_adapters(model)
    merged = keras_logits(model, _IDS).astype("float32")
    diff = float(np.abs(unmerged - reference).max())
    print(f"{arch} mixed_bfloat16: unmerged vs PEFT fp32 {diff:.3g}, vs merged {np.abs(unmerged - merged).max():.3g}")
    assert np.abs(unmerged - merged).max() <= 2e-3
    assert np.abs(unmerged - plain).max() > 0.1


def test_parameters_a_parent_reads_directly_are_run_or_refused() -> None:
    """``target_parameters`` on a hand-built layer whose ``call`` the model never runs (its parent reads the variable
    itself, as keras-hub's Gemma 4 MLP reads a kernel): the adapter either changes the output as merging it does,
    or is refused, typed, the model unchanged -- never loaded to change nothing."""
    from keras import ops

    class Experts(keras.layers.Layer):  # type: ignore[misc]
        def build(self, shape: Any) -> None:
            self.weight = self.add_weight(shape=(3, 5, 6), initializer="glorot_uniform", name="weight")

        def call(self, x: Any) -> Any:
            return ops.einsum("eti,eoi->eto", x, self.weight)

    class Block(keras.layers.Layer):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.experts = Experts()

        def build(self, shape: Any) -> None:
            self.experts.build(shape)

        def call(self, x: Any) -> Any:
            return ops.einsum("eti,eoi->eto", x, self.experts.weight)  # the experts' call never runs

    inputs = keras.Input((4, 6), batch_size=3)
    block = Block()
    model = keras.Model(inputs, block(inputs))
    x = np.sin(np.arange(72, dtype="float32")).reshape(3, 4, 6)
    plain = ops.convert_to_numpy(model(x))
    config = {"peft_type": "LORA", "target_modules": [], "target_parameters": ["experts.weight"], "r": 2,
              "lora_alpha": 6, "init_lora_weights": False}
    before = snapshot(model)
    try:
        adapterspec.inject_adapter(model, config, module_map={"mlp.experts": block.experts})
    except adapterspec.AdapterSpecError:
        assert_same_snapshot(before, snapshot(model))
        assert adapterspec.adapter_names(model) == []
        return
    unmerged = ops.convert_to_numpy(model(x))
    adapterspec.merge_adapters(model)
    merged = ops.convert_to_numpy(model(x))
    assert np.abs(merged - plain).max() > 0.1
    assert np.abs(unmerged - merged).max() < 1e-5
