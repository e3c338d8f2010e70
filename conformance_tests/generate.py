"""Generate the adapterspec conformance corpus (``conformance_tests/v1``) -- its output is frozen and committed.

    .venv/bin/python conformance_tests/generate.py            # rewrite v1/ (deterministic: same bytes each run)

Needs torch, transformers and peft (the corpus itself needs none of them). Every numeric case's expected
output is computed in float64 by :mod:`adapterspec.conformance.reference` from the stored (rounded) tensors,
and checked here against PEFT twice: in float64 (must agree to 1e-9) and in the case's dtype (must stay
within half the case's tolerance). Adapter tensors have PEFT's own keys and shapes (taken from a PEFT model
built with the case's config) and deterministic, element-unique values (sines of a ramp), so a transposed
or swapped tensor cannot pass.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import math
import re
import shutil
import struct
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

import adapterspec
import adapterspec.errors
import adapterspec.folder
import adapterspec.spec
from adapterspec.conformance import reference
from adapterspec.conformance.reference_impl import prefix_sizes
from adapterspec.conformance.reference_tokens import token_weight
from adapterspec.naming import BASE_LAYER_BIAS, PARAMETERS, SHARED_PARAMETERS, TRAINABLE_TOKENS_PARAM
from adapterspec.targets import token_indices
from adapterspec_torch.conformance import build_model

HERE = Path(__file__).resolve().parent
V1 = HERE / "v1"
SPEC_EXAMPLES = HERE.parent / "spec" / "v1" / "examples"
CORPUS_VERSION = "1.14.0"
GENERATED = ("schema", "folders", "numeric", "folders.json", "numeric.json", "roundtrip.json", "errors.json",
             "corpus.json")

#: ``|actual - expected| <= atol + rtol * |expected|``; the expected values are float64.
TOLERANCES = {
    "float32": {"atol": 1e-5, "rtol": 1e-5},
    "float16": {"atol": 1e-2, "rtol": 1e-2},
    "bfloat16": {"atol": 4e-2, "rtol": 2e-2},
}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


# -- deterministic values --------------------------------------------------------------------------

def det(shape: tuple[int, ...], seed: int, scale: float = 0.5, offset: float = 0.0) -> np.ndarray:
    """Element-unique values: ``offset + scale * sin(0.61 k + 1.7 seed + 0.3)`` over the flat index ``k``."""
    n = math.prod(shape)
    return (offset + scale * np.sin(0.61 * np.arange(n) + 1.7 * seed + 0.3)).reshape(shape)


def stored(a: np.ndarray, dtype: str) -> torch.Tensor:
    """``a`` rounded to ``dtype`` -- the tensor written to the corpus."""
    return torch.from_numpy(np.asarray(a, dtype=np.float64)).to(_TORCH[dtype]).contiguous()


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy() if t.is_floating_point() else t.numpy()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(path), metadata=metadata)
    canonical_metadata(path)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", "utf-8")


def write_config(folder: Path, config: dict[str, Any] | str) -> None:
    """PEFT's style, keys sorted -- except the members of the ordered fields (``adapterspec.config.ORDERED_FIELDS``:
    rank_pattern, alpha_pattern, DeLoRA's lambda_pattern, C3A's block_size_pattern), whose document order decides
    which key wins (SPEC 3.1, 4.4, 17.7): they are written in the order given."""
    folder.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(_sorted_keys(config), indent=2) + "\n"
    (folder / "adapter_config.json").write_text(text, "utf-8")


def _sorted_keys(value: Any, field: str | None = None) -> Any:
    if isinstance(value, dict):
        keys = list(value) if field in adapterspec.config.ORDERED_FIELDS else sorted(value)
        return {k: _sorted_keys(value[k], k if field is None else "") for k in keys}
    if isinstance(value, list):
        return [_sorted_keys(v, "") for v in value]
    return value


# -- layers --------------------------------------------------------------------------------------------

def linear(i: int, o: int, bias: bool = True) -> dict[str, Any]:
    return {"kind": "linear", "in_features": i, "out_features": o, "bias": bias}


def gpt2(i: int, o: int, bias: bool = True, split: list[int] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"kind": "gpt2_conv1d", "in_features": i, "out_features": o, "bias": bias}
    if split:
        spec["split"] = split
    return spec


def embedding(n: int, d: int) -> dict[str, Any]:
    return {"kind": "embedding", "num_embeddings": n, "embedding_dim": d}


def experts(e: int, i: int, o: int) -> dict[str, Any]:
    return {"kind": "experts", "num_experts": e, "in_features": i, "out_features": o}


def layer_norm(d: int, eps: float = 1e-5, bias: bool = True) -> dict[str, Any]:
    return {"kind": "layer_norm", "normalized_shape": d, "eps": eps, "bias": bias}


def conv2d(i: int, o: int, k: list[int], stride: list[int] | None = None, padding: list[int] | None = None,
           bias: bool = True) -> dict[str, Any]:
    return {"kind": "conv2d", "in_channels": i, "out_channels": o, "kernel_size": k,
            "stride": stride or [1, 1], "padding": padding or [0, 0], "bias": bias}


def conv1d(i: int, o: int, k: int, stride: int = 1, padding: int = 0, bias: bool = True) -> dict[str, Any]:
    return {"kind": "conv1d", "in_channels": i, "out_channels": o, "kernel_size": [k], "stride": [stride],
            "padding": [padding], "bias": bias}


def weight_shapes(spec: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    kind = spec["kind"]
    if kind == "linear":
        shapes = {"weight": (spec["out_features"], spec["in_features"])}
        bias = spec["out_features"]
    elif kind == "gpt2_conv1d":
        shapes = {"weight": (spec["in_features"], spec["out_features"])}
        bias = spec["out_features"]
    elif kind == "embedding":
        return {"weight": (spec["num_embeddings"], spec["embedding_dim"])}
    elif kind == "experts":
        return {"weight": (spec["num_experts"], spec["out_features"], spec["in_features"])}
    elif kind == "layer_norm":
        shapes = {"weight": (spec["normalized_shape"],)}
        bias = spec["normalized_shape"]
    else:
        shapes = {"weight": (spec["out_channels"], spec["in_channels"], *spec["kernel_size"])}
        bias = spec["out_channels"]
    if spec.get("bias", True):
        shapes["bias"] = (bias,)
    return shapes


def input_for(spec: dict[str, Any], seed: int, dtype: str) -> torch.Tensor:
    kind = spec["kind"]
    if kind == "embedding":
        ids = np.array([[1, 4, 7, 2], [9, 0, 3, 5]]) % spec["num_embeddings"]
        return torch.from_numpy(ids.astype(np.int64))
    if kind in ("linear", "gpt2_conv1d"):
        shape: tuple[int, ...] = (2, 3, spec["in_features"])
    elif kind == "layer_norm":
        shape = (2, 3, spec["normalized_shape"])
    elif kind == "experts":
        shape = (spec["num_experts"], 3, spec["in_features"])
    elif kind == "conv2d":
        shape = (1, spec["in_channels"], 5, 6)
    else:
        shape = (2, spec["in_channels"], 7)
    return stored(det(shape, 100 + seed, scale=1.0), dtype)


# -- PEFT ----------------------------------------------------------------------------------------------

def peft_config(config: dict[str, Any]) -> Any:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    import dataclasses

    cls = PEFT_TYPE_TO_CONFIG_MAPPING[config["peft_type"]]
    known = {f.name for f in dataclasses.fields(cls)}  # PEFT's from_pretrained drops the others, with a warning
    return cls(**{k: v for k, v in config.items() if k in known and k != "peft_type"})


def peft_state_shapes(model_spec: dict[str, Any], config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The keys and shapes PEFT saves for ``config`` on this model."""
    from peft import get_peft_model, get_peft_model_state_dict

    model = build_model({**model_spec, "dtype": "float32"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, peft_config(config))
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}


def peft_outputs(case: dict[str, Any], base: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
                 adapter: Path, dtype: str) -> dict[str, np.ndarray]:
    from adapterspec.conformance.peft_driver import peft_outputs as run

    return run(case["model"], case["compute"], adapter, base, inputs, dtype)


# -- numeric cases ---------------------------------------------------------------------------------------

def lora(r: int, alpha: float, targets: Any, **extra: Any) -> dict[str, Any]:
    return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets, **extra}


def lycoris(method: str, r: int, alpha: float, targets: Any, **extra: Any) -> dict[str, Any]:
    return {"peft_type": method, "r": r, "alpha": alpha, "target_modules": targets, **extra}


DECODER = {"architecture": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 32}
DECODER_GQA = {**DECODER, "hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2}

# (id, description, method, layer, dtype, modules or decoder, config, tags)
NUMERIC: list[dict[str, Any]] = []


def numeric(id_: str, description: str, method: str, layer: str, dtype: str, modules: dict[str, Any],
            config: dict[str, Any], tags: list[str], decoder: dict[str, Any] | None = None,
            compute: str = "modules", float64_tolerance: float | None = 1e-9) -> None:
    model: dict[str, Any] = {"dtype": dtype, "modules": modules}
    if decoder:
        model = {"dtype": dtype, "modules": {}, "decoder": decoder}
    NUMERIC.append({"id": id_, "description": description, "method": method, "layer": layer, "dtype": dtype,
                    "compute": compute, "model": model, "config": config, "float64_tolerance": float64_tolerance,
                    "tags": sorted({method.lower(), layer, _SHORT[dtype], *tags})})


def _numeric_cases() -> None:
    one = {"layer": linear(6, 5)}
    for dtype in ("float32", "float16", "bfloat16"):
        numeric(f"lora-linear-{_SHORT[dtype]}", f"LoRA on a Linear layer with bias, alpha/r = 3, lora_dropout ignored "
                f"at inference, in {dtype}", "LORA", "linear", dtype, one,
                lora(2, 6, ["layer"], lora_dropout=0.1), ["dropout"])
    numeric("lora-embedding-f32", "LoRA on an Embedding: lora_embedding_A [r, num_embeddings], lora_embedding_B "
            "[dim, r]", "LORA", "embedding", "float32", {"embed": embedding(10, 4)}, lora(2, 3, ["embed"]), [])
    numeric("lora-conv2d-f32", "LoRA on a Conv2d with a 3x2 kernel, stride (2, 1), padding (1, 0): lora_A is a conv "
            "with the base layer's kernel, stride and padding, lora_B a 1x1 conv", "LORA", "conv2d", "float32",
            {"conv": conv2d(3, 4, [3, 2], stride=[2, 1], padding=[1, 0])}, lora(2, 5, ["conv"]), ["stride"])
    numeric("lora-conv1d-f32", "LoRA on a torch Conv1d (kernel 3, padding 1)", "LORA", "conv1d", "float32",
            {"conv": conv1d(3, 4, 3, padding=1)}, lora(2, 5, ["conv"]), [])
    numeric("lora-gpt2-conv1d-f32", "LoRA on GPT-2's Conv1D (weight stored [in, out], fan_in_fan_out=true); "
            "lora_A/B keep the [r, in] / [out, r] layout", "LORA", "gpt2_conv1d", "float32",
            {"h.0.mlp.c_fc": gpt2(6, 5)}, lora(2, 6, ["c_fc"], fan_in_fan_out=True), ["fan_in_fan_out"])
    numeric("lora-fused-qkv-gpt2-f32", "LoRA on a fused q/k/v projection (GPT-2 c_attn, output split in 3 equal "
            "parts): one A and one B over the whole fused output; c_proj is not targeted", "LORA", "gpt2_conv1d",
            "float32", {"h.0.attn.c_attn": gpt2(6, 12, split=[4, 4, 4]), "h.0.attn.c_proj": gpt2(4, 6)},
            lora(2, 6, ["c_attn"], fan_in_fan_out=True), ["fan_in_fan_out", "fused", "untargeted"])
    numeric("lora-fused-qkv-linear-f32", "LoRA on a fused Linear q/k/v projection with unequal parts (q 4, k 2, "
            "v 2: grouped-query attention, like Phi-3's qkv_proj)", "LORA", "linear", "float32",
            {"model.layers.0.self_attn.qkv_proj": linear(6, 8, bias=False) | {"split": [4, 2, 2]}},
            lora(2, 6, ["qkv_proj"]), ["fused"])
    numeric("lora-bias-f32", "LoRA with lora_bias=true: lora_B has a bias, scaled like the rest of the update",
            "LORA", "linear", "float32", one, lora(2, 6, ["layer"], lora_bias=True), ["lora_bias"])
    numeric("lora-regex-targets-f32", "LoRA whose target_modules is a regular expression matching the whole path: "
            "layers.N.q_proj are adapted, layers.0.k_proj is not", "LORA", "linear", "float32",
            {"layers.0.q_proj": linear(6, 5), "layers.0.k_proj": linear(6, 3), "layers.1.q_proj": linear(6, 5)},
            lora(2, 6, r"layers\.\d+\.q_proj"), ["regex", "untargeted"])
    numeric("rslora-patterns-f32", "rsLoRA (alpha / sqrt(r)) with rank_pattern and alpha_pattern: v_proj has r=2, "
            "layers.1.q_proj alpha=3, the rest r=4 alpha=8", "LORA", "linear", "float32",
            {"layers.0.q_proj": linear(6, 5), "layers.0.v_proj": linear(6, 3), "layers.1.q_proj": linear(6, 5),
             "layers.1.v_proj": linear(6, 3)},
            lora(4, 8, ["q_proj", "v_proj"], use_rslora=True, rank_pattern={"v_proj": 2},
                 alpha_pattern={r"layers\.1\.q_proj": 3}), ["rslora", "rank_pattern", "alpha_pattern"])
    numeric("lora-patterns-f32", "plain LoRA (alpha / r) with rank_pattern and alpha_pattern", "LORA", "linear",
            "float32", {"layers.0.q_proj": linear(6, 5), "layers.0.v_proj": linear(6, 3)},
            lora(4, 6, ["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 10}),
            ["rank_pattern", "alpha_pattern"])
    for dtype in ("float32", "bfloat16"):
        numeric(f"dora-linear-{_SHORT[dtype]}", f"DoRA on a Linear with bias: W' = m / ||W + s B A||_row * "
                f"(W + s B A), bias unchanged, in {dtype}", "LORA", "linear", dtype, one,
                lora(2, 6, ["layer"], use_dora=True), ["dora"])
    numeric("dora-conv2d-f32", "DoRA on a Conv2d: the norm is over each output channel's whole kernel; "
            "lora_magnitude_vector is [1, out, 1, 1]", "LORA", "conv2d", "float32",
            {"conv": conv2d(3, 4, [3, 3], padding=[1, 1])}, lora(2, 5, ["conv"], use_dora=True), ["dora"])
    numeric("dora-conv1d-f32", "DoRA on a torch Conv1d", "LORA", "conv1d", "float32",
            {"conv": conv1d(3, 4, 3)}, lora(2, 5, ["conv"], use_dora=True), ["dora"])
    numeric("dora-embedding-f32", "DoRA on an Embedding: one magnitude per embedding dimension", "LORA",
            "embedding", "float32", {"embed": embedding(10, 4)}, lora(2, 3, ["embed"], use_dora=True), ["dora"])
    numeric("dora-gpt2-conv1d-f32", "DoRA on GPT-2's Conv1D (fan_in_fan_out): the norm is per output feature",
            "LORA", "gpt2_conv1d", "float32", {"h.0.mlp.c_fc": gpt2(6, 5)},
            lora(2, 6, ["c_fc"], use_dora=True, fan_in_fan_out=True), ["dora", "fan_in_fan_out"])
    ia3_modules = {"layers.0.self_attn.q_proj": linear(6, 5), "layers.0.mlp.down_proj": linear(6, 4)}
    for dtype in ("float32", "float16"):
        numeric(f"ia3-linear-{_SHORT[dtype]}", f"IA3 on Linear layers: q_proj scales its output (bias included), "
                f"the feed-forward down_proj scales its input, in {dtype}", "IA3", "linear", dtype, ia3_modules,
                {"peft_type": "IA3", "target_modules": ["q_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
                ["feedforward"])
    numeric("ia3-conv2d-f32", "IA3 on Conv2d layers: ia3_l [1, out, 1, 1] scales the output channels, "
            "[1, in, 1, 1] (feed-forward) the input channels", "IA3", "conv2d", "float32",
            {"conv_a": conv2d(3, 4, [3, 3]), "conv_ff": conv2d(3, 2, [2, 2])},
            {"peft_type": "IA3", "target_modules": ["conv_a", "conv_ff"], "feedforward_modules": ["conv_ff"]},
            ["feedforward"])
    numeric("ia3-gpt2-conv1d-f32", "IA3 on GPT-2's Conv1D layers (c_attn scales its output, mlp.c_proj its input)",
            "IA3", "gpt2_conv1d", "float32", {"h.0.attn.c_attn": gpt2(6, 9), "h.0.mlp.c_proj": gpt2(5, 6)},
            {"peft_type": "IA3", "target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"],
             "fan_in_fan_out": True}, ["feedforward", "fan_in_fan_out"])
    for dtype in ("float32", "bfloat16"):
        numeric(f"loha-linear-{_SHORT[dtype]}", f"LoHa on a Linear: (w1_a w1_b) * (w2_a w2_b) * alpha / r, in {dtype}",
                "LOHA", "linear", dtype, one, lycoris("LOHA", 2, 6, ["layer"]), [])
    numeric("loha-conv2d-f32", "LoHa on a Conv2d, flattened kernel ([out, in*kh*kw] factors)", "LOHA", "conv2d",
            "float32", {"conv": conv2d(3, 4, [3, 3], padding=[1, 1])}, lycoris("LOHA", 2, 6, ["conv"]), [])
    numeric("loha-conv2d-effective-f32", "LoHa on a Conv2d with use_effective_conv2d (CP form: hada_t1/hada_t2 "
            "[r, r, kh, kw], hada_w*_a [r, out], hada_w*_b [r, in])", "LOHA", "conv2d", "float32",
            {"conv": conv2d(3, 4, [3, 3], padding=[1, 1])},
            lycoris("LOHA", 2, 6, ["conv"], use_effective_conv2d=True), ["effective_conv2d"])
    numeric("loha-conv1d-f32", "LoHa on a torch Conv1d", "LOHA", "conv1d", "float32",
            {"conv": conv1d(3, 4, 3)}, lycoris("LOHA", 2, 6, ["conv"]), [])
    for dtype in ("float32", "bfloat16"):
        numeric(f"lokr-linear-{_SHORT[dtype]}", f"LoKr on a Linear 16->12: full lokr_w1, lokr_w2 = w2_a w2_b, "
                f"kron(w1, w2) * alpha / r, in {dtype}", "LOKR", "linear", dtype, {"layer": linear(16, 12)},
                lycoris("LOKR", 1, 3, ["layer"]), [])
    numeric("lokr-linear-decompose-both-f32", "LoKr with decompose_both: lokr_w1 = w1_a w1_b as well", "LOKR",
            "linear", "float32", {"layer": linear(16, 12)},
            lycoris("LOKR", 1, 3, ["layer"], decompose_both=True, decompose_factor=4), ["decompose_both"])
    numeric("lokr-linear-full-f32", "LoKr whose rank is large enough for full lokr_w1 and lokr_w2", "LOKR",
            "linear", "float32", {"layer": linear(16, 12)}, lycoris("LOKR", 4, 6, ["layer"]), [])
    numeric("lokr-conv2d-f32", "LoKr on a Conv2d (flattened kernel in lokr_w2_b)", "LOKR", "conv2d", "float32",
            {"conv": conv2d(4, 6, [3, 3], padding=[1, 1])}, lycoris("LOKR", 1, 3, ["conv"]), [])
    numeric("lokr-conv2d-effective-f32", "LoKr on a Conv2d with use_effective_conv2d (lokr_t2 core)", "LOKR",
            "conv2d", "float32", {"conv": conv2d(4, 6, [3, 3], padding=[1, 1])},
            lycoris("LOKR", 1, 3, ["conv"], use_effective_conv2d=True), ["effective_conv2d"])
    prefix = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "token_dim": 8,
              "num_attention_heads": 2, "num_layers": 2, "num_transformer_submodules": 1}
    numeric("prefix-tuning-f32", "prefix tuning: the per-layer key/value prefixes [layers, 2, heads, nvt, head_dim] "
            "read from prompt_embeddings [nvt, layers * 2 * token_dim]", "PREFIX_TUNING", "decoder", "float32", {},
            prefix, [], decoder=DECODER, compute="prefix_key_values")
    numeric("prefix-tuning-gqa-f32", "prefix tuning on a grouped-query-attention decoder: token_dim = head_dim * "
            "num_key_value_heads, num_attention_heads = num_key_value_heads", "PREFIX_TUNING", "decoder", "float32",
            {}, prefix | {"token_dim": 8, "num_attention_heads": 2}, ["gqa"], decoder=DECODER_GQA,
            compute="prefix_key_values")
    numeric("prompt-tuning-f32", "prompt tuning: the virtual tokens' embeddings are prepended to inputs_embeds",
            "PROMPT_TUNING", "decoder", "float32", {},
            {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "token_dim": 8,
             "num_transformer_submodules": 1, "num_attention_heads": 2, "num_layers": 2}, [],
            decoder=DECODER, compute="prompt_concat")
    _mutation_numeric_cases()


def _oft_cases() -> None:
    """OFT and BOFT (SPEC.md 15.6, 15.7): block-diagonal Cayley rotations of the input features."""
    one = {"layer": linear(8, 5)}
    numeric("oft-linear-f32", "OFT on a Linear 8->5, oft_block_size 4 (r = 2 blocks), Cayley-Neumann with 5 terms: "
            "the layer runs on x @ R", "OFT", "linear", "float32", one,
            {"peft_type": "OFT", "r": 0, "oft_block_size": 4, "target_modules": ["layer"]}, [])
    numeric("oft-linear-cayley-shared-f32", "OFT with the exact Cayley transform and block_share (one block "
            "[1, 6] repeated twice)", "OFT", "linear", "float32", one,
            {"peft_type": "OFT", "r": 0, "oft_block_size": 4, "target_modules": ["layer"], "block_share": True,
             "use_cayley_neumann": False}, ["block_share", "cayley"])
    numeric("oft-linear-rank-3-terms-f32", "OFT given r = 4 (block size 2), 3 Cayley-Neumann terms", "OFT",
            "linear", "float32", one, {"peft_type": "OFT", "r": 4, "oft_block_size": 0, "target_modules": ["layer"],
                                       "num_cayley_neumann_terms": 3}, ["neumann"])
    numeric("oft-conv2d-1x1-f32", "OFT on a 1x1 Conv2d: the rotation acts on each pixel's channels", "OFT", "conv2d",
            "float32", {"conv": conv2d(4, 3, [1, 1])},
            {"peft_type": "OFT", "r": 0, "oft_block_size": 2, "target_modules": ["conv"]}, [])
    numeric("boft-linear-f32", "BOFT on a Linear 8->5 with bias, boft_block_size 4: (base(x @ R) - b) * boft_s + b",
            "BOFT", "linear", "float32", one, {"peft_type": "BOFT", "boft_block_size": 4, "target_modules": ["layer"]},
            [])
    numeric("boft-conv2d-f32", "BOFT on a 3x3 Conv2d (padding 1): the flattened kernel [out, in*9] is rotated by "
            "3 blocks of 6 and scaled per output channel", "BOFT", "conv2d", "float32",
            {"conv": conv2d(2, 3, [3, 3], padding=[1, 1])},
            {"peft_type": "BOFT", "boft_block_size": 0, "boft_block_num": 3, "target_modules": ["conv"]}, [])


P_TUNING_CFG = {"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "token_dim": 8,
                "num_transformer_submodules": 1, "num_attention_heads": 2, "num_layers": 2,
                "encoder_reparameterization_type": "MLP", "encoder_hidden_size": 8}


def _prompts_cases() -> None:
    """P-tuning (SPEC.md 15.8): the file holds the prompt encoder's output, prepended as prompt tuning's is.
    Classification heads and encoder-decoder models (15.9) need model descriptions the protocol lacks."""
    numeric("p-tuning-f32", "P-tuning: prompt_embeddings holds the MLP prompt encoder's output [nvt, token_dim], "
            "prepended to inputs_embeds as in prompt tuning", "P_TUNING", "decoder", "float32", {}, P_TUNING_CFG,
            [], decoder=DECODER, compute="prompt_concat")


def _adalora_cases() -> None:
    """AdaLoRA (SPEC.md 15.4): B @ (A * E) * lora_alpha / (init_r + 1e-5), with the ranks rank_pattern kept."""
    numeric("adalora-linear-f32", "AdaLoRA on a Linear 6->5, init_r 3 with 2 ranks kept by rank_pattern: the scale "
            "stays lora_alpha / init_r", "ADALORA", "linear", "float32", {"layer": linear(6, 5)},
            {"peft_type": "ADALORA", "init_r": 3, "lora_alpha": 4, "total_step": 10, "target_modules": ["layer"],
             "rank_pattern": {"layer.lora_E": [True, False, True]}}, ["rank_pattern"])
    numeric("adalora-gpt2-conv1d-f32", "AdaLoRA on a GPT-2 Conv1D (weight [in, out]): lora_A [k, in], lora_B [out, k]",
            "ADALORA", "gpt2_conv1d", "float32", {"h.0.attn.c_attn": gpt2(6, 9)},
            {"peft_type": "ADALORA", "init_r": 2, "lora_alpha": 6, "total_step": 10, "fan_in_fan_out": True,
             "target_modules": ["c_attn"]}, ["fan_in_fan_out"])
    numeric("adalora-conv2d-f32", "AdaLoRA on a 3x3 Conv2d (padding 1): lora_A [k, in * 9], the delta reshaped to "
            "the kernel", "ADALORA", "conv2d", "float32", {"conv": conv2d(3, 4, [3, 3], padding=[1, 1])},
            {"peft_type": "ADALORA", "init_r": 2, "lora_alpha": 8, "total_step": 10, "target_modules": ["conv"]}, [])


def _vera_cases() -> None:
    """VeRA (SPEC.md 15.5): shared projections stored once, sliced per module, scaled by lambda_b / lambda_d."""
    numeric("vera-linear-f32", "VeRA on two Linear layers of other sizes (6->5, 4->7): vera_A [r, 6] and vera_B "
            "[7, r] stored once, each layer uses vera_A[:, :in] and vera_B[:out]", "VERA", "linear", "float32",
            {"a": linear(6, 5), "b": linear(4, 7)}, {"peft_type": "VERA", "r": 3, "target_modules": ["a", "b"]},
            ["shared"])
    numeric("vera-gpt2-conv1d-f32", "VeRA on GPT-2 Conv1D layers (weights [in, out])", "VERA", "gpt2_conv1d",
            "float32", {"h.0.attn.c_attn": gpt2(6, 9), "h.0.mlp.c_proj": gpt2(5, 6)},
            {"peft_type": "VERA", "r": 2, "fan_in_fan_out": True, "target_modules": ["c_attn", "c_proj"]},
            ["shared", "fan_in_fan_out"])


def _road_cases() -> None:
    """RoAd (SPEC.md 17.1): pairs of a Linear's outputs rotated and scaled (R W, R b), each variant."""
    numeric("road-1-linear-f32", "RoAd road_1 on a Linear 6->8 with bias, group_size 4: theta/alpha [out/2 = 4], "
            "both halves of a group share its 2 angles; R rotates the bias too", "ROAD", "linear", "float32",
            {"layer": linear(6, 8)}, {"peft_type": "ROAD", "variant": "road_1", "group_size": 4,
                                      "target_modules": ["layer"]}, [])
    numeric("road-2-linear-f32", "RoAd road_2 on two Linear layers (6->8 with bias, 8->4 without), group_size 4: "
            "theta/alpha [out], one angle and scale per element", "ROAD", "linear", "float32",
            {"a": linear(6, 8), "b": linear(8, 4, bias=False)},
            {"peft_type": "ROAD", "variant": "road_2", "group_size": 4, "target_modules": ["a", "b"]}, [])
    numeric("road-4-linear-f32", "RoAd road_4 on a Linear 6->8 with bias, group_size 8: theta/alpha [2 * out], the "
            "first half of each group's 2g values gives cos, the second sin", "ROAD", "linear", "float32",
            {"layer": linear(6, 8)}, {"peft_type": "ROAD", "variant": "road_4", "group_size": 8,
                                      "target_modules": ["layer"]}, [])
    numeric("road-4-linear-groups-f32", "RoAd road_4 on a Linear 6->8 with bias, group_size 4 (two groups): "
            "theta/alpha [16] read as [out/g = 2, 2, g = 4]: group k's first 4 values give cos, its next 4 sin",
            "ROAD", "linear", "float32", {"layer": linear(6, 8)},
            {"peft_type": "ROAD", "variant": "road_4", "group_size": 4, "target_modules": ["layer"]}, ["groups"])
    numeric("road-2-linear-bf16", "RoAd road_2 on a Linear 6->8 with bias, group_size 4, in bfloat16", "ROAD",
            "linear", "bfloat16", {"layer": linear(6, 8)},
            {"peft_type": "ROAD", "variant": "road_2", "group_size": 4, "target_modules": ["layer"]}, [])
def _miss_cases() -> None:
    """MiSS (SPEC.md 17.2): one block shared across the input's r-chunks; bat multiplies the weight's tiles."""
    miss = {"peft_type": "MISS", "target_modules": ["layer"]}
    numeric("miss-linear-f32", "MiSS on a Linear 8->6, r 4: the sum of the input's two 4-chunks times miss_block "
            "[4, 6] is added (merged: W[o, j*4 + k] += B[k, o])", "MISS", "linear", "float32", {"layer": linear(8, 6)},
            miss | {"r": 4}, [])
    numeric("miss-linear-padded-f32", "MiSS on a Linear 7->5, r 3: the input is zero-padded to 9 features (3 chunks); "
            "merged, the last chunk is cut at the weight's 7 columns", "MISS", "linear", "float32",
            {"layer": linear(7, 5)}, miss | {"r": 3, "init_weights": False}, ["padding"])
    numeric("miss-linear-mini-f32", "MiSS init_weights 'mini', r 3, mini_r 2 on a Linear 8->6: miss_block [3, 2] "
            "repeated 3 times along the outputs", "MISS", "linear", "float32", {"layer": linear(8, 6)},
            miss | {"r": 3, "init_weights": "mini", "mini_r": 2}, ["mini"])
    numeric("miss-linear-bat-f32", "MiSS init_weights 'bat', r 2, on Linear 8->4 and 6->4: miss_block [out/2, 2, 2]; "
            "each [2, 2] tile W[i, j] of the weight becomes W[i, j] + W[i, j] @ B_i + B_i", "MISS", "linear",
            "float32", {"layers.0.q_proj": linear(8, 4), "layers.0.o_proj": linear(6, 4, bias=False)},
            {"peft_type": "MISS", "r": 2, "init_weights": "bat", "target_modules": ["q_proj", "o_proj"]}, ["bat"])
    numeric("miss-linear-null-init-f32", "SPEC 4.1, 17.2: MiSS with init_weights null is block mode (PEFT compares "
            "it with 'bat' and 'mini'): a [4, 6] miss_block on a Linear 8->6, r 4", "MISS", "linear", "float32",
            {"layer": linear(8, 6)}, miss | {"r": 4, "init_weights": None}, ["null"])
    numeric("miss-linear-f16", "MiSS on a Linear 16->6, r 4 (the sum of 4 chunks), in float16", "MISS", "linear",
            "float16", {"layer": linear(16, 6)}, miss | {"r": 4}, [])
def _hra_cases() -> None:
    """HRA (SPEC.md 17.3): the weight times a product of Householder reflections of the input features."""
    numeric("hra-linear-f32", "HRA on a Linear 8->5 with bias, r 3: W @ H, H = (I - 2 u1 u1^T)(I - 2 u2 u2^T)"
            "(I - 2 u3 u3^T) of hra_u's normalised columns [8, 3]", "HRA", "linear", "float32",
            {"layer": linear(8, 5)}, {"peft_type": "HRA", "r": 3, "target_modules": ["layer"]}, [])
    numeric("hra-linear-gs-f32", "HRA with apply_GS: one reflection I - 2 Q Q^T across the Gram-Schmidt basis of "
            "hra_u's 3 columns", "HRA", "linear", "float32", {"layer": linear(8, 5)},
            {"peft_type": "HRA", "r": 3, "apply_GS": True, "target_modules": ["layer"]}, ["gram_schmidt"])
    numeric("hra-conv2d-f32", "HRA on a 2x2 Conv2d 3->4 (padding 1): hra_u [in*k*k = 12, 2] reflects the flattened "
            "kernel's columns in torch's (in, kh, kw) order", "HRA", "conv2d", "float32",
            {"conv": conv2d(3, 4, [2, 2], padding=[1, 1])}, {"peft_type": "HRA", "r": 2, "target_modules": ["conv"]},
            [])
    numeric("hra-linear-null-booleans-f32", "SPEC 4.1: HRA with apply_GS and init_weights null reads them as false "
            "(PEFT's truth tests): the product of the 3 reflections, not Gram-Schmidt", "HRA", "linear", "float32",
            {"layer": linear(8, 5)},
            {"peft_type": "HRA", "r": 3, "apply_GS": None, "init_weights": None, "target_modules": ["layer"]}, ["null"])
    numeric("hra-linear-f16", "HRA on a Linear 8->5 with bias, r 3, in float16 (hra_u too: PEFT computes H and "
            "W @ H in hra_u's dtype)", "HRA", "linear", "float16", {"layer": linear(8, 5)},
            {"peft_type": "HRA", "r": 3, "target_modules": ["layer"]}, [])


def _vblora_cases() -> None:
    """VB-LoRA (SPEC.md 17.4): one bank [N, L] stored once; per module logits (or their top-k) mix its vectors."""
    numeric("vblora-linear-f32", "VB-LoRA on two Linear layers (8->4, 4->8), N=6 vectors of L=4, r=2, topk=2: "
            "logits_A [r, in/L, N], logits_B [out/L, r, N]; A = mix(logits_A).reshape(r, in), B = "
            "mix(logits_B).transpose(1, 2).reshape(out, r)", "VBLORA", "linear", "float32",
            {"a": linear(8, 4), "b": linear(4, 8)},
            {"peft_type": "VBLORA", "r": 2, "num_vectors": 6, "vector_length": 4, "topk": 2,
             "target_modules": ["a", "b"]}, ["shared"])
    numeric("vblora-gpt2-conv1d-topk-f32", "VB-LoRA on GPT-2 Conv1D layers (weights [in, out]) saved with "
            "save_only_topk_weights: U8 _topk_indices [..., 3] and _topk_weights [..., 2] (the last weight is 1 - "
            "their sum), N=7, L=4", "VBLORA", "gpt2_conv1d", "float32",
            {"h.0.attn.c_attn": gpt2(8, 12), "h.0.mlp.c_proj": gpt2(4, 8)},
            {"peft_type": "VBLORA", "r": 2, "num_vectors": 7, "vector_length": 4, "topk": 3,
             "save_only_topk_weights": True, "fan_in_fan_out": True, "target_modules": ["c_attn", "c_proj"]},
            ["shared", "fan_in_fan_out"], float64_tolerance=1e-6)  # PEFT takes log(w) in float32: one ulp apart


def _c3a_cases() -> None:
    """C3A (SPEC.md 17.7): block-circulant updates of Linear layers, the block size per module."""
    numeric("c3a-linear-f32", "C3A on Linear 8->4 (block_size 2: c3a_kernel [2, 4, 2]) and 6->6 with bias "
            "(block_size_pattern {'v': 3}: [2, 2, 3]); W[i*b + p, j*b + q] += kernel[i, j, (q - p) mod b] / in. PEFT "
            "computes the term in float32 whatever the dtype: its float64 run agrees to float32 rounding",
            "C3A", "linear", "float32", {"layers.0.q": linear(8, 4, bias=False), "layers.0.v": linear(6, 6)},
            {"peft_type": "C3A", "block_size": 2, "block_size_pattern": {"v": 3},
             "target_modules": ["q", "v"]}, ["block_size_pattern"], float64_tolerance=1e-6)
    numeric("c3a-linear-f16", "C3A on a Linear 8->4 with bias, block_size 4 (c3a_kernel [1, 2, 4]), in float16 (PEFT "
            "computes the term in float32 and rounds it to float16)", "C3A", "linear", "float16",
            {"layer": linear(8, 4)}, {"peft_type": "C3A", "block_size": 4, "target_modules": ["layer"]}, [],
            float64_tolerance=1e-6)
    eight = {"layers.0.q": linear(8, 8, bias=False), "layers.0.v": linear(8, 8), "layers.1.o": linear(8, 8)}
    numeric("c3a-pattern-order-f32", "SPEC 17.7: block_size_pattern {'layers.0.v': 8, 'v': 4, '[qv]': 1, "
            "'layers.1.o': 8} in this (unsorted) order, PEFT 0.21.2's choice key by key: layers.0.v takes 4 (the exact "
            "name 'layers.0.v' needs a dot before it as a pattern and is looked up only when no key matched; 'v' "
            "comes before '[qv]'), layers.0.q 1, layers.1.o 8 (its exact name, no key matching). Sorted keys, the "
            "last match, the exact name first, re.match(k) or rank_pattern's (.*\\.)?(k)$ give other block sizes",
            "C3A", "linear", "float32", eight,
            {"peft_type": "C3A", "block_size": 2, "target_modules": ["q", "v", "o"],
             "block_size_pattern": {"layers.0.v": 8, "v": 4, "[qv]": 1, "layers.1.o": 8}},
            ["block_size_pattern", "order"], float64_tolerance=1e-6)
    numeric("c3a-pattern-alternation-f32", "SPEC 17.7: the key 'q|v' is spliced without a group, '.*\\.q|v$': "
            "layers.0.q and layers.0.q_x take 4 ('.*\\.q' is not anchored at the end), layers.0.v keeps block_size 2 "
            "('v$' must match the whole path)", "C3A", "linear", "float32",
            {"layers.0.q": linear(8, 8), "layers.0.q_x": linear(8, 8, bias=False), "layers.0.v": linear(8, 8)},
            {"peft_type": "C3A", "block_size": 2, "target_modules": ["q", "q_x", "v"],
             "block_size_pattern": {"q|v": 4}}, ["block_size_pattern"], float64_tolerance=1e-6)
    numeric("c3a-pattern-escaped-whole-path-f32", "SPEC 17.7: a key naming a whole path, escaped "
            "('layers\\.0\\.v'), matches nothing (a dot is required before it; it is no exact name): layers.0.v "
            "keeps block_size 2, while 'layers\\.1\\.v' gives h.layers.1.v 4", "C3A", "linear", "float32",
            {"layers.0.v": linear(8, 8), "h.layers.1.v": linear(8, 8, bias=False)},
            {"peft_type": "C3A", "block_size": 2, "target_modules": ["v"],
             "block_size_pattern": {"layers\\.0\\.v": 4, "layers\\.1\\.v": 4}}, ["block_size_pattern"],
            float64_tolerance=1e-6)


def _beft_cases() -> None:
    """BEFT (SPEC.md 17.8): the layer's bias plus beft_bias (a zero bias where the layer has none)."""
    numeric("beft-linear-f32", "BEFT on two Linear layers (8->6 with bias, 6->4 without): y = x W^T + b + "
            "beft_bias.flatten() (beft_bias [1, out]; b zero where the layer has none)", "BEFT", "linear", "float32",
            {"a": linear(8, 6), "b": linear(6, 4, bias=False)}, {"peft_type": "BEFT", "target_modules": ["a", "b"]},
            [])
    numeric("beft-linear-f16", "BEFT on a Linear 8->6 with bias in float16 (PEFT reads the float16 beft_bias as "
            "float32, autocast_adapter_dtype, adds it to the float16 output and rounds the sum to float16)", "BEFT",
            "linear", "float16", {"layer": linear(8, 6)},
            {"peft_type": "BEFT", "init_weights": None, "target_modules": ["layer"]}, ["null"])


def _beft_folders() -> None:
    """BEFT (SPEC.md 17.8): beft_bias [1, out] per adapted module; what readers refuse before any model is involved."""
    be = {"peft_type": "BEFT", "target_modules": ["q_proj", "v_proj"]}
    tensors = {f"{Q}.beft_bias": det((1, 8), 1).astype(np.float32), f"{V}.beft_bias": det((1, 4), 2).astype(np.float32)}
    plain("beft-valid", "BEFT: beft_bias [1, out] per adapted Linear layer", be, tensors, valid=True)
    plain("beft-init-weights-null", "SPEC 4.1, 17.8: BEFT's init_weights may be null (PEFT's truth test: a new "
          "adapter keeps its standard-normal draw)", be | {"init_weights": None}, tensors, valid=True)
    plain("beft-bias-flat", "beft_bias is [1, out]: a flat [out] vector is refused", be,
          tensors | {f"{V}.beft_bias": det((4,), 2).astype(np.float32)}, valid=False, error="ShapeMismatchError",
          key=f"{V}.beft_bias")
    plain("beft-bias-two-rows", "beft_bias is [1, out]: one row per module, not [2, out]", be,
          tensors | {f"{Q}.beft_bias": det((2, 8), 1).astype(np.float32)}, valid=False, error="ShapeMismatchError",
          key=f"{Q}.beft_bias")


def _c3a_folders() -> None:
    """C3A (SPEC.md 17.7): c3a_kernel [out/b, in/b, b]; what readers refuse, with and without the model."""
    c3a = {"peft_type": "C3A", "block_size": 4, "target_modules": ["q_proj", "v_proj"]}
    tensors = {f"{Q}.c3a_kernel": det((2, 2, 4), 1).astype(np.float32),
               f"{V}.c3a_kernel": det((1, 2, 4), 2).astype(np.float32)}
    plain("c3a-valid", "C3A on q_proj (8->8) and v_proj (8->4), block_size 4: c3a_kernel [out/4, in/4, 4]", c3a, tensors,
          valid=True)
    plain("c3a-bias", "C3A with bias 'c3a_only' (trained base biases) is refused with UnsupportedError naming /bias",
          c3a | {"bias": "c3a_only"}, tensors, valid=False, error="UnsupportedError", pointer="/bias")
    plain("c3a-block-size-mismatch", "c3a_kernel's last axis is the module's block size: a config saying 2 for "
          "kernels of 4", c3a | {"block_size": 2}, tensors, valid=False, error="ShapeMismatchError",
          key=[f"{Q}.c3a_kernel", f"{V}.c3a_kernel"])
    plain("c3a-pattern-block-size", "SPEC 17.7: block_size_pattern {'v_proj': 2} gives v_proj [2, 4, 2] (PEFT's "
          "re.match('.*\\.v_proj$')) while q_proj keeps block_size 4", c3a | {"block_size_pattern": {"v_proj": 2}},
          {f"{Q}.c3a_kernel": tensors[f"{Q}.c3a_kernel"], f"{V}.c3a_kernel": det((2, 4, 2), 3).astype(np.float32)},
          valid=True)
    plain("c3a-block-size-not-dividing", "SPEC 17.7: block_size 16 does not divide v_proj's 4 outputs (PEFT refuses "
          "the layer): UnsupportedError naming /block_size and the module", c3a | {"block_size": 16,
                                                                                  "target_modules": ["v_proj"]},
          {f"{V}.c3a_kernel": det((1, 1, 16), 4).astype(np.float32)}, valid=False, error="UnsupportedError",
          key="model.layers.0.self_attn.v_proj", pointer="/block_size")
    plain("c3a-pattern-not-a-regex", "SPEC 17.7: a block_size_pattern key that does not compile spliced ('.*\\.q_proj($'), "
          "reached by the targeted modules (PEFT's re.match raises there): UnsupportedError naming /block_size_pattern "
          "and a module that reaches it (check 18)", c3a | {"block_size_pattern": {"q_proj(": 4}}, tensors,
          valid=False, error="UnsupportedError", pointer="/block_size_pattern",
          key=["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"])


def _gralora_cases() -> None:
    """GraLoRA (SPEC.md 17.5): a k x k grid of rank-r/k blocks, optionally beside a plain LoRA pair."""
    numeric("gralora-linear-f32", "GraLoRA on a Linear 8->6 with bias, r 4, gralora_k 2, alpha 6: gralora_A [2, 4, 4], "
            "gralora_B [2, 4, 3]; input block n reaches output block j through A[n]'s j-th rank slice and B[j]'s n-th",
            "GRALORA", "linear", "float32", {"layer": linear(8, 6)},
            {"peft_type": "GRALORA", "r": 4, "gralora_k": 2, "alpha": 6, "target_modules": ["layer"]}, [])
    numeric("gralora-linear-hybrid-k3-f32", "GraLoRA with gralora_k 3 (r 3) and hybrid_r 2 on a Linear 9->6: the "
            "hybrid pair B_general @ A_general ([6, 2] @ [2, 9]) is added, both scaled by alpha / (r + hybrid_r)",
            "GRALORA", "linear", "float32", {"layer": linear(9, 6)},
            {"peft_type": "GRALORA", "r": 3, "gralora_k": 3, "hybrid_r": 2, "alpha": 4, "target_modules": ["layer"]},
            ["hybrid"])
    numeric("gralora-gpt2-conv1d-f32", "GraLoRA on GPT-2 Conv1D layers (weights [in, out], fan_in_fan_out true): "
            "the blocks keep PEFT's [k, in/k, r] / [k, r, out/k] layout", "GRALORA", "gpt2_conv1d", "float32",
            {"h.0.attn.c_attn": gpt2(8, 12), "h.0.mlp.c_proj": gpt2(4, 8)},
            {"peft_type": "GRALORA", "r": 2, "gralora_k": 2, "hybrid_r": 1, "alpha": 3, "fan_in_fan_out": True,
             "target_modules": ["c_attn", "c_proj"]}, ["hybrid", "fan_in_fan_out"])
    numeric("gralora-linear-hybrid-bf16", "GraLoRA with hybrid_r 1 on a bfloat16 Linear 8->6 (r 4, gralora_k 2, float "
            "alpha 5.5): x cast to the adapter's dtype, each term cast to the output's before it is scaled",
            "GRALORA", "linear", "bfloat16", {"layer": linear(8, 6)},
            {"peft_type": "GRALORA", "r": 4, "gralora_k": 2, "hybrid_r": 1, "alpha": 5.5, "target_modules": ["layer"]},
            ["hybrid"])


def _delora_cases() -> None:
    """DeLoRA (SPEC.md 17.6): W + B diag(lambda / r / (|A_i| |B^i|)) A, the input columns scaled by w_norm."""
    numeric("delora-linear-f32", "DeLoRA on two Linear layers (8->6 with bias, r 3; 6->4, r 2 from rank_pattern): "
            "delta = B @ diag(lambda / r / (|A_i| |B^i|)) @ A * w_norm[None, :] (the stored w_norm, not the base's "
            "norms; r the module's rank)", "DELORA", "linear", "float32", {"a": linear(8, 6), "b": linear(6, 4, bias=False)},
            {"peft_type": "DELORA", "r": 3, "rank_pattern": {"b": 2}, "target_modules": ["a", "b"]}, ["rank_pattern"])
    numeric("delora-linear-null-init-f32", "SPEC 4.1: DeLoRA with init_weights null (PEFT tests 'is True': only a new "
            "adapter's start differs) and delora_lambda 2.5 (a number; the stored delora_lambda tensor is what runs)",
            "DELORA", "linear", "float32", {"layer": linear(8, 5)},
            {"peft_type": "DELORA", "r": 2, "delora_lambda": 2.5, "init_weights": None, "target_modules": ["layer"]},
            ["null"])
    numeric("delora-linear-f16", "DeLoRA on a Linear 8->6 with bias, r 3, in float16 (PEFT reads the float16 adapter "
            "tensors as float32, autocast_adapter_dtype, and sums the term into a float16 zero tensor)", "DELORA", "linear", "float16",
            {"layer": linear(8, 6)}, {"peft_type": "DELORA", "r": 3, "target_modules": ["layer"]}, [])


def _vblora_stored(key: str, shape: tuple[int, ...], seed: int, dtype: str,
                   config: dict[str, Any]) -> torch.Tensor | None:
    """VB-LoRA's top-k tensors (SPEC.md 17.4): distinct in-range indices in PEFT's integer dtype, and positive
    weights whose sum stays below 1 (``None`` for other tensors)."""
    if key.endswith("_topk_indices"):
        n, k = int(config["num_vectors"]), shape[-1]
        rows = np.arange(math.prod(shape[:-1]))[:, None]
        values = (rows * 2 + seed + np.arange(k)[None, :] * (n // k)) % n
        return torch.from_numpy(values.reshape(shape).astype(np.uint8 if n < 2**8 else np.int16))
    if key.endswith("_topk_weights"):
        return stored(det(shape, seed, scale=0.08, offset=0.8 / (shape[-1] + 1)), dtype)
    return None


def _moe_cases() -> None:
    """The TRAINABLE_TOKENS method (SPEC.md 15.2): token rows of an embedding, and of a Linear output layer."""
    numeric("trainable-tokens-embedding-f32", "TRAINABLE_TOKENS on an Embedding 10x4: rows 7 and 2 are replaced by "
            "trainable_tokens_delta [2, 4]; the untargeted Linear is unchanged", "TRAINABLE_TOKENS", "embedding",
            "float32", {"embed_tokens": embedding(10, 4), "layer": linear(6, 5)},
            {"peft_type": "TRAINABLE_TOKENS", "token_indices": [7, 2], "target_modules": ["embed_tokens"]},
            ["untargeted"])
    numeric("trainable-tokens-linear-f32", "TRAINABLE_TOKENS on a Linear 6->5 without bias (an untied output layer): "
            "weight rows (output features) 1 and 4 are replaced", "TRAINABLE_TOKENS", "linear", "float32",
            {"lm_head": linear(6, 5, bias=False)},
            {"peft_type": "TRAINABLE_TOKENS", "token_indices": [1, 4], "target_modules": ["lm_head"]}, [])


def _target_parameters_cases() -> None:
    """LoRA on parameters (SPEC.md 15.1): a 3-D expert stack (a 2-D weight would put a spec 1.1 feature in the
    core profile; tests/torch/test_target_parameters.py covers it against PEFT)."""
    numeric("lora-target-parameters-experts-f32", "LoRA on a 3-D parameter: 3 experts' weights [3, 5, 6], "
            "lora_A [r*3, 6] experts major, lora_B [5, r*3] experts minor; rank_pattern on 'experts.weight'",
            "LORA", "experts", "float32", {"mlp.experts": experts(3, 6, 5)},
            lora(2, 4, [], target_parameters=["experts.weight"], rank_pattern={"experts.weight": 3},
                 alpha_pattern={"experts.weight": 5}), ["target_parameters", "rank_pattern"])


def _ln_tuning_cases() -> None:
    """LN tuning (SPEC.md 15.3): the trained copy's weight and bias replace a LayerNorm's (and a Linear's)."""
    numeric("ln-tuning-layer-norm-f32", "LN_TUNING on a LayerNorm(6) with bias and on a Linear 6->5: the stored "
            "ln_tuning_layers.weight / .bias replace the layers' own; the untargeted LayerNorm is unchanged",
            "LN_TUNING", "layer_norm", "float32",
            {"layers.0.input_layernorm": layer_norm(6), "layers.0.o_proj": linear(6, 5),
             "layers.1.input_layernorm": layer_norm(6, eps=1e-6)},
            {"peft_type": "LN_TUNING", "target_modules": ["layers.0.input_layernorm", "o_proj"]},
            ["untargeted"])


def _fill(key: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    if key.endswith("hra_u"):  # a quadratic phase: det's columns (one frequency) span 2 dimensions, too few for GS
        k = np.arange(math.prod(shape))
        return np.sin(0.61 * k + 0.013 * k * k + 1.7 * seed + 0.3).reshape(shape)
    if key.endswith("boft_s"):
        return det(shape, seed, scale=0.3, offset=1.0)
    if key.endswith("delora_w_norm"):  # DeLoRA's column norms (positive) and its bound
        return det(shape, seed, scale=0.3, offset=1.0)
    if key.endswith("delora_lambda"):
        return det(shape, seed, scale=0.5, offset=2.0)
    if key.endswith("lora_magnitude_vector"):
        return det(shape, seed, scale=0.3, offset=1.2)
    if key.endswith("ia3_l"):
        return det(shape, seed, scale=0.5, offset=1.0)
    if key.endswith("road_alpha"):  # RoAd's scales around 1, its angles (road_theta) around 0
        return det(shape, seed, scale=0.3, offset=1.0)
    if key.endswith("road_theta"):
        return det(shape, seed, scale=0.8)
    if key == "prompt_embeddings":
        return det(shape, seed, scale=0.8)
    if ".hada_" in key or ".lokr_" in key:  # products of several factors: larger, so the update shows
        return det(shape, seed, scale=0.9)
    return det(shape, seed, scale=0.5)


def _reference(case: dict[str, Any], base: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
               tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    config = case["config"]
    if case["compute"] == "prefix_key_values":  # the sizes PEFT uses on the model (SPEC 14.3)
        sizes = prefix_sizes(config, case["model"].get("decoder") or {})
        return {"past_key_values": reference.prefix_key_values({**config, **sizes}, f64(tensors["prompt_embeddings"]))}
    if case["compute"] == "prompt_concat":
        return {"inputs_embeds": reference.prompt_concat(f64(tensors["prompt_embeddings"]), f64(inputs["inputs_embeds"]))}
    out = {}
    for path, spec in case["model"]["modules"].items():
        prefix = f"base_model.model.{path}."
        own = {k[len(prefix):]: f64(v) for k, v in tensors.items()
               if k.startswith(prefix) and k[len(prefix):] in PARAMETERS[config["peft_type"]]}
        if own:  # VeRA's shared projections (SPEC 15.5): every adapted module slices them
            own |= {p: f64(tensors[f"base_model.{p}"]) for p in SHARED_PARAMETERS.get(config["peft_type"], ())}
        # tensors of modules to save and trained biases replace the base module's (SPEC 8.8)
        weights = {p: f64(tensors.get(prefix + p, base[f"{path}.{p}"])) for p in weight_shapes(spec)}
        if prefix + BASE_LAYER_BIAS in tensors:
            weights["bias"] = f64(tensors[prefix + BASE_LAYER_BIAS])
        if prefix + TRAINABLE_TOKENS_PARAM in tensors:  # LoRA's trainable_token_indices: the rows replace W's
            delta = {"trainable_tokens_delta": f64(tensors[prefix + TRAINABLE_TOKENS_PARAM])}
            weights["weight"] = token_weight(weights["weight"], {"token_indices": token_indices(config, path)}, delta)
        out[path] = reference.forward(spec, weights, f64(inputs[path]), config, path, own)
    return out


def _compare(name: str, got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol: float, rtol: float) -> float:
    """The largest error as a fraction of the tolerance; asserts the keys and shapes agree."""
    assert set(got) == set(want), (name, sorted(got), sorted(want))
    worst = 0.0
    for k in want:
        assert got[k].shape == want[k].shape, (name, k, got[k].shape, want[k].shape)
        worst = max(worst, float(np.max(np.abs(got[k] - want[k]) / (atol + rtol * np.abs(want[k])))))
    return worst


def _clarification_numeric() -> None:
    """SPEC 1.1 clarifications (issue #18) that need the math."""
    numeric("lokr-conv1d-full-f32", "SPEC 8.7: LoKr on a torch Conv1d with a full 3-axis lokr_w2 [out_k, in_n, k]: "
            "kron gives lokr_w1 one leading unit axis and the result is reshaped row-major to [out, in, k] (PEFT)",
            "LOKR", "conv1d", "float32", {"conv": conv1d(4, 6, 3)}, lycoris("LOKR", 2, 4, ["conv"]), [])
    q = linear(6, 5)
    numeric("lora-regex-brace-shorthand-f32", "SPEC 4.5: Python's {,n} means {0,n} (ECMA-262 reads the literal "
            "text '{,n}'): layers\\.1{,1}\\.q_proj selects layers.1.q_proj, not layers.0.q_proj nor layers.11.q_proj",
            "LORA", "linear", "float32", {"layers.0.q_proj": q, "layers.1.q_proj": q, "layers.11.q_proj": q},
            lora(2, 6, r"layers\.1{,1}\.q_proj"), ["regex", "untargeted"])
    numeric("lora-null-booleans-f32", "SPEC 4.1: a null boolean reads as false, PEFT's truth test: use_rslora null "
            "scales by alpha / r = 2 (not alpha / sqrt(r) = 4), use_dora, lora_bias and fan_in_fan_out null add no "
            "magnitude, no bias, no transpose", "LORA", "linear", "float32", {"layer": linear(6, 5)},
            lora(4, 8, ["layer"], use_rslora=None, use_dora=None, lora_bias=None, fan_in_fan_out=None), ["null"])
    numeric("lora-velora-state-f32", "SPEC 5.2: VeLoRA (velora_config) changes only the backward pass: each module's "
            "lora_velora_embed [num_groups] is accepted and never used, the output is plain LoRA's", "LORA", "linear",
            "float32", {"layers.0.q_proj": linear(8, 5), "layers.0.v_proj": linear(8, 3)},
            lora(2, 6, ["q_proj", "v_proj"], velora_config={"num_groups": 4}), ["velora"])


def _init_numeric() -> None:
    """SPEC 8.1: PiSSA and OLoRA adapters run on the residual base PEFT rebuilds at every load (PEFT refuses both on
    a float64 base, so the reference is checked against PEFT in float32 only)."""
    attn = {"layers.0.q_proj": linear(8, 6), "layers.0.v_proj": linear(8, 4)}
    numeric("lora-pissa-f32", "SPEC 8.1: init_lora_weights 'pissa': each adapted Linear runs on PEFT's residual "
            "W - s*B0A0 (B0A0: the r largest singular triplets of W, scaled by 1/s) rebuilt from the base, as PEFT's "
            "load rebuilds it", "LORA", "linear", "float32", attn, lora(2, 6, ["q_proj", "v_proj"],
                                                                      init_lora_weights="pissa"), ["init"],
            float64_tolerance=None)
    numeric("lora-olora-f32", "SPEC 8.1: init_lora_weights 'olora': each adapted Linear runs on PEFT's residual "
            "W - s*Q[:, :r]R[:r] (QR of W), rebuilt from the base", "LORA", "linear", "float32", attn,
            lora(3, 4, ["q_proj", "v_proj"], init_lora_weights="olora", rank_pattern={"v_proj": 2}), ["init"],
            float64_tolerance=None)
    numeric("lora-pissa-rank-capped-f32", "SPEC 8.1: 'pissa' with r = 3 on a layer of one output: its SVD has one "
            "triplet, so PEFT stores lora_A [1, in] and lora_B [1, 1] there (the rank is min(r, in, out)); the "
            "scaling stays lora_alpha / r", "LORA", "linear", "float32",
            {"layers.0.q_proj": linear(8, 6), "layers.0.gate": linear(8, 1)},
            lora(3, 6, ["q_proj", "gate"], init_lora_weights="pissa"), ["init"], float64_tolerance=None)
    numeric("lora-pissa-gpt2-conv1d-f32", "SPEC 8.1: 'pissa' on GPT-2's Conv1D (stored [in, out]): the SVD of the "
            "[out, in] weight, the residual stored back as [in, out]", "LORA", "gpt2_conv1d", "float32",
            {"h.0.attn.c_attn": gpt2(8, 12)}, lora(2, 4, ["c_attn"], init_lora_weights="pissa"), ["init"],
            float64_tolerance=None)


def generate_numeric() -> list[dict[str, Any]]:
    _numeric_cases()
    _clarification_numeric()
    _init_numeric()
    _oft_cases()
    _prompts_cases()
    _adalora_cases()
    _vera_cases()
    _road_cases()
    _miss_cases()
    _hra_cases()
    _vblora_cases()
    _c3a_cases()
    _gralora_cases()
    _delora_cases()
    _beft_cases()
    _moe_cases()
    _ln_tuning_cases()
    _target_parameters_cases()
    _mutation_numeric_cases_1_11()
    index = []
    for case in NUMERIC:
        cid, dtype, config = case["id"], case["dtype"], case["config"]
        folder = V1 / "numeric" / cid
        spec_model = case["model"]
        shapes = peft_state_shapes(spec_model, config)
        tensors = {k: _vblora_stored(k, s, i, dtype, config) if k.endswith(("_topk_indices", "_topk_weights"))
                   else stored(_fill(k, s, i), dtype) for i, (k, s) in enumerate(sorted(shapes.items()))}
        write_config(folder / "adapter", config)
        save_tensors(folder / "adapter" / "adapter_model.safetensors", tensors, {"format": "pt"})
        base: dict[str, torch.Tensor] = {}
        inputs: dict[str, torch.Tensor] = {}
        for j, (path, spec) in enumerate(spec_model["modules"].items()):
            for p, shape in weight_shapes(spec).items():
                base[f"{path}.{p}"] = stored(det(shape, 50 + 7 * j + len(p), scale=0.5), dtype)
            inputs[path] = input_for(spec, j, dtype)
        if case["compute"] == "prompt_concat":
            inputs["inputs_embeds"] = stored(det((2, 4, config["token_dim"]), 77, scale=1.0), dtype)
        entry: dict[str, Any] = {k: case[k] for k in ("id", "description", "method", "layer", "dtype", "compute")}
        entry |= {"tags": case["tags"], "dir": f"numeric/{cid}", "model": dict(spec_model), "adapter": "adapter"}
        if base:
            save_tensors(folder / "base.safetensors", base)
            entry["model"]["weights"] = "base.safetensors"
        if inputs:
            save_tensors(folder / "inputs.safetensors", inputs)
            entry["inputs"] = "inputs.safetensors"
        expected = _reference(case, base, inputs, tensors)
        save_tensors(folder / "expected.safetensors", {k: torch.from_numpy(v) for k, v in expected.items()})
        entry |= {"expected": "expected.safetensors", "tolerance": TOLERANCES[dtype]}
        # The reference must be PEFT's math: exactly (float64), and within tolerance in the case's dtype.
        f64 = case["float64_tolerance"]  # None: PEFT refuses the case in float64 (SPEC 8.1's PiSSA/OLoRA)
        exact = 0.0 if f64 is None else \
            _compare(cid, peft_outputs(case, base, inputs, folder / "adapter", "float64"), expected, f64, f64)
        assert exact <= 1, f"{cid}: the NumPy reference disagrees with PEFT in float64 ({exact:.3g} x {f64})"
        tol = TOLERANCES[dtype]
        used = _compare(cid, peft_outputs(case, base, inputs, folder / "adapter", dtype), expected, **tol)
        assert used <= 0.5, f"{cid}: PEFT in {dtype} uses {used:.2f} of the tolerance; loosen it or shrink the case"
        # A broken implementation must not pass: the adapter's contribution is well above the tolerance.
        without = _reference({**case, "config": config}, base, inputs, {}) if case["compute"] == "modules" else None
        if without is not None:
            moved = _compare(cid, without, expected, **tol)
            assert moved > 10, f"{cid}: the adapter barely changes the output ({moved:.1f} x tolerance)"
        print(f"numeric/{cid}: PEFT float64 {exact:.2e} of {f64}; PEFT {dtype} {used:.3f} of tolerance")
        index.append(entry)
    return index


# -- folder cases ----------------------------------------------------------------------------------------

ATTN = {"dtype": "float32", "modules": {
    "model.layers.0.self_attn.q_proj": linear(8, 8, bias=False),
    "model.layers.0.self_attn.k_proj": linear(8, 4, bias=False),
    "model.layers.0.self_attn.v_proj": linear(8, 4, bias=False),
    "model.layers.0.mlp.down_proj": linear(16, 8, bias=False)}}
Q = "base_model.model.model.layers.0.self_attn.q_proj"
K = "base_model.model.model.layers.0.self_attn.k_proj"
V = "base_model.model.model.layers.0.self_attn.v_proj"
DOWN = "base_model.model.model.layers.0.mlp.down_proj"
LORA_CFG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}


def lora_tensors(r: int = 2) -> dict[str, np.ndarray]:
    return {f"{Q}.lora_A.weight": det((r, 8), 1).astype(np.float32), f"{Q}.lora_B.weight": det((8, r), 2).astype(np.float32),
            f"{V}.lora_A.weight": det((r, 8), 3).astype(np.float32), f"{V}.lora_B.weight": det((4, r), 4).astype(np.float32)}


def np_save(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(tensors.items())), str(path), metadata=metadata if metadata is not None else {"format": "pt"})
    canonical_metadata(path)


FOLDERS: list[dict[str, Any]] = []


def folder(id_: str, description: str, *, valid: bool, model: dict[str, Any] = ATTN, error: str | None = None,
           key: str | list[str] | None = None, pointer: str | None = None, options: dict[str, Any] | None = None,
           multi: bool = False, tags: tuple[str, ...] = (), warnings_: list[dict[str, str]] | None = None,
           source: str | None = None) -> Path:
    entry: dict[str, Any] = {"id": id_, "description": description, "path": f"folders/{id_}", "valid": valid,
                             "model": model}
    if source is not None:
        entry["source"] = source
    if not valid:
        entry["error"] = error
        if key is not None:
            entry["key"] = key
        if pointer is not None:
            entry["pointer"] = pointer
    if options:
        entry["options"] = options
    if multi:
        entry["multi"] = True
    if tags:
        entry["tags"] = list(tags)
    if warnings_:
        entry["warnings"] = warnings_
    FOLDERS.append(entry)
    return V1 / "folders" / id_


def plain(id_: str, description: str, config: dict[str, Any] | str, tensors: dict[str, np.ndarray],
          metadata: dict[str, str] | None = None, **kw: Any) -> Path:
    path = folder(id_, description, **kw)
    write_config(path, config)
    np_save(path / "adapter_model.safetensors", tensors, metadata)
    return path


def generate_folders() -> list[dict[str, Any]]:
    # -- folders that must load ------------------------------------------------------------------------
    path = folder("lora-adapterspec-written", "a LoRA folder written by adapterspec (adapterspec_version, sha256 "
                  "in the safetensors metadata), checked with verify", valid=True, options={"verify": True})
    adapterspec.write_adapter(path, LORA_CFG, lora_tensors())
    canonical_metadata(path / "adapter_model.safetensors")
    _peft_saved_lora(folder("lora-peft-written", "a LoRA folder written by PEFT 0.21 save_pretrained (no "
                            "adapterspec fields, PEFT's full config)", valid=True, tags=("peft",)))
    plain("dora", "DoRA: lora_magnitude_vector (no .weight suffix) beside lora_A/lora_B", LORA_CFG | {"use_dora": True},
          lora_tensors() | {f"{Q}.lora_magnitude_vector": det((8,), 5, 0.2, 1.0).astype(np.float32),
                            f"{V}.lora_magnitude_vector": det((4,), 6, 0.2, 1.0).astype(np.float32)}, valid=True)
    plain("ia3", "IA3: ia3_l [out, 1] on q_proj, [1, in] on the feed-forward down_proj",
          {"peft_type": "IA3", "target_modules": ["q_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
          {f"{Q}.ia3_l": det((8, 1), 1, 0.3, 1.0).astype(np.float32),
           f"{DOWN}.ia3_l": det((1, 16), 2, 0.3, 1.0).astype(np.float32)}, valid=True)
    plain("loha", "LoHa on q_proj", {"peft_type": "LOHA", "r": 2, "alpha": 4, "target_modules": ["q_proj"]},
          {f"{Q}.hada_w1_a": det((8, 2), 1).astype(np.float32), f"{Q}.hada_w1_b": det((2, 8), 2).astype(np.float32),
           f"{Q}.hada_w2_a": det((8, 2), 3).astype(np.float32), f"{Q}.hada_w2_b": det((2, 8), 4).astype(np.float32)},
          valid=True)
    plain("lokr", "LoKr on q_proj (8 = 2 x 4: lokr_w1 [2, 2], lokr_w2 [4, 4])",
          {"peft_type": "LOKR", "r": 2, "alpha": 4, "target_modules": ["q_proj"]},
          {f"{Q}.lokr_w1": det((2, 2), 1).astype(np.float32), f"{Q}.lokr_w2": det((4, 4), 2).astype(np.float32)},
          valid=True)
    decoder = {"dtype": "float32", "modules": {}, "decoder": DECODER}
    prefix_cfg = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "token_dim": 8,
                  "num_attention_heads": 2, "num_layers": 2, "num_transformer_submodules": 1}
    plain("prefix", "prefix tuning: the single un-prefixed key prompt_embeddings [nvt, layers * 2 * token_dim]",
          prefix_cfg, {"prompt_embeddings": det((3, 32), 1).astype(np.float32)}, valid=True, model=decoder)
    plain("prompt", "prompt tuning: prompt_embeddings [nvt, token_dim]",
          {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "token_dim": 8,
           "num_transformer_submodules": 1, "num_attention_heads": 2, "num_layers": 2},
          {"prompt_embeddings": det((3, 8), 1).astype(np.float32)}, valid=True, model=decoder)
    plain("newer-minor-version", "written for spec 1.9 with a field this reader does not know: loads with the "
          "warning of SPEC 2.3 (fields added since are not acted upon); the unknown field is kept and ignored (a "
          "warning naming it is allowed, not required: SPEC 2.5 asks for one in a strict mode)",
          LORA_CFG | {"adapterspec_version": "1.9", "future_option": True},
          lora_tensors(), {"format": "pt", "adapterspec_version": "1.9"}, valid=True,
          warnings_=[{"category": "AdapterSpecWarning"}])
    path = folder("multi-manifest", "two adapters with a manifest: 'default' in the root, 'fr' in fr/", valid=True,
                  multi=True)
    fresh_id = adapterspec.folder._new_save_id
    adapterspec.folder._new_save_id = lambda: "0123456789abcdef" * 2  # the same bytes each run (SPEC 3.4 save_id)
    try:
        adapterspec.write_adapters(path, {"default": (LORA_CFG, lora_tensors()),
                                          "fr": (LORA_CFG | {"r": 4, "lora_alpha": 8}, lora_tensors(4))})
    finally:
        adapterspec.folder._new_save_id = fresh_id
    canonical_metadata(path / "adapter_model.safetensors")
    canonical_metadata(path / "fr" / "adapter_model.safetensors")
    path = folder("multi-peft-layout", "two adapters in PEFT's layout (no manifest): the root and a subfolder",
                  valid=True, multi=True, tags=("peft",))
    write_config(path, LORA_CFG)
    np_save(path / "adapter_model.safetensors", lora_tensors())
    write_config(path / "de", LORA_CFG)
    np_save(path / "de" / "adapter_model.safetensors", lora_tensors())

    # -- folders that must be refused ----------------------------------------------------------------------
    t = lora_tensors()
    del t[f"{Q}.lora_B.weight"]
    plain("missing-tensor", "q_proj has lora_A but no lora_B", LORA_CFG, t, valid=False,
          error="MissingTensorError", key=f"{Q}.lora_B.weight")
    t = {k: v for k, v in lora_tensors().items() if not k.startswith(V)}
    plain("missing-module", "the config targets v_proj, which the model has, but the file holds no tensor for it",
          LORA_CFG, t, valid=False, error="MissingTensorError", key=[f"{V}.lora_A.weight", f"{V}.lora_B.weight"])
    plain("unexpected-tensor-untargeted", "a LoRA pair for k_proj, which target_modules does not name", LORA_CFG,
          lora_tensors() | {f"{K}.lora_A.weight": det((2, 8), 9).astype(np.float32),
                            f"{K}.lora_B.weight": det((4, 2), 10).astype(np.float32)},
          valid=False, error="UnexpectedTensorError", key=[f"{K}.lora_A.weight", f"{K}.lora_B.weight"])
    plain("unexpected-tensor-name", "a parameter name LoRA does not have (lora_C.weight)", LORA_CFG,
          lora_tensors() | {f"{Q}.lora_C.weight": det((2, 2), 9).astype(np.float32)},
          valid=False, error="UnexpectedTensorError", key=f"{Q}.lora_C.weight")
    plain("key-without-prefix", "keys without the base_model.model. prefix (PEFT loads this silently and keeps "
          "its random init)", LORA_CFG, {k.removeprefix("base_model.model."): v for k, v in lora_tensors().items()},
          valid=False, error="UnexpectedTensorError", key=sorted(k.removeprefix("base_model.model.") for k in lora_tensors()))
    t = lora_tensors()
    t[f"{V}.lora_A.weight"], t[f"{V}.lora_B.weight"] = det((3, 8), 3).astype(np.float32), det((4, 3), 4).astype(np.float32)
    plain("rank-disagrees-with-r", "v_proj's tensors have rank 3, the config's r is 2", LORA_CFG, t, valid=False,
          error="ShapeMismatchError", key=[f"{V}.lora_A.weight", f"{V}.lora_B.weight"])
    t = lora_tensors()
    t[f"{V}.lora_B.weight"] = det((2, 4), 4).astype(np.float32)
    plain("lora-b-transposed", "v_proj's lora_B is stored [r, out] instead of [out, r]", LORA_CFG, t, valid=False,
          error="ShapeMismatchError", key=f"{V}.lora_B.weight")
    t = lora_tensors()
    t[f"{Q}.lora_A.weight"] = det((2, 12), 1).astype(np.float32)
    plain("shape-disagrees-with-model", "q_proj's lora_A is [2, 12] but the model's q_proj has 8 input features "
          "(the file is consistent with itself; only the model can tell)", LORA_CFG, t, valid=False,
          error="ShapeMismatchError", key=f"{Q}.lora_A.weight")
    t = lora_tensors()
    t[f"{Q}.lora_A.weight"] = (det((2, 8), 1) * 100).astype(np.int32)
    plain("dtype-int32", "q_proj's lora_A is stored as I32; adapter tensors are F64, F32, F16 or BF16", LORA_CFG, t,
          valid=False, error="DTypeMismatchError", key=f"{Q}.lora_A.weight")
    plain("major-version-2", "adapter_config.json says adapterspec_version 2.0: a newer major version must be "
          "refused", LORA_CFG | {"adapterspec_version": "2.0"}, lora_tensors(), valid=False, error="VersionError",
          pointer="/adapterspec_version")
    plain("metadata-major-version-2", "the safetensors metadata says adapterspec_version 2.0", LORA_CFG,
          lora_tensors(), {"format": "pt", "adapterspec_version": "2.0"}, valid=False, error="VersionError")
    path = plain("truncated-data", "adapter_model.safetensors cut short inside the tensor data", LORA_CFG,
                 lora_tensors(), valid=False, error="FileFormatError")
    blob = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(blob[:-10])
    path = plain("truncated-header", "adapter_model.safetensors cut short inside its JSON header", LORA_CFG,
                 lora_tensors(), valid=False, error="FileFormatError")
    (path / "adapter_model.safetensors").write_bytes(blob[:40])
    path = folder("sha256-mismatch", "a byte of tensor data changed after writing: the sha256 in the metadata no "
                  "longer matches (checked with verify)", valid=False, error="IntegrityError",
                  options={"verify": True})
    adapterspec.write_adapter(path, LORA_CFG, lora_tensors())
    canonical_metadata(path / "adapter_model.safetensors")
    blob = bytearray((path / "adapter_model.safetensors").read_bytes())
    blob[-1] ^= 0x01
    (path / "adapter_model.safetensors").write_bytes(bytes(blob))
    path = folder("pickle-only", "only adapter_model.bin (a pickle) and no safetensors file: refused unless the "
                  "caller opts in", valid=False, error="UnsafeFileError")
    write_config(path, LORA_CFG)
    torch.save({k: torch.from_numpy(v) for k, v in lora_tensors().items()}, path / "adapter_model.bin")
    for id_, name, entry in (("manifest-name-dotdot", "../evil", "../evil"),
                             ("manifest-path-escapes", "evil", "../outside")):
        path = folder(id_, f"a manifest whose adapter {name!r} has path {entry!r}, leaving the folder",
                      valid=False, error="UnsafeFileError", multi=True)
        write_config(path, LORA_CFG)
        np_save(path / "adapter_model.safetensors", lora_tensors())
        manifest = {"adapterspec_version": "1.0", "adapters": {"default": {"path": "."}, name: {"path": entry}}}
        write_json(path / "adapterspec.json", manifest)
    plain("config-invalid-json", "adapter_config.json is not JSON", '{"peft_type": "LORA", "r": 2,\n',
          lora_tensors(), valid=False, error="FileFormatError")
    plain("config-nan", "adapter_config.json holds NaN, which JSON does not allow",
          '{"peft_type": "LORA", "r": 2, "lora_alpha": NaN, "target_modules": ["q_proj", "v_proj"]}\n',
          lora_tensors(), valid=False, error="FileFormatError")
    plain("config-r-zero", "the config's r is 0", LORA_CFG | {"r": 0}, lora_tensors(), valid=False,
          error="ConfigError", pointer="/r")
    plain("target-not-in-model", "the config targets o_proj and the file holds its tensors, but the model has no "
          "o_proj", LORA_CFG | {"target_modules": ["q_proj", "o_proj"]},
          {f"{Q}.lora_A.weight": det((2, 8), 1).astype(np.float32), f"{Q}.lora_B.weight": det((8, 2), 2).astype(np.float32),
           "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": det((2, 8), 3).astype(np.float32),
           "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight": det((8, 2), 4).astype(np.float32)},
          valid=False, error="TargetNotFoundError")
    plain("lora-bias-without-flag", "a lora_B.bias tensor while the config does not set lora_bias", LORA_CFG,
          lora_tensors() | {f"{Q}.lora_B.bias": det((8,), 7).astype(np.float32)}, valid=False,
          error="UnexpectedTensorError", key=f"{Q}.lora_B.bias")
    plain("dora-without-magnitude", "use_dora is set but v_proj has no lora_magnitude_vector",
          LORA_CFG | {"use_dora": True}, lora_tensors() | {f"{Q}.lora_magnitude_vector": det((8,), 5, 0.2, 1.0).astype(np.float32)},
          valid=False, error="MissingTensorError", key=f"{V}.lora_magnitude_vector")
    plain("ia3-wrong-orientation", "q_proj (not feed-forward) has ia3_l [1, 8] instead of [8, 1]",
          {"peft_type": "IA3", "target_modules": ["q_proj"], "feedforward_modules": []},
          {f"{Q}.ia3_l": det((1, 8), 1, 0.3, 1.0).astype(np.float32)}, valid=False, error="ShapeMismatchError",
          key=f"{Q}.ia3_l")
    plain("prompt-shape-disagrees", "prompt_embeddings [4, 8] while the config says num_virtual_tokens 3",
          {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "token_dim": 8,
           "num_transformer_submodules": 1, "num_attention_heads": 2, "num_layers": 2},
          {"prompt_embeddings": det((4, 8), 1).astype(np.float32)}, valid=False, error="ShapeMismatchError",
          key="prompt_embeddings", model=decoder)
    plain("no-tensors", "an adapter file that holds no tensor at all", LORA_CFG, {}, valid=False,
          error="MissingTensorError")

    # -- spec 1.1: methods recognised but not portable, and the config forms PEFT accepts -----------------
    plain("fourierft-not-portable", "FourierFT: a method the spec recognises but does not define; a reader refuses "
          "it with UnsupportedError naming /peft_type (never a ConfigError: PEFT loads it)",
          {"peft_type": "FOURIERFT", "n_frequency": 4, "target_modules": ["q_proj", "v_proj"]},
          {f"{Q}.fourierft_spectrum": det((4,), 1).astype(np.float32),
           f"{V}.fourierft_spectrum": det((4,), 3).astype(np.float32)},
          valid=False, error="UnsupportedError", pointer="/peft_type")
    decoder_layers = [f"base_model.model.model.layers.{i}" for i in range(2)]
    plain("lora-target-modules-null", "target_modules null: PEFT's default for the model type (llama: q_proj, "
          "v_proj; spec/v1/target_modules.json), resolved at load", LORA_CFG | {"target_modules": None},
          {f"{layer}.self_attn.{m}.lora_{ab}.weight": det(shape, 10 * i + j).astype(np.float32)
           for i, layer in enumerate(decoder_layers) for j, (m, ab, shape) in enumerate(
               [("q_proj", "A", (2, 8)), ("q_proj", "B", (8, 2)), ("v_proj", "A", (2, 8)), ("v_proj", "B", (8, 2))])},
          valid=True, model=decoder)
    plain("ia3-targets-null", "IA3 with target_modules and feedforward_modules null: PEFT's defaults for llama "
          "(k_proj, v_proj, down_proj; down_proj feed-forward)",
          {"peft_type": "IA3", "target_modules": None, "feedforward_modules": None},
          {k: v for i, layer in enumerate(decoder_layers) for k, v in (
              (f"{layer}.self_attn.k_proj.ia3_l", det((8, 1), 3 * i, 0.3, 1.0).astype(np.float32)),
              (f"{layer}.self_attn.v_proj.ia3_l", det((8, 1), 3 * i + 1, 0.3, 1.0).astype(np.float32)),
              (f"{layer}.mlp.down_proj.ia3_l", det((1, 16), 3 * i + 2, 0.3, 1.0).astype(np.float32)))},
          valid=True, model=decoder)
    plain("prefix-sizes-from-model", "prefix tuning without token_dim, num_layers, num_attention_heads: read from "
          "the model (as PEFT does)", {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3},
          {"prompt_embeddings": det((3, 32), 1).astype(np.float32)}, valid=True, model=decoder)
    plain("prefix-sizes-from-model-disagree", "prefix tuning without sizes, whose prompt_embeddings is for 3 "
          "layers while the model has 2", {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM",
                                          "num_virtual_tokens": 3},
          {"prompt_embeddings": det((3, 48), 1).astype(np.float32)}, valid=False, error="ShapeMismatchError",
          key="prompt_embeddings", model=decoder)
    plain("lora-duplicate-targets", "a target_modules entry listed twice (PEFT uses a set): loads like the list "
          "without the duplicate, with a warning naming it", LORA_CFG | {"target_modules": ["q_proj", "v_proj", "q_proj"]},
          lora_tensors(), valid=True, warnings_=[{"category": "AdapterSpecWarning", "pointer": "/target_modules/2"}])
    plain("lora-target-entry-matching-nothing", "SPEC 4.3: a target_modules entry that selects no module "
          "(query_key_value, from a config written for several architectures) is ignored, as PEFT does: q_proj and "
          "v_proj are adapted", LORA_CFG | {"target_modules": ["q_proj", "v_proj", "query_key_value"]},
          lora_tensors(), valid=True)
    plain("metadata-version-differs", "the config says adapterspec_version 1.0, the safetensors metadata 1.1: "
          "loads (the config's version governs) with a warning", LORA_CFG | {"adapterspec_version": "1.0"},
          lora_tensors(), {"format": "pt", "adapterspec_version": "1.1"}, valid=True,
          warnings_=[{"category": "AdapterSpecWarning", "pointer": "/adapterspec_version"}])
    _oft_folders()
    _hra_folders()
    _embedding_names_folders()
    _prompts_folders()
    _adalora_folders()
    _vera_folders()
    _road_folders()
    _miss_folders()
    _vblora_folders()
    _c3a_folders()
    _gralora_folders()
    _delora_folders()
    _beft_folders()
    _velora_folders()
    _init_folders()
    _manifest_examples()
    _mutation_folder_cases()
    plain("lora-spec-1.0-written", "a folder written by a spec 1.0 writer: adapterspec_version in the config (and "
          "the metadata); still read", LORA_CFG | {"adapterspec_version": "1.0"}, lora_tensors(),
          {"format": "pt", "adapterspec_version": "1.0"}, valid=True)
    _clarification_folders()
    _mutation_folder_cases_1_11()
    _repeated_name_folders()
    _set_save_cases_1_13()
    return FOLDERS


def _rewrite_header(path: Path, change: Any) -> None:
    """Rewrite a safetensors file's JSON header (and data) with ``change(header, data) -> (header, data)``."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header, data = change(json.loads(blob[8 : 8 + n]), blob[8 + n :])
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _shift_data(header: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
    """8 unused bytes before the first tensor: a gap in the data section."""
    for key, info in header.items():
        if key != "__metadata__":
            info["data_offsets"] = [info["data_offsets"][0] + 8, info["data_offsets"][1] + 8]
    return header, b"\0" * 8 + data


def _as_dtype(key: str, dtype: str, shape: list[int]) -> Any:
    def change(header: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        header[key] |= {"dtype": dtype, "shape": shape}
        return header, data
    return change


def _clarification_folders() -> None:
    """SPEC 1.1 clarifications (issue #18): one folder per rule a second implementation could read two ways."""
    plain("metadata-major-version-2-config-1.0", "SPEC 2.3: the config says 1.0, the safetensors metadata 2.0: each "
          "recorded version must be readable, so a newer major anywhere is refused (the config governs only which "
          "readable version applies)", LORA_CFG | {"adapterspec_version": "1.0"}, lora_tensors(),
          {"format": "pt", "adapterspec_version": "2.0"}, valid=False, error="VersionError")
    plain("metadata-version-malformed", "SPEC 9: the safetensors metadata's adapterspec_version 'v1' is not "
          "MAJOR.MINOR: VersionError, as in the config", LORA_CFG, lora_tensors(),
          {"format": "pt", "adapterspec_version": "v1"}, valid=False, error="VersionError")
    path = plain("data-trailing-bytes", "SPEC 10 check 6: 8 bytes after the last tensor; the tensors must cover the "
                 "data section exactly", LORA_CFG, lora_tensors(), valid=False, error="FileFormatError")
    _rewrite_header(path / "adapter_model.safetensors", lambda h, d: (h, d + b"\0" * 8))
    path = plain("data-gap", "SPEC 10 check 6: 8 unused bytes before the first tensor (a gap in the data section)",
                 LORA_CFG, lora_tensors(), valid=False, error="FileFormatError")
    _rewrite_header(path / "adapter_model.safetensors", _shift_data)
    path = plain("dtype-unknown-name", "SPEC 7.1: a dtype name safetensors does not define ('Q4'): the file is not "
                 "a safetensors file (FileFormatError, not DTypeMismatchError)", LORA_CFG, lora_tensors(),
                 valid=False, error="FileFormatError")
    _rewrite_header(path / "adapter_model.safetensors", _as_dtype(f"{Q}.lora_A.weight", "Q4", [2, 8]))
    path = plain("dtype-f8", "SPEC 7.1: F8_E4M3, a safetensors dtype the spec does not allow for an adapter tensor",
                 LORA_CFG, lora_tensors(), valid=False, error="DTypeMismatchError", key=f"{Q}.lora_A.weight")
    _rewrite_header(path / "adapter_model.safetensors", _as_dtype(f"{Q}.lora_A.weight", "F8_E4M3", [2, 32]))
    plain("config-duplicate-key", "SPEC 3.1: adapter_config.json names the member 'r' twice (Python's json keeps "
          "the last; the spec refuses)", '{"peft_type": "LORA", "r": 2, "r": 2, "lora_alpha": 4, '
          '"target_modules": ["q_proj", "v_proj"]}\n', lora_tensors(), valid=False, error="FileFormatError")
    t = lora_tensors()
    t[f"{Q}.lora_A.weight"], t[f"{Q}.lora_B.weight"] = det((3, 8), 1).astype(np.float32), det((8, 3), 2).astype(np.float32)
    plain("rank-pattern-document-order", "SPEC 4.4: two rank_pattern keys match q_proj; the first in document "
          "order (self_attn.q_proj: 3) wins, not the first in sorted order (q_proj: 5)",
          '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], '
          '"rank_pattern": {"self_attn.q_proj": 3, "q_proj": 5}}\n', t, valid=True)
    no_bias = {"dtype": "float32", "modules": {"layer": linear(8, 4, bias=False)}}
    one = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["layer"]}
    plain("lora-bias-base-without-bias", "SPEC 8.1: lora_bias on a Linear without a bias loads (the update adds "
          "s * b_B); only merging is impossible", one | {"lora_bias": True},
          {"base_model.model.layer.lora_A.weight": det((2, 8), 1).astype(np.float32),
           "base_model.model.layer.lora_B.weight": det((4, 2), 2).astype(np.float32),
           "base_model.model.layer.lora_B.bias": det((4,), 3).astype(np.float32)}, valid=True, model=no_bias)
    emb = {"dtype": "float32", "modules": {"emb": embedding(10, 4)}}
    plain("lora-bias-embedding", "SPEC 5.2: lora_bias on an Embedding, which PEFT refuses: UnsupportedError "
          "naming the module", one | {"target_modules": ["emb"], "lora_bias": True},
          {"base_model.model.emb.lora_embedding_A": det((2, 10), 1).astype(np.float32),
           "base_model.model.emb.lora_embedding_B": det((4, 2), 2).astype(np.float32)},
          valid=False, error="UnsupportedError", key="emb", model=emb)
    plain("ia3-torch-conv1d", "SPEC 6.3: IA3 has no torch Conv1d form (PEFT refuses it): UnsupportedError naming "
          "the module", {"peft_type": "IA3", "target_modules": ["conv"], "feedforward_modules": []},
          {"base_model.model.conv.ia3_l": det((1, 4, 1), 1, 0.3, 1.0).astype(np.float32)}, valid=False,
          error="UnsupportedError", key="conv", model={"dtype": "float32", "modules": {"conv": conv1d(3, 4, 3)}})
    plain("ia3-one-output-feature", "SPEC 6.3: IA3 on a Linear with one output feature: ia3_l [1, 1] is the "
          "[out, 1] form", {"peft_type": "IA3", "target_modules": ["layer"], "feedforward_modules": []},
          {"base_model.model.layer.ia3_l": det((1, 1), 1, 0.3, 1.0).astype(np.float32)}, valid=True,
          model={"dtype": "float32", "modules": {"layer": linear(4, 1)}})
    conv = {"dtype": "float32", "modules": {"conv": conv1d(4, 6, 3)}}
    plain("lokr-form-disagrees", "SPEC 6.5: r = 2 gives a full lokr_w2 [3, 2, 3] for this Conv1d (PEFT's choice); "
          "the file holds lokr_w2_a/lokr_w2_b instead", {"peft_type": "LOKR", "r": 2, "alpha": 4,
                                                         "target_modules": ["conv"]},
          {"base_model.model.conv.lokr_w1": det((2, 2), 1).astype(np.float32),
           "base_model.model.conv.lokr_w2_a": det((3, 2), 2).astype(np.float32),
           "base_model.model.conv.lokr_w2_b": det((2, 6), 3).astype(np.float32)}, valid=False,
          error="UnexpectedTensorError", key=["base_model.model.conv.lokr_w2_a", "base_model.model.conv.lokr_w2_b"],
          model=conv)
    plain("loha-effective-without-flag", "SPEC 6.4: the effective-conv form (hada_t1/hada_t2) while "
          "use_effective_conv2d is false", {"peft_type": "LOHA", "r": 2, "alpha": 4, "target_modules": ["conv"]},
          {f"base_model.model.conv.{n}": det(shape, i).astype(np.float32) for i, (n, shape) in enumerate(
              [("hada_w1_a", (2, 4)), ("hada_w1_b", (2, 3)), ("hada_w2_a", (2, 4)), ("hada_w2_b", (2, 3)),
               ("hada_t1", (2, 2, 3, 1)), ("hada_t2", (2, 2, 3, 1))])}, valid=False, error="UnexpectedTensorError",
          model={"dtype": "float32", "modules": {"conv": conv1d(3, 4, 3)}})
    vocab = {"dtype": "float32", "modules": {"model.embed_tokens": embedding(10, 8),
                                             "model.layers.0.self_attn.q_proj": linear(8, 8, bias=False)}}
    lora_q = {f"{Q}.lora_A.weight": det((2, 8), 1).astype(np.float32), f"{Q}.lora_B.weight": det((8, 2), 2).astype(np.float32)}
    plain("embedding-saved-whole", "SPEC 5.3/5.4: base_model.model.model.embed_tokens.weight (PEFT's "
          "save_embedding_layers: the layer's name is embed_tokens or lm_head) is accounted for and replaces the "
          "embedding", LORA_CFG | {"target_modules": ["q_proj"]},
          lora_q | {"base_model.model.model.embed_tokens.weight": det((10, 8), 3).astype(np.float32)}, valid=True,
          model=vocab)
    everything = {f"{Q}.lora_A.weight": (2, 8), f"{Q}.lora_B.weight": (8, 2), f"{K}.lora_A.weight": (2, 8),
                  f"{K}.lora_B.weight": (4, 2), f"{V}.lora_A.weight": (2, 8), f"{V}.lora_B.weight": (4, 2),
                  f"{DOWN}.lora_A.weight": (2, 16), f"{DOWN}.lora_B.weight": (8, 2)}
    plain("lora-all-linear", "SPEC 4.3: target_modules 'all-linear' is every Linear / GPT-2 Conv1D module but the "
          "output layer of a transformers model; a model description has none: all four modules are adapted",
          LORA_CFG | {"target_modules": "all-linear"},
          {k: det(shape, i).astype(np.float32) for i, (k, shape) in enumerate(everything.items())}, valid=True)
    plain("lora-all-linear-missing", "SPEC 4.3: target_modules 'all-linear' (not a regular expression) selects k_proj "
          "and down_proj too, which have no tensors", LORA_CFG | {"target_modules": "all-linear"}, lora_tensors(),
          valid=False, error="MissingTensorError", key=[f"{K}.lora_A.weight", f"{K}.lora_B.weight",
                                                        f"{DOWN}.lora_A.weight", f"{DOWN}.lora_B.weight"])
    plain("trainable-tokens-array", "SPEC 4.1.2: an array trainable_token_indices names the input embedding; a "
          "model without get_input_embeddings (this description) uses PEFT's fallback name embed_tokens",
          LORA_CFG | {"target_modules": ["q_proj"], "trainable_token_indices": [1, 3]},
          lora_q | {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta":
                    det((2, 8), 3).astype(np.float32)}, valid=True, model=vocab)
    scored = {"dtype": "float32", "modules": {**ATTN["modules"], "model.xscore": linear(8, 2, bias=False)}}
    plain("modules-to-save-plain-suffix", "SPEC 4.3: modules_to_save entry 'score' saves model.xscore whole (a plain "
          "string suffix, not a '.'-aligned name), so its weight is accounted for", LORA_CFG | {"modules_to_save": ["score"]},
          lora_tensors() | {"base_model.model.model.xscore.weight": det((2, 8), 5).astype(np.float32)}, valid=True,
          model=scored)
    headed = {"dtype": "float32", "modules": {**ATTN["modules"], "score": linear(8, 2, bias=False)}}
    for task in ("SEQ_CLS", "CAUSAL_LM"):
        plain(f"modules-to-save-task-head-{task.lower().replace('_', '-')}",
              f"SPEC 4.3: task_type {task} with a null modules_to_save and the head base_model.model.score.weight in "
              "the file: " + ("PEFT's task class adds classifier and score at every load, so the head is saved whole"
                              if task == "SEQ_CLS" else "no task head, so the key is not accounted for"),
              LORA_CFG | {"task_type": task, "modules_to_save": None},
              lora_tensors() | {"base_model.model.score.weight": det((2, 8), 5).astype(np.float32)},
              valid=task == "SEQ_CLS", model=headed,
              **({} if task == "SEQ_CLS" else {"error": "UnexpectedTensorError", "key": "base_model.model.score.weight"}))


def _embedding_names_folders() -> None:
    """Embeddings saved whole under transformers' names (SPEC.md 5.3, 5.4 step 4): a model description names no
    input/output embedding, so the rule without a model applies (the last name of the module is one of
    transformers' embedding names)."""
    gpt2 = {"dtype": "float32", "modules": {"transformer.wte": embedding(10, 8), "lm_head": linear(8, 10, bias=False),
                                            "model.layers.0.self_attn.q_proj": linear(8, 8, bias=False)}}
    lora_q = {f"{Q}.lora_A.weight": det((2, 8), 1).astype(np.float32), f"{Q}.lora_B.weight": det((8, 2), 2).astype(np.float32)}
    plain("embedding-saved-whole-gpt2", "SPEC 5.3/5.4: GPT-2's input and output embeddings saved whole under the "
          "model's names (base_model.model.transformer.wte.weight, lm_head.weight; PEFT's save_embedding_layers) "
          "are accounted for and replace the model's", LORA_CFG | {"target_modules": ["q_proj"]},
          lora_q | {"base_model.model.transformer.wte.weight": det((10, 8), 3).astype(np.float32),
                    "base_model.model.lm_head.weight": det((10, 8), 4).astype(np.float32)}, valid=True, model=gpt2)
    other = {"dtype": "float32", "modules": {"model.proj": linear(8, 8, bias=False),
                                             "model.layers.0.self_attn.q_proj": linear(8, 8, bias=False)}}
    plain("embedding-saved-whole-unlisted", "SPEC 5.4 step 4: base_model.model.model.proj.weight is no method "
          "tensor, not in modules_to_save, and model.proj is no embedding (not the model's, nor named as "
          "transformers names embeddings): UnexpectedTensorError", LORA_CFG | {"target_modules": ["q_proj"]},
          lora_q | {"base_model.model.model.proj.weight": det((8, 8), 3).astype(np.float32)}, valid=False,
          error="UnexpectedTensorError", key="base_model.model.model.proj.weight", model=other)


def _hra_folders() -> None:
    """HRA (SPEC.md 17.3): a valid folder, and what a reader refuses before any model is involved."""
    hra = {"peft_type": "HRA", "r": 2, "target_modules": ["q_proj", "v_proj"]}
    tensors = {f"{Q}.hra_u": det((8, 2), 1).astype(np.float32), f"{V}.hra_u": det((8, 2), 3).astype(np.float32)}
    plain("hra-valid", "HRA: hra_u [in_features, r] per adapted module", hra, tensors, valid=True)
    plain("hra-bias", "HRA with bias 'hra_only' (trained base biases) is refused with UnsupportedError naming /bias",
          hra | {"bias": "hra_only"}, tensors, valid=False, error="UnsupportedError", pointer="/bias")
    plain("hra-rank-mismatch", "hra_u's second axis is the config's r", hra | {"r": 3}, tensors, valid=False,
          error="ShapeMismatchError", key=f"{Q}.hra_u")
    plain("hra-transposed", "hra_u is [in_features, r]: a transposed one ([r, in]) does not have r columns",
          hra, {f"{Q}.hra_u": tensors[f"{Q}.hra_u"], f"{V}.hra_u": np.ascontiguousarray(tensors[f"{V}.hra_u"].T)},
          valid=False, error="ShapeMismatchError", key=f"{V}.hra_u")
    plain("hra-null-booleans", "SPEC 4.1: HRA's apply_GS and init_weights may be null, read as false (PEFT's truth "
          "tests)", hra | {"apply_GS": None, "init_weights": None}, tensors, valid=True)
    plain("hra-gs-rank-above-features", "SPEC 17.3: apply_GS with r 9 above q_proj's 8 input features: Gram-Schmidt "
          "normalises a column that is zero up to rounding (PEFT's output is rounding noise): UnsupportedError naming "
          "/r and the module", hra | {"r": 9, "apply_GS": True, "target_modules": ["q_proj"]},
          {f"{Q}.hra_u": det((8, 9), 5).astype(np.float32)}, valid=False, error="UnsupportedError",
          key="model.layers.0.self_attn.q_proj", pointer="/r")


def _oft_folders() -> None:
    """OFT/BOFT variants a reader refuses before any model is involved (SPEC.md 15.6, 15.7)."""
    oft = {"peft_type": "OFT", "r": 0, "oft_block_size": 4, "target_modules": ["q_proj"]}
    plain("oft-coft", "constrained OFT (coft: true) is refused with UnsupportedError naming /coft",
          oft | {"coft": True}, {f"{Q}.oft_R.weight": det((2, 6), 1).astype(np.float32)}, valid=False, error="UnsupportedError",
          pointer="/coft")
    plain("boft-butterfly-factors", "BOFT with boft_n_butterfly_factor 2 is refused with UnsupportedError naming "
          "the field", {"peft_type": "BOFT", "boft_block_size": 4, "boft_n_butterfly_factor": 2,
                        "target_modules": ["q_proj"]},
          {f"{Q}.boft_R": det((1, 2, 4, 4), 1).astype(np.float32), f"{Q}.boft_s": det((8, 1), 2, 0.3, 1.0).astype(
              np.float32)}, valid=False, error="UnsupportedError", pointer="/boft_n_butterfly_factor")
    plain("oft-not-a-triangle", "oft_R.weight's second axis must be b(b-1)/2 for a block size b", oft,
          {f"{Q}.oft_R.weight": det((2, 5), 1).astype(np.float32)}, valid=False, error="ShapeMismatchError",
          key=f"{Q}.oft_R.weight")


def _prompts_folders() -> None:
    """P-tuning folders, and the classifier head a prompt adapter saves (SPEC.md 15.8, 15.9)."""
    decoder = {"dtype": "float32", "modules": {}, "decoder": DECODER}
    plain("p-tuning", "P-tuning: the single tensor prompt_embeddings [nvt, token_dim] (the encoder's output; the "
          "encoder_* fields are informative)", P_TUNING_CFG | {"encoder_reparameterization_type": "LSTM"},
          {"prompt_embeddings": det((3, 8), 1).astype(np.float32)}, valid=True, model=decoder)
    plain("p-tuning-shape-disagrees", "P-tuning prompt_embeddings [3, 16] while the config says token_dim 8",
          P_TUNING_CFG, {"prompt_embeddings": det((3, 16), 1).astype(np.float32)}, valid=False,
          error="ShapeMismatchError", key="prompt_embeddings", model=decoder)
    prompt = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "token_dim": 8, "num_transformer_submodules": 1,
              "num_attention_heads": 2, "num_layers": 2, "modules_to_save": None}
    with_head = {"prompt_embeddings": det((3, 8), 1).astype(np.float32),
                 "base_model.score.weight": det((2, 8), 2).astype(np.float32)}
    plain("prompt-head-not-listed", "a prompt adapter's base_model.score.weight while neither modules_to_save nor "
          "the task (CAUSAL_LM) names score: UnexpectedTensorError", prompt | {"task_type": "CAUSAL_LM"}, with_head,
          valid=False, error="UnexpectedTensorError", key="base_model.score.weight", model=decoder)


def _adalora_folders() -> None:
    """AdaLoRA files a reader refuses before any model is involved (SPEC.md 15.4)."""
    ada = {"peft_type": "ADALORA", "init_r": 3, "lora_alpha": 4, "total_step": 10, "target_modules": ["q_proj"]}
    three = {f"{Q}.lora_A": det((3, 8), 1).astype(np.float32), f"{Q}.lora_B": det((8, 3), 2).astype(np.float32),
             f"{Q}.lora_E": det((3, 1), 3).astype(np.float32)}
    plain("adalora-rank-pattern-disagrees", "rank_pattern keeps 2 of init_r 3 ranks but the tensors hold 3",
          ada | {"rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [True, False, True]}}, three, valid=False,
          error="ShapeMismatchError", key=f"{Q}.lora_A")
    plain("adalora-bias", "AdaLoRA with trained biases (bias lora_only) is refused with UnsupportedError naming /bias",
          ada | {"bias": "lora_only"}, three, valid=False, error="UnsupportedError", pointer="/bias")


def _vera_folders() -> None:
    """VeRA files a reader refuses before any model is involved (SPEC.md 15.5)."""
    vera = {"peft_type": "VERA", "r": 2, "target_modules": ["q_proj"]}
    own = {f"{Q}.vera_lambda_b": det((8,), 1).astype(np.float32), f"{Q}.vera_lambda_d": det((2,), 2).astype(np.float32)}
    plain("vera-save-projection-false", "save_projection false: no projections in the file (PEFT regenerates them "
          "with torch's generator); refused with UnsupportedError naming /save_projection",
          vera | {"save_projection": False}, own, valid=False, error="UnsupportedError", pointer="/save_projection")
    plain("vera-projection-missing", "base_model.vera_B is missing", vera,
          own | {"base_model.vera_A": det((2, 8), 3).astype(np.float32)}, valid=False, error="MissingTensorError",
          key="base_model.vera_B")


def _road_folders() -> None:
    """RoAd files (SPEC.md 17.1): a valid one; refusals before any model is involved."""
    road = {"peft_type": "ROAD", "variant": "road_2", "group_size": 4, "target_modules": ["q_proj", "v_proj"]}
    own = {f"{Q}.road_theta": det((8,), 1).astype(np.float32), f"{Q}.road_alpha": det((8,), 2, 0.3, 1.0).astype(np.float32),
           f"{V}.road_theta": det((4,), 3).astype(np.float32), f"{V}.road_alpha": det((4,), 4, 0.3, 1.0).astype(np.float32)}
    plain("road", "RoAd road_2 on q_proj (8 outputs) and v_proj (4): road_theta / road_alpha [out] each", road, own,
          valid=True)
    plain("road-alpha-missing", "RoAd: road_alpha of q_proj is missing", road,
          {k: v for k, v in own.items() if k != f"{Q}.road_alpha"}, valid=False, error="MissingTensorError",
          key=f"{Q}.road_alpha")
    plain("road-length-not-a-group-multiple", "RoAd road_2 with group_size 4: a road_theta / road_alpha of 6 values "
          "is no layer's (out is a multiple of group_size)", road,
          own | {f"{Q}.road_theta": det((6,), 1).astype(np.float32), f"{Q}.road_alpha": det((6,), 2).astype(np.float32)},
          valid=False, error="ShapeMismatchError", key=[f"{Q}.road_theta", f"{Q}.road_alpha"])
    plain("road-variant-unknown", "RoAd: variant 'road_3' (PEFT's config refuses it): ConfigError naming /variant",
          road | {"variant": "road_3"}, own, valid=False, error="ConfigError", pointer="/variant")
    plain("road-group-size-not-dividing", "RoAd road_2 with group_size 8 on v_proj (4 outputs): PEFT refuses the "
          "layer; the refusal (check 18, UnsupportedError naming the module and /group_size) comes before the lengths "
          "are compared (v_proj's 8 values are a multiple of group_size, not its 4 outputs)", road | {"group_size": 8},
          own | {f"{V}.road_theta": det((8,), 3).astype(np.float32),
                 f"{V}.road_alpha": det((8,), 4, 0.3, 1.0).astype(np.float32)},
          valid=False, error="UnsupportedError", key="model.layers.0.self_attn.v_proj", pointer="/group_size")
    plain("road-init-weights-null", "SPEC 4.1: RoAd's init_weights may be null (PEFT tests 'is False': null acts as "
          "true; it only matters for a new adapter)", road | {"init_weights": None}, own, valid=True)
def _miss_folders() -> None:
    """MiSS files (SPEC.md 17.2): a valid one per mode, and what a reader refuses."""
    miss = {"peft_type": "MISS", "r": 4, "target_modules": ["q_proj", "v_proj"]}
    block = {f"{Q}.miss_block": det((4, 8), 1).astype(np.float32), f"{V}.miss_block": det((4, 4), 2).astype(np.float32)}
    plain("miss", "MiSS (block mode) on q_proj and v_proj: miss_block [r, out] (no .weight suffix)", miss, block,
          valid=True)
    bat = {f"{Q}.miss_block": det((2, 4, 4), 3, 0.1).astype(np.float32),
           f"{V}.miss_block": det((1, 4, 4), 4, 0.1).astype(np.float32)}
    plain("miss-bat", "MiSS init_weights 'bat': miss_block [out / r, r, r]", miss | {"init_weights": "bat"}, bat,
          valid=True)
    plain("miss-init-weights-null", "SPEC 4.1, 17.2: MiSS's init_weights may be null: block mode (PEFT compares it "
          "with 'bat' and 'mini')", miss | {"init_weights": None}, block, valid=True)
    plain("miss-bias", "MiSS with trained biases (bias all) is refused with UnsupportedError naming /bias",
          miss | {"bias": "all"}, block, valid=False, error="UnsupportedError", pointer="/bias")
    plain("miss-block-transposed", "a block-mode miss_block saved [out, r] instead of [r, out]", miss,
          block | {f"{Q}.miss_block": det((8, 4), 1).astype(np.float32)}, valid=False, error="ShapeMismatchError",
          key=f"{Q}.miss_block")
    plain("miss-mode-shape", "init_weights 'bat' with block-mode tensors: miss_block must be [out / r, r, r]",
          miss | {"init_weights": "bat"}, block, valid=False, error="ShapeMismatchError", key=[f"{Q}.miss_block",
                                                                                         f"{V}.miss_block"])
    # (a layer PEFT refuses -- bat's r not dividing its sizes -- is a refusal of the backend's, which a backend that
    # implements no MiSS reports as its own /peft_type: tests/torch/test_miss.py and tests/keras/test_miss.py check it)
def _gralora_folders() -> None:
    """GraLoRA files (SPEC.md 17.5): valid ones, and what a reader refuses (gralora_k not dividing a layer: check 18's
    refusal, before any shape is compared with the layer)."""
    gr = {"peft_type": "GRALORA", "r": 4, "gralora_k": 2, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    blocks = {f"{Q}.gralora_A": det((2, 4, 4), 1).astype(np.float32), f"{Q}.gralora_B": det((2, 4, 4), 2).astype(np.float32),
              f"{V}.gralora_A": det((2, 4, 4), 3).astype(np.float32), f"{V}.gralora_B": det((2, 4, 2), 4).astype(np.float32)}
    hybrid = {f"{Q}.gralora_A_general.weight": det((1, 8), 5).astype(np.float32),
              f"{Q}.gralora_B_general.weight": det((8, 1), 6).astype(np.float32),
              f"{V}.gralora_A_general.weight": det((1, 8), 7).astype(np.float32),
              f"{V}.gralora_B_general.weight": det((4, 1), 8).astype(np.float32)}
    plain("gralora", "GraLoRA on q_proj and v_proj: gralora_A [k, in/k, r], gralora_B [k, r, out/k] (no .weight "
          "suffix)", gr, blocks, valid=True)
    plain("gralora-hybrid", "GraLoRA with hybrid_r 1: gralora_A_general.weight [1, in] and gralora_B_general.weight "
          "[out, 1] beside the blocks", gr | {"hybrid_r": 1}, blocks | hybrid, valid=True)
    plain("gralora-bias", "GraLoRA with trained biases (bias gralora_only) is refused with UnsupportedError naming "
          "/bias", gr | {"bias": "gralora_only"}, blocks, valid=False, error="UnsupportedError", pointer="/bias")
    plain("gralora-rank-mismatch", "r 2 (alpha 4) in the config, blocks of rank 4 in the file: the rank axes "
          "disagree", gr | {"r": 2, "alpha": 4}, blocks, valid=False, error="ShapeMismatchError",
          key=[f"{Q}.gralora_A", f"{Q}.gralora_B", f"{V}.gralora_A", f"{V}.gralora_B"])
    plain("gralora-hybrid-missing", "hybrid_r 1 but the file holds only the blocks: MissingTensorError naming the "
          "hybrid pair", gr | {"hybrid_r": 1}, blocks, valid=False, error="MissingTensorError",
          key=[f"{Q}.gralora_A_general.weight", f"{Q}.gralora_B_general.weight", f"{V}.gralora_A_general.weight",
               f"{V}.gralora_B_general.weight"])
    plain("gralora-hybrid-unexpected", "hybrid_r 0 but the file holds a hybrid pair: UnexpectedTensorError",
          gr, blocks | hybrid, valid=False, error="UnexpectedTensorError",
          key=[f"{Q}.gralora_A_general.weight", f"{Q}.gralora_B_general.weight", f"{V}.gralora_A_general.weight",
               f"{V}.gralora_B_general.weight"])
    plain("gralora-r-not-divisible", "r 3 with gralora_k 2 (PEFT's GraloraConfig refuses it): ConfigError naming /r",
          gr | {"r": 3}, blocks, valid=False, error="ConfigError", pointer="/r")
    wide = {f"{Q}.gralora_A_general.weight": det((2, 8), 5).astype(np.float32),
            f"{Q}.gralora_B_general.weight": det((8, 2), 6).astype(np.float32),
            f"{V}.gralora_A_general.weight": det((2, 8), 7).astype(np.float32),
            f"{V}.gralora_B_general.weight": det((4, 2), 8).astype(np.float32)}
    plain("gralora-hybrid-rank-mismatch", "SPEC 17.5: hybrid_r 1 in the config, a hybrid pair of rank 2 in the file "
          "(the blocks are right): the pair's rank axes must be hybrid_r (check 10; PEFT's load_state_dict refuses "
          "the sizes)", gr | {"hybrid_r": 1}, blocks | wide, valid=False, error="ShapeMismatchError",
          key=sorted(wide))
    plain("gralora-exclude-modules-unknown", "SPEC 4.3/17.5: GraloraConfig has no exclude_modules; PEFT drops it "
          "(with a warning) and adapts v_proj too, so the file with both modules' blocks is valid",
          gr | {"exclude_modules": ["v_proj"]}, blocks, valid=True)
    uneven = {"dtype": "float32", "modules": {"model.layers.0.self_attn.q_proj": linear(6, 6, bias=False),
                                              "model.layers.0.self_attn.v_proj": linear(6, 4, bias=False)}}
    plain("gralora-k-not-dividing", "SPEC 17.5: gralora_k 3 divides q_proj's 6 -> 6 but not v_proj's 4 outputs (PEFT's "
          "layer refuses it): UnsupportedError naming v_proj and /gralora_k, check 18's refusal, before check 20 "
          "compares v_proj's blocks (shaped for 3 outputs) with the layer",
          {"peft_type": "GRALORA", "r": 3, "gralora_k": 3, "alpha": 6, "target_modules": ["q_proj", "v_proj"]},
          {f"{Q}.gralora_A": det((3, 2, 3), 1).astype(np.float32), f"{Q}.gralora_B": det((3, 3, 2), 2).astype(np.float32),
           f"{V}.gralora_A": det((3, 2, 3), 3).astype(np.float32), f"{V}.gralora_B": det((3, 3, 1), 4).astype(np.float32)},
          model=uneven, valid=False, error="UnsupportedError", key="model.layers.0.self_attn.v_proj",
          pointer="/gralora_k")


def _delora_folders() -> None:
    """DeLoRA (SPEC.md 17.6): a valid folder, and what a reader refuses before any model is involved."""
    de = {"peft_type": "DELORA", "r": 2, "target_modules": ["q_proj", "v_proj"]}
    tensors = {f"{Q}.delora_A": det((2, 8), 1).astype(np.float32), f"{Q}.delora_B": det((8, 2), 2).astype(np.float32),
               f"{Q}.delora_lambda": np.array([3.0], dtype=np.float32),
               f"{Q}.delora_w_norm": det((8,), 3, 0.3, 1.0).astype(np.float32),
               f"{V}.delora_A": det((2, 8), 4).astype(np.float32), f"{V}.delora_B": det((4, 2), 5).astype(np.float32),
               f"{V}.delora_lambda": np.array([2.0], dtype=np.float32),
               f"{V}.delora_w_norm": det((8,), 6, 0.3, 1.0).astype(np.float32)}
    plain("delora-valid", "DeLoRA: delora_A [r, in], delora_B [out, r], delora_lambda [1], delora_w_norm [in] (PEFT's "
          "saved buffer) per adapted module", de, tensors, valid=True)
    plain("delora-init-weights-null", "SPEC 4.1, 17.6: DeLoRA's init_weights may be null (PEFT tests 'is True')",
          de | {"init_weights": None}, tensors, valid=True)
    plain("delora-bias", "DeLoRA with bias 'delora_only' (trained base biases) is refused with UnsupportedError "
          "naming /bias", de | {"bias": "delora_only"}, tensors, valid=False, error="UnsupportedError", pointer="/bias")
    plain("delora-rank-pattern-zero", "a rank_pattern value of 0: PEFT's layers refuse it, UnsupportedError naming "
          "the entry", de | {"rank_pattern": {"v_proj": 0}}, tensors, valid=False, error="UnsupportedError",
          pointer="/rank_pattern/v_proj", key="model.layers.0.self_attn.v_proj")
    plain("delora-rank-pattern-zero-unused", "SPEC 17.6: a rank_pattern value of 0 no module takes loads (PEFT's "
          "update_layer refuses only a rank a layer uses; its config checks r alone)",
          de | {"rank_pattern": {"nothing": 0}}, tensors, valid=True)
    plain("delora-lambda-pattern-unreached-bad-key", "SPEC 4.2 rule 1, 17.6: lambda_pattern keys are tried in the "
          "file's order and compiled only when a module reaches them (PEFT's get_pattern_key): '(' after "
          "'q_proj|v_proj', which every module matches, loads", de | {"lambda_pattern": {"q_proj|v_proj": 3, "(": 1}},
          tensors, valid=True)
    plain("delora-lambda-pattern-reached-bad-key", "SPEC 4.2 rule 1, 17.6: a lambda_pattern key that does not compile, "
          "reached by q_proj ('v_proj' first matches only v_proj): PEFT's re.match raises there, UnsupportedError "
          "naming the module and the key", de | {"lambda_pattern": {"v_proj": 1, "(": 3}}, tensors, valid=False,
          error="UnsupportedError", pointer="/lambda_pattern/(", key="model.layers.0.self_attn.q_proj")
    plain("delora-rank-mismatch", "delora_A's first axis is the module's rank (r, or rank_pattern's)",
          de | {"rank_pattern": {"v_proj": 3}}, tensors, valid=False, error="ShapeMismatchError", key=f"{V}.delora_A")
    plain("delora-b-transposed", "delora_B is [out, r]: one saved [r, out] does not share delora_A's rank axis", de,
          tensors | {f"{V}.delora_B": np.ascontiguousarray(tensors[f"{V}.delora_B"].T)}, valid=False,
          error="ShapeMismatchError", key=f"{V}.delora_B")
    plain("delora-w-norm-missing", "delora_w_norm is saved (PEFT's persistent buffer): without it the forward is not "
          "determined (a reader may not recompute it from the base)",
          de, {k: v for k, v in tensors.items() if k != f"{Q}.delora_w_norm"}, valid=False,
          error="MissingTensorError", key=f"{Q}.delora_w_norm")
    plain("delora-w-norm-shape", "delora_w_norm is [in_features], delora_A's axis 1", de,
          tensors | {f"{Q}.delora_w_norm": det((4,), 3, 0.3, 1.0).astype(np.float32)}, valid=False,
          error="ShapeMismatchError", key=f"{Q}.delora_w_norm")
    plain("delora-lambda-shape", "delora_lambda is [1], one bound per module", de,
          tensors | {f"{Q}.delora_lambda": np.array([3.0, 1.0], dtype=np.float32)}, valid=False,
          error="ShapeMismatchError", key=f"{Q}.delora_lambda")


def _vblora_folders() -> None:
    """VB-LoRA files (SPEC.md 17.4): both saved forms load; a reader refuses the wrong form, the wrong index dtype
    and a missing bank (a vector_length not dividing a layer: tests/torch/test_vblora.py -- a backend without
    VB-LoRA refuses that folder for its method first)."""
    vb = {"peft_type": "VBLORA", "r": 2, "num_vectors": 5, "vector_length": 4, "topk": 2,
          "target_modules": ["q_proj", "v_proj"]}
    bank = {"base_model.vblora_vector_bank": det((5, 4), 9).astype(np.float32)}
    full = {f"{Q}.vblora_logits_A": det((2, 2, 5), 1).astype(np.float32),
            f"{Q}.vblora_logits_B": det((2, 2, 5), 2).astype(np.float32),
            f"{V}.vblora_logits_A": det((2, 2, 5), 3).astype(np.float32),
            f"{V}.vblora_logits_B": det((1, 2, 5), 4).astype(np.float32)}
    topk = {}
    for module, a_rows, b_rows in ((Q, 2, 2), (V, 2, 1)):
        for name, shape in (("A", (2, a_rows)), ("B", (b_rows, 2))):
            topk[f"{module}.vblora_logits_{name}_topk_indices"] = \
                ((np.arange(math.prod(shape))[:, None] + np.array([[0, 2]])) % 5).reshape(*shape, 2).astype(np.uint8)
            topk[f"{module}.vblora_logits_{name}_topk_weights"] = det((*shape, 1), 5, 0.1, 0.7).astype(np.float32)
    plain("vblora", "VB-LoRA with its logits: base_model.vblora_vector_bank [5, 4] once (role shared), "
          "vblora_logits_A [r, in/4, 5] and vblora_logits_B [out/4, r, 5] per module", vb, full | bank, valid=True)
    plain("vblora-topk", "VB-LoRA saved with save_only_topk_weights: U8 _topk_indices [..., 2] and _topk_weights "
          "[..., 1] per logits tensor (the one integer adapter tensor)", vb | {"save_only_topk_weights": True},
          topk | bank, valid=True)
    plain("vblora-topk-indices-i64", "save_only_topk_weights with the indices as I64: PEFT writes U8 for 5 vectors "
          "(a reader takes exactly that dtype, so a save gives the same bytes)", vb | {"save_only_topk_weights": True},
          topk | bank | {f"{Q}.vblora_logits_A_topk_indices": topk[f"{Q}.vblora_logits_A_topk_indices"].astype(np.int64)},
          valid=False, error="DTypeMismatchError", key=f"{Q}.vblora_logits_A_topk_indices")
    plain("vblora-other-form", "save_only_topk_weights true but the file holds the logits: UnexpectedTensorError "
          "naming a logits key", vb | {"save_only_topk_weights": True}, full | bank, valid=False,
          error="UnexpectedTensorError", key=sorted(full))
    plain("vblora-bank-missing", "base_model.vblora_vector_bank is missing", vb, full, valid=False,
          error="MissingTensorError", key="base_model.vblora_vector_bank")
    plain("vblora-bank-shape", "base_model.vblora_vector_bank saved [L, N] = [4, 5] instead of [num_vectors, "
          "vector_length] = [5, 4]", vb, full | {"base_model.vblora_vector_bank": det((4, 5), 9).astype(np.float32)},
          valid=False, error="ShapeMismatchError", key="base_model.vblora_vector_bank")
    weights = f"{Q}.vblora_logits_A_topk_weights"
    plain("vblora-topk-weights-f16", "save_only_topk_weights with a _topk_weights tensor in F16: the top-k weights are "
          "F32 only (PEFT's loader fails on others)", vb | {"save_only_topk_weights": True},
          topk | bank | {weights: topk[weights].astype(np.float16)}, valid=False, error="DTypeMismatchError",
          key=weights)
    plain("vblora-topk-tensors-full-form", "save_only_topk_weights false but the file holds the top-k tensors: "
          "UnexpectedTensorError naming a top-k key", vb, topk | bank, valid=False, error="UnexpectedTensorError",
          key=sorted(topk))
    # the index dtype at its first boundary: 256 vectors no longer fit U8 (PEFT: num_vectors < 2**8 -> uint8)
    vb256 = vb | {"num_vectors": 256, "save_only_topk_weights": True}
    bank256 = {"base_model.vblora_vector_bank": det((256, 4), 9).astype(np.float32)}
    topk256 = {k: (v.astype(np.int16) * 50 if k.endswith("_indices") else v) for k, v in topk.items()}
    plain("vblora-topk-256-i16", "save_only_topk_weights with num_vectors 256: the indices are I16 (256 is not "
          "below 2**8)", vb256, topk256 | bank256, valid=True)
    index = f"{Q}.vblora_logits_A_topk_indices"
    plain("vblora-topk-256-u8", "num_vectors 256 with U8 indices: PEFT writes I16 from 256 vectors on",
          vb256, topk256 | bank256 | {index: topk256[index].astype(np.uint8)}, valid=False,
          error="DTypeMismatchError", key=index)
    plain("vblora-topk-above-num-vectors", "topk 6 with num_vectors 5: the top-k over the bank is undefined (PEFT's "
          "forward fails)", vb | {"topk": 6}, full | bank, valid=False, error="UnsupportedError", pointer="/topk")
    plain("vblora-bias", "VB-LoRA with bias 'vblora_only' (trained base biases): refused naming the field",
          vb | {"bias": "vblora_only"}, full | bank, valid=False, error="UnsupportedError", pointer="/bias")
    past = f"{V}.vblora_logits_B_topk_indices"
    beyond = topk[past].copy()
    beyond[-1, -1, -1] = 5
    plain("vblora-topk-index-out-of-range", "save_only_topk_weights with a top-k index 5 of a bank of 5 vectors: "
          "TensorError naming the indices (PEFT's loader fails on it; a gather might clamp it silently)",
          vb | {"save_only_topk_weights": True}, topk | bank | {past: beyond},
          valid=False, error="TensorError", key=past)


def _velora_folders() -> None:
    """VeLoRA's state (SPEC.md 5.2): accepted, never used -- but only where PEFT would load it."""
    velora = LORA_CFG | {"velora_config": {"num_groups": 4}}
    state = {f"{Q}.lora_velora_embed": np.zeros(2, np.float32), f"{V}.lora_velora_embed": np.zeros(2, np.float32)}
    plain("lora-velora-state", "velora_config with PEFT's lora_velora_embed [ceil(8 / 4)] per module: valid (the "
          "tensors are kept, never used)", velora, lora_tensors() | state, valid=True)
    plain("lora-velora-state-shape", "lora_velora_embed must be [ceil(in_features / num_groups)] = [2] (PEFT's "
          "load_state_dict fails on [3])", velora, lora_tensors() | state | {f"{Q}.lora_velora_embed":
                                                                             np.zeros(3, np.float32)},
          valid=False, error="ShapeMismatchError", key=f"{Q}.lora_velora_embed")
    plain("lora-velora-state-without-config", "lora_velora_embed without velora_config", LORA_CFG,
          lora_tensors() | state, valid=False, error="UnexpectedTensorError", key=f"{Q}.lora_velora_embed")
    magnitude = {f"{Q}.lora_magnitude_vector": det((8,), 5).astype(np.float32) + 1,
                 f"{V}.lora_magnitude_vector": det((4,), 6).astype(np.float32) + 1}
    plain("lora-velora-with-dora", "velora_config with use_dora: PEFT has no such LoRA variant (it raises); "
          "refused with UnsupportedError naming /velora_config", velora | {"use_dora": True},
          lora_tensors() | state | magnitude, valid=False, error="UnsupportedError", pointer="/velora_config")


_SAFE_PATH = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$|^\.$")


def _init_folders() -> None:
    """SPEC 8.1: init_lora_weights values whose base no load can rebuild are refused; lora_ga's warns."""
    for init, why in (("pissa_niter_4", "a randomised SVD"), ("corda", "statistics of the training data"),
                      ("loftq", "a quantised residual")):
        plain(f"lora-init-{init.replace('_', '-')}", f"init_lora_weights {init!r}: the base it was trained against is "
              f"PEFT's residual from {why}, which no load can rebuild: UnsupportedError naming /init_lora_weights",
              LORA_CFG | {"init_lora_weights": init}, lora_tensors(), valid=False, error="UnsupportedError",
              pointer="/init_lora_weights")
    plain("lora-init-pissa-target-parameters", "init_lora_weights 'pissa' with target_parameters: PEFT decomposes each "
          "adapted parameter too, a residual v1 does not define: UnsupportedError naming /init_lora_weights",
          LORA_CFG | {"init_lora_weights": "pissa", "target_parameters": ["mlp.down_proj.weight"]}, lora_tensors(),
          valid=False, error="UnsupportedError", pointer="/init_lora_weights")
    plain("lora-init-mica-dora", "init_lora_weights 'mica' with use_dora: PEFT has no such LoRA variant (it raises): "
          "UnsupportedError naming /init_lora_weights", LORA_CFG | {"init_lora_weights": "mica", "use_dora": True},
          lora_tensors() | {f"{Q}.lora_magnitude_vector": np.ones(8, np.float32),
                            f"{V}.lora_magnitude_vector": np.ones(4, np.float32)},
          valid=False, error="UnsupportedError", pointer="/init_lora_weights")
    plain("lora-init-lora-ga", "init_lora_weights 'lora_ga': trained against a base changed with the training "
          "gradients, which the file does not hold; applied to the base as it is (as PEFT's load applies it), with a "
          "warning", LORA_CFG | {"init_lora_weights": "lora_ga"}, lora_tensors(), valid=True,
          warnings_=[{"category": "AdapterSpecWarning", "pointer": "/init_lora_weights"}])


def _manifest_examples() -> None:
    """spec/v1/examples/manifest as folder cases: the manifest, and a LoRA adapter at each path inside the folder."""
    for kind in ("valid", "invalid"):
        for example in sorted((SPEC_EXAMPLES / "manifest" / kind).glob("*.json")):
            data = json.loads(example.read_text("utf-8"))
            manifest = data if kind == "valid" else data["config"]
            id_ = "manifest-example-" + example.stem.replace("_", "-")
            root = V1 / "folders" / id_
            root.mkdir(parents=True)
            write_json(root / adapterspec.spec.MANIFEST_NAME, manifest)
            entries = manifest.get("adapters") if isinstance(manifest.get("adapters"), dict) else {}
            for entry in entries.values():
                path = entry.get("path") if isinstance(entry, dict) else None
                if isinstance(path, str) and _SAFE_PATH.match(path) and ".." not in path.split("/"):
                    write_config(root / path, LORA_CFG)
                    np_save(root / path / "adapter_model.safetensors", lora_tensors())
            try:  # the verdict is adapterspec's, checked against the example's
                adapterspec.list_adapters(root)
                got = None
            except adapterspec.AdapterSpecError as exc:
                got = exc
            source = f"spec/v1/examples/manifest/{kind}/{example.name}"
            assert (got is None) == (kind == "valid"), (id_, got)
            if got is None:
                folder(id_, f"spec example manifest {example.stem}: every listed adapter loads", valid=True,
                       multi=True, source=source)
                continue
            # UnsafeFileError (a name or path leaving the folder) is raised before the schema, naming no pointer
            assert got.pointer == data["error_pointer"] or (isinstance(got, adapterspec.UnsafeFileError)
                                                             and got.pointer is None), (id_, got)
            folder(id_, f"spec example manifest {example.stem}: {data['description']}", valid=False,
                   error=type(got).__name__, pointer=got.pointer, multi=True, source=source)


def _peft_saved_lora(path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = build_model(ATTN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.from_numpy(det(tuple(p.shape), len(name))).float())
    peft_model.save_pretrained(str(path))
    (path / "README.md").unlink(missing_ok=True)
    # PEFT holds target_modules as a set: its saved order changes from run to run; fix it for a stable corpus.
    config = json.loads((path / "adapter_config.json").read_text("utf-8"))
    config["target_modules"] = sorted(config["target_modules"])
    write_config(path, config)


# -- schema cases ----------------------------------------------------------------------------------------

LORA_MIN = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
#: SPEC.md 10: configs breaking the schema in several places; any of them is a right answer (error_pointers).
LOCATION_CASES: list[tuple[str, str, Any, bool, str | None, str | None]] = [
    ("location-two-fields", "lora_alpha (first in the document) and r both break the schema: a validator may "
     "report either", {"peft_type": "LORA", "lora_alpha": "16", "r": 0, "target_modules": ["q_proj"]}, False, "/r",
     None),
    ("location-nested-anyof", "an item of IA3's target_modules is not a string: the anyOf fails at "
     "/target_modules, its array branch at /target_modules/1; either location is right",
     {"peft_type": "IA3", "target_modules": ["q_proj", 5]}, False, "/target_modules/1", None),
]
SCHEMA_EXTRA: dict[str, list[tuple[str, str, Any, bool, str | None, str | None]]] = {
    "locations": LOCATION_CASES,
    # file: [(id, description, config, valid, error_pointer, error)]
    "lora": [
        ("lora-r-negative", "r must be >= 1", LORA_MIN | {"r": -2}, False, "/r", None),
        ("lora-use-rslora-string", "use_rslora is a boolean", LORA_MIN | {"use_rslora": "yes"}, False, "/use_rslora", None),
        ("lora-rank-pattern-string", "rank_pattern values are integers", LORA_MIN | {"rank_pattern": {"q_proj": "4"}},
         False, "/rank_pattern/q_proj", None),
        ("lora-target-modules-regex", "target_modules may be one regular expression", LORA_MIN | {"target_modules": r".*\.q_proj"},
         True, None, None),
        ("lora-layers-to-transform-int", "layers_to_transform may be a single index",
         LORA_MIN | {"layers_to_transform": 1}, True, None, None),
        ("lora-rslora-dora", "rsLoRA and DoRA combine", LORA_MIN | {"use_rslora": True, "use_dora": True}, True, None, None),
        ("lora-dropout-half", "lora_dropout in [0, 1)", LORA_MIN | {"lora_dropout": 0.5}, True, None, None),
    ],
    "methods": [
        ("ia3-feedforward-string", "feedforward_modules is a list or a regex string",
         {"peft_type": "IA3", "target_modules": ["q_proj"], "feedforward_modules": 3}, False, "/feedforward_modules", None),
        ("loha-alpha-string", "LoHa's alpha is a number",
         {"peft_type": "LOHA", "r": 2, "alpha": "4", "target_modules": ["q_proj"]}, False, "/alpha", None),
        ("lokr-decompose-both-string", "LoKr's decompose_both is a boolean",
         {"peft_type": "LOKR", "r": 2, "target_modules": ["q_proj"], "decompose_both": "no"}, False, "/decompose_both", None),
        ("prefix-token-dim-zero", "prefix tuning's token_dim is >= 1",
         {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "token_dim": 0, "num_attention_heads": 2,
          "num_layers": 2}, False, "/token_dim", None),
        ("prompt-num-virtual-tokens-zero", "prompt tuning's num_virtual_tokens is >= 1",
         {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 0, "token_dim": 8}, False, "/num_virtual_tokens", None),
        # spec 1.1: every PEFT 0.21 method is recognised; the ones the spec does not define are valid, not portable
        ("fourierft-recognised", "FourierFT is recognised, not portable: its config is valid",
         {"peft_type": "FOURIERFT", "n_frequency": 4, "target_modules": ["q_proj", "v_proj"]}, True, None, None),
        ("oft-recognised", "OFT is recognised (portable since spec 1.1, SPEC.md 15.6): its config is valid",
         {"peft_type": "OFT", "r": 0, "oft_block_size": 4, "target_modules": ["q_proj"]}, True, None, None),
        ("ln-tuning-recognised", "LN tuning is recognised (portable since spec 1.1, SPEC.md 15.3): its config is valid",
         {"peft_type": "LN_TUNING", "target_modules": None}, True, None, None),
        ("hra-recognised", "HRA is recognised (portable since spec 1.2, SPEC.md 17.3): its config is valid",
         {"peft_type": "HRA", "r": 4, "apply_GS": True, "target_modules": ["q_proj"]}, True, None, None),
        ("beft-recognised", "BEFT is recognised (portable since spec 1.2, SPEC.md 17.8): its config is valid",
         {"peft_type": "BEFT", "init_weights": False, "target_modules": ["v_proj"]}, True, None, None),
        ("config-beft-init-weights-null", "BEFT's init_weights may be null (PEFT's truth test: null acts as false, "
         "SPEC 4.1)", {"peft_type": "BEFT", "init_weights": None, "target_modules": ["v_proj"]}, True, None, None),
        ("beft-init-weights-string", "BEFT's init_weights is a boolean (or null)",
         {"peft_type": "BEFT", "init_weights": "zeros", "target_modules": ["v_proj"]}, False, "/init_weights", None),
        ("delora-recognised", "DeLoRA is recognised (portable since spec 1.2, SPEC.md 17.6): its config is valid",
         {"peft_type": "DELORA", "r": 4, "delora_lambda": 2.5, "lambda_pattern": {"v_proj": 3},
          "target_modules": ["q_proj", "v_proj"]}, True, None, None),
        ("config-delora-init-weights-null", "DeLoRA's init_weights may be null (PEFT tests 'is True': null acts as "
         "false, SPEC 4.1)", {"peft_type": "DELORA", "r": 4, "init_weights": None, "target_modules": ["q_proj"]},
         True, None, None),
        ("delora-rank-pattern-null", "DeLoRA's rank_pattern is an object (PEFT 0.21.2 calls .keys() on it: null fails)",
         {"peft_type": "DELORA", "r": 4, "rank_pattern": None, "target_modules": ["q_proj"]}, False,
         "/rank_pattern", None),
        ("config-delora-regex-empty-layers-pattern", "DeLoRA: a string target_modules needs only layers_to_transform "
         "null (PEFT's DeloraConfig); an empty layers_pattern loads", {"peft_type": "DELORA", "r": 4,
         "target_modules": ".*q_proj", "layers_pattern": []}, True, None, None),
        ("delora-regex-layers-pattern", "DeLoRA: a non-empty layers_pattern with a string target_modules is refused "
         "(it needs layers_to_transform, which must be null then)", {"peft_type": "DELORA", "r": 4,
         "target_modules": ".*q_proj", "layers_pattern": "layers"}, False, "", None),
        ("delora-module-dropout-above-one", "DeLoRA's module_dropout is a probability (PEFT's nn.Dropout raises above 1)",
         {"peft_type": "DELORA", "r": 4, "module_dropout": 1.5, "target_modules": ["q_proj"]}, False,
         "/module_dropout", None),
        ("hra-layers-pattern-alone", "HRA: a non-empty layers_pattern requires layers_to_transform (PEFT refuses it)",
         {"peft_type": "HRA", "r": 4, "target_modules": ["q_proj"], "layers_pattern": "layers"}, False, "",
         None),
        ("config-hra-null-booleans", "HRA's apply_GS and init_weights may be null, read as false (PEFT's truth tests, "
         "SPEC 4.1)", {"peft_type": "HRA", "r": 4, "apply_GS": None, "init_weights": None,
                       "target_modules": ["q_proj"]}, True, None, None),
        ("config-road-init-weights-null", "RoAd's init_weights may be null (PEFT tests 'is False': null acts as true, "
         "SPEC 4.1)", {"peft_type": "ROAD", "group_size": 4, "init_weights": None, "target_modules": ["q_proj"]},
         True, None, None),
        ("config-miss-init-weights-null", "MiSS's init_weights may be null: block mode (SPEC 17.2)",
         {"peft_type": "MISS", "r": 4, "init_weights": None, "target_modules": ["q_proj"]}, True, None, None),
        ("miss-regex-layers-pattern", "MiSS: layers_pattern must be null with a regex target_modules (PEFT's "
         "MissConfig raises)", {"peft_type": "MISS", "r": 4, "target_modules": ".*q_proj", "layers_pattern": "layers"},
         False, "/layers_pattern", None),
        ("hra-regex-layers-to-transform", "HRA: layers_to_transform must be null with a regex target_modules (PEFT's "
         "HRAConfig raises)", {"peft_type": "HRA", "r": 4, "target_modules": ".*q_proj", "layers_to_transform": [0]},
         False, "/layers_to_transform", None),
        ("fourierft-n-frequency-string", "a recognised method's fields have the types of PEFT's config class",
         {"peft_type": "FOURIERFT", "n_frequency": "4", "target_modules": ["q_proj"]}, False, "/n_frequency", None),
        ("method-unknown", "a peft_type that is not one of PEFT 0.21's methods is refused",
         {"peft_type": "NOT_A_METHOD", "target_modules": ["q_proj"]}, False, "/peft_type", None),
        # spec 1.1: the config forms PEFT accepts
        ("config-lora-target-modules-null", "a null target_modules means PEFT's default for the model type",
         LORA_MIN | {"target_modules": None}, True, None, None),
        ("config-null-booleans", "a boolean field may be null, read as false (PEFT's truth test, SPEC 4.1)",
         LORA_MIN | {"fan_in_fan_out": None, "use_rslora": None, "use_dora": None, "lora_bias": None,
                     "inference_mode": None}, True, None, None),
        ("config-velora-num-groups-zero", "velora_config.num_groups is a positive integer (PEFT's VeloraConfig "
         "raises on 0)", LORA_MIN | {"velora_config": {"num_groups": 0}}, False, "/velora_config/num_groups", None),
        ("oft-init-weights-null", "OFT's init_weights may not be null (PEFT refuses it)",
         {"peft_type": "OFT", "r": 0, "oft_block_size": 4, "target_modules": ["q_proj"], "init_weights": None},
         False, "/init_weights", None),
        ("lora-target-modules-duplicates", "a target_modules entry may repeat (PEFT uses a set)",
         LORA_MIN | {"target_modules": ["q_proj", "v_proj", "q_proj"]}, True, None, None),
        ("config-ia3-targets-null", "IA3's target_modules and feedforward_modules may be null (PEFT's defaults)",
         {"peft_type": "IA3", "target_modules": None, "feedforward_modules": None}, True, None, None),
        ("prefix-sizes-absent", "prefix tuning's token_dim, num_layers, num_attention_heads come from the model "
         "when absent", {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3}, True, None, None),
        ("prompt-token-dim-null", "prompt tuning's token_dim comes from the model when null",
         {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "token_dim": None}, True, None, None),
        # corpus 1.5: the cross-field rules of PEFT's config classes hold for every method that has the fields
        ("vera-layers-pattern-alone", "VeRA: a non-empty layers_pattern requires layers_to_transform (as LoRA)",
         {"peft_type": "VERA", "r": 4, "target_modules": ["q_proj"], "layers_pattern": "layers"}, False,
         "", None),
        ("oft-layers-pattern-alone", "OFT: a non-empty layers_pattern requires layers_to_transform (as LoRA)",
         {"peft_type": "OFT", "r": 0, "oft_block_size": 4, "target_modules": ["q_proj"], "layers_pattern": "layers"},
         False, "", None),
        ("adalora-regex-layers-to-transform", "AdaLoRA: layers_to_transform must be null with a regex target_modules",
         {"peft_type": "ADALORA", "init_r": 4, "total_step": 10, "target_modules": ".*q_proj", "layers_to_transform": [0]},
         False, "/layers_to_transform", None),
        ("vera-dropout-above-one", "VeRA's vera_dropout is a probability (PEFT's nn.Dropout refuses 2.0)",
         {"peft_type": "VERA", "r": 4, "target_modules": ["q_proj"], "vera_dropout": 2.0}, False, "/vera_dropout", None),
        ("gralora-k-zero", "GraLoRA's gralora_k is a positive block count (PEFT's GraloraConfig refuses 0)",
         {"peft_type": "GRALORA", "r": 4, "gralora_k": 0, "target_modules": ["q_proj"]}, False, "/gralora_k", None),
        ("gralora-hybrid-r-negative", "GraLoRA's hybrid_r is a rank, 0 or more (PEFT's layer refuses -1)",
         {"peft_type": "GRALORA", "r": 4, "hybrid_r": -1, "target_modules": ["q_proj"]}, False, "/hybrid_r", None),
        ("config-gralora-null-booleans", "GraLoRA's fan_in_fan_out and init_weights may be null, read as false "
         "(PEFT's truth tests, SPEC 4.1); alpha may be a float (PEFT divides it by r + hybrid_r) and a negative "
         "gralora_dropout means none (PEFT's '> 0.0' test)",
         {"peft_type": "GRALORA", "r": 4, "alpha": 6.5, "gralora_dropout": -0.5, "fan_in_fan_out": None,
          "init_weights": None, "target_modules": ["q_proj"]}, True, None, None),
        ("gralora-dropout-above-one", "GraLoRA's gralora_dropout is at most 1 (PEFT's nn.Dropout refuses 1.5)",
         {"peft_type": "GRALORA", "r": 4, "gralora_dropout": 1.5, "target_modules": ["q_proj"]}, False,
         "/gralora_dropout", None),
        ("miss-dropout-above-one", "MiSS's miss_dropout is a probability (PEFT's nn.Dropout refuses 2.0, in every "
         "mode)", {"peft_type": "MISS", "r": 4, "target_modules": ["q_proj"], "miss_dropout": 2.0}, False,
         "/miss_dropout", None),
        ("c3a-init-weights-unknown", "C3A's init_weights is true, false, 'gaussian', 'kaiming_uniform' or "
         "'xavier_uniform' (PEFT raises on others, at load too)", {"peft_type": "C3A", "block_size": 4,
                                                                   "target_modules": ["q_proj"],
                                                                   "init_weights": "orthogonal"}, False,
         "/init_weights", None),
        ("c3a-block-size-zero", "C3A's block_size is a positive integer (PEFT refuses 0)",
         {"peft_type": "C3A", "block_size": 0, "target_modules": ["q_proj"]}, False, "/block_size", None),
        ("c3a-block-size-pattern-null", "C3A's block_size_pattern is an object (PEFT fails on null)",
         {"peft_type": "C3A", "block_size": 4, "target_modules": ["q_proj"], "block_size_pattern": None}, False,
         "/block_size_pattern", None),
    ],
    "document": [
        ("config-is-a-list", "a config is a JSON object", [LORA_MIN], False, "", None),
        ("version-major-2", "a newer major adapterspec_version is refused", LORA_MIN | {"adapterspec_version": "2.0"},
         False, "/adapterspec_version", "VersionError"),
        ("version-minor-newer", "a newer minor adapterspec_version is read", LORA_MIN | {"adapterspec_version": "1.9"},
         True, None, None),
        ("version-malformed", "adapterspec_version is 'MAJOR.MINOR'", LORA_MIN | {"adapterspec_version": "v1"},
         False, "/adapterspec_version", "VersionError"),
        # corpus 1.11: the pattern is the whole string (SPEC 2.1), a trailing newline included
        ("version-trailing-newline", "adapterspec_version '1.1\\n' is not a version: the pattern is the whole "
         "string (Python's $ would match before the newline)", LORA_MIN | {"adapterspec_version": "1.1\n"}, False,
         "/adapterspec_version", "VersionError"),
    ],
}


def generate_schema() -> dict[str, list[dict[str, Any]]]:
    _mutation_schema_cases()
    files: dict[str, list[dict[str, Any]]] = {"spec-examples": []}
    for kind in ("valid", "invalid"):
        for example in sorted((SPEC_EXAMPLES / kind).glob("*.json")):
            data = json.loads(example.read_text("utf-8"))
            entry: dict[str, Any] = {"id": "example-" + example.stem.replace("_", "-"),
                                     "source": f"spec/v1/examples/{kind}/{example.name}"}
            if kind == "valid":
                entry |= {"description": f"spec example {example.stem}", "config": data, "valid": True}
            else:
                entry |= {"description": data["description"], "config": data["config"], "valid": False,
                          "error_pointer": data["error_pointer"]}
            files["spec-examples"].append(entry)
    for name, cases in SCHEMA_EXTRA.items():
        files[name] = []
        for id_, description, config, valid, pointer, error in cases:
            entry = {"id": id_, "description": description, "config": config, "valid": valid}
            if pointer is not None:
                entry["error_pointer"] = pointer
            if error is not None:
                entry["error"] = error
            files[name].append(entry)
    for entries in files.values():  # the corpus must agree with the spec's schema
        for entry in entries:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    adapterspec.validate_config(entry["config"])
                    got = None
                except adapterspec.ConfigError as exc:
                    got = exc
            assert (got is None) == entry["valid"], (entry["id"], got)
            if got is not None:
                assert got.pointer == entry["error_pointer"], (entry["id"], got.pointer, entry["error_pointer"])
                entry["error_pointers"] = _error_pointers(entry["config"], got.pointer)
    return files


def _error_pointers(config: Any, reported: str | None) -> list[str]:
    """SPEC.md 10: every location a conforming validator may report -- each instance location at which the schema
    is violated (nested anyOf/oneOf errors included), plus the reference's (a version or SPEC 4.2 rule error)."""
    from adapterspec.conformance.locations import error_locations

    return sorted(set(error_locations(config)) | ({reported} if reported is not None else set()))


# -- profiles --------------------------------------------------------------------------------------------

#: What an implementation may claim (``--profile``); every case is in ``full``.
PROFILES = {
    "core": "LoRA (without DoRA) and IA3 on Linear and Embedding layers, in float32, float16 and bfloat16, and "
            "their round trips -- LoRA's init_lora_weights 'pissa' and 'olora' included (the reader rebuilds "
            "PEFT's residual base: an SVD / a QR of each adapted weight, SPEC 8.1); every schema case; every folder "
            "rule (integrity, versions, names, manifests, refusals, methods the spec does not define) on LoRA/IA3 "
            "folders",
    "full": "every case: core plus DoRA, LoHa, LoKr, prefix and prompt tuning, Conv1d/Conv2d and GPT-2 Conv1D "
            "layers",
}
CORE_METHODS = ("LORA", "IA3")
CORE_LAYERS = ("linear", "embedding")


def _folder_in_core(entry: dict[str, Any]) -> bool:
    """LoRA (no DoRA) / IA3 folders, and folders whose config cannot be read or names a method the spec does not define."""
    try:
        config = json.loads((V1 / entry["path"] / "adapter_config.json").read_text("utf-8"))
    except (ValueError, FileNotFoundError):
        return True  # invalid JSON, or a manifest folder without a root adapter: rules every reader applies
    return not (config.get("peft_type") in ("LOHA", "LOKR", "PREFIX_TUNING", "PROMPT_TUNING", "OFT", "BOFT",
                                            "P_TUNING", "ADALORA", "VERA", "TRAINABLE_TOKENS", "LN_TUNING", "ROAD",
                                            "MISS", "HRA", "VBLORA", "C3A", "GRALORA", "DELORA", "BEFT")
                or config.get("use_dora"))


def _numeric_in_core(entry: dict[str, Any]) -> bool:
    return entry["method"] in CORE_METHODS and entry["layer"] in CORE_LAYERS and "dora" not in entry["tags"]


def with_profiles(entry: dict[str, Any], core: bool) -> dict[str, Any]:
    return {**entry, "profiles": ["core", "full"] if core else ["full"]}


# -- cases that kill the mutants of tests/conformance/mutants.py -------------------------------------------
# Each rule below was broken, on its own, in a copy of the reference implementation that still passed the
# rest of the corpus: these cases make every such single-rule mutant fail (conformance_tests/README.md).

def _mutation_numeric_cases() -> None:
    q, v = linear(6, 5), linear(6, 3)
    numeric("lora-exclude-modules-f32", "exclude_modules wins over target_modules: model.layers.1.q_proj is "
            "excluded (its output is unchanged), model.layers.0.q_proj adapted", "LORA", "linear", "float32",
            {"model.layers.0.q_proj": q, "model.layers.1.q_proj": q},
            lora(2, 6, ["q_proj"], exclude_modules=["layers.1.q_proj"]), ["exclude_modules", "untargeted"])
    numeric("lora-target-suffix-boundary-f32", "target_modules entries match on '.' boundaries: q_proj selects "
            "layers.0.q_proj, not layers.0.xq_proj", "LORA", "linear", "float32",
            {"layers.0.q_proj": q, "layers.0.xq_proj": q}, lora(2, 6, ["q_proj"]), ["untargeted"])
    numeric("lora-regex-whole-path-f32", "a string target_modules must match the whole module path: "
            "layers\\.\\d+\\.q_proj selects layers.0.q_proj, not model.layers.0.q_proj nor layers.0.q_proj_up",
            "LORA", "linear", "float32",
            {"layers.0.q_proj": q, "model.layers.0.q_proj": q, "layers.0.q_proj_up": q},
            lora(2, 6, r"layers\.\d+\.q_proj"), ["regex", "untargeted"])
    numeric("lora-layers-to-transform-f32", "layers_to_transform [1]: the layer index is the first numbered "
            "segment after a leading one (model.layers.1.block.0.q_proj is in layer 1); an exact target_modules "
            "entry (model.layers.0.v_proj) is adapted whatever its layer", "LORA", "linear", "float32",
            {"model.layers.0.q_proj": q, "model.layers.1.q_proj": q, "model.layers.1.block.0.q_proj": q,
             "model.layers.0.v_proj": v},
            lora(2, 6, ["q_proj", "model.layers.0.v_proj"], layers_to_transform=[1]), ["layers_to_transform", "untargeted"])
    numeric("ia3-unknown-layers-to-transform-f32", "IA3 has no layers_to_transform nor layers_pattern: fields a "
            "method does not know are kept but not acted on (PEFT drops them), so both layers are adapted",
            "IA3", "linear", "float32", {"model.layers.0.q_proj": q, "model.layers.1.q_proj": q},
            {"peft_type": "IA3", "target_modules": ["q_proj"], "feedforward_modules": [],
             "layers_to_transform": [1], "layers_pattern": "layers"}, ["unknown_fields"])
    numeric("lora-layers-pattern-f32", "layers_pattern 'blocks': the layer index follows 'blocks.' "
            "(model.layers.0.blocks.1.q_proj is in layer 1, model.layers.1.blocks.0.q_proj in layer 0)", "LORA",
            "linear", "float32", {"model.layers.0.blocks.1.q_proj": q, "model.layers.1.blocks.0.q_proj": q},
            lora(2, 6, ["q_proj"], layers_to_transform=[1], layers_pattern="blocks"),
            ["layers_to_transform", "layers_pattern", "untargeted"])
    numeric("lora-pattern-order-f32", "rank_pattern and alpha_pattern with overlapping keys: the first matching key "
            "in document order wins (layers\\.0\\.q_proj before q_proj)", "LORA", "linear", "float32",
            {"layers.0.q_proj": q, "layers.1.q_proj": q},
            lora(4, 8, ["q_proj"], rank_pattern={r"layers\.0\.q_proj": 2, "q_proj": 3},
                 alpha_pattern={r"layers\.1\.q_proj": 5, "q_proj": 12}), ["rank_pattern", "alpha_pattern"])
    numeric("lora-pattern-anchoring-f32", "pattern keys match a '.'-aligned suffix up to the end, wrapped in a "
            "group: q_proj gives layers.0.q_proj r=2 but not layers.0.q_proj_up nor layers.0.kq_proj; "
            "q_proj|kq_proj gives alpha 6 to both, not to layers.0.q_proj_up", "LORA", "linear", "float32",
            {"layers.0.q_proj": q, "layers.0.q_proj_up": q, "layers.0.kq_proj": q},
            lora(4, 8, ["q_proj", "q_proj_up", "kq_proj"], rank_pattern={"q_proj": 2},
                 alpha_pattern={"q_proj|kq_proj": 6}), ["rank_pattern", "alpha_pattern"])
    two = {"layers.0.q_proj": linear(16, 12), "layers.0.v_proj": linear(16, 12)}
    numeric("loha-patterns-f32", "LoHa with rank_pattern and alpha_pattern: v_proj has r=4, alpha=2", "LOHA",
            "linear", "float32", {"layers.0.q_proj": q, "layers.0.v_proj": v},
            lycoris("LOHA", 2, 6, ["q_proj", "v_proj"], rank_pattern={"v_proj": 4},
                    alpha_pattern={"v_proj": 2}), ["rank_pattern", "alpha_pattern"])
    numeric("lokr-patterns-f32", "LoKr with alpha_pattern: v_proj has alpha=5 (s = alpha / r)", "LOKR", "linear",
            "float32", two, lycoris("LOKR", 1, 3, ["q_proj", "v_proj"], alpha_pattern={"v_proj": 5}),
            ["alpha_pattern"])
    numeric("ia3-feedforward-suffix-f32", "IA3 feedforward_modules entries match as a plain suffix, without the "
            "'.' boundary of target_modules: 'wn_proj' makes mlp.down_proj feed-forward", "IA3", "linear", "float32",
            {"layers.0.self_attn.q_proj": linear(6, 5), "layers.0.mlp.down_proj": linear(6, 4)},
            {"peft_type": "IA3", "target_modules": r".*\.(q_proj|down_proj)", "feedforward_modules": ["wn_proj"]},
            ["feedforward", "regex"])
    numeric("lora-modules-to-save-f32", "modules_to_save: score is saved whole (its weight and bias replace the "
            "base's) and never adapted, although target_modules names it", "LORA", "linear", "float32",
            {"layers.0.q_proj": q, "score": linear(5, 3)},
            lora(2, 6, ["q_proj", "score"], modules_to_save=["score"]), ["modules_to_save"])
    numeric("lora-gpt2-field-false-f32", "LoRA on GPT-2's Conv1D with fan_in_fan_out false in the config: the layer "
            "kind decides (SPEC 4.2 rule 5), the update is transposed as for fan_in_fan_out true", "LORA",
            "gpt2_conv1d", "float32", {"h.0.mlp.c_fc": gpt2(6, 5)}, lora(2, 6, ["c_fc"]), ["fan_in_fan_out"])
    numeric("lora-exclude-regex-f32", "a string exclude_modules must match the whole path: model\\.layers\\.1 "
            "excludes nothing (both q_proj are adapted)", "LORA", "linear", "float32",
            {"model.layers.0.q_proj": q, "model.layers.1.q_proj": q},
            lora(2, 6, ["q_proj"], exclude_modules=r"model\.layers\.1"), ["exclude_modules", "regex"])
    numeric("lora-defaults-f32", "a config without lora_alpha: it takes PEFT's default 8 (r = 4, s = 2)", "LORA",
            "linear", "float32", {"layer": q}, {"peft_type": "LORA", "r": 4, "target_modules": ["layer"]},
            ["defaults"])


def _mutation_folder_cases() -> None:
    t = lora_tensors()
    plain("key-with-adapter-name", "keys that still hold the adapter name (PEFT's in-memory lora_A.default.weight)",
          LORA_CFG, {k.replace(".weight", ".default.weight"): a for k, a in t.items()}, valid=False,
          error="UnexpectedTensorError", key=[k.replace(".weight", ".default.weight") for k in t])
    bad = "base_model.model.model.layers.0..self_attn.q_proj"
    plain("module-name-empty-segment", "a key whose module name has an empty segment (layers.0..self_attn)",
          LORA_CFG, {k.replace(Q, bad): a for k, a in t.items()}, valid=False, error="UnexpectedTensorError",
          key=[f"{bad}.lora_A.weight", f"{bad}.lora_B.weight"])
    plain("dora-magnitude-wrong-shape", "v_proj's lora_magnitude_vector is [8]; v_proj has 4 outputs",
          LORA_CFG | {"use_dora": True}, t | {f"{Q}.lora_magnitude_vector": det((8,), 5, 0.2, 1.0).astype(np.float32),
                                              f"{V}.lora_magnitude_vector": det((8,), 6, 0.2, 1.0).astype(np.float32)},
          valid=False, error="ShapeMismatchError", key=f"{V}.lora_magnitude_vector")
    plain("lokr-factorization-differs", "LoKr on q_proj with lokr_w1 [4, 4] and lokr_w2 [2, 2]: the product has "
          "q_proj's shape, but PEFT's factorisation of 8 is 2 x 4 (SPEC 6.5)",
          {"peft_type": "LOKR", "r": 2, "alpha": 4, "target_modules": ["q_proj"]},
          {f"{Q}.lokr_w1": det((4, 4), 1).astype(np.float32), f"{Q}.lokr_w2": det((2, 2), 2).astype(np.float32)},
          valid=False, error="ShapeMismatchError", key=f"{Q}.lokr_w1")
    plain("metadata-version-leading-zero", "the safetensors metadata says adapterspec_version '01.1' (a leading "
          "zero): not a version", LORA_CFG, t, {"format": "pt", "adapterspec_version": "01.1"}, valid=False,
          error="VersionError")
    plain("newer-minor-version-metadata", "written by a spec 1.9 writer (the version in the safetensors metadata "
          "only, as 1.1 writers record it): loads, with a warning", LORA_CFG, t,
          {"format": "pt", "adapterspec_version": "1.9"}, valid=True, warnings_=[{"category": "AdapterSpecWarning"}])
    plain("lora-f64", "LoRA tensors stored as F64 (an allowed dtype)", LORA_CFG,
          {k: a.astype(np.float64) for k, a in t.items()}, valid=True)
    plain("mixed-dtypes", "q_proj's factors in F16, v_proj's in F32: mixed dtypes are accepted (SPEC 7.2)",
          LORA_CFG, {k: a.astype(np.float16) if k.startswith(Q) else a for k, a in t.items()}, valid=True)
    plain("metadata-without-format", "a safetensors file without the 'format' metadata key: readers accept any "
          "value or none", LORA_CFG, t, {}, valid=True)
    plain("config-duplicate-key-values-differ", "adapter_config.json names the member r twice (JSON objects with duplicate "
          "names are refused)", '{"peft_type": "LORA", "r": 2, "r": 4, "lora_alpha": 4, '
          '"target_modules": ["q_proj", "v_proj"]}\n', t, valid=False, error="FileFormatError")
    path = folder("sha256-uppercase", "adapterspec_sha256 in uppercase hex (checked with verify): not 64 "
                  "lowercase hex digits", valid=False, error="FileFormatError", options={"verify": True})
    adapterspec.write_adapter(path, LORA_CFG, t)
    _uppercase_sha256(path / "adapter_model.safetensors")
    plain("modules-to-save-wrong-shape", "k_proj is saved whole (modules_to_save) as a [4, 4] weight; the model's "
          "k_proj weight is [4, 8]", LORA_CFG | {"modules_to_save": ["k_proj"]},
          t | {f"{K}.weight": det((4, 4), 9).astype(np.float32)}, valid=False, error="ShapeMismatchError",
          key=f"{K}.weight")
    for id_, what, manifest, pointer in (
            ("manifest-default-not-listed", "the manifest's default 'de' is not one of its adapters",
             {"adapters": {"default": {"path": "."}, "fr": {"path": "fr"}}, "default": "de"}, "/default"),
            ("manifest-names-differ-in-case", "two adapters whose names differ only in letter case (fr, and FR in "
             "fr-upper/)", {"adapters": {"fr": {"path": "fr"}, "FR": {"path": "fr-upper"}}}, "/adapters/FR")):
        path = folder(id_, what, valid=False, multi=True, error="ConfigError", pointer=pointer)
        write_json(path / "adapterspec.json", {"adapterspec_version": "1.1", **manifest})
        for name, entry in manifest["adapters"].items():
            write_config(path / entry["path"], LORA_CFG)
            np_save(path / entry["path"] / "adapter_model.safetensors", t)
    path = folder("multi-invalid-subfolder-name", "no manifest (PEFT's layout): the root adapter, and a subfolder "
                  "-draft whose name is not a valid adapter name (and whose config is not JSON): skipped, with a "
                  "warning", valid=True, multi=True, warnings_=[{"category": "AdapterSpecWarning"}])
    write_config(path, LORA_CFG)
    np_save(path / "adapter_model.safetensors", t)
    write_config(path / "-draft", "not JSON\n")


def _uppercase_sha256(path: Path) -> None:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    header["__metadata__"]["adapterspec_sha256"] = header["__metadata__"]["adapterspec_sha256"].upper()
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])


def _mutation_schema_cases() -> None:
    SCHEMA_EXTRA["rules"] = [
        ("ia3-feedforward-not-targeted", "IA3: every feedforward_modules entry is a target_modules entry (SPEC 4.2 "
         "rule 2)", {"peft_type": "IA3", "target_modules": ["q_proj"], "feedforward_modules": ["down_proj"]}, False,
         "/feedforward_modules/0", None),
        ("prefix-token-dim-not-divisible", "prefix tuning: token_dim divisible by num_attention_heads (rule 3)",
         {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "token_dim": 10, "num_attention_heads": 3,
          "num_layers": 2}, False, "/token_dim", None),
        ("lora-target-modules-bad-regex", "a string target_modules must compile as a regular expression (rule 1)",
         {"peft_type": "LORA", "target_modules": "(q_proj"}, False, "/target_modules", None),
        ("lora-rank-pattern-bad-regex", "rank_pattern keys must compile (rule 1)",
         {"peft_type": "LORA", "target_modules": ["q_proj"], "rank_pattern": {"q_proj[": 4}}, False,
         "/rank_pattern/q_proj[", None),
        # corpus 1.5: the config checks of PEFT's AdaLoRA / OFT / BOFT config classes (SPEC 4.2 rules 6 and 7)
        ("adalora-total-step-missing", "AdaLoRA needs a positive total_step (PEFT's AdaLoraConfig refuses none)",
         {"peft_type": "ADALORA", "init_r": 4, "target_modules": ["q_proj"]}, False, "/total_step", None),
        ("adalora-no-budgeting-phase", "AdaLoRA needs tinit < total_step - tfinal",
         {"peft_type": "ADALORA", "init_r": 4, "target_modules": ["q_proj"], "total_step": 10, "tinit": 5,
          "tfinal": 5}, False, "/tinit", None),
        ("oft-r-and-block-size", "OFT: exactly one of r and oft_block_size is non-zero",
         {"peft_type": "OFT", "r": 4, "oft_block_size": 8, "target_modules": ["q_proj"]}, False, "/oft_block_size", None),
        ("boft-no-size", "BOFT: exactly one of boft_block_size and boft_block_num is non-zero",
         {"peft_type": "BOFT", "boft_block_size": 0, "boft_block_num": 0, "target_modules": ["q_proj"]}, False,
         "/boft_block_num", None),
    ]


# -- corpus 1.11: cases that kill the mutants of an independent implementation ------------------------------
# An implementation written from the spec alone (a mutation probe) passed corpus 1.10 with each of these rules
# broken on its own; every case below fails such a single-rule copy (conformance_tests/README.md, section 8).

def _mutation_numeric_cases_1_11() -> None:
    q, v = linear(6, 5), linear(6, 3)
    numeric("dora-rslora-f32", "DoRA with use_rslora: the norm of W + s B A uses s = alpha / sqrt(r), as the "
            "update does", "LORA", "linear", "float32", {"layer": linear(6, 5)},
            lora(4, 6, ["layer"], use_dora=True, use_rslora=True), ["dora", "rslora"])
    numeric("ia3-feedforward-regex-f32", "IA3 with a string feedforward_modules: re.fullmatch'ed against the whole "
            "path (not searched): 'mlp|.*\\.up_proj' makes up_proj feed-forward, not down_proj (which scales its "
            "output)", "IA3", "linear", "float32",
            {"layers.0.self_attn.q_proj": linear(6, 5), "layers.0.mlp.up_proj": linear(6, 4),
             "layers.0.mlp.down_proj": linear(6, 4)},
            {"peft_type": "IA3", "target_modules": ["q_proj", "up_proj", "down_proj"],
             "feedforward_modules": r"mlp|.*\.up_proj"}, ["feedforward", "regex"])
    numeric("lora-exclude-suffix-boundary-f32", "exclude_modules list entries match on '.' boundaries, as "
            "target_modules entries: q_proj excludes layers.0.q_proj, not layers.0.xq_proj", "LORA", "linear",
            "float32", {"layers.0.q_proj": q, "layers.0.xq_proj": q},
            lora(2, 6, ["q_proj", "xq_proj"], exclude_modules=["q_proj"]), ["exclude_modules", "untargeted"])
    numeric("lora-conv2d-bias-f32", "lora_bias on a Conv2d: lora_B (a 1x1 conv) has a bias, scaled like the rest "
            "of the update", "LORA", "conv2d", "float32", {"conv": conv2d(3, 4, [3, 2], stride=[2, 1], padding=[1, 0])},
            lora(2, 5, ["conv"], lora_bias=True), ["lora_bias"])
    numeric("lora-alpha-zero-f32", "lora_alpha 0 is a value, not an absent field: q_proj's update is scaled by 0 "
            "(its output is the base layer's), v_proj's by alpha_pattern's 6 / r", "LORA", "linear", "float32",
            {"layers.0.q_proj": q, "layers.0.v_proj": v}, lora(2, 0, ["q_proj", "v_proj"], alpha_pattern={"v_proj": 6}),
            ["alpha_pattern", "defaults"])
    numeric("lora-default-r-f32", "a config without r nor lora_alpha: PEFT's defaults r = 8, lora_alpha = 8 (s = 1)",
            "LORA", "linear", "float32", {"layer": linear(10, 9)},
            {"peft_type": "LORA", "target_modules": ["layer"]}, ["defaults"])
    numeric("prefix-tuning-gqa-config-heads-f32", "prefix tuning on a grouped-query-attention decoder whose config "
            "gives the query heads (num_attention_heads 4): PEFT recomputes num_attention_heads = num_key_value_heads "
            "= 2 and token_dim = head_dim * 2 even when the config gives them (SPEC 14.3)", "PREFIX_TUNING",
            "decoder", "float32", {}, {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3,
                                       "token_dim": 8, "num_attention_heads": 4, "num_layers": 2,
                                       "num_transformer_submodules": 1}, ["gqa"], decoder=DECODER_GQA,
            compute="prefix_key_values")
    biased = {"layer": linear(6, 5), "other": linear(6, 3)}
    numeric("lora-bias-all-f32", "bias 'all': the trained biases replace the base ones -- layer.base_layer.bias of "
            "the adapted layer and other.bias of the untargeted one (SPEC 5.3, 8.8)", "LORA", "linear", "float32",
            biased, lora(2, 6, ["layer"], bias="all"), ["bias"])
    numeric("lora-bias-lora-only-f32", "bias 'lora_only': the adapted layer's trained bias (layer.base_layer.bias) "
            "replaces its bias; the untargeted layer is unchanged", "LORA", "linear", "float32", biased,
            lora(2, 6, ["layer"], bias="lora_only"), ["bias", "untargeted"])
    numeric("lora-trainable-tokens-f32", "LoRA with trainable_token_indices [7, 2] (an array: the input embedding, "
            "PEFT's fallback name embed_tokens in a model description): rows 7 and 2 of embed_tokens are replaced by "
            "embed_tokens.token_adapter.trainable_tokens_delta; layer has LoRA", "LORA", "embedding", "float32",
            {"embed_tokens": embedding(10, 4), "layer": linear(6, 5)},
            lora(2, 4, ["layer"], trainable_token_indices=[7, 2]), ["trainable_tokens"])
    numeric("lora-layers-pattern-list-f32", "layers_pattern as a list: the first pattern that gives an index decides "
            "('blocks' matches no module, 'layers' gives model.layers.1.q_proj layer 1)", "LORA", "linear", "float32",
            {"model.layers.0.q_proj": q, "model.layers.1.q_proj": q},
            lora(2, 6, ["q_proj"], layers_to_transform=[1], layers_pattern=["blocks", "layers"]),
            ["layers_to_transform", "layers_pattern", "untargeted"])
    numeric("lora-pattern-document-order-f32", "rank_pattern and alpha_pattern whose members are not in sorted order "
            "(q_proj before layers\\.0\\.q_proj): the first key in document order wins for both layers (r 2, alpha 6); "
            "sorted, layers.0.q_proj would take r 3 and alpha 12 -- and a writer MUST keep the order (SPEC 3.1)",
            "LORA", "linear", "float32", {"layers.0.q_proj": q, "layers.1.q_proj": q},
            lora(4, 8, ["q_proj"], rank_pattern={"q_proj": 2, r"layers\.0\.q_proj": 3},
                 alpha_pattern={"q_proj": 6, r"layers\.0\.q_proj": 12}), ["rank_pattern", "alpha_pattern"])
    numeric("adalora-alpha-zero-f32", "AdaLoRA with lora_alpha 0: PEFT's scaling is lora_alpha if positive, else "
            "the rank r (init_r), so the update is B (A * E) * init_r / (init_r + 1e-5) (SPEC 15.4)", "ADALORA",
            "linear", "float32", {"layer": linear(6, 5)},
            {"peft_type": "ADALORA", "init_r": 3, "lora_alpha": 0, "total_step": 10, "target_modules": ["layer"]}, [])


def _mutation_folder_cases_1_11() -> None:
    t = lora_tensors()
    for id_, what, adapters, error in (
            ("manifest-duplicate-path", "two manifest entries name the same folder (a and b: path a)",
             {"a": {"path": "a"}, "b": {"path": "a"}}, "ConfigError"),
            ("manifest-missing-folder", "a manifest entry whose folder does not exist (b: path b)",
             {"a": {"path": "a"}, "b": {"path": "b"}}, "AdapterNotFoundError")):
        path = folder(id_, f"SPEC 3.4: {what}: {error}", valid=False, multi=True, error=error)
        write_json(path / "adapterspec.json", {"adapterspec_version": "1.1", "adapters": adapters})
        write_config(path / "a", LORA_CFG)
        np_save(path / "a" / "adapter_model.safetensors", t)
    path = plain("config-bom", "SPEC 3.1: adapter_config.json starts with a UTF-8 byte-order mark (not allowed): "
                 "FileFormatError", LORA_CFG, t, valid=False, error="FileFormatError")
    (path / "adapter_config.json").write_bytes(b"\xef\xbb\xbf" + (path / "adapter_config.json").read_bytes())
    plain("metadata-version-trailing-newline", "SPEC 2.1: the safetensors metadata's adapterspec_version '1.1\\n': the "
          "pattern is the whole string, so a trailing newline is no version (VersionError)", LORA_CFG, t,
          {"format": "pt", "adapterspec_version": "1.1\n"}, valid=False, error="VersionError")
    plain("embedding-saved-whole-not-in-model", "SPEC 5.4 step 4, check 18: lm_head.weight (an embedding name) for a "
          "model without lm_head: the module is not in the model (TargetNotFoundError naming the key)", LORA_CFG, t |
          {"base_model.model.lm_head.weight": det((10, 8), 5).astype(np.float32)}, valid=False,
          error="TargetNotFoundError", key="base_model.model.lm_head.weight")
    plain("modules-to-save-not-in-model", "check 18: the tensor of a module to save (score) the model does not have "
          "(TargetNotFoundError, before check 19)", LORA_CFG | {"modules_to_save": ["score"]}, t |
          {"base_model.model.score.weight": det((2, 8), 5).astype(np.float32)}, valid=False,
          error="TargetNotFoundError", key="base_model.model.score.weight")
    plain("bias-lora-only-layer-without-bias", "bias 'lora_only' with q_proj.base_layer.bias while q_proj has no bias: "
          "refused naming the tensor -- a tensor the model has no place for (UnexpectedTensorError, as PEFT's "
          "unexpected key) or one without the shape of what it replaces (check 21, ShapeMismatchError): SPEC 10 "
          "does not choose, so any TensorError passes", LORA_CFG | {"bias": "lora_only"}, t |
          {f"{Q}.base_layer.bias": det((5,), 5).astype(np.float32)}, valid=False, error="TensorError",
          key=f"{Q}.base_layer.bias")
    tokens = {"dtype": "float32", "modules": {"embed_tokens": embedding(10, 4)}}
    plain("trainable-tokens-row-count", "check 16: trainable_tokens_delta has 3 rows for 2 token_indices",
          {"peft_type": "TRAINABLE_TOKENS", "target_modules": ["embed_tokens"], "token_indices": [7, 2]},
          {"base_model.model.embed_tokens.trainable_tokens_delta": det((3, 4), 1).astype(np.float32)}, valid=False,
          error="ShapeMismatchError", key="base_model.model.embed_tokens.trainable_tokens_delta", model=tokens)
    vocab = {"dtype": "float32", "modules": {"model.embed_tokens": embedding(10, 8),
                                             "model.layers.0.self_attn.q_proj": linear(8, 8, bias=False)}}
    delta = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    plain("lora-trainable-tokens-index-outside", "check 20: trainable_token_indices [1, 12] on an embedding of 10 rows",
          LORA_CFG | {"target_modules": ["q_proj"], "trainable_token_indices": [1, 12]},
          {f"{Q}.lora_A.weight": det((2, 8), 1).astype(np.float32), f"{Q}.lora_B.weight": det((8, 2), 2).astype(np.float32),
           delta: det((2, 8), 3).astype(np.float32)}, valid=False, error="ShapeMismatchError", key=delta, model=vocab)


def _write_header_members(path: Path, members: Any) -> None:
    """Rewrite a safetensors file's JSON header as the members ``members(header)`` gives, in order: ``(name, JSON
    text)`` pairs, so that a name may come twice (a dict cannot hold that)."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    raw = ("{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in members(json.loads(blob[8 : 8 + n]))) + "}").encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])


def _repeated_name_folders() -> None:
    """SPEC 11.2 (corpus 1.12): a name twice in the safetensors header, which the safetensors library and most JSON
    parsers resolve silently to the last entry."""
    t = lora_tensors()
    a, b = f"{Q}.lora_A.weight", f"{Q}.lora_B.weight"

    def entries(h: dict[str, Any], *first: tuple[str, Any]) -> list[tuple[str, str]]:
        return [*((k, json.dumps(v, separators=(",", ":"))) for k, v in first),
                *((k, json.dumps(v, separators=(",", ":"))) for k, v in h.items())]

    path = plain("header-tensor-twice", "SPEC 11.2: the safetensors header declares q_proj's lora_A twice, the same "
                 "entry both times: FileFormatError naming the tensor", LORA_CFG, t, valid=False,
                 error="FileFormatError", key=a)
    _write_header_members(path / "adapter_model.safetensors", lambda h: entries(h, (a, h[a])))
    path = plain("header-tensor-twice-elsewhere", "SPEC 11.2: q_proj's lora_A declared first over lora_B's bytes "
                 "with lora_B's shape, then as written (the safetensors library reads the last, another reader may "
                 "read the first): FileFormatError naming the tensor", LORA_CFG, t, valid=False,
                 error="FileFormatError", key=a)
    _write_header_members(path / "adapter_model.safetensors",
                          lambda h: entries(h, (a, h[a] | {"shape": h[b]["shape"], "data_offsets": h[b]["data_offsets"]})))
    path = plain("header-metadata-member-twice", "SPEC 11.2: the safetensors metadata names adapterspec_version "
                 "twice, '2.0' then '1.1' (the last is readable, the first a newer major): FileFormatError",
                 LORA_CFG, t, valid=False, error="FileFormatError")
    _write_header_members(path / "adapter_model.safetensors", lambda h: [
        ("__metadata__", '{"adapterspec_version":"2.0","adapterspec_version":"1.1","format":"pt"}'),
        *((k, json.dumps(v, separators=(",", ":"))) for k, v in h.items() if k != "__metadata__")])


def _set_save_cases_1_13() -> None:
    """SPEC 3.4 (one save of a set), check 17: adapters recording another save than their manifest entry."""
    t = lora_tensors()
    manifest_save, other_save = "1" * 32, "2" * 32
    for id_, what, recorded, valid in (
            ("manifest-two-saves", "the manifest records save_id 111... for 'default' and 'fr'; 'default' records "
             "adapterspec_save_id 222... (a save of the set interrupted after its first adapter): IntegrityError",
             {"default": other_save, "fr": manifest_save}, False),
            ("manifest-save-id-adapter-saved-alone", "the manifest records save_id 111... for 'default' and 'fr'; "
             "'fr' records no adapterspec_save_id (saved alone since, as PEFT saves): read as it is, valid",
             {"default": manifest_save, "fr": None}, True)):
        path = folder(id_, f"SPEC 3.4: {what}", valid=valid, multi=True,
                      error=None if valid else "IntegrityError")
        write_json(path / "adapterspec.json", {"adapterspec_version": "1.1", "adapters": {
            "default": {"path": ".", "save_id": manifest_save}, "fr": {"path": "fr", "save_id": manifest_save}}})
        for name, where in (("default", path), ("fr", path / "fr")):
            save = recorded[name]
            write_config(where, LORA_CFG)
            np_save(where / "adapter_model.safetensors", t,
                    {"format": "pt", **({"adapterspec_save_id": save} if save is not None else {})})


# -- the rest --------------------------------------------------------------------------------------------

def generate_errors() -> dict[str, Any]:
    errors = {}
    for name in sorted(adapterspec.errors.__all__):
        cls = getattr(adapterspec.errors, name)
        if not (inspect.isclass(cls) and issubclass(cls, adapterspec.errors.AdapterSpecError)):
            continue
        parent = next((b.__name__ for b in cls.__mro__[1:] if issubclass(b, adapterspec.errors.AdapterSpecError)), None)
        errors[name] = {"parent": parent, "description": (cls.__doc__ or "").strip().splitlines()[0]}
    return {"description": "The spec's error classes (language-neutral names) and their parents. A case that "
            "expects class X passes with X or any class below it.", "errors": errors}


def canonical_metadata(path: Path) -> None:
    """Sort a safetensors file's metadata keys (safetensors writes them in hash order), so runs give equal bytes."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    if len(header.get("__metadata__") or {}) < 2:
        return
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    torch.manual_seed(0)
    for name in GENERATED:
        target = V1 / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    V1.mkdir(parents=True, exist_ok=True)
    for name, cases in generate_schema().items():
        write_json(V1 / "schema" / f"{name}.json", [with_profiles(c, True) for c in cases])
    write_json(V1 / "folders.json", [with_profiles(c, _folder_in_core(c)) for c in generate_folders()])
    numeric_index = [with_profiles(c, _numeric_in_core(c)) for c in generate_numeric()]
    write_json(V1 / "numeric.json", numeric_index)
    write_json(V1 / "roundtrip.json", [
        {"id": f"roundtrip-{c['id']}", "description": f"load then save the adapter of numeric/{c['id']}: the same "
         "tensors bit for bit, an equivalent config", "source": c["id"], "tags": c["tags"],
         "profiles": c["profiles"]} for c in numeric_index])
    write_json(V1 / "errors.json", generate_errors())
    import peft
    import transformers

    files = {p.relative_to(V1).as_posix(): sha256(p) for p in sorted(V1.rglob("*"))
             if p.is_file() and p.name != "corpus.json"}
    write_json(V1 / "corpus.json", {
        "spec_version": adapterspec.SPEC_VERSION, "corpus_version": CORPUS_VERSION,
        "profiles": PROFILES,
        "generator": "conformance_tests/generate.py",
        "generated_with": {"peft": peft.__version__, "torch": torch.__version__.split("+")[0],
                           "transformers": transformers.__version__, "numpy": np.__version__,
                           "jsonschema": importlib.metadata.version("jsonschema")},
        "files": files})
    size = sum(p.stat().st_size for p in V1.rglob("*") if p.is_file())
    print(f"{len(files) + 1} files, {size / 1024:.0f} KiB")
    assert size < 2 * 1024 * 1024, "the corpus must stay under 2 MB"
    return 0


if __name__ == "__main__":
    sys.exit(main())
