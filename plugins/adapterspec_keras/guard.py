"""While a Keras model holds adapters, its ``save`` refuses instead of writing something wrong.

``model.save("m.keras")`` writes the model's config and weights; ``keras.saving.load_model`` rebuilds the
model from its config -- without adapterspec's patched ``call`` and adapter bank -- so it gave back the base
model, without the adapter and without a warning. The method is shadowed on the instance by one raising a
typed error that says what to do, and the shadow is removed with the last adapter.

>>> import keras
>>> guard_save(keras.Sequential())
>>> unguard_save(keras.Sequential())
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


def guard_save(model: Any) -> None:
    """Make ``model.save`` refuse until :func:`unguard_save`."""
    if callable(getattr(type(model), "save", None)) and "save" not in model.__dict__:
        object.__setattr__(model, "save", _refuse_save)


def unguard_save(model: Any) -> None:
    """Give ``model`` its own ``save`` back (its last adapter is gone)."""
    if model.__dict__.get("save") is _refuse_save:
        object.__delattr__(model, "save")
