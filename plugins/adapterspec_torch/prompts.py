"""Prefix and prompt tuning on transformers models, through a forward pre-hook on the model.

P-tuning (``P_TUNING``) stores the prompt encoder's output, which is used exactly as prompt tuning's
embeddings (SPEC.md 15.8): only loading is implemented (a fresh adapter would need PEFT's encoder).

The virtual tokens live in ``model._adapterspec_prompts`` (a ``ParameterDict``, adapter name -> tensor) and
enter through a forward pre-hook on the model, as PEFT's ``PeftModelForCausalLM.forward`` does: past
key/values (prefix tuning), or embeddings prepended to ``inputs_embeds`` (prompt tuning), the attention
mask extended by ones. The Keras backend's :mod:`adapterspec_keras.prompts` has the same function names.

>>> config = check_prompt_learning(model, config)                       # doctest: +SKIP
>>> inject_prefix(model, state, config, "default", LoadOptions())        # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import threading
import types
import weakref
from typing import Any, cast

import torch
from torch import nn

from adapterspec import AdapterConfig, LoadOptions
from adapterspec._rules import prefix_key_value_sizes, prompt_init_refusal, starts_at_zero, transformer_submodules
from adapterspec.errors import ShapeMismatchError, UnsupportedError
from adapterspec.naming import PROMPT_KEY

from ._keys import slot
from .devices import adapter_target_of
from .switch import ModelState, get_state

__all__ = ["CLASSIFICATION_TASKS", "PREFIX_FORWARD", "PROMPTS_ATTR", "backbone_and_head", "check_prompt_learning",
           "inject_prefix", "remove_prefix"]

#: The ``task_type`` values whose PEFT model saves the head (``modules_to_save``: ``classifier``/``score``,
#: ``qa_outputs``) and keeps ``token_type_ids`` and labels as given (SPEC.md 15.9).
CLASSIFICATION_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")

#: The submodule (a ``ParameterDict``) holding prefix/prompt-tuning embeddings, adapter name -> parameter.
PROMPTS_ATTR = "_adapterspec_prompts"

#: Set on a classification model whose forward takes no ``past_key_values`` while a prefix-tuning adapter is loaded
#: (SPEC.md 15.9): the instance ``forward`` it had before (``None``: the class's), given back by :func:`remove_prefix`.
PREFIX_FORWARD = "_adapterspec_own_forward"

#: The keyword under which the pre-hook hands such a model's forward the prefix cache (and the adapter's config).
_PREFIX_KWARG = "_adapterspec_prefix"


def check_prompt_learning(model: nn.Module, config: AdapterConfig) -> AdapterConfig:
    """``config`` with the fields PEFT derives from the model filled in (``_prepare_prompt_learning_config``).

    :raises UnsupportedError: what this backend cannot run exactly (names the field).
    """
    model_config: Any = getattr(model, "config", None)
    submodules = transformer_submodules(config)
    seq2seq = bool(getattr(model_config, "is_encoder_decoder", False))
    if (submodules == 2) != seq2seq or (submodules == 2 and config.get("task_type") != "SEQ_2_SEQ_LM"):
        where = "/num_transformer_submodules" if config.get("num_transformer_submodules") is not None else "/task_type"
        raise UnsupportedError(f"num_transformer_submodules {submodules} (task_type {config.get('task_type')}) on "
                               f"{'an encoder-decoder' if seq2seq else 'a decoder-only'} model: only 2 with "
                               "SEQ_2_SEQ_LM on an encoder-decoder model, 1 on the others, are implemented here",
                               pointer=where, hint="load the adapter into the kind of model it was trained for")
    if config.peft_type == "PREFIX_TUNING" and not _takes_cache(model):
        backbone_and_head(model, config)  # PEFT runs the backbone and the head itself: refused where it cannot
    changes: dict[str, Any] = {}
    if config.get("num_transformer_submodules") is None:
        changes["num_transformer_submodules"] = submodules
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config

    def from_model(*names: str) -> Any:
        for n in names:
            value = getattr(text, n, None)
            if value is not None:
                return value
        return None

    for field, names in (("num_layers", ("num_hidden_layers", "num_layers", "n_layer")),
                         ("token_dim", ("hidden_size", "n_embd", "d_model")),
                         ("num_attention_heads", ("num_attention_heads", "n_head", "num_heads"))):
        if config.get(field) is None:
            value = from_model(*names) if text is not None else None
            if value is None:
                raise UnsupportedError(f"{field} is not in the config and cannot be read from the model",
                                       pointer=f"/{field}", hint=f"set {field} in adapter_config.json")
            changes[field] = int(value)
    if config.peft_type == "PREFIX_TUNING" and model_config is not None:
        token_dim: int = changes["token_dim"] if "token_dim" in changes else config["token_dim"]
        heads: int = changes["num_attention_heads"] if "num_attention_heads" in changes else config["num_attention_heads"]
        data = model_config.to_dict() if hasattr(model_config, "to_dict") else {}
        for field, value in prefix_key_value_sizes(data, token_dim, heads).items():
            if value != config.get(field):
                changes[field] = value
    config = config.replace(**changes) if changes else config
    if config.peft_type == "PREFIX_TUNING":
        if submodules == 1 and _takes_cache(model):
            _check_cache_layout(model, config)
    else:
        _check_embedding_input(model, config)
    return config


def _check_embedding_input(model: nn.Module, config: AdapterConfig) -> None:
    """Prompt tuning and P-tuning prepend the prompt to the input embeddings (SPEC.md 8.4): refused, typed, where the
    model cannot take it -- an input embedding narrower or wider than ``token_dim`` (ELECTRA, ALBERT, OPT-350m
    project the embedding to the hidden size, which PEFT's ``token_dim`` is), or a model that reads per-layer
    inputs back from the embeddings as rows of its embedding table (Gemma 4's ``get_per_layer_inputs`` taking
    ``inputs_embeds``), which virtual tokens are not. PEFT fails at the first forward on both.

    :raises ShapeMismatchError: ``token_dim`` is not the input embedding's width (names ``/token_dim``).
    :raises UnsupportedError: the model reads its inputs back from the embeddings.
    """
    hf: Any = model  # a transformers model (checked by the caller)
    weight = getattr(hf.get_input_embeddings(), "weight", None)
    width = int(weight.shape[-1]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
    token_dim = int(config["token_dim"])
    if width is not None and width != token_dim:
        raise ShapeMismatchError(
            f"token_dim {token_dim} (the prompt {PROMPT_KEY!r} is [{config['num_virtual_tokens']}, {token_dim}] per "
            f"submodule) is not the width {width} of {type(model).__name__}'s input embedding, which the prompt is "
            "prepended to (PEFT fails at the first forward too)", key=PROMPT_KEY, pointer="/token_dim",
            hint=f"set token_dim to {width} for a new adapter; a saved one was trained for another model")
    for name, module in model.named_modules():
        reader = getattr(type(module), "get_per_layer_inputs", None)
        if reader is not None and getattr(module, "hidden_size_per_layer_input", None) \
                and "inputs_embeds" in inspect.signature(reader).parameters:
            raise UnsupportedError(
                f"{config.peft_type} on {type(model).__name__}: {name or 'the model'} ({type(module).__name__}) reads "
                "its per-layer inputs back from inputs_embeds as rows of its embedding table "
                "(get_per_layer_inputs), which virtual tokens are not (PEFT fails at the first forward too)",
                key=PROMPT_KEY, pointer="/peft_type", hint="use LoRA or PREFIX_TUNING on this model")


#: transformers' cache layers that hold a standard attention layer's keys and values, which a prefix extends.
_STANDARD_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")

#: transformers' cache layers that keep nothing: their attention reads another layer's keys and values
#: (``num_kv_shared_layers``), so what the prefix gives them is not read.
_SHARING_LAYERS = ("DummyLayer",)

#: Set while :func:`_probe_cache` runs the model: the prompt pre-hook leaves its inputs as they are.
_PROBING = threading.local()


def _check_cache_layout(model: nn.Module, config: AdapterConfig) -> None:
    """Refuse, typed, a prefix the model's key/value cache cannot take (SPEC.md 10, check 20): the cache the model makes of
    one token (:func:`_probe_cache`) is compared, layer by layer, with what the prefix cache gives each layer
    (:func:`_prefix_layer_shapes`) -- as many layers, each a standard attention layer (transformers'
    ``DynamicLayer`` / ``DynamicSlidingWindowLayer``: not linear attention, a state-space or convolution layer),
    whose keys and values have the prefix's heads and head size (not Falcon's repeated or multi-query heads, nor
    the compressed latents of multi-head latent attention). A layer the prefix gives nothing, or that reads another
    layer's keys and values (``num_kv_shared_layers``), is not compared. Where the model cannot run one token on its own, nothing is known
    and nothing is refused.

    :raises UnsupportedError: the model keeps another kind of cache, or a layer that is not standard attention.
    :raises ShapeMismatchError: the number of layers, or a layer's key/value heads or head sizes, differ.
    """
    written = _prefix_layer_shapes(model, config)
    if not any(written):
        raise UnsupportedError("no layer's key/value shape fits the prefix (token_dim / num_attention_heads)",
                               key=PROMPT_KEY, pointer="/token_dim",
                               hint="load the adapter into the model it was trained for")
    cache = _probe_cache(model)
    if cache is None:
        return
    where = type(model).__name__
    layers = _cache_layers(cache)
    if layers is None:
        raise UnsupportedError(f"prefix tuning on {where}: it keeps a {type(cache).__name__}, not transformers' "
                               "key/value cache a prefix is written into (PEFT fails at the first forward too)",
                               key=PROMPT_KEY, pointer="/peft_type", hint="use LoRA or PROMPT_TUNING on this model")
    if len(layers) != len(written):
        raise ShapeMismatchError(f"the prefix {PROMPT_KEY!r} is for num_layers {len(written)} layers; {where} keeps "
                                 f"a key/value cache for {len(layers)}", key=PROMPT_KEY, pointer="/num_layers",
                                 hint="load the adapter into the model it was trained for")
    heads, token_dim = int(config["num_attention_heads"]), int(config["token_dim"])
    for index, ((kind, kept), given) in enumerate(zip(layers, written)):
        if given is None or kind in _SHARING_LAYERS:
            continue
        if kind not in _STANDARD_LAYERS or kept is None:
            raise UnsupportedError(
                f"prefix tuning on {where}: layer {index} keeps a {kind}, not an attention layer's keys and values "
                "(linear attention, a state-space or convolution layer), which a prefix cannot extend (PEFT fails "
                "at the first forward too)", key=PROMPT_KEY, pointer="/peft_type",
                hint="use LoRA or PROMPT_TUNING on this model")
        if kept != (*given, *given):
            key_heads, key_dim, value_heads, value_dim = kept
            raise ShapeMismatchError(
                f"the prefix {PROMPT_KEY!r} (num_attention_heads {heads}, token_dim {token_dim}) gives layer {index} "
                f"keys and values of {given[0]} heads x {given[1]} channels; {where} keeps keys of {key_heads} x "
                f"{key_dim} and values of {value_heads} x {value_dim} there (PEFT fails at the first forward too)",
                key=PROMPT_KEY, pointer="/num_attention_heads" if given[0] != key_heads else "/token_dim",
                hint="use LoRA or PROMPT_TUNING on this model; a prefix cannot take its keys and values")


def _probe_cache(model: nn.Module) -> Any:
    """The cache ``model``'s forward makes of one token (``use_cache=True``, no gradient, in eval mode, the prompt
    pre-hook off), or ``None`` where it makes none or cannot run here (weights on the meta device, inputs it needs
    besides ``input_ids``). The model is left as it was: each module's training mode and attributes (a model that
    keeps something of its last call, as Qwen2-VL's ``rope_deltas``) are put back."""
    hf: Any = model  # a transformers model (checked by the caller)
    weight = getattr(hf.get_input_embeddings(), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
        return None
    saved = [(module, dict(vars(module)), dict(module._buffers)) for module in model.modules()]
    _PROBING.active = True
    try:
        model.eval()
        with torch.no_grad():
            output = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=weight.device), use_cache=True)
    except Exception:  # noqa: BLE001 - a model that does not run on one token alone: its cache is not known here
        return None
    finally:
        _PROBING.active = False
        for module, attributes, buffers in saved:
            vars(module).clear()
            vars(module).update(attributes)
            module._buffers.clear()
            module._buffers.update(buffers)
    return getattr(output, "past_key_values", None)


def _cache_layers(cache: Any) -> list[tuple[str, tuple[int, int, int, int] | None]] | None:
    """Each layer of a cache: its kind (the cache layer's class) and (key heads, key head size, value heads, value
    head size), ``None`` where it holds no keys and values; ``None`` for a cache of another kind."""
    layers = getattr(cache, "layers", None)
    if isinstance(cache, (tuple, list)):  # the legacy form: a (keys, values) pair per layer
        layers = [types.SimpleNamespace(keys=pair[0], values=pair[1]) for pair in cache]
        kinds = [_STANDARD_LAYERS[0]] * len(layers)
    elif isinstance(layers, (list, tuple)):
        kinds = [type(layer).__name__ for layer in layers]
    else:
        return None
    out: list[tuple[str, tuple[int, int, int, int] | None]] = []
    for kind, layer in zip(kinds, layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor) and keys.dim() == values.dim() == 4:
            out.append((kind, (int(keys.shape[1]), int(keys.shape[3]), int(values.shape[1]), int(values.shape[3]))))
        else:
            out.append((kind, None))
    return out


#: model class -> whether its forward takes ``past_key_values`` (read at every forward of a prefix-tuned classifier).
_TAKES_CACHE: dict[type, bool] = {}


def _takes_cache(module: nn.Module) -> bool:
    kind = type(module)
    found = _TAKES_CACHE.get(kind)
    if found is None:
        found = _TAKES_CACHE[kind] = "past_key_values" in inspect.signature(kind.forward).parameters
    return found


def backbone_and_head(model: nn.Module, config: AdapterConfig) -> tuple[str, str]:
    """For prefix tuning on a classification model whose forward takes no ``past_key_values`` (BERT's, RoBERTa's):
    the children PEFT 0.21.2 runs itself (SPEC.md 15.9) -- its ``transformer_backbone_name`` (the first child that
    is a transformers model) and ``cls_layer_name`` (the first child whose name contains an entry of
    ``modules_to_save``, with ``"classifier"`` and ``"score"``, or ``"qa_outputs"`` for QUESTION_ANS).

    :raises UnsupportedError: not a classification task, or no such backbone (taking ``past_key_values``) or head:
        PEFT fails there too.
    """
    from transformers import PreTrainedModel

    task = config.get("task_type")
    where = type(model).__name__
    if task not in CLASSIFICATION_TASKS:
        raise UnsupportedError(f"prefix tuning needs a model whose forward takes past_key_values; {where}.forward "
                               f"does not, and PEFT runs the backbone and head itself only for the classification "
                               f"tasks {list(CLASSIFICATION_TASKS)}, not task_type {task!r}", key=where,
                               pointer="/task_type", hint="use a model class that takes past_key_values, or "
                                                          "PROMPT_TUNING")
    children = list(model.named_children())
    backbone = next((name for name, child in children if isinstance(child, PreTrainedModel)), None)
    if backbone is None or not _takes_cache(model.get_submodule(backbone)):
        raise UnsupportedError(f"prefix tuning on {where}: its forward takes no past_key_values and "
                               + ("it has no transformers backbone" if backbone is None else
                                  f"neither does its backbone {backbone!r}") + " (PEFT raises too)", key=where,
                               hint="use a model class that takes past_key_values, or PROMPT_TUNING")
    heads = [*(config.get("modules_to_save") or []), *(("qa_outputs",) if task == "QUESTION_ANS" else
                                                       ("classifier", "score"))]
    head = next((name for name, _ in children if any(entry in name for entry in heads)), None)
    if head is None:
        raise UnsupportedError(f"prefix tuning on {where}: no child named after modules_to_save {heads} to classify "
                               "with (PEFT fails too)", key=where, pointer="/modules_to_save",
                               hint="list the classification head in modules_to_save")
    return backbone, head


def _prompt_shape(config: AdapterConfig) -> tuple[int, int]:
    nvt = config["num_virtual_tokens"]
    if config.peft_type == "PREFIX_TUNING":
        return nvt, config["num_layers"] * 2 * config["token_dim"]
    return nvt * (config.get("num_transformer_submodules") or 1), config["token_dim"]


def inject_prefix(model: nn.Module, state: ModelState, config: AdapterConfig, adapter_name: str,
                  options: LoadOptions) -> AdapterConfig:
    """Add the virtual tokens of ``adapter_name`` (random values; the file's are loaded later) and the hook.

    :returns: ``config`` with the fields derived from the model filled in.
    :raises UnsupportedError: not a transformers model, or a model/config this backend cannot run.
    """
    if not hasattr(model, "get_input_embeddings") or getattr(model, "config", None) is None:
        raise UnsupportedError(f"{config.peft_type} needs a transformers model (with .config and input embeddings)",
                               key=type(model).__qualname__, hint="pass a transformers PreTrainedModel")
    model_type = getattr(model.config, "model_type", "")
    if config.peft_type == "PREFIX_TUNING" and "gemma4" in model_type:
        for field in ("token_dim", "num_attention_heads"):
            if config.get(field) is None:  # PEFT sizes it for the widest layer: not derived here
                raise UnsupportedError(f"prefix tuning on {model_type} needs {field} in the config (PEFT provisions "
                                       "the prefix for the widest layer's key/value shape)", pointer=f"/{field}",
                                       hint=f"set {field} as PEFT wrote it")
    if config.peft_type == "P_TUNING" and options.initialize:
        raise UnsupportedError("a fresh P_TUNING adapter trains a prompt encoder (MLP/LSTM) that PEFT does not save "
                               "and this backend does not implement; only saved P-tuning prompts are loaded",
                               pointer="/peft_type", hint="train P-tuning with PEFT, or add a PROMPT_TUNING adapter")
    if config.get("prefix_projection") and options.initialize:  # the file holds the MLP's output (SPEC.md 4.1.4)
        raise UnsupportedError("a fresh PREFIX_TUNING adapter with prefix_projection trains its prefix through an MLP "
                               "that PEFT does not save and this backend does not implement; only saved prefixes "
                               "(the MLP's output) load", pointer="/prefix_projection",
                               hint="train it with PEFT, or set prefix_projection to false (the prefix trains directly)")
    refusal = prompt_init_refusal(config) if options.initialize else None
    if refusal is not None:  # exactly TEXT / SAMPLE_VOCAB: other values initialise at random in PEFT too
        raise refusal
    config = check_prompt_learning(model, config)
    hf: Any = model  # a transformers model, as checked above: methods nn.Module does not declare
    embeddings = hf.get_input_embeddings()
    device, dtype = adapter_target_of(embeddings, options)
    prompts = cast("nn.ParameterDict | None", model._modules.get(PROMPTS_ATTR))
    if prompts is None:
        prompts = nn.ParameterDict()
        model.add_module(PROMPTS_ATTR, prompts)
    tensor = torch.empty(_prompt_shape(config), device=device, dtype=dtype)
    if device.type != "meta":
        with torch.no_grad():
            if starts_at_zero(config):  # PEFT's init_weights "zero"; else nn.Embedding's normal start
                tensor.zero_()
            else:
                tensor.normal_()
    prompts[slot(adapter_name)] = nn.Parameter(tensor, requires_grad=bool(options.trainable))
    if state.prompt_hook is None:
        state.prompt_hook = model.register_forward_pre_hook(_prompt_pre_hook, with_kwargs=True)
    if config.peft_type == "PREFIX_TUNING" and not _takes_cache(model) and PREFIX_FORWARD not in vars(model):
        # PEFT's own forward for such a model (SPEC.md 15.9): the hook hands the cache over under _PREFIX_KWARG
        setattr(model, PREFIX_FORWARD, vars(model).get("forward"))
        model.forward = types.MethodType(_forward_with_prefix, model)
    return config


@functools.cache
def _positional_names(forward_type: type[nn.Module]) -> tuple[str, ...]:
    signature = inspect.signature(forward_type.forward)
    names = []
    for param in list(signature.parameters.values())[1:]:
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            names.append(param.name)
    return tuple(names)


#: The caches a prefix forward made (the prefix, then what the model appended): one passed back in with
#: ``use_cache=False`` comes with the whole sequence again, so the prefix starts over.
_PREFIX_CACHES: weakref.WeakSet[Any] = weakref.WeakSet()


def _is_prefix_cache(past: Any) -> bool:
    try:
        return past in _PREFIX_CACHES
    except TypeError:
        return False


def _cache_length(past: Any) -> int:
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, (tuple, list)) and past:
        return int(past[0][0].shape[-2])
    return 0


def _prompt_pre_hook(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """PEFT's ``PeftModelForCausalLM.forward`` for prefix/prompt tuning, applied to the model's own forward
    (``PeftModelForSequenceClassification`` / ``...TokenClassification``'s for ``task_type`` SEQ_CLS / TOKEN_CLS:
    ``token_type_ids`` kept, zeros prepended for prompts; labels as given; ``...QuestionAnswering``'s drops
    ``token_type_ids`` and ``position_ids``; SPEC.md 15.9)."""
    state = get_state(model)
    if state is None or getattr(_PROBING, "active", False):
        return None
    active = [n for n in state.switch.names if state.configs[n].is_prompt_learning]
    if not active:
        return None
    name = active[0]
    config = state.configs[name]
    names = _positional_names(type(model))  # type: ignore[arg-type]  # mypy checks the instances' __hash__
    if len(args) > len(names):
        raise UnsupportedError("too many positional arguments for prompt learning", key=type(model).__qualname__,
                               hint="pass the model's inputs as keyword arguments")
    kwargs = {**dict(zip(names, args)), **kwargs}
    if config["num_transformer_submodules"] == 2 and kwargs.get("encoder_outputs") is not None:
        raise UnsupportedError("encoder-decoder prompt learning with precomputed encoder_outputs (as generate() "
                               "passes them) is not implemented here", key=type(model).__name__,
                               hint="call the model's forward with input_ids; use PEFT for generate()")
    input_ids: Any = kwargs.get("input_ids")
    inputs_embeds: Any = kwargs.get("inputs_embeds")
    if input_ids is None and inputs_embeds is None:
        return None
    batch = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
    nvt = config["num_virtual_tokens"]
    weight = cast(nn.ParameterDict, model._modules[PROMPTS_ATTR])[slot(name)]
    if config["num_transformer_submodules"] == 2:
        return _seq2seq_kwargs(model, config, weight, kwargs, batch)
    if config.get("task_type") == "QUESTION_ANS":  # PEFT's QA forward takes both by name and passes neither on
        kwargs.pop("token_type_ids", None)
        kwargs.pop("position_ids", None)
    past = kwargs.get("past_key_values")
    # generate(use_cache=False) passes the prefix cache the last step returned back in, with the whole sequence
    continuing = _cache_length(past) > 0 and not (kwargs.get("use_cache") is False and _is_prefix_cache(past))
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        kwargs["attention_mask"] = torch.cat((torch.ones(batch, nvt).to(mask.device), mask), dim=1)
    classify = config.get("task_type") in CLASSIFICATION_TASKS
    if kwargs.get("token_type_ids") is not None and not classify:
        kwargs["token_type_ids"] = None
    if config.peft_type == "PREFIX_TUNING":
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + nvt
        if PREFIX_FORWARD in vars(model):  # the model's forward takes no cache: PEFT's backbone-and-head forward
            kwargs[_PREFIX_KWARG] = (_prefix_cache(model, config, weight, batch), config)
        elif not continuing:
            kwargs["past_key_values"] = cache = _prefix_cache(model, config, weight, batch)
            with contextlib.suppress(TypeError):  # a cache class without weak references: never taken as new
                _PREFIX_CACHES.add(cache)
        return (), kwargs
    kwargs["position_ids"] = None
    if continuing:
        return (), kwargs
    if inputs_embeds is None:
        hf: Any = model  # a transformers model (checked at injection): methods nn.Module does not declare
        inputs_embeds = hf.get_input_embeddings()(input_ids)
    labels, types = kwargs.get("labels"), kwargs.get("token_type_ids")
    if labels is not None and not classify:
        kwargs["labels"] = torch.cat((torch.full((batch, nvt), -100).to(labels.device), labels), dim=1)
    if types is not None:  # only kept for classification
        kwargs["token_type_ids"] = torch.cat((torch.zeros(batch, nvt).to(types.device), types), dim=1).long()
    prompts = weight.repeat(batch, 1, 1).to(inputs_embeds.dtype)
    kwargs["inputs_embeds"] = torch.cat((prompts, inputs_embeds), dim=1)
    kwargs["input_ids"] = None
    return (), kwargs


def _prefix_cache(model: nn.Module, config: AdapterConfig, weight: torch.Tensor, batch: int) -> Any:
    from transformers import DynamicCache

    layers, heads, token_dim = config["num_layers"], config["num_attention_heads"], config["token_dim"]
    past = weight.repeat(batch, 1, 1)
    dtype = getattr(model, "dtype", None)
    if dtype is not None:
        past = past.to(dtype)
    past = past.view(batch, config["num_virtual_tokens"], layers * 2, heads, token_dim // heads)
    if config["num_transformer_submodules"] == 2:
        return _encoder_decoder_cache(past)
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    if _HYBRID.search(model_type):
        return _hybrid_cache(model, config, past)
    return DynamicCache(past.permute([2, 0, 3, 1, 4]).split(2))  # type: ignore[no-untyped-call]  # unannotated in torch


#: The model types whose prefix PEFT 0.21.2 writes into a cache built from the model's config (sliding-window
#: layers), as ``"gemma2" in model_type or "gemma3_text" in model_type or "gemma4" in model_type``.
_HYBRID = re.compile("gemma2|gemma3_text|gemma4")


def _layer_kv_shape(text: Any, index: int) -> tuple[int, int] | None:
    """PEFT 0.21.2's ``_get_layer_kv_target_shape``: layer ``index``'s (key/value heads, head_dim) where layers
    differ (Gemma 4's ``per_layer_config``, or ``global_head_dim``), else ``None``."""
    layer_types = getattr(text, "layer_types", None)
    if not layer_types:
        return None
    per_layer = getattr(text, "per_layer_config", None)
    if per_layer is not None:
        layer = per_layer[index]
        return int(layer.num_key_value_heads), int(layer.head_dim)
    global_head_dim = getattr(text, "global_head_dim", None)
    if global_head_dim is None:
        return None
    sliding = layer_types[index] == "sliding_attention"
    global_heads = getattr(text, "num_global_key_value_heads", None)
    heads = global_heads if not sliding and global_heads is not None else text.num_key_value_heads
    return int(heads), int(text.head_dim if sliding else global_head_dim)


def _prefix_layer_shapes(model: nn.Module, config: AdapterConfig) -> list[tuple[int, int] | None]:
    """The (key/value heads, head_dim) the prefix cache gives each of the ``num_layers`` layers, ``None`` for one it
    gives nothing: the prefix's own (``num_attention_heads``, ``token_dim / num_attention_heads``) for each, except
    on Gemma 2 / 3 text / 4 (:func:`_hybrid_cache`), where a layer whose key/value shape differs (Gemma 4) takes its
    leading heads and channels, and one wider than the prefix or sharing another layer's keys and values
    (``num_kv_shared_layers``) takes none."""
    heads = int(config["num_attention_heads"])
    full = (heads, int(config["token_dim"]) // heads)
    count = int(config["num_layers"])
    if not _HYBRID.search(str(getattr(getattr(model, "config", None), "model_type", ""))):
        return [full] * count
    text: Any = getattr(model, "config")
    if hasattr(text, "get_text_config"):
        text = text.get_text_config()
    shared = int(getattr(text, "num_kv_shared_layers", 0) or 0)
    first_shared = int(getattr(text, "num_hidden_layers", count)) - shared
    out: list[tuple[int, int] | None] = []
    for index in range(count):
        shape = None if shared > 0 and index >= first_shared else _layer_kv_shape(text, index) or full
        out.append(shape if shape is not None and shape[0] <= full[0] and shape[1] <= full[1] else None)
    return out


def _hybrid_cache(model: nn.Module, config: AdapterConfig, past: torch.Tensor) -> Any:
    """PEFT 0.21.2's prefix cache for Gemma 2 / 3 text / 4 (transformers >= 4.56, SPEC.md 15.9): a
    ``DynamicCache(config=text config)`` -- full and sliding-window layers as the model declares them -- into
    which each layer's prefix keys and values are written with ``cache_position = 0 .. N-1``; where layers
    differ in key/value shape (Gemma 4) each takes the leading heads and channels of the prefix (sized for the
    widest), a layer wider than the prefix or sharing another layer's keys and values
    (``num_kv_shared_layers``) gets none (:func:`_prefix_layer_shapes`).

    :raises UnsupportedError: no layer takes the prefix (PEFT raises too).
    """
    from transformers import DynamicCache

    text: Any = getattr(model, "config")
    if hasattr(text, "get_text_config"):
        text = text.get_text_config()
    cache = DynamicCache(config=text)
    position = torch.arange(past.shape[1], device=past.device)
    pairs = past.permute([2, 0, 3, 1, 4]).split(2)  # type: ignore[no-untyped-call]
    injected = 0
    for index, (pair, shape) in enumerate(zip(pairs, _prefix_layer_shapes(model, config))):
        if shape is None:
            continue
        heads, dim = shape
        keys, values = pair[0][:, :heads, :, :dim], pair[1][:, :heads, :, :dim]
        cache.update(keys, values, index, cache_kwargs={"cache_position": position})
        injected += 1
    if not injected:
        raise UnsupportedError("no layer's key/value shape fits the prefix (token_dim / num_attention_heads)",
                               key=PROMPT_KEY, hint="load the adapter into the model it was trained for")
    return cache


def _encoder_decoder_cache(past: torch.Tensor) -> Any:
    """PEFT 0.21.2's cache for ``num_transformer_submodules`` 2 (SPEC.md 8.4, 15.9): the ``2L`` slots doubled to
    ``4L``, decoder layer ``l`` taking slots ``4l, 4l + 1`` (mod ``2L``) as its self-attention prefix; the
    cross-attention part is dropped (an empty cache, recomputed from the encoder's output)."""
    from transformers import DynamicCache, EncoderDecoderCache

    doubled = torch.cat([past, past], dim=2).permute([2, 0, 3, 1, 4]).split(4)  # type: ignore[no-untyped-call]
    cache = EncoderDecoderCache(doubled)
    cache.cross_attention_cache = DynamicCache()
    for key in cache.is_updated:
        cache.is_updated[key] = False
    return cache


def _seq2seq_kwargs(model: nn.Module, config: AdapterConfig, weight: torch.Tensor, kwargs: dict[str, Any],
                    batch: int) -> tuple[tuple[()], dict[str, Any]]:
    """PEFT's ``PeftModelForSeq2SeqLM.forward`` for prefix/prompt/P-tuning (SPEC.md 15.9)."""
    nvt = config["num_virtual_tokens"]
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = None
    if config.peft_type == "PREFIX_TUNING":
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + nvt
        mask = kwargs.get("decoder_attention_mask")
        if mask is not None:
            kwargs["decoder_attention_mask"] = torch.cat((torch.ones(batch, nvt).to(mask.device), mask), dim=1)
        kwargs["past_key_values"] = _prefix_cache(model, config, weight, batch)
        return (), kwargs
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = None
    inputs_embeds = kwargs.get("inputs_embeds")
    if inputs_embeds is None:
        hf: Any = model  # a transformers model (checked at injection): methods nn.Module does not declare
        inputs_embeds = hf.get_input_embeddings()(kwargs["input_ids"])
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat((torch.ones(batch, nvt).to(mask.device), mask), dim=1)
    prompts = weight.repeat(batch, 1, 1).to(inputs_embeds.dtype)[:, :nvt]  # the decoder's half is not used
    kwargs["inputs_embeds"] = torch.cat((prompts, inputs_embeds), dim=1)
    kwargs["input_ids"] = None
    return (), kwargs


def _forward_with_prefix(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The model's forward while a prefix-tuning adapter is loaded into a classification model whose forward takes
    no ``past_key_values``: PEFT 0.21.2's ``_prefix_tuning_forward`` of ``PeftModelForSequenceClassification`` /
    ``...TokenClassification`` / ``...QuestionAnswering`` when the pre-hook hands it the cache, else the model's
    own forward (no prefix active)."""
    handed = kwargs.pop(_PREFIX_KWARG, None)
    own = vars(model).get(PREFIX_FORWARD)
    if handed is None:
        return own(*args, **kwargs) if own is not None else type(model).forward(model, *args, **kwargs)
    cache, config = handed
    return _classify(model, config, cache, **kwargs)


def _classify(model: nn.Module, config: AdapterConfig, cache: Any, *, input_ids: Any = None,
              attention_mask: Any = None, inputs_embeds: Any = None, output_attentions: Any = None,
              output_hidden_states: Any = None, return_dict: Any = None, **kwargs: Any) -> Any:
    """PEFT's backbone-and-head forward (SPEC.md 15.9): the backbone with the cache, dropout if the model has a child
    named ``dropout``, the head; SEQ_CLS on the pooled output (``outputs[1]`` where the backbone returns one), the
    others on every position; the loss as PEFT computes it."""
    from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
    from transformers.modeling_outputs import (
        QuestionAnsweringModelOutput,
        SequenceClassifierOutput,
        TokenClassifierOutput,
    )

    hf: Any = model  # a transformers model (checked at injection)
    task = config.get("task_type")
    backbone, head = backbone_and_head(model, config)
    if return_dict is None:
        return_dict = getattr(hf.config, "return_dict", True) and not getattr(hf.config, "torchscript", False)
    labels = kwargs.pop("labels", None) if task != "QUESTION_ANS" else None
    start, end = (kwargs.pop("start_positions", None), kwargs.pop("end_positions", None)) \
        if task == "QUESTION_ANS" else (None, None)
    kwargs.update(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                  output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                  return_dict=return_dict, past_key_values=cache)
    outputs = model.get_submodule(backbone)(**kwargs)
    hidden = (outputs[1] if len(outputs) > 1 else outputs[0]) if task == "SEQ_CLS" else outputs[0]
    if "dropout" in dict(model.named_children()):
        hidden = hf.dropout(hidden)
    logits = model.get_submodule(head)(hidden)
    loss = None
    if task == "QUESTION_ANS":
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        if start is not None and end is not None:
            start = start.squeeze(-1) if start.dim() > 1 else start
            end = end.squeeze(-1) if end.dim() > 1 else end
            ignored = start_logits.size(1)
            loss_fct = CrossEntropyLoss(ignore_index=ignored)
            loss = (loss_fct(start_logits, start.clamp(0, ignored)) + loss_fct(end_logits, end.clamp(0, ignored))) / 2
        if not return_dict:
            output = (start_logits, end_logits) + tuple(outputs[2:])
            return ((loss,) + output) if loss is not None else output
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                            hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    labels_count = hf.num_labels
    if labels is not None and task == "TOKEN_CLS":
        loss = CrossEntropyLoss()(logits.view(-1, labels_count), labels.view(-1))
    elif labels is not None:  # SEQ_CLS: the problem type as PEFT (and transformers) settle it, on the model config
        if hf.config.problem_type is None:
            hf.config.problem_type = "regression" if labels_count == 1 else "single_label_classification" \
                if labels.dtype in (torch.long, torch.int) else "multi_label_classification"
        if hf.config.problem_type == "regression":
            loss = MSELoss()(logits.squeeze(), labels.squeeze()) if labels_count == 1 else MSELoss()(logits, labels)
        elif hf.config.problem_type == "single_label_classification":
            loss = CrossEntropyLoss()(logits.view(-1, labels_count), labels.view(-1))
        elif hf.config.problem_type == "multi_label_classification":
            loss = BCEWithLogitsLoss()(logits, labels)
    if not return_dict:
        output = (logits,) + tuple(outputs[2:])
        return ((loss,) + output) if loss is not None else output
    kind = TokenClassifierOutput if task == "TOKEN_CLS" else SequenceClassifierOutput
    return kind(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def remove_prefix(model: nn.Module, state: ModelState, adapter_name: str) -> None:
    """Remove the virtual tokens of ``adapter_name``, and the hook once no such adapter is left."""
    prompts = cast("nn.ParameterDict | None", model._modules.get(PROMPTS_ATTR))
    if prompts is not None and slot(adapter_name) in prompts:
        del prompts[slot(adapter_name)]
    if prompts is not None and len(prompts) == 0:
        del model._modules[PROMPTS_ATTR]
    still = any(state.configs[n].is_prompt_learning for n in state.names if n != adapter_name)
    if not still and state.prompt_hook is not None:
        state.prompt_hook.remove()
        state.prompt_hook = None
    if not still and PREFIX_FORWARD in vars(model):  # the model's own forward back (an instance one too)
        own = vars(model).pop(PREFIX_FORWARD)
        if own is None:
            del model.forward
        else:
            model.forward = own
