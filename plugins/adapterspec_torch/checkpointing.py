"""Gradient checkpointing with trainable adapters: the model's inputs are made to require grad, as PEFT does.

Under torch's reentrant checkpointing (``use_reentrant=True``) a checkpointed block whose inputs do not require grad
gives outputs that do not either, so the adapters inside it got no gradient: on a frozen ViT (whose main input is
not ``input_ids``) 0 of 8 LoRA tensors, with a classifier in ``modules_to_save`` training alone (silently), or
torch's raw "element 0 of tensors does not require grad" without one. PEFT's ``PeftModel`` calls transformers'
``enable_input_require_grads`` (a forward hook making the input embeddings' output require grad) when it wraps a
model with checkpointing on; transformers does it itself when checkpointing is enabled on a model whose main input
is ``input_ids``. Here it is done when a trainable adapter is added to a model with checkpointing on, and when
checkpointing is enabled on a model holding one (transformers' enable method is wrapped once, at the first trainable
adapter -- enabled after the adapter, PEFT trains nothing); ``disable_input_require_grads`` takes the hooks away
with the last trainable adapter. Non-reentrant checkpointing (transformers' default) needs none of it.

>>> import torch
>>> require_input_grads(torch.nn.Linear(2, 2))  # no adapter, no checkpointing: nothing to do
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from torch import nn

from .switch import get_state

__all__ = ["release_input_grads", "require_input_grads", "watch_checkpointing"]


def _checkpointing(model: nn.Module) -> bool:
    """Whether gradient checkpointing is on in ``model`` (transformers sets ``gradient_checkpointing`` on the
    modules it checkpoints; PEFT's prefix tuning asks the same)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def _quantized(model: nn.Module) -> bool:
    """PEFT leaves a quantized model's inputs alone (``prepare_model_for_kbit_training`` does it there)."""
    return any(getattr(model, flag, False) for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized"))


def require_input_grads(model: nn.Module) -> None:
    """Make ``model``'s input embeddings' output require grad when it holds a trainable adapter and checkpointing is
    on (PEFT's ``_prepare_model_for_gradient_checkpointing``); nothing when transformers has done it already.

    >>> require_input_grads(model)                                      # doctest: +SKIP
    """
    state = get_state(model)
    if state is None or state.input_grads or not state.trainable or _quantized(model) or not _checkpointing(model):
        return
    enable = getattr(model, "enable_input_require_grads", None)
    if enable is None or getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None):
        return
    enable()
    state.input_grads = True


def release_input_grads(model: nn.Module) -> None:
    """Take the hooks :func:`require_input_grads` added away once no trainable adapter is left.

    >>> release_input_grads(model)                                      # doctest: +SKIP
    """
    state = get_state(model)
    if state is None or not state.input_grads or state.trainable:
        return
    model.disable_input_require_grads()  # type: ignore[operator]
    state.input_grads = False


def watch_checkpointing() -> None:
    """Wrap transformers' ``PreTrainedModel._activation_checkpointing_enable`` (where ``gradient_checkpointing_enable``
    and ``activation_checkpointing_enable`` arrive; the public one in another version) once, so that checkpointing
    enabled after a trainable adapter makes the inputs of each adapted model inside require grad too."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return
    base = transformers.PreTrainedModel
    name = next((n for n in ("_activation_checkpointing_enable", "gradient_checkpointing_enable") if n in vars(base)),
                None)
    original = vars(base).get(name) if name is not None else None
    if original is None or getattr(original, "_adapterspec_guard", False):
        return

    @functools.wraps(original)
    def enable(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        for module in self.modules():
            require_input_grads(module)
        return result

    enable._adapterspec_guard = True  # type: ignore[attr-defined]
    setattr(base, name, enable)  # type: ignore[arg-type]
