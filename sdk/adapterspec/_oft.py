"""OFT and BOFT block sizes (SPEC.md 15.6, 15.7): how many blocks of which size rotate a layer's input features,
as PEFT 0.21 decides them -- one rule for every backend.

>>> from adapterspec import AdapterConfig
>>> block_sizes(64, AdapterConfig.from_dict({"peft_type": "OFT", "r": 0, "oft_block_size": 30, "target_modules": ["q"]}), "q")
(2, 32)
"""

from __future__ import annotations

from typing import Any

from .errors import UnsupportedError

__all__ = ["adjust", "block_sizes"]


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


def block_sizes(features: int, config: Any, path: str) -> tuple[int, int]:
    """(number of blocks, block size) of an OFT/BOFT ``config`` on a layer rotating ``features`` input features.

    :param config: the adapter's :class:`~adapterspec.AdapterConfig` (anything with ``peft_type`` and ``get``).
    :raises UnsupportedError: both or neither of OFT's ``r`` / ``oft_block_size`` (BOFT's ``boft_block_size`` /
        ``boft_block_num``) set, or a BOFT size that does not divide ``features`` (PEFT refuses it too).
    """
    if config.peft_type == "OFT":
        r, size = int(config.get("r", 0) or 0), int(config.get("oft_block_size", 32) or 0)
        if (r == 0) == (size == 0):
            raise UnsupportedError(f"OFT needs exactly one of r and oft_block_size non-zero (r={r}, "
                                   f"oft_block_size={size})", pointer="/oft_block_size",
                                   hint="set r to 0 and oft_block_size to the block size (or the reverse)")
        if r == 0:  # PEFT moves a block size that does not divide the features to the nearest divisor (a warning)
            size = size if features % size == 0 and size <= features else adjust(features, size)
            return features // size, size
        r = r if features % r == 0 and r <= features else adjust(features, r)
        return r, features // r
    size, num = int(config.get("boft_block_size", 4) or 0), int(config.get("boft_block_num", 0) or 0)
    if (size == 0) == (num == 0):
        raise UnsupportedError(f"BOFT needs exactly one of boft_block_size and boft_block_num non-zero "
                               f"(boft_block_size={size}, boft_block_num={num})", pointer="/boft_block_size",
                               hint="set one of them to 0")
    given, field = (size, "boft_block_size") if size else (num, "boft_block_num")
    if features % given != 0:
        raise UnsupportedError(f"{field}={given} does not divide the {features} input features of this layer "
                               "(PEFT refuses it too)", key=path, pointer=f"/{field}",
                               hint=f"choose a {field} that divides {features}, or do not target this layer")
    return (features // size, size) if size else (num, features // num)
