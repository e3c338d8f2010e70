"""The framework-free part of ``ensure_weight_tying`` (SPEC.md 15.2): PEFT 0.21's rewrite of the config.

Both backends (:mod:`adapterspec_torch.tying`, :mod:`adapterspec_keras.tying`) find the model's tied layers
themselves and rewrite the config with :func:`tie_rewrite`.

>>> is_tied("base.lm_head", ["lm_head"])
True
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .config import AdapterConfig

__all__ = ["EMBEDDING_LAYER_NAMES", "is_tied", "tie_rewrite"]

#: PEFT's ``EMBEDDING_LAYER_NAMES``: a ``target_modules`` / ``modules_to_save`` entry ending in one of these
#: (last segment) asks for the embedding to be adapted.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _last(entry: str) -> str:
    return entry.rpartition(".")[2]


def tie_rewrite(config: AdapterConfig, embedding: str | None, tied: Sequence[str]) -> tuple[AdapterConfig, str | None]:
    """PEFT 0.21's rewrite of a LoRA config with ``ensure_weight_tying`` (``BaseTuner._check_tied_modules``):
    ``(config, "modules_to_save")`` when an entry of ``modules_to_save`` names an embedding (it wins),
    ``(config, "targets")`` when ``target_modules`` does, else ``(config, None)``. The input embedding is added to
    the field and the first entry matching each tied layer removed; a config PEFT saved is returned unchanged.

    >>> cfg = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["lm_head", "q"],
    ...                                "ensure_weight_tying": True})
    >>> new, mode = tie_rewrite(cfg, "model.embed_tokens", ["lm_head"])
    >>> new["target_modules"], mode
    (['q', 'model.embed_tokens'], 'targets')
    """
    if config.peft_type != "LORA" or not config.get("ensure_weight_tying") or embedding is None or not tied:
        return config, None
    saved = list(config.get("modules_to_save") or [])
    targets = config.get("target_modules")
    if any(_last(m) in EMBEDDING_LAYER_NAMES for m in saved):
        return config.replace(modules_to_save=_rewritten(saved, embedding, tied)), "modules_to_save"
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, name) for name in EMBEDDING_LAYER_NAMES):
            return config, None
        return config.replace(target_modules=rf"(?:{targets}|^{re.escape(embedding)}$)"), "targets"
    if not any(_last(m) in EMBEDDING_LAYER_NAMES for m in targets or []):
        return config, None
    return config.replace(target_modules=_rewritten(list(targets or []), embedding, tied)), "targets"


def _rewritten(entries: list[str], embedding: str, tied: Sequence[str]) -> list[str]:
    out = list(dict.fromkeys(entries))
    if embedding not in out:
        out.append(embedding)
    for key in tied:
        for entry in out:
            if re.match(rf"(^|.*\.){entry}($|\..*)", key):
                out.remove(entry)
                break
    return out


def is_tied(path: str, tied: Sequence[str]) -> bool:
    """PEFT's ``_check_tied_module_exists``: ``path`` is a tied layer or ends with ``.`` + one."""
    return any(path == key or path.endswith("." + key) for key in tied)
