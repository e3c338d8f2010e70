"""GraLoRA (``GRALORA``; SPEC.md 17.5) on Keras layers: a ``k x k`` grid of low-rank blocks (plus an optional plain
LoRA pair), PEFT 0.21.2's math -- the mirror of :mod:`adapterspec_torch.gralora`, function for function.

The input is cut into ``k`` blocks of ``in/k`` features; block ``n`` goes through ``gralora_A[n]`` ``[in/k, r]``;
the ``r`` outputs of each are cut into ``k`` slices of ``s = r/k``; output block ``j`` gathers the ``j``-th slice
of every input block and goes through ``gralora_B[j]`` ``[r, out/k]``. That is one product of two factors,
:func:`views`: ``first`` ``[in, k*r]`` holds ``A[n]``'s slice ``j`` at rows of block ``n``, columns ``j*r + n*s``
(zeros elsewhere) and ``second`` ``[k*r, out]`` holds ``B[j]`` at rows ``j*r ..`` and the columns of output block
``j`` -- the same nonzero products PEFT's two einsums sum (the zeros add nothing), in a form every Keras piece
takes through its index maps (:func:`~adapterspec_keras._ops.contract_in` / ``expand_out``: Dense, EinsumDense
``(heads, head_dim)`` kernels, GPT-2's fused ``c_attn`` split over three layers). With ``hybrid_r > 0`` a plain
LoRA ``B_general @ A_general`` runs beside it. Both terms are scaled by ``alpha / (r + hybrid_r)``.

This backend adapts Dense and EinsumDense layers (an ``nn.Linear`` or a transformers ``Conv1D``); embeddings,
convolutions, quantized layers and sizes ``gralora_k`` does not divide are refused typed, as the torch backend
refuses them. A new adapter draws PEFT's distributions from Keras' generator, not torch's stream (SPEC.md 17.5:
only torch reproduces the draws); ``gralora_dropout`` draws Keras' random numbers.

>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "GRALORA", "target_modules": ["q"], "r": 4, "hybrid_r": 1})
>>> shapes_for(cfg, "q", 8, 6)
{'gralora_A': (2, 4, 4), 'gralora_B': (2, 4, 3), 'gralora_A_general.weight': (1, 8), 'gralora_B_general.weight': (6, 1)}
>>> sorted(inits(cfg, shapes_for(cfg, "q", 8, 6)).items())[:2]
[('gralora_A', ('uniform', 0.5)), ('gralora_A_general.weight', ('uniform', 0.35355339059327373))]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from keras import ops

from adapterspec import AdapterConfig
from adapterspec._gralora import Granular, param_shapes, settings
from adapterspec.errors import UnsupportedError

from . import _ops
from .quantized import refuse_quantized
from .sites import ModuleSite, Piece

__all__ = ["METHODS", "Granular", "check", "delta_flat", "general_views", "inits", "output", "settings", "shapes",
           "shapes_for", "views"]

#: The methods this module computes.
METHODS = ("GRALORA",)

_HALF = ("float16", "bfloat16")


def check(site: ModuleSite, path: str, config: AdapterConfig) -> None:
    """Refuse what PEFT refuses or this backend has no exact layer for (the torch backend's ``check``).

    :raises UnsupportedError: naming ``path``: a quantized layer (PEFT 0.21 has no quantized GraLoRA layer); an
        embedding, a convolution or a logits projection (PEFT's GraLoRA adapts Linear and Conv1D only); sizes
        ``gralora_k`` does not divide (``/gralora_k``).
    """
    layers = ", ".join(f"{type(p.layer).__name__} {p.layer.path!r}" for p in site.pieces)
    refuse_quantized([p.layer for p in site.pieces], path, "GraLoRA")
    if site.kind != "linear" or any(piece.kind not in ("dense", "einsum") for piece in site.pieces):
        raise UnsupportedError(f"the keras backend adapts only Dense/EinsumDense layers with GRALORA (module on "
                               f"{layers}; PEFT's GraLoRA adapts Linear and Conv1D only)", key=path,
                               hint="remove the module from target_modules (or exclude it with exclude_modules)")
    param_shapes(site.in_features, site.out_features, config, path)


def shapes_for(config: AdapterConfig, path: str, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    """The module's tensors on ``in_features -> out_features`` (:func:`adapterspec._gralora.param_shapes`)."""
    return param_shapes(in_features, out_features, config, path)


def shapes(site: ModuleSite, config: AdapterConfig, path: str) -> dict[str, tuple[int, ...]]:
    """:func:`shapes_for` of this module (the torch backend's ``shapes``)."""
    return shapes_for(config, path, site.in_features, site.out_features)


def inits(config: AdapterConfig, params: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[Any, ...]]:
    """Initialiser descriptions (:func:`~adapterspec_keras.bank.make_initializer`) with PEFT's distributions: the
    blocks ``A_n`` ``[r, in/k]`` kaiming-uniform (bound ``1 / sqrt(in/k)``), ``B_n`` zeros (kaiming, bound ``1 /
    sqrt(r)``, when ``init_weights`` is false or null); the hybrid pair likewise (bounds ``1 / sqrt(in)`` and ``1 /
    sqrt(hybrid_r)``). Keras' random numbers, not torch's (the torch backend's ``initialise``)."""
    random_b = not config.get("init_weights", True)
    a, b = params["gralora_A"], params["gralora_B"]
    out: dict[str, tuple[Any, ...]] = {"gralora_A": ("uniform", 1.0 / math.sqrt(a[1])),
                                       "gralora_B": ("uniform", 1.0 / math.sqrt(b[1])) if random_b else ("zeros",)}
    if "gralora_A_general.weight" in params:
        general_a, general_b = params["gralora_A_general.weight"], params["gralora_B_general.weight"]
        out["gralora_A_general.weight"] = ("uniform", 1.0 / math.sqrt(general_a[1]))
        out["gralora_B_general.weight"] = ("uniform", 1.0 / math.sqrt(general_b[1])) if random_b else ("zeros",)
    return out


def views(g: Granular, get: Callable[[str], Any], dtype: Any) -> tuple[Any, Any]:
    """The blocks as two factors over the module, in ``dtype``: ``first`` ``[in, k*r]`` and ``second`` ``[k*r,
    out]`` with ``x @ first @ second`` PEFT's block term (before scaling): ``first[n*in/k + i, j*r + n*s + t] =
    A[n, i, j*s + t]``, ``second[j*r + m, j*out/k + o] = B[j, m, o]``, zeros elsewhere (exact: products with the
    identity's ones and zeros)."""
    a, b = ops.cast(get("gralora_A"), dtype), ops.cast(get("gralora_B"), dtype)
    k, block_in, r = (int(d) for d in a.shape)
    block_out, sub = int(b.shape[2]), r // k
    eye = ops.eye(k, dtype=dtype)
    first = ops.einsum("nijt,nm->nijmt", ops.reshape(a, (k, block_in, k, sub)), eye)  # m = n: the diagonal
    second = ops.einsum("jro,jm->jrmo", b, eye)  # B[j] on output block j
    return ops.reshape(first, (k * block_in, k * r)), ops.reshape(second, (k * r, k * block_out))


def general_views(get: Callable[[str], Any], dtype: Any) -> tuple[Any, Any]:
    """The hybrid pair as ``(A_general.T, B_general.T)`` (``[in, hybrid_r]``, ``[hybrid_r, out]``), in ``dtype``."""
    return (ops.transpose(ops.cast(get("gralora_A_general.weight"), dtype)),
            ops.transpose(ops.cast(get("gralora_B_general.weight"), dtype)))


def _term(site: ModuleSite, piece: Piece, x: Any, first: Any, second: Any) -> Any:
    """``x @ first @ second`` over the piece's rows of ``first`` and columns of ``second``, shaped like its output."""
    return _ops.expand_out(piece, _ops.contract_in(piece, x, _ops.gather_in(piece, first, site.in_features)),
                           _ops.gather_out(piece, second, site.out_features))


def _scaled(term: Any, dtype: str, scaling: float) -> Any:
    """``scaling * term.to(dtype)`` as torch computes it: the term rounded to ``dtype``; for a half dtype the product
    taken in float32 (torch's ``opmath`` for a Python scalar) and rounded once."""
    term = ops.cast(term, dtype)
    if dtype in _HALF:
        return ops.cast(ops.cast(term, "float32") * scaling, dtype)
    return term * ops.cast(scaling, dtype)


def output(site: ModuleSite, piece: Piece, g: Granular, get: Callable[[str], Any], x: Any, result: Any, *,
           dropout: Callable[[Any], Any] | None = None) -> Any:
    """``result`` (the piece's base output) plus the adapter's terms, as PEFT's forward adds them: ``x`` cast to
    ``gralora_A``'s dtype, the block term computed there, cast to the result's dtype, times the scaling, added;
    then (``hybrid_r > 0``) the hybrid term likewise. ``dropout`` (training): one draw per term."""
    out_dtype = _ops.dtype_name(result)
    dtype = _ops.dtype_name(get("gralora_A"))
    x = ops.cast(x, dtype)
    first, second = views(g, get, dtype)
    term = _term(site, piece, dropout(x) if dropout is not None else x, first, second)
    result = result + _scaled(term, out_dtype, g.scaling)
    if g.hybrid_r > 0:
        general_a, general_b = general_views(get, dtype)
        hybrid = _term(site, piece, dropout(x) if dropout is not None else x, general_a, general_b)
        result = result + _scaled(hybrid, out_dtype, g.scaling)
    return result


def delta_flat(site: ModuleSite, piece: Piece, g: Granular, get: Callable[[str], Any], dtype: Any) -> Any:
    """PEFT's ``get_delta_weight`` on the piece, ``[n_in, n_out]`` (the flat kernel's layout, which is a Linear's
    and a Conv1D's alike), in ``dtype``: the scaled update computed in ``gralora_A``'s dtype -- in float32 for
    (b)float16 tensors and rounded back to that dtype, as PEFT does on the CPU."""
    own = _ops.dtype_name(get("gralora_A"))
    compute = "float32" if own in _HALF else own
    first, second = views(g, get, compute)
    delta = ops.matmul(_ops.gather_in(piece, first, site.in_features), _ops.gather_out(piece, second, site.out_features))
    if g.hybrid_r > 0:
        general_a, general_b = general_views(get, compute)
        delta = delta + ops.matmul(_ops.gather_in(piece, general_a, site.in_features),
                                   _ops.gather_out(piece, general_b, site.out_features))
    delta = delta * ops.cast(g.scaling, compute)
    return ops.cast(ops.cast(delta, own), dtype)
