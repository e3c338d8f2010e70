"""LN tuning (``LN_TUNING``, SPEC.md 15.3) on Keras models: each targeted layer is replaced, per adapter, by a
trained copy.

PEFT's ``LNTuningLayer`` keeps a deep copy of the layer per adapter (``ln_tuning_layers``) and runs the active
adapter's copy instead of the layer; the file holds the copy's tensors, ``<module>.ln_tuning_layers.<name>``
(``weight``, and ``bias`` for a LayerNorm). That is a module saved whole whose tensors carry the
``ln_tuning_layers.`` infix, so the backend uses :class:`~adapterspec_keras.modules_to_save.ModulesToSaveLayer`
with that prefix (as the torch backend does): the running copy's values are in the layer's own variables, so
keras-hub's norm layers (Llama/Qwen2 ``scale``, Gemma's ``scale`` -- ``1 + w`` in both frameworks, copied as
it is --, GPT-2 ``gamma``/``beta``) run it with their own ``epsilon``. Which Keras variable holds which tensor
comes from keras-hub's converter (a plain copy, probed); a ``module_map`` entry may name a
``LayerNormalization`` (``gamma``/``beta``) or another layer whose only variables are ``scale`` / ``gamma`` /
``beta``.

>>> LN_PREFIX
'ln_tuning_layers.'
"""

from __future__ import annotations

import dataclasses
from typing import Any

from adapterspec import AdapterConfig, LoadOptions
from adapterspec.errors import TargetNotFoundError, UnsupportedError

from .layers import Layout
from .modules_to_save import Param, converter_modules, module_params
from .sites import ModuleSite, resolve_layer

__all__ = ["LN_PREFIX", "METHOD", "find_ln_targets", "norm_params", "split_norms"]

#: The method's ``peft_type``.
METHOD = "LN_TUNING"
#: The infix of the copy's tensors under the module's path.
LN_PREFIX = "ln_tuning_layers."


def norm_params(layer: Any) -> list[Param] | None:
    """A normalization layer's parameters in PEFT's names (``weight``: ``gamma`` or ``scale``; ``bias``: ``beta``),
    or ``None`` when ``layer`` has other variables (a Dense, an Embedding...).

    >>> import keras
    >>> norm = keras.layers.LayerNormalization(name="ln")
    >>> norm.build((None, 4))
    >>> [(name, variable.path) for name, variable, _ in norm_params(norm)]
    [('weight', 'ln/gamma'), ('bias', 'ln/beta')]
    """
    weight = next((getattr(layer, a) for a in ("gamma", "scale") if _is_variable(getattr(layer, a, None))), None)
    bias = getattr(layer, "beta", None) if _is_variable(getattr(layer, "beta", None)) else None
    found = [(name, v) for name, v in (("weight", weight), ("bias", bias)) if v is not None]
    if not found or len(found) != len(layer.weights):
        return None
    return [(name, v, Layout(tuple(v.shape), tuple(v.shape), tuple(range(len(v.shape))))) for name, v in found]


def _is_variable(value: Any) -> bool:
    import keras

    return isinstance(value, keras.Variable)


def split_norms(model: Any, options: LoadOptions) -> tuple[dict[str, list[Param]], LoadOptions]:
    """The ``module_map`` entries that name normalization layers (their parameters, :func:`norm_params`), and the
    options with the other entries only (the layers adapters wrap, :func:`~adapterspec_keras.mapping.spec_sites`).

    >>> split_norms(model, LoadOptions(module_map={"ln": norm_layer, "q": dense}))  # doctest: +SKIP
    ({'ln': [('weight', ...), ('bias', ...)]}, LoadOptions(module_map={'q': ...}))
    """

    module_map = options.module_map
    if not isinstance(module_map, dict):
        return {}, options
    norms: dict[str, list[Param]] = {}
    rest: dict[str, Any] = {}
    for path, target in module_map.items():
        layer, reverse = resolve_layer(model, target, path)
        params = None if reverse else norm_params(layer)
        if params is None:
            rest[path] = target
        else:
            norms[path] = params
    return norms, dataclasses.replace(options, module_map=rest or None)


def find_ln_targets(model: Any, config: AdapterConfig, sites: dict[str, ModuleSite],
                    norms: dict[str, list[Param]], trainable: bool) -> list[tuple[str, list[Param]]]:
    """The modules an LN tuning adapter replaces (SPEC.md 4.3 matching, over every module keras-hub's converter
    ports and every mapped layer), each with its parameters, in model order.

    :raises TargetNotFoundError: nothing matches (names ``/target_modules``).
    :raises UnsupportedError: training asked for (the copies are frozen on Keras), a target inside another, or a
        target whose variables the converter does not copy plainly.
    """
    by_module = converter_modules(model)
    universe = list(dict.fromkeys([*norms, *by_module, *sites]))
    chosen = [module for module in universe if config.matches(module)]
    if not chosen:
        raise TargetNotFoundError(f"target_modules={config.get('target_modules')!r} selects no layer of this "
                                  f"{type(model).__name__}", pointer="/target_modules",
                                  hint="name its norm layers (input_layernorm, ...), or pass module_map")
    for module in chosen:
        outer = next((c for c in chosen if module.startswith(c + ".")), None)
        if outer is not None:
            raise UnsupportedError(f"target_modules selects {module!r} inside {outer!r}, which it selects too",
                                   key=module, pointer="/target_modules", hint="select the norm layers only")
    if trainable:
        raise UnsupportedError("the keras backend cannot train LN tuning copies", pointer="/peft_type",
                               hint="load it frozen (trainable=False), or train with the torch backend")
    return [(module, norms[module] if module in norms else module_params(module, by_module, sites, "target_modules"))
            for module in chosen]
