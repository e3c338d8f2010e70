"""LoHa and LoKr (the LyCORIS methods) on Keras layers: their parameters, initialisation and weight delta.

Both methods add a reconstructed weight ``ΔW`` to the base weight (SPEC.md 8.6, 8.7): unmerged, a layer's
output gains ``op(x, ΔW)`` -- the layer's own contraction with ``ΔW`` in place of its kernel; merged,
``W' = W + ΔW``. The parameters are kept in the file's (PEFT's) layout and ``ΔW`` is built as PEFT builds it
(:func:`delta_spec`: ``[out, in]``, ``[out, in, *k]``), then handed to each Keras piece as its share, in the
kernel's layout.

This backend adapts what PEFT adapts: Dense and EinsumDense layers (``nn.Linear``) and ungrouped 1-D/2-D
convolutions (the plain and the ``use_effective_conv2d`` CP forms); embeddings, a reversible embedding's logits
projection, 3-D or grouped convolutions are refused (:func:`check`), as is training with ``rank_dropout`` /
``module_dropout`` (at inference both are the identity, as in PEFT's eval mode).

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
from adapterspec._method_checks import factorization
from adapterspec.errors import UnsupportedError

from .sites import ModuleSite

__all__ = ["METHODS", "check", "delta_spec", "effective_kernel", "inits", "shapes"]

#: The methods this module implements.
METHODS = ("LOHA", "LOKR")


def check(site: ModuleSite, path: str, config: AdapterConfig, *, trainable: bool = False) -> None:
    """Refuse what this backend does not compute exactly for LoHa/LoKr (PEFT adapts ``nn.Linear``, ``Conv1d`` and
    ``Conv2d``).

    :raises UnsupportedError: an embedding, a logits projection, a 3-D or grouped convolution (naming the module
        and its Keras layers), or training with ``rank_dropout`` / ``module_dropout`` (the config field's pointer).
    """
    kinds = sorted({piece.kind for piece in site.pieces})
    if site.hf_conv1d:  # as the torch backend: PEFT's LoHa/LoKr take nn.Linear, Conv1d, Conv2d only
        layers = ", ".join(f"{type(p.layer).__name__} {p.layer.path!r}" for p in site.pieces)
        raise UnsupportedError(f"{config.peft_type} cannot adapt a transformers Conv1D module (GPT-2's, weight stored "
                               f"[in, out]; module on {layers}): PEFT refuses it, so PEFT could not load the adapter",
                               key=path, hint="remove the module from target_modules, or use LoRA/IA3 on this model")
    conv = site.kind == "conv" and kinds == ["conv"] and len(site.conv_spatial) in (1, 2) and \
        all(getattr(p.layer, "groups", 1) == 1 for p in site.pieces)
    if not conv and (site.kind != "linear" or any(kind not in ("dense", "einsum") for kind in kinds)):
        layers = ", ".join(f"{type(p.layer).__name__} {p.layer.path!r}" for p in site.pieces)
        raise UnsupportedError(f"the keras backend adapts only Dense/EinsumDense and ungrouped 1-D/2-D convolution "
                               f"layers with {config.peft_type} (module on {layers})", key=path,
                               hint="remove the module from target_modules, or use the torch backend")
    if trainable:
        for field in ("rank_dropout", "module_dropout"):
            if float(config.get(field) or 0.0) > 0.0:
                raise UnsupportedError(f"the keras backend does not train {config.peft_type} with {field} > 0",
                                       pointer=f"/{field}", hint=f"set {field} to 0, or train with the torch backend")


def effective_kernel(config: AdapterConfig, kernel: tuple[int, ...]) -> tuple[int, int] | None:
    """``use_effective_conv2d``: the kernel of the CP core tensors (``(k, 1)`` for a 1-D convolution), or ``None``
    when the plain form applies (not a convolution, the flag off, or a kernel of ones, as PEFT decides)."""
    if not kernel or not config.get("use_effective_conv2d") or all(k == 1 for k in kernel):
        return None
    return (kernel[0], kernel[1]) if len(kernel) == 2 else (kernel[0], 1)


def shapes(config: AdapterConfig, path: str, in_features: int, out_features: int,
           kernel: tuple[int, ...] = ()) -> dict[str, tuple[int, ...]]:
    """The spec parameter names and shapes of ``config``'s adapter on module ``path`` (SPEC.md 6.4, 6.5): a linear
    module, or a convolution with spatial ``kernel`` (the torch backend's ``param_shapes``).

    >>> from adapterspec import AdapterConfig
    >>> shapes(AdapterConfig.from_dict({"peft_type": "LOHA", "target_modules": ["q"], "r": 2}), "q", 8, 6)["hada_w1_a"]
    (6, 2)
    """
    r = config.rank_for(path)
    effective = effective_kernel(config, kernel)
    if config.peft_type == "LOHA":
        if effective is not None:  # the CP form: a core per factor, the factors [r, out] and [r, in]
            return {"hada_w1_a": (r, out_features), "hada_w1_b": (r, in_features), "hada_w2_a": (r, out_features),
                    "hada_w2_b": (r, in_features), "hada_t1": (r, r, *effective), "hada_t2": (r, r, *effective)}
        cols = in_features * math.prod(kernel)
        return {"hada_w1_a": (out_features, r), "hada_w1_b": (r, cols),
                "hada_w2_a": (out_features, r), "hada_w2_b": (r, cols)}
    factor = int(config.get("decompose_factor", -1))
    in_m, in_n = factorization(in_features, factor)
    out_l, out_k = factorization(out_features, factor)
    out: dict[str, tuple[int, ...]] = {}
    if config.get("decompose_both", False) and r < max(out_l, in_m) / 2:
        out["lokr_w1_a"], out["lokr_w1_b"] = (out_l, r), (r, in_m)
    else:
        out["lokr_w1"] = (out_l, in_m)
    if not r < max(out_k, in_n) / 2:
        out["lokr_w2"] = (out_k, in_n, *kernel)
    elif effective is not None:
        out["lokr_t2"], out["lokr_w2_a"], out["lokr_w2_b"] = (r, r, *effective), (r, out_k), (r, in_n)
    else:
        out["lokr_w2_a"], out["lokr_w2_b"] = (out_k, r), (r, in_n * math.prod(kernel))
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
    """``torch.kron``: the operand with fewer axes given leading unit axes, then ``[a_i * b_i]`` per axis with
    ``kron(a, b)[i] = a[i // shape(b)] * b[i % shape(b)]`` (SPEC.md 8.7)."""
    n = max(len(a.shape), len(b.shape))
    sa = (1,) * (n - len(a.shape)) + tuple(int(d) for d in a.shape)
    sb = (1,) * (n - len(b.shape)) + tuple(int(d) for d in b.shape)
    left = ops.reshape(a, tuple(d for pair in zip(sa, (1,) * n) for d in pair))
    right = ops.reshape(b, tuple(d for pair in zip((1,) * n, sb) for d in pair))
    return ops.reshape(left * right, tuple(x * y for x, y in zip(sa, sb)))


def _cp_weight(core: Any, left: Any, right: Any) -> Any:
    """The CP reconstruction ``einsum("ijkl,ip,jr->prkl", core, left, right)`` of the effective conv form."""
    return ops.einsum("ijkl,ip,jr->prkl", core, left, right)


def delta_spec(method: str, get: Callable[[str], Any], has: Callable[[str], bool], scaling: float,
               dtype: Any, shape: tuple[int, ...]) -> Any:
    """``ΔW`` of a LoHa/LoKr adapter as PEFT computes it, in ``dtype``, reshaped to the base weight's ``shape``
    in torch's layout (``[out, in]``, convolutions ``[out, in, *k]``).

    :param get: parameter name -> its value (the file's layout).
    :param has: whether the adapter has that parameter (LoKr's full or factored forms, the CP form).
    """
    def p(name: str) -> Any:
        return ops.cast(get(name), dtype)

    scale = ops.cast(scaling, dtype)
    if method == "LOHA":
        if has("hada_t1"):
            weight = _cp_weight(p("hada_t1"), p("hada_w1_a"), p("hada_w1_b")) * \
                _cp_weight(p("hada_t2"), p("hada_w2_a"), p("hada_w2_b")) * scale
        else:
            weight = (ops.matmul(p("hada_w1_a"), p("hada_w1_b")) * ops.matmul(p("hada_w2_a"), p("hada_w2_b"))) * scale
        return ops.reshape(weight, shape)
    w1 = p("lokr_w1") if has("lokr_w1") else ops.matmul(p("lokr_w1_a"), p("lokr_w1_b"))
    if has("lokr_w2"):
        w2 = p("lokr_w2")
    elif has("lokr_t2"):
        w2 = _cp_weight(p("lokr_t2"), p("lokr_w2_a"), p("lokr_w2_b"))
    else:
        w2 = ops.matmul(p("lokr_w2_a"), p("lokr_w2_b"))
    if len(w2.shape) == 4:
        w1 = ops.reshape(w1, (*tuple(int(d) for d in w1.shape), 1, 1))
    return ops.reshape(_kron(w1, w2) * scale, shape)
