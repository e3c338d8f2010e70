"""The key/value cache interfaces of keras-hub decoder layers, as prompt learning needs them.

keras-hub's decoder layers (those checked against PEFT) come in families that take a self-attention cache under different names
and layouts: the Llama family and the generic ``TransformerDecoder`` (GPT-2) take
``self_attention_cache``/``self_attention_cache_update_index`` and a stacked ``(batch, 2, length, heads,
head_dim)`` tensor; Gemma and Gemma 2 take ``cache``/``cache_update_index`` with the same stacked layout;
Gemma 3 takes ``cache`` as a ``(key, value)`` pair of ``(batch, length, heads, head_dim)`` tensors.
:class:`CacheInterface` names those arguments for one layer, and packs/unpacks its cache to/from the
common ``(batch, 2, length, heads, head_dim)`` form.

>>> iface = cache_interface(model.backbone.transformer_layers[0])      # doctest: +SKIP
>>> iface.cache, iface.paired                                          # doctest: +SKIP
('cache', False)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from keras import ops

from adapterspec.errors import UnsupportedError

__all__ = ["CacheInterface", "cache_interface"]


@dataclass(frozen=True)
class CacheInterface:
    """How one decoder layer takes a key/value cache.

    :param sequence: the ``call`` argument holding the hidden states.
    :param padding: the ``call`` argument holding the ``(batch, length)`` padding mask.
    :param cache: the ``call`` argument holding the layer's cache.
    :param index: the ``call`` argument holding the cache position the inputs are written at.
    :param mask_method: the layer's method computing the (causal, cache-aware) self-attention mask.
    :param mask_inputs: arguments of ``mask_method`` cleared so that it computes the causal mask alone.
    :param paired: the cache is a ``(key, value)`` pair instead of one stacked tensor.
    """

    sequence: str
    padding: str
    cache: str
    index: str
    mask_method: str
    mask_inputs: tuple[str, ...]
    paired: bool

    def pack(self, kv: Any) -> Any:
        """The layer's cache from ``kv`` ``(batch, 2, length, heads, head_dim)``.

        >>> iface.pack(ops.zeros((1, 2, 3, 2, 4)))                     # doctest: +SKIP
        """
        return (kv[:, 0], kv[:, 1]) if self.paired else kv

    def unpack(self, cache: Any) -> Any:
        """``(batch, 2, length, heads, head_dim)`` from the layer's cache.

        >>> iface.unpack(cache).shape                                  # doctest: +SKIP
        (1, 2, 3, 2, 4)
        """
        return ops.stack(list(cache), axis=1) if self.paired else cache

    def kv_shape(self, layer: Any) -> tuple[int, int]:
        """``(key/value heads, head_dim)`` of ``layer``'s attention.

        >>> iface.kv_shape(layer)                                       # doctest: +SKIP
        (2, 16)
        """
        if self.cache == "cache":  # Gemma: key kernel (heads, hidden, head_dim)
            kernel = layer.attention.key_dense.kernel
            return int(kernel.shape[0]), int(kernel.shape[-1])
        kernel = layer._self_attention_layer._key_dense.kernel  # (hidden, heads, head_dim)
        return int(kernel.shape[-2]), int(kernel.shape[-1])

    def key_order(self, layer: Any) -> Any:
        """The channel order in which ``layer`` keeps its keys, relative to transformers' (a NumPy index array),
        or None when it is the same. keras-hub's Gemma 1/2 attention interleaves the two rotary halves
        after RoPE; read off by rotating ``arange(head_dim)`` at position 0 (where RoPE is the identity).

        >>> iface.key_order(gemma_layer)[:4]                           # doctest: +SKIP
        array([0, 8, 1, 9])
        """
        import numpy as np

        attention = layer.attention if self.cache == "cache" else layer._self_attention_layer
        rotate = getattr(attention, "_apply_rope", None)
        if rotate is None:
            return None
        head_dim = self.kv_shape(layer)[1]
        probe = np.arange(head_dim, dtype="float32").reshape(1, 1, 1, head_dim)
        order = np.rint(ops.convert_to_numpy(rotate(ops.convert_to_tensor(probe), 0))).astype("int64").reshape(-1)
        if sorted(order.tolist()) != list(range(head_dim)):
            raise UnsupportedError(f"the keys of {type(attention).__name__} are not a channel permutation of "
                                   "transformers' keys", pointer="/peft_type",
                                   hint="use LoRA/IA3 on this model, or the torch backend for prefix tuning")
        return None if (order == np.arange(head_dim)).all() else order

    def key_kernel(self, layer: Any) -> Any:
        """The key projection's kernel (its device and dtype are the cache's).

        >>> iface.key_kernel(layer).dtype                              # doctest: +SKIP
        'float32'
        """
        if self.cache == "cache":
            return layer.attention.key_dense.kernel
        return layer._self_attention_layer._key_dense.kernel


_LLAMA = CacheInterface("decoder_sequence", "decoder_padding_mask", "self_attention_cache",
                        "self_attention_cache_update_index", "_compute_self_attention_mask",
                        ("decoder_padding_mask", "decoder_attention_mask"), paired=False)
_GEMMA = CacheInterface("x", "padding_mask", "cache", "cache_update_index", "_compute_attention_mask",
                        ("padding_mask",), paired=False)
#: the Gemma-style decoder layers checked against PEFT (others with that signature -- PaliGemma's prefix-LM
#: block, Gemma 4's shared caches -- have other mask or cache semantics)
_GEMMA_LAYERS = ("GemmaDecoderBlock", "Gemma3DecoderBlock")
#: decoder layers whose cache is a ``(key, value)`` pair (their attention unpacks it so)
_PAIRED = ("Gemma3DecoderBlock",)


def cache_interface(layer: Any) -> CacheInterface | None:
    """The cache interface of decoder ``layer``, or None if it has none prompt learning can use.

    >>> cache_interface(model.backbone.transformer_layers[0]).cache   # doctest: +SKIP
    'self_attention_cache'
    """
    params = inspect.signature(type(layer).call).parameters
    names = list(params)[1:]
    llama = (_LLAMA.sequence, _LLAMA.padding, _LLAMA.cache, _LLAMA.index)
    if names and names[0] == _LLAMA.sequence and all(n in params for n in llama) \
            and callable(getattr(layer, _LLAMA.mask_method, None)) \
            and hasattr(getattr(layer, "_self_attention_layer", None), "_key_dense"):
        return _LLAMA
    if type(layer).__name__ in _GEMMA_LAYERS and hasattr(getattr(layer, "attention", None), "key_dense"):
        return CacheInterface(**{**_GEMMA.__dict__, "paired": type(layer).__name__ in _PAIRED})
    return None
