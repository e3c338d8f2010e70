"""Hook implementations of the Flax backend: thin wrappers that claim ``flax.nnx.Module`` models.

This module stays cheap to import: it never imports jax or flax itself (it looks in ``sys.modules``)
and imports the implementation only once it has claimed a model. It is found through the entry point
``[project.entry-points.adapterspec] flax = "adapterspec_flax.plugin"``, like any third-party plugin.

>>> from adapterspec_flax import plugin
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
    "BACKEND",
    "adapterspec_active_adapters",
    "adapterspec_adapter_names",
    "adapterspec_backend_name",
    "adapterspec_conformance_implementations",
    "adapterspec_delete",
    "adapterspec_extract_state",
    "adapterspec_inject",
    "adapterspec_load_state",
    "adapterspec_merge",
    "adapterspec_set_active",
    "adapterspec_unmerge",
]

BACKEND = "flax"


def _owns(model: Any) -> bool:
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(model, nnx.Module)


@hookimpl
def adapterspec_backend_name(model: Any) -> str | None:
    """``"flax"`` for a ``flax.nnx.Module`` (flax already imported by the user), else ``None``."""
    return BACKEND if _owns(model) else None


@hookimpl
def adapterspec_inject(model: Any, config: AdapterConfig, adapter_name: str, options: LoadOptions) -> list[str] | None:
    """See :func:`adapterspec_flax.inject.inject`."""
    if not _owns(model):
        return None
    from .inject import inject

    return inject(model, config, adapter_name, options)


@hookimpl
def adapterspec_load_state(model: Any, adapter: Adapter, adapter_name: str, options: LoadOptions) -> list[str] | None:
    """See :func:`adapterspec_flax.state.load_state`."""
    if not _owns(model):
        return None
    from .state import load_state

    return load_state(model, adapter, adapter_name, options)


@hookimpl
def adapterspec_extract_state(model: Any, adapter_name: str) -> tuple[AdapterConfig, dict[str, Any]] | None:
    """See :func:`adapterspec_flax.state.extract_state`."""
    if not _owns(model):
        return None
    from .state import extract_state

    return extract_state(model, adapter_name)


@hookimpl
def adapterspec_adapter_names(model: Any) -> list[str] | None:
    """See :func:`adapterspec_flax.switch.adapter_names`."""
    if not _owns(model):
        return None
    from .switch import adapter_names

    return adapter_names(model)


@hookimpl
def adapterspec_active_adapters(model: Any) -> list[str] | None:
    """See :func:`adapterspec_flax.switch.active_adapters`."""
    if not _owns(model):
        return None
    from .switch import active_adapters

    return active_adapters(model)


@hookimpl
def adapterspec_set_active(model: Any, adapter_names: list[str]) -> bool | None:
    """See :func:`adapterspec_flax.switch.set_active`."""
    if not _owns(model):
        return None
    from .switch import set_active

    set_active(model, adapter_names)
    return True


@hookimpl
def adapterspec_delete(model: Any, adapter_name: str, unloading: bool) -> bool | None:
    """See :func:`adapterspec_flax.switch.delete`."""
    if not _owns(model):
        return None
    from .switch import delete

    delete(model, adapter_name, unloading=unloading)
    return True


@hookimpl
def adapterspec_merge(model: Any, adapter_names: list[str]) -> bool | None:
    """See :func:`adapterspec_flax.switch.merge`."""
    if not _owns(model):
        return None
    from .switch import merge

    merge(model, adapter_names)
    return True


@hookimpl
def adapterspec_unmerge(model: Any) -> bool | None:
    """See :func:`adapterspec_flax.switch.unmerge`."""
    if not _owns(model):
        return None
    from .switch import unmerge

    unmerge(model)
    return True


@hookimpl
def adapterspec_conformance_implementations() -> list[Any]:
    """The Flax implementation for ``adapterspec conformance --impl flax`` (imports jax only when it runs)."""
    from .conformance import FlaxImplementation

    return [FlaxImplementation()]
