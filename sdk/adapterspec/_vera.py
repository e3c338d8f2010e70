"""VeRA's config facts and its shared tensors (SPEC.md 15.5).

VeRA stores two frozen random matrices once per adapter, shared by every adapted module:
``base_model.vera_A`` ``[r, max_in]`` and ``base_model.vera_B`` ``[max_out, r]`` (``max_in``/``max_out``: the
largest input/output size among the adapted modules). Each module stores ``vera_lambda_b`` ``[out]`` and
``vera_lambda_d`` ``[r]`` and uses the slices ``vera_A[:, :in]`` and ``vera_B[:out, :]``.

>>> shared_key("vera_A")
'base_model.vera_A'
>>> unsupported({"peft_type": "VERA", "save_projection": False})[0][0]
'/save_projection'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["PEFT_DEFAULT_R", "SHARED", "SHARED_PREFIX", "rank", "shared_key", "unsupported"]

#: The shared matrices' parameter names.
SHARED = ("vera_A", "vera_B")
#: Their keys are ``"base_model." + name``: no module path (they belong to no module).
SHARED_PREFIX = "base_model."
#: PEFT 0.21's default ``VeraConfig.r``.
PEFT_DEFAULT_R = 256


def shared_key(param: str) -> str:
    """The key of shared matrix ``param`` (``"vera_A"`` or ``"vera_B"``)."""
    return SHARED_PREFIX + param


def rank(config: Mapping[str, Any]) -> int:
    """``r`` (PEFT's default 256): rows of ``vera_A``, columns of ``vera_B``, length of ``vera_lambda_d``."""
    value = config.get("r")
    return PEFT_DEFAULT_R if value is None else int(value)


def unsupported(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(pointer, reason)`` for each VeRA variant adapterspec readers refuse (SPEC.md 15.5)."""
    found = []
    if not config.get("save_projection", True):  # null too: PEFT's truth test (SPEC 4.1.1)
        found.append(("/save_projection", "VeRA with save_projection false stores no vera_A/vera_B: PEFT regenerates "
                                          "them from projection_prng_key with torch's random generator, which the "
                                          "spec does not define; adapterspec readers do not load it"))
    if config.get("bias", "none") not in (None, "none"):
        found.append(("/bias", f"VeRA with bias {config.get('bias')!r} (trained base biases) is not supported by "
                               "adapterspec readers"))
    return found
