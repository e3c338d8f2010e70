"""The spec's adapter math in float64 NumPy: the reference the conformance corpus is computed with.

Everything here is plain NumPy, written to be read next to SPEC.md: each adapted layer is the base
layer with an *effective* weight (and bias), built from the stored tensors in the spec's (PEFT/torch)
layout. The generator (``conformance_tests/generate.py``) checks these functions against PEFT itself.

Layer kinds (``kind`` of a module in a case's model) and their base operation, torch layout:

* ``linear``      -- weight ``[out, in]``, ``y = x @ W.T + b``
* ``gpt2_conv1d`` -- transformers' ``Conv1D`` (GPT-2), weight stored ``[in, out]``, ``y = x @ W + b``
* ``embedding``   -- weight ``[num_embeddings, dim]``, ``y = W[ids]``
* ``conv1d`` / ``conv2d`` -- weight ``[out, in, *kernel]``, input ``[N, C, *spatial]`` (channels first)

>>> import numpy as np
>>> module = {"kind": "linear", "in_features": 2, "out_features": 2, "bias": False}
>>> cfg = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["layer"]}
>>> t = {"lora_A.weight": np.array([[1.0, 0.0]]), "lora_B.weight": np.array([[0.0], [1.0]])}
>>> forward(module, {"weight": np.eye(2)}, np.array([[3.0, 4.0]]), cfg, "layer", t)
array([[ 3., 10.]])
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, cast

import numpy as np

from .._lora_init import base_init, residual
from .reference_adalora import adalora_weight
from .reference_gralora import gralora_weight
from .reference_delora import delora_weight
from .reference_hra import reflected_weight
from .reference_oft import rotated_weight
from .reference_ln_tuning import ln_tuning_weights
from .reference_parameters import expert_deltas
from .reference_road import road_weights
from .reference_tokens import token_weight
from .reference_vblora import vblora_weight
from .reference_vera import vera_weight
from .reference_miss import miss_weight
from .reference_c3a import c3a_weight
from .reference_beft import beft_bias

__all__ = [
    "adapted_weight",
    "base_forward",
    "forward",
    "prefix_key_values",
    "prompt_concat",
    "rank_and_alpha",
    "scaling",
]

Array = np.ndarray
_DEFAULT_R = 8
_DEFAULT_ALPHA = 8


def _f64(a: Any) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.asarray(a, dtype=np.float64)


def _pattern(patterns: Mapping[str, Any] | None, path: str, default: Any) -> Any:
    # PEFT: the first key (in the mapping's order) whose regex matches the end of the module path.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def rank_and_alpha(config: Mapping[str, Any], path: str) -> tuple[int, float]:
    """The rank and alpha of the adapter on the module at ``path`` (``rank_pattern``/``alpha_pattern`` first).

    >>> rank_and_alpha({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"v": 2}}, "l.0.v")
    (2, 8.0)
    """
    r = int(_pattern(config.get("rank_pattern"), path, config.get("r", _DEFAULT_R)))
    alpha_key = "lora_alpha" if config["peft_type"] == "LORA" else "alpha"
    alpha = float(_pattern(config.get("alpha_pattern"), path, config.get(alpha_key, _DEFAULT_ALPHA)))
    return r, alpha


def scaling(config: Mapping[str, Any], path: str) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora`` (LoRA only).

    >>> scaling({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True}, "q")
    4.0
    """
    r, alpha = rank_and_alpha(config, path)
    if config["peft_type"] == "LORA" and config.get("use_rslora"):
        return alpha / math.sqrt(r)
    return alpha / r


# -- base layers ------------------------------------------------------------------------------

def _conv(x: Array, w: Array, stride: tuple[int, ...], padding: tuple[int, ...]) -> Array:
    """Cross-correlation (torch's convolution), channels first, 1 or 2 spatial dims, no groups/dilation."""
    nd = w.ndim - 2
    xp = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in padding])
    out_size = [(xp.shape[2 + d] - w.shape[2 + d]) // stride[d] + 1 for d in range(nd)]
    y = np.zeros((x.shape[0], w.shape[0], *out_size))
    for offset in np.ndindex(*w.shape[2:]):
        window = tuple(slice(o, o + stride[d] * (out_size[d] - 1) + 1, stride[d]) for d, o in enumerate(offset))
        piece = xp[(slice(None), slice(None), *window)]
        y += np.einsum("oc,nc...->no...", w[(slice(None), slice(None), *offset)], piece)
    return y


def _tuple(value: Any, nd: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * nd
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),) * nd


def base_forward(module: Mapping[str, Any], weight: Array, bias: Array | None, x: Array) -> Array:
    """The base layer's output for input ``x``, with ``weight``/``bias`` in the layer's stored layout.

    >>> base_forward({"kind": "gpt2_conv1d"}, np.array([[1.0, 2.0]]), None, np.array([[3.0]]))
    array([[3., 6.]])
    """
    kind = module["kind"]
    w = _f64(weight)
    if kind == "embedding":
        return w[np.asarray(x, dtype=np.int64)]
    if kind == "linear":
        y = _f64(x) @ w.T
    elif kind == "gpt2_conv1d":
        y = _f64(x) @ w
    elif kind == "experts":  # expert e maps x[e] [n, in] with its weight [out, in]
        y = np.einsum("eni,eoi->eno", _f64(x), w)
    elif kind == "layer_norm":  # over the last axis, biased variance (torch's nn.LayerNorm)
        x64 = _f64(x)
        mean = x64.mean(axis=-1, keepdims=True)
        var = ((x64 - mean) ** 2).mean(axis=-1, keepdims=True)
        y = (x64 - mean) / np.sqrt(var + float(module["eps"])) * w
    elif kind in ("conv1d", "conv2d"):
        nd = w.ndim - 2
        y = _conv(_f64(x), w, _tuple(module.get("stride"), nd, 1), _tuple(module.get("padding"), nd, 0))
        if bias is not None:
            y = y + _f64(bias).reshape((1, -1) + (1,) * nd)
        return y
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    return y + _f64(bias) if bias is not None else y


# -- the weight each method's adapter adds ------------------------------------------------------

def _out_in(kind: str, weight: Array) -> Array:
    """The weight as an ``[out, in...]`` matrix view: what LoRA's ``B @ A`` is added to."""
    if kind == "gpt2_conv1d":
        return weight.T
    if kind == "embedding":
        return weight.T  # [dim, num_embeddings]: lora_embedding_B [dim, r] @ lora_embedding_A [r, num]
    return weight.reshape(weight.shape[0], -1)


def _from_out_in(kind: str, matrix: Array, shape: tuple[int, ...]) -> Array:
    if kind in ("gpt2_conv1d", "embedding"):
        return matrix.T
    return matrix.reshape(shape)


def _initial_base(kind: str, weight: Array, config: Mapping[str, Any], path: str) -> Array:
    """The base a PiSSA/OLoRA adapter runs on (SPEC.md 8.1): PEFT's residual ``W − s·B₀A₀`` of a linear layer's
    weight, decomposed in float32 as PEFT decomposes it (OLoRA: a GPT-2 Conv1D as stored); else the weight."""
    init = base_init(config)
    if init is None or kind == "embedding":
        return weight
    if kind not in ("linear", "gpt2_conv1d"):
        raise ValueError(f"init_lora_weights {init!r} on a {kind} layer: PEFT refuses it")
    r, s = rank_and_alpha(config, path)[0], scaling(config, path)
    as_stored = kind == "linear" or init == "olora"
    w_res = residual(init, weight if as_stored else weight.T, r, s)[0]
    return _f64(w_res if as_stored else w_res.T)


def _lora(module: Mapping[str, Any], weight: Array, bias: Array | None, config: Mapping[str, Any], path: str,
          t: Mapping[str, Array]) -> tuple[Array, Array | None]:
    kind = module["kind"]
    s = scaling(config, path)
    weight = _initial_base(kind, weight, config, path)
    if kind == "embedding":
        a, b = _f64(t["lora_embedding_A"]), _f64(t["lora_embedding_B"])
    else:
        a, b = _f64(t["lora_A.weight"]), _f64(t["lora_B.weight"])
    r = a.shape[0]
    w = _out_in(kind, weight)
    adapted = w + s * (b.reshape(-1, r) @ a.reshape(r, -1))
    if "lora_magnitude_vector" in t:  # DoRA: rescale each output row to the learned magnitude
        magnitude = _f64(t["lora_magnitude_vector"]).reshape(-1)
        norm = np.linalg.norm(adapted, axis=1)
        adapted = (magnitude / norm)[:, None] * adapted
    if "lora_B.bias" in t:  # lora_bias: B is a biased layer, and scaling applies to its output
        extra = s * _f64(t["lora_B.bias"])
        bias = extra if bias is None else _f64(bias) + extra
    return _from_out_in(kind, adapted, weight.shape), bias


def _loha(module: Mapping[str, Any], weight: Array, config: Mapping[str, Any], path: str,
          t: Mapping[str, Array]) -> Array:
    s = scaling(config, path)
    if "hada_t1" in t:  # CP decomposition of a conv kernel (use_effective_conv2d)
        def rebuild(core: str, a: str, b: str) -> Array:
            return cast(Array, np.einsum("ijkl,jr,ip->prkl", _f64(t[core]), _f64(t[b]), _f64(t[a])))
        delta = rebuild("hada_t1", "hada_w1_a", "hada_w1_b") * rebuild("hada_t2", "hada_w2_a", "hada_w2_b")
    else:
        delta = (_f64(t["hada_w1_a"]) @ _f64(t["hada_w1_b"])) * (_f64(t["hada_w2_a"]) @ _f64(t["hada_w2_b"]))
    return cast(Array, weight + s * delta.reshape(weight.shape))  # numpy: an Array of unknown dtype plus one is Any


def _lokr(module: Mapping[str, Any], weight: Array, config: Mapping[str, Any], path: str,
          t: Mapping[str, Array]) -> Array:
    s = scaling(config, path)
    w1 = _f64(t["lokr_w1"]) if "lokr_w1" in t else _f64(t["lokr_w1_a"]) @ _f64(t["lokr_w1_b"])
    if "lokr_w2" in t:
        w2 = _f64(t["lokr_w2"])
    elif "lokr_t2" in t:
        w2 = np.einsum("ijkl,ip,jr->prkl", _f64(t["lokr_t2"]), _f64(t["lokr_w2_a"]), _f64(t["lokr_w2_b"]))
    else:
        w2 = _f64(t["lokr_w2_a"]) @ _f64(t["lokr_w2_b"])
    if w2.ndim == 4:  # only then (PEFT's make_kron): a 3-axis Conv1d lokr_w2 gets w1 with a *leading* unit axis
        w1 = w1[:, :, None, None]
    return weight + s * np.kron(w1, w2).reshape(weight.shape)


def adapted_weight(module: Mapping[str, Any], weight: Any, bias: Any, config: Mapping[str, Any], path: str,
                   tensors: Mapping[str, Any]) -> tuple[Array, Array | None]:
    """The weight and bias a LoRA/DoRA/LoHa/LoKr adapter gives the layer (stored layout, float64).

    :raises ValueError: the tensors do not make an update of the weight's shape.

    >>> cfg = {"peft_type": "LOKR", "r": 1, "alpha": 2, "target_modules": ["l"]}
    >>> w, _ = adapted_weight({"kind": "linear"}, np.zeros((2, 2)), None, cfg, "l",
    ...                       {"lokr_w1": np.eye(1), "lokr_w2": np.array([[1.0, 2.0], [3.0, 4.0]])})
    >>> w.tolist()
    [[2.0, 4.0], [6.0, 8.0]]
    """
    weight = _f64(weight)
    bias = None if bias is None else _f64(bias)
    method = config["peft_type"]
    if method == "LORA" and module["kind"] == "experts":  # SPEC.md 15.1: LoRA on the 3-D parameter
        s = scaling(config, f"{path}.weight")
        return weight + expert_deltas(tensors["lora_A.weight"], tensors["lora_B.weight"], weight.shape[0], s), bias
    if method == "LORA":
        return _lora(module, weight, bias, config, path, tensors)
    if method == "LOHA":
        return _loha(module, weight, config, path, tensors), bias
    if method == "LOKR":
        return _lokr(module, weight, config, path, tensors), bias
    if method in ("OFT", "BOFT"):  # SPEC.md 15.6, 15.7
        return rotated_weight(module, weight, config, tensors), bias
    if method == "HRA":  # SPEC.md 17.3
        return reflected_weight(module, weight, config, tensors), bias
    if method == "ADALORA":  # SPEC.md 15.4
        return adalora_weight(module, weight, config, path, tensors), bias
    if method == "VERA":  # SPEC.md 15.5: ``tensors`` holds the shared vera_A / vera_B too
        return vera_weight(module, weight, tensors), bias
    if method == "VBLORA":  # SPEC.md 17.4: ``tensors`` holds the shared vblora_vector_bank too
        return vblora_weight(module, weight, config, tensors), bias
    if method == "GRALORA":  # SPEC.md 17.5
        return gralora_weight(module, weight, config, tensors), bias
    if method == "TRAINABLE_TOKENS":  # SPEC.md 15.2
        return token_weight(weight, config, tensors), bias
    if method == "LN_TUNING":  # SPEC.md 15.3
        return ln_tuning_weights(weight, bias, tensors)
    if method == "ROAD":  # SPEC.md 17.1: R W, R b
        return road_weights(weight, bias, config, tensors)
    if method == "MISS":  # SPEC.md 17.2
        return miss_weight(module, weight, config, tensors), bias
    if method == "C3A":  # SPEC.md 17.7
        return c3a_weight(module, weight, tensors), bias
    if method == "DELORA":  # SPEC.md 17.6
        return delora_weight(module, weight, config, path, tensors), bias
    if method == "BEFT":  # SPEC.md 17.8: the bias only
        return weight, beft_bias(bias, tensors)
    raise ValueError(f"{method} has no weight update")


def forward(module: Mapping[str, Any], base: Mapping[str, Any], x: Any, config: Mapping[str, Any], path: str,
            tensors: Mapping[str, Any]) -> Array:
    """The adapted module's output, in float64.

    :param module: the layer's description (``kind`` and sizes, see the module docstring).
    :param base: the base layer's tensors, ``{"weight": ..., "bias": ...}`` (bias optional).
    :param x: the input (integer ids for an embedding).
    :param config: the adapter config (a mapping as in ``adapter_config.json``).
    :param path: the module's path, for ``rank_pattern``/``alpha_pattern``/``feedforward_modules``.
    :param tensors: the module's adapter tensors by parameter name (``"lora_A.weight"``, ``"ia3_l"``...);
        empty when the adapter does not target the module.

    >>> cfg = {"peft_type": "IA3", "target_modules": ["l"], "feedforward_modules": []}
    >>> forward({"kind": "linear"}, {"weight": np.eye(2), "bias": np.ones(2)}, np.array([[1.0, 2.0]]), cfg, "l",
    ...         {"ia3_l": np.array([[2.0], [3.0]])})
    array([[4., 9.]])
    """
    weight = _f64(base["weight"])
    bias = None if base.get("bias") is None else _f64(base["bias"])
    if not tensors:
        return base_forward(module, weight, bias, x)
    method = config["peft_type"]
    if method in ("LORA", "LOHA", "LOKR", "OFT", "BOFT", "ADALORA", "VERA", "TRAINABLE_TOKENS", "LN_TUNING", "ROAD",
                  "MISS", "HRA", "VBLORA", "C3A", "GRALORA", "DELORA", "BEFT"):
        weight, bias = adapted_weight(module, weight, bias, config, path, tensors)
        return base_forward(module, weight, bias, x)
    if method == "IA3":
        scale = _f64(tensors["ia3_l"]).reshape(-1)
        channel_axis = 1 if module["kind"] in ("conv1d", "conv2d") else -1
        shape = [1] * np.ndim(x)
        if _is_feedforward(config, path):  # scales the input features
            shape[channel_axis] = scale.size
            return base_forward(module, weight, bias, _f64(x) * scale.reshape(shape))
        y = base_forward(module, weight, bias, x)  # scales the output, bias included
        out_shape = [1] * y.ndim
        out_shape[channel_axis] = scale.size
        return y * scale.reshape(out_shape)
    raise ValueError(f"{method} does not adapt layers; see prefix_key_values / prompt_concat")


def _is_feedforward(config: Mapping[str, Any], path: str) -> bool:
    entries = config.get("feedforward_modules") or []
    if isinstance(entries, str):
        return re.fullmatch(entries, path) is not None
    return any(path.endswith(entry) for entry in entries)


# -- prompt learning ------------------------------------------------------------------------------

def prefix_key_values(config: Mapping[str, Any], prompt_embeddings: Any) -> Array:
    """The per-layer key/value prefixes of a prefix-tuning adapter: ``[layers, 2, heads, nvt, head_dim]``.

    ``prompt_embeddings`` ``[nvt, layers * 2 * token_dim]`` is read as ``[nvt, 2 * layers, heads, head_dim]``;
    entry ``2 * i`` is layer ``i``'s key prefix and ``2 * i + 1`` its value prefix (PEFT's ``get_prompt``).

    >>> cfg = {"num_virtual_tokens": 1, "num_layers": 1, "num_attention_heads": 1, "token_dim": 2}
    >>> prefix_key_values(cfg, np.array([[1.0, 2.0, 3.0, 4.0]])).tolist()
    [[[[[1.0, 2.0]]], [[[3.0, 4.0]]]]]
    """
    nvt, layers, heads = config["num_virtual_tokens"], config["num_layers"], config["num_attention_heads"]
    head_dim = config["token_dim"] // heads
    p = _f64(prompt_embeddings).reshape(nvt, 2 * layers, heads, head_dim)
    return p.transpose(1, 2, 0, 3).reshape(layers, 2, heads, nvt, head_dim)


def prompt_concat(prompt_embeddings: Any, inputs_embeds: Any) -> Array:
    """Prompt tuning: the virtual tokens' embeddings in front of every sequence of the batch.

    ``[batch, seq, dim]`` -> ``[batch, nvt + seq, dim]``.

    >>> prompt_concat(np.ones((2, 3)), np.zeros((4, 5, 3))).shape
    (4, 7, 3)
    """
    x = _f64(inputs_embeds)
    p = np.broadcast_to(_f64(prompt_embeddings)[None], (x.shape[0], *np.shape(prompt_embeddings)))
    return np.concatenate([p, x], axis=1)
