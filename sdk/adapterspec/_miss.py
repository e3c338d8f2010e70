"""MiSS (``MISS``, formerly Bone; SPEC.md 17.2): its three modes, ``miss_block``'s shape in each, the layers PEFT
0.21.2 refuses -- one rule for every backend.

PEFT's ``init_weights`` picks the mode: exactly ``"bat"`` (the block multiplies the base weight's ``[r, r]`` tiles),
exactly ``"mini"`` (an ``[r, mini_r]`` block repeated along the outputs), anything else the plain block mode
(``[r, out]``; a falsy value starts it at kaiming noise, any other at zero).

>>> mode({"init_weights": "bat"}), mode({"init_weights": False}), mode({"init_weights": "Bat"})
('bat', 'block', 'block')
>>> block_shape(64, 32, {"peft_type": "MISS", "r": 8, "init_weights": "bat"}, "q")
(4, 8, 8)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import UnsupportedError

__all__ = ["BAT", "BLOCK", "MINI", "PARAM", "PEFT_DEFAULT_MINI_R", "PEFT_DEFAULT_R", "Block", "block_shape", "mini_r",
           "mode", "rank", "settings", "starts_at_zero", "unsupported"]

#: The one tensor MiSS stores per adapted module.
PARAM = "miss_block"
#: PEFT 0.21's defaults of ``MissConfig.r`` and ``MissConfig.mini_r``.
PEFT_DEFAULT_R = 64
PEFT_DEFAULT_MINI_R = 1
#: The modes (``init_weights`` exactly ``"bat"`` / ``"mini"``, anything else).
BAT, MINI, BLOCK = "bat", "mini", "block"


def mode(config: Mapping[str, Any]) -> str:
    """:data:`BAT`, :data:`MINI` or :data:`BLOCK`: PEFT compares ``init_weights`` with ``"bat"`` and ``"mini"``
    (``==``), every other value runs the plain block forward."""
    value = config.get("init_weights", True)
    return value if isinstance(value, str) and value in (BAT, MINI) else BLOCK


def starts_at_zero(config: Mapping[str, Any]) -> bool:
    """Whether PEFT starts a fresh block at zero (every mode but a falsy ``init_weights``: kaiming-uniform noise).

    >>> starts_at_zero({"init_weights": None}), starts_at_zero({"init_weights": "mini"})
    (False, True)
    """
    return mode(config) != BLOCK or bool(config.get("init_weights", True))


def rank(config: Mapping[str, Any]) -> int:
    """``r`` (PEFT's default 64): the block's rows (BLOCK, MINI) or tile size (BAT)."""
    value = config.get("r")
    return PEFT_DEFAULT_R if value is None else int(value)


def mini_r(config: Mapping[str, Any]) -> int:
    """``mini_r`` (PEFT's default 1): the block's columns in MINI mode."""
    value = config.get("mini_r")
    return PEFT_DEFAULT_MINI_R if value is None else int(value)


@dataclass(frozen=True)
class Block:
    """What a layer needs to know about one MiSS adapter besides its tensor (both backends use it)."""

    mode: str  # BLOCK, MINI or BAT
    r: int
    mini_r: int = 1
    dropout: float = 0.0  # miss_dropout (block and mini modes, training only; PEFT's bat forward ignores it)


def settings(config: Mapping[str, Any]) -> Block:
    """The :class:`Block` of ``config`` (the same on every layer).

    >>> settings({"peft_type": "MISS", "r": 4, "init_weights": "mini", "mini_r": 2})
    Block(mode='mini', r=4, mini_r=2, dropout=0.0)
    """
    return Block(mode(config), rank(config), mini_r(config), float(config.get("miss_dropout") or 0.0))


def block_shape(in_features: int, out_features: int, config: Mapping[str, Any], path: str) -> tuple[int, ...]:
    """``miss_block``'s shape on a Linear layer of ``in_features`` -> ``out_features``: ``[r, out]`` (BLOCK),
    ``[r, mini_r]`` (MINI), ``[out / r, r, r]`` (BAT).

    :raises UnsupportedError: a layer PEFT 0.21.2 refuses too (``r`` not in ``1..in``; BAT: ``r`` not dividing
        both sizes; MINI: ``mini_r`` not dividing ``out``), naming ``path`` and the field.

    >>> block_shape(64, 32, {"r": 6}, "q"), block_shape(64, 32, {"r": 6, "init_weights": "mini", "mini_r": 4}, "q")
    ((6, 32), (6, 4))
    >>> block_shape(64, 30, {"r": 8, "init_weights": "bat"}, "q")
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: q: ...
    """
    r, kind = rank(config), mode(config)
    if r <= 0 or r > in_features:
        raise UnsupportedError(f"MiSS r={r} must be between 1 and the layer's {in_features} input features (PEFT "
                               "refuses it too)", key=path, pointer="/r",
                               hint=f"choose r <= {in_features}, or do not target this layer")
    if kind == BAT:
        if in_features % r or out_features % r:
            raise UnsupportedError(f"MiSS 'bat' tiles the {out_features}x{in_features} weight into [r, r] blocks: r={r} "
                                   "must divide both sizes (PEFT refuses it too)", key=path, pointer="/r",
                                   hint="choose an r dividing the layer's input and output sizes")
        return (out_features // r, r, r)
    if kind == MINI:
        m = mini_r(config)
        if m <= 0 or out_features % m:
            raise UnsupportedError(f"MiSS 'mini' repeats an [r, mini_r] block along the {out_features} outputs: "
                                   f"mini_r={m} must divide them (PEFT refuses it too)", key=path, pointer="/mini_r",
                                   hint=f"choose a mini_r dividing {out_features}")
        return (r, m)
    return (r, out_features)


def unsupported(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(pointer, reason)`` for each MiSS variant adapterspec readers refuse (SPEC.md 17.2).

    >>> unsupported({"peft_type": "MISS", "bias": "all"})[0][0]
    '/bias'
    """
    if config.get("peft_type") != "MISS":
        return []
    found = []
    if config.get("bias", "none") not in (None, "none"):
        found.append(("/bias", f"MiSS with bias {config.get('bias')!r} (trained base biases) is not supported by "
                               "adapterspec readers"))
    return found
