"""LoHa and LoKr (the LyCORIS methods) on Keras layers: their parameters, initialisation and weight delta.

Both methods add a reconstructed weight ``ΔW`` to the base weight (SPEC.md 8.6, 8.7): unmerged, a layer's
output gains ``op(x, ΔW)`` -- the layer's own contraction with ``ΔW`` in place of its kernel; merged,
``W' = W + ΔW``. The parameters are kept in the file's (PEFT's) layout and ``ΔW`` is built as PEFT builds it,
``[out, in]``, then handed to each Keras piece as its ``[n_in, n_out]`` share (:func:`delta_flat`).

This backend adapts Dense and EinsumDense layers (PEFT's ``nn.Linear``); convolutions (the plain and the
``use_effective_conv2d`` forms), embeddings and a reversible embedding's logits projection are refused
(:func:`check`), as is training with ``rank_dropout`` / ``module_dropout`` (at inference both are the
identity, as in PEFT's eval mode).

>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "LOKR", "target_modules": ["q"], "r": 2, "alpha": 4})
>>> sorted(shapes(cfg, "q", 8, 6))
['lokr_w1', 'lokr_w2']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from keras import ops

from adapterspec import AdapterConfig
from adapterspec.errors import UnsupportedError

from .sites import ModuleSite

__all__ = ["METHODS", "check", "delta_spec", "factorization", "inits", "shapes"]

#: The methods this module implements.
METHODS = ("LOHA", "LOKR")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' (and PEFT's) factorization of a dimension for LoKr: ``m <= n``, ``m * n == dimension``
    (SPEC.md 6.5; the torch backend's function of the same name).

    >>> factorization(64), factorization(64, 4), factorization(12)
    ((8, 8), (4, 16), (3, 4))
    """
    if factor > 0 and (dimension % factor) == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def check(site: ModuleSite, path: str, config: AdapterConfig, *, trainable: bool = False) -> None:
    """Refuse what this backend does not compute exactly for LoHa/LoKr.

    :raises UnsupportedError: a convolution, an embedding or a logits projection (naming the module and its
        Keras layers), or training with ``rank_dropout`` / ``module_dropout`` (the config field's pointer).
    """
    kinds = sorted({piece.kind for piece in site.pieces})
    if site.kind != "linear" or any(kind not in ("dense", "einsum") for kind in kinds):
        layers = ", ".join(f"{type(p.layer).__name__} {p.layer.path!r}" for p in site.pieces)
        raise UnsupportedError(f"the keras backend adapts only Dense/EinsumDense layers with {config.peft_type} "
                               f"(module on {layers})", key=path,
                               hint="remove the module from target_modules, or use the torch backend")
    if trainable:
        for field in ("rank_dropout", "module_dropout"):
            if float(config.get(field) or 0.0) > 0.0:
                raise UnsupportedError(f"the keras backend does not train {config.peft_type} with {field} > 0",
                                       pointer=f"/{field}", hint=f"set {field} to 0, or train with the torch backend")


def shapes(config: AdapterConfig, path: str, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    """The spec parameter names and shapes of ``config``'s adapter on linear module ``path`` (SPEC.md 6.4, 6.5).

    >>> from adapterspec import AdapterConfig
    >>> shapes(AdapterConfig.from_dict({"peft_type": "LOHA", "target_modules": ["q"], "r": 2}), "q", 8, 6)["hada_w1_a"]
    (6, 2)
    """
    r = config.rank_for(path)
    if config.peft_type == "LOHA":
        return {"hada_w1_a": (out_features, r), "hada_w1_b": (r, in_features),
                "hada_w2_a": (out_features, r), "hada_w2_b": (r, in_features)}
    factor = int(config.get("decompose_factor", -1))
    in_m, in_n = factorization(in_features, factor)
    out_l, out_k = factorization(out_features, factor)
    out: dict[str, tuple[int, ...]] = {}
    if config.get("decompose_both", False) and r < max(out_l, in_m) / 2:
        out["lokr_w1_a"], out["lokr_w1_b"] = (out_l, r), (r, in_m)
    else:
        out["lokr_w1"] = (out_l, in_m)
    if r < max(out_k, in_n) / 2:
        out["lokr_w2_a"], out["lokr_w2_b"] = (out_k, r), (r, in_n)
    else:
        out["lokr_w2"] = (out_k, in_n)
    return out


def inits(config: AdapterConfig, params: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[Any, ...]]:
    """Initialiser descriptions (:func:`~adapterspec_keras.bank.make_initializer`) as PEFT initialises: every
    factor kaiming-uniform (bound ``1/sqrt(fan_in)``), then the one that makes ``ΔW`` zero set to zero --
    LoHa ``hada_w2_b``; LoKr ``lokr_w1`` (or ``lokr_w1_a``), with ``init_weights: "lycoris"`` ``lokr_w2``
    (or ``lokr_w2_b``) -- unless ``init_weights`` is false."""
    out: dict[str, tuple[Any, ...]] = {
        param: ("uniform", 1.0 / math.sqrt(math.prod(shape[1:]))) for param, shape in params.items()}
    init = config.get("init_weights", True)
    if config.peft_type == "LOHA":
        if init:
            out["hada_w2_b"] = ("zeros",)
    elif init == "lycoris":
        out["lokr_w2" if "lokr_w2" in params else "lokr_w2_b"] = ("zeros",)
    elif init:
        out["lokr_w1" if "lokr_w1" in params else "lokr_w1_a"] = ("zeros",)
    return out


def _kron(a: Any, b: Any) -> Any:
    """``torch.kron`` of two matrices: ``[a0 * b0, a1 * b1]``."""
    (a0, a1), (b0, b1) = tuple(a.shape), tuple(b.shape)
    return ops.reshape(ops.einsum("ij,kl->ikjl", a, b), (a0 * b0, a1 * b1))


def delta_spec(method: str, get: Callable[[str], Any], has: Callable[[str], bool], scaling: float,
               dtype: Any) -> Any:
    """``ΔW`` of a LoHa/LoKr adapter on a linear module, ``[out, in]`` as PEFT computes it, in ``dtype``.

    :param get: parameter name -> its value (the file's layout).
    :param has: whether the adapter has that parameter (LoKr's full or factored forms).
    """
    def p(name: str) -> Any:
        return ops.cast(get(name), dtype)

    scale = ops.cast(scaling, dtype)
    if method == "LOHA":
        return (ops.matmul(p("hada_w1_a"), p("hada_w1_b")) * ops.matmul(p("hada_w2_a"), p("hada_w2_b"))) * scale
    w1 = p("lokr_w1") if has("lokr_w1") else ops.matmul(p("lokr_w1_a"), p("lokr_w1_b"))
    w2 = p("lokr_w2") if has("lokr_w2") else ops.matmul(p("lokr_w2_a"), p("lokr_w2_b"))
    return _kron(w1, w2) * scale
