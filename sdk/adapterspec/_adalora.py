"""AdaLoRA's per-module facts read from its config (SPEC.md 15.4): the stored rank, the scale, the rules.

PEFT's ``AdaLoraModel`` creates every adapted layer with ``init_r`` ranks; rank allocation during training
masks singular values, and at save the kept ones are written (``rank_pattern`` maps
``<module path>.lora_E`` to a list of ``init_r`` booleans: which ranks were kept). On load PEFT resizes the
layers to the kept ranks but keeps ``ranknum = init_r``, so the scale stays ``lora_alpha / (init_r + 1e-5)``.

>>> cfg = {"peft_type": "ADALORA", "init_r": 4, "lora_alpha": 8, "target_modules": ["q"],
...        "rank_pattern": {"l.q.lora_E": [True, False, True, False]}}
>>> stored_rank(cfg, "l.q"), stored_rank(cfg, "l.v"), round(scale(cfg, "l.q"), 6)
(2, 4, 1.999995)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["PEFT_DEFAULT_ALPHA", "PEFT_DEFAULT_INIT_R", "RANKNUM_EPS", "init_r", "rank_pattern_problems", "ranknum",
           "scale", "scaling", "schedule_problems", "stored_rank", "unsupported"]

#: PEFT 0.21's defaults of ``AdaLoraConfig.init_r`` and ``lora_alpha`` (a config without them means these).
PEFT_DEFAULT_INIT_R = 12
PEFT_DEFAULT_ALPHA = 8
#: PEFT divides by ``ranknum + 1e-5``.
RANKNUM_EPS = 1e-5

#: The LoRA fields AdaLoRA inherits that change the computation and that adapterspec readers refuse for it.
_REFUSED: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA (PEFT refuses it for AdaLoRA too)"),
    "lora_bias": (False, "a bias on lora_B (PEFT's AdaLoRA layers ignore lora_bias)"),
    "trainable_token_indices": (None, "trainable tokens"),
    "layer_replication": (None, "layer replication"),
    "target_parameters": (None, "adapting parameters directly (target_parameters)"),
    "use_qalora": (False, "QA-LoRA"),
    "alora_invocation_tokens": (None, "Activated LoRA"),
    "use_bdlora": (None, "block-diagonal LoRA"),
    "arrow_config": (None, "Arrow routing"),
    "kasa_config": (None, "KaSA"),
    "monteclora_config": (None, "MonteCLoRA"),
}


def init_r(config: Mapping[str, Any]) -> int:
    """``init_r`` (PEFT's default 12): every module's rank before allocation, and its ``ranknum``."""
    value = config.get("init_r")
    return PEFT_DEFAULT_INIT_R if value is None else int(value)


def stored_rank(config: Mapping[str, Any], module: str) -> int:
    """The rank ``module``'s tensors are stored with: the kept ranks of ``rank_pattern[<module>.lora_E]``
    (PEFT matches the key exactly), else ``init_r``."""
    pattern = config.get("rank_pattern") or {}
    kept = pattern.get(f"{module}.lora_E") if isinstance(pattern, Mapping) else None
    if isinstance(kept, list):
        return sum(1 for k in kept if k)
    return init_r(config)


def scaling(config: Mapping[str, Any], module: str) -> float:
    """PEFT's ``scaling``: ``lora_alpha``, or the stored rank when ``lora_alpha`` <= 0."""
    alpha = config.get("lora_alpha")
    alpha = PEFT_DEFAULT_ALPHA if alpha is None else alpha
    return float(alpha) if alpha > 0 else float(stored_rank(config, module))


def ranknum(config: Mapping[str, Any], module: str) -> int:
    """PEFT's ``ranknum``: ``init_r`` (kept when a layer is resized to its pruned ranks), 0 when none is left."""
    return init_r(config) if stored_rank(config, module) else 0


def scale(config: Mapping[str, Any], module: str) -> float:
    """``scaling / (ranknum + 1e-5)``, the factor of ``B @ (A * E)`` (0 for a module whose ranks were all pruned)."""
    if stored_rank(config, module) == 0:
        return 0.0
    return scaling(config, module) / (ranknum(config, module) + RANKNUM_EPS)


def rank_pattern_problems(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(pointer, problem, fix)`` for each ``rank_pattern`` entry that is not AdaLoRA's saved form:
    a key ``<module path>.lora_E`` and a list of ``init_r`` booleans with no more kept ranks than ``init_r``."""
    pattern = config.get("rank_pattern")
    if not isinstance(pattern, Mapping):
        return []
    problems = []
    size = init_r(config)
    for key, kept in pattern.items():
        pointer = "/rank_pattern/" + str(key).replace("~", "~0").replace("/", "~1")
        fix = "save the adapter again with PEFT's AdaLoRA (its rank_pattern is written by update_and_allocate)"
        if not str(key).endswith(".lora_E"):
            problems.append((pointer, f"AdaLoRA's rank_pattern keys are '<module path>.lora_E', not {str(key)[:80]!r}",
                             fix))
        elif not isinstance(kept, list) or not all(isinstance(k, bool) for k in kept):
            problems.append((pointer, "AdaLoRA's rank_pattern values are lists of booleans (the kept ranks)", fix))
        elif len(kept) != size:
            problems.append((pointer, f"{len(kept)} booleans, but init_r is {size} (one per initial rank)",
                             f"set init_r to {len(kept)}, or {fix}"))
    return problems


def schedule_problems(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(pointer, problem, fix)`` for a training schedule PEFT's ``AdaLoraConfig`` refuses to load (SPEC.md 15.4):
    ``total_step`` missing or not positive, or no budgeting phase left (``tinit >= total_step - tfinal``).

    The schedule only steers training, but PEFT raises on it when it reads the config, so an adapter with
    it could not be loaded back into PEFT.

    >>> schedule_problems({"total_step": 10, "tinit": 4, "tfinal": 6})[0][1]
    'no budgeting phase: tinit 4 >= total_step 10 - tfinal 6 (PEFT refuses the config)'
    """
    total = _number(config.get("total_step"))
    if total is None or total <= 0:
        return [("/total_step", f"total_step is {config.get('total_step')!r}: PEFT's AdaLoraConfig refuses a config "
                                "without a positive total_step", "set total_step to the number of training steps "
                                "(PEFT writes it)")]
    tinit, tfinal = _number(config.get("tinit") or 0), _number(config.get("tfinal") or 0)
    if tinit is not None and tfinal is not None and tinit >= total - tfinal:
        return [("/tinit", f"no budgeting phase: tinit {config.get('tinit')} >= total_step {config.get('total_step')} "
                           f"- tfinal {config.get('tfinal')} (PEFT refuses the config)",
                 "lower tinit or tfinal, or raise total_step, so that tinit < total_step - tfinal")]
    return []


def _number(value: Any) -> float | None:
    """``value`` as a number, ``None`` for anything else (booleans included; the schema reports their type)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def unsupported(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(pointer, reason)`` for each AdaLoRA variant adapterspec readers refuse (SPEC.md 15.4)."""
    found = []
    if config.get("bias", "none") not in (None, "none"):
        found.append(("/bias", f"AdaLoRA with bias {config.get('bias')!r} (trained base biases) is not supported by "
                               "adapterspec readers"))
    for field, (off, what) in _REFUSED.items():
        value = config.get(field, off)
        if value not in (off, None, False, [], {}):
            found.append((f"/{field}", f"{what} with AdaLoRA is not supported by adapterspec readers"))
    return found
