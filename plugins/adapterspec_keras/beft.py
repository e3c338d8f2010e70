"""BEFT, bias-efficient fine-tuning (SPEC.md 17.8) on Keras layers: PEFT 0.21.2's math on Dense/EinsumDense pieces.

An adapter's ``beft_bias`` ``[1, out]`` is a trained bias. Unmerged, the layer adds the sum of its active BEFT
adapters' biases (summed in their dtype) to the base output once, and rounds to the output's dtype; merged, each is
added to the base layer's bias (one rounding to the bias's dtype), and unmerging subtracts it the same way. Each piece
of a module (a keras-hub q/k/v EinsumDense with a ``(heads, head_dim)`` output) takes its entries through its output
index map. The torch backend's module of the same name computes the same on ``nn.Linear`` layers, function for
function.

This backend adapts Dense and EinsumDense layers (an ``nn.Linear``); embeddings, convolutions, transformers
``Conv1D`` modules (GPT-2) and quantized layers are refused, as PEFT refuses them. A new adapter draws PEFT's
distribution from Keras' generator (zeros, or a standard normal when ``init_weights`` is false or null), not torch's
stream (SPEC.md 17.8: reproducible on torch only).

>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "BEFT", "target_modules": ["v"]})
>>> shapes(cfg, "v", 4)
{'beft_bias': (1, 4)}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keras import ops

from adapterspec import AdapterConfig
from adapterspec._beft import PARAM, merge_refusal, param_shapes, starts_at_zero
from adapterspec.errors import UnsupportedError

from . import _ops
from .quantized import refuse_quantized
from .sites import ModuleSite, Piece

__all__ = ["METHODS", "PARAM", "check", "check_merge", "inits", "merge", "output", "shapes", "unmerge"]

#: The methods this module computes.
METHODS = ("BEFT",)


def check(site: ModuleSite, path: str, config: AdapterConfig) -> None:
    """Refuse what PEFT's BEFT does not adapt (the torch backend's ``shapes`` and ``KINDS``).

    :raises UnsupportedError: naming the module: a quantized layer, a transformers ``Conv1D`` (GPT-2), an embedding,
        a convolution or another layer kind (PEFT adapts ``nn.Linear`` only).
    """
    layers = ", ".join(f"{type(p.layer).__name__} {p.layer.path!r}" for p in site.pieces)
    refuse_quantized([p.layer for p in site.pieces], path, "BEFT")
    if site.hf_conv1d:
        raise UnsupportedError(f"BEFT cannot adapt a transformers Conv1D module (GPT-2's, weight stored [in, out]; "
                               f"module on {layers}): PEFT's BEFT adapts nn.Linear only (PEFT 0.21.2 refuses it too)",
                               key=path, hint="remove the module from target_modules")
    if site.kind != "linear" or any(piece.kind not in ("dense", "einsum") for piece in site.pieces):
        raise UnsupportedError(f"BEFT adapts nn.Linear layers: the keras backend adapts only Dense/EinsumDense layers "
                               f"with BEFT (module on {layers}; PEFT 0.21.2 refuses every other layer too)", key=path,
                               hint="remove the module from target_modules (or exclude it with exclude_modules)")


def shapes(config: AdapterConfig, path: str, out_features: int) -> dict[str, tuple[int, ...]]:
    """``beft_bias`` ``[1, out_features]``."""
    return param_shapes(out_features)


def inits(config: AdapterConfig) -> dict[str, tuple[Any, ...]]:
    """PEFT's ``update_layer`` as a Keras initialiser: zeros when ``init_weights`` is truthy, else a standard normal
    (PEFT's ``torch.randn``; null and false both keep it). On a half-precision base the values are then rounded to
    the kernel's dtype (:meth:`AdapterLayer.finish_init`), as PEFT's cast to the base weight's dtype rounds them."""
    return {PARAM: ("zeros",) if starts_at_zero(config) else ("normal", 1.0)}


def output(piece: Piece, biases: Sequence[Any], out_features: int, result: Any) -> Any:
    """``result`` plus the active adapters' ``beft_bias`` (flattened, the piece's entries), summed first in their
    dtype as PEFT sums them, then added once in the promoted dtype and rounded to ``result``'s dtype."""
    total: Any = None
    for bias in biases:
        flat = ops.reshape(bias, (-1,))
        total = flat if total is None else total + flat
    if total is None:
        return result
    out_dtype = result.dtype
    wide = "float32" if "float32" in (_ops.dtype_name(result), _ops.dtype_name(total)) else out_dtype
    total = _ops.gather_out(piece, total, out_features)
    return ops.cast(_ops.add_out(piece, ops.cast(result, wide), ops.cast(total, wide)), out_dtype)


def check_merge(piece: Piece, path: str) -> None:
    """Refuse a merge into a piece without a bias (:func:`adapterspec._beft.merge_refusal`).

    :raises UnsupportedError: naming ``path``.
    """
    refusal = merge_refusal(path, _ops.bias_of(piece) is not None)
    if refusal is not None:
        raise refusal


def _shifted(piece: Piece, beft_bias: Any, out_features: int, sign: float) -> Any:
    bias = ops.convert_to_tensor(_ops.bias_of(piece))
    extra = ops.reshape(_ops.gather_out(piece, ops.reshape(beft_bias, (-1,)), out_features), tuple(bias.shape))
    wide = "float32" if "float32" in (_ops.dtype_name(bias), _ops.dtype_name(extra)) else bias.dtype
    return ops.cast(ops.cast(bias, wide) + ops.cast(extra, wide) * sign, bias.dtype)


def merge(piece: Piece, beft_bias: Any, out_features: int) -> None:
    """PEFT's ``bias.data.add_(beft_bias.squeeze())``: the sum in the promoted dtype, one rounding to the bias's."""
    _ops.assign_bias(piece, _shifted(piece, beft_bias, out_features, 1.0))


def unmerge(piece: Piece, beft_bias: Any, out_features: int) -> None:
    """PEFT's ``bias.data = (bias.data - beft_bias.squeeze()).to(bias dtype)``."""
    _ops.assign_bias(piece, _shifted(piece, beft_bias, out_features, -1.0))
