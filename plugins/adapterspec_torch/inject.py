"""Injecting adapters: find the targeted modules, wrap them, save modules whole, attach virtual tokens.

>>> inject(model, AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q_proj"]}),
...        "default", LoadOptions())                                  # doctest: +SKIP
['model.layers.0.self_attn.q_proj', 'model.layers.1.self_attn.q_proj']
"""

from __future__ import annotations

import torch

from adapterspec import AdapterConfig, LoadOptions

__all__ = ["find_targets", "inject", "remove_adapter_modules", "resolve_module", "unwrap", "wrap"]


def resolve_module(model: torch.nn.Module, path: str, options: LoadOptions) -> str | None:
    """The model's own name for spec module ``path`` (through ``options.module_map``), or ``None``."""
    raise NotImplementedError


def find_targets(model: torch.nn.Module, config: AdapterConfig, options: LoadOptions | None = None) -> list[str]:
    """The module paths ``config`` adapts in ``model``, in model order (PEFT's matching rules).

    Modules already wrapped by adapterspec are matched by their original path (never their inner
    ``base_layer``).

    :raises TargetNotFoundError: nothing matches.

    >>> find_targets(model, cfg)                                        # doctest: +SKIP
    ['model.layers.0.self_attn.q_proj', ...]
    """
    raise NotImplementedError


def inject(model: torch.nn.Module, config: AdapterConfig, adapter_name: str, options: LoadOptions) -> list[str]:
    """Add adapter ``adapter_name`` to every module ``config`` targets (inactive), all or nothing.

    LoRA/IA3/LoHa/LoKr wrap each target in an :class:`~adapterspec_torch.layers.AdapterLayer`;
    ``modules_to_save`` wrap in a :class:`~adapterspec_torch.layers.ModulesToSaveLayer` (one full copy
    per adapter); prefix/prompt tuning attach a forward pre-hook to the model.

    :returns: the module paths that received the adapter ([] for prompt learning).
    :raises AdapterExistsError: the name is taken.
    :raises TargetNotFoundError: no module matches, or a ``modules_to_save`` entry names none.
    :raises UnsupportedError: a target's layer type cannot take this method (names the module).

    >>> inject(model, cfg, "default", LoadOptions())                    # doctest: +SKIP
    ['model.layers.0.self_attn.q_proj', ...]
    """
    raise NotImplementedError


def wrap(model: torch.nn.Module, path: str, wrapper_type: type[torch.nn.Module]) -> torch.nn.Module:
    """The wrapper at ``path``: the existing one, or a new ``wrapper_type(original)`` put in its place."""
    raise NotImplementedError


def unwrap(model: torch.nn.Module, path: str) -> None:
    """Put the original module object back at ``path`` (its wrapper holds no adapter any more)."""
    raise NotImplementedError


def remove_adapter_modules(model: torch.nn.Module, adapter_name: str) -> None:
    """Remove everything :func:`inject` added for ``adapter_name`` (layers, copies, hooks), unwrapping emptied modules."""
    raise NotImplementedError
