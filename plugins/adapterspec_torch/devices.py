"""Where adapter tensors go: device and dtype rules of the torch backend.

``options.device`` / ``options.dtype`` when given, else the device and dtype of the layer the adapter
wraps. The ``meta`` device works like any other (shapes only, no data).

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

__all__ = ["as_dtype", "place", "read_buffer", "target_of"]

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


def place(tensor: torch.Tensor, like: torch.Tensor | torch.nn.Module, options: LoadOptions) -> torch.Tensor:
    """``tensor`` on the device and in the dtype :func:`target_of` gives (no copy when already there).

    >>> place(torch.ones(2, dtype=torch.float64), torch.nn.Linear(2, 2), LoadOptions()).dtype
    torch.float32
    """
    device, dtype = target_of(like, options)
    if device.type == "meta":
        return torch.empty(tensor.shape, device="meta", dtype=dtype)
    return tensor.to(device=device, dtype=dtype)


def read_buffer(model: torch.nn.Module, nbytes: int, options: LoadOptions) -> Any:
    """Pinned host memory of ``nbytes`` to read an adapter's file into, when its tensors go to a GPU
    (``options.device``, else the device of ``model``'s first parameter); else ``None``.

    The file's read then takes no page faults (a pinned buffer freed by the last load is reused) and its
    copy to the GPU runs at the bus's speed. Pinned memory is not given for a model on the CPU, whose
    adapter tensors are views of the buffer for good. (Only the first parameter is asked: this runs
    before the read starts, and all of a 7B model's take 0.5 ms. A model spread over a GPU and the CPU
    whose first parameter is on the GPU loads exactly all the same; its CPU layers' adapter tensors then
    live in pinned memory.)

    >>> read_buffer(torch.nn.Linear(2, 2), 64, LoadOptions()) is None
    True
    """
    from adapterspec._safetensors import pinned_allocator

    if options.device is not None:
        device = options.device
    else:
        first = next(model.parameters(), None)
        if first is None:
            return None
        device = first.device
    allocate = pinned_allocator(device)
    return allocate(nbytes) if allocate is not None else None
