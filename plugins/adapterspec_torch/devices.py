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

__all__ = ["place", "target_of"]


def target_of(like: torch.Tensor | torch.nn.Module, options: LoadOptions) -> tuple[torch.device, torch.dtype]:
    """The device and dtype adapter tensors of a layer get: the options', else ``like``'s.

    :param like: the wrapped layer (its first parameter decides) or one of its tensors.

    >>> target_of(torch.nn.Linear(2, 2), LoadOptions(dtype="float16"))
    (device(type='cpu'), torch.float16)
    """
    raise NotImplementedError


def place(tensor: torch.Tensor, like: torch.Tensor | torch.nn.Module, options: LoadOptions) -> torch.Tensor:
    """``tensor`` on the device and in the dtype :func:`target_of` gives (no copy when already there).

    >>> place(torch.ones(2, dtype=torch.float64), torch.nn.Linear(2, 2), LoadOptions()).dtype
    torch.float32
    """
    raise NotImplementedError


def as_dtype(dtype: Any) -> torch.dtype | None:
    """A torch dtype from a torch dtype or its name (``"float16"``, ``"bf16"``); ``None`` stays ``None``."""
    raise NotImplementedError
