"""Base-model identity: which base an adapter was trained on, and a fingerprint of its weights (SPEC.md 9.1).

A fingerprint is cheap to compute in any framework: per adapted module, its shape and 64 sampled
elements of its weight (spec layout, rounded to bfloat16), hashed with SHA-256. It is stored in the
safetensors metadata under :data:`FINGERPRINT_KEY` (PEFT ignores it) and compared on load: a base whose
fingerprint differs gets a :class:`~adapterspec.errors.BaseModelMismatchWarning`, or, with
``strict=True``, a :class:`~adapterspec.errors.BaseModelMismatchError`.

>>> import numpy as np
>>> weight = np.arange(12, dtype=np.float32).reshape(3, 4)
>>> fingerprint({"q_proj": (weight.shape, weight.ravel()[sample_indices(weight.size)])})[:3]
'v1:'
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import BaseModelMismatchError, BaseModelMismatchWarning

__all__ = ["FINGERPRINT_KEY", "SAMPLES", "check_base", "fingerprint", "sample_indices"]

#: The safetensors metadata key of the base-model fingerprint.
FINGERPRINT_KEY = "adapterspec_base_fingerprint"

#: Elements sampled from each weight.
SAMPLES = 64


def sample_indices(numel: int) -> list[int]:
    """The flat (row-major, spec layout) indices sampled from a weight of ``numel`` elements:
    ``i * numel // k`` for ``i < k = min(64, numel)``.

    >>> sample_indices(4)
    [0, 1, 2, 3]
    >>> sample_indices(128)[:3]
    [0, 2, 4]
    """
    count = min(SAMPLES, numel)
    return [i * numel // count for i in range(count)]


def _bfloat16_bits(values: Any) -> bytes:
    """float32 values rounded to bfloat16 (to nearest, ties to even), as little-endian 16-bit words."""
    bits = np.ascontiguousarray(np.asarray(values, dtype=np.float32).ravel()).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()


def fingerprint(weights: Mapping[str, tuple[Sequence[int], Any]]) -> str:
    """The fingerprint of a base model: ``"v1:"`` + SHA-256 (hex) over the modules in ascending byte-wise
    order of their paths, each contributing ``path NUL shape NUL samples`` (shape as decimal numbers joined
    by ``,``; samples: the elements at :func:`sample_indices` as bfloat16 words).

    :param weights: module path -> (weight shape in spec layout, the sampled elements in index order).

    >>> fingerprint({"a": ((1,), [1.0])}) == fingerprint({"a": ((1,), [1.0001])})   # one bfloat16 value
    True
    """
    digest = hashlib.sha256()
    paths = sorted(weights, key=lambda p: p.encode("utf-8"))
    arrays = [np.asarray(weights[path][1], dtype=np.float32).ravel() for path in paths]
    words = _bfloat16_bits(np.concatenate(arrays)) if arrays else b""  # one conversion for all modules
    start = 0
    for path, array in zip(paths, arrays):
        shape = weights[path][0]
        digest.update(path.encode("utf-8") + b"\0" + ",".join(str(int(d)) for d in shape).encode() + b"\0")
        digest.update(words[start:start + 2 * array.size])
        start += 2 * array.size
    return "v1:" + digest.hexdigest()


def check_base(recorded: str | None, actual: str | None, *, strict: bool, where: str,
               base_name: str | None = None) -> None:
    """Compare the fingerprint an adapter recorded with the model's: warn on a difference, or refuse.

    Nothing happens when either is unknown (an adapter saved by PEFT, a model on the meta device).

    :raises BaseModelMismatchError: they differ and ``strict``.

    >>> check_base("v1:aa", "v1:aa", strict=True, where="my-lora")
    """
    if recorded is None or actual is None or recorded == actual:
        return
    trained_on = f" ({base_name})" if base_name else ""
    message = (f"the adapter was trained on another base model{trained_on}: the weights of the modules it adapts "
               f"differ (fingerprint {actual[:15]}... here, {recorded[:15]}... recorded)")
    hint = "load it onto the base model it was trained on, or pass strict=False to accept this base"
    if strict:
        raise BaseModelMismatchError(message, path=where, hint=hint)
    warnings.warn(f"{where}: {message}; outputs will not be the trained ones", BaseModelMismatchWarning, stacklevel=3)
