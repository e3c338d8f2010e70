"""While a transformers model holds adapters, its ``save_pretrained`` refuses instead of writing something wrong.

``save_pretrained`` would write the whole model with the wrapped layers' keys renamed (``...q_proj.base_layer.weight``,
``...adapter_weights.default...``); transformers reloads that with the adapted layers re-initialised (they are
reported MISSING). So the method is shadowed on the instance by one raising a typed error that says what to do,
and the shadow is removed with the last adapter.

>>> import torch
>>> guard_save_pretrained(torch.nn.Linear(2, 2))  # not a transformers model: nothing to guard
"""

from __future__ import annotations

from typing import Any

from torch import nn

from adapterspec.errors import UnsupportedError

__all__ = ["guard_save_pretrained", "unguard_save_pretrained"]


def _refuse_save_pretrained(*args: Any, **kwargs: Any) -> None:
    raise UnsupportedError(
        "save_pretrained() on a model with adapterspec adapters would write the full model with renamed keys "
        "(base_layer, adapter_weights), which transformers reloads with the adapted layers re-initialised",
        hint="save the adapter with adapterspec.save_adapter(model, folder); for a full merged model call "
             "adapterspec.unload(model, merge=True) first, then save_pretrained(); with a Trainer, attach "
             "adapterspec_torch.training.AdapterCheckpoints(trainer)")


def guard_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` (a transformers model's) refuse until :func:`unguard_save_pretrained`.

    >>> guard_save_pretrained(model)                                      # doctest: +SKIP
    """
    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in model.__dict__:
        object.__setattr__(model, "save_pretrained", _refuse_save_pretrained)


def unguard_save_pretrained(model: nn.Module) -> None:
    """Give ``model`` its own ``save_pretrained`` back (its last adapter is gone).

    >>> unguard_save_pretrained(model)                                    # doctest: +SKIP
    """
    if model.__dict__.get("save_pretrained") is _refuse_save_pretrained:
        del model.__dict__["save_pretrained"]
