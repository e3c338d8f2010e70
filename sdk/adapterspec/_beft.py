"""BEFT, bias-efficient fine-tuning (SPEC.md 17.8): the tensor's shape, the init rule and the refusals, one rule for
every backend.

A BEFT adapter stores one tensor per adapted Linear layer, ``<module>.beft_bias`` ``[1, out]``: a trained bias the
layer adds to its output, ``y = base(x) + beft_bias.flatten()`` (PEFT 0.21.2's ``beft/layer.py``). A merge adds it
to the base layer's bias, so a layer without a bias runs it unmerged only (PEFT raises on that merge).

>>> param_shapes(4)
{'beft_bias': (1, 4)}
>>> starts_at_zero({"peft_type": "BEFT", "init_weights": None})
False
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import AdapterSpecError, MissingTensorError, ShapeMismatchError, UnsupportedError
from .naming import make_key

if TYPE_CHECKING:
    from .checks import TensorInfo

__all__ = ["METHOD", "PARAM", "PARAMETERS", "merge_refusal", "module_errors", "param_shapes", "starts_at_zero"]

#: The method's ``peft_type``.
METHOD = "BEFT"
#: The one tensor BEFT stores per module.
PARAM = "beft_bias"
#: The tensors BEFT stores per module, in PEFT's order.
PARAMETERS = (PARAM,)


def param_shapes(out_features: int) -> dict[str, tuple[int, ...]]:
    """``beft_bias`` ``[1, out_features]`` (PEFT's ``torch.randn((1, out_features))``)."""
    return {PARAM: (1, out_features)}


def starts_at_zero(config: Mapping[str, Any]) -> bool:
    """Whether a new adapter's ``beft_bias`` starts at zero: PEFT's ``if init_weights:`` (a truth test: null and false
    keep the standard-normal draw, which PEFT makes in either case)."""
    return bool(config.get("init_weights", True))


def merge_refusal(module: str, has_bias: bool) -> UnsupportedError | None:
    """The refusal of merging a BEFT adapter into the layer ``module`` when it has no bias (PEFT 0.21.2 raises
    ``ValueError: Base layer has no bias, cannot merge bias adapter``), else ``None``."""
    if has_bias:
        return None
    return UnsupportedError("a BEFT adapter cannot be merged into a layer without a bias: the merge adds beft_bias to "
                            "the base layer's bias (PEFT 0.21.2 raises on it too)", key=module,
                            hint="run the adapter unmerged, or add a (zero) bias to the layer before merging")


def _shape(module: str, info: TensorInfo, message: str) -> ShapeMismatchError:
    return ShapeMismatchError(f"shape {list(info.shape)}: {message}", key=make_key(module, PARAM),
                              hint="save the adapter again with PEFT (SPEC.md 17.8)")


def module_errors(config: Mapping[str, Any], module: str, p: Mapping[str, TensorInfo]) -> list[AdapterSpecError]:
    """SPEC.md 10 checks 9-11 for one BEFT module: ``beft_bias`` present and ``[1, n]`` with ``n >= 1`` (``n`` the
    layer's output features, checked against the model at load)."""
    if PARAM not in p:
        return [MissingTensorError(f"missing (module {module!r} has {', '.join(sorted(p)) or 'nothing'}; BEFT stores "
                                   "beft_bias per module)", key=make_key(module, PARAM),
                                   hint="save the adapter again; a complete BEFT adapter has beft_bias per module")]
    info = p[PARAM]
    if len(info.shape) != 2 or info.shape[0] != 1 or info.shape[1] < 1:
        return [_shape(module, info, "must be [1, out_features] (one bias per output feature)")]
    return []
