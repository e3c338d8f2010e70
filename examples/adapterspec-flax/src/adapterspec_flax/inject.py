"""Injecting adapters: find the targeted ``nnx.Linear``/``nnx.Embed`` layers, wrap them, add fresh weights.

Everything is checked and every new array built before the model is touched, so a raise leaves it as it was.

>>> inject(model, AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q_proj"]}),
...        "default", LoadOptions())                                  # doctest: +SKIP
['model.layers.0.self_attn.q_proj', 'model.layers.1.self_attn.q_proj']
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from adapterspec import AdapterConfig, LoadOptions
from adapterspec.config import rounds_delta_first
from adapterspec.errors import AdapterExistsError, TargetNotFoundError, UnsupportedError

from .devices import place
from .graph import Key, check_settable, get_state, iter_modules, set_node, set_state
from .layers import (
    WRAPPERS,
    AdaptedEmbed,
    AdaptedLinear,
    AdapterParam,
    FrozenParam,
    IA3Weights,
    LoraWeights,
    Weights,
    frozen_type,
)

__all__ = ["SUPPORTED_METHODS", "base_params", "check_supported", "find_targets", "inject", "model_type", "spec_names",
           "thaw_base"]

#: The methods this backend adapts layers with.
SUPPORTED_METHODS = ("LORA", "IA3")

# Config fields that, when set, ask for something this backend does not do (PEFT feature -> why).
_UNSUPPORTED_FIELDS = {
    "modules_to_save": "saving whole modules",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication",
    "target_parameters": "adapting bare parameters",
    "megatron_config": "Megatron parallel layers",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA",
    "arrow_config": "Arrow routing",
    "use_bdlora": "BD-LoRA",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
}
# init_lora_weights values whose adapters this backend loads (their init only sets the first A and B, which the file
# replaces); the others rewrite the base weights or need data, and are refused. A new 'orthogonal' one is refused too.
_INITS = (True, False, "gaussian", "eva", "orthogonal")


def check_supported(config: AdapterConfig) -> None:
    """Refuse a config asking for what this backend cannot do, before anything happens.

    :raises UnsupportedError: with the JSON pointer of the field.
    """
    if config.peft_type not in SUPPORTED_METHODS:
        raise UnsupportedError(f"the flax backend does not implement {config.peft_type} adapters",
                               pointer="/peft_type", hint=f"use one of {', '.join(SUPPORTED_METHODS)}")
    for field, feature in _UNSUPPORTED_FIELDS.items():
        if config.get(field):
            raise UnsupportedError(f"{feature} ({field}) is not supported by the flax backend",
                                   pointer=f"/{field}", hint=f"remove {field!r}, or load the adapter in torch")
    if config.get("bias", "none") != "none":
        raise UnsupportedError(f"bias={config['bias']!r} (training base-layer biases) is not supported",
                               pointer="/bias", hint='use bias="none"')
    if config.peft_type == "LORA" and config["init_lora_weights"] not in _INITS:
        raise UnsupportedError(
            f"init_lora_weights={config['init_lora_weights']!r} changes the base weights or needs data",
            pointer="/init_lora_weights", hint="use true, false or \"gaussian\" (a trained adapter loads the same)")
    if isinstance(config.get("target_modules"), str) and config["target_modules"] == "all-linear":
        raise UnsupportedError("target_modules='all-linear' needs the model's output layer, which NNX does not name",
                               pointer="/target_modules", hint="list the modules, e.g. [\"q_proj\", \"v_proj\"]")


def model_type(model: nnx.Module) -> str | None:
    """The architecture the model names (``model.config.model_type``, as transformers' models and their ports do),
    for PEFT's default targets (SPEC.md 14.2); ``None`` for a plain NNX model.

    >>> model_type(nnx.Linear(2, 2, rngs=nnx.Rngs(0))) is None
    True
    """
    found = getattr(getattr(model, "config", None), "model_type", None)
    return found if isinstance(found, str) else None


def spec_names(options: LoadOptions) -> Callable[[str], str]:
    """Model path -> spec module path: the inverse of ``options.module_map`` (identity for unmapped paths).

    :raises UnsupportedError: ``module_map`` is a function (it maps spec paths to model paths, and the
        backend has only the model's paths to start from).

    >>> spec_names(LoadOptions(module_map={"embed": "tok"}))("tok")
    'embed'
    """
    mapping = options.module_map
    if mapping is None:
        return lambda path: path
    if not isinstance(mapping, Mapping):
        raise UnsupportedError(
            "the flax backend needs module_map as a dict (spec path -> model path): a function cannot be "
            "inverted to name the model's modules", hint="pass {spec_path: model_path, ...}")
    inverse = {framework: spec for spec, framework in mapping.items()}
    return lambda path: inverse.get(path, path)


def find_targets(model: nnx.Module, config: AdapterConfig,
                 options: LoadOptions | None = None) -> list[tuple[str, tuple[Key, ...], nnx.Module]]:
    """``(spec module path, attribute path, layer)`` of every module ``config`` adapts, in graph order.

    A layer already wrapped is matched by its own path (never its inner ``base_layer``).

    :raises TargetNotFoundError: nothing matches, or a ``module_map`` entry names no module.

    >>> [spec for spec, _, _ in find_targets(model, cfg)]                # doctest: +SKIP
    ['model.layers.0.self_attn.q_proj', ...]
    """
    options = options or LoadOptions()
    spec_of = spec_names(options)
    modules = list(iter_modules(model))
    found = []
    for dotted, path, node in modules:
        spec = spec_of(dotted)
        if config.matches(spec):
            found.append((spec, path, node))
    if isinstance(options.module_map, Mapping):
        present = {dotted for dotted, _, _ in modules}
        for spec, framework in options.module_map.items():
            if config.matches(spec) and framework not in present:
                raise TargetNotFoundError(f"module_map sends {spec!r} to {framework!r}, which the model does not have",
                                          key=spec, hint="fix the module_map entry")
    if not found:
        raise TargetNotFoundError(
            f"no module of the model matches target_modules={config.get('target_modules')!r}", pointer="/target_modules",
            hint=f"module paths look like {modules[0][0]!r}" if modules else "the model has no sub-modules")
    return found


def _initialize(options: LoadOptions) -> bool:
    # LoadOptions.initialize is False when the file fills every variable right after (load_adapter)
    return bool(getattr(options, "initialize", True))


def _rng(adapter_name: str, module: str) -> np.random.Generator:
    # NumPy, not jax.random: a fresh adapter is built on the host (no XLA compile per shape) and put
    # on its device once; a deterministic seed per adapter and module keeps injection reproducible.
    return np.random.default_rng(zlib.crc32(f"{adapter_name}/{module}".encode()))


def _rounding(config: AdapterConfig, *, embedding: bool) -> tuple[bool, bool]:
    """Whether PEFT rounds the delta to a half-precision weight first on a merge, and on an unmerge (SPEC.md 7.3,
    :func:`adapterspec.config.rounds_delta_first`, one rule for every backend)."""
    return (rounds_delta_first(config, embedding=embedding, unmerge=False),
            rounds_delta_first(config, embedding=embedding, unmerge=True))


def _lora_weights(config: AdapterConfig, spec: str, base: nnx.Module, adapter_name: str,
                  options: LoadOptions) -> LoraWeights:
    r = config.rank_for(spec)
    init = config["init_lora_weights"] if _initialize(options) else None  # None: zeros, the file fills them next
    rng = _rng(adapter_name, spec)
    if isinstance(base, nnx.Embed):
        if config["use_dora"] or config["lora_bias"]:
            raise UnsupportedError("DoRA and lora_bias on an embedding are not implemented by the flax backend",
                                   key=spec, hint="exclude the embedding, or use plain LoRA")
        like = base.embedding[...]
        rows, cols = like.shape
        # PEFT: A zeros and B normal, or both normal with init_lora_weights=False
        a = rng.standard_normal((rows, r)) if init is False else np.zeros((rows, r))
        b = np.zeros((r, cols)) if init is None else rng.standard_normal((r, cols))
        merge_first, unmerge_first = _rounding(config, embedding=True)
        return LoraWeights(spec, place(a, like, options), place(b, like, options), scaling=config.scaling_for(spec),
                           trainable=options.trainable, round_merge=merge_first, round_unmerge=unmerge_first)
    like = base.kernel[...]
    fan_in, out = like.shape
    if init is None:
        a = np.zeros((fan_in, r))
    elif init == "gaussian":
        a = rng.standard_normal((fan_in, r)) / r
    else:  # kaiming_uniform(a=sqrt(5)) of torch's [r, in] A: U(-1/sqrt(in), 1/sqrt(in))
        a = rng.uniform(-1, 1, (fan_in, r)) / math.sqrt(fan_in)
    b = rng.uniform(-1, 1, (r, out)) / math.sqrt(r) if init is False else np.zeros((r, out))
    bias = np.zeros((out,)) if config["lora_bias"] else None
    scaling = config.scaling_for(spec)
    magnitude = None
    if config["use_dora"]:  # PEFT: the norm of each output's weights, the (zero or random) delta included
        magnitude = (np.zeros((out,)) if init is None
                     else np.linalg.norm(np.asarray(like, dtype=np.float64) + scaling * (a @ b), axis=0))
    merge_first, unmerge_first = _rounding(config, embedding=False)
    return LoraWeights(
        spec, place(a, like, options), place(b, like, options), scaling=scaling,
        bias=None if bias is None else place(bias, like, options),
        magnitude=None if magnitude is None else place(magnitude, like, options), trainable=options.trainable,
        round_merge=merge_first, round_unmerge=unmerge_first)


def _ia3_weights(config: AdapterConfig, spec: str, base: nnx.Module, adapter_name: str,
                 options: LoadOptions) -> IA3Weights:
    if not isinstance(base, nnx.Linear):
        raise UnsupportedError("IA3 adapts linear layers only", key=spec, hint="exclude this module from target_modules")
    like = base.kernel[...]
    feedforward = config.is_feedforward(spec)
    size = like.shape[0] if feedforward else like.shape[1]
    random = _initialize(options) and not config["init_ia3_weights"]
    init = _rng(adapter_name, spec).standard_normal((size,)) if random else np.ones((size,))
    return IA3Weights(spec, place(init, like, options), feedforward=feedforward, trainable=options.trainable)


def inject(model: nnx.Module, config: AdapterConfig, adapter_name: str, options: LoadOptions) -> list[str]:
    """Add adapter ``adapter_name`` (inactive) to every layer ``config`` targets, all or nothing.

    Each target (an ``nnx.Linear`` or ``nnx.Embed``) is replaced at its attribute path by an
    :class:`~adapterspec_flax.layers.AdaptedLinear` / :class:`~adapterspec_flax.layers.AdaptedEmbed`
    holding it, unless already wrapped. A null ``target_modules`` (IA3: ``feedforward_modules``) is PEFT's default
    for the model's type (SPEC.md 14.2), and the adapter keeps that config (it saves the modules). New weights
    follow ``init_lora_weights`` (LoRA's B is zero) or ``init_ia3_weights`` (ones) -- or are zeros when
    ``options.initialize`` is false (the file fills them next) -- in the layer's dtype (float32 on a half-precision
    layer, SPEC.md 7.5) and on its device unless ``options`` say otherwise. With ``options.trainable`` and
    ``options.freeze_base`` (PEFT's ``get_peft_model``), every base ``nnx.Param`` becomes a
    :class:`~adapterspec_flax.layers.FrozenParam` (the same variable object) until the last adapter so injected is
    deleted: ``wrt=nnx.Param`` then trains the adapters alone.

    :returns: the spec module paths that received the adapter.
    :raises AdapterExistsError: ``adapter_name`` is loaded already.
    :raises TargetNotFoundError: no module matches.
    :raises UnsupportedError: a target is not an ``nnx.Linear``/``nnx.Embed``, the config asks for a
        feature this backend lacks, or ``target_modules`` (IA3: ``feedforward_modules``) is null and PEFT has no
        default for the model's type (:func:`model_type`; :meth:`AdapterConfig.for_model`) -- the error's pointer
        names the field.

    >>> inject(model, cfg, "default", LoadOptions())                    # doctest: +SKIP
    ['model.layers.0.self_attn.q_proj', ...]
    """
    state = get_state(model)
    if adapter_name in state.names:
        raise AdapterExistsError(f"the model already has an adapter named {adapter_name!r}", key=adapter_name,
                                 hint="delete it first, or choose another adapter_name")
    config = config.for_model(model_type(model))  # SPEC 14.2: PEFT's default for a null target_modules, as torch's
    check_supported(config)
    if _initialize(options) and config.peft_type == "LORA" and config["init_lora_weights"] == "orthogonal":
        raise UnsupportedError("a new adapter with init_lora_weights='orthogonal' (PEFT's orthogonal start) is not "
                               "implemented by the flax backend", pointer="/init_lora_weights",
                               hint="use true, false or \"gaussian\" (a trained adapter loads the same)")
    freezing = bool(options.trainable and options.freeze_base)
    frozen = base_params(model) if freezing else []
    plan: list[tuple[tuple[Key, ...], AdaptedLinear | AdaptedEmbed, bool, Weights]] = []
    for spec, path, node in find_targets(model, config, options):
        wrapper: Any = node if isinstance(node, (AdaptedLinear, AdaptedEmbed)) else None
        base = wrapper.base_layer if wrapper is not None else node
        if type(base) not in WRAPPERS:
            raise UnsupportedError(
                f"{type(base).__module__}.{type(base).__qualname__} is not a layer the flax backend can adapt "
                "(nnx.Linear, nnx.Embed)", key=spec, hint="exclude it from target_modules")
        if wrapper is None:
            check_settable(model, path)
            wrapper = WRAPPERS[type(base)](base)
            wrapper.active = state.active
        build = _lora_weights if config.peft_type == "LORA" else _ia3_weights
        plan.append((path, wrapper, wrapper is not node, build(config, spec, base, adapter_name, options)))
    for path, wrapper, is_new, weights in plan:
        wrapper.adapters[adapter_name] = weights
        if is_new:
            set_node(model, path, wrapper)
    for variable, frozen_class in frozen:
        variable.__class__ = frozen_class
    set_state(model, dataclasses.replace(state, names=(*state.names, adapter_name), configs=(*state.configs, config),
                                         freezers=(*state.freezers, adapter_name) if freezing else state.freezers))
    return [weights.module for _, _, _, weights in plan]


def base_params(model: nnx.Module) -> list[tuple[nnx.Variable[Any], type]]:
    """Every ``nnx.Param`` of ``model`` that belongs to no adapter (each shared one once), with the
    :class:`~adapterspec_flax.layers.FrozenParam` class it takes when frozen.

    :raises UnsupportedError: a parameter's class cannot be switched (:func:`~adapterspec_flax.layers.frozen_type`).

    >>> [type(v).__name__ for v, _ in base_params(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))]
    ['Param', 'Param']
    """
    return [(node, frozen_type(type(node))) for _, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Param) and not isinstance(node, AdapterParam)]


def thaw_base(model: nnx.Module) -> None:
    """Give every :class:`~adapterspec_flax.layers.FrozenParam` of ``model`` its class back (the last adapter that
    froze the base is gone).

    >>> layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    >>> layer.kernel.__class__ = FrozenParam
    >>> thaw_base(layer); type(layer.kernel).__name__
    'Param'
    """
    for _, node in nnx.iter_graph(model):
        if isinstance(node, FrozenParam):
            node.__class__ = type(node).thawed
