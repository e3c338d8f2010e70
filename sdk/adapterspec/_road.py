"""RoAd's config facts and tensor rules (SPEC.md 17.1).

RoAd (PEFT ``ROAD``) rotates pairs of a ``nn.Linear``'s outputs: each adapted module stores two 1-D tensors of the
same length, ``road_theta`` (angles) and ``road_alpha`` (scales): ``out / 2`` (``road_1``), ``out`` (``road_2``) or
``2 * out`` (``road_4``) values, ``out`` the layer's output features, a multiple of ``group_size``.

>>> variant({"peft_type": "ROAD"}), group_size({"peft_type": "ROAD"})
('road_1', 64)
>>> vector_length("road_4", 8)
16
>>> config_problems({"peft_type": "ROAD", "group_size": 3})[0][0]
'/group_size'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["PARAMS", "PEFT_DEFAULT_GROUP_SIZE", "PEFT_DEFAULT_VARIANT", "VARIANTS", "config_problems", "group_size",
           "length_problem", "out_features_problem", "variant", "vector_length"]

#: The tensors of one adapted module.
PARAMS = ("road_theta", "road_alpha")
#: PEFT 0.21's ``RoadVariant`` values.
VARIANTS = ("road_1", "road_2", "road_4")
#: PEFT 0.21's defaults.
PEFT_DEFAULT_VARIANT = "road_1"
PEFT_DEFAULT_GROUP_SIZE = 64

#: Values per output feature of each variant (``road_1``: one per pair).
_PER_OUT = {"road_1": (1, 2), "road_2": (1, 1), "road_4": (2, 1)}


def variant(config: Mapping[str, Any]) -> str:
    """``variant`` (PEFT's default ``road_1``)."""
    value = config.get("variant")
    return PEFT_DEFAULT_VARIANT if value is None else str(value)


def group_size(config: Mapping[str, Any]) -> int:
    """``group_size`` (PEFT's default 64)."""
    value = config.get("group_size")
    return PEFT_DEFAULT_GROUP_SIZE if value is None else int(value)


def vector_length(name: str, out_features: int) -> int:
    """The length of ``road_theta``/``road_alpha`` of variant ``name`` on a layer with ``out_features`` outputs.

    >>> [vector_length(v, 8) for v in VARIANTS]
    [4, 8, 16]
    """
    num, den = _PER_OUT[name]
    return out_features * num // den


def config_problems(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(pointer, problem, fix)`` for a ``variant`` or ``group_size`` PEFT's ``RoadConfig`` refuses (ValueError in
    its ``__post_init__``): a variant other than road_1/road_2/road_4, a group size that is not a positive even
    integer.

    >>> config_problems({"peft_type": "ROAD", "variant": "road_3"})[0][0]
    '/variant'
    >>> config_problems({"peft_type": "ROAD", "variant": "road_2", "group_size": 8})
    []
    """
    if config.get("peft_type") != "ROAD":
        return []
    problems = []
    value = config.get("variant", PEFT_DEFAULT_VARIANT)
    if value not in VARIANTS:
        problems.append(("/variant", f"variant {value!r} is not one of {', '.join(VARIANTS)} (PEFT refuses it)",
                         "set variant to road_1, road_2 or road_4"))
    size = config.get("group_size", PEFT_DEFAULT_GROUP_SIZE)
    if isinstance(size, int) and not isinstance(size, bool) and (size <= 0 or size % 2):
        problems.append(("/group_size", f"group_size {size} is not a positive even number (RoAd pairs element i "
                                        "with element i + group_size/2 of each group; PEFT refuses it)",
                         "set group_size to an even divisor of the adapted layers' output sizes (e.g. 64)"))
    return problems


def length_problem(config: Mapping[str, Any], length: int) -> str | None:
    """Why a ``road_theta``/``road_alpha`` of ``length`` values cannot belong to ``config`` on any layer (``None``
    when some layer fits): PEFT reshapes road_1's vectors by ``group_size / 2``, road_2's by ``group_size`` and
    road_4's by ``2 * group_size``.

    >>> length_problem({"variant": "road_2", "group_size": 4}, 6)
    'length 6 is not a multiple of 4 (variant road_2, group_size 4: out features, a multiple of group_size)'
    """
    name, size = variant(config), group_size(config)
    if name not in VARIANTS or size <= 0 or size % 2:
        return None  # the config's own error (config_problems)
    unit = vector_length(name, size)
    if length % unit == 0 and length > 0:
        return None
    what = {"road_1": "out/2 features", "road_2": "out features", "road_4": "2*out features"}[name]
    return (f"length {length} is not a multiple of {unit} (variant {name}, group_size {size}: {what}, a multiple of "
            f"{'group_size' if name == 'road_2' else ('group_size/2' if name == 'road_1' else '2*group_size')})")


def out_features_problem(config: Mapping[str, Any], out_features: int) -> str | None:
    """Why a layer with ``out_features`` outputs cannot take ``config`` (PEFT's ``update_layer`` raises), or ``None``.

    >>> out_features_problem({"group_size": 64}, 96)
    'out_features 96 is not divisible by group_size 64 (PEFT refuses the layer)'
    """
    size = group_size(config)
    if size > 0 and out_features % size == 0:
        return None
    return f"out_features {out_features} is not divisible by group_size {size} (PEFT refuses the layer)"
