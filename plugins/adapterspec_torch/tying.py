"""``ensure_weight_tying: true`` (SPEC.md 15.2): the adapters of layers tied to the input embedding are the
embedding's, as PEFT 0.21 ties them.

On a model whose output layer shares the input embedding's weight (``tie_word_embeddings``), PEFT rewrites the
config (``LoraModel._add_targets_to_tie`` / ``_add_modules_to_save_to_tie``): the input embedding joins
``target_modules`` (or ``modules_to_save``) and the tied layers leave it; each tied layer then gets

* LoRA: a Linear LoRA whose ``lora_A`` is the embedding's ``lora_embedding_B`` transposed and whose ``lora_B``
  is ``lora_embedding_A`` transposed -- the same storage; both layers' tensors are saved;
* saved whole: a copy whose ``weight`` is the embedding copy's ``weight`` (one parameter), saved under the tied
  layer's name too.

This module finds the tied layers, rewrites the config like PEFT, ties the tensors after injection and after
loading, and refuses a file whose tied tensors disagree.

>>> tie_rewrite(cfg, "model.embed_tokens", ["lm_head"])                  # doctest: +SKIP
(AdapterConfig(...target_modules=['q_proj', 'model.embed_tokens']...), 'targets')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from adapterspec._tying import EMBEDDING_LAYER_NAMES, is_tied, tie_rewrite
from adapterspec.errors import UnexpectedTensorError, UnsupportedError
from adapterspec.naming import make_key

from ._keys import slot
from .layers import AdapterLayer, ModulesToSaveLayer
from .switch import ModelState

__all__ = ["EMBEDDING_LAYER_NAMES", "check_tied_layer", "check_tied_tensors", "is_tied", "tie", "tie_rewrite",
           "tied_layers"]

#: The ``TRAINABLE_TOKENS`` method's tensor (its tied layers save the embedding's under their own names).
_DELTA = "trainable_tokens_delta"

def _unwrapped(module: nn.Module) -> nn.Module:
    if isinstance(module, AdapterLayer):
        return module._modules["base_layer"]
    if isinstance(module, ModulesToSaveLayer):
        return module._modules["original_module"]
    return module


def tied_layers(model: nn.Module, universe: Sequence[tuple[str, str, nn.Module]]) -> tuple[str | None, list[str]]:
    """(the input embedding's spec path, the spec paths of the other layers sharing its weight) -- none unless the
    model's config has ``tie_word_embeddings`` true (PEFT's ``_get_module_names_tied_with_embedding``).

    >>> tied_layers(torch.nn.Linear(1, 1), [])
    (None, [])
    """
    model_config = getattr(model, "config", None)
    getter = getattr(model, "get_input_embeddings", None)
    if getter is None or not bool(getattr(model_config, "tie_word_embeddings", False)):
        return None, []
    try:
        embedding = getter()
    except (NotImplementedError, AttributeError):
        return None, []
    path = next((spec for spec, _, module in universe if module is embedding or _unwrapped(module) is embedding), None)
    if path is None:
        return None, []
    weight = _unwrapped(embedding)._parameters.get("weight") if embedding is not None else None
    tied = [spec for spec, _, module in universe
            if spec != path and weight is not None and _unwrapped(module)._parameters.get("weight") is weight]
    return path, tied


def _lora_pairs(head: str, embedding: str) -> list[tuple[str, str, str, str]]:
    """(tied layer's parameter, its key, the embedding's parameter, its key), LoRA."""
    return [("lora_A.weight", make_key(head, "lora_A.weight"), "lora_embedding_B", make_key(embedding, "lora_embedding_B")),
            ("lora_B.weight", make_key(head, "lora_B.weight"), "lora_embedding_A", make_key(embedding, "lora_embedding_A"))]


def check_tied_tensors(state: ModelState, adapter_name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse a file whose tied layers' tensors are not the embedding's (transposed for LoRA), before anything
    is assigned: PEFT keeps one storage, so it would silently keep whichever it loaded last.

    :raises UnexpectedTensorError: naming the tied layer's key.
    """
    for head, (embedding, mode) in state.tied.get(adapter_name, {}).items():
        if mode == "targets":
            pairs = [(key, other, True) for _, key, _, other in _lora_pairs(head, embedding)]
        elif mode == "tokens":
            pairs = [(make_key(head, _DELTA), make_key(embedding, _DELTA), False)]
        else:
            pairs = [(make_key(head, "weight"), make_key(embedding, "weight"), False)]
        for key, other, transposed in pairs:
            if key not in tensors or other not in tensors:
                continue
            source = tensors[other].t() if transposed else tensors[other]
            if tensors[key].shape != source.shape or not torch.equal(tensors[key], source):
                raise UnexpectedTensorError(
                    f"with ensure_weight_tying the tensor of the tied layer {head!r} must equal {other}"
                    f"{' transposed' if transposed else ''}, and it does not", key=key,
                    hint="save the adapter again from the tied model, or set ensure_weight_tying to false")


def tie(state: ModelState, adapter_name: str) -> None:
    """Make the tied layers' adapter tensors the embedding's (one storage), as PEFT does; a tensor not created yet
    (injected without initialisation) is tied after loading."""
    for head, (embedding, mode) in state.tied.get(adapter_name, {}).items():
        head_layer = state.wrappers[state.modules[adapter_name][head]]
        source_layer = state.wrappers[state.modules[adapter_name][embedding]]
        if mode == "targets":
            assert isinstance(head_layer, AdapterLayer) and isinstance(source_layer, AdapterLayer)
            source = source_layer.adapter_params(adapter_name)
            weights = head_layer.adapter_weights[slot(adapter_name)]
            names = head_layer._specs[adapter_name].names
            for param, _, source_param, _ in _lora_pairs(head, embedding):
                tensor = source[source_param]
                if not isinstance(tensor, nn.Parameter):
                    continue  # pending: tied when loaded
                weights.__dict__["pending"].pop(names[param], None)
                weights._parameters[names[param]] = nn.Parameter(tensor.t(), requires_grad=tensor.requires_grad)
            head_layer.__dict__["_plan_key"] = None  # plain attribute: the layer's cached plan is rebuilt
        elif mode == "tokens":
            assert isinstance(head_layer, AdapterLayer) and isinstance(source_layer, AdapterLayer)
            source_tensor = source_layer.adapter_params(adapter_name)[_DELTA]
            if isinstance(source_tensor, nn.Parameter):
                weights = head_layer.adapter_weights[slot(adapter_name)]
                attr = head_layer._specs[adapter_name].names[_DELTA]
                weights.__dict__["pending"].pop(attr, None)
                weights._parameters[attr] = source_tensor
        else:
            assert isinstance(head_layer, ModulesToSaveLayer) and isinstance(source_layer, ModulesToSaveLayer)
            copy = head_layer.modules_to_save[slot(adapter_name)]
            copy._parameters["weight"] = source_layer.modules_to_save[slot(adapter_name)]._parameters["weight"]


def check_tied_layer(module: nn.Module, path: str, mode: str) -> None:
    """Refuse a tied layer PEFT's tying would change: LoRA needs a Linear; a saved-whole copy drops a bias.

    :raises UnsupportedError: naming ``path``.
    """
    own = _unwrapped(module)
    if mode == "targets" and not isinstance(own, nn.Linear):
        raise UnsupportedError(f"ensure_weight_tying ties LoRA on a {type(own).__qualname__} layer; PEFT ties Linear "
                               "output layers only", key=path, pointer="/ensure_weight_tying",
                               hint="set ensure_weight_tying to false")
    if getattr(own, "bias", None) is not None:
        raise UnsupportedError("ensure_weight_tying on an output layer with a bias: PEFT 0.21 drops the bias of the "
                               "tied layer", key=path, pointer="/ensure_weight_tying",
                               hint="set ensure_weight_tying to false")

