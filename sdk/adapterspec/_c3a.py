"""C3A, circular convolution adaptation (SPEC.md 17.7): config facts, the kernel's shape and the refusals, one rule
for every backend.

A C3A adapter stores one tensor per adapted Linear layer, ``<module>.c3a_kernel`` ``[out/b, in/b, b]``: ``b`` the
layer's block size (``block_size``, or the first ``block_size_pattern`` key that matches the module as PEFT 0.21.2
matches it). Block ``(i, j)`` of the layer's ``[out, in]`` update is the circulant matrix of ``kernel[i, j]``:
``delta[i*b + p, j*b + q] = kernel[i, j, (q - p) mod b] / in``.

>>> kernel_shape(8, 12, {"peft_type": "C3A", "block_size": 4}, "q")
(3, 2, 4)
>>> unsupported({"peft_type": "C3A", "bias": "all"})[0][0]
'/bias'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import AdapterSpecError, MissingTensorError, ShapeMismatchError, UnsupportedError
from ._regex import compile_pattern
from .naming import make_key
from .targets import regex_problem

if TYPE_CHECKING:
    from .checks import TensorInfo
    from .config import AdapterConfig

__all__ = ["INITS", "METHOD", "PARAM", "PEFT_DEFAULT_BLOCK_SIZE", "block_size_for", "kernel_shape",
           "module_errors", "unsupported"]

#: The method's ``peft_type``.
METHOD = "C3A"
#: The one tensor C3A stores per module.
PARAM = "c3a_kernel"
#: PEFT 0.21's default ``C3AConfig.block_size``.
PEFT_DEFAULT_BLOCK_SIZE = 256
#: The ``init_weights`` values PEFT's ``reset_c3a_parameters`` knows (anything else raises ValueError, at load too).
INITS = (True, False, "gaussian", "kaiming_uniform", "xavier_uniform")


def _pattern(config: Mapping[str, Any]) -> Mapping[str, Any]:
    value = config.get("block_size_pattern")
    return value if isinstance(value, Mapping) else {}


def _matches(key: str, path: str) -> bool:
    """PEFT's ``re.match(rf".*\\.{key}$", path)``: the key spliced in without a group (``q|v`` reads ``.*\\.q`` or
    ``v$``; ``?proj`` and ``*`` compile spliced).

    Matched in linear time (SPEC.md 11.5), as every config pattern: a key is attacker-controlled text.

    :raises UnsupportedError: the spliced pattern does not compile (PEFT's ``re.match`` raises ``re.error`` when a
        module reaches the key) or uses what has no linear-time match (a backreference), naming ``path`` and
        ``/block_size_pattern``.
    """
    pattern = rf".*\.{key}$"
    problem = regex_problem(pattern)
    if problem:
        raise UnsupportedError(f"C3A block_size_pattern key {key!r} is reached by this module and cannot be used once "
                               f"spliced into PEFT's '.*\\.<key>$': {problem} (PEFT 0.21.2 fails to load where "
                               "re.match raises)", key=path, pointer="/block_size_pattern",
                               hint="fix or remove the key (Python re syntax, SPEC.md 4.5)")
    return compile_pattern(pattern).match(path)


def _source(config: Mapping[str, Any], path: str) -> tuple[int, str]:
    """The block size of ``path`` and the field that set it (``/block_size`` or ``/block_size_pattern``); the keys
    are tried lazily in the file's order, as PEFT's ``next(filter(...))`` tries them."""
    pattern = _pattern(config)
    key = next((k for k in pattern if _matches(k, path)), path)
    if key in pattern:
        return int(pattern[key]), "/block_size_pattern"
    value = config.get("block_size", PEFT_DEFAULT_BLOCK_SIZE)
    return (PEFT_DEFAULT_BLOCK_SIZE if value is None else int(value)), "/block_size"


def block_size_for(config: Mapping[str, Any], path: str) -> int:
    """The block size of module ``path`` as PEFT 0.21.2's ``C3AModel._create_and_replace`` picks it: the first
    ``block_size_pattern`` key ``k`` (in the file's order) with ``re.match(rf".*\\.{k}$", path)``; else the entry named
    exactly ``path``; else ``block_size``. A key matches only after a dot (PEFT's pattern), so a key naming the whole
    path from its first character is found by the exact lookup only.

    :raises UnsupportedError: a key this module reaches (no earlier key matched) does not compile spliced: PEFT
        fails the load there, and only there (a bad key after one matching every module never fails).

    >>> cfg = {"block_size": 4, "block_size_pattern": {"v_proj": 2, "model.q": 8}}
    >>> block_size_for(cfg, "layers.0.v_proj"), block_size_for(cfg, "model.q"), block_size_for(cfg, "x.k")
    (2, 8, 4)
    """
    return _source(config, path)[0]


def kernel_shape(in_features: int, out_features: int, config: Mapping[str, Any], path: str) -> tuple[int, int, int]:
    """``c3a_kernel``'s shape ``[out/b, in/b, b]`` on a Linear layer of ``in_features`` -> ``out_features``.

    :raises UnsupportedError: ``b`` is not positive or does not divide both sizes (PEFT 0.21.2 refuses the layer
        too), naming ``path`` and the field that set ``b``.

    >>> kernel_shape(8, 6, {"block_size": 4}, "q")
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: /block_size: ...
    """
    b, pointer = _source(config, path)
    if b <= 0 or in_features % b or out_features % b:
        raise UnsupportedError(f"C3A block size {b} must be positive and divide the layer's {in_features} input and "
                               f"{out_features} output features (PEFT refuses the layer too)", key=path,
                               pointer=pointer, hint="choose a block size dividing both sizes (their greatest common "
                                                     "divisor works), or do not target this layer")
    return (out_features // b, in_features // b, b)


def unsupported(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(pointer, reason)`` for each C3A config adapterspec readers refuse (SPEC.md 17.7): trained base biases.
    A ``block_size_pattern`` key that does not compile is refused per module, where a module reaches it
    (:func:`block_size_for`), as PEFT fails there.

    >>> unsupported({"peft_type": "C3A", "bias": "all"})[0][0]
    '/bias'
    >>> unsupported({"peft_type": "C3A", "block_size": 4, "block_size_pattern": {"q(": 4}})
    []
    """
    if config.get("peft_type") != METHOD:
        return []
    found = []
    if config.get("bias", "none") not in (None, "none"):
        found.append(("/bias", f"C3A with bias {config.get('bias')!r} (trained base biases) is not supported by "
                               "adapterspec readers"))
    return found


def module_errors(config: AdapterConfig, module: str, p: Mapping[str, TensorInfo]) -> list[AdapterSpecError]:
    """SPEC.md 10 checks 9-11 for one C3A module: ``c3a_kernel`` present, 3-D, its last axis the module's block size
    (the base model is not needed; the other two axes are checked against the layer by the readers).

    >>> from adapterspec.checks import TensorInfo
    >>> from adapterspec.config import AdapterConfig
    >>> cfg = AdapterConfig.from_dict({"peft_type": "C3A", "target_modules": ["q"], "block_size": 4})
    >>> [e.key for e in module_errors(cfg, "l.q", {"c3a_kernel": TensorInfo((2, 2, 2), "F32")})]
    ['base_model.model.l.q.c3a_kernel']
    """
    key = make_key(module, PARAM)
    if PARAM not in p:
        return [MissingTensorError("missing (C3A stores c3a_kernel per adapted module)", key=key,
                                   hint="save the adapter again; a complete adapter has this tensor")]
    shape = tuple(p[PARAM].shape)
    try:
        b = block_size_for(config, module)
    except UnsupportedError as exc:  # the module reaches a key that does not compile (PEFT fails there)
        return [exc]
    if len(shape) != 3 or shape[2] != b:
        return [ShapeMismatchError(f"shape {list(shape)}: must be [out/b, in/b, b] with the block size b={b} of this "
                                   "module (block_size, block_size_pattern)", key=key,
                                   hint="set block_size / block_size_pattern to the ones the adapter was trained "
                                        "with, or save it again")]
    return []
