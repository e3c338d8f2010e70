"""The spec's tensor-naming convention (SPEC.md section 5).

A key is ``"base_model.model." + module path + "." + parameter name``; the adapter's name never
appears in it. Prefix and prompt tuning store one un-prefixed key, ``prompt_embeddings``.

>>> name = parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "LORA")
>>> name.module, name.param, name.role
('model.layers.0.self_attn.q_proj', 'lora_A.weight', 'adapter')
>>> make_key("model.layers.0.self_attn.q_proj", "lora_B.weight")
'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight'
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from typing import Any, Literal, NamedTuple

from ._foreign import key_error
from . import _gralora, _vblora
from ._vera import SHARED, shared_key
from .errors import UnexpectedTensorError
from .spec import PEFT_PREFIX
from .targets import is_modules_to_save, token_indices

__all__ = [
    "embedding_error",
    "BASE_LAYER_BIAS",
    "BASE_LAYER_PARAM",
    "EMBEDDING_NAMES",
    "EMBEDDING_PARAMS",
    "MAX_KEY_LENGTH",
    "PARAMETERS",
    "SHARED_PARAMETERS",
    "PROMPT_KEY",
    "PROMPT_METHODS",
    "PROMPT_MODULE_PREFIX",
    "TRAINABLE_TOKENS_PARAM",
    "VELORA_GROUPS",
    "VELORA_STATE",
    "TensorName",
    "make_key",
    "parse_key",
]

#: The adapter parameters each method stores per module, as they appear at the end of a key.
PARAMETERS: Mapping[str, tuple[str, ...]] = {
    "LORA": (
        "lora_A.weight", "lora_B.weight", "lora_B.bias",
        "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
        "lora_velora_embed",  # VELORA_STATE
    ),
    "IA3": ("ia3_l",),
    "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "LOKR": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "OFT": ("oft_R.weight",),
    "BOFT": ("boft_R", "boft_s"),
    "ADALORA": ("lora_A", "lora_B", "lora_E"),
    "VERA": ("vera_lambda_b", "vera_lambda_d"),
    "MISS": ("miss_block",),  # SPEC.md 17.2
    "VBLORA": _vblora.PARAMETERS,
    "TRAINABLE_TOKENS": ("trainable_tokens_delta",),
    "LN_TUNING": ("ln_tuning_layers.weight", "ln_tuning_layers.bias"),
    "ROAD": ("road_theta", "road_alpha"),
    "HRA": ("hra_u",),  # SPEC.md 17.3
    "GRALORA": _gralora.PARAMETERS,  # SPEC.md 17.5
    "C3A": ("c3a_kernel",),  # SPEC.md 17.7
    "DELORA": ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"),  # SPEC.md 17.6 (_delora.PARAMETERS)
    "BEFT": ("beft_bias",),  # SPEC.md 17.8 (_beft.PARAMETERS)
    "PREFIX_TUNING": (),
    "PROMPT_TUNING": (),
    "P_TUNING": (),
}

#: The tensors a method stores once for all modules (SPEC.md 15.5), keyed ``base_model.<name>`` (role "shared").
SHARED_PARAMETERS: Mapping[str, tuple[str, ...]] = {
    "VERA": SHARED,
    "VBLORA": _vblora.SHARED,
}

#: The single key of prefix and prompt tuning.
PROMPT_KEY = "prompt_embeddings"

#: The methods that add virtual tokens (SPEC.md 6.6, 15.8): one tensor, :data:`PROMPT_KEY`.
PROMPT_METHODS = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")

#: The key prefix of a module saved whole next to virtual tokens (PEFT's ``PeftModel.base_model`` is the
#: transformers model itself there, not a tuner around it): ``base_model.<module path>.<param>`` (SPEC.md 15.9).
PROMPT_MODULE_PREFIX = "base_model."

#: PEFT saves the full weight of an adapted embedding (resized vocabulary) under this parameter name.
BASE_LAYER_PARAM = "base_layer.weight"

#: VeLoRA's training-time state of a LoRA module (``velora_config``): readers accept it, never use it in the math,
#: and keep it to save again (SPEC.md 5.2).
VELORA_STATE = "lora_velora_embed"

#: ``velora_config.num_groups`` when the object leaves it out (PEFT's ``VeloraConfig``).
VELORA_GROUPS = 64

#: The trained bias of a targeted module (``bias`` = ``"lora_only"`` or ``"all"``), SPEC.md 5.3.
BASE_LAYER_BIAS = "base_layer.bias"

#: The rows of ``trainable_token_indices`` of an embedding, ``[len(indices), dim]`` (they replace those rows).
TRAINABLE_TOKENS_PARAM = "token_adapter.trainable_tokens_delta"

#: The last name segments of transformers' input and output embeddings (``get_input_embeddings()`` /
#: ``get_output_embeddings()`` of its text models; PEFT's ``EMBEDDING_LAYER_NAMES`` first). Without a model,
#: ``<m>.weight`` / ``<m>.bias`` of a module so named is an embedding saved whole (SPEC.md 5.4 step 4); with a
#: model, exactly the model's own input and output embedding modules are (the backend checks them).
EMBEDDING_NAMES = (
    "embed_tokens",
    "lm_head",
    "wte",  # GPT-2, GPT-J, GPT-Neo, CodeGen
    "word_embeddings",  # BERT family, BLOOM, Falcon
    "shared",  # T5, BART
    "embed_in",  # GPT-NeoX input
    "embed_out",  # GPT-NeoX output
    "tok_embeddings",  # InternLM2
    "decoder",  # BERT family masked-LM head (cls.predictions.decoder)
)

#: The parameters PEFT's ``save_embedding_layers`` saves of an embedding (an output layer's bias too: BERT).
EMBEDDING_PARAMS = ("weight", "bias")

#: PEFT's wrapper infixes saved next to a module to save (``bias="all"``); accepted and ignored.
_BOOKKEEPING = (".original_module.", ".modules_to_save.")

#: The longest key accepted. Real keys are under 200 characters; the bound keeps the regular
#: expressions of a config (matched against module paths) from running on megabyte-long strings.
MAX_KEY_LENGTH = 1024

Role = Literal["adapter", "base_layer", "bias", "embedding", "ignored", "modules_to_save", "prompt", "shared",
               "trainable_tokens"]


class TensorName(NamedTuple):
    """A parsed tensor key (a named tuple: a key is parsed on every check and load).

    :param key: the key as stored.
    :param module: the module path (``""`` for ``prompt_embeddings``).
    :param param: the parameter name (``"lora_A.weight"``, ``"weight"`` of a saved module, ...).
    :param role: ``"adapter"`` (a method tensor, SPEC.md 5.2), ``"prompt"``, or an auxiliary tensor
        (SPEC.md 5.3): ``"base_layer"`` (full weight of an adapted embedding), ``"modules_to_save"`` (a
        tensor of a module saved whole), ``"bias"`` (a trained bias, per ``bias``), ``"embedding"`` (a
        resized, untargeted embedding), ``"trainable_tokens"`` (rows of ``trainable_token_indices``),
        ``"shared"`` (a tensor of the method stored once for all modules, module ``""``: VeRA's ``vera_A``) or
        ``"ignored"`` (PEFT's ``original_module.``/``modules_to_save.`` copies: accept, never apply).
    """

    key: str
    module: str
    param: str
    role: Role


def make_key(module: str, param: str, *, prompt_learning: bool = False) -> str:
    """The canonical key of ``param`` of the module at path ``module`` (a module saved whole by a prefix/prompt
    adapter, ``prompt_learning``: ``base_model.<module>.<param>``, SPEC.md 15.9)."""
    if not module:
        return param
    return f"{PROMPT_MODULE_PREFIX if prompt_learning else PEFT_PREFIX}{module}.{param}"


def parse_key(key: str, peft_type: str, config: Mapping[str, Any] | None = None, *,
              with_model: bool = False) -> TensorName:
    """Split a stored key into module path and parameter name, and say what the tensor is (SPEC.md 5.4).

    Method tensors are recognised by their suffix (longest first); anything else must be an auxiliary
    tensor the config accounts for (``modules_to_save``, ``bias``, ``trainable_token_indices``, an
    embedding's base weight).

    :param key: the key as stored in the safetensors file.
    :param peft_type: the adapter's method; decides which parameter names are adapter parameters.
    :param config: the adapter config, to recognise auxiliary tensors (none are accepted without it).
    :param with_model: the caller checks the key against a model: any ``<m>.weight`` / ``<m>.bias`` nothing else
        accounts for is an embedding saved whole if ``m`` is the model's input or output embedding, which the
        caller then checks (without a model: if the last segment of ``m`` is in :data:`EMBEDDING_NAMES`).
    :raises UnexpectedTensorError: the key does not follow the convention for this method, its module
        name is malformed (check 15), or the config does not account for it.

    >>> parse_key("base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias", "LORA",
    ...           {"bias": "lora_only"}).role
    'bias'
    >>> parse_key("base_model.model.q_proj.lora_A.default.weight", "LORA")
    Traceback (most recent call last):
    adapterspec.errors.UnexpectedTensorError: base_model.model.q_proj.lora_A.default.weight: the key still ...
    """
    if len(key) > MAX_KEY_LENGTH:
        raise UnexpectedTensorError(f"key is {len(key)} characters long, more than {MAX_KEY_LENGTH}",
                                    key=key[:80] + "...", hint="this is not a module parameter; remove the tensor")
    if peft_type in PROMPT_METHODS:
        return _prompt_tensor(key, peft_type, config or {})
    for param in SHARED_PARAMETERS.get(peft_type, ()):
        if key == shared_key(param):
            return TensorName(key, "", param, "shared")
    if not key.startswith(PEFT_PREFIX):
        raise _unprefixed(key, peft_type, config, with_model)
    rest = key[len(PEFT_PREFIX):]
    name = _method_tensor(key, rest, peft_type)
    if name is None:
        _refuse_adapter_name(key, rest)
        name = _auxiliary(key, rest, config or {}, with_model)
    if name is None:
        raise _unaccounted(key, rest, peft_type)
    if not name.module or not all(name.module.split(".")):
        raise UnexpectedTensorError(
            f"module name {name.module!r} is malformed: it must be non-empty '.'-separated segments",
            key=key, hint=f"write the key as {PEFT_PREFIX}<module path>.{name.param}")
    return name


def _prompt_tensor(key: str, peft_type: str, config: Mapping[str, Any]) -> TensorName:
    """A key of a prefix/prompt adapter: :data:`PROMPT_KEY`, or ``base_model.<module>.<param>`` of a module
    listed in ``modules_to_save`` (the classifier head PEFT saves for SEQ_CLS / TOKEN_CLS, SPEC.md 15.9)."""
    if key == PROMPT_KEY:
        return TensorName(key, "", PROMPT_KEY, "prompt")
    if key.startswith(PROMPT_MODULE_PREFIX):
        module, _, param = key[len(PROMPT_MODULE_PREFIX):].rpartition(".")
        if module and all(module.split(".")) and param and is_modules_to_save(config, module):
            return TensorName(key, module, param, "modules_to_save")
    saved = "" if not config.get("modules_to_save") else \
        f" or {PROMPT_MODULE_PREFIX}<module>.<param> of a module listed in modules_to_save"
    raise UnexpectedTensorError(
        f"{peft_type} adapters store the tensor {PROMPT_KEY!r}{saved}, not this one",
        key=key, hint=f"remove the tensor or rename it to {PROMPT_KEY!r}"
                      + (", or list its module in modules_to_save" if key.startswith(PROMPT_MODULE_PREFIX) else ""),
    )


#: Each method's parameter names; none has more than two '.'-separated parts.
_PARAMS = {method: frozenset(params) for method, params in PARAMETERS.items()}
assert all(p.count(".") <= 1 for params in PARAMETERS.values() for p in params)


def _method_tensor(key: str, rest: str, peft_type: str) -> TensorName | None:
    """``rest`` as ``<module>.<method parameter>``: its last two parts if they name one (``lora_B.bias``),
    else its last part (``ia3_l``) -- the longest parameter name that is a suffix."""
    params = _PARAMS.get(peft_type)
    if not params:
        return None
    head, _, last = rest.rpartition(".")
    if head:
        module, _, first = head.rpartition(".")
        if f"{first}.{last}" in params:
            return TensorName(key, module, f"{first}.{last}", "adapter")
    return TensorName(key, head, last, "adapter") if last in params else None


#: ``<module>.<first part of a method parameter>.<adapter name>[.weight|.bias]``: PEFT's in-memory names.
_NAMED = re.compile(r"(?P<module>.+)\.(?P<head>{})\.(?P<name>[^.]+)(?P<tail>\.weight|\.bias)?".format(
    "|".join(sorted({p.split(".")[0] for params in PARAMETERS.values() for p in params}, key=len, reverse=True))))


def _refuse_adapter_name(key: str, rest: str) -> None:
    match = _NAMED.fullmatch(rest)
    if match is None:
        return
    params = {p for params in PARAMETERS.values() for p in params}
    param = match["head"] + (match["tail"] or "")
    fixed = make_key(match["module"], param if param in params else match["head"])
    raise UnexpectedTensorError(
        f"the key still contains the adapter name {match['name']!r} (PEFT's in-memory parameter name)",
        key=key, hint=f"strip the adapter name from every key: {fixed!r}")


def _auxiliary(key: str, rest: str, config: Mapping[str, Any], with_model: bool) -> TensorName | None:
    """The auxiliary tensor (SPEC.md 5.3) ``rest`` names, if the config accounts for it."""
    accounted: tuple[tuple[str, Role, Callable[[str], bool]], ...] = (
        (TRAINABLE_TOKENS_PARAM, "trainable_tokens", lambda m: token_indices(config, m) is not None),
        (BASE_LAYER_PARAM, "base_layer", lambda m: True),  # checked against the adapted modules later
        (BASE_LAYER_BIAS, "bias", lambda m: config.get("bias") in ("lora_only", "all")),
    )
    for param, role, allowed in accounted:
        if rest.endswith("." + param):
            module = rest[: -len(param) - 1]
            return TensorName(key, module, param, role) if allowed(module) else None
    for infix in _BOOKKEEPING:
        module, found, param = rest.partition(infix)
        if found and is_modules_to_save(config, module):
            return TensorName(key, module, infix[1:] + param, "ignored")
    module, _, param = rest.rpartition(".")
    if module and is_modules_to_save(config, module):
        return TensorName(key, module, param, "modules_to_save")
    if param == "bias" and config.get("bias") == "all":
        return TensorName(key, module, param, "bias")
    if param in EMBEDDING_PARAMS and (with_model or module.rpartition(".")[2] in EMBEDDING_NAMES):
        return TensorName(key, module, param, "embedding")
    return None


def _unprefixed(key: str, peft_type: str, config: Mapping[str, Any] | None,
                with_model: bool) -> UnexpectedTensorError:
    """The refusal of a key without :data:`PEFT_PREFIX`: prefixing it is the fix offered only where the prefixed
    key is one of the method's (a diffusers/kohya/mlx-lm key is named as such; another says what else is wrong)."""
    if key == PROMPT_KEY:
        return UnexpectedTensorError(f"{PROMPT_KEY!r} is the tensor of prefix/prompt tuning, not of {peft_type}",
                                     key=key, hint="check peft_type in the config, or remove the tensor")
    foreign = key_error(key, PEFT_PREFIX)  # a diffusers/kohya/mlx-lm key: prefixing it would not make it load
    if foreign is not None:
        return foreign
    try:
        parse_key(PEFT_PREFIX + key, peft_type, config, with_model=with_model)
    except UnexpectedTensorError as prefixed:
        return UnexpectedTensorError(
            f"key does not start with {PEFT_PREFIX!r}, nor would it be a {peft_type} tensor with it: "
            f"{prefixed.message}", key=key, hint=prefixed.hint)
    return UnexpectedTensorError(
        f"key does not start with {PEFT_PREFIX!r} (PEFT would only warn 'Found missing adapter keys' and leave "
        "the adapter at its random initialisation)",
        key=key, hint=f"prefix every key with {PEFT_PREFIX!r}: {PEFT_PREFIX + key!r}")


def _unaccounted(key: str, rest: str, peft_type: str) -> UnexpectedTensorError:
    foreign = key_error(key, PEFT_PREFIX)  # a kohya or mlx-lm key prefixed: not to be saved whole
    if foreign is not None:
        return foreign
    expected = ", ".join(PARAMETERS.get(peft_type, ())) or "none"
    param = rest.rpartition(".")[2]
    if rest.endswith("." + TRAINABLE_TOKENS_PARAM):
        hint = "list the embedding in trainable_token_indices, or remove the tensor"
    elif param in EMBEDDING_PARAMS and rest.rpartition(".")[0]:
        hint = (f"remove the tensor, or add its module to modules_to_save; an embedding saved whole (PEFT's "
                f"save_embedding_layers) is accepted without a model only when its module's last name is one of "
                f"{', '.join(EMBEDDING_NAMES)}: load or check it with the model (its input / output embedding)")
        if param == "bias":
            hint = "set bias to 'all' (or 'lora_only' for the biases of targeted modules), or " + hint
    elif param == "bias":
        hint = "set bias to 'all' (or 'lora_only' for the biases of targeted modules), or remove the tensor"
    else:
        hint = "remove the tensor, or add its module to modules_to_save"
    return UnexpectedTensorError(
        f"not a {peft_type} parameter (expected a key ending in one of: {expected}) nor an auxiliary tensor "
        "the config accounts for (modules_to_save, bias, trainable_token_indices)", key=key, hint=hint)


def embedding_error(key: str, module: str, embeddings: Collection[str] | None, is_embedding: bool,
                    how: str) -> UnexpectedTensorError | None:
    """SPEC.md 5.4 step 4 with a model: ``<m>.weight`` (``.bias``) nothing else accounts for is an embedding saved
    whole only if ``m`` is the model's input or output embedding (a model naming none: by its last name).

    :param embeddings: the model's input/output embedding paths, ``None`` when it names none.
    :param is_embedding: whether ``module`` is one of them (each backend compares its own layers).
    :param how: where the backend looks for them (named when the model names none).

    >>> embedding_error("k", "transformer.wte", ["transformer.wte"], True, "get_input_embeddings") is None
    True
    >>> str(embedding_error("k", "h.0.ln_1", ["transformer.wte"], False, "get_input_embeddings"))[:40]
    "k: module 'h.0.ln_1' is neither adapted "
    """
    if embeddings is None:
        if module.rpartition(".")[2] in EMBEDDING_NAMES:
            return None
        names = f"this model names no input/output embedding ({how}), and {module!r} does not " \
                f"end in one of transformers' embedding names ({', '.join(EMBEDDING_NAMES)})"
    elif is_embedding:
        return None
    else:
        names = f"the model's input/output embeddings are {sorted(embeddings)}"
    return UnexpectedTensorError(
        f"module {module!r} is neither adapted nor in modules_to_save, and it is not an embedding saved whole: "
        f"{names}", key=key, hint="remove the tensor, or add its module to modules_to_save")
