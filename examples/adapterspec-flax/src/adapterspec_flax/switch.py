"""Adapter switching: names, active set, delete, merge, unmerge -- all without copying a base weight.

The model's :class:`~adapterspec_flax.graph.ModelState` is the record; each wrapper carries the
``active``/``merged`` tuples its forward pass reads. Every change computes first and assigns last.

>>> from flax import nnx
>>> adapter_names(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
[]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from adapterspec.config import merge_refusal, mix_refusal
from adapterspec.errors import AdapterNotFoundError

from .graph import ModelState, get_state, iter_wrappers, set_node, set_state
from .inject import thaw_base
from .layers import AdaptedEmbed, AdaptedLinear, DoraNorm, running_of

__all__ = ["active_adapters", "adapter_names", "check_mix", "delete", "merge", "set_active", "unmerge"]


def _replace(state: ModelState, **changes: Any) -> ModelState:
    return dataclasses.replace(state, **changes)


def _require(state: ModelState, names: Sequence[str]) -> None:
    for name in names:
        if name not in state.names:
            raise AdapterNotFoundError(f"no adapter named {name!r} is loaded (loaded: {list(state.names)})",
                                       key=name, hint="load it first")


def adapter_names(model: nnx.Module) -> list[str]:
    """The adapters loaded in ``model``, in load order (``[]`` if none).

    >>> adapter_names(model)                                            # doctest: +SKIP
    ['default', 'fr']
    """
    return list(get_state(model).names)


def active_adapters(model: nnx.Module) -> list[str]:
    """The adapters taking part in the forward pass (``[]`` when disabled).

    >>> active_adapters(model)                                          # doctest: +SKIP
    ['default']
    """
    return list(get_state(model).active)


def set_active(model: nnx.Module, adapter_names_: Sequence[str]) -> None:
    """Make exactly ``adapter_names_`` active (several add up; ``[]`` disables); merged adapters are unmerged first.

    :raises AdapterNotFoundError: a name is not loaded; nothing changes.
    :raises UnsupportedError: adapters that may not run together on one layer (:func:`check_mix`); nothing changes.

    >>> set_active(model, ["fr"])                                       # doctest: +SKIP
    """
    state = get_state(model)
    _require(state, adapter_names_)
    active = tuple(dict.fromkeys(adapter_names_))
    check_mix(model, active)
    unmerge(model)
    for _, _, wrapper in iter_wrappers(model):
        wrapper.active = active
    set_state(model, _replace(get_state(model), active=active))


def check_mix(model: nnx.Module, names: Sequence[str]) -> None:
    """Refuse adapters ``names`` that may not run together on one of the model's layers (the SDK's
    :func:`adapterspec.config.mix_refusal`, SPEC.md 8.9: here IA3 with LoRA or DoRA), before anything changes.

    :raises UnsupportedError: naming the adapters and the module.

    >>> check_mix(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), ["a", "b"])
    """
    if len(names) < 2:
        return
    for dotted, _, wrapper in iter_wrappers(model):
        refusal = mix_refusal(dotted, running_of(wrapper, names))
        if refusal is not None:
            raise refusal


def delete(model: nnx.Module, adapter_name: str, *, unloading: bool = False) -> None:
    """Remove ``adapter_name``'s weights; a layer left without adapters is put back as the original object, and the
    base parameters frozen for trainable adapters (``freeze_base``) get their class back with the last of them.

    The other adapters stay as they are (merged ones merged); a merged adapter is unmerged first, with every other
    merged one.

    :param unloading: ``unload`` deletes every adapter: a merged adapter's delta then stays in the base weights
        (``unload(merge=True)``).
    :raises AdapterNotFoundError: no such adapter.

    >>> delete(model, "fr")                                             # doctest: +SKIP
    """
    state = get_state(model)
    _require(state, [adapter_name])
    if not unloading and adapter_name in state.merged:
        unmerge(model)
        state = get_state(model)
    for _, path, wrapper in list(iter_wrappers(model)):
        if adapter_name not in wrapper.adapters:
            continue
        del wrapper.adapters[adapter_name]
        wrapper.active = tuple(n for n in wrapper.active if n != adapter_name)
        wrapper.merged = tuple(n for n in wrapper.merged if n != adapter_name)
        if len(wrapper.adapters) == 0:
            set_node(model, path, wrapper.base_layer)
    index = state.names.index(adapter_name)
    freezers = tuple(n for n in state.freezers if n != adapter_name)
    if state.freezers and not freezers:
        thaw_base(model)
    set_state(model, _replace(
        state, names=state.names[:index] + state.names[index + 1:],
        configs=state.configs[:index] + state.configs[index + 1:],
        active=tuple(n for n in state.active if n != adapter_name),
        merged=tuple(n for n in state.merged if n != adapter_name),
        stored=tuple(entry for entry in state.stored if entry[0] != adapter_name), freezers=freezers))


def _assign(wrapper: AdaptedLinear | AdaptedEmbed, kernel: jax.Array, bias: jax.Array | None) -> None:
    kernel_var, bias_var = wrapper.weight_variables()
    kernel_var.set_value(kernel)
    if bias_var is not None and bias is not None:
        bias_var.set_value(bias)


def merge(model: nnx.Module, adapter_names_: Sequence[str]) -> None:
    """Add the adapters' deltas into the base weights in place; their layers stay, skipped by the forward pass.

    Already merged adapters are left as they are. All layers are computed before any is written.

    :raises AdapterNotFoundError: a name is not loaded.
    :raises UnsupportedError: a ``lora_B`` bias meets a layer without bias, another active adapter of a layer
        would stop there (SPEC.md 8.9, :func:`adapterspec.config.merge_refusal`, as the torch backend), or adapters
        that may not run together on one layer (:func:`check_mix`: the merged ones, those to merge and the active
        ones); nothing changes then.

    >>> merge(model, ["default"])                                       # doctest: +SKIP
    """
    state = get_state(model)
    _require(state, adapter_names_)
    new = tuple(n for n in dict.fromkeys(adapter_names_) if n not in state.merged)
    refusal = merge_refusal(state.active, state.merged, new, [
        (dotted, list(wrapper.adapters.keys())) for dotted, _, wrapper in iter_wrappers(model)
        if any(n in wrapper.adapters for n in new)])
    if refusal is not None:
        raise refusal
    check_mix(model, list(dict.fromkeys([*state.active, *state.merged, *new])))
    plan = []
    for _, _, wrapper in iter_wrappers(model):
        here = tuple(n for n in new if n in wrapper.adapters)
        if here:
            plan.append((wrapper, here, *wrapper.merged_state(here)))
    for wrapper, here, kernel, bias, norms in plan:
        _assign(wrapper, kernel, bias)
        for name, norm in norms.items():
            wrapper.adapters[name].merged_norm = DoraNorm(norm)
        wrapper.merged = (*wrapper.merged, *here)
    set_state(model, _replace(state, merged=(*state.merged, *new)))


def unmerge(model: nnx.Module) -> None:
    """Subtract every merged adapter from the base weights again (newest first); nothing merged: no-op.

    >>> unmerge(model)                                                  # doctest: +SKIP
    """
    state = get_state(model)
    if not state.merged:
        return
    plan = [(wrapper, *wrapper.unmerged_state()) for _, _, wrapper in iter_wrappers(model) if wrapper.merged]
    for wrapper, kernel, bias in plan:
        _assign(wrapper, kernel, bias)
        for name in wrapper.merged:
            weights = wrapper.adapters[name]
            if getattr(weights, "merged_norm", None) is not None:
                weights.merged_norm = nnx.data(None)
        wrapper.merged = ()
    set_state(model, _replace(state, merged=()))

