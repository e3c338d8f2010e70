"""The spec's tensor-naming convention (SPEC.md section 5).

A key is ``"base_model.model." + module path + "." + parameter name``; the adapter's name never
appears in it. Prefix and prompt tuning store one un-prefixed key, ``prompt_embeddings``.

>>> name = parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "LORA")
>>> name.module, name.param, name.role
('model.layers.0.self_attn.q_proj', 'lora_A.weight', 'adapter')
>>> make_key("model.layers.0.self_attn.q_proj", "lora_B.weight")
'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .errors import UnexpectedTensorError
from .spec import PEFT_PREFIX
from .targets import is_modules_to_save

__all__ = [
    "BASE_LAYER_PARAM",
    "MAX_KEY_LENGTH",
    "PARAMETERS",
    "PROMPT_KEY",
    "TensorName",
    "make_key",
    "parse_key",
]

#: The adapter parameters each method stores per module, as they appear at the end of a key.
PARAMETERS: Mapping[str, tuple[str, ...]] = {
    "LORA": (
        "lora_A.weight", "lora_B.weight", "lora_B.bias",
        "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
    ),
    "IA3": ("ia3_l",),
    "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "LOKR": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "PREFIX_TUNING": (),
    "PROMPT_TUNING": (),
}

#: The single key of prefix and prompt tuning.
PROMPT_KEY = "prompt_embeddings"

#: PEFT saves the full weight of an adapted embedding (resized vocabulary) under this parameter name.
BASE_LAYER_PARAM = "base_layer.weight"

#: The longest key accepted. Real keys are under 200 characters; the bound keeps the regular
#: expressions of a config (matched against module paths) from running on megabyte-long strings.
MAX_KEY_LENGTH = 1024

Role = Literal["adapter", "base_layer", "modules_to_save", "prompt"]


@dataclass(frozen=True)
class TensorName:
    """A parsed tensor key.

    :param key: the key as stored.
    :param module: the module path (``""`` for ``prompt_embeddings``).
    :param param: the parameter name (``"lora_A.weight"``, ``"weight"`` of a saved module, ...).
    :param role: ``"adapter"`` (an adapter parameter), ``"base_layer"`` (full weight of an adapted
        embedding), ``"modules_to_save"`` (a tensor of a module saved whole) or ``"prompt"``.
    """

    key: str
    module: str
    param: str
    role: Role


def make_key(module: str, param: str) -> str:
    """The canonical key of ``param`` of the module at path ``module``."""
    return f"{PEFT_PREFIX}{module}.{param}" if module else param


def parse_key(key: str, peft_type: str, config: Mapping[str, Any] | None = None) -> TensorName:
    """Split a stored key into module path and parameter name, and say what the tensor is.

    :param key: the key as stored in the safetensors file.
    :param peft_type: the adapter's method; decides which parameter names are adapter parameters.
    :param config: the adapter config, to recognise ``modules_to_save`` tensors.
    :raises UnexpectedTensorError: the key does not follow the convention for this method.
    """
    if len(key) > MAX_KEY_LENGTH:
        raise UnexpectedTensorError(f"key is {len(key)} characters long, more than {MAX_KEY_LENGTH}",
                                    key=key[:80] + "...", hint="this is not a module parameter; remove the tensor")
    if peft_type in ("PREFIX_TUNING", "PROMPT_TUNING"):
        if key == PROMPT_KEY:
            return TensorName(key, "", PROMPT_KEY, "prompt")
        raise UnexpectedTensorError(
            f"{peft_type} adapters store the single tensor {PROMPT_KEY!r}, not this one",
            key=key, hint=f"remove the tensor or rename it to {PROMPT_KEY!r}",
        )
    if not key.startswith(PEFT_PREFIX):
        raise UnexpectedTensorError(
            f"key does not start with {PEFT_PREFIX!r} (PEFT would silently leave such an adapter untrained)",
            key=key, hint=f"prefix every key with {PEFT_PREFIX!r}",
        )
    rest = key[len(PEFT_PREFIX):]
    for param in PARAMETERS.get(peft_type, ()):
        if rest.endswith("." + param):
            return TensorName(key, rest[: -len(param) - 1], param, "adapter")
    if rest.endswith("." + BASE_LAYER_PARAM):
        return TensorName(key, rest[: -len(BASE_LAYER_PARAM) - 1], BASE_LAYER_PARAM, "base_layer")
    module, _, param = rest.rpartition(".")
    if module and config is not None and is_modules_to_save(config, module):
        return TensorName(key, module, param, "modules_to_save")
    expected = ", ".join(PARAMETERS.get(peft_type, ())) or "none"
    raise UnexpectedTensorError(
        f"not a {peft_type} parameter (expected a key ending in one of: {expected}) "
        "nor a tensor of a module in modules_to_save",
        key=key, hint="remove the tensor, or add its module to modules_to_save",
    )
