"""Base weights computed from other tensors at each forward: weight and spectral normalisation, as
parametrizations (``torch.nn.utils.parametrizations``) or as the older forward pre-hooks (``torch.nn.utils.
weight_norm``: ``weight_g``/``weight_v``; ``torch.nn.utils.spectral_norm``: ``weight_orig``). Wav2Vec2's and
HuBERT's ``pos_conv_embed.conv`` is weight-normed.

Reading such a weight recomputes it, so a merge that adds into ``module.weight`` in place changes a throwaway
tensor: the adapter would be marked merged and skipped while the base weight stayed as it was. A merge therefore
writes the merged weight back with :func:`store`. Weight normalisation (``w = g · v / ‖v‖``) has an exact write
(its ``right_inverse``: ``v = w``, ``g = ‖w‖``), so the recomputed weight is the merged one to float32 rounding;
any other computation (spectral norm's ``w / σ(w)``, a parametrization not known here) has none, and
:func:`check_writable` refuses the merge before anything changes.

>>> conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(2, 3, 3))
>>> computed_by(conv, "weight"), computed_by(conv, "bias")
('torch.nn.utils.parametrizations.weight_norm', None)
>>> merged = conv.weight.detach() + 0.5
>>> store(conv, "weight", merged)
>>> bool(torch.allclose(conv.weight, merged))
True
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from adapterspec.errors import UnsupportedError

__all__ = ["check_writable", "computed_by", "copy_module", "current", "store"]

#: Readable names of torch's own parametrizations (classes private to torch.nn.utils.parametrizations).
_NAMES = {"_WeightNorm": "torch.nn.utils.parametrizations.weight_norm",
          "_SpectralNorm": "torch.nn.utils.parametrizations.spectral_norm",
          "_Orthogonal": "torch.nn.utils.parametrizations.orthogonal"}


def _hook(module: nn.Module, name: str) -> Any:
    """The old-style weight-norm or spectral-norm forward pre-hook that computes ``module.<name>``, if any."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm)) and hook.name == name:
            return hook
    return None


def _chain(module: nn.Module, name: str) -> list[nn.Module]:
    """The parametrizations computing ``module.<name>``, first applied first."""
    return list(cast(nn.ModuleList, cast(nn.ModuleDict, module.parametrizations)[name]))


def computed_by(module: nn.Module, name: str) -> str | None:
    """What computes ``module.<name>`` from other tensors at each forward, or ``None`` for a stored tensor (a
    parameter or buffer of the module, or no such tensor).

    >>> computed_by(torch.nn.utils.spectral_norm(torch.nn.Linear(2, 2)), "weight")
    'torch.nn.utils.spectral_norm (weight_orig)'
    >>> computed_by(torch.nn.Linear(2, 2), "weight") is None
    True
    """
    if name in module._parameters or name in module._buffers:
        return None
    if parametrize.is_parametrized(module, name):
        return " then ".join(_NAMES.get(type(p).__name__, f"the parametrization {type(p).__module__}."
                                        f"{type(p).__qualname__}") for p in _chain(module, name))
    hook = _hook(module, name)
    if isinstance(hook, WeightNorm):
        return f"torch.nn.utils.weight_norm ({name}_g, {name}_v)"
    if isinstance(hook, SpectralNorm):
        return f"torch.nn.utils.spectral_norm ({name}_orig)"
    if isinstance(getattr(module, name, None), torch.Tensor):
        return f"something other than a stored tensor ({name} is not a parameter or buffer of the module)"
    return None


def _exactly_writable(module: nn.Module, name: str) -> bool:
    """Whether :func:`store` writes ``module.<name>`` so that it recomputes to the value written (to rounding):
    one weight normalisation, as a parametrization or as the old hook."""
    if parametrize.is_parametrized(module, name):
        chain = _chain(module, name)
        return len(chain) == 1 and isinstance(chain[0], _WeightNorm)
    return isinstance(_hook(module, name), WeightNorm) and {f"{name}_g", f"{name}_v"} <= set(module._parameters)


def check_writable(module: nn.Module, name: str, key: str, adapter: str) -> None:
    """Refuse to merge adapter ``adapter`` into ``module.<name>`` when that tensor is computed at each forward and
    :func:`store` cannot write it exactly.

    :param key: the module's path, for the error.
    :raises UnsupportedError: naming ``key`` and what computes the tensor.

    >>> check_writable(torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(2, 2)), "weight", "proj", "a")
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: proj: cannot merge adapter 'a': ...
    """
    how = computed_by(module, name)
    if how is None or _exactly_writable(module, name):
        return
    undo = ("torch.nn.utils.remove_spectral_norm(module)" if isinstance(_hook(module, name), SpectralNorm)
            else f"torch.nn.utils.parametrize.remove_parametrizations(module, {name!r})"
            if parametrize.is_parametrized(module, name) else "store the weight as a parameter")
    raise UnsupportedError(
        f"cannot merge adapter {adapter!r}: this {type(module).__qualname__}'s {name} is computed at each forward by "
        f"{how}, and no stored value makes it recompute to the merged weight (only weight normalisation has an exact "
        "inverse), so the merge would be lost", key=key,
        hint=f"keep the adapter unmerged, or make the {name} a plain parameter first ({undo}) and merge then")


def current(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>`` as the module's next forward computes it. The old weight-norm hook sets the attribute only
    before a forward, so between forwards it can be stale (``weight_g``/``weight_v`` changed since): it is
    recomputed here, as the hook would.

    >>> conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(2, 3, 3))
    >>> bool(torch.equal(current(conv, "weight"), conv.weight))
    True
    """
    hook = _hook(module, name) if name not in module._parameters else None
    if isinstance(hook, WeightNorm):
        setattr(module, name, hook.compute_weight(module))
    value: torch.Tensor = getattr(module, name)
    return value


def store(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Write ``value`` as ``module.<name>`` where that tensor is computed (through the parametrization's
    ``right_inverse``, or the old weight-norm hook's ``g`` and ``v``); nothing for a stored tensor, which the caller
    changed in place. :func:`check_writable` passed for it."""
    if computed_by(module, name) is None:
        return
    with torch.no_grad():
        if parametrize.is_parametrized(module, name):
            setattr(module, name, value)
            return
        hook = _hook(module, name)
        cast(nn.Parameter, module._parameters[f"{name}_g"]).copy_(torch.norm_except_dim(value, 2, hook.dim))
        cast(nn.Parameter, module._parameters[f"{name}_v"]).copy_(value)
        setattr(module, name, hook.compute_weight(module))  # what the hook sets before each forward


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy of ``module``. The old weight- and spectral-norm hooks leave the weight they compute as a plain
    attribute, which torch refuses to copy once a forward with gradients made it (not a graph leaf: "Only Tensors
    created explicitly by the user..."): the copy gets it detached, and its next forward computes it again.

    >>> conv = torch.nn.utils.weight_norm(torch.nn.Conv1d(2, 3, 3))
    >>> _ = conv(torch.ones(1, 2, 4))
    >>> bool(torch.equal(copy_module(conv).weight, conv.weight))
    True
    """
    computed = [(m, hook.name, m.__dict__[hook.name]) for m in module.modules()
                for hook in m._forward_pre_hooks.values()
                if isinstance(hook, (WeightNorm, SpectralNorm)) and isinstance(m.__dict__.get(hook.name), torch.Tensor)]
    try:
        for owner, name, value in computed:
            owner.__dict__[name] = value.detach()
        return copy.deepcopy(module)
    finally:
        for owner, name, value in computed:
            owner.__dict__[name] = value
