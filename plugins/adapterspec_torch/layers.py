"""The adapter layers: one wrapper per adapted module, holding any number of named adapters.

:class:`AdapterLayer` wraps ``nn.Linear``, ``nn.Embedding``, ``nn.Conv1d``/``nn.Conv2d`` and
transformers' ``Conv1D`` and runs PEFT's math exactly (LoRA, rsLoRA, DoRA, lora_bias, IA3, LoHa, LoKr).
:class:`ModulesToSaveLayer` holds one full copy of a module per adapter (``modules_to_save``).
Parameter names (``lora_A.weight``...) are the spec's, so canonical keys come from them directly.

>>> layer = AdapterLayer(torch.nn.Linear(8, 4))                       # doctest: +SKIP
>>> layer.add_adapter("default", cfg, "q_proj", LoadOptions())        # doctest: +SKIP
>>> sorted(layer.adapter_params("default"))                           # doctest: +SKIP
['lora_A.weight', 'lora_B.weight']
"""

from __future__ import annotations

import torch
from torch import nn

from adapterspec import AdapterConfig, LoadOptions

__all__ = ["AdapterLayer", "ModulesToSaveLayer", "check_supported", "layer_kind"]


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d_hf"`` (transformers Conv1D), ``"embedding"``, ``"conv1d"``, ``"conv2d"``, or ``None``."""
    raise NotImplementedError


def check_supported(module: nn.Module, path: str, config: AdapterConfig) -> None:
    """Refuse a layer this backend cannot adapt with ``config``'s method.

    :raises UnsupportedError: naming ``path`` and the layer type.
    """
    raise NotImplementedError


class AdapterLayer(nn.Module):
    """A base layer plus named adapters; ``forward`` = base output plus the active adapters, PEFT's math.

    :param base_layer: the original module (kept as ``self.base_layer``, never copied).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        raise NotImplementedError

    def add_adapter(self, name: str, config: AdapterConfig, path: str, options: LoadOptions) -> None:
        """Create adapter ``name``'s parameters for module ``path`` (initialised as ``config`` says, inactive)."""
        raise NotImplementedError

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s parameters (it must not be merged)."""
        raise NotImplementedError

    def adapter_names(self) -> list[str]:
        """The adapters this layer holds, in insertion order."""
        raise NotImplementedError

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        """Spec parameter name (``"lora_A.weight"``, ``"ia3_l"``...) -> parameter, for adapter ``name``."""
        raise NotImplementedError

    def set_active(self, names: list[str]) -> None:
        """Run exactly these adapters (those this layer holds) in ``forward``."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """The change adapter ``name`` makes to the base weight, in the base weight's layout."""
        raise NotImplementedError

    def merge(self, names: list[str]) -> None:
        """Add the deltas of ``names`` into the base weight in place (DoRA: rescale by m/||W + dW||)."""
        raise NotImplementedError

    def unmerge(self) -> None:
        """Undo :meth:`merge` for every merged adapter, in reverse order."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        raise NotImplementedError


class ModulesToSaveLayer(nn.Module):
    """A module saved whole: the original plus one trainable copy per adapter; the active adapter's copy runs.

    :param original_module: the module as it was (kept, never modified).
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        raise NotImplementedError

    def add_adapter(self, name: str, options: LoadOptions) -> None:
        """Add a copy of the original module for adapter ``name``."""
        raise NotImplementedError

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s copy."""
        raise NotImplementedError

    def adapter_names(self) -> list[str]:
        """The adapters holding a copy, in insertion order."""
        raise NotImplementedError

    def adapter_params(self, name: str) -> dict[str, torch.Tensor]:
        """The copy's state dict (parameter name -> tensor) for adapter ``name``."""
        raise NotImplementedError

    def set_active(self, names: list[str]) -> None:
        """Run the copy of the (first) active adapter that has one, else the original."""
        raise NotImplementedError

    def forward(self, *args: object, **kwargs: object) -> object:
        raise NotImplementedError
