"""While a Keras model holds adapters, Keras' saving refuses instead of writing something wrong.

``model.save("m.keras")`` writes the model's config and weights; ``keras.saving.load_model`` rebuilds the
model from its config -- without adapterspec's patched ``call`` and adapter bank -- so it gave back the base
model, without the adapter and without a warning. Every other way Keras saves (``keras.saving.save_model``,
``save_weights`` and so ``ModelCheckpoint(save_weights_only=True)`` and ``BackupAndRestore``, keras-hub's
``save_to_preset``, saving a model that contains this one) writes the base's variables without the adapter's
too: a restore gave an untrained adapter (with ``BackupAndRestore``, beside the restored optimizer state).
All of them call ``save_own_variables`` of every layer they save, so that method and ``save`` are shadowed on
the instance by ones raising a typed error that says what to do; the shadows are removed with the last adapter.
That shadow fires inside Keras' writer, after it has opened the file: a good ``model.weights.h5`` was left truncated
and unloadable (``BackupAndRestore``'s last good backup destroyed). So the three functions that open a file to write a
model (:data:`_FILES`; Keras' saving API and ``Model.save``/``save_weights`` call them by module attribute) refuse
first, while the model or a layer inside it holds adapters, and the file is left as it was.

Loading weights into a model whose adapter is merged replaced the merged kernel (base + delta) with the file's base,
and the next unmerge subtracted the delta from it: the base stayed off by the delta, after ``unload`` too. The two
functions that read a file's weights into a model (``load_weights``, ``keras.saving.load_weights``,
``BackupAndRestore``'s restore) refuse before reading while an adapter inside is merged, or holds other values in the
model's variables (:func:`~adapterspec_keras.switch.check_base_loadable`).

Other whole-model operations go around the layers' ``call`` and would drop the adapter silently, so they refuse
while any layer of the model holds one (:func:`holds_adapters`; Keras' and keras-hub's methods are wrapped once, at
the first injection): ``Model.quantize`` replaced the adapted layers' kernels and left their adapters unrun (the
adapted model's outputs off by the whole adapter, ``active_adapters`` unchanged); keras-hub's
``export_to_transformers`` wrote the base alone; ``save_to_preset`` wrote a config, then failed on the weights
and left a preset folder that did not load; keras-hub's own LoRA (``enable_lora``, ``save_lora_weights``,
``load_lora_weights``) numbers layers by position, which the adapters' layers shift, so its files named other layers.

>>> import keras
>>> model = keras.Sequential()
>>> guard_save(model)
>>> model.save_own_variables({})  # what save_weights, save_model, ModelCheckpoint... call on every layer
Traceback (most recent call last):
adapterspec.errors.UnsupportedError: Keras is saving the variables of a model with adapterspec adapters ...
>>> unguard_save(model)
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Collection
from typing import Any

from adapterspec.errors import UnsupportedError

__all__ = ["guard_save", "holds_adapters", "unguard_save", "wrap_once"]


def _refuse_save(*args: Any, **kwargs: Any) -> None:
    raise UnsupportedError(
        "model.save() / keras.saving.save_model on a Keras model with adapterspec adapters (or a model holding one) "
        "writes a model that keras.saving.load_model rebuilds without them (the base model alone, no warning)",
        hint="save the adapter with adapterspec.save_adapter(model, folder) and the base as it came "
             "(its preset); for a merged model, adapterspec.unload(model, merge=True) first, then model.save()")


def _refuse_save_variables(*args: Any, **kwargs: Any) -> None:
    raise UnsupportedError(
        "Keras is saving the variables of a model with adapterspec adapters (save_weights, ModelCheckpoint, "
        "BackupAndRestore, keras.saving.save_model, saving a model that contains it, or copy.deepcopy / pickle, "
        "which go through Keras' saving): the copy would hold the base without the adapter's variables, and a "
        "restore would give an untrained adapter",
        hint="save the adapter with adapterspec.save_adapter(model, folder) (in fit: adapterspec_keras.training."
             "AdapterCheckpoints) and the base as it came; for a copy, build a second model and load the adapter "
             "into it; for a merged model, adapterspec.unload(model, merge=True) first")


def _refuse_preset(*args: Any, **kwargs: Any) -> None:
    raise UnsupportedError(
        "save_to_preset on a keras-hub model with adapterspec adapters: the preset's weights would be the base "
        "without the adapter (from_preset gives the base, or fails on the adapter's layers)",
        hint="save the adapter with adapterspec.save_adapter(model, folder) beside the base preset as it came; for a "
             "merged preset, adapterspec.unload(model, merge=True) first, then save_to_preset")


def _refuse_quantize(*args: Any, **kwargs: Any) -> None:
    raise UnsupportedError(
        "quantizing a Keras model with adapterspec adapters: Keras replaces the adapted layers' kernels and the "
        "adapters would no longer run (the model would compute the quantized base alone)",
        hint="quantize first, then load the adapter (adapters run on quantized Dense and EinsumDense layers); for a "
             "merged model, adapterspec.unload(model, merge=True) first, then quantize")


#: method name -> the shadow that refuses it
_SHADOWS = {"save": _refuse_save, "save_own_variables": _refuse_save_variables}


def _refuse_keras_hub_lora(*args: Any, **kwargs: Any) -> None:
    raise UnsupportedError(
        "keras-hub's own LoRA on a model with adapterspec adapters: keras-hub numbers the layers by position, which "
        "the adapters' layers shift (its LoRA files would name other layers), and it would stack a second LoRA on the "
        "adapted layers",
        hint="remove the adapterspec adapters first (adapterspec.unload(model)), or train with adapterspec alone")


def _refuse_export(*args: Any, **kwargs: Any) -> None:
    raise UnsupportedError(
        "export_to_transformers reads the base weights of a model with adapterspec adapters: the checkpoint would be "
        "the base alone",
        hint="save the adapter with adapterspec.save_adapter (PEFT loads it on the exported base); for a merged "
             "checkpoint, adapterspec.unload(model, merge=True) first")


#: (module, class, method) -> what refuses it while the model holds adapters. Keras binds each layer's ``quantize``
#: on the instance when it is made, so the check goes where every ``quantize`` (a model's, before it quantizes any
#: layer, and a layer's own) asks first: ``Layer._check_quantize_args``.
_WRAPPED = {
    ("keras", "layers.Layer", "_check_quantize_args"): _refuse_quantize,
    ("keras_hub.models", "Backbone", "enable_lora"): _refuse_keras_hub_lora,
    ("keras_hub.models", "Backbone", "save_lora_weights"): _refuse_keras_hub_lora,
    ("keras_hub.models", "Backbone", "load_lora_weights"): _refuse_keras_hub_lora,
    ("keras_hub.models", "Backbone", "export_to_transformers"): _refuse_export,
    ("keras_hub.models", "CausalLM", "export_to_transformers"): _refuse_export,
    ("keras_hub.models", "Backbone", "save_to_preset"): _refuse_preset,  # before it writes a file of the folder
    ("keras_hub.models", "Task", "save_to_preset"): _refuse_preset,
}


def holds_adapters(model: Any, *, skip: Collection[int] = ()) -> bool:
    """Whether ``model`` or a layer inside it holds adapterspec adapters (its saving is shadowed).

    :param skip: ids of layers to leave out (Keras' ``objects_to_skip``: keras-hub's ``save_task_weights`` skips the
        backbone's layers).

    >>> import keras
    >>> holds_adapters(keras.Sequential([keras.layers.Dense(2)]))
    False
    """
    layers = [model, *model._flatten_layers(include_self=False, recursive=True)]
    return any(layer.__dict__.get("save_own_variables") is _refuse_save_variables and id(layer) not in skip
               for layer in layers)


def wrap_once(module_name: str, class_path: str, name: str, wrap: Callable[[Any], Any]) -> None:
    """Replace method ``name`` of class ``class_path`` in the loaded module ``module_name`` by ``wrap(original)``,
    once (a method adapterspec wrapped already is left; nothing when the module is not loaded or lacks it).

    >>> wrap_once("no.such.module", "Model", "fit", lambda original: original)
    """
    key = (module_name, class_path, name)
    if key in _DONE:  # every adapted layer asks: after the first, one set lookup
        return
    module: Any = sys.modules.get(module_name)
    if module is None:  # not imported yet: asked again at the next call
        return
    cls = functools.reduce(lambda obj, attr: getattr(obj, attr, None), class_path.split("."), module)
    original = getattr(cls, name, None) if cls is not None else None
    if original is not None and not getattr(original, "_adapterspec_wrapped", False):
        method = wrap(original)
        method._adapterspec_wrapped = True
        setattr(cls, name, method)
    _DONE.add(key)


#: The (module, class, method) triples :func:`wrap_once` has handled (wrapped, or absent from the loaded module).
_DONE: set[tuple[str, str, str]] = set()


def _refusing(refuse: Callable[[], None]) -> Callable[[Any], Any]:
    def wrap(original: Any) -> Any:
        @functools.wraps(original)
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            if holds_adapters(self):
                refuse()
            return original(self, *args, **kwargs)

        return method

    return wrap


def _check_save(model: Any, skip: Collection[int]) -> None:
    if holds_adapters(model, skip=skip):
        _refuse_save()


def _check_save_weights(model: Any, skip: Collection[int]) -> None:
    if holds_adapters(model, skip=skip):
        _refuse_save_variables()


def _check_load(model: Any, skip: Collection[int]) -> None:
    from .switch import check_base_loadable  # switch imports this module

    check_base_loadable(model, skip=skip)


#: (module, module attribute, function) -> the check run before it: the functions of Keras 3 that open a file to
#: write a model (each takes it as ``model``; ``keras.saving.save_model``/``save_weights``, ``Model.save``/
#: ``save_weights`` and the callbacks reach them by module attribute, so wrapping them covers every caller), and
#: those that read a file's weights into one (``load_weights`` of ``.keras``/``.weights.h5``/``.weights.json``, and
#: of legacy ``.h5`` by order or by name; that file is opened to read, nothing written).
_FILES: dict[tuple[str, str, str], Callable[[Any, Collection[int]], None]] = {
    ("keras.src.saving", "saving_lib", "save_model"): _check_save,  # .keras zip, folder, hf://, file object
    ("keras.src.legacy.saving", "legacy_h5_format", "save_model_to_hdf5"): _check_save,  # .h5
    ("keras.src.saving", "saving_lib", "save_weights_only"): _check_save_weights,  # .weights.h5, .weights.json
    ("keras.src.saving", "saving_lib", "load_weights_only"): _check_load,
    ("keras.src.legacy.saving", "legacy_h5_format", "load_weights_from_hdf5_group"): _check_load,
    ("keras.src.legacy.saving", "legacy_h5_format", "load_weights_from_hdf5_group_by_name"): _check_load,
}


def _checked_first(check: Callable[[Any, Collection[int]], None]) -> Callable[[Any], Any]:
    """Wrap a Keras function taking ``model`` (and maybe ``objects_to_skip``) so that ``check`` runs before it."""
    def wrap(original: Any) -> Any:
        signature = inspect.signature(original)

        @functools.wraps(original)
        def function(*args: Any, **kwargs: Any) -> Any:
            try:
                arguments = signature.bind(*args, **kwargs).arguments
            except TypeError:  # Keras' own error for the call
                return original(*args, **kwargs)
            model = arguments.get("model")
            if hasattr(model, "_flatten_layers"):
                check(model, _skipped(arguments.get("objects_to_skip")))
            return original(*args, **kwargs)

        return function

    return wrap


def _skipped(objects: Any) -> set[int]:
    """The ids of the layers Keras leaves out with ``objects_to_skip`` (it does not enter a skipped layer)."""
    out: set[int] = set()
    for obj in objects or ():
        out.add(id(obj))
        if hasattr(obj, "_flatten_layers"):
            out.update(id(layer) for layer in obj._flatten_layers(include_self=False, recursive=True))
    return out


def _guard_classes() -> None:
    """Wrap the whole-model operations of :data:`_WRAPPED` and the file writers and readers of :data:`_FILES` (once
    per class or module and function; cheap after the first)."""
    for (module_name, class_name, name), refuse in _WRAPPED.items():
        wrap_once(module_name, class_name, name, _refusing(refuse))
    for (module_name, attribute, name), check in _FILES.items():
        wrap_once(module_name, attribute, name, _checked_first(check))


def guard_save(model: Any, *, names: tuple[str, ...] = ("save", "save_own_variables")) -> None:
    """Make ``model.save`` and Keras' saving of its variables refuse until :func:`unguard_save` (and the whole-model
    operations of any model holding it: :func:`holds_adapters`).

    :param names: the methods to shadow; an adapted layer inside the model shadows ``save_own_variables`` only,
        so that saving any model that contains it (a task model around an adapted backbone) refuses too.
    """
    _guard_classes()
    for name in names:
        if callable(getattr(type(model), name, None)) and name not in model.__dict__:
            object.__setattr__(model, name, _SHADOWS[name])


def unguard_save(model: Any) -> None:
    """Give ``model`` (or an adapted layer) its own saving back (its last adapter is gone)."""
    for name, shadow in _SHADOWS.items():
        if model.__dict__.get(name) is shadow:
            object.__delattr__(model, name)
