"""Where adapter variables go: device and dtype rules of the keras backend.

``options.device`` / ``options.dtype`` when given (``"/CPU:0"``, ``"/GPU:0"``, ``"float16"``), else the
device and dtype of the kernel the adapter wraps.

>>> from adapterspec import LoadOptions
>>> as_dtype("bf16")
'bfloat16'
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from adapterspec import LoadOptions
from adapterspec.errors import UnsupportedError

__all__ = ["as_device", "as_dtype", "check_options", "device_of", "device_scope", "host_array", "place", "target_of"]

_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32", "f32": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16", "f16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64", "double": "float64", "f64": "float64",
}


def as_dtype(dtype: Any) -> str | None:
    """A Keras dtype name from a name (``"bf16"``, ``"torch.float16"``) or a framework/NumPy dtype.

    >>> as_dtype("float16"), as_dtype(None)
    ('float16', None)

    :raises UnsupportedError: not a floating dtype.
    """
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in _DTYPE_NAMES:  # the common case: a Keras variable's dtype
        return _DTYPE_NAMES[dtype]
    name = getattr(dtype, "name", None) if not isinstance(dtype, str) else dtype
    name = str(name or dtype).lower().rsplit(".", 1)[-1].removeprefix("<dtype: '").rstrip("'>")
    if name not in _DTYPE_NAMES:
        raise UnsupportedError(f"{dtype!r} is not a floating dtype adapter variables can be computed in "
                               "(an integer or bool dtype rounds the weights, float8 and complex ones do not run)",
                               key="dtype", hint=f"pass one of {sorted(_DTYPE_NAMES)}, or leave dtype=None for "
                                                 "each kernel's dtype")
    return _DTYPE_NAMES[name]


_DEVICE_HINT = "pass a device this machine has ('/CPU:0', '/GPU:0' with TensorFlow; 'cpu:0', 'gpu:0' with JAX), " \
               "or leave device=None for each kernel's device"


def as_device(device: Any) -> str | None:
    """``device`` as a string, checked to name a device of this machine for the Keras backend in use.

    TensorFlow places a variable meant for a device it lacks (``"/GPU:0"`` without a GPU) on another one
    without a word; that is refused here instead.

    :raises UnsupportedError: not a device name, or a device this machine lacks.

    >>> as_device("/CPU:0")
    '/CPU:0'
    >>> as_device("/GPU:7")
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: device: ...
    """
    if device is None:
        return None
    import keras

    name = str(device)
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            spec = tf.DeviceSpec.from_string(name)
            kind, index = spec.device_type, spec.device_index or 0
            count = len(tf.config.list_logical_devices(kind.upper())) if kind else 1
        elif backend == "jax":
            import jax

            kind, _, number = name.lower().partition(":")
            index = int(number or 0)
            count = len(jax.devices(kind))
        elif backend == "torch":
            import torch

            parsed = torch.device(name.lower().replace("gpu", "cuda"))  # as Keras' torch backend reads it
            kind, index = parsed.type, parsed.index or 0
            module: Any = getattr(torch, kind, None)
            count = module.device_count() if kind not in ("cpu", "meta") and hasattr(module, "device_count") else 1
        else:
            return name
    except (ValueError, RuntimeError) as exc:  # a name the backend cannot parse, a platform it does not have
        raise UnsupportedError(f"{device!r} is not a {backend} device here ({exc})".split("\n")[0], key="device",
                               hint=_DEVICE_HINT) from exc
    if kind == "meta":  # torch's device without memory: the adapter would compute on no values
        raise UnsupportedError(f"{device!r} holds no values: an adapter there computes on uninitialised memory",
                               key="device", hint=_DEVICE_HINT)
    if index >= count:
        raise UnsupportedError(f"{device!r}: this machine has {count} {kind} device(s) for {backend}", key="device",
                               hint=_DEVICE_HINT)
    return name


def check_options(options: LoadOptions) -> None:
    """Refuse a ``dtype`` or ``device`` load option that cannot work, before anything is changed.

    >>> check_options(LoadOptions(dtype="int8"))
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: dtype: ...
    """
    as_dtype(options.dtype)
    as_device(options.device)


#: id(variable) -> (a weak reference to it, its device): a variable never moves, and asking TensorFlow takes
#: microseconds, once per adapted module and load.
_DEVICES: dict[int, tuple[weakref.ref[Any], str | None]] = {}


def device_of(variable: Any) -> str | None:
    """The device a Keras variable lives on (TensorFlow: its ``tf.Variable``'s; torch: its tensor's), else ``None``.

    >>> import keras
    >>> device_of(keras.Variable(np.zeros(2))) is None or "CPU" in device_of(keras.Variable(np.zeros(2)))
    True
    """
    key = id(variable)
    known = _DEVICES.get(key)
    if known is not None and known[0]() is variable:
        return known[1]
    value = getattr(variable, "value", None)
    device = getattr(value, "device", None)
    if type(device).__module__ == "torch":  # Keras' torch backend: a torch.device
        device = str(device)
    device = device if isinstance(device, str) and device else None
    try:
        ref = weakref.ref(variable, functools.partial(_forget, key))
    except TypeError:  # not weak-referenceable: not remembered
        return device
    _DEVICES[key] = (ref, device)
    return device


def _forget(key: int, ref: weakref.ref[Any]) -> None:
    _DEVICES.pop(key, None)


def target_of(variable: Any, options: LoadOptions) -> tuple[str | None, str]:
    """The device and dtype adapter variables of a layer get: the options', else ``variable``'s.

    >>> import keras
    >>> target_of(keras.Variable(np.zeros(2, "float32")), LoadOptions(dtype="float16"))[1]
    'float16'
    """
    device = str(options.device) if options.device is not None else device_of(variable)
    if device == "meta":
        raise UnsupportedError(f"the weights of {getattr(variable, 'path', variable)!r} are on torch's meta device "
                               "(no values): an adapter there would compute on uninitialised memory", key="device",
                               hint="load the model's weights first, or pass device='cpu' (or 'cuda')")
    own = str(getattr(variable, "dtype", "float32"))
    # a quantized kernel's int8 (or packed) dtype is no dtype to compute in: float32, as the torch backend's
    dtype = as_dtype(options.dtype) or (as_dtype(own) if own in _DTYPE_NAMES else None) or "float32"
    return device, dtype


@contextlib.contextmanager
def device_scope(device: str | None) -> Iterator[None]:
    """Create variables and tensors on ``device`` inside the block (nothing when ``None``).

    >>> with device_scope("/CPU:0"):
    ...     pass
    """
    if device is None:
        yield
        return
    import keras

    with keras.device(device):
        yield


def place(value: Any, variable: Any) -> Any:
    """``value`` (NumPy or framework array) as a NumPy array in ``variable``'s dtype, ready for ``assign``.

    >>> import keras
    >>> place(np.ones(2, np.float64), keras.Variable(np.zeros(2, "float32"))).dtype
    dtype('float32')
    """
    array = np.asarray(value)
    dtype = str(getattr(variable, "dtype", array.dtype))
    if dtype == "bfloat16":
        import ml_dtypes

        return array.astype(ml_dtypes.bfloat16)
    return array.astype(dtype, copy=False)


def host_array(variable: Any, *, snapshot: bool = False) -> np.ndarray:
    """The variable's value as a NumPy array in host memory, without copying it where the backend allows.

    TensorFlow's ``numpy()`` copies the whole tensor, and keras' ``convert_to_numpy`` copies it twice (4 ms for
    the 20 MB benchmark adapter), while a read of a ``tf.Variable`` shares its buffer: TensorFlow copies a buffer
    that is still referenced before it writes into it, so the array keeps the value read here (a snapshot).
    JAX arrays are immutable (also a snapshot). A torch tensor on the CPU is the variable's own memory, which an
    ``assign`` overwrites in place: with ``snapshot`` it is copied.

    :param snapshot: the array must keep today's value after later assignments to the variable.

    >>> import keras
    >>> host_array(keras.Variable(np.arange(3, dtype="float32"))).tolist()
    [0.0, 1.0, 2.0]
    """
    value = getattr(variable, "value", variable)
    if type(value).__name__ == "ResourceVariable":  # a plain tf.Variable (not distributed): ReadVariableOp alone,
        import tensorflow as tf  # without value()'s Python around it (read_value() adds an identity op: twice the
        # time); the fingerprint's reads are most of a Keras save's own work (SPEC.md 9.1)
        return np.asarray(tf.raw_ops.ReadVariableOp(resource=value.handle, dtype=value.dtype))
    read = getattr(value, "value", None) if hasattr(value, "read_value") else None
    if read is not None:  # another tf.Variable (a distributed one)
        return np.asarray(read())
    detach = getattr(value, "detach", None)
    if detach is not None:  # Keras on torch: the tensor's own .numpy() shares its buffer
        tensor = detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":  # torch's .numpy() has no bfloat16: the same bits as ml_dtypes'
            import ml_dtypes
            import torch

            bits: np.ndarray = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return bits.copy() if snapshot else bits
        array: np.ndarray = tensor.numpy()
        return array.copy() if snapshot else array
    # JAX arrays take NumPy 2's ``copy=``; torch tensors' and Keras variables' ``__array__`` do not, and NumPy
    # warns for them (an error where warnings are, as in a strict load checked with warnings as errors)
    return np.asarray(value)
