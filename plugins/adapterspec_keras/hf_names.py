"""transformers' own module paths for the checkpoint keys keras-hub's converters read.

keras-hub's converters name weights by their *checkpoint* keys (``vit.encoder.layer.0.attention.attention.query``,
``language_model.model.layers.0.self_attn.q_proj``). transformers 5 renames many of them on load (its checkpoint
conversion mapping, ``transformers.conversion_mapping``): the modules PEFT sees, and names adapters by, are then
``vit.layers.0.attention.q_proj`` and ``model.language_model.layers.0.self_attn.q_proj``. An adapter may use
either form (PEFT writes whichever transformers version it ran with), so the Keras backend accepts both.

Which transformers class names the modules follows the Keras model: one holding an image (or audio) encoder is the
multimodal class (``*ForConditionalGeneration``), one without it the class ``AutoModelForCausalLM`` gives for the
checkpoint (``text_part=True``) -- for most model types the same, but for Qwen3.5 the text model alone
(``Qwen3_5ForCausalLM``: ``model.layers.*``, where the multimodal model has ``model.language_model.layers.*``), which
is what PEFT wraps for a ``CAUSAL_LM`` adapter of a text-only model and what a saved adapter must name.

The renaming is not tabulated here: it is transformers' own, applied the way transformers applies it when it
loads a checkpoint (``get_model_conversion_mapping`` on the model, built on the ``meta`` device, then
``rename_source_key``). Without transformers (or torch) installed, only the checkpoint form is known.

>>> transformers_names("vit", ["vit.encoder.layer.0.attention.attention.query"])  # doctest: +SKIP
{'vit.encoder.layer.0.attention.attention.query': ['vit.layers.0.attention.q_proj', 'vit.encoder...query']}
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Iterable
from typing import Any

__all__ = ["base_relative", "transformers_names"]

#: the transformers auto classes tried for a ``model_type``, most specific first: keras-hub's converters read
#: checkpoints of these task models (``ViTForImageClassification`` keys start with ``vit.``)
_AUTO_MAPPINGS = ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                  "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
                  "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "MODEL_MAPPING_NAMES")
#: the same for a Keras model without the image/audio encoder of its checkpoint (the text part of a multimodal
#: model): ``AutoModelForCausalLM``'s class first, which for some model types is the text model alone
_TEXT_PART_MAPPINGS = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                       *(m for m in _AUTO_MAPPINGS if m != "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"))


def _available() -> bool:
    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


@functools.lru_cache(maxsize=None)
def _transforms(model_type: str, text_part: bool = False) -> tuple[list[Any], list[Any]] | None:
    """transformers' (renamings, converters) for ``model_type``'s task model, or ``None`` (none, or unknown)."""
    if not _available():
        return None
    try:
        import torch
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        config = transformers.AutoConfig.for_model(model_type)
        class_name = _model_class(model_type, text_part)[0]
        if class_name is None or not hasattr(transformers, class_name):
            return None
        model_class = getattr(transformers, class_name)
        # as transformers' auto classes do: a class of the text model alone takes the text part of the config
        text_config = getattr(config, "sub_configs", {}).get("text_config")
        if text_config is not None and getattr(model_class, "config_class", None) is text_config:
            config = config.get_text_config()
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = model_class._from_config(config)
        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - a transformers without this model or this API: the checkpoint form only
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    return renamings, [t for t in transforms if not isinstance(t, WeightRenaming)]


@functools.lru_cache(maxsize=None)
def _model_class(model_type: str, text_part: bool = False) -> tuple[str | None, bool]:
    """The transformers class whose renaming applies to ``model_type``'s checkpoints, and whether it is the base
    model itself (no task model: its paths are relative to the base model, whatever their first segment).

    :param text_part: for a Keras model without the checkpoint's image/audio encoder (``AutoModelForCausalLM``'s
        class first).
    """
    if not _available():
        return None, False
    from transformers.models.auto import modeling_auto

    for mapping in _TEXT_PART_MAPPINGS if text_part else _AUTO_MAPPINGS:
        class_name = getattr(modeling_auto, mapping, {}).get(model_type)
        if class_name:
            if isinstance(class_name, (tuple, list)):  # DeiT: (ForImageClassification, ...WithTeacher)
                class_name = class_name[0]
            return class_name, mapping == "MODEL_MAPPING_NAMES"
    return None, False


def base_relative(model_type: str | None, text_part: bool = False) -> bool:
    """Whether the module paths :func:`transformers_names` gives for ``model_type`` are the base model's own (its
    only class is the base model): ``model.layer.0`` of DINOv3 is its encoder's ``model`` attribute, not the
    ``base_model_prefix`` of a task model around it.

    >>> base_relative("dinov3_vit"), base_relative("llama")               # doctest: +SKIP
    (True, False)
    """
    return _model_class(model_type, text_part)[1] if model_type else False


def transformers_names(model_type: str | None, paths: Iterable[str], *,
                       text_part: bool = False) -> dict[str, list[str]]:
    """For each module path, the other paths the installed transformers knows it by.

    transformers renames checkpoint keys on load (``vit.encoder.layer.0.attention.attention.query`` becomes the
    module ``vit.layers.0.attention.q_proj``) and back on save; a path keras-hub's converter records may be of
    either form, so both directions are applied.

    :param model_type: the transformers ``model_type`` whose checkpoint the paths come from.
    :param paths: module paths as keras-hub's converter names them (weight keys without ``.weight``).
    :param text_part: the Keras model lacks the checkpoint's image/audio encoder: the names are those of the class
        ``AutoModelForCausalLM`` gives for ``model_type`` (``Qwen3_5ForCausalLM``, the text model alone, for
        ``qwen3_5``), not of the multimodal class.
    :returns: ``{path: [module path, checkpoint key]}`` (transformers' module first, ``path`` one of the two) for
        the paths transformers renames; ``{}`` without transformers.

    >>> transformers_names("paligemma", ["language_model.model.layers.0.self_attn.q_proj"])  # doctest: +SKIP
    {'language_model.model.layers.0.self_attn.q_proj': ['model.language_model.layers.0.self_attn.q_proj',
                                                        'language_model.model.layers.0.self_attn.q_proj']}
    >>> transformers_names("qwen3_5", ["model.language_model.layers.0.mlp.up_proj"], text_part=True)  # doctest: +SKIP
    {'model.language_model.layers.0.mlp.up_proj': ['model.layers.0.mlp.up_proj',
                                                   'model.language_model.layers.0.mlp.up_proj']}
    """
    found = _transforms(model_type, text_part) if model_type else None
    if not found:
        return {}
    from transformers.core_model_loading import rename_source_key

    renamings, converters = found
    try:
        back = ([t.reverse_transform() for t in renamings], [t.reverse_transform() for t in converters])
    except Exception:  # noqa: BLE001 - a transform transformers cannot reverse: the load direction only
        back = None
    out: dict[str, list[str]] = {}
    for path in paths:
        # a checkpoint key is renamed on load; a key already in the module form is renamed back on save
        for ren, conv, reverse in ((*found, False), *(((*back, True),) if back else ())):
            try:
                renamed, _ = rename_source_key(path + ".weight", ren, conv, reverse=reverse)
            except Exception:  # noqa: BLE001 - a renaming this transformers cannot apply alone: no alias
                continue
            if renamed.endswith(".weight") and renamed.removesuffix(".weight") != path:
                other = renamed.removesuffix(".weight")
                out[path] = [path, other] if reverse else [other, path]
                break
    return out
