"""The MoE configs PEFT 0.21 rewrites at load for transformers 5's fused MoE layers (SPEC.md 15.1), refused by
every backend alike: a reader that matched them as written would adapt other modules than PEFT does.

>>> check_moe_conversion(AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q_proj"]}), "mixtral")
"""

from __future__ import annotations

from .config import AdapterConfig
from .errors import UnsupportedError

__all__ = ["MOE_RENAMED", "check_moe_conversion"]

#: PEFT 0.21 rewrites LoRA configs for transformers 5's fused MoE layers at load
#: (``peft.utils.transformers_weight_conversion``): model types -> the transformers-4 names it moves from
#: ``target_modules`` to ``target_parameters`` (fusing some, with a doubled rank). adapterspec refuses those
#: configs rather than guess the rewrite (SPEC.md 15.1). ``qwen2_moe`` itself is not rewritten (PEFT's
#: ``_MODEL_TO_CONVERSION_PATTERN`` maps other model types to its pattern, not it): its ``gate_proj`` / ``up_proj`` /
#: ``down_proj`` name the shared expert's linear layers, and such a config loads as written.
_MIXTRAL = ("gate", "w1", "w2", "w3")
_QWEN2_MOE = ("gate", "gate_proj", "up_proj", "down_proj")
MOE_RENAMED: dict[str, tuple[str, ...]] = {
    "mixtral": _MIXTRAL, "minimax": _MIXTRAL, "minimax_m2": _MIXTRAL,
    **{t: _QWEN2_MOE for t in (
        "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe_text",
        "afmoe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "ernie4_5_moe", "glm4_moe", "glm4_moe_lite",
        "glm_moe_dsa", "glm4v_moe", "longcat_flash", "solar_open", "mellum", "beam", "hunyuan_v1_moe", "flex_olmo",
        "olmoe", "exaone_moe", "cohere2_moe")},
}


def check_moe_conversion(config: AdapterConfig, model_type: str | None) -> None:
    """Refuse a LoRA config that PEFT 0.21 would rewrite for a transformers-5 MoE model (SPEC.md 15.1).

    On these architectures PEFT turns a string ``target_modules`` (a regex, ``"all-linear"``) into a set of leaf
    names and moves the transformers-4 expert/router names (Mixtral ``w1``/``w2``/``w3``/``gate``, Qwen-MoE
    ``gate_proj``/``up_proj``/``down_proj``/``gate``) to ``target_parameters``, doubling rank and alpha of fused
    pairs: what it then adapts is not what the config says.

    :raises UnsupportedError: naming ``/target_modules`` (or the offending entry).

    >>> cfg = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q_proj", "w1"]})
    >>> check_moe_conversion(cfg, "mixtral")
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: /target_modules/1: ...
    >>> check_moe_conversion(cfg, "llama")
    """
    renamed = MOE_RENAMED.get(model_type or "")
    if config.peft_type != "LORA" or renamed is None:
        return
    targets = config.get("target_modules")
    hint = ("write the adapted expert parameters in target_parameters (as PEFT 0.21 saves them, e.g. "
            "'gate_up_proj', 'down_proj', 'gate.weight') and list only module names in target_modules")
    if isinstance(targets, str):
        raise UnsupportedError(
            f"on a {model_type} model PEFT 0.21 rewrites a string target_modules ({targets!r}) into leaf names and "
            "moves the transformers-4 expert names to target_parameters; adapterspec does not reproduce that rewrite",
            pointer="/target_modules", hint=hint)
    for i, entry in enumerate(targets or []):
        if any(entry == old or entry.endswith("." + old) for old in renamed):
            raise UnsupportedError(
                f"{entry!r} is a transformers-4 MoE name on a {model_type} model: PEFT 0.21 moves it to "
                "target_parameters (fusing gate/up projections with a doubled rank); adapterspec does not reproduce "
                "that rewrite", pointer=f"/target_modules/{i}", hint=hint)
