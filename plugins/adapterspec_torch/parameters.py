"""LoRA on parameters (``target_parameters``, SPEC.md 15.1): PEFT's ``ParamWrapper``, one wrapper per module.

A module whose ``nn.Parameter`` s are named by ``target_parameters`` (MoE expert stacks such as
``mlp.experts.gate_up_proj`` [experts, out, in], or any 2-D weight such as a router's ``gate.weight``) is
replaced by a :class:`ParameterLayer`. During its forward pass each targeted parameter is *replaced* by
``W + sum(active deltas)`` and the original module runs unchanged, as PEFT's parametrization does; merging adds
the deltas to the parameters in place.

PEFT nests one ``ParamWrapper`` per targeted parameter of a module (the first parameter in the module's
registration order innermost), so the keys of parameter ``i`` of ``k`` carry ``base_layer.`` ``k - 1 - i``
times: ``mlp.experts.base_layer.lora_A.weight`` (``gate_up_proj``) and ``mlp.experts.lora_A.weight``
(``down_proj``). One :class:`ParameterLayer` holds them all under those names.

>>> import torch
>>> from adapterspec import AdapterConfig, LoadOptions
>>> cfg = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": [], "target_parameters": ["0.weight"],
...                                "r": 2})
>>> layer = ParameterLayer(torch.nn.Linear(8, 4))
>>> layer.add_adapter("default", cfg, "0", ["weight"], LoadOptions())
>>> sorted(layer.adapter_params("default"))
['lora_A.weight', 'lora_B.weight']
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from adapterspec import AdapterConfig, LoadOptions
from adapterspec._moe import MOE_RENAMED, check_moe_conversion
from adapterspec.errors import TargetNotFoundError, UnsupportedError

from ._keys import slot
from .devices import UPCAST_DTYPES, adapter_target_of
from .layers import ActiveSet

__all__ = ["MOE_RENAMED", "ParameterLayer", "check_moe_conversion", "find_parameter_targets", "parameter_prefix"]

def _selects(key: str, entries: Iterable[str]) -> bool:
    return any(key == entry or key.endswith("." + entry) for entry in entries)


def find_parameter_targets(config: AdapterConfig,
                           universe: Sequence[tuple[str, str, nn.Module]]) -> dict[str, list[str]]:
    """``target_parameters``' matches, PEFT's rule: spec module path -> the names of its own parameters
    (``recurse=False``, registration order) whose ``<module>.<name>`` equals an entry or ends with ``.`` + it.

    :param universe: (spec path, model name, module) of every module, wrappers standing for what they wrap.
    :raises TargetNotFoundError: the field is non-empty and selects no parameter (PEFT refuses too).

    >>> cfg = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": [], "target_parameters": ["0.weight"]})
    >>> find_parameter_targets(cfg, [("0", "0", torch.nn.Linear(2, 2))])
    {'0': ['weight']}
    """
    entries = config.get("target_parameters") if config.peft_type == "LORA" else None
    if not entries:
        return {}
    found: dict[str, list[str]] = {}
    for spec, _, module in universe:
        own = module._base() if isinstance(module, ParameterLayer) else module
        names = [name for name, param in own._parameters.items() if param is not None
                 and _selects(f"{spec}.{name}", entries)]
        if names:
            found[spec] = names
    if not found:
        raise TargetNotFoundError(f"target_parameters={list(entries)!r} selects no parameter of the model",
                                  pointer="/target_parameters",
                                  hint="name parameters as '<module suffix>.<parameter>' or '<parameter>', e.g. "
                                       "'mlp.experts.gate_up_proj'")
    return found


def parameter_prefix(position: int, count: int) -> str:
    """The key infix of the ``position``-th of ``count`` targeted parameters of one module (PEFT's nesting).

    >>> parameter_prefix(0, 2), parameter_prefix(1, 2)
    ('base_layer.', '')
    """
    return "base_layer." * (count - 1 - position)


@dataclass
class _Target:
    """One adapter's LoRA on one parameter."""

    param: str
    prefix: str
    r: int
    scaling: float
    experts: int  # 1 for a 2-D parameter
    transposed: bool  # a 3-D parameter stored [experts, in, out] (the module's ``is_transposed``)


def _layout(weight: torch.Tensor, transposed: bool, key: str) -> tuple[int, int, int]:
    """(experts, in, out) of a targeted parameter, PEFT's ``ParamWrapper._get_in_out_features``."""
    if weight.dim() == 2:
        return 1, weight.shape[1], weight.shape[0]
    if weight.dim() == 3:
        experts, first, second = weight.shape
        return (experts, first, second) if transposed else (experts, second, first)
    raise UnsupportedError(f"target_parameters selects a {weight.dim()}-D parameter; LoRA adapts 2-D and 3-D ones",
                           key=key, pointer="/target_parameters", hint="remove the parameter from target_parameters")


class ParameterLayer(nn.Module):
    """A module whose parameters named by ``target_parameters`` get LoRA deltas, any number of named adapters.

    ``forward`` runs the wrapped module with each targeted parameter replaced by ``W + s * delta`` of the active,
    unmerged adapters (SPEC.md 15.1); attribute access falls through to the wrapped module.

    :param base_layer: the original module (kept as ``self.base_layer``, never copied).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_weights = nn.ModuleDict()  # adapter -> ParameterDict of attribute-safe names
        self.__dict__.update(_targets={}, _switch=ActiveSet(), _merged=[])
        self.train(base_layer.training)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self._base(), name)

    def _base(self) -> nn.Module:
        return cast(nn.Module, self._modules["base_layer"])

    def _weights(self, name: str) -> nn.ParameterDict:
        return cast(nn.ParameterDict, self.lora_weights[slot(name)])

    # -- adapters -----------------------------------------------------------------------
    def add_adapter(self, name: str, config: AdapterConfig, path: str, params: Sequence[str],
                    options: LoadOptions) -> None:
        """Create adapter ``name``'s ``lora_A``/``lora_B`` for each parameter ``params`` of module ``path``
        (PEFT's shapes: A ``[r * experts, in]``, B ``[out, r * experts]``), initialised as LoRA is (B = 0) when
        ``options.initialize``; rank and alpha come from ``rank_pattern``/``alpha_pattern`` matched against
        ``<path>.<parameter>``. The adapter is not activated.

        :raises UnsupportedError: a parameter is neither 2-D nor 3-D (names its key).
        """
        base = self._base()
        transposed = bool(getattr(base, "is_transposed", False))
        targets: list[_Target] = []
        weights = nn.ParameterDict()
        trainable = bool(options.trainable)
        for position, param in enumerate(params):
            weight = base._parameters[param]
            assert weight is not None  # find_parameter_targets lists present parameters only
            key = f"{path}.{param}"
            experts, fan_in, fan_out = _layout(weight, transposed, key)
            r = config.rank_for(key)
            alpha = config.alpha_for(key)
            scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            target = _Target(param, parameter_prefix(position, len(params)), r, scaling, experts, transposed)
            if options.device is None and options.dtype is None and weight.is_floating_point():
                device, dtype = weight.device, (torch.float32 if weight.dtype in UPCAST_DTYPES else weight.dtype)
            else:
                device, dtype = adapter_target_of(base, options)
            a = torch.empty(r * experts, fan_in, device=device, dtype=dtype)
            b = torch.empty(fan_out, r * experts, device=device, dtype=dtype)
            if options.initialize:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)
            weights[self._attr(target, "A")] = nn.Parameter(a, requires_grad=trainable)
            weights[self._attr(target, "B")] = nn.Parameter(b, requires_grad=trainable)
            targets.append(target)
        self.lora_weights[slot(name)] = weights
        self._targets[name] = targets

    @staticmethod
    def _attr(target: _Target, factor: str) -> str:
        return f"{target.param}__lora_{factor}"

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` (a merged one's delta stays in the parameters)."""
        self._targets.pop(name, None)
        if slot(name) in self.lora_weights:
            del self.lora_weights[slot(name)]
        if name in self._merged:
            self._merged.remove(name)

    def adapter_names(self) -> list[str]:
        """The adapters this layer holds, in the order they were added."""
        return list(self._targets)

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter ``name``'s tensors by their names under the module (``[base_layer.]lora_A.weight``...)."""
        weights = self._weights(name)
        out: dict[str, nn.Parameter] = {}
        for target in self._targets[name]:
            out[f"{target.prefix}lora_A.weight"] = weights[self._attr(target, "A")]
            out[f"{target.prefix}lora_B.weight"] = weights[self._attr(target, "B")]
        return out

    def set_active(self, names: Sequence[str]) -> None:
        """Run exactly these adapters (those this layer holds) in ``forward``.

        The set is shared with every layer injected into the same model (one assignment switches all).
        """
        self._switch.names = tuple(names)

    @property
    def merged_adapters(self) -> list[str]:
        """The adapters whose deltas are in the parameters now, in merge order."""
        return list(self._merged)

    # -- math ---------------------------------------------------------------------------
    def delta_weight(self, name: str, param: str) -> torch.Tensor:
        """``s * delta`` of adapter ``name`` on parameter ``param``, in the parameter's layout, dtype and device:
        ``B @ A`` for a 2-D parameter; per expert ``e``, ``B[:, :, e] @ A[e]`` with A viewed
        ``[experts, r, in]`` and B ``[out, r, experts]`` (transposed to ``[in, out]`` when the module stores
        ``[experts, in, out]``)."""
        target = next(t for t in self._targets[name] if t.param == param)
        weights = self._weights(name)
        a, b = weights[self._attr(target, "A")], weights[self._attr(target, "B")]
        weight = self._base()._parameters[param]
        assert weight is not None
        compute = torch.float32 if a.dtype in UPCAST_DTYPES and a.device.type == "cpu" else a.dtype
        a, b = a.to(compute), b.to(compute)
        if target.experts == 1:
            delta = (b @ a) * target.scaling
        else:
            a3 = a.reshape(target.experts, -1, a.shape[-1])
            b3 = b.reshape(b.shape[0], -1, target.experts)
            pattern = "o r e, e r i -> e i o" if target.transposed else "o r e, e r i -> e o i"
            delta = torch.einsum(pattern, b3, a3) * target.scaling
        return cast(torch.Tensor, delta.to(device=weight.device, dtype=weight.dtype))

    def _active(self) -> list[str]:
        return [n for n in self._switch.names if n in self._targets and n not in self._merged]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        base = self._base()
        active = self._active()
        if not active:
            return base(*args, **kwargs)
        params = self._parameters_of(active)
        saved = {param: base._parameters[param] for param in params}
        try:
            for param in params:
                weight = saved[param]
                assert weight is not None
                deltas = [self.delta_weight(name, param) for name in active
                          if any(t.param == param for t in self._targets[name])]
                delta = deltas[0]
                for other in deltas[1:]:  # PEFT sums the deltas, then adds them to the weight
                    delta = delta + other
                base._parameters[param] = cast(nn.Parameter, weight + delta)  # a plain tensor, for this call only
            return base(*args, **kwargs)
        finally:
            base._parameters.update(saved)

    def _parameters_of(self, names: Sequence[str]) -> list[str]:
        order = list(self._base()._parameters)
        wanted = {t.param for name in names for t in self._targets[name]}
        return [p for p in order if p in wanted]

    def merge(self, names: Sequence[str]) -> None:
        """Add the adapters' deltas into the parameters, in place."""
        base = self._base()
        with torch.no_grad():
            for name in names:
                if name not in self._targets or name in self._merged:
                    continue
                for target in self._targets[name]:
                    weight = base._parameters[target.param]
                    assert weight is not None
                    weight.add_(self.delta_weight(name, target.param))
                self._merged.append(name)

    def unmerge(self) -> None:
        """Subtract every merged delta again, last merged first."""
        base = self._base()
        with torch.no_grad():
            while self._merged:
                name = self._merged.pop()
                for target in self._targets.get(name, []):
                    weight = base._parameters[target.param]
                    assert weight is not None
                    weight.sub_(self.delta_weight(name, target.param))

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {[t.param for t in ts]}" for n, ts in self._targets.items())
