"""Adapter tensors in and out: load a file's tensors into injected layers, extract them with canonical keys.

>>> load_state(model, adapterspec.read_adapter("my-lora"), "default", LoadOptions())  # doctest: +SKIP
['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', ...]
>>> config, tensors = extract_state(model, "default")                  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from adapterspec import Adapter, AdapterConfig, LoadOptions

__all__ = ["expected_params", "extract_state", "load_state"]


def expected_params(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """Canonical key -> the injected parameter it fills, for every tensor adapter ``adapter_name`` stores."""
    raise NotImplementedError


def load_state(model: torch.nn.Module, adapter: Adapter, adapter_name: str, options: LoadOptions) -> list[str]:
    """Put ``adapter``'s tensors into the layers injected for ``adapter_name``: all checks first, then assign.

    Tensors are read with ``adapter.load_tensors("pt", device=...)`` (safetensors straight to the
    device) and become the parameters' data in the layer's (or ``options``') dtype.

    :returns: the canonical keys loaded.
    :raises MissingTensorError: an injected parameter has no tensor in the file.
    :raises UnexpectedTensorError: a tensor has no injected parameter.
    :raises ShapeMismatchError: a tensor's shape does not fit its parameter.

    >>> load_state(model, adapter, "default", LoadOptions())           # doctest: +SKIP
    """
    raise NotImplementedError


def extract_state(model: torch.nn.Module, adapter_name: str) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """``adapter_name``'s config and tensors, canonical keys, spec (PEFT) layout, contiguous.

    :raises AdapterNotFoundError: no such adapter.

    >>> config, tensors = extract_state(model, "default")              # doctest: +SKIP
    """
    raise NotImplementedError
