"""Hook implementations of the keras backend: thin wrappers that claim Keras 3 models and layers.

This module must stay cheap to import: it never imports keras or tensorflow itself (it looks in
``sys.modules``), and imports the backend's implementation only once it has claimed a model.

>>> from adapterspec_keras import plugin
>>> plugin.adapterspec_backend_name(object()) is None
True
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from adapterspec import hookimpl

if TYPE_CHECKING:
    from adapterspec import Adapter, AdapterConfig, LoadOptions

__all__ = [
    "adapterspec_active_adapters",
    "adapterspec_adapter_names",
    "adapterspec_backend_name",
    "adapterspec_base_identity",
    "adapterspec_conformance_implementations",
    "adapterspec_delete",
    "adapterspec_extract_state",
    "adapterspec_inject",
    "adapterspec_load_state",
    "adapterspec_merge",
    "adapterspec_set_active",
    "adapterspec_unmerge",
]

BACKEND = "keras"

# On Keras' torch backend a Keras layer is also a torch.nn.Module: the torch backend declines it (its ``_owns``),
# and every hook here is tryfirst as well, so that a Keras model is this backend's whatever else is installed.


def _owns(model: Any) -> bool:
    keras = sys.modules.get("keras")
    layers = getattr(keras, "layers", None) if keras is not None else None
    layer_cls = getattr(layers, "Layer", None)
    return layer_cls is not None and isinstance(model, layer_cls)


@hookimpl(tryfirst=True)
def adapterspec_backend_name(model: Any) -> str | None:
    """``"keras"`` for a ``keras.Model`` / ``keras.layers.Layer`` (keras already imported by the user), else ``None``."""
    return BACKEND if _owns(model) else None


@hookimpl(tryfirst=True)
def adapterspec_inject(model: Any, config: AdapterConfig, adapter_name: str, options: LoadOptions) -> list[str] | None:
    """See :func:`adapterspec_keras.inject.inject`."""
    if not _owns(model):
        return None
    from .inject import inject

    return inject(model, config, adapter_name, options)


@hookimpl(tryfirst=True)
def adapterspec_load_state(model: Any, adapter: Adapter, adapter_name: str, options: LoadOptions) -> list[str] | None:
    """See :func:`adapterspec_keras.state.load_state`."""
    if not _owns(model):
        return None
    from .state import load_state

    return load_state(model, adapter, adapter_name, options)


@hookimpl(tryfirst=True)
def adapterspec_extract_state(model: Any, adapter_name: str) -> tuple[AdapterConfig, dict[str, Any]] | None:
    """See :func:`adapterspec_keras.state.extract_state`."""
    if not _owns(model):
        return None
    from .state import extract_state

    return extract_state(model, adapter_name)


@hookimpl(tryfirst=True)
def adapterspec_adapter_names(model: Any) -> list[str] | None:
    """See :func:`adapterspec_keras.switch.adapter_names`."""
    if not _owns(model):
        return None
    from .switch import adapter_names

    return adapter_names(model)


@hookimpl(tryfirst=True)
def adapterspec_active_adapters(model: Any) -> list[str] | None:
    """See :func:`adapterspec_keras.switch.active_adapters`."""
    if not _owns(model):
        return None
    from .switch import active_adapters

    return active_adapters(model)


@hookimpl(tryfirst=True)
def adapterspec_set_active(model: Any, adapter_names: list[str]) -> bool | None:
    """See :func:`adapterspec_keras.switch.set_active`."""
    if not _owns(model):
        return None
    from .switch import set_active

    set_active(model, adapter_names)
    return True


@hookimpl(tryfirst=True)
def adapterspec_delete(model: Any, adapter_name: str, unloading: bool) -> bool | None:
    """See :func:`adapterspec_keras.switch.delete`."""
    if not _owns(model):
        return None
    from .switch import delete

    delete(model, adapter_name, unloading=unloading)
    return True


@hookimpl(tryfirst=True)
def adapterspec_merge(model: Any, adapter_names: list[str]) -> bool | None:
    """See :func:`adapterspec_keras.switch.merge`."""
    if not _owns(model):
        return None
    from .switch import merge

    merge(model, adapter_names)
    return True


@hookimpl(tryfirst=True)
def adapterspec_unmerge(model: Any) -> bool | None:
    """See :func:`adapterspec_keras.switch.unmerge`."""
    if not _owns(model):
        return None
    from .switch import unmerge

    unmerge(model)
    return True


@hookimpl(tryfirst=True)
def adapterspec_base_identity(model: Any, adapter_name: str) -> dict[str, str] | None:
    """See :func:`adapterspec_keras.identity.base_identity`."""
    if not _owns(model):
        return None
    from .identity import base_identity

    return base_identity(model, adapter_name)


@hookimpl
def adapterspec_conformance_implementations() -> list[Any]:
    """This backend, as an implementation ``adapterspec conformance`` can test (imports the framework lazily)."""
    from .conformance import KerasImplementation

    return [KerasImplementation()]
