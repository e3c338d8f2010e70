"""Prefix and prompt tuning on keras-hub causal LMs, through their decoders' key/value cache.

**Prefix tuning.** PEFT's prefix tuning gives every decoder layer ``num_virtual_tokens`` extra keys and
values (after RoPE, so taken as they are) that every token attends to, and shifts the tokens' positions by
``num_virtual_tokens`` -- exactly what a pre-filled key/value cache does. keras-hub's decoder layers that
take a self-attention cache (:mod:`~adapterspec_keras.kv_cache`: the Llama family -- Llama, Mistral,
Mixtral, Qwen 2/3 and their MoE variants... --, the generic ``TransformerDecoder`` of GPT-2, Gemma,
Gemma 2 and Gemma 3) get their ``call`` patched (on the instance) so that a plain forward pass --
``model(x)``, ``predict``, ``fit`` -- runs each layer with a cache holding the adapter's prefix, the
tokens written after it at index ``num_virtual_tokens``, and the padding mask extended with ones for the
prefix (PEFT's ``attention_mask`` handling).

**Prompt tuning.** PEFT prepends the ``num_virtual_tokens`` prompt embeddings to ``inputs_embeds`` (not
multiplied by any embedding scale: transformers 5 scales Gemma's embeddings inside the embedding module)
and extends the attention mask with ones. With causal attention the virtual tokens, at positions
``0 .. n-1``, never see the real tokens, so this is prefix tuning whose per-layer keys and values are the
ones the decoder computes for the prompt itself: in every forward pass the first decoder layer's patched
``call`` runs all decoder layers on the prompt (batch 1, positions from 0, in the graph so that the
prompt stays trainable) and keeps each layer's cache; each layer then runs the real tokens at positions
``n ..`` against its cache, as for prefix tuning. The model returns the logits of the real tokens only:
they equal ``PeftModelForCausalLM``'s ``logits[:, num_virtual_tokens:]`` (PEFT returns ``n + L``
positions, the first ``n`` for the virtual tokens). Gemma / Gemma 2 prompts trained with transformers < 5
(which scaled ``inputs_embeds`` -- the prompt included -- by sqrt(hidden) in the model) differ by that scale.

**P-tuning.** Its file holds the prompt encoder's output (SPEC.md 15.8), used exactly as prompt tuning's
``prompt_embeddings``: a loaded P-tuning adapter runs, trains (the prompt itself) and saves as a prompt; a
fresh one, which would need PEFT's encoder (MLP/LSTM), is refused, as the torch backend does. So for prefix tuning
with ``prefix_projection``: its file holds the projection MLP's output (SPEC.md 4.1.4); a fresh one is refused.

Learned absolute position embeddings (GPT-2's ``wpe``) are patched to start after the virtual tokens, as
transformers counts positions from the cache length (a prompt gets ``wpe[0 .. n-1]`` added).
``generate()`` works too: when ``call_with_cache`` gives a layer its own cache, the virtual tokens' keys and
values go in front of it, the write index moves by ``num_virtual_tokens``, and the updated cache is handed
back without them (greedy generation gives PEFT's tokens).
Refused with :class:`~adapterspec.errors.UnsupportedError`, naming why: decoders without a cache
interface, models with a vision encoder, encoder-decoder configs, a fresh prefix with ``prefix_projection``,
and a fresh prompt initialised from text or vocabulary samples.

>>> check_prompt_learning(model, prefix_config)                        # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from keras import ops

from adapterspec import AdapterConfig
from adapterspec._rules import prompt_init_refusal, starts_at_zero
from adapterspec.errors import UnsupportedError

from ._ops import HALF
from .bank import AdapterBank, Ref
from .kv_cache import CacheInterface, cache_interface
from .layers import Layout
from .switch import note_caller

__all__ = ["PrefixSlot", "check_prompt_learning", "decoder_layers", "inject_prefix", "remove_prefix"]

_METHODS = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")
#: the methods whose tensor is a prompt prepended to the input embeddings (P-tuning's file holds its encoder's output).
_PROMPTS = ("PROMPT_TUNING", "P_TUNING")


@dataclass
class PrefixSlot:
    """One prefix or prompt adapter: its bank row, the shape its embeddings are read in, and (prompt tuning,
    during a forward pass) the per-layer keys/values of the prompt, ``(1, 2, nvt, heads, head_dim)`` each."""

    bank: AdapterBank
    ref: Ref
    layout: Layout
    num_virtual_tokens: int
    num_layers: int
    heads: int
    head_dim: int
    method: str = "PREFIX_TUNING"
    key_order: Any = None
    flow: list[Any] | None = field(default=None, repr=False)


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of a keras-hub causal LM, if they take a key/value cache a prefix can go into.

    :raises UnsupportedError: not a causal LM with such layers (names the layer class).

    >>> len(decoder_layers(llama_causal_lm))                           # doctest: +SKIP
    2
    """
    _interfaces(model)
    return list(model.backbone.transformer_layers)


def _interfaces(model: Any) -> list[CacheInterface]:
    backbone = getattr(model, "backbone", None)
    layers = list(getattr(backbone, "transformer_layers", None) or [])
    if backbone is None or not layers or not hasattr(model, "call_with_cache"):
        raise UnsupportedError(f"prompt learning needs a keras-hub causal LM; {type(model).__name__} is not one",
                               pointer="/peft_type", hint="pass the CausalLM task model, or use LoRA/IA3")
    out = []
    for layer in layers:
        iface = cache_interface(layer)
        if iface is None:
            raise UnsupportedError(
                f"{type(layer).__name__} ({type(model).__name__}) has no self-attention cache interface to hold "
                "the virtual tokens (decoders of the Llama family, GPT-2 and Gemma 1-3 have one)",
                pointer="/peft_type", hint="use LoRA/IA3 on this model, or the torch backend for prompt learning")
        out.append(iface)
    if getattr(backbone, "vision_encoder", None) is not None:
        raise UnsupportedError(f"{type(backbone).__name__} has a vision encoder: its image tokens' bidirectional mask "
                               "has no room for virtual tokens", pointer="/peft_type",
                               hint="use a text-only model, LoRA/IA3, or the torch backend")
    return out


def check_prompt_learning(model: Any, config: AdapterConfig) -> AdapterConfig:
    """Refuse prompt learning ``model`` cannot run exactly (see the module docstring).

    :returns: ``config`` with the sizes it leaves null read from the backbone, as PEFT reads them from
        the transformers config (SPEC.md 14.3): ``num_layers``, ``token_dim`` (the hidden size; key/value
        heads x head_dim for prefix tuning) and ``num_attention_heads`` (key/value heads for prefix tuning).
    :raises UnsupportedError: naming the reason.

    >>> check_prompt_learning(model, AdapterConfig.from_dict({"peft_type": "PROMPT_TUNING", ...}))  # doctest: +SKIP
    """
    if config.peft_type not in _METHODS:
        raise UnsupportedError(f"the keras backend does not implement {config.peft_type}", pointer="/peft_type",
                               hint="use PREFIX_TUNING, PROMPT_TUNING, P_TUNING or LoRA/IA3")
    if config.get("task_type") in ("SEQ_CLS", "TOKEN_CLS") or config.get("modules_to_save"):
        field = "task_type" if config.get("task_type") in ("SEQ_CLS", "TOKEN_CLS") else "modules_to_save"
        raise UnsupportedError("the keras backend does not implement prompt learning with a classifier head saved "
                               "whole (task_type SEQ_CLS / TOKEN_CLS, modules_to_save; SPEC.md 15.9)",
                               pointer=f"/{field}", hint="load it with the torch backend (adapterspec_torch) or PEFT")
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise UnsupportedError("encoder-decoder prompt learning is not supported by the keras backend",
                               pointer="/num_transformer_submodules", hint="use a decoder-only causal LM")
    ifaces = _interfaces(model)
    layers = list(model.backbone.transformer_layers)
    positions = _position_embeddings(model)
    config = _fill_sizes(model, config, ifaces, layers)
    if config.peft_type in _PROMPTS:
        hidden = _hidden_dim(model)
        if int(config["token_dim"]) != hidden:
            raise UnsupportedError(f"token_dim {config['token_dim']} is not this model's hidden size {hidden}",
                                   pointer="/token_dim", hint="load the adapter into the model it was trained for")
        if len(positions) > 1:
            raise UnsupportedError(f"{type(model).__name__} has {len(positions)} position embeddings; the prompt "
                                   "needs one", pointer="/peft_type", hint="use LoRA/IA3 on this model")
        return config
    if int(config["num_layers"]) != len(layers):
        raise UnsupportedError(f"the prefix is for {config['num_layers']} layers; the model has {len(layers)}",
                               pointer="/num_layers", hint="load the adapter into the model it was trained for")
    heads, head_dim = ifaces[0].kv_shape(layers[0])
    if int(config["token_dim"]) != heads * head_dim:
        raise UnsupportedError(f"token_dim {config['token_dim']} is not key/value heads x head_dim = "
                               f"{heads} x {head_dim} of this model", pointer="/token_dim",
                               hint="load the adapter into the model it was trained for")
    return config


def _fill_sizes(model: Any, config: AdapterConfig, ifaces: list[Any], layers: list[Any]) -> AdapterConfig:
    """The sizes ``config`` leaves null, from the backbone (PEFT's ``_prepare_prompt_learning_config``); for prefix
    tuning on a backbone with ``num_key_value_heads`` (keras-hub's name of the transformers config field PEFT looks
    for), ``token_dim`` and ``num_attention_heads`` from its key/value heads even when the config gives them, as
    PEFT 0.21 recomputes them (SPEC.md 14.3; the torch backend reads the transformers config:
    :func:`adapterspec._rules.prefix_key_value_sizes`)."""
    backbone = model.backbone
    if config.peft_type == "PREFIX_TUNING":
        heads, head_dim = ifaces[0].kv_shape(layers[0])
        sizes = {"num_layers": len(layers), "token_dim": heads * head_dim, "num_attention_heads": heads}
    else:
        query_heads = getattr(backbone, "num_query_heads", None) or getattr(backbone, "num_heads", None)
        sizes = {"num_layers": len(layers), "token_dim": _hidden_dim(model), "num_attention_heads": query_heads}
    changes = {k: int(v) for k, v in sizes.items() if config.get(k) is None and v is not None}
    if config.peft_type == "PREFIX_TUNING" and getattr(backbone, "num_key_value_heads", None) is not None:
        changes |= {k: v for k, v in sizes.items() if k != "num_layers" and v != config.get(k)}
    return config.replace(**changes) if changes else config


def _hidden_dim(model: Any) -> int:
    hidden = getattr(model.backbone, "hidden_dim", None)
    if hidden is None:
        hidden = model.backbone.token_embedding.output_dim
    return int(hidden)


def inject_prefix(model: Any, state: Any, config: AdapterConfig, adapter_name: str, bank: AdapterBank,
                  options: Any) -> None:
    """Reserve the adapter's ``prompt_embeddings`` in ``bank`` and patch the decoder layers (once) to use it.

    :raises UnsupportedError: a fresh prompt-tuning adapter initialised from text or vocabulary samples.

    >>> inject_prefix(model, state, config, "default", bank, LoadOptions())  # doctest: +SKIP
    """
    from .devices import target_of

    ifaces = _interfaces(model)
    layers = list(model.backbone.transformer_layers)
    initialize = getattr(options, "initialize", True)
    if config.peft_type == "P_TUNING" and initialize:
        raise UnsupportedError("a fresh P_TUNING adapter trains a prompt encoder (MLP/LSTM) that PEFT does not save "
                               "and this backend does not implement; only saved P-tuning prompts are loaded",
                               pointer="/peft_type", hint="train P-tuning with PEFT, or add a PROMPT_TUNING adapter")
    if config.get("prefix_projection") and initialize:  # the file holds the MLP's output (SPEC.md 4.1.4)
        raise UnsupportedError("a fresh PREFIX_TUNING adapter with prefix_projection trains its prefix through an MLP "
                               "that PEFT does not save and this backend does not implement; only saved prefixes "
                               "(the MLP's output) load", pointer="/prefix_projection",
                               hint="train it with PEFT, or set prefix_projection to false (the prefix trains directly)")
    refusal = prompt_init_refusal(config) if initialize else None
    if refusal is not None:  # exactly TEXT / SAMPLE_VOCAB: other values initialise at random in PEFT too
        raise refusal
    if options.trainable:
        _ensure_slice_update_gradient()
    heads, head_dim = ifaces[0].kv_shape(layers[0])
    nvt, n_layers = int(config["num_virtual_tokens"]), len(layers)
    if config.peft_type in _PROMPTS:
        shape: tuple[int, ...] = (nvt, int(config["token_dim"]))
    else:
        shape = (nvt, n_layers * 2 * heads * head_dim)
    device, dtype = target_of(ifaces[0].key_kernel(layers[0]), options)
    if options.dtype is None and dtype in HALF:
        dtype = "float32"  # SPEC.md 7.5: PEFT's prompt encoder is float32, cast to the base's dtype where used
    init = ("normal", 1.0) if initialize and not starts_at_zero(config) else ("zeros",)  # PEFT: nn.Embedding init
    ref = bank.reserve("prompt_embeddings", shape, dtype, device, init, trainable=options.trainable)
    state.prompts[adapter_name] = PrefixSlot(bank, ref, Layout(shape, shape, (0, 1)), nvt, n_layers, heads, head_dim,
                                             method=config.peft_type, key_order=ifaces[0].key_order(layers[0]))
    for index, (layer, iface) in enumerate(zip(layers, ifaces)):
        if id(layer) not in state.prompt_patches:
            _patch(model, state, layer, iface, index)
    for layer in _position_embeddings(model):
        if id(layer) not in state.prompt_patches:
            _patch_positions(state, layer)


def _position_embeddings(model: Any) -> list[Any]:
    """Learned absolute position embeddings (GPT-2's ``wpe``): with virtual tokens, transformers counts the real
    tokens' positions from ``num_virtual_tokens`` (the cache length), so these layers must too."""
    from .sites import model_layers

    out = []
    for layer in model_layers(model.backbone):
        params = inspect.signature(type(layer).call).parameters
        if type(layer).__name__ == "PositionEmbedding" and "start_index" in params:
            out.append(layer)
        elif type(layer).__name__ in ("TokenAndPositionEmbedding", "SinePositionEncoding"):
            raise UnsupportedError(f"{type(layer).__name__} in {type(model).__name__} cannot start its positions "
                                   "after the virtual tokens", pointer="/peft_type", hint="use LoRA/IA3 on this model")
    return out


def _patch_positions(state: Any, layer: Any) -> None:
    own = layer.__dict__.get("call")
    original = own if own is not None else type(layer).call.__get__(layer)

    def call(inputs: Any, start_index: Any = 0, **kwargs: Any) -> Any:
        note_caller(state)
        slot = _active_prefix(state)
        if slot is not None:
            start_index = start_index + slot.num_virtual_tokens
        return original(inputs, start_index=start_index, **kwargs)

    object.__setattr__(layer, "call", call)
    state.prompt_patches[id(layer)] = (layer, "call", own)


def _ensure_slice_update_gradient() -> None:
    """TensorFlow registers no gradient for ``XlaDynamicUpdateSlice``, the op of ``keras.ops.slice_update``
    that writes the tokens' keys after the prefix in the cache; training the prefix needs it. Registered
    once, only where missing (it is the textbook gradient of a slice update)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf
    from tensorflow.compiler.tf2xla.python import xla
    from tensorflow.python.framework import ops as tf_ops

    try:
        tf_ops._gradient_registry.lookup("XlaDynamicUpdateSlice")
        return
    except LookupError:
        pass

    @tf.RegisterGradient("XlaDynamicUpdateSlice")  # type: ignore[untyped-decorator]  # TensorFlow ships no types
    def _gradient(op: Any, grad: Any) -> Any:  # pragma: no cover - traced by TensorFlow
        update, indices = op.inputs[1], op.inputs[2]
        return (xla.dynamic_update_slice(grad, tf.zeros_like(update), indices),
                xla.dynamic_slice(grad, indices, tf.shape(update)), None)


def remove_prefix(model: Any, state: Any, adapter_name: str) -> None:
    """Drop a prefix/prompt adapter; with the last one gone, the patched layers get their own ``call`` back.

    >>> remove_prefix(model, state, "default")                         # doctest: +SKIP
    """
    state.prompts.pop(adapter_name, None)
    if state.prompts:
        return
    for obj, attr, own in state.prompt_patches.values():
        if own is None:
            object.__delattr__(obj, attr)
        else:
            object.__setattr__(obj, attr, own)
    state.prompt_patches.clear()


def _active_prefix(state: Any) -> PrefixSlot | None:
    for name in state.active:
        if name in state.prompts:
            slot: PrefixSlot = state.prompts[name]
            return slot
    return None


def _active_name(state: Any) -> str:
    name: str = next(n for n in state.active if n in state.prompts)
    return name


def _unpatched(state: Any, layer: Any) -> Any:
    """``layer``'s ``call`` as it was before this module patched it."""
    own = state.prompt_patches[id(layer)][2]
    return own if own is not None else type(layer).call.__get__(layer)


def _patch(model: Any, state: Any, layer: Any, iface: CacheInterface, index: int) -> None:
    own = layer.__dict__.get("call")
    original = own if own is not None else type(layer).call.__get__(layer)
    names = list(inspect.signature(type(layer).call).parameters)[1:]

    def call(*args: Any, **kwargs: Any) -> Any:
        note_caller(state)
        slot = _active_prefix(state)
        if slot is None:
            return original(*args, **kwargs)
        bound = dict(zip(names, args))
        bound.update(kwargs)
        if slot.method in _PROMPTS:
            if index == 0:
                slot.flow = _prompt_flow(model, state, slot, bound[iface.sequence].dtype)
            if slot.flow is None or len(slot.flow) <= index:
                raise UnsupportedError(f"decoder layer {index} was called without the layers before it, so the "
                                       "prompt's keys/values are unknown", key=_active_name(state),
                                       hint="run the whole model (model(x))")
            kv = slot.flow[index]
            if index == len(slot.flow) - 1:
                slot.flow = None
        else:
            kv = _prefix_kv(slot, index, bound[iface.sequence].dtype)
        cache = bound.pop(iface.cache, None)
        if cache is None:
            return _with_cache(layer, iface, original, kv, bound)
        return _generating(layer, iface, original, kv, cache, bound)

    object.__setattr__(layer, "call", call)
    state.prompt_patches[id(layer)] = (layer, "call", own)


def _prefix_kv(slot: PrefixSlot, index: int, dtype: Any) -> Any:
    """Layer ``index``'s prefix keys/values ``(1, 2, nvt, heads, head_dim)`` (PEFT's ``get_prompt`` split)."""
    nvt, heads, head_dim = slot.num_virtual_tokens, slot.heads, slot.head_dim
    prefix = ops.cast(slot.bank.get(slot.ref), dtype)
    prefix = ops.reshape(prefix, (nvt, slot.num_layers * 2, heads, head_dim))
    keys, values = prefix[:, 2 * index], prefix[:, 2 * index + 1]
    if slot.key_order is not None:  # the layer keeps its keys in another channel order (Gemma 1/2)
        keys = ops.take(keys, slot.key_order, axis=-1)
    return ops.stack([keys, values], axis=0)[None]


def _prompt_flow(model: Any, state: Any, slot: PrefixSlot, dtype: Any) -> list[Any]:
    """Every decoder layer's keys/values for the prompt: the decoder run on the virtual tokens alone (batch 1,
    positions ``0 .. n-1``), as transformers runs the first ``n`` positions of ``prompt ‖ inputs_embeds``."""
    nvt = slot.num_virtual_tokens
    h = ops.cast(slot.bank.get(slot.ref), dtype)[None]  # (1, nvt, hidden)
    for layer in _position_embeddings(model):  # GPT-2: inputs_embeds + wpe(0 .. n-1)
        table = ops.cast(ops.convert_to_tensor(layer.position_embeddings), dtype)
        h = h + ops.slice(table, (0, 0), (nvt, ops.shape(table)[1]))[None]
    flow = []
    for layer in model.backbone.transformer_layers:
        iface = cache_interface(layer)
        assert iface is not None  # checked at injection
        empty = ops.zeros((1, 2, nvt, slot.heads, slot.head_dim), dtype=dtype)
        h, cache = _unpatched(state, layer)(h, **{iface.cache: iface.pack(empty), iface.index: 0})
        flow.append(iface.unpack(cache))
    return flow


def _generating(layer: Any, iface: CacheInterface, original: Any, kv: Any, cache: Any, bound: dict[str, Any]) -> Any:
    """A cached call (``generate()``'s ``call_with_cache``): the layer's cache of ``length`` slots gets ``kv`` in
    front, the write index moves by ``nvt``, and the updated cache goes back without the virtual tokens."""
    existing = iface.unpack(cache)  # (batch, 2, length, heads, head_dim)
    nvt = ops.shape(kv)[2]
    kv = ops.broadcast_to(ops.cast(kv, existing.dtype), (ops.shape(existing)[0], *ops.shape(kv)[1:]))
    index = bound.pop(iface.index, None)
    output, updated = _with_cache(layer, iface, original, kv, bound, cache=ops.concatenate([kv, existing], axis=2),
                                  index=(0 if index is None else index) + nvt)
    return output, iface.pack(iface.unpack(updated)[:, :, nvt:])


def _with_cache(layer: Any, iface: CacheInterface, original: Any, kv: Any, bound: dict[str, Any], *,
                cache: Any = None, index: Any = None) -> Any:
    """Run ``layer`` on the real tokens, written after ``kv`` ``(1, 2, nvt, heads, head_dim)`` in its cache
    (or, generating, at ``index`` of ``cache`` that holds ``kv`` in front), with a causal mask over virtual +
    real tokens and the padding mask extended by ones."""
    generating = cache
    x = bound.pop(iface.sequence)
    padding = bound.pop(iface.padding, None)
    if bound.pop("decoder_attention_mask", None) is not None:
        raise UnsupportedError("a custom decoder_attention_mask together with a prefix/prompt adapter",
                               hint="pass a padding mask only")
    batch, length = ops.shape(x)[0], ops.shape(x)[1]
    nvt, heads, head_dim = ops.shape(kv)[2], ops.shape(kv)[3], ops.shape(kv)[4]
    if cache is None:
        kv = ops.broadcast_to(ops.cast(kv, x.dtype), (batch, 2, nvt, heads, head_dim))
        cache = ops.concatenate([kv, ops.zeros((batch, 2, length, heads, head_dim), dtype=x.dtype)], axis=2)
        index = nvt
    compute_mask = getattr(type(layer), iface.mask_method).__get__(layer)
    signature = inspect.signature(compute_mask)

    def mask_with_prefix(*args: Any, **kwargs: Any) -> Any:
        call = signature.bind(*args, **kwargs)
        call.arguments.update({name: None for name in iface.mask_inputs})
        mask = compute_mask(*call.args, **call.kwargs)  # causal (and sliding-window) mask over prefix + tokens
        if padding is None:
            return mask
        keys = ops.concatenate([ops.ones((batch, nvt), dtype="bool"), ops.cast(padding, "bool")], axis=1)
        return ops.logical_and(ops.cast(mask, "bool"), keys[:, None, :])

    object.__setattr__(layer, iface.mask_method, mask_with_prefix)
    try:
        output, updated = original(x, **{iface.cache: iface.pack(cache), iface.index: index}, **bound)
    finally:
        object.__delattr__(layer, iface.mask_method)
    return output if generating is None else (output, updated)
