"""adapterspec's PyTorch backend: PEFT-exact adapter layers for ``torch.nn.Module`` models.

Importing this package imports torch; the plugin entry point (:mod:`adapterspec_torch.plugin`) does not.

>>> import adapterspec, adapterspec_torch                               # doctest: +SKIP
>>> adapterspec.load_adapter(model, "my-lora")                          # doctest: +SKIP
"""

from .devices import place
from .inject import find_targets, inject
from .layers import AdapterLayer, ModulesToSaveLayer
from .state import extract_state, load_state
from .switch import active_adapters, adapter_names, delete, merge, set_active, unmerge

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
