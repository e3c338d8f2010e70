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

from .errors import UnsupportedError

__all__ = ["base_load_refusal", "replaced_tensor_refusal", "rounds_delta_first"]


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


def base_load_refusal(loading: str, path: str, adapter: str, *, merged: bool = True) -> UnsupportedError:
    """The refusal of reading a file's weights into a model while adapter ``adapter``'s values are in the weights of
    its module ``path`` (both backends: Keras' ``load_weights``, torch's ``load_state_dict``). Merged, the load would
    replace the merged weight (base + delta) with the file's, and the next unmerge would subtract the delta from it:
    the base off by the whole delta, after ``unload`` too (PEFT does the same, silently). Otherwise (``merged=False``;
    Keras, whose files never hold an adapter: a module's copy saved whole running in its variables, a base weight or
    bias the adapter's file replaced) the load would overwrite the adapter's values while it stays listed, and its
    delete would give back the weights from before the load.

    >>> base_load_refusal("load_weights", "fc1", "default").key
    'fc1'
    """
    if merged:
        return UnsupportedError(
            f"{loading} into a model whose module {path!r} holds the merged adapter {adapter!r}: the file's weights "
            "would replace the merged ones (base + delta), and unmerging would then subtract the delta from them, "
            "leaving the base off by the whole delta", key=path,
            hint="unmerge first (adapterspec.unmerge_adapters(model)), load the weights, then merge again if needed")
    return UnsupportedError(
        f"{loading} into a model whose module {path!r} holds adapter {adapter!r}'s values in its own weights (a module "
        "it saves whole, running, or a base weight its file replaced): the file's weights would overwrite them while "
        "the adapter stays listed, and deleting the adapter would give back the weights from before the load", key=path,
        hint="delete the adapter first (adapterspec.delete_adapter or unload), load the weights, then load the adapter "
             "again")


def replaced_tensor_refusal(adapter: str, key: str, module: str, merged: str) -> UnsupportedError:
    """The refusal of deleting ``adapter`` while ``merged`` is merged into ``module``, whose base tensor ``key`` the
    adapter's file replaced (both backends): the tensor before the adapter came cannot come back with the merged
    delta in it, and putting it back would drop that delta (the merged model off by it, silently).

    >>> replaced_tensor_refusal("v", "base_model.model.v_proj.base_layer.bias", "v_proj", "a").key
    'base_model.model.v_proj.base_layer.bias'
    """
    return UnsupportedError(
        f"deleting adapter {adapter!r} gives back the base tensor its file replaced, but adapter {merged!r} is merged "
        f"into that module ({module!r}): the tensor from before cannot come back with the merged delta in it", key=key,
        hint=f"unmerge first (adapterspec.unmerge_adapters(model)), delete {adapter!r}, then merge again if needed")
