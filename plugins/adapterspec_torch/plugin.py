"""Hook implementations of the torch backend: thin wrappers that claim ``torch.nn.Module`` models.

This module must stay cheap to import: it never imports torch itself (it looks in ``sys.modules``),
and imports the backend's implementation only once it has claimed a model.

>>> from adapterspec_torch import plugin
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
    "adapterspec_read_buffer",
    "adapterspec_reads_slices",
    "adapterspec_set_active",
    "adapterspec_unmerge",
    "adapterspec_write",
]

BACKEND = "torch"


def _owns(model: Any) -> bool:
    """A ``torch.nn.Module`` that is not a Keras layer: on Keras' torch backend every Keras layer (and model) is
    also a ``torch.nn.Module``, and it is the Keras backend's on every Keras backend."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(model, torch.nn.Module):
        return False
    keras_layer = getattr(getattr(sys.modules.get("keras"), "layers", None), "Layer", None)
    return keras_layer is None or not isinstance(model, keras_layer)


@hookimpl
def adapterspec_backend_name(model: Any) -> str | None:
    """``"torch"`` for a ``torch.nn.Module`` (torch already imported by the user) that is not a Keras layer, else
    ``None``."""
    return BACKEND if _owns(model) else None


@hookimpl
def adapterspec_inject(model: Any, config: AdapterConfig, adapter_name: str, options: LoadOptions) -> list[str] | None:
    """See :func:`adapterspec_torch.inject.inject`."""
    if not _owns(model):
        return None
    from .inject import inject

    return inject(model, config, adapter_name, options)


@hookimpl
def adapterspec_load_state(model: Any, adapter: Adapter, adapter_name: str, options: LoadOptions) -> list[str] | None:
    """See :func:`adapterspec_torch.state.load_state`."""
    if not _owns(model):
        return None
    from .state import load_state

    return load_state(model, adapter, adapter_name, options)


@hookimpl
def adapterspec_read_buffer(model: Any, nbytes: int, options: LoadOptions) -> Any | None:
    """See :func:`adapterspec_torch.devices.read_buffer`."""
    if not _owns(model):
        return None
    from .devices import read_buffer

    return read_buffer(model, nbytes, options)


@hookimpl
def adapterspec_reads_slices(model: Any, options: LoadOptions) -> bool | None:
    """``True`` for a sharded model (FSDP2, tensor parallel): see :func:`adapterspec_torch.distributed.read_slices`."""
    if not _owns(model) or "torch.distributed.tensor" not in sys.modules:
        return None
    from .distributed import is_sharded

    return is_sharded(model)


@hookimpl
def adapterspec_write(model: Any, write: Any) -> Any | None:
    """See :func:`adapterspec_torch.distributed.write_once` (``None`` for a model that is not sharded)."""
    if not _owns(model) or "torch.distributed.tensor" not in sys.modules:
        return None
    from .distributed import write_once

    return write_once(model, write)


@hookimpl
def adapterspec_extract_state(model: Any, adapter_name: str) -> tuple[AdapterConfig, dict[str, Any]] | None:
    """See :func:`adapterspec_torch.state.extract_state`."""
    if not _owns(model):
        return None
    from .state import extract_state

    return extract_state(model, adapter_name)


@hookimpl
def adapterspec_adapter_names(model: Any) -> list[str] | None:
    """See :func:`adapterspec_torch.switch.adapter_names`."""
    if not _owns(model):
        return None
    from .switch import adapter_names

    return adapter_names(model)


@hookimpl
def adapterspec_active_adapters(model: Any) -> list[str] | None:
    """See :func:`adapterspec_torch.switch.active_adapters`."""
    if not _owns(model):
        return None
    from .switch import active_adapters

    return active_adapters(model)


@hookimpl
def adapterspec_set_active(model: Any, adapter_names: list[str]) -> bool | None:
    """See :func:`adapterspec_torch.switch.set_active`."""
    if not _owns(model):
        return None
    from .switch import set_active

    set_active(model, adapter_names)
    return True


@hookimpl
def adapterspec_delete(model: Any, adapter_name: str, unloading: bool) -> bool | None:
    """See :func:`adapterspec_torch.switch.delete`."""
    if not _owns(model):
        return None
    from .switch import delete

    delete(model, adapter_name, unloading=unloading)
    return True


@hookimpl
def adapterspec_merge(model: Any, adapter_names: list[str]) -> bool | None:
    """See :func:`adapterspec_torch.switch.merge`."""
    if not _owns(model):
        return None
    from .switch import merge

    merge(model, adapter_names)
    return True


@hookimpl
def adapterspec_unmerge(model: Any) -> bool | None:
    """See :func:`adapterspec_torch.switch.unmerge`."""
    if not _owns(model):
        return None
    from .switch import unmerge

    unmerge(model)
    return True


@hookimpl
def adapterspec_base_identity(model: Any, adapter_name: str) -> dict[str, str] | None:
    """See :func:`adapterspec_torch.identity.base_identity`."""
    if not _owns(model):
        return None
    from .identity import base_identity

    return base_identity(model, adapter_name)


@hookimpl
def adapterspec_conformance_implementations() -> list[Any]:
    """This backend, as an implementation ``adapterspec conformance`` can test (imports the framework lazily)."""
    from .conformance import TorchImplementation

    return [TorchImplementation()]
