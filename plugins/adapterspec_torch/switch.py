"""Per-model bookkeeping and adapter switching: names, active set, delete, merge, unmerge.

All bookkeeping lives in ONE place, :class:`ModelState` at ``model._adapterspec_state``; it is
removed when the last adapter goes. Switching changes only which adapters each wrapper runs: base
weights are never copied.

>>> adapter_names(torch.nn.Linear(2, 2))                              # doctest: +SKIP
[]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adapterspec import AdapterConfig

__all__ = [
    "STATE_ATTR",
    "ModelState",
    "active_adapters",
    "adapter_names",
    "delete",
    "get_state",
    "merge",
    "set_active",
    "unmerge",
]

STATE_ATTR = "_adapterspec_state"


@dataclass
class ModelState:
    """What adapterspec knows about one model's adapters.

    :param names: adapter names in load order.
    :param active: the adapters taking part in the forward pass.
    :param configs: name -> the config the adapter was injected with.
    :param modules: name -> module paths (spec names) it adapts ([] for prompt learning).
    :param merged: adapters whose deltas are in the base weights now, in merge order.
    :param originals: module path -> the module object that was there before the first injection.
    """

    names: list[str] = field(default_factory=list)
    active: list[str] = field(default_factory=list)
    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    modules: dict[str, list[str]] = field(default_factory=dict)
    merged: list[str] = field(default_factory=list)
    originals: dict[str, torch.nn.Module] = field(default_factory=dict)


def get_state(model: torch.nn.Module, *, create: bool = False) -> ModelState | None:
    """``model``'s :class:`ModelState` (created when ``create``), or ``None`` when it has no adapter."""
    raise NotImplementedError


def adapter_names(model: torch.nn.Module) -> list[str]:
    """The adapters loaded in ``model``, in load order.

    >>> adapter_names(model)                                            # doctest: +SKIP
    ['default', 'fr']
    """
    raise NotImplementedError


def active_adapters(model: torch.nn.Module) -> list[str]:
    """The adapters in the forward pass now (``[]`` when disabled or none).

    >>> active_adapters(model)                                          # doctest: +SKIP
    ['default']
    """
    raise NotImplementedError


def set_active(model: torch.nn.Module, adapter_names: list[str]) -> None:
    """Make exactly ``adapter_names`` active (several add up; ``[]`` disables), unmerging first.

    :raises AdapterNotFoundError: a name is not loaded (nothing changes).

    >>> set_active(model, ["fr"])                                       # doctest: +SKIP
    """
    raise NotImplementedError


def delete(model: torch.nn.Module, adapter_name: str) -> None:
    """Remove an adapter; a module left without adapters gets its original object back.

    A merged adapter's delta stays in the base weights (``unload(merge=True)``).

    :raises AdapterNotFoundError: no adapter of that name.

    >>> delete(model, "fr")                                             # doctest: +SKIP
    """
    raise NotImplementedError


def merge(model: torch.nn.Module, adapter_names: list[str]) -> None:
    """Add the adapters' weight deltas into the base weights, in place; the forward then skips them.

    :raises AdapterNotFoundError: a name is not loaded.
    :raises UnsupportedError: prefix/prompt tuning (no weight delta).

    >>> merge(model, ["default"])                                       # doctest: +SKIP
    """
    raise NotImplementedError


def unmerge(model: torch.nn.Module) -> None:
    """Subtract every merged adapter from the base weights again (no-op when none is merged).

    >>> unmerge(model)                                                  # doctest: +SKIP
    """
    raise NotImplementedError
