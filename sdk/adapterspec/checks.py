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

from collections import defaultdict
from collections.abc import Mapping
from typing import NamedTuple

from . import _vblora
from ._method_checks import METHOD_CHECKS, shared_errors
from ._rules import not_portable
from .config import AdapterConfig, transformer_submodules
from .errors import (
    AdapterSpecError,
    DTypeMismatchError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnsupportedError,
)
from .naming import BASE_LAYER_BIAS, BASE_LAYER_PARAM, PROMPT_KEY, TensorName, make_key, parse_key
from .targets import is_all_linear, parameter_module, token_indices

__all__ = ["ALLOWED_DTYPES", "BUFFER_DTYPES", "TensorInfo", "tensor_errors"]

#: safetensors dtype names the spec allows for method tensors and floating-point auxiliary tensors.
ALLOWED_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

#: ...and, in addition, for integer or boolean buffers of modules to save (SPEC.md 7.1).
BUFFER_DTYPES = frozenset({"I64", "I32", "I16", "I8", "U8", "BOOL"})


class TensorInfo(NamedTuple):
    """A tensor's shape and safetensors dtype name (``"F32"``, ``"BF16"``...), as read from a header
    (a named tuple: headers have hundreds of them)."""

    shape: tuple[int, ...]
    dtype: str


def tensor_errors(config: AdapterConfig, tensors: Mapping[str, TensorInfo]) -> list[AdapterSpecError]:
    """Every disagreement between ``tensors`` (key -> shape/dtype) and ``config``: checks 8-13, 15 and 16
    of SPEC.md section 10 (those that need neither the tensor data nor the base model).

    Checks: each key parses and is a method tensor or an auxiliary tensor the config accounts for (8),
    with a well-formed module name (15); each dtype is allowed for its role (13); each adapted module
    is targeted by the config and has a complete set of tensors (9) whose ranks equal ``r_m`` (10) and
    whose partner shapes agree (11); ``prompt_embeddings`` has its shape (12); auxiliary tensors have
    theirs (16); at least one method tensor is present.
    """
    for pointer, reason in not_portable(config):  # the spec names no tensor of the method: nothing to check
        return [UnsupportedError(reason, pointer=pointer, hint="load or save it with PEFT itself")]
    errors: list[AdapterSpecError] = []
    modules: dict[str, dict[str, TensorInfo]] = defaultdict(dict)
    auxiliary: list[tuple[TensorName, TensorInfo]] = []
    shared: dict[str, TensorInfo] = {}
    for key, info in tensors.items():
        try:
            name: TensorName | None = parse_key(key, config.peft_type, config)
            problem = None
        except UnexpectedTensorError as exc:
            name, problem = None, exc
        errors.extend(e for e in (_dtype_error(key, name, info), problem) if e is not None)
        if name is not None and name.role == "adapter":
            modules[name.module][name.param] = info
        elif name is not None and name.role == "shared":
            shared[name.param] = info
        elif name is not None and name.role != "prompt":
            auxiliary.append((name, info))
    if config.is_prompt_learning:
        return errors + _prompt_errors(config, tensors)
    errors.extend(_module_errors(config, modules))
    errors.extend(shared_errors(config, shared, modules))
    errors.extend(e for name, info in auxiliary if (e := _auxiliary_error(config, name, info, modules)) is not None)
    if not modules:
        errors.append(MissingTensorError(
            f"the file holds no {config.peft_type} adapter tensor", key=None,
            hint="check the adapter was saved after injection, with PEFT's key names"))
    return errors


def _dtype_error(key: str, name: TensorName | None, info: TensorInfo) -> DTypeMismatchError | None:
    """Check 13 (SPEC.md 7.1): floating point everywhere; integers and booleans only in modules to save."""
    if name is not None and name.role == "adapter" and name.param in _vblora.INDICES:
        return None  # integer top-k indices: their dtype is checked with the module (SPEC.md 17.4)
    buffers = name is not None and name.role in ("modules_to_save", "ignored")
    allowed = ALLOWED_DTYPES | BUFFER_DTYPES if buffers else ALLOWED_DTYPES
    if info.dtype in allowed:
        return None
    return DTypeMismatchError(
        f"dtype {info.dtype} is not allowed for this tensor (allowed: {', '.join(sorted(allowed))})",
        key=key, hint="store the tensor as F32, F16 or BF16")


def _module_errors(config: AdapterConfig, modules: Mapping[str, dict[str, TensorInfo]]) -> list[AdapterSpecError]:
    errors: list[AdapterSpecError] = []
    check = METHOD_CHECKS[config.peft_type]
    for module, params in modules.items():  # no time budget: matching is linear in the path (adapterspec._regex)
        targets = config.get("target_modules")  # null and "all-linear": resolved at load, with the model
        if parameter_module(config, module) is not None and not config.matches(module):
            errors.extend(_parameter_errors(module, params))
            continue
        if config.peft_type == "TRAINABLE_TOKENS" and not config.matches(module):  # a tied layer: the model decides
            errors.extend(check(config, module, params))
            continue
        if config.get("ensure_weight_tying") and set(params) <= {"lora_A.weight", "lora_B.weight"} \
                and not config.matches(module):  # a layer tied to the input embedding (SPEC.md 15.2): the model says
            errors.extend(check(config, module, params))
            continue
        if targets is not None and not is_all_linear(targets) and not config.matches(module):
            for param in params:
                errors.append(UnexpectedTensorError(
                    f"module {module!r} is not targeted by the config (target_modules / exclude_modules / "
                    "layers_to_transform)", key=make_key(module, param),
                    hint="remove the tensor, or add the module to target_modules"))
            continue
        errors.extend(check(config, module, params))
    return errors


def _parameter_errors(module: str, params: Mapping[str, TensorInfo]) -> list[AdapterSpecError]:
    """Checks 9 and 11 for LoRA on a parameter (SPEC.md 15.1): ``lora_A.weight`` [r * experts, in] and
    ``lora_B.weight`` [out, r * experts]; the rank (r and the number of experts) is checked at load, with the model."""
    errors: list[AdapterSpecError] = [
        UnexpectedTensorError(f"LoRA on a parameter (target_parameters) stores lora_A.weight and lora_B.weight only",
                              key=make_key(module, param), hint="remove the tensor")
        for param in params if param not in ("lora_A.weight", "lora_B.weight")]
    a, b = params.get("lora_A.weight"), params.get("lora_B.weight")
    for name, info in (("lora_A.weight", a), ("lora_B.weight", b)):
        if info is None:
            errors.append(MissingTensorError(f"module {module!r} has {', '.join(sorted(params))}; LoRA stores "
                                             "lora_A.weight with lora_B.weight", key=make_key(module, name),
                                             hint="save the adapter again, complete"))
        elif len(info.shape) != 2:
            errors.append(ShapeMismatchError(f"shape {list(info.shape)}: must have 2 axes ([r * experts, in] / "
                                             "[out, r * experts])", key=make_key(module, name),
                                             hint="save A as [r * experts, in] and B as [out, r * experts]"))
    if a is not None and b is not None and len(a.shape) == len(b.shape) == 2 and a.shape[0] != b.shape[1]:
        errors.append(ShapeMismatchError(f"shape {list(b.shape)}: dimension 1 must equal lora_A's {a.shape[0]} rows",
                                         key=make_key(module, "lora_B.weight"),
                                         hint="B is [out, r * experts]; was it saved transposed?"))
    return errors


def _auxiliary_error(config: AdapterConfig, name: TensorName, info: TensorInfo,
                     adapted: Mapping[str, object]) -> AdapterSpecError | None:
    """Checks 8 and 16 for an auxiliary tensor (SPEC.md 5.3): it belongs where it is, and has its shape."""
    shape = list(info.shape)
    if name.param in (BASE_LAYER_PARAM, BASE_LAYER_BIAS) and name.module not in adapted:
        return UnexpectedTensorError(
            f"{name.param} of module {name.module!r}, which has no adapter", key=name.key,
            hint="remove the tensor, or target the module" + (
                f" (the bias of a module without adapter is {make_key(name.module, 'bias')!r}, with bias='all')"
                if name.param == BASE_LAYER_BIAS else ""))
    if name.role == "bias" and name.param == "bias" and name.module in adapted:
        return UnexpectedTensorError(
            f"the bias of the adapted module {name.module!r} is stored as '<module>.{BASE_LAYER_BIAS}'", key=name.key,
            hint=f"rename the tensor to {make_key(name.module, BASE_LAYER_BIAS)!r}")
    if name.role == "bias" and len(shape) != 1:
        return ShapeMismatchError(f"shape {shape}: a bias is 1-D", key=name.key, hint="save the bias as [out]")
    if name.role == "trainable_tokens":
        rows = len(token_indices(config, name.module) or ())
        if len(shape) != 2 or shape[0] != rows:
            return ShapeMismatchError(
                f"shape {shape}: must be [len(trainable_token_indices), dim] = [{rows}, dim]", key=name.key,
                hint="store one row per index of trainable_token_indices, in index order")
    if name.role == "embedding" and name.param == "bias" and len(shape) != 1:
        return ShapeMismatchError(f"shape {shape}: an output layer's bias is 1-D", key=name.key,
                                  hint="save the bias as [vocabulary]")
    if name.role in ("base_layer", "embedding") and name.param != "bias" and len(shape) != 2:
        return ShapeMismatchError(f"shape {shape}: an embedding (or output layer) weight is 2-D", key=name.key,
                                  hint="save the full weight matrix [rows, columns]")
    return None


def _prompt_errors(config: AdapterConfig, tensors: Mapping[str, TensorInfo]) -> list[AdapterSpecError]:
    """Check 12: ``prompt_embeddings`` is present and has the shape of SPEC.md 6.6."""
    info = tensors.get(PROMPT_KEY)
    if info is None:
        return [MissingTensorError(f"{config.peft_type} needs the tensor {PROMPT_KEY!r}", key=PROMPT_KEY,
                                   hint="save the adapter again")]
    if config.peft_type == "PREFIX_TUNING":
        return _prefix_errors(config, info)
    expected = (config["num_virtual_tokens"] * transformer_submodules(config), config.get("token_dim"))
    why = "[num_virtual_tokens * num_transformer_submodules, token_dim]"
    # a size left null is read from the base model at load (SPEC 14.3): here only the rest can be checked
    if len(info.shape) != 2 or any(want is not None and got != want for got, want in zip(info.shape, expected)):
        return [ShapeMismatchError(f"shape {list(info.shape)} disagrees with the config: must be {why} = "
                                   f"{list(expected)}", key=PROMPT_KEY,
                                   hint="fix num_virtual_tokens / num_layers / token_dim in the config")]
    return []


def _prefix_errors(config: AdapterConfig, info: TensorInfo) -> list[AdapterSpecError]:
    """Check 12 for prefix tuning, without the model: ``[num_virtual_tokens, num_layers * 2 * d]``.

    ``d`` is the config's ``token_dim`` only on a model without ``num_key_value_heads``: on the others PEFT 0.21
    recomputes it from the model's key/value heads even when the config gives it (SPEC.md 14.3; PEFT's own
    method_comparison configs give the hidden size of a grouped-query model), so without the model only a
    multiple of ``2 * num_layers`` can be required. The reader checks ``d`` against the model (check 20).
    """
    layers = config.get("num_layers")
    step = None if layers is None else 2 * int(layers)
    if len(info.shape) == 2 and info.shape[0] == config["num_virtual_tokens"] and \
            (step is None or (info.shape[1] > 0 and info.shape[1] % step == 0)):
        return []
    nvt, dim = config["num_virtual_tokens"], config.get("token_dim")
    known = "" if step is None or dim is None else \
        f"; d = token_dim = {dim} gives [{nvt}, {step * int(dim)}], a model with num_key_value_heads sets d itself"
    return [ShapeMismatchError(
        f"shape {list(info.shape)} disagrees with the config: must be [num_virtual_tokens, num_layers * 2 * d] = "
        f"[{nvt}, {layers if layers is not None else 'num_layers'} * 2 * d], d the model's key/value width{known}",
        key=PROMPT_KEY, hint="fix num_virtual_tokens / num_layers / token_dim in the config")]
