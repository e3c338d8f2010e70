"""How PEFT 0.21 rounds a merge into a half-precision base weight (SPEC.md 7.3): one rule for every backend.

An adapter on a float16 / bfloat16 base computes its delta in float32 (SPEC.md 7.5). PEFT's merge and unmerge add
that delta to the weight in one of two ways:

* in place, ``weight += delta``: the sum is taken in float32 and rounded once to the weight's dtype;
* after a cast, ``weight += delta.to(weight.dtype)``: the delta is rounded first, the sum then -- two roundings,
  which differ from one in about a third of a bfloat16 weight's elements (by one unit in the last place).

Which one depends on the method, the layer kind and the direction (PEFT 0.21.2's ``lora/layer.py``,
``lora/variants.py``, ``lycoris_utils.py``): LoRA merges a Linear, transformers Conv1D or convolution in place but
unmerges it after a cast; an Embedding and a MiCA adapter (``init_lora_weights: "mica"``) both ways after a cast;
DoRA, LoHa, LoKr, AdaLoRA and VeRA compute the new weight in float32 and round it once, both ways.

>>> from adapterspec import AdapterConfig
>>> lora = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q"]})
>>> rounds_delta_first(lora, embedding=False, unmerge=False), rounds_delta_first(lora, embedding=False, unmerge=True)
(False, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["rounds_delta_first"]


def rounds_delta_first(config: Mapping[str, Any], *, embedding: bool, unmerge: bool) -> bool:
    """Whether PEFT rounds the adapter's delta to the base weight's dtype before adding it (``unmerge``: before
    subtracting it) -- two roundings -- rather than adding the float32 delta in place (one rounding).

    :param config: the adapter's config (its ``peft_type``, ``use_dora``, ``init_lora_weights``).
    :param embedding: the layer is an embedding (PEFT's LoRA ``Embedding``).
    :param unmerge: the delta is taken out again (PEFT's ``unmerge``) rather than put in.

    >>> rounds_delta_first({"peft_type": "LORA", "init_lora_weights": "mica"}, embedding=False, unmerge=False)
    True
    >>> rounds_delta_first({"peft_type": "LOHA"}, embedding=False, unmerge=True)
    False
    """
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        return False
    return unmerge or embedding or config.get("init_lora_weights") == "mica"
