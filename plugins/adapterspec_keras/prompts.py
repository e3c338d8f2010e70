"""Prefix tuning on keras-hub causal LMs, through their decoders' key/value cache.

PEFT's prefix tuning gives every decoder layer ``num_virtual_tokens`` extra keys and values (after RoPE,
so taken as they are) that every token attends to, and shifts the tokens' positions by
``num_virtual_tokens`` -- exactly what a pre-filled key/value cache does. keras-hub's decoders of the
Llama family (Llama, Mistral, Mixtral, Qwen 2/3 and their MoE variants...) and keras-hub's generic
``TransformerDecoder`` (GPT-2) take
``self_attention_cache`` and ``self_attention_cache_update_index``; their ``call`` is patched (on the
instance) so that a plain forward pass -- ``model(x)``, ``predict``, ``fit`` -- runs each layer with a
cache holding the adapter's prefix, the tokens written after it at index ``num_virtual_tokens``, and the
padding mask extended with ones for the prefix (PEFT's ``attention_mask`` handling).

Learned absolute position embeddings (GPT-2's ``wpe``) are patched to start after the prefix, as
transformers counts positions from the cache length. Refused with :class:`~adapterspec.errors.UnsupportedError`,
naming why: prompt tuning (virtual token embeddings change the sequence length the functional graph was
built for), decoders without that cache interface (Gemma's take ``cache``/``cache_update_index`` and
a different layout), ``prefix_projection``, encoder-decoder configs, and ``generate()`` while a prefix is active.

>>> check_prompt_learning(model, prefix_config)                        # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from keras import ops

from adapterspec import AdapterConfig
from adapterspec.errors import UnsupportedError

from .bank import AdapterBank, Ref
from .layers import Layout

__all__ = ["PrefixSlot", "check_prompt_learning", "decoder_layers", "inject_prefix", "remove_prefix"]

_CACHE_ARGS = ("self_attention_cache", "self_attention_cache_update_index")


@dataclass
class PrefixSlot:
    """One prefix adapter: its bank row, and the shape its embeddings are read in."""

    bank: AdapterBank
    ref: Ref
    layout: Layout
    num_virtual_tokens: int
    num_layers: int
    heads: int
    head_dim: int


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of a keras-hub causal LM, if they take a key/value cache the prefix can go into.

    :raises UnsupportedError: not a causal LM with such layers.
    """
    backbone = getattr(model, "backbone", None)
    layers = list(getattr(backbone, "transformer_layers", None) or [])
    if backbone is None or not layers or not hasattr(model, "call_with_cache"):
        raise UnsupportedError(f"prefix tuning needs a keras-hub causal LM; {type(model).__name__} is not one",
                               pointer="/peft_type", hint="pass the CausalLM task model, or use LoRA/IA3")
    for layer in layers:
        params = inspect.signature(type(layer).call).parameters
        if not all(a in params for a in _CACHE_ARGS) or not hasattr(layer, "_compute_self_attention_mask"):
            raise UnsupportedError(
                f"{type(layer).__name__} ({type(model).__name__}) has no self-attention cache interface to hold "
                "a prefix (decoders of the Llama family have one)", pointer="/peft_type",
                hint="use LoRA/IA3 on this model, or the torch backend for prefix tuning")
    return layers


def check_prompt_learning(model: Any, config: AdapterConfig) -> None:
    """Refuse prompt learning ``model`` cannot run exactly (see the module docstring).

    :raises UnsupportedError: naming the reason.
    """
    if config.peft_type != "PREFIX_TUNING":
        raise UnsupportedError(
            f"{config.peft_type} prepends virtual token embeddings, changing the sequence length the Keras "
            f"functional graph of {type(model).__name__} was built for", pointer="/peft_type",
            hint="use PREFIX_TUNING or LoRA/IA3 with Keras, or the torch backend for prompt tuning")
    if config.get("prefix_projection"):
        raise UnsupportedError("prefix_projection: PEFT does not save the projection MLP, only its input",
                               pointer="/prefix_projection", hint="train the prefix without prefix_projection")
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise UnsupportedError("encoder-decoder prefix tuning is not supported by the keras backend",
                               pointer="/num_transformer_submodules", hint="use a decoder-only causal LM")
    layers = decoder_layers(model)
    _position_embeddings(model)
    if int(config["num_layers"]) != len(layers):
        raise UnsupportedError(f"the prefix is for {config['num_layers']} layers; the model has {len(layers)}",
                               pointer="/num_layers", hint="load the adapter into the model it was trained for")
    heads, head_dim = _kv_shape(layers[0])
    if int(config["token_dim"]) != heads * head_dim:
        raise UnsupportedError(f"token_dim {config['token_dim']} is not key/value heads x head_dim = "
                               f"{heads} x {head_dim} of this model", pointer="/token_dim",
                               hint="load the adapter into the model it was trained for")


def _kv_shape(layer: Any) -> tuple[int, int]:
    attention = layer._self_attention_layer
    kernel = attention._key_dense.kernel  # (hidden, kv heads, head dim)
    return int(kernel.shape[-2]), int(kernel.shape[-1])


def inject_prefix(model: Any, state: Any, config: AdapterConfig, adapter_name: str, bank: AdapterBank,
                  options: Any) -> None:
    """Reserve the prefix's embeddings in ``bank`` and patch the decoder layers (once) to use it."""
    from .devices import target_of

    layers = decoder_layers(model)
    if options.trainable:
        _ensure_slice_update_gradient()
    heads, head_dim = _kv_shape(layers[0])
    nvt, n_layers = int(config["num_virtual_tokens"]), len(layers)
    shape = (nvt, n_layers * 2 * heads * head_dim)
    device, dtype = target_of(layers[0]._self_attention_layer._key_dense.kernel, options)
    init = ("normal", 1.0) if getattr(options, "initialize", True) else ("zeros",)  # PEFT: nn.Embedding init
    ref = bank.reserve("prompt_embeddings", shape, dtype, device, init, trainable=options.trainable)
    state.prompts[adapter_name] = PrefixSlot(bank, ref, Layout(shape, shape, (0, 1)), nvt, n_layers, heads, head_dim)
    for index, layer in enumerate(layers):
        if id(layer) not in state.prompt_patches:
            _patch(model, state, layer, index)
    for layer in _position_embeddings(model):
        if id(layer) not in state.prompt_patches:
            _patch_positions(state, layer)
    if hasattr(model, "generate") and id(model) not in state.prompt_patches:
        _patch_generate(model, state)


def _position_embeddings(model: Any) -> list[Any]:
    """Learned absolute position embeddings (GPT-2's ``wpe``): with a prefix, transformers counts positions from
    ``num_virtual_tokens`` (the cache length), so these layers must too."""
    from .sites import model_layers

    out = []
    for layer in model_layers(model.backbone):
        params = inspect.signature(type(layer).call).parameters
        if type(layer).__name__ == "PositionEmbedding" and "start_index" in params:
            out.append(layer)
        elif type(layer).__name__ in ("TokenAndPositionEmbedding", "SinePositionEncoding"):
            raise UnsupportedError(f"{type(layer).__name__} in {type(model).__name__} cannot start its positions "
                                   "after a prefix", pointer="/peft_type", hint="use LoRA/IA3 on this model")
    return out


def _patch_positions(state: Any, layer: Any) -> None:
    own = layer.__dict__.get("call")
    original = own if own is not None else type(layer).call.__get__(layer)

    def call(inputs: Any, start_index: Any = 0, **kwargs: Any) -> Any:
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

    @tf.RegisterGradient("XlaDynamicUpdateSlice")
    def _gradient(op: Any, grad: Any) -> Any:  # pragma: no cover - traced by TensorFlow
        update, indices = op.inputs[1], op.inputs[2]
        return (xla.dynamic_update_slice(grad, tf.zeros_like(update), indices),
                xla.dynamic_slice(grad, indices, tf.shape(update)), None)


def remove_prefix(model: Any, state: Any, adapter_name: str) -> None:
    """Drop a prefix adapter; with the last one gone, the decoder layers get their own ``call`` back."""
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
            return state.prompts[name]
    return None


def _patch(model: Any, state: Any, layer: Any, index: int) -> None:
    own = layer.__dict__.get("call")
    original = own if own is not None else type(layer).call.__get__(layer)
    names = list(inspect.signature(type(layer).call).parameters)[1:]

    def call(*args: Any, **kwargs: Any) -> Any:
        slot = _active_prefix(state)
        if slot is None:
            return original(*args, **kwargs)
        bound = dict(zip(names, args))
        bound.update(kwargs)
        if bound.get("self_attention_cache") is not None:
            raise UnsupportedError("generation with a key/value cache while a prefix adapter is active",
                                   key=next(n for n in state.active if n in state.prompts),
                                   hint="run the model on the whole sequence (model(x)), or deactivate the prefix")
        return _with_prefix(layer, original, slot, index, bound)

    object.__setattr__(layer, "call", call)
    state.prompt_patches[id(layer)] = (layer, "call", own)


def _patch_generate(model: Any, state: Any) -> None:
    """``generate()`` runs the decoders with its own cache: refuse it up front while a prefix is active (inside
    its traced loop the error would come out wrapped)."""
    own = model.__dict__.get("generate")
    original = own if own is not None else type(model).generate.__get__(model)

    def generate(*args: Any, **kwargs: Any) -> Any:
        if _active_prefix(state) is not None:
            raise UnsupportedError("generate() runs the decoders with its own key/value cache, which has no room "
                                   "for the active prefix adapter",
                                   key=next(n for n in state.active if n in state.prompts),
                                   hint="run the model on the whole sequence (model(x)), or deactivate the prefix")
        return original(*args, **kwargs)

    object.__setattr__(model, "generate", generate)
    state.prompt_patches[id(model)] = (model, "generate", own)


def _with_prefix(layer: Any, original: Any, slot: PrefixSlot, index: int, bound: dict[str, Any]) -> Any:
    x = bound.pop("decoder_sequence")
    padding = bound.pop("decoder_padding_mask", None)
    if bound.pop("decoder_attention_mask", None) is not None:
        raise UnsupportedError("a custom decoder_attention_mask together with a prefix adapter",
                               hint="pass a padding mask only")
    batch, length = ops.shape(x)[0], ops.shape(x)[1]
    nvt, heads, head_dim = slot.num_virtual_tokens, slot.heads, slot.head_dim
    prefix = ops.cast(slot.bank.get(slot.ref), x.dtype)
    prefix = ops.reshape(prefix, (nvt, slot.num_layers * 2, heads, head_dim))
    kv = ops.stack([prefix[:, 2 * index], prefix[:, 2 * index + 1]], axis=0)  # (2, nvt, heads, head_dim)
    kv = ops.broadcast_to(kv[None], (batch, 2, nvt, heads, head_dim))
    cache = ops.concatenate([kv, ops.zeros((batch, 2, length, heads, head_dim), dtype=x.dtype)], axis=2)
    compute_mask = type(layer)._compute_self_attention_mask.__get__(layer)

    signature = inspect.signature(compute_mask)

    def mask_with_prefix(*args: Any, **kwargs: Any) -> Any:
        call = signature.bind(*args, **kwargs)
        call.arguments.update(decoder_padding_mask=None, decoder_attention_mask=None)
        mask = compute_mask(*call.args, **call.kwargs)  # causal (and sliding-window) mask over prefix + tokens
        if padding is None:
            return mask
        keys = ops.concatenate([ops.ones((batch, nvt), dtype="bool"), ops.cast(padding, "bool")], axis=1)
        return ops.logical_and(ops.cast(mask, "bool"), keys[:, None, :])

    object.__setattr__(layer, "_compute_self_attention_mask", mask_with_prefix)
    try:
        output, _ = original(x, self_attention_cache=cache, self_attention_cache_update_index=nvt, **bound)
    finally:
        object.__delattr__(layer, "_compute_self_attention_mask")
    return output
