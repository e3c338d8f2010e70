"""Helpers of the keras backend tests: tiny checkpoints, element-unique adapter values, PEFT references."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tolerance import fp32_tolerance

#: the difference allowed between one module's adapter delta in Keras and in PEFT (values of magnitude ~1)
ATOL = 1e-5
#: The reduction length of the tiny checkpoints' layers (hidden size 64).
LENGTH = 64


def assert_near(actual: Any, expected: Any, *, mask: Any = None, msg: Any = None, length: int = LENGTH) -> None:
    """``actual`` equals ``expected`` (where ``mask``) up to fp32 rounding of sums of ``length`` terms at
    ``expected``'s magnitude (:func:`tolerance.fp32_tolerance`)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape, msg)
    if mask is not None:
        actual, expected = actual[mask], expected[mask]
    atol = fp32_tolerance(expected, length)
    diff = float(np.abs(actual - expected).max())
    assert diff <= atol, f"max abs difference {diff} > {atol} ({msg})" if msg is not None else \
        f"max abs difference {diff} > {atol}"

_ADAPTER_MARKERS = ("lora_", "ia3_")


@dataclass(frozen=True)
class Arch:
    """A tiny transformers architecture and its keras-hub causal LM class."""

    model_type: str
    keras_task: str
    config: dict[str, Any]
    linear_targets: tuple[str, ...]
    embedding: str
    vocab: int = 128
    extra: dict[str, Any] = field(default_factory=dict)


_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, head_dim=16, max_position_embeddings=64)
_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", "Llama3CausalLM", dict(_SMALL, tie_word_embeddings=False), _LLAMA_TARGETS, "embed_tokens"),
    "gemma": Arch("gemma", "GemmaCausalLM", dict(_SMALL), _LLAMA_TARGETS, "embed_tokens"),
    "gpt2": Arch("gpt2", "GPT2CausalLM", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64),
                 ("c_attn", "c_proj", "c_fc"), "wte"),
    "mistral": Arch("mistral", "MistralCausalLM", dict(_SMALL, tie_word_embeddings=False), _LLAMA_TARGETS,
                    "embed_tokens"),
    "qwen2": Arch("qwen2", "QwenCausalLM", dict(_SMALL, tie_word_embeddings=False), _LLAMA_TARGETS, "embed_tokens"),
    "qwen3": Arch("qwen3", "Qwen3CausalLM", dict(_SMALL, tie_word_embeddings=False), _LLAMA_TARGETS, "embed_tokens"),
    "gemma2": Arch("gemma2", "GemmaCausalLM", dict(_SMALL, query_pre_attn_scalar=16), _LLAMA_TARGETS, "embed_tokens"),
    "gemma3_text": Arch("gemma3_text", "Gemma3CausalLM", dict(_SMALL, query_pre_attn_scalar=16, sliding_window=16),
                        _LLAMA_TARGETS, "embed_tokens"),
    # keras-hub's Gemma4DecoderBlock reads the MLP kernels itself (ops.matmul(x, self.gating_ffw.kernel))
    "gemma4_text": Arch("gemma4_text", "Gemma4CausalLM",
                        dict(_SMALL, global_head_dim=16, vocab_size_per_layer_input=128, hidden_size_per_layer_input=16),
                        _LLAMA_TARGETS, "embed_tokens"),
    "smollm3": Arch("smollm3", "SmolLM3CausalLM", dict(_SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                        tie_word_embeddings=False), _LLAMA_TARGETS, "embed_tokens"),
}


def build_checkpoint(arch: str, folder: Path) -> Path:
    """Save a tiny random ``*ForCausalLM`` of ``arch`` with ``save_pretrained`` (safetensors) into ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = ARCHS[arch]
    torch.manual_seed(sum(map(ord, arch)))
    config = AutoConfig.for_model(spec.model_type, **spec.config)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def hf_model(folder: Path) -> Any:
    """The transformers model saved in ``folder`` (a fresh object each call), in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def keras_model(arch: str, folder: Path) -> Any:
    """The keras-hub causal LM converted from the transformers checkpoint in ``folder`` (no download)."""
    import keras_hub

    cls = getattr(keras_hub.models, ARCHS[arch].keras_task)
    return cls.from_preset(str(folder), preprocessor=None)


def unique_values(shape: tuple[int, ...], salt: int, *, around: float = 0.0, scale: float = 0.05) -> np.ndarray:
    """Deterministic values, different for every element and every ``salt`` (a transpose or a swapped key cannot
    go unnoticed): ``around + scale * sin(1 + salt * 0.37 + arange * 0.731)``, float32."""
    n = math.prod(shape)
    values = np.sin(1.0 + salt * 0.37 + np.arange(n, dtype=np.float64) * 0.731)
    return (around + scale * values).reshape(shape).astype(np.float32)


def fill_adapter_weights(peft_model: Any, *, salt: int = 0, scale: float = 0.05) -> None:
    """Give every adapter tensor of a PEFT model element-unique values (IA3 near 1, DoRA magnitude near ||W||)."""
    import torch

    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(peft_model.named_parameters())):
            if not any(m in name for m in _ADAPTER_MARKERS):
                continue
            shape = tuple(param.shape)
            if "ia3_l" in name:
                param.copy_(torch.from_numpy(unique_values(shape, salt + index, around=1.0, scale=0.3)))
            elif "lora_magnitude_vector" in name:
                param.copy_(param * torch.from_numpy(unique_values(shape, salt + index, around=1.0, scale=0.2)))
            else:
                param.copy_(torch.from_numpy(unique_values(shape, salt + index, scale=scale)))


def peft_adapted_modules(peft_model: Any) -> set[str]:
    """The module paths PEFT adapted, as they appear in the saved keys (``base_model.model.`` stripped)."""
    out = set()
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and len(getattr(module, "lora_A")) or \
                hasattr(module, "lora_embedding_A") and len(getattr(module, "lora_embedding_A")) or \
                hasattr(module, "ia3_l") and len(getattr(module, "ia3_l")):
            out.add(name.removeprefix("base_model.model."))
    return out


def make_peft_adapter(folder: Path, out: Path, peft_config: Any, *, salt: int = 0) -> tuple[Any, Path]:
    """A PEFT model on the checkpoint in ``folder`` with element-unique adapter values, saved to ``out``."""
    from peft import get_peft_model

    peft_model = get_peft_model(hf_model(folder), peft_config)
    fill_adapter_weights(peft_model, salt=salt)
    peft_model.eval()
    peft_model.save_pretrained(out)
    return peft_model, out


def torch_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    """A transformers/PEFT model's logits for ``ids`` (no padding)."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(np.asarray(ids, dtype=np.int64))).logits.numpy()


def keras_inputs(ids: np.ndarray) -> dict[str, np.ndarray]:
    return {"token_ids": np.asarray(ids, dtype="int32"), "padding_mask": np.ones_like(ids, dtype="int32")}


def keras_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    """A keras-hub causal LM's logits for ``ids`` (no padding)."""
    from keras import ops

    return ops.convert_to_numpy(model(keras_inputs(ids)))


def snapshot(model: Any) -> dict[str, Any]:
    """What a failed operation must leave untouched: every variable (object, value, trainable flag), every
    layer's sublayers and ``call``, the adapter bookkeeping."""
    import adapterspec
    from keras import ops

    layers = [model, *model._flatten_layers(include_self=False, recursive=True)]
    holder = next((layer for layer in layers if "_adapterspec_state" in layer.__dict__), model)  # a task's backbone
    return {
        "variables": [(id(v), v.path, v.trainable, ops.convert_to_numpy(v).copy()) for v in model.variables],
        "layers": [(id(layer), [id(s) for s in layer._layers], "call" in layer.__dict__, layer.trainable)
                   for layer in layers],
        "adapters": adapterspec.adapter_names(holder),
        "active": adapterspec.active_adapters(holder),
        "state": "_adapterspec_state" in model.__dict__,
    }


def assert_same_snapshot(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert [v[:3] for v in before["variables"]] == [v[:3] for v in after["variables"]]
    for (_, path, _, a), (_, _, _, b) in zip(before["variables"], after["variables"]):
        assert np.array_equal(a, b), path
    assert before["layers"] == after["layers"]
    assert before["adapters"] == after["adapters"]
    assert before["active"] == after["active"]
    assert before["state"] == after["state"]


#: tiny encoders whose keras-hub converter reads transformers config fields the backbone holds under other names
ENCODERS: dict[str, dict[str, Any]] = {
    "xlm-roberta": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=128, max_position_embeddings=64),
    "esm": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                max_position_embeddings=64, pad_token_id=1, position_embedding_type="rotary"),
}


def build_encoder_checkpoint(model_type: str, folder: Path) -> Path:
    """Save a tiny random transformers ``AutoModel`` of ``model_type`` (safetensors) into ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(sum(map(ord, model_type)))
    config = AutoConfig.for_model(model_type, **ENCODERS[model_type])
    return save_for_keras_hub(AutoModel.from_config(config).eval(), folder)


def save_for_keras_hub(model: Any, folder: Path) -> Path:
    """``model.save_pretrained(folder)``, layer norms named as keras-hub's converters read them.

    transformers 5 saves ESM's layer norms as ``LayerNorm.gamma``/``beta``; keras-hub's converter reads
    ``LayerNorm.weight``/``bias`` (the names transformers loads either way).
    """
    from safetensors.numpy import load_file, save_file

    model.save_pretrained(folder, safe_serialization=True)
    file = folder / "model.safetensors"
    tensors = load_file(file)
    renamed = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
               for k, v in tensors.items()}
    save_file(renamed, file, metadata={"format": "pt"})
    return folder


def assert_peft_close(got: np.ndarray, expected: np.ndarray, base_keras: np.ndarray, base_torch: np.ndarray) -> float:
    """``got`` equals PEFT's ``expected`` within fp32 rounding, or within a small multiple of keras-hub's own base
    conversion error (``base_keras`` vs ``base_torch``, the logits without adapter); returns the difference."""
    conversion = float(np.abs(base_keras - base_torch).max())
    diff = float(np.abs(got - expected).max())
    print(f"max abs diff vs PEFT {diff:.3g} (base conversion {conversion:.3g})")
    if diff > 4 * conversion + 1e-5:
        assert_near(got, expected)
    return diff


def peft_load_exactly(checkpoint: Path, adapter: Path) -> tuple[Any, list[str]]:
    """PEFT loads ``adapter`` on the checkpoint with no missing or unexpected adapter key (its state dict is the
    file's, tensor for tensor); the model and PEFT's warnings (deprecation notices aside), for a test to compare."""
    import warnings

    import peft
    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf_model(checkpoint), adapter).eval()
    state, stored = get_peft_model_state_dict(model), load_file(adapter / "adapter_model.safetensors")
    assert sorted(state) == sorted(stored)
    for key, tensor in stored.items():
        assert torch.equal(state[key], tensor), key
    said = sorted({str(w.message) for w in caught if not issubclass(w.category, (FutureWarning, DeprecationWarning))})
    return model, said


def assert_refused_unchanged(model: Any, call: Any, error: type[Exception], needle: str) -> None:
    """``call()`` raises ``error`` saying ``needle``, and leaves every variable of ``model`` as it was."""
    import pytest

    before = snapshot(model)
    with pytest.raises(error) as info:
        call()
    assert needle in str(info.value)
    assert_same_snapshot(before, snapshot(model))


def siglip_keys(folder: Path) -> None:
    """keras-hub's PaliGemma and Gemma 3 converters read the SigLIP tower under ``vision_tower.vision_model.``,
    where transformers 5 saves ``vision_tower.``."""
    from safetensors.numpy import load_file, save_file

    file = folder / "model.safetensors"
    save_file({("vision_tower.vision_model." + k[len("vision_tower."):]
                if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
               for k, v in load_file(file).items()}, file, metadata={"format": "pt"})


def paligemma_checkpoint(folder: Path) -> Any:
    """A tiny ``PaliGemmaForConditionalGeneration`` saved to ``folder`` for keras-hub: its converter takes the
    attention head_dim from ``num_image_tokens`` (both 16 here: a 32 px image in 8 px patches) and keeps the
    vocabulary below ``image_token_index`` (120 of 128)."""
    import torch
    import transformers

    config = transformers.PaliGemmaConfig(
        text_config=dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=128),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=64),
        image_token_index=120, projection_dim=64)
    torch.manual_seed(11)
    model = transformers.PaliGemmaForConditionalGeneration(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    siglip_keys(folder)
    return model
