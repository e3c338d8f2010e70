"""OFT and BOFT block sizes (SPEC.md 15.6, 15.7): how many blocks of which size rotate a layer's input features,
as PEFT 0.21 decides them -- one rule for every backend.

>>> from adapterspec import AdapterConfig
>>> block_sizes(64, AdapterConfig.from_dict({"peft_type": "OFT", "r": 0, "oft_block_size": 30, "target_modules": ["q"]}), "q")
(2, 32)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import UnsupportedError

__all__ = ["Rotation", "adjust", "block_sizes", "param_shapes", "rotation_of", "size_problems"]


@dataclass(frozen=True)
class Rotation:
    """What a layer needs to know about one OFT/BOFT adapter besides its tensors (both backends use it)."""

    method: str
    blocks: int  # number of diagonal blocks of R
    block_size: int
    block_share: bool = False  # OFT: one block repeated
    neumann: bool = True  # OFT: the Cayley-Neumann series instead of the exact Cayley transform
    terms: int = 5  # OFT: num_cayley_neumann_terms
    dropout: float = 0.0  # BOFT: boft_dropout (training only)


def adjust(features: int, value: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of ``features`` nearest ``value`` (the lower one on a tie).

    >>> adjust(64, 30), adjust(64, 48), adjust(10, 40)
    (32, 32, 10)
    """
    if value >= features:
        return features
    higher = value
    while higher <= features and features % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and features % lower != 0:
        lower -= 1
    return lower if (value - lower) <= (higher - value) else higher


#: The two sizes of each method of which exactly one is non-zero, with PEFT 0.21's defaults.
_SIZES = {"OFT": (("r", 0), ("oft_block_size", 32)), "BOFT": (("boft_block_size", 4), ("boft_block_num", 0))}


def size_problems(config: Any) -> list[tuple[str, str, str]]:
    """``(pointer, problem, fix)`` when not exactly one of OFT's ``r`` / ``oft_block_size`` (BOFT's
    ``boft_block_size`` / ``boft_block_num``) is non-zero: PEFT's config refuses both and neither.

    >>> size_problems({"peft_type": "OFT", "r": 4})[0][1]
    'OFT needs exactly one of r and oft_block_size non-zero (r=4, oft_block_size=32)'
    >>> size_problems({"peft_type": "BOFT", "boft_block_size": 0, "boft_block_num": 2})
    []
    """
    pair = _SIZES.get(str(config.get("peft_type")))
    if pair is None:
        return []
    (first, first_default), (second, second_default) = pair
    a, b = config.get(first, first_default), config.get(second, second_default)
    a, b = (first_default if a is None else a), (second_default if b is None else b)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)) or (a == 0) != (b == 0):
        return []
    return [(f"/{second}", f"{config.get('peft_type')} needs exactly one of {first} and {second} non-zero "
                           f"({first}={a}, {second}={b})", f"set {first} to 0 and {second} to the block "
                           f"{'size' if second != 'boft_block_num' else 'count'}, or the reverse")]


def block_sizes(features: int, config: Any, path: str) -> tuple[int, int]:
    """(number of blocks, block size) of an OFT/BOFT ``config`` on a layer rotating ``features`` input features.

    :param config: the adapter's :class:`~adapterspec.AdapterConfig` (anything with ``peft_type`` and ``get``).
    :raises UnsupportedError: both or neither of OFT's ``r`` / ``oft_block_size`` (BOFT's ``boft_block_size`` /
        ``boft_block_num``) set, or a BOFT size that does not divide ``features`` (PEFT refuses it too).
    """
    for pointer, problem, fix in size_problems(config):  # a config validated by AdapterConfig has passed this
        raise UnsupportedError(problem, pointer=pointer, hint=fix)
    if config.peft_type == "OFT":
        r, size = int(config.get("r", 0) or 0), int(config.get("oft_block_size", 32) or 0)
        if r == 0:  # PEFT moves a block size that does not divide the features to the nearest divisor (a warning)
            size = size if features % size == 0 and size <= features else adjust(features, size)
            return features // size, size
        r = r if features % r == 0 and r <= features else adjust(features, r)
        return r, features // r
    size, num = int(config.get("boft_block_size", 4) or 0), int(config.get("boft_block_num", 0) or 0)
    given, field = (size, "boft_block_size") if size else (num, "boft_block_num")
    if features % given != 0:
        raise UnsupportedError(f"{field}={given} does not divide the {features} input features of this layer "
                               "(PEFT refuses it too)", key=path, pointer=f"/{field}",
                               hint=f"choose a {field} that divides {features}, or do not target this layer")
    return (features // size, size) if size else (num, features // num)


def rotation_of(features: int, config: Any, path: str) -> Rotation:
    """The :class:`Rotation` of an OFT/BOFT ``config`` on a layer rotating ``features`` input features.

    >>> from adapterspec import AdapterConfig
    >>> rotation_of(8, AdapterConfig.from_dict({"peft_type": "BOFT", "target_modules": ["q"], "boft_block_size": 2}),
    ...             "q").blocks
    4
    """
    blocks, size = block_sizes(features, config, path)
    if config.peft_type == "OFT":
        return Rotation("OFT", blocks, size, block_share=bool(config.get("block_share", False)),
                        neumann=bool(config.get("use_cayley_neumann", True)),
                        terms=int(config.get("num_cayley_neumann_terms", 5)))
    return Rotation("BOFT", blocks, size, dropout=float(config.get("boft_dropout", 0.0) or 0.0))


def param_shapes(features: int, out_features: int, config: Any, path: str, *, conv: bool = False
                 ) -> dict[str, tuple[int, ...]]:
    """The spec parameter names and shapes (PEFT's layout) of an OFT/BOFT ``config`` on a layer rotating
    ``features`` input features into ``out_features`` outputs (``conv``: a convolution, whose ``boft_s`` is
    ``[1, out]``).

    >>> from adapterspec import AdapterConfig
    >>> param_shapes(8, 3, AdapterConfig.from_dict({"peft_type": "BOFT", "target_modules": ["q"],
    ...                                             "boft_block_size": 2}), "q")
    {'boft_R': (1, 4, 2, 2), 'boft_s': (3, 1)}
    """
    spec = rotation_of(features, config, path)
    if spec.method == "OFT":
        return {"oft_R.weight": (1 if spec.block_share else spec.blocks, spec.block_size * (spec.block_size - 1) // 2)}
    return {"boft_R": (1, spec.blocks, spec.block_size, spec.block_size),
            "boft_s": (1, out_features) if conv else (out_features, 1)}
