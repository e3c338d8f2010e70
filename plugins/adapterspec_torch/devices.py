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

from .offload import offload_device

__all__ = ["FLOAT8_DTYPES", "UPCAST_DTYPES", "adapter_target_of", "as_device", "as_dtype", "check_options", "place", "read_buffer",
           "target_of"]

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "f32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "f16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64, "f64": torch.float64,
}


#: The dtypes adapter tensors can be computed in: an integer or bool dtype would round the weights (to 0, mostly),
#: float8 has no matmul on most devices, a complex one would be cast away in the forward.
_FLOATING = frozenset(_DTYPE_NAMES.values())


def as_dtype(dtype: Any) -> torch.dtype | None:
    """A torch dtype from a floating torch dtype or its name (``"float16"``, ``"bf16"``, ``"torch.float16"``).

    :raises UnsupportedError: an integer, bool, complex or float8 dtype, or a name torch adapters cannot use.

    >>> as_dtype("bf16")
    torch.bfloat16
    >>> as_dtype(torch.int8)
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: dtype: ...
    """
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in _FLOATING):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if isinstance(dtype, torch.dtype) or name not in _DTYPE_NAMES:
        raise UnsupportedError(f"{dtype!r} is not a floating dtype adapter tensors can be computed in "
                               "(an integer or bool dtype rounds the weights, float8 and complex ones do not run)",
                               key="dtype", hint="pass torch.float32, torch.float16, torch.bfloat16 or torch.float64 "
                                                 "(or their names), or leave dtype=None for each layer's dtype")
    return _DTYPE_NAMES[name]


def as_device(device: Any) -> torch.device | None:
    """A torch device from a device or its name, checked to be usable on this machine.

    :raises UnsupportedError: not a device name (``"nonsense"``, ``1.5``), or a device this machine lacks
        (``"cuda:0"`` without CUDA, ``"cuda:3"`` with two GPUs).

    >>> as_device("cpu")
    device(type='cpu')
    >>> as_device("nonsense")
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: device: ...
    """
    if device is None:
        return None
    hint = "pass 'cpu', 'meta' or an accelerator this machine has (e.g. 'cuda:0'), or leave device=None for " \
           "each layer's device"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise UnsupportedError(f"{device!r} is not a torch device ({exc})".split("\n")[0], key="device",
                               hint=hint) from exc
    if parsed.type in ("cpu", "meta"):
        return parsed
    module = getattr(torch, parsed.type, None)
    available = getattr(module, "is_available", None)
    if available is not None and not available():
        raise UnsupportedError(f"{device!r}: {parsed.type} is not available on this machine", key="device",
                               hint=hint)
    count = getattr(module, "device_count", None)
    if count is not None and parsed.index is not None and parsed.index >= count():
        raise UnsupportedError(f"{device!r}: this machine has {count()} {parsed.type} device(s)",
                               key="device", hint=hint)
    try:
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError) as exc:  # torch answers a missing backend with either
        raise UnsupportedError(f"{device!r} cannot hold tensors here ({exc})".split("\n")[0], key="device",
                               hint=hint) from exc
    return parsed


def check_options(options: LoadOptions) -> None:
    """Refuse a ``dtype`` or ``device`` load option that cannot work, before anything is changed.

    >>> check_options(LoadOptions(dtype="int8"))
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: dtype: ...
    """
    as_dtype(options.dtype)
    as_device(options.device)


def _reference(like: torch.Tensor | torch.nn.Module) -> torch.Tensor | None:
    if isinstance(like, torch.Tensor):
        return like
    weight = getattr(like, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    return next(iter(like.parameters()), None)


def target_of(like: torch.Tensor | torch.nn.Module, options: LoadOptions) -> tuple[torch.device, torch.dtype]:
    """The device and dtype adapter tensors of a layer get: the options', else ``like``'s.

    :param like: the wrapped layer (its ``weight``, else its first parameter, decides; a layer accelerate
        offloads: its execution device, :mod:`adapterspec_torch.offload`) or a tensor.

    >>> target_of(torch.nn.Linear(2, 2), LoadOptions(dtype="float16"))
    (device(type='cpu'), torch.float16)
    """
    ref = _reference(like)
    device = torch.device(options.device) if options.device is not None else (
        ref.device if ref is not None else torch.device("cpu"))
    if device.type == "meta" and options.device is None and isinstance(like, torch.nn.Module):
        device = offload_device(like) or device  # accelerate computes there; the weight waits on meta
    dtype = as_dtype(options.dtype) or (ref.dtype if ref is not None and ref.is_floating_point() else torch.float32)
    return device, dtype


#: This torch's float8 dtypes: a weight stored in one is quantized (:mod:`adapterspec_torch.quantized`).
FLOAT8_DTYPES = frozenset(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
                                                            "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, name))

#: Layer dtypes whose adapter parameters are kept in float32 when no dtype is given: PEFT's
#: ``cast_adapter_dtype`` (``autocast_adapter_dtype=True``) upcasts exactly these.
UPCAST_DTYPES = frozenset({torch.float16, torch.bfloat16} | FLOAT8_DTYPES)


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
