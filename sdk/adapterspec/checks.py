"""Check an adapter's tensors against its config, from shapes and dtypes alone (SPEC.md section 10).

Nothing here reads tensor data: the safetensors header is enough, so validating a multi-gigabyte
adapter is as fast as validating a tiny one. Every problem is reported, not just the first.

>>> from adapterspec.config import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q"], "r": 4})
>>> infos = {"base_model.model.l.0.q.lora_A.weight": TensorInfo((8, 16), "F32"),
...          "base_model.model.l.0.q.lora_B.weight": TensorInfo((32, 8), "F32")}
>>> [str(e) for e in tensor_errors(cfg, infos)][0]
"base_model.model.l.0.q.lora_A.weight: rank 8 disagrees with the config's r=4 for module 'l.0.q' (fix: ...)"
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from .config import AdapterConfig
from .errors import (
    AdapterSpecError,
    DTypeMismatchError,
    MissingTensorError,
    ShapeMismatchError,
    TensorError,
    UnexpectedTensorError,
)
from .naming import PROMPT_KEY, TensorName, make_key, parse_key

__all__ = ["ALLOWED_DTYPES", "TensorInfo", "tensor_errors"]

#: Seconds :func:`tensor_errors` may spend matching module paths against the config's regular
#: expressions before it gives up (a hostile file: many long keys and a slow pattern).
MATCH_BUDGET_S = 30.0

#: safetensors dtype names the spec allows for adapter tensors.
ALLOWED_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's shape and safetensors dtype name (``"F32"``, ``"BF16"``...), as read from a header."""

    shape: tuple[int, ...]
    dtype: str


def tensor_errors(config: AdapterConfig, tensors: Mapping[str, TensorInfo]) -> list[AdapterSpecError]:
    """Every disagreement between ``tensors`` (key -> shape/dtype) and ``config``.

    Checks: each key follows the naming convention of the method; each dtype is allowed; each adapted
    module has all its tensors (A with B, DoRA's magnitude); ranks equal the config's (``r`` or
    ``rank_pattern``); partner shapes agree; adapted modules are targeted by the config; at least one
    adapter tensor is present.
    """
    errors: list[AdapterSpecError] = []
    modules: dict[str, dict[str, TensorInfo]] = defaultdict(dict)
    names: dict[str, TensorName] = {}
    for key, info in tensors.items():
        if info.dtype not in ALLOWED_DTYPES:
            errors.append(DTypeMismatchError(
                f"dtype {info.dtype} is not allowed for adapter tensors (allowed: {', '.join(sorted(ALLOWED_DTYPES))})",
                key=key, hint="store the tensor as F32, F16 or BF16"))
        try:
            name = parse_key(key, config.peft_type, config)
        except UnexpectedTensorError as exc:
            errors.append(exc)
            continue
        names[key] = name
        if name.role == "adapter":
            modules[name.module][name.param] = info
    if config.is_prompt_learning:
        errors.extend(_prompt_errors(config, tensors))
        return errors
    check = _CHECKS[config.peft_type]
    give_up = time.monotonic() + MATCH_BUDGET_S
    for module, params in modules.items():
        if time.monotonic() > give_up:  # only hostile files get here: a few thousand modules take milliseconds
            errors.append(TensorError(
                f"matching {len(modules)} modules against the config's patterns took over {MATCH_BUDGET_S:.0f} s",
                key=make_key(module, next(iter(params))),
                hint="use simpler regular expressions in the config (or a list of module names)"))
            break
        if not config.matches(module):
            for param in params:
                errors.append(UnexpectedTensorError(
                    f"module {module!r} is not targeted by the config (target_modules / exclude_modules / "
                    "layers_to_transform)", key=make_key(module, param),
                    hint="remove the tensor, or add the module to target_modules"))
            continue
        errors.extend(check(config, module, params))
    for key, name in names.items():
        if name.role == "base_layer" and name.module not in modules:
            errors.append(UnexpectedTensorError(
                f"a base-layer weight for module {name.module!r}, which has no adapter", key=key,
                hint="remove the tensor, or target the module"))
    if not modules:
        errors.append(MissingTensorError(
            f"the file holds no {config.peft_type} adapter tensor", key=None,
            hint="check the adapter was saved after injection, with PEFT's key names"))
    return errors


def _missing(module: str, param: str, why: str) -> MissingTensorError:
    return MissingTensorError(f"missing ({why})", key=make_key(module, param),
                              hint="save the adapter again; a complete adapter has this tensor")


def _shape(module: str, param: str, info: TensorInfo, message: str, hint: str) -> ShapeMismatchError:
    return ShapeMismatchError(f"shape {list(info.shape)}: {message}", key=make_key(module, param), hint=hint)


def _rank_error(config: AdapterConfig, module: str, param: str, info: TensorInfo, rank: int) -> ShapeMismatchError:
    expected = config.rank_for(module)
    source = "rank_pattern" if expected != config["r"] else "r"
    return ShapeMismatchError(
        f"rank {rank} disagrees with the config's {source}={expected} for module {module!r}",
        key=make_key(module, param), hint=f"set {source} to {rank} for this module, or save the adapter again")


def _lora(config: AdapterConfig, module: str, p: dict[str, TensorInfo]) -> list[AdapterSpecError]:
    errors: list[AdapterSpecError] = []
    r = config.rank_for(module)
    embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
    a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    for name in (a_name, b_name):
        if name not in p:
            errors.append(_missing(module, name, f"module {module!r} has {a_name if name == b_name else b_name}"))
    if errors:
        return errors
    a, b = p[a_name], p[b_name]
    if len(a.shape) < 2 or len(b.shape) < 2:
        return [_shape(module, a_name if len(a.shape) < 2 else b_name, a if len(a.shape) < 2 else b,
                       "LoRA factors have at least 2 dimensions", "save A as [r, in] and B as [out, r]")]
    if a.shape[0] != r:
        errors.append(_rank_error(config, module, a_name, a, a.shape[0]))
    if b.shape[1] != a.shape[0]:
        errors.append(_shape(module, b_name, b, f"dimension 1 must equal lora_A's rank {a.shape[0]}",
                             "B is [out, r]; was it saved transposed?"))
    if len(b.shape) > 2 and any(d != 1 for d in b.shape[2:]):
        errors.append(_shape(module, b_name, b, "a conv lora_B has kernel size 1", "save B as [out, r, 1, 1]"))
    out = b.shape[0]
    if "lora_B.bias" in p:
        if not config.get("lora_bias"):
            errors.append(UnexpectedTensorError("lora_B.bias without lora_bias=true in the config",
                                                key=make_key(module, "lora_B.bias"), hint="set lora_bias to true"))
        elif p["lora_B.bias"].shape != (out,):
            errors.append(_shape(module, "lora_B.bias", p["lora_B.bias"], f"must be [{out}]", "save the bias as [out]"))
    elif config.get("lora_bias") and not embedding:
        errors.append(_missing(module, "lora_B.bias", "the config sets lora_bias=true"))
    magnitude = p.get("lora_magnitude_vector")
    if magnitude is not None:
        if not config.get("use_dora"):
            errors.append(UnexpectedTensorError("DoRA magnitude without use_dora=true in the config",
                                                key=make_key(module, "lora_magnitude_vector"),
                                                hint="set use_dora to true, or remove the tensor"))
        else:
            size = 1
            for d in magnitude.shape:
                size *= d
            if size != out:
                errors.append(_shape(module, "lora_magnitude_vector", magnitude,
                                     f"must hold one value per output feature ({out})", "save it as [out]"))
    elif config.get("use_dora"):
        errors.append(_missing(module, "lora_magnitude_vector", "the config sets use_dora=true"))
    return errors


def _ia3(config: AdapterConfig, module: str, p: dict[str, TensorInfo]) -> list[AdapterSpecError]:
    info = p["ia3_l"]
    feedforward = config.is_feedforward(module)
    # conv layers (PEFT): [1, channels, 1, 1(, 1)] -- in-channels if feed-forward, else out-channels
    conv = len(info.shape) >= 3 and info.shape[0] == 1 and all(d == 1 for d in info.shape[2:])
    ok = conv or (len(info.shape) >= 2 and (info.shape[0] == 1 if feedforward else info.shape[1] == 1))
    if ok:
        return []
    want = "[1, in] (feed-forward: scales the input)" if feedforward else "[out, 1] (scales the output)"
    return [_shape(module, "ia3_l", info, f"must be {want}",
                   "fix feedforward_modules in the config, or save the vector in that layout")]


def _pair(config: AdapterConfig, module: str, p: dict[str, TensorInfo], a: str, b: str,
          cp: bool = False) -> list[AdapterSpecError]:
    # cp: the effective-conv (CP) form of SPEC 6.4/6.5, where a is [r, out] and b is [r, in]
    if a not in p or b not in p:
        return [_missing(module, b if a in p else a, f"module {module!r} has {a if a in p else b}")]
    for name in (a, b):
        if len(p[name].shape) < 2:
            return [_shape(module, name, p[name], "LoHa/LoKr factors have at least 2 dimensions",
                           f"save {a} and {b} as matrices")]
    errors: list[AdapterSpecError] = []
    rank = p[a].shape[0] if cp else p[a].shape[-1]
    if rank != p[b].shape[0]:
        errors.append(_shape(module, b, p[b], f"dimension 0 must equal {a}'s rank dimension {rank}",
                             f"{a} is [r, out] and {b} is [r, in] (effective conv form)" if cp
                             else f"{a} is [out, r] and {b} is [r, in]"))
    if config.peft_type == "LOHA" and rank != config.rank_for(module):
        errors.append(_rank_error(config, module, a, p[a], rank))
    return errors


def _loha(config: AdapterConfig, module: str, p: dict[str, TensorInfo]) -> list[AdapterSpecError]:
    cp = "hada_t1" in p
    return _pair(config, module, p, "hada_w1_a", "hada_w1_b", cp) + _pair(config, module, p, "hada_w2_a", "hada_w2_b", cp)


def _lokr(config: AdapterConfig, module: str, p: dict[str, TensorInfo]) -> list[AdapterSpecError]:
    errors: list[AdapterSpecError] = []
    for w in ("lokr_w1", "lokr_w2"):
        if w in p:
            continue
        if f"{w}_a" in p or f"{w}_b" in p:
            errors.extend(_pair(config, module, p, f"{w}_a", f"{w}_b", cp=w == "lokr_w2" and "lokr_t2" in p))
        else:
            errors.append(_missing(module, w, f"LoKr needs {w} or {w}_a with {w}_b"))
    return errors


_CHECKS = {"LORA": _lora, "IA3": _ia3, "LOHA": _loha, "LOKR": _lokr}


def _prompt_errors(config: AdapterConfig, tensors: Mapping[str, TensorInfo]) -> list[AdapterSpecError]:
    info = tensors.get(PROMPT_KEY)
    if info is None:
        return [MissingTensorError(f"{config.peft_type} needs the tensor {PROMPT_KEY!r}", key=PROMPT_KEY,
                                   hint="save the adapter again")]
    nvt = config["num_virtual_tokens"] * (config.get("num_transformer_submodules") or 1)
    if config.peft_type == "PREFIX_TUNING":
        width = (config.get("num_layers") or 0) * 2 * (config.get("token_dim") or 0)
        expected = (config["num_virtual_tokens"], width)
        why = "[num_virtual_tokens, num_layers * 2 * token_dim]"
    else:
        expected = (nvt, config.get("token_dim") or 0)
        why = "[num_virtual_tokens * num_transformer_submodules, token_dim]"
    if tuple(info.shape) != expected:
        return [ShapeMismatchError(f"shape {list(info.shape)} disagrees with the config: must be {why} = "
                                   f"{list(expected)}", key=PROMPT_KEY,
                                   hint="fix num_virtual_tokens / num_layers / token_dim in the config")]
    return []
