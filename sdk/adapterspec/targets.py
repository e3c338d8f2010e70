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
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

from ._regex import Pattern, UnsupportedPattern, compile_pattern
from .errors import ConfigError, UnsupportedError

__all__ = [
    "PatternTable",
    "Targeting",
    "containers",
    "refuse_containers",
    "is_all_linear",
    "is_feedforward",
    "is_modules_to_save",
    "layer_index",
    "module_matches",
    "parameter_module",
    "pattern_value",
    "regex_problem",
    "regex_problems",
    "token_indices",
]

# Every regular expression of a config runs on adapterspec._regex (linear in the module path, whatever
# the pattern); re runs only the default layer pattern below and a layers_pattern that is a plain name,
# where it cannot backtrack (each start position costs at most the name's length plus its digits).
_DEFAULT_LAYER = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")
_METACHARACTERS = frozenset(".^$*+?{}[]\\|()")


def _suffix_listed(entries: Collection[str], path: str) -> bool:
    """``path`` equals an entry or ends with ``"." + entry``: one set lookup per ``.`` of the path."""
    if path in entries:
        return True
    dot = path.find(".")
    while dot >= 0:
        if path[dot + 1:] in entries:
            return True
        dot = path.find(".", dot + 1)
    return False


def _selector(value: Any) -> Pattern | frozenset[str] | None:
    """``target_modules`` / ``exclude_modules`` compiled: a pattern (string), a set (list), or ``None``."""
    if value is None:
        return None
    if isinstance(value, str):
        return compile_pattern(value)
    return frozenset(value)


def _selects(selector: Pattern | frozenset[str], path: str) -> bool:
    if isinstance(selector, Pattern):
        return selector.fullmatch(path)
    return _suffix_listed(selector, path)


def is_all_linear(targets: Any) -> bool:
    """Whether ``target_modules`` is PEFT's shorthand ``"all-linear"`` (any case; SPEC.md 4.3): not a regular
    expression, but every Linear / GPT-2 Conv1D module of the model except its output layer -- resolved by a
    backend, which sees the model.

    >>> is_all_linear("ALL-linear"), is_all_linear(["all-linear"])
    (True, False)
    """
    return isinstance(targets, str) and targets.lower() == ALL_LINEAR


#: PEFT's ``INCLUDE_LINEAR_LAYERS_SHORTHAND``.
ALL_LINEAR = "all-linear"


def is_modules_to_save(config: Mapping[str, Any], path: str) -> bool:
    """Whether ``path`` is a module saved whole (``modules_to_save``), or inside one: the path or one of its
    ``.``-separated prefixes ends with an entry, as a plain string suffix (PEFT's ``_set_trainable`` rule,
    SPEC.md 4.3: ``norm`` saves ``model.layers.0.input_layernorm``). Which modules never get an adapter is
    the other, ``.``-aligned rule of :class:`Targeting` (step 2).

    >>> is_modules_to_save({"modules_to_save": ["norm"]}, "model.layers.0.input_layernorm")
    True
    >>> is_modules_to_save({"modules_to_save": ["score"]}, "score.dense"), is_modules_to_save({"modules_to_save": ["score"]}, "scores")
    (True, False)
    """
    entries = tuple(m for m in config.get("modules_to_save") or () if isinstance(m, str) and m)
    if not entries:
        return False
    parts = path.split(".")
    return any(".".join(parts[:k]).endswith(entries) for k in range(len(parts), 0, -1))


def layer_index(path: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The layer index PEFT reads from a module path: the first numbered segment (after ``layers_pattern``).

    >>> layer_index("model.layers.12.mlp.experts.3.up_proj")
    12
    """
    if not layers_pattern:
        match = _DEFAULT_LAYER.match(path)
        return int(match["idx"]) if match else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        wrapped = rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."
        if _METACHARACTERS.isdisjoint(pattern):  # a plain name ("layers"): re is linear on it, and fast
            match = re.match(wrapped, path)
            span = match.span("idx") if match else None
        else:
            span = compile_pattern(wrapped, "idx").match_span(path)
        if span is not None:  # the first pattern that matches decides, as in PEFT
            # ("h|layers" spliced in unbracketed can match without the index: PEFT's int(None) raises; none here)
            return int(path[span[0]:span[1]]) if span[0] >= 0 else None
    return None


def _index(value: Any) -> bool:
    """A JSON layer index: an integer (``3.0`` is JSON's 3), not a boolean."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Targeting:
    """:func:`module_matches` for one config, prepared once: lists become sets, patterns are compiled.

    A config with 20,000 ``target_modules`` entries answers for a module in one set lookup per ``.`` of
    its path (a list scan made 30k modules x 20k entries quadratic).

    >>> Targeting({"target_modules": ["q_proj"], "exclude_modules": ["vision.q_proj"]}).matches("vision.q_proj")
    False
    """

    __slots__ = ("exclude", "layers", "layers_pattern", "save", "targets")

    def __init__(self, config: Mapping[str, Any]) -> None:
        exclude = config.get("exclude_modules")
        self.exclude = _selector(exclude) if exclude else None  # null, "" and [] exclude nothing
        self.targets = _selector(config.get("target_modules"))
        self.save = tuple(compile_pattern(rf"(^|.*\.){m}($|\..*)") for m in config.get("modules_to_save") or ())
        layers = config.get("layers_to_transform")
        if not (layers is None or _index(layers) or isinstance(layers, list) and all(_index(i) for i in layers)):
            # called on a raw dict (module_matches), a malformed value is refused, not crashed on
            raise ConfigError(f"layers_to_transform={layers!r}: must be a layer index or a list of layer indices",
                              pointer="/layers_to_transform", hint="e.g. [0, 1] or 3")
        # JSON's 3.0 is the integer 3 (float and int compare and hash alike)
        self.layers: frozenset[float] | None = None if layers is None or layers == [] else \
            frozenset([layers] if isinstance(layers, (int, float)) else layers)
        self.layers_pattern = config.get("layers_pattern")

    def matches(self, path: str) -> bool:
        """Whether the module at ``path`` gets an adapter (SPEC.md 4.3)."""
        if self.exclude is not None and _selects(self.exclude, path):
            return False
        if any(pattern.match(path) for pattern in self.save):
            return False
        targets = self.targets
        if targets is None:
            return False
        if isinstance(targets, Pattern):
            return targets.fullmatch(path)
        if path in targets:  # an exact entry: layers_to_transform does not apply (PEFT, SPEC 4.3 step 4)
            return True
        if not _suffix_listed(targets, path):
            return False
        if self.layers is None:
            return True
        return layer_index(path, self.layers_pattern) in self.layers


def module_matches(config: Mapping[str, Any], path: str) -> bool:
    """Whether the adapter described by ``config`` adapts the module at ``path``.

    For many paths, prepare the config once with :class:`Targeting` (as :class:`~adapterspec.AdapterConfig` does).

    :param config: an adapter config (a dict or :class:`~adapterspec.AdapterConfig`).
    :param path: the module path, e.g. ``"model.layers.0.self_attn.q_proj"``.
    """
    return Targeting(config).matches(path)


def containers(paths: Iterable[str]) -> list[str]:
    """The module paths that hold the modules at ``paths`` without being one of them, in first-seen order.

    PEFT matches ``target_modules`` against every module of the model, containers too, and refuses a
    container it selects (no method adapts a module that only holds others: a regex like ``.*attn.*`` that
    also selects ``self_attn``). A backend or model description that knows only the adaptable layers finds
    the containers here, to refuse the same configs.

    >>> containers(["model.layers.0.q_proj", "model.layers.0.v_proj", "lm_head"])
    ['model', 'model.layers', 'model.layers.0']
    """
    known = paths if isinstance(paths, Collection) else list(paths)
    layers = set(known)
    found: dict[str, None] = {}
    for path in known:
        at = path.find(".")
        while at != -1:
            prefix = path[:at]
            if prefix not in layers:
                found.setdefault(prefix)
            at = path.find(".", at + 1)
    return list(found)


def refuse_containers(matches: Callable[[str], bool], paths: Iterable[str], method: str) -> None:
    """Refuse an adapter whose targeting (``matches``, e.g. :meth:`AdapterConfig.matches
    <adapterspec.AdapterConfig.matches>`) selects one of the :func:`containers` of ``paths``.

    :raises UnsupportedError: naming the first such module.

    >>> refuse_containers(lambda p: p.endswith("attn"), ["layers.0.attn.q"], "LORA")
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: /target_modules: target_modules selects 'layers.0.attn', a module that ... (fix: ...)
    """
    for path in containers(paths):
        if matches(path):
            raise UnsupportedError(f"target_modules selects {path!r}, a module that holds other modules, not a layer "
                                   f"{method} adapts (PEFT refuses it too)", key=path, pointer="/target_modules",
                                   hint="narrow target_modules (or add exclude_modules) so that it selects layers only")


def _simple_key(key: str) -> tuple[tuple[int, ...], str] | None:
    """A ``rank_pattern`` key made of literal characters and ``.`` only: (positions of its ``.``, the key
    with NUL there); ``None`` for any other pattern."""
    if any(c in _METACHARACTERS and c != "." for c in key):
        return None
    return tuple(i for i, c in enumerate(key) if c == "."), key.replace(".", "\0")


class PatternTable:
    r"""``rank_pattern``/``alpha_pattern`` prepared once (SPEC.md 4.4): the first key in order matching the end
    of a path, found without trying every key.

    Keys of literal characters and ``.`` (``q_proj``, ``model.layers.0.self_attn.q_proj``: most of them)
    are looked up by the path's end, in one dictionary per key length and ``.`` layout; other keys are
    matched in order, each by the linear-time matcher, and only until a better (earlier) key is known.

    >>> PatternTable({"q_proj": 4, r"layers\.0\..*": 2}).value("model.layers.0.self_attn.q_proj", default=8)
    4
    """

    __slots__ = ("_lookup", "_patterns", "_values")

    def __init__(self, patterns: Mapping[str, Any] | None) -> None:
        items = list((patterns or {}).items())
        self._values = [value for _, value in items]
        self._lookup: dict[tuple[int, tuple[int, ...]], dict[str, int]] = {}
        self._patterns: list[tuple[int, Pattern]] = []
        for index, (key, _) in enumerate(items):
            simple = _simple_key(key)
            if simple is None:
                self._patterns.append((index, compile_pattern(rf"(.*\.)?({key})$")))
            else:
                self._lookup.setdefault((len(key), simple[0]), {}).setdefault(simple[1], index)

    def index(self, path: str) -> int | None:
        r"""The position of the first key matching ``path`` (``re.match(rf"(.*\.)?({key})$", path)``), or ``None``."""
        if not self._values:  # no pattern (the common case: no rank_pattern / alpha_pattern)
            return None
        best: int | None = None
        ends = (len(path), len(path) - 1) if path.endswith("\n") else (len(path),)  # '$' matches before a final \n
        for (length, dots), keys in self._lookup.items():
            for end in ends:
                start = end - length
                # (.*\.)? : the key starts the path, or follows a '.' with no newline before it ('.' is not \n)
                if start < 0 or (start and (path[start - 1] != "." or "\n" in path[:start - 1])):
                    continue
                window = path[start:end]
                if dots:
                    if any(window[i] == "\n" for i in dots):
                        continue
                    chars = list(window)
                    for i in dots:
                        chars[i] = "\0"
                    window = "".join(chars)
                found = keys.get(window)
                if found is not None and (best is None or found < best):
                    best = found
        for index, pattern in self._patterns:
            if best is not None and index > best:
                break
            if pattern.match(path):
                return index
        return best

    def value(self, path: str, *, default: Any) -> Any:
        """The value of the first key matching ``path``, else ``default``."""
        index = self.index(path)
        return default if index is None else self._values[index]


def parameter_module(config: Mapping[str, Any], module: str) -> tuple[str, int] | None:
    """For a tensor's module path: (the module whose parameter it adapts, its nesting depth) when
    ``target_parameters`` can select a parameter of that module (SPEC.md 15.1), else ``None``.

    PEFT nests one wrapper per targeted parameter of a module, so the path may end in ``.base_layer`` (one per
    level); an entry ``<suffix>.<parameter>`` selects the modules whose path ends with ``<suffix>``, an entry
    without a dot any module. Only the model says which parameters exist: readers check that at load.

    >>> parameter_module({"peft_type": "LORA", "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]},
    ...                  "model.layers.0.mlp.experts.base_layer")
    ('model.layers.0.mlp.experts', 1)
    >>> parameter_module({"peft_type": "LORA", "target_parameters": ["gate.weight"]}, "layers.0.q_proj") is None
    True
    """
    entries = config.get("target_parameters") if config.get("peft_type") == "LORA" else None
    if not entries or not isinstance(entries, list):
        return None
    depth = 0
    while module.endswith(".base_layer"):
        module, depth = module[: -len(".base_layer")], depth + 1
    if depth >= len(entries) and depth > 0:
        return None
    for entry in entries:
        owner = str(entry).rpartition(".")[0]
        if not owner or module == owner or module.endswith("." + owner):
            return module, depth
    return None


def pattern_value(patterns: Mapping[str, Any] | None, path: str, *, default: Any) -> Any:
    """The value of the first ``rank_pattern``/``alpha_pattern`` key matching the end of ``path``, else ``default``.

    For many paths, prepare the mapping once with :class:`PatternTable`.

    >>> pattern_value({"q_proj": 4}, "model.layers.0.self_attn.q_proj", default=8)
    4
    """
    return PatternTable(patterns).value(path, default=default)


def is_feedforward(config: Mapping[str, Any], path: str) -> bool:
    """IA3: whether ``path`` is a feed-forward module (its *input* is scaled, not its output).

    PEFT matches list entries by plain suffix here (no ``"."`` boundary), and so does the spec.

    >>> is_feedforward({"feedforward_modules": ["down_proj"]}, "model.layers.0.mlp.down_proj")
    True
    """
    entries = config.get("feedforward_modules") or []
    if isinstance(entries, str):
        return compile_pattern(entries).fullmatch(path)
    return path.endswith(tuple(entries))


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
    """(JSON pointer, pattern as used) of every regular expression ``config`` holds, but those made of
    literal characters and ``.`` (most ``rank_pattern`` keys: module names), which compile wherever spliced."""
    for name, wrapper in _REGEX_FIELDS:
        value = config.get(name)
        if name in ("target_modules", "exclude_modules", "feedforward_modules"):
            values = [("", value)] if isinstance(value, str) else []  # lists match by plain suffix
        elif isinstance(value, str):
            values = [("", value)]
        elif isinstance(value, Mapping):  # rank_pattern / alpha_pattern: the keys are patterns (lambda_pattern: lazy, _delora)
            values = [("/" + k.replace("~", "~0").replace("/", "~1"), k) for k in value if isinstance(k, str)]
        elif isinstance(value, Sequence):
            values = [(f"/{i}", v) for i, v in enumerate(value) if isinstance(v, str)]
        else:
            values = []
        for sub, pattern in values:
            if any(c in _METACHARACTERS and c != "." for c in pattern):  # else valid wherever it is spliced
                yield f"/{name}{sub}", wrapper.replace("{}", pattern)


def regex_problems(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(JSON pointer, problem) for each regular expression in ``config`` that cannot be used.

    A pattern is refused when it does not compile under Python's ``re`` (``re.error`` would surface in
    the middle of matching), or when it uses what adapterspec's linear-time matcher cannot run
    (backreferences, conditional groups, atomic groups, possessive repeats) or compiles too large
    (:mod:`adapterspec._regex`). Every other pattern -- ``(a+)+b`` included -- is matched in time
    linear in the module path, so none is refused for being slow (SPEC.md 11.5).

    >>> regex_problems({"target_modules": ".*(q|v)_proj"})
    []
    >>> regex_problems({"target_modules": "(q_proj"})[0][0]
    '/target_modules'
    """
    problems = []
    for pointer, pattern in _regexes(config):
        problem = regex_problem(pattern)
        if problem:
            problems.append((pointer, problem))
    return problems


def regex_problem(pattern: str) -> str | None:
    r"""Why ``pattern`` cannot be used, or ``None`` if it can.

    >>> regex_problem(r"(a)\1")
    'a backreference cannot be matched in linear time (adapterspec matches config patterns in linear time, SPEC.md 11.5)'
    """
    try:
        compile_pattern(pattern)
    except UnsupportedPattern as exc:
        return f"{exc} (adapterspec matches config patterns in linear time, SPEC.md 11.5)"
    except (re.error, RecursionError, OverflowError, ValueError, MemoryError) as exc:
        return f"not a valid regular expression: {exc}"
    return None
