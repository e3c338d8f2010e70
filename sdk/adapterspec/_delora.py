"""DeLoRA, decoupled low-rank adaptation (SPEC.md 17.6): config facts, tensor shapes and the refusals, one rule for
every backend.

A DeLoRA adapter stores four tensors per adapted Linear: ``delora_A`` ``[r, in]``, ``delora_B`` ``[out, r]``,
``delora_lambda`` ``[1]`` (the trained bound) and ``delora_w_norm`` ``[in]`` (the column norms of the base weight
when the adapter was made: a PEFT buffer, saved, never trained). ``r`` is ``rank_pattern``'s or ``r``. The layer adds

    ``((x * w_norm) @ A.T * (lambda / r) / (|A_i| |B^i|)) @ B.T``

(``|A_i|`` the norm of row ``i`` of ``A``, ``|B^i|`` of column ``i`` of ``B``, each clamped to at least ``1e-4``).

>>> param_shapes(8, 4, 2)
{'delora_A': (2, 8), 'delora_B': (4, 2), 'delora_lambda': (1,), 'delora_w_norm': (8,)}
>>> unsupported({"peft_type": "DELORA", "bias": "all"})[0][0]
'/bias'
>>> lambda_for({"delora_lambda": 15, "lambda_pattern": {"q_proj": 3}}, "model.layers.0.q_proj")
3.0
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._regex import compile_pattern
from .errors import AdapterSpecError, MissingTensorError, ShapeMismatchError, UnsupportedError
from .naming import make_key
from .targets import PatternTable, regex_problem

if TYPE_CHECKING:
    from .checks import TensorInfo

__all__ = ["CLAMP", "FROZEN", "METHOD", "PARAMETERS", "PEFT_DEFAULT_LAMBDA", "PEFT_DEFAULT_R", "lambda_for",
           "module_errors", "param_shapes", "rank_for", "unsupported"]

#: The method's ``peft_type``.
METHOD = "DELORA"
#: The tensors DeLoRA stores per adapted module, in PEFT's order.
PARAMETERS = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
#: The tensors PEFT never trains: ``delora_w_norm`` is a buffer (not counted among the trainable parameters).
FROZEN = frozenset({"delora_w_norm"})
#: PEFT 0.21's defaults of ``DeloraConfig.r`` and ``delora_lambda``.
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_LAMBDA = 15
#: The floor PEFT clamps the row norms of ``A`` and the column norms of ``B`` to.
CLAMP = 1e-4


def _pointer(field: str, key: Any) -> str:
    return f"/{field}/" + str(key).replace("~", "~0").replace("/", "~1")


def _patterns(config: Mapping[str, Any], field: str) -> Mapping[str, Any]:
    value = config.get(field)
    return value if isinstance(value, Mapping) else {}


def rank_for(config: Mapping[str, Any], path: str) -> int:
    """The rank of module ``path``: ``rank_pattern``'s first matching key (PEFT's ``get_pattern_key``), else ``r``.

    :raises UnsupportedError: the value this module takes from ``rank_pattern`` is below 1 (PEFT's ``update_layer``
        refuses it there, and only there: a key no module reaches loads), naming ``path`` and
        ``/rank_pattern/<key>``.

    >>> rank_for({"r": 4, "rank_pattern": {"v_proj": 2, "nothing": 0}}, "model.layers.0.v_proj")
    2
    >>> rank_for({"r": 4, "rank_pattern": {"v_proj": 0}}, "model.layers.0.v_proj")
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: /rank_pattern/v_proj: ...
    """
    patterns = _patterns(config, "rank_pattern")
    index = PatternTable(patterns).index(path)
    if index is None:
        r = config.get("r")
        return PEFT_DEFAULT_R if r is None else int(r)
    key = list(patterns)[index]
    value = patterns[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UnsupportedError(f"DeLoRA rank_pattern value {value!r} for module {path!r}: PEFT's layers refuse it (a "
                               "positive integer rank)", key=path, pointer=_pointer("rank_pattern", key),
                               hint="give the module a rank of at least 1, or do not target it")
    return value


def _lambda_key(config: Mapping[str, Any], path: str) -> str | None:
    """The first ``lambda_pattern`` key (file order) with ``re.match(rf"(.*\\.)?({key})$", path)``, tried lazily as
    PEFT's ``get_pattern_key`` tries them: a key after the one that matched is never compiled (PEFT compiles
    ``rank_pattern``/``alpha_pattern`` keys for every targeted module, ``lambda_pattern``'s only here)."""
    for key in _patterns(config, "lambda_pattern"):
        pattern = rf"(.*\.)?({key})$"
        problem = regex_problem(pattern)
        if problem:
            raise UnsupportedError(f"DeLoRA lambda_pattern key {key!r} is reached by module {path!r} and cannot be "
                                   f"used: {problem} (PEFT 0.21.2 fails to load where re.match raises)", key=path,
                                   pointer=_pointer("lambda_pattern", key),
                                   hint="fix or remove the key (Python re syntax, SPEC.md 4.5)")
        if compile_pattern(pattern).match(path):
            return key
    return None


def lambda_for(config: Mapping[str, Any], path: str) -> float:
    """The starting ``delora_lambda`` of a *new* adapter's module ``path``: ``lambda_pattern``'s first matching key,
    else ``delora_lambda``. A loaded adapter's bound is its stored ``delora_lambda`` tensor, never this.

    :raises UnsupportedError: a key this module reaches (no earlier key matched) is not a usable regular expression,
        naming ``path`` and ``/lambda_pattern/<key>`` (PEFT fails the load there, and only there).

    >>> lambda_for({"lambda_pattern": {"q|v": 1, "(": 3}}, "model.v")
    1.0
    """
    key = _lambda_key(config, path)
    if key is not None:
        return float(_patterns(config, "lambda_pattern")[key])
    value = config.get("delora_lambda")
    return float(PEFT_DEFAULT_LAMBDA if value is None else value)


def param_shapes(in_features: int, out_features: int, r: int) -> dict[str, tuple[int, ...]]:
    """The spec parameter names and shapes (PEFT's layout) on a Linear of ``in_features -> out_features``."""
    return {"delora_A": (int(r), int(in_features)), "delora_B": (int(out_features), int(r)), "delora_lambda": (1,),
            "delora_w_norm": (int(in_features),)}


def unsupported(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(pointer, reason)`` for each DeLoRA variant adapterspec readers refuse (SPEC.md 17.6).

    >>> unsupported({"peft_type": "DELORA", "r": 0})[0]
    ('/r', 'DeLoRA with r=0: PEFT refuses it (r must be a positive integer)')
    >>> unsupported({"peft_type": "DELORA", "rank_pattern": {"q": -1}})  # refused where a module takes it: rank_for
    []
    >>> unsupported({"peft_type": "DELORA", "r": 4})
    []
    """
    if config.get("peft_type") != METHOD:
        return []
    found = []
    r = config.get("r", PEFT_DEFAULT_R)
    if isinstance(r, int) and not isinstance(r, bool) and r <= 0:
        found.append(("/r", f"DeLoRA with r={r}: PEFT refuses it (r must be a positive integer)"))
    lambdas = config.get("lambda_pattern")
    for key, value in (lambdas.items() if isinstance(lambdas, Mapping) else ()):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            pointer = "/lambda_pattern/" + str(key).replace("~", "~0").replace("/", "~1")
            found.append((pointer, f"DeLoRA lambda_pattern value {value!r}: PEFT fills delora_lambda with "
                                   "float(value), a number"))
    if config.get("bias", "none") not in (None, "none"):
        found.append(("/bias", f"DeLoRA with bias {config.get('bias')!r} (trained base biases) is not supported by "
                               "adapterspec readers"))
    return found


def _shape(module: str, param: str, info: TensorInfo, message: str) -> ShapeMismatchError:
    return ShapeMismatchError(f"shape {list(info.shape)}: {message}", key=make_key(module, param),
                              hint="save the adapter again with PEFT (SPEC.md 17.6)")


def module_errors(config: Mapping[str, Any], module: str, p: Mapping[str, TensorInfo]) -> list[AdapterSpecError]:
    """Checks 9-11 for one module: the four tensors present, ``A`` ``[r, in]`` with ``r`` the config's rank of the
    module, ``B`` ``[out, r]``, ``delora_lambda`` ``[1]``, ``delora_w_norm`` ``[in]``."""
    missing = [n for n in PARAMETERS if n not in p]
    if missing:
        return [MissingTensorError(f"missing (module {module!r} has {', '.join(sorted(p)) or 'nothing'}; DeLoRA "
                                   "stores delora_A, delora_B, delora_lambda and delora_w_norm per module)",
                                   key=make_key(module, name), hint="save the adapter again; a complete DeLoRA "
                                                                    "adapter has the four tensors")
                for name in missing]
    a, b, lam, norm = (p[n] for n in PARAMETERS)
    errors: list[AdapterSpecError] = []
    if len(a.shape) != 2:
        errors.append(_shape(module, "delora_A", a, "must have 2 axes [r, in_features]"))
    if len(b.shape) != 2:
        errors.append(_shape(module, "delora_B", b, "must have 2 axes [out_features, r]"))
    if tuple(lam.shape) != (1,):
        errors.append(_shape(module, "delora_lambda", lam, "must be [1] (one bound per module)"))
    if errors:
        return errors
    try:
        r = rank_for(config, module)
        lambda_for(config, module)  # PEFT matches lambda_pattern at every load (a reached bad key fails there)
    except UnsupportedError as exc:
        return [exc]
    if a.shape[0] != r:
        source = "rank_pattern" if PatternTable(_patterns(config, "rank_pattern")).index(module) is not None else "r"
        errors.append(ShapeMismatchError(f"rank {a.shape[0]} disagrees with the config's {source}={r} for module "
                                         f"{module!r}", key=make_key(module, "delora_A"),
                                         hint=f"set {source} to {a.shape[0]} for this module, or save the adapter "
                                              "again"))
    if b.shape[1] != a.shape[0]:
        errors.append(_shape(module, "delora_B", b, f"dimension 1 must equal delora_A's rank {a.shape[0]} (B is "
                                                    "[out, r]; was it saved transposed?)"))
    if tuple(norm.shape) != (a.shape[1],):
        errors.append(_shape(module, "delora_w_norm", norm, f"must be [in_features] = [{a.shape[1]}] as delora_A's "
                                                            "axis 1 (one norm per input column)"))
    return errors
