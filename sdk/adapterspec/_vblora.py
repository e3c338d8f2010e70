"""VB-LoRA's config facts, its tensor names and their checks (SPEC.md 17.4).

VB-LoRA stores one vector bank per adapter, shared by every adapted module: ``base_model.vblora_vector_bank``
``[num_vectors, vector_length]`` (naming role ``"shared"``, as VeRA's projections). Each adapted module stores
either its logits over the bank (``save_only_topk_weights`` false): ``vblora_logits_A`` ``[r, in/L, N]`` and
``vblora_logits_B`` ``[out/L, r, N]`` (``L`` = ``vector_length``, ``N`` = ``num_vectors``), or only their top-k
(``save_only_topk_weights`` true): ``<logits>_topk_indices`` ``[..., topk]`` in PEFT's smallest integer dtype for
``N`` and ``<logits>_topk_weights`` ``[..., topk - 1]`` (the softmax of the top-k logits, last one left out).

>>> shared_key("vblora_vector_bank")
'base_model.vblora_vector_bank'
>>> index_dtype(256), index_dtype(255)
('I16', 'U8')
>>> per_module({"save_only_topk_weights": True})[:2]
('vblora_logits_A_topk_indices', 'vblora_logits_A_topk_weights')
>>> unsupported({"peft_type": "VBLORA", "bias": "all"})[0][0]
'/bias'
>>> [e.key for e in topk_weight_errors({"save_only_topk_weights": True}, {"m.vblora_logits_A_topk_weights": [[[0.7, 0.4]]]})]
['m.vblora_logits_A_topk_weights']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ._vera import shared_key
from .errors import (AdapterSpecError, DTypeMismatchError, MissingTensorError, ShapeMismatchError, TensorError,
                     UnexpectedTensorError)
from .spec import PEFT_PREFIX

if TYPE_CHECKING:
    from .checks import TensorInfo

__all__ = ["DEFAULTS", "FULL", "INDICES", "PARAMETERS", "SHARED", "TOPK", "WEIGHTS", "index_dtype", "index_errors",
           "make_key", "module_errors", "per_module", "settings", "shared_errors", "shared_key", "topk_only",
           "topk_weight_errors", "unsupported", "value_errors"]

#: The shared vector bank's parameter name (key ``base_model.vblora_vector_bank``).
SHARED = ("vblora_vector_bank",)
#: Per-module tensors of the full form (``save_only_topk_weights`` false).
FULL = ("vblora_logits_A", "vblora_logits_B")
#: Per-module tensors of the top-k form (``save_only_topk_weights`` true).
TOPK = ("vblora_logits_A_topk_indices", "vblora_logits_A_topk_weights",
        "vblora_logits_B_topk_indices", "vblora_logits_B_topk_weights")
#: The integer tensors (their dtype is checked here, not by the generic float-only check 13).
INDICES = ("vblora_logits_A_topk_indices", "vblora_logits_B_topk_indices")
#: Every per-module parameter name VB-LoRA files use.
PARAMETERS = FULL + TOPK
#: PEFT 0.21.2's ``VBLoRAConfig`` defaults of the fields the math reads.
DEFAULTS = {"r": 4, "num_vectors": 256, "vector_length": 256, "topk": 2}


def settings(config: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """``(r, num_vectors, vector_length, topk)`` with PEFT's defaults for null or absent fields."""
    def get(field: str) -> int:
        value = config.get(field)
        return DEFAULTS[field] if value is None else int(value)
    return get("r"), get("num_vectors"), get("vector_length"), get("topk")


def topk_only(config: Mapping[str, Any]) -> bool:
    """``save_only_topk_weights`` (PEFT's truth test: null is false)."""
    return bool(config.get("save_only_topk_weights"))


def per_module(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The parameter names each adapted module stores, for the config's ``save_only_topk_weights``."""
    return TOPK if topk_only(config) else FULL


def index_dtype(num_vectors: int) -> str:
    """The safetensors dtype PEFT 0.21.2 stores top-k indices in: the smallest of U8/I16/I32/I64 for ``num_vectors``
    (``_get_adapter_state_dict``: ``< 2**8`` uint8, ``< 2**15`` int16, ``< 2**31`` int32, else int64)."""
    if num_vectors < 2**8:
        return "U8"
    if num_vectors < 2**15:
        return "I16"
    if num_vectors < 2**31:
        return "I32"
    return "I64"


def unsupported(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(pointer, reason)`` for each VB-LoRA config adapterspec readers refuse (SPEC.md 17.4)."""
    found = []
    if config.get("bias", "none") not in (None, "none"):
        found.append(("/bias", f"VB-LoRA with bias {config.get('bias')!r} (trained base biases) is not supported by "
                               "adapterspec readers"))
    r, num_vectors, vector_length, topk = settings(config)
    for field, value in (("r", r), ("num_vectors", num_vectors), ("vector_length", vector_length), ("topk", topk)):
        if value <= 0:
            found.append((f"/{field}", f"VB-LoRA's {field} must be a positive integer, not {value} (PEFT refuses it)"))
    if 0 < num_vectors < topk:
        found.append(("/topk", f"topk {topk} is more than num_vectors {num_vectors}: the top-k of the logits over "
                               "the bank is undefined (PEFT's forward fails)"))
    return found


def make_key(module: str, param: str) -> str:
    """``base_model.model.<module>.<param>`` (:func:`adapterspec.naming.make_key`, without importing it: naming
    imports this module)."""
    return f"{PEFT_PREFIX}{module}.{param}"


def _shape(key: str, info: TensorInfo, message: str, hint: str) -> ShapeMismatchError:
    return ShapeMismatchError(f"shape {list(info.shape)}: {message}", key=key, hint=hint)


def module_errors(config: Mapping[str, Any], module: str, p: Mapping[str, TensorInfo]) -> list[AdapterSpecError]:
    """Check 9-11 of one module: the form's tensors present and the other form's absent, ``[r, in/L, N]`` /
    ``[out/L, r, N]`` logits or ``[..., topk]`` indices (PEFT's integer dtype) with ``[..., topk - 1]`` weights."""
    r, num_vectors, _, topk = settings(config)
    wanted = per_module(config)
    hint = "save the adapter again with PEFT (SPEC.md 17.4)"
    flag = "true" if topk_only(config) else "false"
    errors: list[AdapterSpecError] = [
        UnexpectedTensorError(f"save_only_topk_weights is {flag}: PEFT stores {', '.join(wanted)} per module, "
                              "not this tensor", key=make_key(module, n),
                              hint=f"set save_only_topk_weights to {'false' if flag == 'true' else 'true'}, or "
                                   "save the adapter again with PEFT")
        for n in sorted(p) if n not in wanted]
    errors += [MissingTensorError(f"missing (VB-LoRA with save_only_topk_weights {flag} stores {', '.join(wanted)} "
                                  "per adapted module)", key=make_key(module, n), hint=hint)
               for n in wanted if n not in p]
    if errors:
        return errors
    if not topk_only(config):
        for name, rank_axis in (("vblora_logits_A", 0), ("vblora_logits_B", 1)):
            info = p[name]
            if len(info.shape) != 3:
                errors.append(_shape(make_key(module, name), info, "must have 3 axes", hint))
            elif info.shape[rank_axis] != r:
                errors.append(ShapeMismatchError(f"rank {info.shape[rank_axis]} (axis {rank_axis}) disagrees with the "
                                                 f"config's r={r} for module {module!r}", key=make_key(module, name),
                                                 hint=f"set r to {info.shape[rank_axis]}, or {hint}"))
            elif info.shape[2] != num_vectors:
                errors.append(_shape(make_key(module, name), info, f"axis 2 must be num_vectors={num_vectors} (one "
                                     "logit per vector of the bank)", f"set num_vectors to {info.shape[2]}, or {hint}"))
        return errors
    wanted_dtype = index_dtype(num_vectors)
    for logits, rank_axis in (("vblora_logits_A", 0), ("vblora_logits_B", 1)):
        indices, weights = p[logits + "_topk_indices"], p[logits + "_topk_weights"]
        i_key, w_key = make_key(module, logits + "_topk_indices"), make_key(module, logits + "_topk_weights")
        if indices.dtype != wanted_dtype:
            errors.append(DTypeMismatchError(f"dtype {indices.dtype}: PEFT stores the top-k indices of "
                                             f"num_vectors={num_vectors} vectors as {wanted_dtype}", key=i_key,
                                             hint=f"store the indices as {wanted_dtype}, or save the adapter again "
                                                  "with PEFT"))
        if weights.dtype != "F32":
            errors.append(DTypeMismatchError(f"dtype {weights.dtype}: the top-k weights must be F32 (PEFT 0.21.2's "
                                             "loader scatters them into a float32 matrix and fails on any other "
                                             "dtype)", key=w_key, hint="store the top-k weights as F32"))
        if len(indices.shape) != 3 or indices.shape[2] != topk:
            errors.append(_shape(i_key, indices, f"must be [{'r, in/L' if rank_axis == 0 else 'out/L, r'}, topk] "
                                 f"with topk={topk}", f"set topk to the last axis, or {hint}"))
        elif indices.shape[rank_axis] != r:
            errors.append(ShapeMismatchError(f"rank {indices.shape[rank_axis]} (axis {rank_axis}) disagrees with the "
                                             f"config's r={r} for module {module!r}", key=i_key,
                                             hint=f"set r to {indices.shape[rank_axis]}, or {hint}"))
        elif tuple(weights.shape) != (*indices.shape[:2], topk - 1):
            errors.append(_shape(w_key, weights, f"must be [{indices.shape[0]}, {indices.shape[1]}, {topk - 1}]: the "
                                 "indices' first two axes and topk - 1 weights (the last is 1 minus their sum)", hint))
    return errors


def shared_errors(config: Mapping[str, Any], shared: Mapping[str, TensorInfo]) -> list[AdapterSpecError]:
    """The vector bank: present, ``[num_vectors, vector_length]``, floating point."""
    _, num_vectors, vector_length, _ = settings(config)
    info = shared.get("vblora_vector_bank")
    key = shared_key("vblora_vector_bank")
    if info is None:
        return [MissingTensorError("missing (VB-LoRA stores its vector bank once per adapter)", key=key,
                                   hint="save the adapter again with PEFT (SPEC.md 17.4)")]
    if tuple(info.shape) != (num_vectors, vector_length):
        return [_shape(key, info, f"must be [num_vectors, vector_length] = [{num_vectors}, {vector_length}]",
                       "set num_vectors and vector_length to the bank's shape, or save the adapter again")]
    return []


def index_errors(config: Mapping[str, Any], arrays: Mapping[str, Any],
                 path: str | None = None) -> list[AdapterSpecError]:
    """The values of the top-k indices (SPEC.md 17.4): each in ``[0, num_vectors)`` and distinct within its row,
    as PEFT's ``topk`` gives them -- a row of one index repeated is the exception: PEFT's loader keeps one of its
    weights, whose softmax alone is 1, and the stored weights sum to 1, so every mix is that one vector. ``arrays``: key -> array (anything :func:`numpy.asarray` reads); keys of other
    tensors are skipped, and nothing is checked for the logits form.

    Out of range, PEFT's loader fails (``scatter``'s index error) and a backend would fail at the first forward or
    (a gather that clamps) compute another mix silently; a repeated index in a row makes PEFT's ``scatter`` keep
    one of the repeated weights, which one unspecified by torch, where a mix of the stored weights counts each.

    :returns: one :class:`~adapterspec.errors.TensorError` per tensor, naming its key.
    """
    if not topk_only(config):
        return []
    num_vectors = settings(config)[1]
    errors: list[AdapterSpecError] = []
    for key in sorted(arrays):
        if key.rpartition(".")[2] not in INDICES:
            continue
        values = np.asarray(arrays[key])
        if values.size == 0:
            continue
        bad = values[(values < 0) | (values >= num_vectors)]
        if bad.size:
            errors.append(TensorError(
                f"holds top-k index {int(bad.flat[0])}, outside [0, num_vectors={num_vectors}) ({bad.size} such "
                "value(s)): it names no vector of the bank (PEFT's loader fails on it)", key=key, path=path,
                hint="store indices of the bank's vectors (0 to num_vectors - 1), or save the adapter again with "
                     "PEFT"))
            continue
        if values.ndim == 0:  # a shape check 10 refuses (validation reports every error together)
            continue
        ordered = np.sort(values.reshape(-1, values.shape[-1]), axis=-1)
        repeated = ordered[:, 1:] == ordered[:, :-1]
        mixed = repeated.any(axis=1) & (ordered[:, 0] != ordered[:, -1])  # a repeat beside another index
        if mixed.any():
            row = ordered[mixed][0]
            errors.append(TensorError(
                f"repeats a top-k index beside another in a row ({row.tolist()} sorted): PEFT's topk gives distinct "
                "indices, and its loader's scatter keeps one of the repeated weights (which one, torch leaves "
                "unspecified), so the mix differs from the stored weights'", key=key, path=path,
                hint="store distinct indices in each row, or save the adapter again with PEFT"))
    return errors


#: The top-k weights' parameter names (their values are checked by :func:`topk_weight_errors`).
WEIGHTS = ("vblora_logits_A_topk_weights", "vblora_logits_B_topk_weights")


def topk_weight_errors(config: Mapping[str, Any], arrays: Mapping[str, Any],
                       path: str | None = None) -> list[AdapterSpecError]:
    """The values of the top-k weights (SPEC.md 17.4): none negative, and per row a sum of at most 1.

    PEFT's loader rebuilds the last weight as ``1 - sum`` and takes ``log`` of every weight in float32: a negative
    weight or a sum above 1 gives ``log`` of a negative number, NaN in every output. A sum of exactly 1 (a last
    weight of 0, ``log`` -inf) is valid: that vector contributes nothing. The sum is taken in float32, as PEFT's.
    ``arrays``: key -> array (anything :func:`numpy.asarray` reads); other keys are skipped, and nothing is checked
    for the logits form.

    :returns: one :class:`~adapterspec.errors.TensorError` per tensor, naming its key.
    """
    if not topk_only(config):
        return []
    errors: list[AdapterSpecError] = []
    for key in sorted(arrays):
        if key.rpartition(".")[2] not in WEIGHTS:
            continue
        values = np.asarray(arrays[key], dtype=np.float32)
        if values.size == 0 or values.ndim == 0:  # a 0-d tensor: a shape check 10 refuses
            continue
        last = np.float32(1) - values.sum(axis=-1, dtype=np.float32)
        if (values < 0).any():
            problem = f"holds a negative top-k weight ({float(values[values < 0].flat[0])})"
        elif (last < 0).any():
            problem = f"holds top-k weights whose sum is {float(1 - last[last < 0].flat[0])}, above 1"
        else:
            continue
        errors.append(TensorError(
            f"{problem}: PEFT's loader takes log(w) of the weights and of 1 minus their sum, and computes NaN",
            key=key, path=path, hint="store the softmax of the top-k logits (each row of weights sums to at most "
                                     "1), or save the adapter again with PEFT"))
    return errors


def value_errors(config: Mapping[str, Any], arrays: Mapping[str, Any], path: str | None = None) -> list[AdapterSpecError]:
    """Every value of the top-k tensors the spec constrains (SPEC.md 17.4): the indices (:func:`index_errors`) and the
    weights (:func:`topk_weight_errors`); the one check validation and both backends' loads run."""
    return [*index_errors(config, arrays, path), *topk_weight_errors(config, arrays, path)]
