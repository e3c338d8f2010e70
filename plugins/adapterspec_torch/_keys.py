"""The key an adapter's modules and parameters are stored under in torch's containers, for any adapter name.

SPEC.md 3.3 allows ``.`` in an adapter name (``v1.2``); torch's module and parameter names are the steps of a dotted
path. An ``nn.ModuleDict`` refused such a key (``KeyError: module name can't contain "."``, an adapter with
``modules_to_save`` failed to load), and a key put in directly made the model's own state dict unloadable
(``load_state_dict`` split ``adapter_weights.v1.2.lora_A_weight`` at the dots: unexpected and missing keys). So every
container keyed by adapter (``adapter_weights``, ``modules_to_save``, the parameter layers' ``lora_weights``, the
prompts, VeRA's shared projections) holds it under :func:`slot`, each ``.`` written ``:`` -- a character no adapter
name holds, so each key stands for one name and :func:`adapter_of` gives it back. Names without a dot are their own
key: the state dicts of every other adapter are as before.

>>> slot("v1.2"), adapter_of(slot("v1.2")), slot("default")
('v1:2', 'v1.2', 'default')
"""

from __future__ import annotations

__all__ = ["adapter_of", "slot"]

#: What stands for ``.`` of an adapter name in a torch key (SPEC.md 3.3: no adapter name holds it).
_DOT = ":"


def slot(adapter_name: str) -> str:
    """The key ``adapter_name``'s modules and parameters are stored under in a torch container."""
    return adapter_name.replace(".", _DOT)


def adapter_of(key: str) -> str:
    """The adapter name a key of :func:`slot` stands for."""
    return key.replace(_DOT, ".")
