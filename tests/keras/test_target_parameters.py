"""LoRA on MoE expert parameters (``target_parameters``, SPEC.md 15.1) and keras-hub 0.32's Mixtral / Qwen3-MoE.

Not implemented on Keras yet: the backend refuses it, typed, leaving the model unchanged (tested here). What an
implementation needs is pinned here too, measured against PEFT 0.21's logits: the SPEC.md 15.1 delta of
transformers 5's fused expert parameters, mapped onto keras-hub's stacked expert variables (``expert_bank``):

* transformers 5 holds ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows first, then up) and
  ``mlp.experts.down_proj`` ``[E, H, I]``, ``is_transposed`` false; ``save_pretrained`` writes them back per expert
  (Mixtral ``block_sparse_moe.experts.{e}.w1/w3/w2``, Qwen3-MoE ``mlp.experts.{e}.gate_proj/up_proj/down_proj``),
  the names keras-hub's converters read (convert_mixtral.py, convert_qwen3_moe.py: transpose, stack, ``assign``).
* Mixtral (``_sparse_moe_block.expert_bank``): ``_expert_feedforward_gate_dense`` ``[E, H, I]`` = ``w1.T``,
  ``_expert_feedforward_intermediate_dense`` ``[E, H, I]`` = ``w3.T``, ``_expert_feedforward_output_dense``
  ``[E, I, H]`` = ``w2.T``: gate_up's delta splits, ``delta[:, :I].T`` to gate and ``delta[:, I:].T`` to intermediate.
* Qwen3-MoE (``mlp.expert_bank``): ``_expert_feedforward_gate_dense`` ``[E, H, 2I]`` = ``concat(gate.T, up.T)``,
  ``_expert_feedforward_output_dense`` ``[E, I, H]``: each delta transposed per expert, no split.
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
from keras_helpers import (  # noqa: E402
    assert_same_snapshot,
    fill_adapter_weights,
    keras_inputs,
    keras_logits,
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


def test_keras_refuses_target_parameters_and_leaves_the_model(moe: tuple[str, Any, Path, Path]) -> None:
    """Until the Keras backend implements it, PEFT's MoE folder is refused typed, naming the field."""
    arch, _, peft_folder, hf_folder = moe
    model = _keras(arch, hf_folder)
    before = snapshot(model)
    with pytest.raises(adapterspec.UnsupportedError, match="/target_parameters: .*not implemented on Keras yet"):
        adapterspec.load_adapter(model, peft_folder)
    assert_same_snapshot(before, snapshot(model))
