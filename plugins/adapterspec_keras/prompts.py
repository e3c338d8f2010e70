"""Prefix and prompt tuning on Keras models.

keras-hub's causal LMs run their attention through a key/value cache only in ``call_with_cache``
(generation); their ``call`` -- used by ``fit``, ``predict`` and plain ``model(x)`` -- has no way to
prepend virtual tokens or past keys/values, so PEFT's prefix and prompt tuning cannot run there
exactly. They are refused with a clear error rather than run approximately.

>>> check_prompt_learning(model, prefix_config)                        # doctest: +SKIP
Traceback (most recent call last):
adapterspec.errors.UnsupportedError: ...
"""

from __future__ import annotations

from typing import Any

from adapterspec import AdapterConfig
from adapterspec.errors import UnsupportedError

__all__ = ["check_prompt_learning"]


def check_prompt_learning(model: Any, config: AdapterConfig) -> None:
    """Refuse prefix/prompt tuning on ``model`` (see the module docstring for why).

    :raises UnsupportedError: always, naming the model class and the method.
    """
    raise UnsupportedError(
        f"{config.peft_type} needs virtual tokens (or past keys/values) in the forward pass; "
        f"{type(model).__name__}.call has no input for them", pointer="/peft_type",
        hint="use a LoRA/IA3 adapter with Keras, or the torch backend for prompt learning")
