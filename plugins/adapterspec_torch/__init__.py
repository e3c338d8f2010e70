"""adapterspec's PyTorch backend: PEFT-exact adapter layers for ``torch.nn.Module`` models.

The names below load on first use, so importing the plugin entry point (:mod:`adapterspec_torch.plugin`)
does not import torch.

>>> import adapterspec_torch
>>> adapterspec_torch.inject.__name__                                  # doctest: +SKIP
'adapterspec_torch.inject'
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "AdapterLayer",
    "ModulesToSaveLayer",
    "active_adapters",
    "adapter_names",
    "delete",
    "extract_state",
    "find_targets",
    "inject",
    "load_state",
    "merge",
    "place",
    "set_active",
    "unmerge",
]

_WHERE = {
    "AdapterLayer": "layers", "ModulesToSaveLayer": "layers", "place": "devices",
    "find_targets": "inject", "inject": "inject", "extract_state": "state", "load_state": "state",
    "active_adapters": "switch", "adapter_names": "switch", "delete": "switch", "merge": "switch",
    "set_active": "switch", "unmerge": "switch",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
