"""HRA, Householder reflection adaptation (SPEC.md 17.3): config facts, tensor shapes and the refusals, one rule
for every backend.

An HRA adapter stores one tensor per adapted module, ``<module>.hra_u`` ``[F, r]``: ``F`` the input features
(``in_features`` of a Linear, ``in_channels * k * k`` of a ``k x k`` Conv2d), ``r`` the config's ``r``. Its
columns are ``r`` Householder vectors; the layer's weight ``W`` (flattened to ``[out, F]``) becomes ``W @ H``.

>>> param_shapes(8, {"peft_type": "HRA", "r": 2})
{'hra_u': (8, 2)}
>>> unsupported({"peft_type": "HRA", "bias": "all"})[0][0]
'/bias'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["METHOD", "PARAM", "PEFT_DEFAULT_R", "Reflections", "inject_refusal", "layer_refusal", "param_shapes",
           "rank", "reflections_of", "unsupported"]

#: The method's ``peft_type``.
METHOD = "HRA"
#: The one tensor HRA stores per module.
PARAM = "hra_u"
#: PEFT 0.21's default ``HRAConfig.r``.
PEFT_DEFAULT_R = 8


@dataclass(frozen=True)
class Reflections:
    """What a layer needs to know about one HRA adapter besides its tensor (both backends use it)."""

    r: int  # number of Householder vectors (columns of hra_u)
    apply_gs: bool = False  # apply_GS: one reflection across the Gram-Schmidt span of the columns
    method: str = METHOD


def rank(config: Mapping[str, Any]) -> int:
    """``r`` (PEFT's default 8): the columns of every module's ``hra_u``. HRA has no ``rank_pattern``.

    >>> rank({"peft_type": "HRA"}), rank({"peft_type": "HRA", "r": 4})
    (8, 4)
    """
    value = config.get("r")
    return PEFT_DEFAULT_R if value is None else int(value)


def reflections_of(config: Mapping[str, Any]) -> Reflections:
    """The :class:`Reflections` of an HRA ``config`` (the same on every module).

    >>> reflections_of({"peft_type": "HRA", "r": 2, "apply_GS": True})
    Reflections(r=2, apply_gs=True, method='HRA')
    """
    return Reflections(rank(config), bool(config.get("apply_GS", False)))


def param_shapes(features: int, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The spec parameter name and shape (PEFT's layout) of ``config`` on a layer with ``features`` input features
    (a Conv2d's ``in_channels * k * k``)."""
    return {PARAM: (int(features), rank(config))}


def layer_refusal(features: int, config: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """``(pointer, reason, hint)`` when ``config`` has no defined result on a layer of ``features`` input features
    (``F``), else ``None`` (SPEC.md 17.3).

    With ``apply_GS``, Gram-Schmidt over ``r > F`` columns of ``F`` values reaches a column that is zero up to
    rounding and divides by its norm: PEFT 0.21.2 returns no NaN but rounding noise (measured: a Linear 4->3 with
    ``r`` 5 or 6 gives outputs of the size of the weights that depend on float rounding). Without ``apply_GS`` any
    ``r`` is a product of reflections (defined).

    >>> layer_refusal(4, {"peft_type": "HRA", "r": 5, "apply_GS": True})[0]
    '/r'
    >>> layer_refusal(4, {"peft_type": "HRA", "r": 4, "apply_GS": True}), layer_refusal(4, {"r": 5})
    (None, None)
    """
    r = rank(config)
    if not config.get("apply_GS") or r <= features:
        return None
    return ("/r", f"HRA with apply_GS and r={r} above the layer's {features} input features: Gram-Schmidt then "
                  "normalises a column that is zero up to rounding, so PEFT's output is rounding noise",
            f"use r <= {features} with apply_GS, or apply_GS false, or do not target this layer")


def unsupported(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(pointer, reason)`` for each HRA variant adapterspec readers refuse (SPEC.md 17.3).

    >>> unsupported({"peft_type": "HRA", "r": 0})[0]
    ('/r', 'HRA with r=0: PEFT refuses to build the layers (r must be a positive integer)')
    >>> unsupported({"peft_type": "HRA", "r": 4})
    []
    """
    if config.get("peft_type") != METHOD:
        return []
    found = []
    r = config.get("r", PEFT_DEFAULT_R)
    if isinstance(r, int) and not isinstance(r, bool) and r <= 0:
        found.append(("/r", f"HRA with r={r}: PEFT refuses to build the layers (r must be a positive integer)"))
    if config.get("bias", "none") not in (None, "none"):
        found.append(("/bias", f"HRA with bias {config.get('bias')!r} (trained base biases) is not supported by "
                               "adapterspec readers"))
    return found


def inject_refusal(config: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """``(pointer, reason, hint)`` when a *fresh* HRA adapter of ``config`` has no defined output, else ``None``.

    PEFT's initialisation (``init_weights: true``, even ``r``) repeats each random column twice so that the
    reflections cancel (``H = I``); with ``apply_GS`` the Gram-Schmidt step then normalises a column that is zero up
    to rounding, so PEFT's output depends on float rounding noise. Loading a trained adapter is not affected.

    >>> inject_refusal({"peft_type": "HRA", "r": 2, "apply_GS": True})[0]
    '/apply_GS'
    >>> inject_refusal({"peft_type": "HRA", "r": 2}) is None
    True
    """
    if config.get("peft_type") != METHOD or not config.get("apply_GS") or not config.get("init_weights", True) \
            or rank(config) % 2:
        return None
    return ("/apply_GS", "a fresh HRA adapter with apply_GS and init_weights true (even r): PEFT repeats each column "
                         "twice, so Gram-Schmidt normalises a zero column and the output is rounding noise",
            "inject with init_weights false, or with apply_GS false (train, then load the saved adapter with apply_GS)")
