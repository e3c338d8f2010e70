"""While a Keras model holds adapters, Keras' saving refuses instead of writing something wrong.

``model.save("m.keras")`` writes the model's config and weights; ``keras.saving.load_model`` rebuilds the
model from its config -- without adapterspec's patched ``call`` and adapter bank -- so it gave back the base
model, without the adapter and without a warning. Every other way Keras saves (``keras.saving.save_model``,
``save_weights`` and so ``ModelCheckpoint(save_weights_only=True)`` and ``BackupAndRestore``, keras-hub's
``save_to_preset``, saving a model that contains this one) writes the base's variables without the adapter's
too: a restore gave an untrained adapter (with ``BackupAndRestore``, beside the restored optimizer state).
All of them call ``save_own_variables`` of every layer they save, so that method and ``save`` are shadowed on
the instance by ones raising a typed error that says what to do; the shadows are removed with the last adapter.

>>> import keras
>>> model = keras.Sequential()
>>> guard_save(model)
>>> model.save_own_variables({})  # what save_weights, save_model, ModelCheckpoint... call on every layer
Traceback (most recent call last):
adapterspec.errors.UnsupportedError: Keras is saving the variables of a model with adapterspec adapters ...
>>> unguard_save(model)
"""

from __future__ import annotations

from typing import Any

from adapterspec.errors import UnsupportedError

__all__ = ["guard_save", "unguard_save"]


def _refuse_save(*args: Any, **kwargs: Any) -> None:
    raise UnsupportedError(
        "model.save() on a Keras model with adapterspec adapters writes a model that keras.saving.load_model "
        "rebuilds without them (the base model alone, no warning)",
        hint="save the adapter with adapterspec.save_adapter(model, folder) and the base as it came "
             "(its preset); for a merged model, adapterspec.unload(model, merge=True) first, then model.save()")


def _refuse_save_variables(*args: Any, **kwargs: Any) -> None:
    raise UnsupportedError(
        "Keras is saving the variables of a model with adapterspec adapters (save_weights, ModelCheckpoint, "
        "BackupAndRestore, save_to_preset, keras.saving.save_model, or saving a model that contains it): the file "
        "would hold the base without the adapter's variables, and a restore would give an untrained adapter",
        hint="save the adapter with adapterspec.save_adapter(model, folder) (in fit: adapterspec_keras.training."
             "AdapterCheckpoints) and "
             "the base as it came; for a merged model, adapterspec.unload(model, merge=True) first")


#: method name -> the shadow that refuses it
_SHADOWS = {"save": _refuse_save, "save_own_variables": _refuse_save_variables}


def guard_save(model: Any, *, names: tuple[str, ...] = ("save", "save_own_variables")) -> None:
    """Make ``model.save`` and Keras' saving of its variables refuse until :func:`unguard_save`.

    :param names: the methods to shadow; an adapted layer inside the model shadows ``save_own_variables`` only,
        so that saving any model that contains it (a task model around an adapted backbone) refuses too.
    """
    for name in names:
        if callable(getattr(type(model), name, None)) and name not in model.__dict__:
            object.__setattr__(model, name, _SHADOWS[name])


def unguard_save(model: Any) -> None:
    """Give ``model`` (or an adapted layer) its own saving back (its last adapter is gone)."""
    for name, shadow in _SHADOWS.items():
        if model.__dict__.get(name) is shadow:
            object.__delattr__(model, name)
