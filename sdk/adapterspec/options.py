"""Options passed from the public API to the backend hooks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

__all__ = ["LoadOptions", "ModuleMap"]

#: Maps a spec module path (``"model.layers.0.self_attn.q_proj"``) to the framework's own name for
#: the layer -- a dict, or a callable returning ``None`` for "no such module".
ModuleMap = Union[Mapping[str, str], Callable[[str], "str | None"]]


@dataclass(frozen=True)
class LoadOptions:
    """How a backend should place and treat an adapter's layers.

    :param device: where adapter tensors go (``"cuda:0"``, ``"/GPU:0"``); ``None``: the device of
        the layer each one wraps.
    :param dtype: the dtype adapter tensors are cast to (framework dtype or its name, ``"float16"``);
        ``None``: the dtype of the wrapped layer, but float32 for adapter variables on a float16, bfloat16
        or float8 layer (SPEC.md 7.5).
    :param module_map: spec module path -> the framework's layer name, for models whose layer names
        differ from the spec's (Keras); ``None``: the backend's built-in mapping or identity.
    :param trainable: whether the injected adapter variables are trainable (base weights never are made so).
    :param freeze_base: with ``trainable``, also make every other parameter of the model that belongs to no
        adapter untrainable (PEFT's ``get_peft_model``), so that a training loop updates only adapters; the
        previous flags come back when the last such adapter is deleted. ``False`` leaves them as they are.
    :param initialize: initialise new adapter variables as the config says; ``False`` when every one of
        them is filled right after injection (:func:`adapterspec.load_adapter` does so), which spares
        the random init -- the bulk of injection time.

    >>> LoadOptions(device="cpu").device
    'cpu'
    """

    device: Any = None
    dtype: Any = None
    module_map: ModuleMap | None = None
    trainable: bool = False
    initialize: bool = True
    freeze_base: bool = True
