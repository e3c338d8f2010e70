"""``ensure_weight_tying: true`` on Keras (SPEC.md 15.2): the mirror of :mod:`adapterspec_torch.tying`.

A keras-hub model with tied word embeddings has one ``ReversibleEmbedding`` (``tie_weights=True``): its lookup is
transformers' ``embed_tokens``, its reverse projection (a :class:`~adapterspec_keras.sites.Piece` with ``tied``)
is ``lm_head``. PEFT 0.21 rewrites the config (``BaseTuner._check_tied_modules``, :func:`tie_rewrite`): the input
embedding joins ``target_modules`` and the tied layers leave it; each tied layer then carries a Linear LoRA whose
``lora_A`` is the embedding's ``lora_embedding_B`` transposed and whose ``lora_B`` is ``lora_embedding_A``
transposed (one storage), both layers' tensors saved.

Here each tied layer gets a LoRA of its own on the reverse projection, given the embedding's tensors transposed
when injected (:func:`tie`) and loaded only from a file whose tied tensors are exactly those transposes
(:func:`check_tied_tensors`): the unmerged output is then PEFT's (each layer's SPEC.md 8.1 LoRA) and a save writes
PEFT's tensors. Two copies would drift apart in training, so training a tied adapter is refused, as are merging
(PEFT adds the shared delta twice, as on torch) and the ``modules_to_save`` form (a tied ``lm_head`` saved whole).

>>> tie_rewrite(cfg, "model.embed_tokens", ["lm_head"])                  # doctest: +SKIP
(AdapterConfig(...target_modules=['q_proj', 'model.embed_tokens']...), 'targets')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from keras import ops

from adapterspec import AdapterConfig, LoadOptions
from adapterspec._tying import EMBEDDING_LAYER_NAMES, is_tied, tie_rewrite
from adapterspec.errors import UnexpectedTensorError, UnsupportedError
from adapterspec.naming import make_key

from .layers import AdapterLayer
from .sites import ModuleSite
from .switch import ModelState
from .tokens import _input_embedding, _tied_heads

__all__ = ["EMBEDDING_LAYER_NAMES", "check_tied_layer", "check_tied_tensors", "is_tied", "tie", "tie_rewrite",
           "tied_heads", "tied_layers"]


def tied_layers(model: Any, sites: dict[str, ModuleSite]) -> tuple[str | None, list[str]]:
    """(the input embedding's spec path, the spec paths of the logits projections sharing its matrix) -- none
    unless the model's ``ReversibleEmbedding`` is tied (keras-hub's ``tie_word_embeddings``).

    >>> tied_layers(keras_hub_model, spec_sites(keras_hub_model, LoadOptions()))      # doctest: +SKIP
    ('model.embed_tokens', ['lm_head'])
    """
    embedding = _input_embedding(model, sites)
    tied = _tied_heads(sites, embedding)
    return (embedding, tied) if tied else (None, [])


def tied_heads(sites: dict[str, ModuleSite], tied: list[str]) -> list[str]:
    """The spec paths of ``sites`` that are tied layers (PEFT's ``_check_tied_module_exists``), a module known by
    two names once."""
    seen: set[Any] = set()
    out = []
    for path, site in sites.items():
        if is_tied(path, tied) and site.key not in seen:
            seen.add(site.key)
            out.append(path)
    return out


def check_tied_layer(config: AdapterConfig, path: str, embedding: str, mode: str, options: LoadOptions) -> None:
    """Refuse what this backend cannot tie as PEFT does: the ``modules_to_save`` form, a rank from ``rank_pattern``
    that differs from the embedding's, and training (the tied layer's copy would drift from the embedding's).

    :raises UnsupportedError: naming ``path`` and the field.
    """
    if mode != "targets":
        raise UnsupportedError("ensure_weight_tying with an embedding in modules_to_save (the tied layer saved whole, "
                               "SPEC.md 15.2) is not implemented on Keras", key=path, pointer="/modules_to_save",
                               hint="load this adapter with the torch backend, or set ensure_weight_tying to false")
    if config.rank_for(path) != config.rank_for(embedding):
        raise UnsupportedError(f"ensure_weight_tying ties the LoRA of {path!r} to the input embedding's, but "
                               "rank_pattern gives them different ranks", key=path, pointer="/rank_pattern",
                               hint="give the tied layers the same rank")
    if options.trainable:
        raise UnsupportedError(f"ensure_weight_tying: the LoRA of {path!r} is the input embedding's (one storage in "
                               "PEFT); the Keras backend keeps a copy, which training would move apart",
                               key=path, pointer="/ensure_weight_tying",
                               hint="inject or load it frozen (trainable=False), or train with the torch backend")


def _pairs(head: str, embedding: str) -> list[tuple[str, str, str, str]]:
    """(tied layer's parameter, its key, the embedding's parameter, its key), LoRA."""
    return [("lora_A.weight", make_key(head, "lora_A.weight"), "lora_embedding_B",
             make_key(embedding, "lora_embedding_B")),
            ("lora_B.weight", make_key(head, "lora_B.weight"), "lora_embedding_A",
             make_key(embedding, "lora_embedding_A"))]


def check_tied_tensors(state: ModelState, adapter_name: str, arrays: Mapping[str, Any]) -> None:
    """Refuse a file whose tied layers' tensors are not the embedding's transposed, before anything is assigned:
    PEFT keeps one storage, so it would silently keep whichever it loaded last.

    :raises UnexpectedTensorError: naming the tied layer's key.
    """
    for head, (embedding, _) in state.tied.get(adapter_name, {}).items():
        for _, key, _, other in _pairs(head, embedding):
            if key not in arrays or other not in arrays:
                continue
            mine, source = np.asarray(arrays[key]), np.asarray(arrays[other]).T
            if mine.shape != source.shape or not np.array_equal(mine, source):
                raise UnexpectedTensorError(
                    f"with ensure_weight_tying the tensor of the tied layer {head!r} must equal {other} transposed, "
                    "and it does not", key=key,
                    hint="save the adapter again from the tied model, or set ensure_weight_tying to false")


def _layer(state: ModelState, adapter_name: str, path: str) -> AdapterLayer:
    return next(layer for layer in state.adapter_layers.values()
                if isinstance(layer, AdapterLayer) and adapter_name in layer.adapter_names()
                and layer.path_of(adapter_name) == path)


def tie(state: ModelState, adapter_name: str) -> None:
    """Give each tied layer's LoRA the embedding's tensors transposed (after initialisation), as PEFT's tied
    layers read them."""
    for head, (embedding, _) in state.tied.get(adapter_name, {}).items():
        head_layer, source_layer = _layer(state, adapter_name, head), _layer(state, adapter_name, embedding)
        _, source_layouts, source_refs = source_layer.parameters(adapter_name)
        _, layouts, refs = head_layer.parameters(adapter_name)
        bank, source_bank = head_layer.bank(adapter_name), source_layer.bank(adapter_name)
        for param, _, source_param, _ in _pairs(head, embedding):
            stored = np.asarray(ops.convert_to_numpy(source_bank.get(source_refs[source_param])))
            value = np.ascontiguousarray(source_layouts[source_param].from_stored(stored).T)
            bank.assign(refs[param], layouts[param].to_stored(value))
