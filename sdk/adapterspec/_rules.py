"""Config rules the JSON Schema cannot express (SPEC.md 4.2), and the features v1 readers do not implement.

Both work on the plain config mapping (defaults need not be filled). :mod:`adapterspec.config` applies
the first in :func:`~adapterspec.config.validate_config` (``ConfigError``); readers apply the second
(check 5 of SPEC.md section 10, ``UnsupportedError``).

>>> rule_problems({"peft_type": "PREFIX_TUNING", "token_dim": 10, "num_attention_heads": 4})[0][0]
'/token_dim'
>>> unsupported_features({"peft_type": "LORA", "use_qalora": True})
[('/use_qalora', 'QA-LoRA (use_qalora: true) is not supported by adapterspec v1 readers')]
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import _adalora, _c3a, _delora, _gralora, _hra, _lora_init, _miss, _oft, _road, _vblora, _vera
from .errors import UnsupportedError, shorten
from .naming import VELORA_GROUPS

__all__ = ["NO_MODULES_TO_SAVE", "OFT_PEFT_VERSION", "PORTABLE_METHODS", "TASK_MODULES_TO_SAVE", "duplicate_entries",
           "merge_refusal", "not_portable", "prompt_init_refusal", "starts_at_zero",
           "peft_fan_in_fan_out", "prefix_key_value_sizes", "rule_problems", "task_takes", "training_refusals",
           "transformer_submodules", "unsupported_features", "velora_state_size"]

#: The methods whose tensors and math the spec defines (SPEC.md 4.1, 6, 8). The schema recognises every
#: other PEFT 0.21 method too ("recognised, not portable", SPEC.md 14): valid configs no v1 reader loads.
PORTABLE_METHODS = frozenset({
    "LORA",
    "IA3",
    "PREFIX_TUNING",
    "PROMPT_TUNING",
    "LOHA",
    "LOKR",
    "OFT",
    "BOFT",
    "P_TUNING",
    "ADALORA",
    "VERA",
    "TRAINABLE_TOKENS",
    "LN_TUNING",
    "ROAD",
    "MISS",  # SPEC.md 17.2
    "HRA",  # SPEC.md 17.3
    "VBLORA",  # SPEC.md 17.4
    "GRALORA",  # SPEC.md 17.5
    "DELORA",  # SPEC.md 17.6
    "C3A",  # SPEC.md 17.7
    "BEFT",  # SPEC.md 17.8
})


#: Portable methods whose PEFT config class has no ``modules_to_save`` (PEFT drops the field with a warning):
#: writers leave a null one out, readers refuse a non-null one (SPEC.md 15.2).
NO_MODULES_TO_SAVE = frozenset({
    "TRAINABLE_TOKENS",
})

#: The heads PEFT 0.21.2's task classes (``PeftModelForSequenceClassification``, ``...TokenClassification``,
#: ``...QuestionAnswering``) add to ``modules_to_save`` whenever they make or load an adapter of that
#: ``task_type``: an older config with a null ``modules_to_save`` still has its head saved whole (SPEC.md 4.3).
TASK_MODULES_TO_SAVE = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}

#: The keywords other than the inputs (``input_ids``, ``inputs_embeds``) that PEFT 0.21.2's class for each
#: ``task_type`` (``PeftModelForCausalLM``, ...) passes to the model's ``forward``, besides ``output_attentions``,
#: ``output_hidden_states`` and ``return_dict``.
_TASK_KEYWORDS: dict[str, tuple[str, ...]] = {
    "CAUSAL_LM": ("attention_mask", "labels"),
    "SEQ_CLS": ("attention_mask", "labels"),
    "TOKEN_CLS": ("attention_mask", "labels"),
    "QUESTION_ANS": ("attention_mask", "start_positions", "end_positions"),
    "SEQ_2_SEQ_LM": ("attention_mask", "decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds",
                     "labels"),
    "FEATURE_EXTRACTION": ("attention_mask",),
}
_FLAGS = ("output_attentions", "output_hidden_states", "return_dict")


def task_takes(task: str, model_class: type) -> bool:
    """Whether PEFT's class for ``task`` can call a model of ``model_class`` (a transformers class). That class takes
    ``input_ids`` first (a positional call binds the model's main input there), and passes ``input_ids=`` and
    ``inputs_embeds=`` (which carries the prompt of prompt tuning): the model's main input must be ``input_ids`` and
    its ``forward`` must name both -- one taken by ``**kwargs`` is passed on where the model gives it to a submodule
    itself too (``CLIPModel``: "got multiple values for keyword argument 'inputs_embeds'"); the other keywords it
    passes must be named or taken by ``**kwargs``. Where it cannot, a writer records no ``task_type``, as PEFT's
    own save of a config without one: PEFT then wraps the model in a plain ``PeftModel``, which passes the caller's
    arguments as they are (SPEC.md 9.1).

    >>> class Clip:
    ...     def forward(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs): ...
    >>> task_takes("FEATURE_EXTRACTION", Clip)
    False
    """
    if task not in _TASK_KEYWORDS:
        return True
    if getattr(model_class, "main_input_name", "input_ids") != "input_ids":
        return False
    try:
        parameters = inspect.signature(getattr(model_class, "forward")).parameters
    except (AttributeError, TypeError, ValueError):  # no signature to read: nothing tells against the task
        return True
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    named = {n for n, p in parameters.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                           inspect.Parameter.KEYWORD_ONLY)}
    return {"input_ids", "inputs_embeds"} <= named and (var_keyword or set(_TASK_KEYWORDS[task] + _FLAGS) <= named)


def transformer_submodules(config: Mapping[str, Any]) -> int:
    """Prefix/prompt tuning's ``num_transformer_submodules``; null means 2 for ``SEQ_2_SEQ_LM``, else 1 (SPEC 4.2.4).

    >>> transformer_submodules({"task_type": "SEQ_2_SEQ_LM", "num_transformer_submodules": None})
    2
    """
    value = config.get("num_transformer_submodules")
    if value is None:
        return 2 if config.get("task_type") == "SEQ_2_SEQ_LM" else 1
    return int(value)


def prefix_key_value_sizes(model_config: Mapping[str, Any], token_dim: int, heads: int) -> dict[str, int]:
    """PEFT 0.21.2's prefix-tuning sizes on a model with grouped-query attention (``_prepare_prompt_learning_config``,
    SPEC 14.3): ``token_dim`` and ``num_attention_heads`` recomputed from the model's key/value heads whenever its
    config (the ``to_dict()`` form; a multimodal one's ``text_config``) has ``num_key_value_heads`` -- over the
    adapter's own ``token_dim`` / ``heads``, which PEFT then ignores except for the head size of a model config
    without ``head_dim``; ``{}`` for other models. Gemma 4's ``global_head_dim`` / ``per_layer_config``: the
    widest layer's key/value shape.

    >>> prefix_key_value_sizes({"hidden_size": 8, "num_key_value_heads": 1, "head_dim": 4}, 8, 1)
    {'token_dim': 4, 'num_attention_heads': 1}
    """
    data = model_config.get("text_config") or model_config
    kv_heads = data.get("num_key_value_heads")
    if kv_heads is None:
        return {}
    if data.get("global_head_dim") is not None:
        head_dim = data["global_head_dim"]
        kv_heads = data.get("num_global_key_value_heads") or kv_heads
    elif data.get("per_layer_config") is not None:  # the widest layer's overrides (Gemma 4)
        head_dim = data.get("head_dim", token_dim // heads)
        base_heads, base_dim = kv_heads, head_dim
        for layer in data["per_layer_config"].values():
            if layer.get("head_dim", base_dim) > head_dim:
                head_dim, kv_heads = layer.get("head_dim", base_dim), layer.get("num_key_value_heads", base_heads)
    else:
        head_dim = data.get("head_dim") or token_dim // heads
    return {"token_dim": int(head_dim * kv_heads), "num_attention_heads": int(kv_heads)}


def rule_problems(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(JSON pointer, problem, fix)`` for each broken rule of SPEC.md 4.2 beyond the schema and the regexes.

    Rule 1 (every regular expression compiles) is :func:`adapterspec.targets.regex_problems`.
    """
    problems: list[tuple[str, str, str]] = []
    targets, feedforward = config.get("target_modules"), config.get("feedforward_modules")
    if config.get("peft_type") == "IA3" and isinstance(targets, list) and isinstance(feedforward, list):
        listed = set(targets)  # a set: both lists may hold thousands of entries
        problems.extend(
            (f"/feedforward_modules/{i}", f"{shorten(entry)} is not an entry of target_modules (feedforward modules must "
             "be targeted, PEFT's subset rule)", f"add {shorten(entry)} to target_modules, or remove it here")
            for i, entry in enumerate(feedforward) if entry not in listed)
    dim, heads = config.get("token_dim"), config.get("num_attention_heads")
    if config.get("peft_type") == "PREFIX_TUNING" and isinstance(dim, int) and isinstance(heads, int) and heads > 0 \
            and dim % heads:
        problems.append(("/token_dim", f"token_dim {dim} is not divisible by num_attention_heads {heads}",
                         "token_dim is num_attention_heads * head_dim (with grouped-query attention: the "
                         "number of key/value heads * head_dim)"))
    if config.get("peft_type") == "ADALORA":
        problems.extend(_adalora.rank_pattern_problems(config) + _adalora.schedule_problems(config))
    problems.extend(_oft.size_problems(config))
    problems.extend(_road.config_problems(config))
    problems.extend(_gralora.config_problems(config))
    return problems


#: LoRA fields that change the computation in ways adapterspec v1 readers do not implement (SPEC.md 2.6,
#: 4.1.2): field -> (is the value unsupported?, what the feature is).
_UNSUPPORTED_LORA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "alora_invocation_tokens": (lambda v: v is not None, "Activated LoRA (alora_invocation_tokens)"),
    "use_qalora": (lambda v: v is True, "QA-LoRA (use_qalora: true)"),
    "monteclora_config": (lambda v: v is not None, "MonteCLoRA (monteclora_config)"),
    "layer_replication": (lambda v: v is not None, "layer replication (layer_replication)"),
    "use_bdlora": (lambda v: v is not None, "block-diagonal LoRA (use_bdlora)"),
    "arrow_config": (lambda v: v is not None, "Arrow routing (arrow_config)"),
    "kasa_config": (lambda v: v is not None, "KaSA (kasa_config)"),
}


def duplicate_entries(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(JSON pointer, note)`` for each module selector listing an entry twice: valid (PEFT makes a set of
    it, so the duplicate changes nothing), but worth a warning.

    >>> duplicate_entries({"target_modules": ["q", "v", "q"]})
    [('/target_modules/2', "'q' is listed twice (PEFT uses a set; the duplicate changes nothing)")]
    """
    found = []
    for field in ("target_modules", "exclude_modules", "feedforward_modules"):
        entries = config.get(field)
        if isinstance(entries, list):
            seen: set[Any] = set()
            for i, entry in enumerate(entries):
                if not isinstance(entry, str):  # not a selector (a field the method does not know is unchecked)
                    continue
                if entry in seen:
                    found.append((f"/{field}/{i}", f"{entry!r} is listed twice (PEFT uses a set; the duplicate "
                                                   "changes nothing)"))
                seen.add(entry)
    return found


def not_portable(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``[("/peft_type", reason)]`` when the config's method is recognised but its math is not in the spec.

    >>> not_portable({"peft_type": "FOURIERFT"})[0][1]
    'FOURIERFT is recognised but not portable: the spec does not define its tensors or math yet (PEFT loads it)'
    >>> not_portable({"peft_type": "LORA"})
    []
    """
    method = config.get("peft_type")
    if not isinstance(method, str) or method in PORTABLE_METHODS:
        return []
    return [("/peft_type", f"{method} is recognised but not portable: the spec does not define its tensors or "
                           "math yet (PEFT loads it)")]


def unsupported_features(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(JSON pointer, reason)`` for each field set to a value adapterspec v1 readers do not implement.

    Check 5 of SPEC.md section 10: a reader MUST refuse such an adapter (``UnsupportedError``) rather
    than ignore the field; :func:`adapterspec.read_adapter` does, and :func:`adapterspec.validate_adapter`
    reports it as an error too -- a v1 validator answers "can a v1 reader load this", and none can. The
    config itself stays schema-valid (:func:`~adapterspec.config.validate_config` accepts it and
    writers round-trip it). A method that is recognised but not portable (:func:`not_portable`) comes first.
    """
    found = not_portable(config)
    if config.get("peft_type") == "LORA":
        for field, (unsupported, what) in _UNSUPPORTED_LORA.items():
            if unsupported(config.get(field)):
                found.append((f"/{field}", f"{what} is not supported by adapterspec v1 readers"))
        if config.get("velora_config") is not None and config.get("use_dora") is True:
            found.append(("/velora_config", "VeLoRA (velora_config) together with DoRA (use_dora: true) is refused by "
                                            "PEFT 0.21 (no LoRA variant combines them) and not supported by "
                                            "adapterspec v1 readers"))
    found.extend(_lora_init.unsupported(config))
    found.extend(_rotation_features(config))
    if config.get("peft_type") == "ADALORA":
        found.extend(_adalora.unsupported(config))
    if config.get("peft_type") == "VERA":
        found.extend(_vera.unsupported(config))
    found.extend(_miss.unsupported(config))
    found.extend(_hra.unsupported(config))
    found.extend(_gralora.unsupported(config))
    found.extend(_c3a.unsupported(config))
    if config.get("peft_type") == "VBLORA":
        found.extend(_vblora.unsupported(config))
    found.extend(_delora.unsupported(config))  # SPEC.md 17.6
    found.extend(_parameter_features(config))
    if config.get("peft_type") in NO_MODULES_TO_SAVE and config.get("modules_to_save"):
        found.append(("/modules_to_save", f"{config.get('peft_type')} has no modules_to_save (PEFT 0.21 drops the "
                                          "field with a warning); adapterspec readers refuse rather than ignore it"))
    return found


def training_refusals(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(JSON pointer, reason, hint)`` for each feature a backend that trains by plain gradient steps on the
    adapter's tensors would train differently from PEFT: such a backend refuses ``trainable`` for them (loading for
    inference, merging and saving stay as they are).

    >>> training_refusals({"peft_type": "LORA", "velora_config": {"num_groups": 4}})[0][0]
    '/velora_config'
    >>> training_refusals({"peft_type": "LORA"})
    []
    """
    found = []
    if config.get("peft_type") == "LORA" and config.get("velora_config") is not None:
        found.append(("/velora_config", "VeLoRA (velora_config) trains with the layer inputs compressed in the backward "
                                        "pass (approximate gradients), which plain gradient steps do not reproduce",
                      "train with PEFT, then load the saved adapter without trainable (or set velora_config to null "
                      "to train plain LoRA)"))
    if config.get("peft_type") == "LORA" and config.get("init_lora_weights") == "mica" and \
            config.get("target_parameters"):
        found.append(("/target_parameters", "MiCA (init_lora_weights 'mica') on parameters (target_parameters): PEFT "
                                            "0.21.2 has no MiCA variant for them, so which tensors it trains is "
                                            "undefined", "train with PEFT, or load the adapter without trainable"))
    if config.get("peft_type") == "VBLORA" and _vblora.topk_only(config):
        found.append(("/save_only_topk_weights", "a VB-LoRA adapter saved with save_only_topk_weights keeps only the "
                                                 "top-k of its logits (the rest are -inf): PEFT refuses to train it "
                                                 "('Found infinity values in VB-LoRA logits')",
                      "load it without trainable (inference, merging), or train from an adapter saved with "
                      "save_only_topk_weights false"))
    return found


#: The methods whose PEFT model sets ``fan_in_fan_out`` from each layer it adapts (LoRA, AdaLoRA, IA3, VeRA).
_FAN_IN_FAN_OUT_METHODS = frozenset({"LORA", "ADALORA", "IA3", "VERA", "VBLORA", "GRALORA"})


def peft_fan_in_fan_out(config: Mapping[str, Any], kinds: Iterable[str | None]) -> bool | None:
    """The ``fan_in_fan_out`` PEFT's ``get_peft_model`` leaves in the config it saves for a new adapter on layers of
    ``kinds`` (in model order; ``"conv1d_hf"`` a transformers Conv1D, ``"linear"`` a Linear, others leave it): it sets
    true on a Conv1D and false on a Linear, warning each time. ``None`` when the config's value stays (the math does
    not depend on it: readers take the layout from the layer, SPEC.md 8.1).

    >>> peft_fan_in_fan_out({"peft_type": "LORA"}, ["conv1d_hf", "conv1d_hf"])
    True
    >>> print(peft_fan_in_fan_out({"peft_type": "LORA", "fan_in_fan_out": False}, ["linear"]))
    None
    """
    if config.get("peft_type") not in _FAN_IN_FAN_OUT_METHODS:
        return None
    start = value = bool(config.get("fan_in_fan_out"))
    for kind in kinds:
        if kind == "conv1d_hf":
            value = True
        elif kind == "linear":
            value = False
    return value if value != start else None


def velora_state_size(config: Mapping[str, Any], in_features: int) -> int | None:
    """The length of VeLoRA's ``lora_velora_embed`` for a layer with ``in_features`` inputs (PEFT's group dimension,
    ``ceil(in_features / num_groups)``, SPEC.md 5.2), or ``None`` without ``velora_config``.

    >>> velora_state_size({"peft_type": "LORA", "velora_config": {"num_groups": 4}}, 10)
    3
    """
    velora = config.get("velora_config")
    if config.get("peft_type") != "LORA" or velora is None:
        return None
    groups = int(velora.get("num_groups", VELORA_GROUPS)) if isinstance(velora, Mapping) else VELORA_GROUPS
    return -(-int(in_features) // groups)


#: LoRA fields PEFT 0.21's ``ParamWrapper`` refuses (it raises ValueError): with a non-empty ``target_parameters``
#: the adapter cannot be loaded by PEFT, so readers refuse it too (SPEC.md 15.1). Field -> (is it set?, what).
_NOT_WITH_PARAMETERS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lora_dropout": (lambda v: bool(v), "lora_dropout other than 0"),
    "fan_in_fan_out": (lambda v: v is True, "fan_in_fan_out: true"),
    "lora_bias": (lambda v: v is True, "lora_bias: true"),
    "use_dora": (lambda v: v is True, "DoRA (use_dora: true)"),
    "velora_config": (lambda v: v is not None, "VeLoRA (velora_config)"),
}


def _parameter_features(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The LoRA options PEFT cannot combine with ``target_parameters`` (SPEC.md 15.1)."""
    if config.get("peft_type") != "LORA" or not config.get("target_parameters"):
        return []
    return [(f"/{field}", f"{what} together with target_parameters is refused by PEFT 0.21 (ParamWrapper) and not "
                          "supported by adapterspec readers")
            for field, (unsupported, what) in _NOT_WITH_PARAMETERS.items() if unsupported(config.get(field))]


#: The ``peft_version`` written with an OFT config that has none: PEFT 0.21 fails on a null version with
#: ``use_cayley_neumann`` (and warns on a missing one); the spec's math is this version's (SPEC.md 15.6).
OFT_PEFT_VERSION = "0.21.2"


def _rotation_features(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The OFT/BOFT variants adapterspec 1.1 readers refuse (SPEC.md 15.6, 15.7)."""
    method = config.get("peft_type")
    if method not in ("OFT", "BOFT"):
        return []
    found = []
    if config.get("bias", "none") != "none":
        found.append(("/bias", f"{method} with bias {config.get('bias')!r} (trained base biases) is not supported by "
                               "adapterspec readers"))
    if method == "OFT" and config.get("coft"):
        found.append(("/coft", "constrained OFT (coft: true; PEFT projects the weights in place on every forward) is "
                               "not supported by adapterspec readers"))
    version = config.get("peft_version")
    match = re.match(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
    if method == "OFT" and config.get("use_cayley_neumann", True) and match is not None \
            and (int(match[1]), int(match[2])) < (0, 18):
        found.append(("/peft_version", f"OFT's Cayley-Neumann series changed in PEFT 0.18; this adapter was written by "
                                       f"PEFT {version}, whose series adapterspec readers do not implement"))
    if method == "BOFT" and int(config.get("boft_n_butterfly_factor", 1) or 1) != 1:
        found.append(("/boft_n_butterfly_factor", "BOFT with more than one butterfly factor is not supported by "
                      "adapterspec readers (PEFT 0.21 builds it only with its CUDA extension and silently trains "
                      "one factor without it, whatever the config says)"))
    return found


def prompt_init_refusal(config: Mapping[str, Any]) -> UnsupportedError | None:
    """The refusal of a fresh ``PROMPT_TUNING`` adapter PEFT would initialise from its tokenizer: ``prompt_tuning_init``
    exactly ``"TEXT"`` or ``"SAMPLE_VOCAB"`` (PEFT compares the field with its ``str`` enum, so any other value --
    ``"RANDOM"``, ``"PromptTuningInit.TEXT"`` as a published tutorial writes it -- initialises at random, as the
    backends do; SPEC.md 4.1.5). ``None`` when the backends initialise it as PEFT does.

    >>> prompt_init_refusal({"peft_type": "PROMPT_TUNING", "prompt_tuning_init": "TEXT"}).pointer
    '/prompt_tuning_init'
    >>> prompt_init_refusal({"peft_type": "PROMPT_TUNING", "prompt_tuning_init": "PromptTuningInit.TEXT"}) is None
    True
    """
    value = config.get("prompt_tuning_init")
    if config.get("peft_type") != "PROMPT_TUNING" or not isinstance(value, str) or value not in ("TEXT", "SAMPLE_VOCAB"):
        return None
    return UnsupportedError(f"prompt_tuning_init {value!r} needs the tokenizer and PEFT's initialisation",
                            pointer="/prompt_tuning_init",
                            hint="inject with prompt_tuning_init 'RANDOM', or load a trained adapter")


def starts_at_zero(config: Mapping[str, Any]) -> bool:
    """Whether PEFT starts a fresh prefix-tuning prompt at zero: ``init_weights`` exactly ``"zero"`` (any other value
    is nn.Embedding's random start; SPEC.md 4.1.4).

    >>> starts_at_zero({"peft_type": "PREFIX_TUNING", "init_weights": "zero"}), starts_at_zero({"init_weights": "zero"})
    (True, False)
    """
    return config.get("peft_type") == "PREFIX_TUNING" and config.get("init_weights") == "zero"


def merge_refusal(active: Iterable[str], merged: Iterable[str], todo: Iterable[str],
                  layers: Iterable[tuple[str, Iterable[str]]]) -> UnsupportedError | None:
    """The refusal of merging ``todo`` into a layer where another active adapter stays unmerged (SPEC.md 8.9): a
    merged layer runs its base weight alone, as PEFT's, so that adapter would stop there while listed active (PEFT:
    0.14 off the unmerged outputs for two LoRAs, 0.59 with a DoRA). ``layers``: (path, adapters it holds) of the
    layers ``todo`` adapts; ``None`` when nothing would stop.

    >>> merge_refusal(["a", "b"], [], ["a"], [("q", ["a", "b"])]).key
    'b'
    >>> merge_refusal(["a"], [], ["a"], [("q", ["a", "b"])]) is None
    True
    """
    todo = list(todo)
    merged = set(merged)
    running = [n for n in active if n not in todo and n not in merged]
    for path, names in layers:
        other = next((n for n in running if n in set(names)), None)
        if other is not None:
            return UnsupportedError(
                f"merging {todo} into {path!r} would stop adapter {other!r} there, which is active and unmerged "
                "(a merged layer runs its base weight alone)", key=other,
                hint=f"merge every active adapter together, or deactivate {other!r} first (set_active_adapters)")
    return None
