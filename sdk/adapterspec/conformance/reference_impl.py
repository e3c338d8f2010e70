"""The reference implementation: adapterspec's core reader and writer with the float64 NumPy math.

It needs no deep-learning framework. It checks an adapter against a case's model description the
way a backend would (every adapted module exists, every targeted module has its tensors, every
shape fits the layer), so it passes every case of the corpus; the suite's own tests use it as the
known-good implementation (``--impl reference``).

>>> from adapterspec.conformance import load_corpus, run_suite
>>> run_suite(ReferenceImplementation(), load_corpus()).ok             # doctest: +SKIP
True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import list_adapters, read_adapter, validate_config, write_adapter
from ..adapter import Adapter
from ..config import AdapterConfig
from .._rules import prefix_key_value_sizes, transformer_submodules
from .. import _c3a, _hra, _miss, _oft, _road
from .. import _beft, _delora, _gralora, _vblora
from .._method_checks import factorization
from ..errors import (
    MissingTensorError,
    ShapeMismatchError,
    TargetNotFoundError,
    UnexpectedTensorError,
    UnsupportedError,
)
from .._vera import shared_key
from ..naming import PARAMETERS, PROMPT_KEY, TRAINABLE_TOKENS_PARAM, make_key, parse_key
from ..targets import is_all_linear, parameter_module, refuse_containers, token_indices
from . import _io, reference
from .reference_tokens import token_weight
from .cases import FolderCase, NumericCase, RoundtripCase

__all__ = ["ReferenceImplementation", "check_against_model", "module_tensors", "prefix_sizes", "replacements"]


def module_tensors(adapter: Adapter, arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """The adapter's tensors grouped by module path, keyed by parameter name (``"lora_A.weight"``).

    >>> sorted(module_tensors(adapter, arrays)["layer"])                             # doctest: +SKIP
    ['lora_A.weight', 'lora_B.weight']
    """
    grouped: dict[str, dict[str, np.ndarray]] = {}
    shared: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        name = parse_key(key, adapter.config.peft_type, adapter.config)
        if name.role == "adapter":
            grouped.setdefault(name.module, {})[name.param] = value
        elif name.role == "shared":  # VeRA's projections: every module uses (a slice of) them, SPEC.md 15.5
            shared[name.param] = value
    for tensors in grouped.values():
        tensors.update(shared)
    return grouped


def replacements(adapter: Adapter, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The base-model tensors the adapter's auxiliary tensors replace (SPEC 8.8), keyed ``"<module>.<param>"``:
    the parameters of modules to save, trained biases, embedding base weights.

    >>> replacements(adapter, arrays)                                                # doctest: +SKIP
    {'score.weight': array(...), 'score.bias': array(...)}
    """
    found: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        name = parse_key(key, adapter.config.peft_type, adapter.config)
        if name.role in ("modules_to_save", "bias", "embedding", "base_layer"):
            found[f"{name.module}.{name.param.removeprefix('base_layer.')}"] = value
    return found


def _in_out(spec: Mapping[str, Any]) -> tuple[tuple[int, ...], int]:
    """What the layer's LoRA A takes after its rank (in features, or in channels and kernel) and its output size."""
    kind = spec["kind"]
    if kind in ("linear", "gpt2_conv1d"):
        return (spec["in_features"],), spec["out_features"]
    if kind == "embedding":
        return (spec["num_embeddings"],), spec["embedding_dim"]
    if kind == "layer_norm":
        return (spec["normalized_shape"],), spec["normalized_shape"]
    if kind == "experts":
        return (spec["in_features"],), spec["out_features"]
    return (spec["in_channels"], *spec["kernel_size"]), spec["out_channels"]


def _weight_shape(spec: Mapping[str, Any]) -> tuple[int, ...]:
    kind = spec["kind"]
    if kind == "linear":
        return spec["out_features"], spec["in_features"]
    if kind == "gpt2_conv1d":
        return spec["in_features"], spec["out_features"]
    if kind == "embedding":
        return spec["num_embeddings"], spec["embedding_dim"]
    if kind == "layer_norm":
        return (spec["normalized_shape"],)
    if kind == "experts":
        return spec["num_experts"], spec["out_features"], spec["in_features"]
    return (spec["out_channels"], spec["in_channels"], *spec["kernel_size"])


#: The layer kinds of the corpus' model descriptions each method adapts (PEFT 0.21.2; SPEC.md 6).
_SUPPORTED = {
    "LORA": ("linear", "gpt2_conv1d", "embedding", "conv1d", "conv2d", "experts"),  # experts: SPEC.md 15.1
    "IA3": ("linear", "gpt2_conv1d", "conv2d"),
    "LOHA": ("linear", "conv1d", "conv2d"),
    "LOKR": ("linear", "conv1d", "conv2d"),
    "OFT": ("linear", "conv2d"),  # conv2d: 1x1 kernels (SPEC.md 15.6; the method check refuses others)
    "BOFT": ("linear", "conv2d"),
    "ADALORA": ("linear", "gpt2_conv1d", "conv2d"),
    "VERA": ("linear", "gpt2_conv1d"),
    "VBLORA": ("linear", "gpt2_conv1d"),  # SPEC.md 17.4
    "GRALORA": ("linear", "gpt2_conv1d"),  # SPEC.md 17.5
    "TRAINABLE_TOKENS": ("embedding", "linear"),  # SPEC.md 15.2
    "LN_TUNING": ("layer_norm", "linear"),  # SPEC.md 15.3
    "ROAD": ("linear",),  # SPEC.md 17.1
    "MISS": ("linear",),  # SPEC.md 17.2
    "C3A": ("linear",),  # SPEC.md 17.7
    "HRA": ("linear", "conv2d"),  # SPEC.md 17.3: square kernel, one stride and padding value (_check_supported)
    "DELORA": ("linear",),  # SPEC.md 17.6
    "BEFT": ("linear",),  # SPEC.md 17.8
}


def _check_supported(config: AdapterConfig, path: str, spec: Mapping[str, Any]) -> None:
    """Check 18's second half: a layer kind the method adapts (PEFT raises on the others), SPEC.md 6."""
    method, kind = config.peft_type, spec["kind"]
    if kind not in _SUPPORTED.get(method, ()):
        raise UnsupportedError(f"{method} cannot adapt a {kind} layer", key=path,
                               hint="remove the module from target_modules")
    if method == "LORA" and kind == "embedding" and config.get("lora_bias"):
        raise UnsupportedError("lora_bias is not supported on embedding layers (as in PEFT)", key=path,
                               hint="set lora_bias to false or do not target the embedding")
    if method == "HRA" and kind == "conv2d" and any(len(set(spec.get(f) or [1])) != 1 for f in
                                                    ("kernel_size", "stride", "padding")):
        raise UnsupportedError("HRA's unmerged convolution uses one kernel size, stride and padding value for both "
                               "axes (SPEC.md 17.3)", key=path, hint="do not target this layer")


def _lycoris_params(config: AdapterConfig, path: str, spec: Mapping[str, Any]) -> set[str]:
    """The LoHa/LoKr tensors PEFT creates for this layer: the forms of SPEC.md 6.4/6.5 follow from the config
    (``r_m``, ``decompose_both``, ``decompose_factor``, ``use_effective_conv2d``) and the kernel."""
    kernel = tuple(spec.get("kernel_size") or ())
    effective = bool(kernel) and bool(config.get("use_effective_conv2d")) and any(k != 1 for k in kernel)
    if config.peft_type == "LOHA":
        return {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} | ({"hada_t1", "hada_t2"} if effective else set())
    r, factor = config.rank_for(path), int(config.get("decompose_factor", -1))
    fits, out = _in_out(spec)
    out_l, out_k = factorization(out, factor)
    in_m, in_n = factorization(fits[0], factor)
    params = {"lokr_w1_a", "lokr_w1_b"} if config.get("decompose_both") and r < max(out_l, in_m) / 2 else {"lokr_w1"}
    if r >= max(out_k, in_n) / 2:
        return params | {"lokr_w2"}
    return params | {"lokr_w2_a", "lokr_w2_b"} | ({"lokr_t2"} if effective else set())


def _check_layer(config: AdapterConfig, path: str, spec: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
    fits, out = _in_out(spec)
    method = config.peft_type
    if method in ("LOHA", "LOKR"):  # the tensors' form must be the one PEFT creates (SPEC.md 6.4, 6.5)
        form = _lycoris_params(config, path, spec)
        for param in sorted(set(shapes) - form):
            raise UnexpectedTensorError(f"module {path!r} takes no {param!r} tensor: PEFT's form for this config "
                                        f"and layer is {sorted(form)}", key=make_key(path, param),
                                        hint="save the adapter again with PEFT, or fix use_effective_conv2d / r")
        for param in sorted(form - set(shapes)):
            raise MissingTensorError(f"module {path!r} needs {param!r} (PEFT's form: {sorted(form)})",
                                     key=make_key(path, param), hint="save the adapter again from the trained model")

    def refuse(param: str, message: str) -> ShapeMismatchError:
        return ShapeMismatchError(f"shape {list(shapes[param])}: {message}", key=make_key(path, param),
                                  hint="the adapter was made for another model")

    if method == "LORA":
        a, b = ("lora_embedding_A", "lora_embedding_B") if spec["kind"] == "embedding" else ("lora_A.weight", "lora_B.weight")
        if a not in shapes or b not in shapes:
            raise MissingTensorError(f"a {spec['kind']} layer takes {a} and {b}", key=make_key(path, a if a not in shapes else b))
        if tuple(shapes[a][1:]) != fits:
            raise refuse(a, f"module {path!r} takes {list(fits)} after the rank")
        if spec["kind"] == "experts":  # rank r of the parameter (rank_pattern on '<module>.weight') x experts
            rows = reference.rank_and_alpha(config, f"{path}.weight")[0] * int(spec["num_experts"])
            if shapes[a][0] != rows:
                raise refuse(a, f"the parameter of {path!r} takes r x {spec['num_experts']} experts = {rows} rows")
        if shapes[b][0] != out:
            raise refuse(b, f"module {path!r} has {out} outputs")
    elif method == "VERA":  # the shared projections are checked over all modules: _check_shared
        if tuple(shapes["vera_lambda_b"]) != (out,):
            raise refuse("vera_lambda_b", f"module {path!r} has {out} outputs")
    elif method == "ROAD":  # SPEC.md 17.1: group_size divides the outputs; out/2, out or 2*out values
        problem = _road.out_features_problem(config, out)
        if problem is not None:
            raise UnsupportedError(problem, key=path, pointer="/group_size", hint="do not target this layer")
        length = _road.vector_length(_road.variant(config), out)
        for param in ("road_theta", "road_alpha"):
            if param in shapes and tuple(shapes[param]) != (length,):
                raise refuse(param, f"module {path!r} has {out} outputs: variant {_road.variant(config)} stores "
                                    f"[{length}]")
    elif method == "HRA":  # [F, r]: F the layer's input features (in * k * k), r the config's (SPEC.md 17.3)
        refusal = _hra.layer_refusal(math.prod(fits), config)
        if refusal is not None:  # check 18 before the shapes: apply_GS with r above F has no defined result
            raise UnsupportedError(refusal[1], key=path, pointer=refusal[0], hint=refusal[2])
        hra_shape = _hra.param_shapes(math.prod(fits), config)[_hra.PARAM]
        if tuple(shapes[_hra.PARAM]) != hra_shape:
            raise refuse(_hra.PARAM, f"module {path!r} takes {list(hra_shape)} ({math.prod(fits)} input features, r)")
    elif method == "VBLORA":  # SPEC.md 17.4: in / L and out / L of this layer (the bank: the SDK's checks)
        length = int(config.get("vector_length") or 256)
        for size in (fits[0], out):
            if size % length:
                raise UnsupportedError(f"{size} features of module {path!r} are not divisible by vector_length "
                                       f"{length} (PEFT refuses it)", key=path, pointer="/vector_length",
                                       hint="do not target this layer")
        for param, axis, want in (("vblora_logits_A", 1, fits[0] // length), ("vblora_logits_B", 0, out // length),
                                  ("vblora_logits_A_topk_indices", 1, fits[0] // length),
                                  ("vblora_logits_B_topk_indices", 0, out // length)):
            if param in shapes and shapes[param][axis] != want:
                raise refuse(param, f"module {path!r} takes {want} vectors of length {length} on axis {axis}")
    elif method == "GRALORA":  # SPEC.md 17.5: gralora_k divides this layer's sizes (check 18), then the shapes
        expected = _gralora.param_shapes(fits[0], out, config, path)
        for param, shape in expected.items():
            if param in shapes and tuple(shapes[param]) != shape:
                raise refuse(param, f"module {path!r} ({fits[0]} inputs, {out} outputs) takes {list(shape)}")
    elif method == "DELORA":  # SPEC.md 17.6: A [r, in], B [out, r], w_norm [in] of this layer
        expected = _delora.param_shapes(fits[0], out, _delora.rank_for(config, path))
        for param, shape in expected.items():
            if param in shapes and tuple(shapes[param]) != shape:
                raise refuse(param, f"module {path!r} takes {list(shape)} ({fits[0]} input features, {out} outputs)")
    elif method == "BEFT":  # SPEC.md 17.8: beft_bias [1, out] of this layer
        for param, shape in _beft.param_shapes(out).items():
            if param in shapes and tuple(shapes[param]) != shape:
                raise refuse(param, f"module {path!r} takes {list(shape)} ({out} outputs)")
    elif method == "IA3":
        size = math.prod(shapes["ia3_l"])
        want = fits[0] if config.is_feedforward(path) else out
        if size != want:
            raise refuse("ia3_l", f"module {path!r} needs {want} scales")
    elif method in ("OFT", "BOFT"):  # the config's (adjusted) sizes must give the stored shapes (SPEC.md 15.6, 15.7)
        expected = _oft.param_shapes(math.prod(fits), out, config, path, conv=spec["kind"] == "conv2d")
        for param, shape in expected.items():
            if param in shapes and tuple(shapes[param]) != shape:
                raise refuse(param, f"the config's sizes give {list(shape)} for module {path!r} "
                                    f"({math.prod(fits)} input features)")
    elif method == "C3A":  # [out/b, in/b, b]; a block size not dividing both sizes is UnsupportedError (SPEC.md 17.7)
        kernel = _c3a.kernel_shape(fits[0], out, config, path)
        if _c3a.PARAM in shapes and tuple(shapes[_c3a.PARAM]) != kernel:
            raise refuse(_c3a.PARAM, f"module {path!r} takes {list(kernel)} (block size {kernel[2]})")
    elif method == "MISS":  # the mode's shape on this layer; sizes PEFT refuses are UnsupportedError (SPEC.md 17.2)
        block = _miss.block_shape(fits[0], out, config, path)
        if _miss.PARAM in shapes and tuple(shapes[_miss.PARAM]) != block:
            raise refuse(_miss.PARAM, f"module {path!r} takes {list(block)} ({config.get('init_weights', True)!r} "
                                      f"mode)")
    else:  # LoHa/LoKr: the update must have the weight's size
        zero = {p: np.zeros(s) for p, s in shapes.items()}
        try:
            reference.adapted_weight(spec, np.zeros(_weight_shape(spec)), None, config, path, zero)
        except ValueError:
            raise refuse(sorted(shapes)[0], f"the {method} factors do not make a {list(_weight_shape(spec))} weight") from None

def check_against_model(adapter: Adapter, model: Mapping[str, Any]) -> None:
    """Refuse ``adapter`` as a backend would for the model described by ``model``.

    :raises TargetNotFoundError: an adapted module is not in the model.
    :raises MissingTensorError: a module the config targets has no tensors.
    :raises ShapeMismatchError: a tensor does not fit its layer.

    >>> check_against_model(read_adapter("my-lora"), {"modules": {"q": {"kind": "linear", "in_features": 8,
    ...                                                          "out_features": 8}}})   # doctest: +SKIP
    """
    config = adapter.config
    decoder = model.get("decoder") or {}
    if config.is_prompt_learning:
        if transformer_submodules(config) != 1:  # a model description is a decoder-only model
            raise UnsupportedError(f"num_transformer_submodules {transformer_submodules(config)} on a decoder-only "
                                   "model (2 is for encoder-decoder models)", pointer="/num_transformer_submodules",
                                   hint="load the adapter into the kind of model it was trained for")
        hidden, layers = decoder.get("hidden_size"), decoder.get("num_hidden_layers")
        heads, kv = decoder.get("num_attention_heads"), decoder.get("num_key_value_heads")
        if config.peft_type in ("PROMPT_TUNING", "P_TUNING"):  # P-tuning stores the encoder's output (SPEC 15.8)
            width = hidden
        else:
            width = (decoder.get("head_dim") or hidden // heads) * (kv or heads) if hidden and heads else None
            if layers is not None and config.get("num_layers") not in (None, layers):
                raise ShapeMismatchError(f"num_layers {config['num_layers']} but the model has {layers} layers",
                                         key=PROMPT_KEY, hint="the adapter was made for another model")
        # prefix tuning on a model with num_key_value_heads: PEFT recomputes token_dim from them, whatever the config
        # gives (SPEC 14.3), so only the tensor is checked against the width
        recomputed = config.peft_type == "PREFIX_TUNING" and kv is not None
        if width is not None and not recomputed and config.get("token_dim") not in (None, width):
            raise ShapeMismatchError(f"token_dim {config['token_dim']} but the model needs {width}", key=PROMPT_KEY,
                                     hint="the adapter was made for another model")
        # sizes the config leaves null come from the model (SPEC 14.3): the tensor must fit them
        shape = tuple(adapter.tensors[PROMPT_KEY].shape)
        if config.peft_type == "PREFIX_TUNING" and width is not None and layers is not None \
                and shape[1:] != (layers * 2 * width,):
            raise ShapeMismatchError(f"shape {list(shape)}: this model needs [num_virtual_tokens, {layers} * 2 * "
                                     f"{width}]", key=PROMPT_KEY, hint="the adapter was made for another model")
        if config.peft_type in ("PROMPT_TUNING", "P_TUNING") and width is not None and shape[1:] != (width,):
            raise ShapeMismatchError(f"shape {list(shape)}: this model needs [num_virtual_tokens, {width}]",
                                     key=PROMPT_KEY, hint="the adapter was made for another model")
        return
    unresolved = config.get("target_modules") is None
    config = config.for_model(decoder.get("architecture"))  # a null target_modules: PEFT's default (SPEC 14.2)
    modules = model.get("modules") or _decoder_modules(decoder)
    output = None if model.get("modules") else DECODER_OUTPUT_LAYER  # a `modules` description has no output layer
    expanded = is_all_linear(config.get("target_modules"))
    if expanded:  # SPEC 4.3: every linear layer but the model's output layer
        linear = [p for p, m in modules.items() if m["kind"] in ("linear", "gpt2_conv1d") and p != output]
        if not linear:
            raise TargetNotFoundError("target_modules is 'all-linear' but the model has no linear layer (PEFT raises "
                                      "too)", pointer="/target_modules", hint="list the modules to adapt")
        config = config.replace(target_modules=linear)
    tokens = _token_modules(config, modules)  # each trainable-token target names a module (PEFT raises otherwise)
    refuse_containers(config.matches, modules, config.peft_type)  # PEFT refuses a selected container (SPEC 4.3)
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, info in adapter.tensors.items():
        name = parse_key(key, config.peft_type, config)
        if name.role == "adapter":
            shapes.setdefault(name.module, {})[name.param] = info.shape
    # check 9 where the model-free check (adapterspec.checks) leaves it to the model: a null or 'all-linear'
    # target_modules, and layers tied to the embedding (ensure_weight_tying, TRAINABLE_TOKENS; a model
    # description ties no layer)
    deferred = expanded or unresolved or bool(config.get("ensure_weight_tying")) \
        or config.peft_type == "TRAINABLE_TOKENS"
    for path in shapes if deferred else ():
        if not config.matches(path) and parameter_module(config, path) is None:
            raise UnexpectedTensorError(f"module {path!r} is not targeted by the config"
                                        + (" ('all-linear': the model's linear layers)" if expanded else ""),
                                        key=make_key(path, sorted(shapes[path])[0]),
                                        hint="remove the tensor, or add the module to target_modules")
    for path in shapes:
        if path not in modules:
            raise TargetNotFoundError(f"the adapter has tensors for {path!r}, which the model does not have",
                                      key=path, hint="load it into the model it was trained for")
    _check_auxiliary_modules(adapter, config, modules)
    for path in shapes:
        _check_supported(config, path, modules[path])
    for path in modules:
        if config.matches(path) and path not in shapes:
            raise MissingTensorError(f"the config targets {path!r} but the file holds no tensor for it",
                                     key=make_key(path, PARAMETERS[config.peft_type][0]),
                                     hint="save the adapter again from the trained model")
    for path, params in shapes.items():
        _check_layer(config, path, modules[path], params)
    _check_shared(adapter, config, [modules[path] for path in shapes])
    _check_saved_modules(adapter, config, modules)
    _check_token_rows(adapter, config, modules, tokens)


def _token_modules(config: AdapterConfig, modules: Mapping[str, Any]) -> list[str]:
    """The modules LoRA's ``trainable_token_indices`` re-trains rows of (SPEC 4.1.2, 4.3): an array names the input
    embedding (PEFT's fallback name ``embed_tokens`` in a model description), an object names modules; each
    name matches the modules whose path ends with it.

    :raises TargetNotFoundError: a name matches no module (PEFT raises too).
    """
    indices = config.get("trainable_token_indices") if config.peft_type == "LORA" else None
    if indices is None:
        return []
    names = list(indices) if isinstance(indices, Mapping) else ["embed_tokens"]
    found = []
    for name in names:
        matched = [path for path in modules if path.endswith(name)]
        if not matched:
            raise TargetNotFoundError(f"trainable_token_indices names {name!r}, which matches no module of the model",
                                      pointer="/trainable_token_indices", hint="name the embedding layer")
        found += matched
    return found


def prefix_sizes(config: Mapping[str, Any], decoder: Mapping[str, Any]) -> dict[str, int]:
    """Prefix tuning's ``num_layers``, ``token_dim`` and ``num_attention_heads`` as PEFT 0.21 uses them on the model
    ``decoder`` describes (SPEC 14.3): null ones from the model; on a model with ``num_key_value_heads``,
    ``token_dim`` and the heads recomputed from its key/value heads even when the config gives them (the head
    size is the model's ``head_dim``, else ``hidden_size / num_attention_heads`` as transformers' Llama config).

    >>> prefix_sizes({"token_dim": 8, "num_attention_heads": 1, "num_layers": 2},
    ...              {"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 2})
    {'num_layers': 2, 'token_dim': 8, 'num_attention_heads': 2}
    """
    sizes = {"num_layers": config.get("num_layers"), "token_dim": config.get("token_dim"),
             "num_attention_heads": config.get("num_attention_heads")}
    for field, model_field in (("num_layers", "num_hidden_layers"), ("token_dim", "hidden_size"),
                               ("num_attention_heads", "num_attention_heads")):
        if sizes[field] is None and decoder.get(model_field) is not None:
            sizes[field] = decoder[model_field]
    hidden, model_heads = decoder.get("hidden_size"), decoder.get("num_attention_heads")
    if hidden and model_heads and sizes["token_dim"] and sizes["num_attention_heads"]:
        described = {**decoder, "head_dim": decoder.get("head_dim") or hidden // model_heads}
        sizes |= prefix_key_value_sizes(described, sizes["token_dim"], sizes["num_attention_heads"])
    return {k: int(v) for k, v in sizes.items() if v is not None}


def _check_shared(adapter: Adapter, config: AdapterConfig, adapted: list[Mapping[str, Any]]) -> None:
    """VeRA (SPEC.md 15.5): ``vera_A`` is ``[r, largest input]``, ``vera_B`` ``[largest output, r]`` of the adapted
    layers."""
    if config.peft_type != "VERA" or not adapted:
        return
    sizes = [(_in_out(spec)[0][0], _in_out(spec)[1]) for spec in adapted]
    r = int(config.get("r", 256))
    for param, want in (("vera_A", (r, max(i for i, _ in sizes))), ("vera_B", (max(o for _, o in sizes), r))):
        info = adapter.tensors.get(shared_key(param))
        if info is not None and tuple(info.shape) != want:
            raise ShapeMismatchError(f"shape {list(info.shape)}: the adapted layers need {list(want)} (r, and the "
                                     "largest input / output size)", key=shared_key(param),
                                     hint="the adapter was made for another model")


#: The roles of auxiliary tensors that replace a parameter of a module of the model (SPEC.md 5.3, 8.8).
_REPLACING = ("modules_to_save", "embedding", "bias", "base_layer")


def _module_params(spec: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The parameters a described module has, with their shapes: ``weight``, and ``bias`` when it has one."""
    params = {"weight": _weight_shape(spec)}
    if spec["kind"] not in ("embedding", "experts") and spec.get("bias", True):
        params["bias"] = (_in_out(spec)[1],)
    return params


def _check_auxiliary_modules(adapter: Adapter, config: AdapterConfig, modules: Mapping[str, Mapping[str, Any]]) -> None:
    """Check 18 for auxiliary tensors: the module whose parameter a tensor replaces (a module saved whole, an
    embedding saved whole, a trained bias) is in the model, as for method tensors (the torch backend's answer)."""
    for key in adapter.tensors:
        name = parse_key(key, config.peft_type, config)
        if name.role in _REPLACING and name.module not in modules:
            raise TargetNotFoundError(f"the key names module {name.module!r}, which is not in the model", key=key,
                                      hint="check the adapter was trained for this architecture (module names)")


def _check_saved_modules(adapter: Adapter, config: AdapterConfig, modules: Mapping[str, Mapping[str, Any]]) -> None:
    """Checks 19 and 21 for auxiliary tensors: each replaces a parameter the module has (a bias of a layer without
    one is unexpected), with that parameter's shape."""
    for key, info in adapter.tensors.items():
        name = parse_key(key, config.peft_type, config)
        spec = modules.get(name.module)
        if name.role not in _REPLACING or spec is None:
            continue
        params = _module_params(spec)
        param = name.param.removeprefix("base_layer.")
        if param not in params:
            raise UnexpectedTensorError(f"module {name.module!r} has no parameter {param!r}", key=key,
                                        hint="check the config (modules_to_save, bias) matches the tensors")
        if tuple(info.shape) != params[param]:
            raise ShapeMismatchError(f"shape {list(info.shape)}: module {name.module!r} has {param} "
                                     f"{list(params[param])}", key=key, hint="the adapter was made for another model")


def _check_token_rows(adapter: Adapter, config: AdapterConfig, modules: Mapping[str, Mapping[str, Any]],
                      paths: list[str]) -> None:
    """LoRA's ``trainable_token_indices`` (SPEC.md 4.1.2): each embedding's rows are inside its weight, and its
    ``trainable_tokens_delta`` is ``[len(indices), dim]``."""
    for path in paths:
        key = make_key(path, TRAINABLE_TOKENS_PARAM)
        info = adapter.tensors.get(key)
        if info is None:
            raise MissingTensorError(f"trainable_token_indices names {path!r} but the file holds no rows for it",
                                     key=key, hint="save the adapter again from the trained model")
        rows = _token_rows(config, path)
        weight = _weight_shape(modules[path])
        if tuple(info.shape) != (len(rows), *weight[1:]) or any(not 0 <= i < weight[0] for i in rows):
            raise ShapeMismatchError(f"shape {list(info.shape)}: rows {rows} of {path!r}'s {list(weight)} weight",
                                     key=key, hint="the adapter was made for another model")


def _token_rows(config: Mapping[str, Any], path: str) -> list[int]:
    """The rows ``trainable_token_indices`` re-trains in the module at ``path`` (an array: the input embedding's)."""
    return [int(i) for i in token_indices(config, path) or []]


#: The output layer of the model a ``decoder`` description implies (``LlamaForCausalLM.lm_head``, untied).
DECODER_OUTPUT_LAYER = "lm_head"


def _decoder_modules(decoder: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The layers of the transformers ``LlamaForCausalLM`` a ``decoder`` description implies (conformance_tests/
    README.md, section 4; ``{}`` for other architectures): ``model.embed_tokens`` (its input embedding), each layer's
    bias-free attention and MLP projections, and ``lm_head`` (its output layer). Its RMS norms are left out: no
    model description kind is an RMS norm, and no case adapts one.

    >>> sorted(_decoder_modules({"architecture": "llama", "hidden_size": 8, "intermediate_size": 16,
    ...                          "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 32}))[:3]
    ['lm_head', 'model.embed_tokens', 'model.layers.0.mlp.down_proj']
    """
    if decoder.get("architecture") != "llama":
        return {}
    hidden, inter, heads = decoder["hidden_size"], decoder["intermediate_size"], decoder["num_attention_heads"]
    head_dim = decoder.get("head_dim") or hidden // heads  # transformers' LlamaConfig
    kv = head_dim * (decoder.get("num_key_value_heads") or heads)
    vocab = decoder.get("vocab_size", 32000)
    sizes = {"self_attn.q_proj": (hidden, heads * head_dim), "self_attn.k_proj": (hidden, kv),
             "self_attn.v_proj": (hidden, kv), "self_attn.o_proj": (heads * head_dim, hidden),
             "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden)}
    layers = {f"model.layers.{i}.{name}": {"kind": "linear", "in_features": n_in, "out_features": n_out, "bias": False}
              for i in range(decoder["num_hidden_layers"]) for name, (n_in, n_out) in sizes.items()}
    return {"model.embed_tokens": {"kind": "embedding", "num_embeddings": vocab, "embedding_dim": hidden}, **layers,
            DECODER_OUTPUT_LAYER: {"kind": "linear", "in_features": hidden, "out_features": vocab, "bias": False}}


class ReferenceImplementation:
    """adapterspec's core (reading, checks, writing) with :mod:`adapterspec.conformance.reference` for the math."""

    name = "reference"
    checks_error_class = True

    def supports(self, case: Any) -> bool | str:
        return True

    def validate_config(self, config: Mapping[str, Any]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            validate_config(config)

    def _read(self, path: Path, model: Mapping[str, Any], options: Mapping[str, Any] | None = None) -> Adapter:
        options = options or {}
        # its warnings reach the runner, which checks the ones a case expects
        adapter = read_adapter(path, allow_pickle=bool(options.get("allow_pickle")), verify=bool(options.get("verify")))
        check_against_model(adapter, model)
        if adapter.config.get("peft_type") == "VBLORA":  # SPEC.md 17.4: the top-k indices' and weights' values
            errors = _vblora.value_errors(adapter.config, adapter.load_tensors("numpy"))
            if errors:
                raise errors[0]
        return adapter

    def load_folder(self, case: FolderCase, path: Path) -> None:
        folders = list_adapters(path) if case.multi else {"default": path}
        for folder in folders.values():
            self._read(folder, case.model, case.options)

    def tensors(self, adapter: Adapter) -> dict[str, np.ndarray]:
        """The adapter's tensors by key (BF16 read as float32, exactly). A subclass may distort them (tests)."""
        return _io.read_arrays(adapter.weights_file)  # type: ignore[arg-type]  # read from a folder: it has a file

    def config(self, adapter: Adapter) -> Mapping[str, Any]:
        """The config the math uses. A subclass may distort it (tests)."""
        return adapter.config

    def run_numeric(self, case: NumericCase, case_dir: Path) -> dict[str, np.ndarray]:
        adapter = self._read(case.adapter, case.model)
        arrays = self.tensors(adapter)
        inputs = _io.read_arrays(case.inputs) if case.inputs else {}
        config = self.config(adapter)
        if case.compute == "prefix_key_values":
            sizes = prefix_sizes(config, case.model.get("decoder") or {})
            return {"past_key_values": reference.prefix_key_values({**config, **sizes}, arrays[PROMPT_KEY])}
        if case.compute == "prompt_concat":
            return {"inputs_embeds": reference.prompt_concat(arrays[PROMPT_KEY], inputs["inputs_embeds"])}
        base = _io.read_arrays(case.weights) if case.weights else {}
        base.update(replacements(adapter, arrays))
        grouped = module_tensors(adapter, arrays)
        tokens = set(_token_modules(adapter.config, case.modules))
        out = {}
        for path, x in inputs.items():
            weights = {p: base.get(f"{path}.{p}") for p in ("weight", "bias")}
            if path in tokens:  # the rows replace the weight's (SPEC 4.1.2, 15.2), under any adapter of the layer
                if grouped.get(path):
                    raise UnsupportedError("the reference implementation does not compute trainable tokens on a "
                                           "layer the method adapts too", key=path, pointer="/trainable_token_indices",
                                           hint="check this case with the torch or Keras implementation")
                delta = {"trainable_tokens_delta": arrays[make_key(path, TRAINABLE_TOKENS_PARAM)]}
                weights["weight"] = token_weight(weights["weight"], {"token_indices": _token_rows(config, path)}, delta)
            out[path] = reference.forward(case.modules[path], weights, x, config, path, grouped.get(path, {}))
        return out

    def roundtrip(self, case: RoundtripCase, src: Path, dst: Path) -> None:
        assert case.source is not None
        adapter = self._read(src, case.source.model)
        write_adapter(dst, adapter.config, adapter.load_tensors("numpy"))
