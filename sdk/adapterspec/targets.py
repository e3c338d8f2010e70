r"""Which modules an adapter config targets, and with which rank and alpha -- PEFT's rules, exactly.

These functions are the single definition of target matching for every backend (SPEC.md section 4):

* ``target_modules`` as a string is a regular expression that must match the whole module path;
  as a list, an entry matches a module path equal to it or ending in ``"." + entry``;
* ``exclude_modules`` uses the same rules and wins over ``target_modules``;
* modules listed in ``modules_to_save`` (and their children) are never adapted;
* ``layers_to_transform`` (only with a list ``target_modules``) keeps modules whose first numbered
  path segment -- after ``layers_pattern`` when given -- is one of the listed layer indices;
* ``rank_pattern`` / ``alpha_pattern`` keys are regular expressions matched against the end of the
  path (``(.*\\.)?(key)$``); the first key in the mapping's order that matches wins.

>>> cfg = {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]}
>>> module_matches(cfg, "model.layers.1.self_attn.q_proj"), module_matches(cfg, "model.layers.0.self_attn.q_proj")
(True, False)
>>> pattern_value({"layers\\.0\\..*q_proj": 16}, "model.layers.0.self_attn.q_proj", default=8)
16
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["is_feedforward", "is_modules_to_save", "layer_index", "module_matches", "pattern_value"]


def _listed(entries: str | Sequence[str], path: str) -> bool:
    if isinstance(entries, str):
        return re.fullmatch(entries, path) is not None
    return path in entries or any(path.endswith("." + entry) for entry in entries)


def is_modules_to_save(config: Mapping[str, Any], path: str) -> bool:
    """Whether ``path`` is (inside) a module listed in ``modules_to_save``: saved whole, never adapted.

    >>> is_modules_to_save({"modules_to_save": ["score"]}, "score")
    True
    """
    return any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in config.get("modules_to_save") or ())


def layer_index(path: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The layer index PEFT reads from a module path: the first numbered segment (after ``layers_pattern``).

    >>> layer_index("model.layers.12.mlp.experts.3.up_proj")
    12
    """
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match is not None:
                break
    return int(match["idx"]) if match else None


def module_matches(config: Mapping[str, Any], path: str) -> bool:
    """Whether the adapter described by ``config`` adapts the module at ``path``.

    :param config: an adapter config (a dict or :class:`~adapterspec.AdapterConfig`).
    :param path: the module path, e.g. ``"model.layers.0.self_attn.q_proj"``.
    """
    exclude = config.get("exclude_modules")
    if exclude and _listed(exclude, path):
        return False
    if is_modules_to_save(config, path):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    if not _listed(targets, path):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = layer_index(path, config.get("layers_pattern"))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def pattern_value(patterns: Mapping[str, Any] | None, path: str, *, default: Any) -> Any:
    """The value of the first ``rank_pattern``/``alpha_pattern`` key matching the end of ``path``, else ``default``.

    >>> pattern_value({"q_proj": 4}, "model.layers.0.self_attn.q_proj", default=8)
    4
    """
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def is_feedforward(config: Mapping[str, Any], path: str) -> bool:
    """IA3: whether ``path`` is a feed-forward module (its *input* is scaled, not its output).

    PEFT matches list entries by plain suffix here (no ``"."`` boundary), and so does the spec.

    >>> is_feedforward({"feedforward_modules": ["down_proj"]}, "model.layers.0.mlp.down_proj")
    True
    """
    entries = config.get("feedforward_modules") or []
    if isinstance(entries, str):
        return re.fullmatch(entries, path) is not None
    return any(path.endswith(entry) for entry in entries)
