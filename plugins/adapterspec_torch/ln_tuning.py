"""LN tuning (``LN_TUNING``, SPEC.md 15.3): each targeted layer is replaced, per adapter, by a trained copy.

PEFT's ``LNTuningLayer`` keeps a deep copy of the layer per adapter (``ln_tuning_layers``) and runs the active
adapter's copy instead of the layer; the file holds the copy's tensors, ``<module>.ln_tuning_layers.<name>``
(``weight``, and ``bias`` for a LayerNorm). That is a module saved whole whose tensors carry the
``ln_tuning_layers.`` infix, so the backend uses :class:`~adapterspec_torch.layers.ModulesToSaveLayer` with that
prefix; ``modules_to_save`` of the config (PEFT adds the classifier for ``SEQ_CLS``) are saved whole as usual.

>>> LN_PREFIX
'ln_tuning_layers.'
"""

from __future__ import annotations

__all__ = ["LN_PREFIX", "METHOD"]

#: The method's ``peft_type``.
METHOD = "LN_TUNING"
#: The infix of the copy's tensors under the module's path.
LN_PREFIX = "ln_tuning_layers."
