"""While a transformers model holds adapters, its ``save_pretrained`` refuses instead of writing something wrong.

``save_pretrained`` would write the whole model with the wrapped layers' keys renamed (``...q_proj.base_layer.weight``,
``...adapter_weights.default...``); transformers reloads that with the adapted layers re-initialised (they are
reported MISSING). So the method is shadowed on the instance by one raising a typed error that says what to do,
and the shadow is removed with the last adapter. A model around the adapted one (the adapter injected into
``model.model``, ``model.save_pretrained`` called) and a part of it (the backbone of an adapted causal LM) write the
same broken file, and neither is the instance shadowed: transformers' ``PreTrainedModel.save_pretrained`` itself is
wrapped (once, at the first injection) by one that refuses while any of the model's modules holds an adapter.

``load_state_dict`` into a model whose adapter is merged replaced the merged weight (base + delta) with the state
dict's, and the next unmerge subtracted the delta from it: the base off by the delta, after ``unload`` too. So
``torch.nn.Module.load_state_dict`` is wrapped too (once, at the first injection), to refuse before it loads anything
while a module inside is merged (:func:`~adapterspec_torch.switch.check_base_loadable`), as Keras' ``load_weights``.

>>> import torch
>>> guard_save_pretrained(torch.nn.Linear(2, 2))  # not a transformers model: nothing to guard
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch
from torch import nn

from adapterspec.errors import UnsupportedError

__all__ = ["guard_save_pretrained", "holds_adapters", "unguard_save_pretrained"]


def _refuse_save_pretrained(*args: Any, **kwargs: Any) -> None:
    raise UnsupportedError(
        "save_pretrained() on a model with adapterspec adapters would write the full model with renamed keys "
        "(base_layer, adapter_weights), which transformers reloads with the adapted layers re-initialised",
        hint="save the adapter with adapterspec.save_adapter(model, folder); for a full merged model call "
             "adapterspec.unload(model, merge=True) first, then save_pretrained(); with a Trainer, attach "
             "adapterspec_torch.training.AdapterCheckpoints(trainer)")


def holds_adapters(model: nn.Module) -> bool:
    """Whether ``model`` or a module inside it holds adapterspec adapters (their bookkeeping or a wrapped layer).

    >>> holds_adapters(torch.nn.Linear(2, 2))
    False
    """
    from .layers import AdapterLayer, ModulesToSaveLayer
    from .parameters import ParameterLayer
    from .switch import get_state

    return any(isinstance(m, (AdapterLayer, ModulesToSaveLayer, ParameterLayer)) or get_state(m) is not None
               for m in model.modules())


def _guard_transformers() -> None:
    """Wrap ``transformers.PreTrainedModel.save_pretrained`` (once) so that it refuses while adapters are inside."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return
    base = transformers.PreTrainedModel
    original = base.__dict__.get("save_pretrained")
    if original is None or getattr(original, "_adapterspec_guard", False):
        return

    @functools.wraps(original)
    def save_pretrained(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if holds_adapters(self):
            _refuse_save_pretrained()
        return original(self, *args, **kwargs)

    save_pretrained._adapterspec_guard = True  # type: ignore[attr-defined]
    base.save_pretrained = save_pretrained


def _guard_load_state_dict() -> None:
    """Wrap ``torch.nn.Module.load_state_dict`` (once) so that it refuses while an adapter inside is merged."""
    original = nn.Module.__dict__["load_state_dict"]
    if getattr(original, "_adapterspec_guard", False):
        return

    @functools.wraps(original)
    def load_state_dict(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        from .switch import check_base_loadable  # switch imports the layers, which import this module's users

        check_base_loadable(self)
        return original(self, *args, **kwargs)

    load_state_dict._adapterspec_guard = True  # type: ignore[attr-defined]
    nn.Module.load_state_dict = load_state_dict  # type: ignore[method-assign]


def guard_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` (a transformers model's, and that of every transformers model around it or
    inside it) refuse until :func:`unguard_save_pretrained`; and any module's ``load_state_dict`` refuse while an
    adapter inside it is merged.

    >>> guard_save_pretrained(model)                                      # doctest: +SKIP
    """
    _guard_transformers()
    _guard_load_state_dict()
    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in model.__dict__:
        object.__setattr__(model, "save_pretrained", _refuse_save_pretrained)


def unguard_save_pretrained(model: nn.Module) -> None:
    """Give ``model`` its own ``save_pretrained`` back (its last adapter is gone).

    >>> unguard_save_pretrained(model)                                    # doctest: +SKIP
    """
    if model.__dict__.get("save_pretrained") is _refuse_save_pretrained:
        del model.__dict__["save_pretrained"]
