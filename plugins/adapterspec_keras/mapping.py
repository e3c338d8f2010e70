"""Which Keras layer (and which slice of its kernel) each spec module path stands for.

The spec names modules as PEFT and transformers do (``"model.layers.0.self_attn.q_proj"``); a Keras
model names its layers its own way (``"transformer_layer_0/self_attention/query"``) and may lay a
weight out differently: keras-hub's attention kernels are ``(hidden, heads, head_dim)`` einsum
kernels, GPT-2's fused ``c_attn`` becomes three layers. A :class:`ModuleSite` records, for one spec
module, every :class:`Piece` -- Keras layer plus the index maps from its kernel's input and output
positions to the spec module's flattened ``in_features``/``out_features`` -- so the adapter math
can run on the Keras layers exactly as PEFT runs it on the torch module.

Built on :mod:`adapterspec_keras.sites` (what a site is) and :mod:`adapterspec_keras.converters`
(deriving keras-hub models' sites from keras-hub's converters). Three sources, in order of precedence:

1. ``LoadOptions.module_map``: spec path -> Keras layer (its ``path``, its ``name`` or the layer).
2. Built-in: for keras-hub models of every architecture keras-hub converts from transformers, the
   mapping is *derived* by running keras-hub's own converter (``convert_weights``) against a
   recording loader: each ``port_weight(variable, hf_key, hook)`` tells which HF weight feeds which
   Keras variable, and running ``hook`` on index probes tells how (transpose, reshape, slice).
3. Any other Keras model: its own layers, named by their Keras path with ``/`` read as ``.``.

>>> sites = spec_sites(causal_lm, LoadOptions())                        # doctest: +SKIP
>>> sites["transformer.h.0.attn.c_attn"].pieces[1].layer.path           # doctest: +SKIP
'transformer_layer_0/self_attention/key'
"""

from __future__ import annotations

import weakref
from typing import Any

from adapterspec import LoadOptions
from adapterspec.errors import TargetNotFoundError, UnsupportedError

from .converters import backbone_of, converter_sites, head_sites, multimodal, text_only
from .hf_names import base_relative, transformers_names
from .sites import (ModuleSite, Piece, layer_site, model_layers, own_name, parameter_variables, resolve_layer,
                    unadaptable_site)

__all__ = ["BASE_MODEL_PREFIX", "WRAPPED_PREFIX", "equivalent", "find_site", "spec_name", "spec_sites"]


#: transformers' ``base_model_prefix`` per ``model_type``: the attribute of a ``*ForCausalLM`` (or other
#: head model) holding the base model, i.e. the first segment of PEFT module paths on such a model.
BASE_MODEL_PREFIX: dict[str, str] = {
    "albert": "albert", "bart": "model", "bert": "bert", "distilbert": "distilbert", "esm": "esm",
    "gemma": "model", "gemma2": "model", "gemma3": "model", "gemma3_text": "model", "gemma3n": "model",
    "gemma4": "model", "gemma4_text": "model", "gpt2": "transformer", "gpt_oss": "model", "llama": "model",
    "mistral": "model", "mixtral": "model", "qwen2": "model", "qwen2_moe": "model", "qwen3": "model",
    "qwen3_moe": "model", "qwen3_5": "model", "qwen3_5_moe": "model", "roberta": "roberta",
    "smollm3": "model", "t5gemma": "model", "t5gemma2": "model", "xlm-roberta": "roberta",
    "vit": "vit", "deit": "deit", "dinov2": "dinov2", "dinov3_vit": "model", "swin": "swin",
}

#: ``model_type``s whose checkpoint is a wrapper model's, of which keras-hub converts the part under this prefix:
#: transformers' ``Sam3VideoModel`` holds the detector (``Sam3Model``) as ``detector_model`` (its ``tracker_model``
#: has no Keras counterpart). PEFT on the wrapper names the detector's modules ``detector_model.<path>``, PEFT on
#: ``Sam3Model`` ``<path>``: each site is known under both names (a regular-expression ``target_modules`` of either
#: form matches), the detector's own first.
WRAPPED_PREFIX: dict[str, str] = {
    "sam3_video": "detector_model",
}


def _layer_sites(model: Any) -> dict[str, ModuleSite]:
    sites: dict[str, ModuleSite] = {}
    for layer in model_layers(model):
        path = own_name(model, layer)
        site = layer_site(path, layer) or unadaptable_site(path, layer)  # the latter refused if a target names it
        if site is not None:
            sites.setdefault(site.path, site)
    return sites


# --------------------------------------------------------------------------------------------------
# Spec names


def spec_name(hf_path: str, prefix: str | None, task_model: bool, *, relative: bool = False) -> str:
    """The spec path of a converter key: PEFT names modules relative to the model it wrapped.

    :param relative: ``hf_path`` is relative to the base model even if it starts with ``prefix`` (a path of
        transformers' base model class, whose own submodule may carry the name of the prefix).
    """
    if not prefix or hf_path.split(".")[0] == "lm_head":
        return hf_path
    has = hf_path.startswith(prefix + ".") and not relative
    if task_model:
        return hf_path if has else f"{prefix}.{hf_path}"
    return hf_path[len(prefix) + 1:] if has else hf_path


_BUILTIN: weakref.WeakKeyDictionary[Any, dict[str, ModuleSite]] = weakref.WeakKeyDictionary()


def _builtin_sites(model: Any) -> dict[str, ModuleSite]:
    """The converter-derived sites of a keras-hub model (cached per model), else the model's own layers."""
    cached = _BUILTIN.get(model)
    if cached is not None:
        return dict(cached)
    backbone = backbone_of(model)
    hf_sites, model_type = converter_sites(backbone)
    if not hf_sites:
        return _layer_sites(model)  # a hand-built model may still grow: not cached
    sites: dict[str, ModuleSite] = {}
    prefix = BASE_MODEL_PREFIX.get(model_type or "")
    task_model = backbone is not model
    ordered = sorted(hf_sites.items(), key=lambda kv: kv[0].split(".")[0] == "lm_head")
    # the same module under both its transformers module path and its checkpoint key (transformers 5 renames
    # checkpoint keys on load: PEFT writes whichever form its transformers used), the module path first: the path in
    # the transformers class holding the Keras model's parts (a new adapter is saved under the first name). Without
    # the checkpoint's image/audio encoder that is AutoModelForCausalLM's class (Qwen3.5's text model alone,
    # ``model.layers.*``), else the multimodal class (``model.language_model.layers.*``)
    text_part = bool(model_type) and not text_only(model_type or "") and not multimodal(backbone)
    aliases = transformers_names(model_type, hf_sites, text_part=text_part)
    relative = base_relative(model_type, text_part)  # renamed paths: the base model's own, whatever their first name
    # a multimodal checkpoint's text part as transformers' text model names it, which PEFT adapts too (the
    # ``qwen3_5_text`` mapping loads ``model.language_model.layers.*`` as ``model.layers.*``): its load direction only
    text = transformers_names(f"{model_type}_text", hf_sites) if model_type and not text_only(model_type) else {}
    for hf_path, site in ordered:
        loaded = text.get(hf_path)
        for other in aliases.get(hf_path, [hf_path]) + ([loaded[0]] if loaded and loaded[1] == hf_path else []):
            name = spec_name(other, prefix, task_model, relative=relative and other != hf_path)
            if name not in sites and (other == hf_path or other not in hf_sites):
                sites[name] = ModuleSite(name, site.kind, site.in_features, site.out_features, site.pieces,
                                         site.source, site.refused, site.hf_conv1d, root=prefix or "")
    for name, site in head_sites(model).items():  # the task model's own head: named as on transformers' task model
        sites.setdefault(name, site)
    wrapper = WRAPPED_PREFIX.get(model_type or "")
    if wrapper and not task_model:
        for name, site in list(sites.items()):
            if not name.startswith(wrapper + "."):
                sites.setdefault(f"{wrapper}.{name}", site)
    _BUILTIN[model] = sites
    return dict(sites)


def spec_sites(model: Any, options: LoadOptions | None = None) -> dict[str, ModuleSite]:
    """Every spec module path ``model`` can take an adapter on, with its site, in model order.

    ``options.module_map`` (a dict, or a callable returning ``None`` for "not mapped") comes first;
    then the built-in mapping derived from keras-hub's converter (keras-hub models); else the
    model's own layers. A callable is asked about every path the other two sources know.

    >>> list(spec_sites(model))[:2]                                      # doctest: +SKIP
    ['model.embed_tokens', 'model.layers.0.self_attn.q_proj']
    """
    module_map = options.module_map if options is not None else None
    try:
        sites = _builtin_sites(model)
    except UnsupportedError:
        if module_map is None or callable(module_map):
            raise
        sites = _layer_sites(model)  # keras-hub's converter failed: the explicit map names the targets
    if module_map is None:
        return sites
    if callable(module_map):
        mapped = {p: module_map(p) for p in sites}
        mapped = {p: v for p, v in mapped.items() if v is not None}
    else:
        mapped = dict(module_map)
    out: dict[str, ModuleSite] = {}
    for path, target in mapped.items():
        layer, reverse = resolve_layer(model, target, path)
        site = layer_site(path, layer, reverse=reverse, source="module_map")
        if site is None and not reverse:
            if parameter_variables(layer):  # target_parameters can adapt it (SPEC.md 15.1), nothing else
                site = ModuleSite(path, "parameters", 0, 0, [], "module_map",
                                  refused=f"module_map sends it to a {type(layer).__name__}, which adapters cannot "
                                          "wrap (only target_parameters can adapt its parameters)")
        if site is None:
            raise UnsupportedError(f"module_map sends {path!r} to a {type(layer).__name__}, which adapters cannot wrap",
                                   key=path, hint="map it to a Dense, EinsumDense, Embedding or Conv layer")
        out[path] = site
    for path, site in sites.items():
        out.setdefault(path, site)
    return out


def equivalent(a: str, b: str, root: str | None = None) -> bool:
    """``a`` and ``b`` name the same module up to a leading prefix (only ``root`` if given)."""
    if a == b:
        return True
    longer, shorter = (a, b) if len(a) > len(b) else (b, a)
    if not longer.endswith("." + shorter):
        return False
    return root is None or longer[: -len(shorter) - 1] == root


def find_site(sites: dict[str, ModuleSite], path: str) -> ModuleSite | None:
    """The site of spec path ``path``: exact, else the one site whose path equals it up to a leading prefix (for
    a site keras-hub's converter names, only its base-model prefix: ``ModuleSite.root``).

    Adapters trained on ``GPT2Model`` name ``h.0.attn.c_attn`` what on ``GPT2LMHeadModel`` is
    ``transformer.h.0.attn.c_attn``; both find the same site.

    :raises TargetNotFoundError: the path fits several sites.
    """
    if path in sites:
        return sites[path]
    found = [s for p, s in sites.items() if equivalent(p, path, s.root)]
    if len(found) > 1:
        raise TargetNotFoundError(f"module {path!r} fits several layers: {[s.path for s in found]}", key=path,
                                  hint="pass module_map={spec path: keras layer path} to say which")
    return found[0] if found else None
