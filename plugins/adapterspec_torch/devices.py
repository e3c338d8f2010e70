"""Where adapter tensors go: device and dtype rules of the torch backend.

``options.device`` / ``options.dtype`` when given, else the device and dtype of the layer the adapter
wraps -- except that an adapter's own parameters on a float16, bfloat16 or float8 layer are kept in
float32 (:func:`adapter_target_of`, SPEC.md 7.5: PEFT's ``autocast_adapter_dtype=True``). The ``meta``
device works like any other (shapes only, no data).

>>> import torch
>>> from adapterspec import LoadOptions
>>> place(torch.ones(2), torch.zeros(1, dtype=torch.float16), LoadOptions()).dtype
torch.float16
"""

from __future__ import annotations

from typing import Any

import torch

from adapterspec import LoadOptions
from adapterspec.errors import UnsupportedError

__all__ = ["UPCAST_DTYPES", "adapter_target_of", "as_dtype", "place", "target_of"]

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "f32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "f16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64, "f64": torch.float64,
}


def as_dtype(dtype: Any) -> torch.dtype | None:
    """A torch dtype from a torch dtype or its name (``"float16"``, ``"bf16"``, ``"torch.float16"``).

    >>> as_dtype("bf16")
    torch.bfloat16
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise UnsupportedError(f"dtype {dtype!r} is not a floating dtype torch adapters can use",
                               hint=f"pass one of {sorted(_DTYPE_NAMES)} or a torch.dtype")
    return _DTYPE_NAMES[name]


def _reference(like: torch.Tensor | torch.nn.Module) -> torch.Tensor | None:
    if isinstance(like, torch.Tensor):
        return like
    weight = getattr(like, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    return next(iter(like.parameters()), None)


def target_of(like: torch.Tensor | torch.nn.Module, options: LoadOptions) -> tuple[torch.device, torch.dtype]:
    """The device and dtype adapter tensors of a layer get: the options', else ``like``'s.

    :param like: the wrapped layer (its ``weight``, else its first parameter, decides) or a tensor.

    >>> target_of(torch.nn.Linear(2, 2), LoadOptions(dtype="float16"))
    (device(type='cpu'), torch.float16)
    """
    ref = _reference(like)
    device = torch.device(options.device) if options.device is not None else (
        ref.device if ref is not None else torch.device("cpu"))
    dtype = as_dtype(options.dtype) or (ref.dtype if ref is not None and ref.is_floating_point() else torch.float32)
    return device, dtype


#: Layer dtypes whose adapter parameters are kept in float32 when no dtype is given: PEFT's
#: ``cast_adapter_dtype`` (``autocast_adapter_dtype=True``) upcasts exactly these.
UPCAST_DTYPES = frozenset({torch.float16, torch.bfloat16} | {
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
                                      "float8_e8m0fnu") if hasattr(torch, name)})


def adapter_target_of(like: torch.Tensor | torch.nn.Module, options: LoadOptions) -> tuple[torch.device, torch.dtype]:
    """:func:`target_of` for an adapter's own parameters (LoRA/IA3/LoHa/LoKr tensors, DoRA magnitudes, token
    rows, virtual tokens): without ``options.dtype``, float32 where the layer is in a dtype of
    :data:`UPCAST_DTYPES`, as PEFT keeps them (copies of modules saved whole keep the module's dtype).

    >>> adapter_target_of(torch.nn.Linear(2, 2).to(torch.bfloat16), LoadOptions())
    (device(type='cpu'), torch.float32)
    >>> adapter_target_of(torch.nn.Linear(2, 2).to(torch.bfloat16), LoadOptions(dtype="bf16"))[1]
    torch.bfloat16
    """
    device, dtype = target_of(like, options)
    if options.dtype is None and dtype in UPCAST_DTYPES:
        dtype = torch.float32
    return device, dtype


def place(tensor: torch.Tensor, like: torch.Tensor | torch.nn.Module, options: LoadOptions) -> torch.Tensor:
    """``tensor`` on the device and in the dtype :func:`target_of` gives (no copy when already there).

    >>> place(torch.ones(2, dtype=torch.float64), torch.nn.Linear(2, 2), LoadOptions()).dtype
    torch.float32
    """
    device, dtype = target_of(like, options)
    if device.type == "meta":
        return torch.empty(tensor.shape, device="meta", dtype=dtype)
    return tensor.to(device=device, dtype=dtype)
