"""Where adapter arrays go: device and dtype rules of the Flax backend (those of the torch backend).

``options.device`` / ``options.dtype`` when given, else the device and dtype of the layer's weight -- but float32
on a float16, bfloat16 or float8 layer (SPEC.md 7.5: PEFT's ``autocast_adapter_dtype``, the torch backend's
``UPCAST_DTYPES``). A device is a ``jax.Device`` or a name: ``"cpu"``, ``"gpu:1"``, ``"cuda:0"`` (read as ``gpu``),
``"tpu"``.

>>> import jax.numpy as jnp
>>> from adapterspec import LoadOptions
>>> place(jnp.ones(2), jnp.zeros(1, jnp.bfloat16), LoadOptions()).dtype
dtype('float32')
>>> place(jnp.ones(2), jnp.zeros(1, jnp.bfloat16), LoadOptions(dtype="bf16")).dtype
dtype(bfloat16)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adapterspec import LoadOptions
from adapterspec.errors import UnsupportedError

__all__ = ["UPCAST_DTYPES", "adapter_dtype", "as_device", "as_dtype", "place"]

_DTYPE_NAMES = {
    "float32": jnp.float32, "fp32": jnp.float32, "float": jnp.float32, "f32": jnp.float32,
    "float16": jnp.float16, "fp16": jnp.float16, "half": jnp.float16, "f16": jnp.float16,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float64": jnp.float64, "fp64": jnp.float64, "double": jnp.float64, "f64": jnp.float64,
}


#: Layer dtypes whose adapter variables are held in float32 when no dtype is asked for: PEFT's ``cast_adapter_dtype``
#: (``autocast_adapter_dtype=True``) upcasts exactly these, and so does the torch backend (SPEC.md 7.5).
UPCAST_DTYPES = frozenset(jnp.dtype(getattr(jnp, name)) for name in (
    "float16", "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float8_e4m3b11fnuz", "float8_e3m4", "float8_e4m3") if hasattr(jnp, name))


def as_dtype(dtype: Any) -> np.dtype | None:
    """A NumPy/JAX dtype from a dtype or its name (``"bf16"``, ``"float16"``, ``"torch.float16"``).

    >>> as_dtype("bf16")
    dtype(bfloat16)
    """
    if dtype is None:
        return None
    name = str(getattr(dtype, "name", dtype)).lower().removeprefix("torch.").removeprefix("jnp.")
    if name not in _DTYPE_NAMES:
        raise UnsupportedError(f"dtype {dtype!r} is not a floating dtype Flax adapters can use",
                               hint=f"pass one of {sorted(_DTYPE_NAMES)} or a jnp dtype")
    return jnp.dtype(_DTYPE_NAMES[name])


def as_device(device: Any) -> jax.Device | None:
    """A ``jax.Device`` from a device or its name (``"cpu"``, ``"gpu:0"``, ``"cuda:1"``).

    :raises UnsupportedError: no such device in this process.

    >>> as_device("cpu").platform
    'cpu'
    """
    if device is None or isinstance(device, jax.Device):
        return device
    platform, _, index = str(device).lower().lstrip("/").partition(":")
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
    try:
        return jax.devices(platform)[int(index or 0)]
    except (RuntimeError, IndexError, ValueError):
        raise UnsupportedError(f"no JAX device {device!r} in this process (have: {jax.devices()})",
                               hint="pass a jax.Device or a name like 'cpu' or 'gpu:0'") from None


def adapter_dtype(like: jax.Array, options: LoadOptions) -> np.dtype:
    """The dtype of an adapter variable for a layer whose weight is ``like``: ``options.dtype``, else ``like``'s, but
    float32 for a dtype of :data:`UPCAST_DTYPES` (the torch backend's ``adapter_target_of``).

    >>> adapter_dtype(jnp.zeros(1, jnp.float16), LoadOptions())
    dtype('float32')
    >>> adapter_dtype(jnp.zeros(1, jnp.float16), LoadOptions(dtype="float16"))
    dtype('float16')
    """
    asked = as_dtype(options.dtype)
    if asked is not None:
        return asked
    return jnp.dtype(jnp.float32) if like.dtype in UPCAST_DTYPES else jnp.dtype(like.dtype)


def place(array: Any, like: jax.Array, options: LoadOptions) -> jax.Array:
    """``array`` (NumPy or JAX) as a JAX array in :func:`adapter_dtype`, on ``options.device`` or ``like``'s."""
    dtype = adapter_dtype(like, options)
    device = as_device(options.device) or next(iter(like.devices()))
    if not isinstance(array, jax.Array):  # convert on the host, then one transfer
        return jax.device_put(np.asarray(array).astype(dtype, copy=False), device)
    return jax.device_put(array.astype(dtype), device)
