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
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = [
    "is_feedforward",
    "is_modules_to_save",
    "layer_index",
    "module_matches",
    "pattern_value",
    "regex_problem",
    "regex_problems",
    "token_indices",
]


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


def token_indices(config: Mapping[str, Any], path: str) -> list[int] | None:
    """LoRA ``trainable_token_indices``: the token rows re-trained in the embedding at ``path``, or ``None``.

    An array applies to the input embedding (whatever its path: only the model knows it); an object
    maps module names to arrays, matched by plain suffix (PEFT's ``_set_trainable`` rule, first key wins).

    >>> token_indices({"trainable_token_indices": {"embed_tokens": [1, 5]}}, "model.embed_tokens")
    [1, 5]
    """
    indices = config.get("trainable_token_indices")
    if indices is None or isinstance(indices, list):
        return indices
    return next((rows for name, rows in indices.items() if path.endswith(name)), None)


# -- regular expressions from untrusted configs -------------------------------------------
# Every field above that PEFT treats as a regular expression, and the exact pattern it is used in.
_REGEX_FIELDS: tuple[tuple[str, str], ...] = (
    ("target_modules", "{}"),
    ("exclude_modules", "{}"),
    ("feedforward_modules", "{}"),
    ("modules_to_save", r"(^|.*\.){}($|\..*)"),
    ("layers_pattern", r"(?:^|.*?\.){}\.(?P<idx>\d+)\."),
    ("rank_pattern", r"(.*\.)?({})$"),
    ("alpha_pattern", r"(.*\.)?({})$"),
)


def _regexes(config: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(JSON pointer, pattern as used) of every regular expression ``config`` holds."""
    for name, wrapper in _REGEX_FIELDS:
        value = config.get(name)
        if name in ("target_modules", "exclude_modules", "feedforward_modules"):
            values = [("", value)] if isinstance(value, str) else []  # lists match by plain suffix
        elif isinstance(value, str):
            values = [("", value)]
        elif isinstance(value, Mapping):  # rank_pattern / alpha_pattern: the keys are patterns
            values = [("/" + k.replace("~", "~0").replace("/", "~1"), k) for k in value if isinstance(k, str)]
        elif isinstance(value, Sequence):
            values = [(f"/{i}", v) for i, v in enumerate(value) if isinstance(v, str)]
        else:
            values = []
        for sub, pattern in values:
            yield f"/{name}{sub}", wrapper.replace("{}", pattern)


def regex_problems(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(JSON pointer, problem) for each regular expression in ``config`` that cannot be used safely.

    A pattern is refused when it does not compile (``re.error`` would surface in the middle of
    matching), when it can backtrack exponentially -- a repeat of something that can itself match
    in a variable number of ways (``(a+)+``, ``(\\w+\\.)*``, ``(a|ab)*``), the classic regex bomb --, or
    when it holds more than :data:`MAX_WILDCARDS` unbounded wildcards (``.*``, ``\\w+``, ``[^.]*``): matching
    time grows as the path length to the power of their number. The check is structural and
    conservative; module paths are also bounded in length (:data:`~adapterspec.naming.MAX_KEY_LENGTH`).

    >>> regex_problems({"target_modules": ".*(q|v)_proj"})
    []
    >>> regex_problems({"target_modules": "(a+)+b"})[0][0]
    '/target_modules'
    """
    problems = []
    for pointer, pattern in _regexes(config):
        problem = regex_problem(pattern)
        if problem:
            problems.append((pointer, problem))
    return problems


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be used on untrusted input, or ``None`` if it can.

    >>> regex_problem("(.*)*x")
    'a repeat inside a repeat can backtrack exponentially (a regex bomb)'
    """
    try:
        parsed = _sre_parse.parse(pattern)
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError, MemoryError) as exc:
        return f"not a valid regular expression: {exc}"
    wildcards = _wildcards(list(parsed.data))
    if wildcards > MAX_WILDCARDS:
        return (f"{wildcards} unbounded wildcards (more than {MAX_WILDCARDS}): matching time grows as the "
                f"path length to the power of their number")
    return _risk(list(parsed.data), inside=False)


#: The most unbounded wildcard repeats (``.*``, ``\w+``, ``[^x]*``) a pattern may hold, wrapper included.
MAX_WILDCARDS = 3

if sys.version_info >= (3, 11):  # the parser behind re, to inspect a pattern's structure
    from re import _constants as _sre  # type: ignore[attr-defined]  # typeshed has no stubs for re's private modules
    from re import _parser as _sre_parse  # type: ignore[attr-defined]  # (sre_* below, 3.10's, have them)
else:  # Python 3.10
    import sre_constants as _sre
    import sre_parse as _sre_parse

_BACKTRACKING_REPEATS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT)  # possessive repeats never backtrack


def _risk(items: list[Any], *, inside: bool) -> str | None:
    """A reason ``items`` can backtrack exponentially; ``inside``: within a repeat that iterates."""
    for op, av in items:
        if op in _BACKTRACKING_REPEATS:
            low, high, body = av
            if inside and low != high:
                return "a repeat inside a repeat can backtrack exponentially (a regex bomb)"
            iterating = high > 1
            if iterating and _ambiguous(list(body)):
                return "a repeated alternation whose branches can start alike backtracks exponentially"
            found = _risk(list(body), inside=inside or iterating)
        elif op is _sre.SUBPATTERN:
            found = _risk(list(av[-1]), inside=inside)
        elif op is _sre.BRANCH:
            found = next((r for alt in av[1] if (r := _risk(list(alt), inside=inside))), None)
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            found = _risk(list(av[1]), inside=inside)
        elif op is _sre.GROUPREF_EXISTS:
            found = next((r for alt in av[1:] if alt and (r := _risk(list(alt), inside=inside))), None)
        else:  # literals, sets, anchors, atomic groups (which never backtrack into themselves)
            found = None
        if found:
            return found
    return None


def _wildcards(items: list[Any]) -> int:
    """How many unbounded repeats of broad character classes ``items`` holds, at any depth."""
    count = 0
    for op, av in items:
        if op in _BACKTRACKING_REPEATS:
            body = list(av[2])
            broad = len(body) == 1 and _first(body) is None
            count += int(broad and av[1] == _sre.MAXREPEAT) + _wildcards(body)
        elif op is _sre.SUBPATTERN:
            count += _wildcards(list(av[-1]))
        elif op is _sre.BRANCH:
            count += max((_wildcards(list(alt)) for alt in av[1]), default=0)
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            count += _wildcards(list(av[1]))
    return count


def _ambiguous(items: list[Any]) -> bool:
    """Whether ``items`` holds (at its top, or in its groups) an alternation whose branches may start with the same character."""
    for op, av in items:
        if op is _sre.SUBPATTERN and _ambiguous(list(av[-1])):
            return True
        if op is _sre.BRANCH:
            seen: set[int] = set()
            for alt in av[1]:
                first = _first(list(alt))
                if first is None or first & seen:
                    return True
                seen |= first
    return False


def _first(items: list[Any]) -> set[int] | None:
    """The characters a match of ``items`` can start with; ``None``: any, or it can match empty."""
    for op, av in items:
        if op is _sre.AT:  # anchors consume nothing
            continue
        if op is _sre.LITERAL:
            return {av}
        if op is _sre.IN:
            chars: set[int] = set()
            for kind, value in av:
                if kind is _sre.LITERAL:
                    chars.add(value)
                elif kind is _sre.RANGE and value[1] - value[0] < 256:
                    chars.update(range(value[0], value[1] + 1))
                else:  # negated sets, categories (\w, \d...), big ranges
                    return None
            return chars
        if op is _sre.SUBPATTERN:
            return _first(list(av[-1]))
        if op in _BACKTRACKING_REPEATS and av[0] >= 1:
            return _first(list(av[2]))
        if op is _sre.BRANCH:
            union: set[int] = set()
            for alt in av[1]:
                first = _first(list(alt))
                if first is None:
                    return None
                union |= first
            return union
        return None
    return None
