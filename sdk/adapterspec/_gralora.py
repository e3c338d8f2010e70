"""GraLoRA, granular low-rank adaptation (``GRALORA``; SPEC.md 17.5): config facts, tensor shapes and the refusals,
one rule for every backend.

A GraLoRA adapter cuts a layer's ``in`` inputs and ``out`` outputs into ``k = gralora_k`` blocks and stores per
adapted module ``gralora_A`` ``[k, in/k, r]`` and ``gralora_B`` ``[k, r, out/k]``; with ``hybrid_r > 0`` also a
plain LoRA pair ``gralora_A_general.weight`` ``[hybrid_r, in]`` and ``gralora_B_general.weight`` ``[out, hybrid_r]``.
The layer adds ``alpha / (r + hybrid_r)`` times both terms to the base output (PEFT 0.21.2's math).

>>> param_shapes(8, 12, {"peft_type": "GRALORA", "r": 4, "gralora_k": 2, "hybrid_r": 1}, "q")
{'gralora_A': (2, 4, 4), 'gralora_B': (2, 4, 6), 'gralora_A_general.weight': (1, 8), 'gralora_B_general.weight': (12, 1)}
>>> settings({"peft_type": "GRALORA", "r": 4, "alpha": 10, "hybrid_r": 1})
Granular(r=4, k=2, hybrid_r=1, scaling=2.0, dropout=0.0)
>>> settings({"peft_type": "GRALORA", "r": 4, "alpha": 6.5, "gralora_dropout": -0.5})  # PEFT: 6.5 / 4, no dropout
Granular(r=4, k=2, hybrid_r=0, scaling=1.625, dropout=0.0)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import AdapterSpecError, MissingTensorError, ShapeMismatchError, UnexpectedTensorError, UnsupportedError
from .spec import PEFT_PREFIX

if TYPE_CHECKING:
    from .checks import TensorInfo

__all__ = ["BLOCKS", "DEFAULTS", "GENERAL", "METHOD", "PARAMETERS", "Granular", "config_problems", "module_errors",
           "param_shapes", "settings", "unsupported"]

#: The method's ``peft_type``.
METHOD = "GRALORA"
#: The block tensors every adapted module stores.
BLOCKS = ("gralora_A", "gralora_B")
#: The hybrid LoRA pair, stored when ``hybrid_r > 0``.
GENERAL = ("gralora_A_general.weight", "gralora_B_general.weight")
#: Every tensor name GraLoRA stores per module (SPEC.md 5.2).
PARAMETERS = BLOCKS + GENERAL
#: PEFT 0.21.2's ``GraloraConfig`` defaults.
DEFAULTS: Mapping[str, Any] = {"r": 32, "alpha": 64, "gralora_k": 2, "hybrid_r": 0, "gralora_dropout": 0.0}


@dataclass(frozen=True)
class Granular:
    """What a layer needs to know about one GraLoRA adapter besides its tensors (both backends use it)."""

    r: int  # the block rank (each of the k x k blocks has rank r / k)
    k: int  # gralora_k: blocks per axis
    hybrid_r: int  # the plain LoRA rank beside the blocks (0: none)
    scaling: float  # alpha / (r + hybrid_r)
    dropout: float = 0.0  # gralora_dropout (training only; PEFT draws one mask per term)


def _get(config: Mapping[str, Any], field: str) -> Any:
    value = config.get(field)
    return DEFAULTS[field] if value is None else value


def settings(config: Mapping[str, Any]) -> Granular:
    """The :class:`Granular` of ``config`` (the same on every layer: GraLoRA has no rank or alpha pattern)."""
    r, hybrid_r = int(_get(config, "r")), int(_get(config, "hybrid_r"))
    dropout = float(_get(config, "gralora_dropout"))  # PEFT adds nn.Dropout only above 0: a negative one is none
    return Granular(r, int(_get(config, "gralora_k")), hybrid_r, _get(config, "alpha") / (r + hybrid_r),
                    dropout if dropout > 0.0 else 0.0)


def config_problems(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(pointer, problem, fix)``: the rule PEFT's ``GraloraConfig`` enforces beyond the schema's minimums --
    ``r`` divisible by ``gralora_k`` (SPEC.md 4.2).

    >>> config_problems({"peft_type": "GRALORA", "r": 6, "gralora_k": 4})[0][0]
    '/r'
    """
    if config.get("peft_type") != METHOD:
        return []
    r, k = _get(config, "r"), _get(config, "gralora_k")
    if isinstance(r, int) and isinstance(k, int) and k > 0 and r % k:
        return [("/r", f"GraLoRA r {r} is not divisible by gralora_k {k} (PEFT's GraloraConfig refuses it)",
                 f"choose an r that is a multiple of {k}, or another gralora_k")]
    return []


def unsupported(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(pointer, reason)`` for each GraLoRA config adapterspec readers refuse (SPEC.md 17.5).

    >>> unsupported({"peft_type": "GRALORA", "bias": "all"})[0][0]
    '/bias'
    """
    if config.get("peft_type") != METHOD:
        return []
    if config.get("bias", "none") not in (None, "none"):
        return [("/bias", f"GraLoRA with bias {config.get('bias')!r} (trained base biases) is not supported by "
                          "adapterspec readers")]
    return []


def param_shapes(in_features: int, out_features: int, config: Mapping[str, Any],
                 path: str) -> dict[str, tuple[int, ...]]:
    """The spec parameter names and shapes (PEFT's layout) of ``config`` on a layer of ``in_features`` ->
    ``out_features``.

    :raises UnsupportedError: ``gralora_k`` does not divide both sizes (PEFT's ``update_layer`` refuses it too),
        naming ``path`` and ``/gralora_k``.

    >>> param_shapes(9, 12, {"peft_type": "GRALORA", "r": 4}, "q")
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: q: ...
    """
    g = settings(config)
    for what, size in (("in_features", in_features), ("out_features", out_features)):
        if size % g.k:
            raise UnsupportedError(f"GraLoRA cuts the layer into gralora_k={g.k} blocks per axis: its {what} {size} "
                                   "are not divisible by it (PEFT refuses it too)", key=path, pointer="/gralora_k",
                                   hint="choose a gralora_k dividing every adapted layer's sizes, or do not target "
                                        "this layer")
    shapes: dict[str, tuple[int, ...]] = {"gralora_A": (g.k, in_features // g.k, g.r),
                                          "gralora_B": (g.k, g.r, out_features // g.k)}
    if g.hybrid_r > 0:
        shapes["gralora_A_general.weight"] = (g.hybrid_r, in_features)
        shapes["gralora_B_general.weight"] = (out_features, g.hybrid_r)
    return shapes


def _key(module: str, param: str) -> str:
    return f"{PEFT_PREFIX}{module}.{param}"


def module_errors(config: Mapping[str, Any], module: str, p: Mapping[str, TensorInfo]) -> list[AdapterSpecError]:
    """Checks 9-11 of one module (no model needed): the blocks ``[k, in/k, r]`` / ``[k, r, out/k]`` agree with
    ``gralora_k`` and ``r``; the hybrid pair is present exactly when ``hybrid_r > 0`` and is ``[hybrid_r, in]`` /
    ``[out, hybrid_r]`` for the blocks' ``in`` and ``out``."""
    g = settings(config)
    hint = "save the adapter again with PEFT (SPEC.md 17.5), or fix r, gralora_k and hybrid_r"
    wanted = PARAMETERS if g.hybrid_r > 0 else BLOCKS
    errors: list[AdapterSpecError] = [
        UnexpectedTensorError(f"hybrid_r is {g.hybrid_r}: PEFT stores no hybrid LoRA pair", key=_key(module, n),
                              hint="set hybrid_r to the adapter's hybrid rank, or save the adapter again")
        for n in sorted(p) if n not in wanted]
    errors += [MissingTensorError(f"missing (GraLoRA with hybrid_r {g.hybrid_r} stores {', '.join(wanted)} per "
                                  "adapted module)", key=_key(module, n), hint=hint) for n in wanted if n not in p]
    if errors:
        return errors

    def bad(name: str, message: str) -> ShapeMismatchError:
        return ShapeMismatchError(f"shape {list(p[name].shape)}: {message}", key=_key(module, name), hint=hint)

    a, b = tuple(p["gralora_A"].shape), tuple(p["gralora_B"].shape)
    if len(a) != 3 or a[0] != g.k or a[2] != g.r:
        errors.append(bad("gralora_A", f"must be [gralora_k, in/gralora_k, r] with gralora_k={g.k}, r={g.r}"))
    if len(b) != 3 or b[0] != g.k or b[1] != g.r:
        errors.append(bad("gralora_B", f"must be [gralora_k, r, out/gralora_k] with gralora_k={g.k}, r={g.r}"))
    if errors or g.hybrid_r <= 0:
        return errors
    in_f, out_f = a[0] * a[1], b[0] * b[2]
    for name, want in (("gralora_A_general.weight", (g.hybrid_r, in_f)),
                       ("gralora_B_general.weight", (out_f, g.hybrid_r))):
        if tuple(p[name].shape) != want:
            errors.append(bad(name, f"must be {list(want)} (hybrid_r={g.hybrid_r}; the blocks give {in_f} inputs, "
                                    f"{out_f} outputs)"))
    return errors
