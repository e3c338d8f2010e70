"""adapterspec's Keras 3 backend: PEFT-exact adapter layers for Keras models, keras-hub models included.

Adapters trained with PEFT on a transformers model load into the keras-hub model converted from the
same checkpoint and give the same outputs; adapters trained in Keras save as folders PEFT loads.
Importing this package imports nothing heavy: keras is imported when a name below is first used
(the plugin entry point, :mod:`adapterspec_keras.plugin`, never imports it).

>>> import adapterspec, keras_hub                                       # doctest: +SKIP
>>> model = keras_hub.models.Llama3CausalLM.from_preset("./hf-llama", preprocessor=None)  # doctest: +SKIP
>>> adapterspec.load_adapter(model, "./peft-lora")                      # doctest: +SKIP
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
    "keras_lora_adapter",
    "load_state",
    "merge",
    "place",
    "set_active",
    "spec_sites",
    "unmerge",
]

_WHERE = {
    "AdapterLayer": "layers", "ModulesToSaveLayer": "modules_to_save", "place": "devices",
    "find_targets": "inject", "inject": "inject", "keras_lora_adapter": "keras_lora", "extract_state": "state", "load_state": "state",
    "active_adapters": "switch", "adapter_names": "switch", "delete": "switch", "merge": "switch",
    "set_active": "switch", "unmerge": "switch", "spec_sites": "mapping",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
