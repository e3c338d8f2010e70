"""Which base model an adapter sits on: its task and the fingerprint of its weights (SPEC.md 9.1).

A keras-hub model does not remember the preset it came from: pass ``base_model_name_or_path=`` to
:func:`adapterspec.save_adapter` (or to :class:`~adapterspec_keras.training.AdapterCheckpoints`).
The fingerprint reads the base kernels in the spec's layout through each module's pieces
(:mod:`adapterspec_keras.sites`), gathering only the sampled elements.

>>> base_identity(model, "default")                                   # doctest: +SKIP
{'task_type': 'CAUSAL_LM', 'fingerprint': 'v1:5d1f...'}
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import numpy as np

from adapterspec._rules import task_takes
from adapterspec.errors import AdapterSpecError
from adapterspec.identity import fingerprint, sample_indices

from .devices import host_array
from .layers import AdapterLayer
from .quantized import quantization
from .sites import ModuleSite, Piece
from .switch import ModelState, _check, get_state

__all__ = ["base_identity", "remember_base", "task_type_of", "unmerged_base"]

#: keras-hub task classes -> PEFT's task types.
_TASKS = (("CausalLM", "CAUSAL_LM"), ("TextClassifier", "SEQ_CLS"), ("Seq2SeqLM", "SEQ_2_SEQ_LM"),
          ("Backbone", "FEATURE_EXTRACTION"))


def task_type_of(model: Any) -> str | None:
    """PEFT's ``task_type`` for a keras-hub model (a ``CausalLM`` -> ``"CAUSAL_LM"``), or ``None``.

    A backbone is ``"FEATURE_EXTRACTION"`` only when it reads token ids and transformers' model of it takes what
    PEFT's wrapper for that task passes (``input_ids=``, ``inputs_embeds=``; :func:`adapterspec._rules.task_takes`):
    an image backbone (ViT, DINOv2, Swin) and a dual encoder (CLIP, SigLIP, MetaCLIP 2: transformers' forward has
    no ``inputs_embeds``) record no task type (PEFT then wraps the model in a plain ``PeftModel``, as PEFT's own
    save of a config without one), as the torch backend's function of the same name.

    >>> import keras
    >>> task_type_of(keras.Sequential()) is None
    True
    """
    models = getattr(sys.modules.get("keras_hub"), "models", None)
    for name, task in _TASKS:
        cls = getattr(models, name, None)
        if cls is not None and isinstance(model, cls):
            if task == "FEATURE_EXTRACTION" and not (_reads_tokens(model) and _takes_embeddings(model)):
                return None
            return task
    return None


def _reads_tokens(model: Any) -> bool:
    """Whether a functional Keras model reads token ids (keras-hub's text, encoder-decoder and multimodal backbones)."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):  # a subclassed model that has not been called
        return False
    # text backbones take token_ids, encoder-decoder ones (T5, BART) encoder_token_ids; Whisper's decoder_token_ids
    # alone is not it (transformers' WhisperModel reads input_features, as the torch backend sees it)
    return any(str(getattr(each, "name", "")).split(":")[0] in ("token_ids", "encoder_token_ids")
               for each in inputs or ())




def _takes_embeddings(backbone: Any) -> bool:
    """Whether transformers' model of ``backbone`` takes ``inputs_embeds`` as PEFT's FEATURE_EXTRACTION wrapper passes
    it. A dual encoder (a text and a vision tower: CLIP, SigLIP, MetaCLIP 2) does not; another backbone is asked
    through transformers' class of the model type keras-hub's converter reads (``Blip2Model`` does not), where
    keras-hub has a converter for it and transformers is installed."""
    if getattr(backbone, "text_encoder", None) is not None and getattr(backbone, "vision_encoder", None) is not None:
        return False
    model_class = _transformers_class(backbone)
    return model_class is None or task_takes("FEATURE_EXTRACTION", model_class)


def _transformers_class(backbone: Any) -> type | None:
    """transformers' bare model class of the model type keras-hub's converter reads for ``backbone``, or ``None``
    (no converter, or no transformers)."""
    from .converters import converter_sites
    from .hf_names import _available

    if not _available():
        return None
    try:
        model_type = converter_sites(backbone)[1]
    except AdapterSpecError:  # a converter that does not replay on it: nothing known
        return None
    if model_type is None:
        return None
    import transformers
    from transformers.models.auto import modeling_auto

    name = modeling_auto.MODEL_MAPPING_NAMES.get(model_type)
    if isinstance(name, (tuple, list)):
        name = name[0]
    try:
        found = getattr(transformers, name) if isinstance(name, str) else None
    except (AttributeError, ImportError):  # a class whose own dependency is missing
        return None
    return found if isinstance(found, type) else None


def _kernel_index(piece: Piece, pin: np.ndarray, pout: np.ndarray) -> np.ndarray:
    """Flat indices into the variable of the piece's ``[n_in, n_out]`` kernel
    (:func:`adapterspec_keras._ops.flat_kernel`) at ``(pin, pout)``."""
    if piece.kind == "reverse" and piece.tied:
        flat: np.ndarray = pout * piece.n_in + pin  # embeddings are [vocab, hidden]
        return flat
    if piece.kind == "einsum":
        shape = tuple(int(d) for d in piece.kernel_variable.shape)
        where: list[Any] = [None] * len(shape)
        axes = [piece.kernel_spec.index(c) for c in piece.kin + piece.kout]
        for axis, coordinate in zip(axes, (*np.unravel_index(pin, piece.in_shape),
                                           *np.unravel_index(pout, piece.out_shape))):
            where[axis] = coordinate
        flat = np.asarray(np.ravel_multi_index(tuple(where), shape))
        return flat
    if piece.out_slice is not None:  # columns start:stop of a fused Dense kernel [n_in, all outputs]
        flat = pin * int(piece.kernel_variable.shape[-1]) + piece.out_slice[0] + pout
        return flat
    flat = pin * piece.n_out + pout
    return flat


#: (spec-layout shape, sample count, [(piece, which samples it holds, their flat indices in its variable)]).
_Plan = tuple[tuple[int, int], int, list[tuple[Piece, np.ndarray, np.ndarray]]]

#: site -> its sampling plan, computed once: a site's pieces and their index maps do not change once built,
#: and recomputing the plan was about a third of a fingerprint's cost.
_PLANS: weakref.WeakKeyDictionary[ModuleSite, _Plan] = weakref.WeakKeyDictionary()


def _plan(site: ModuleSite) -> _Plan:
    cached = _PLANS.get(site)
    if cached is not None:
        return cached
    n_in, n_out = site.in_features, site.out_features
    spec = np.asarray(sample_indices(n_in * n_out), dtype=np.int64)
    if site.kind == "embedding":  # torch's embedding weight is [num_embeddings, dim] = [in, out]
        shape, (feature_in, feature_out) = (n_in, n_out), np.divmod(spec, n_out)
    else:  # a linear layer's weight is [out, in]
        shape, (feature_out, feature_in) = (n_out, n_in), np.divmod(spec, n_in)
    parts = []
    for piece in site.pieces:
        inverse_in = np.full(n_in, -1, dtype=np.int64)
        inverse_in[piece.in_index.ravel()] = np.arange(piece.n_in)
        inverse_out = np.full(n_out, -1, dtype=np.int64)
        inverse_out[piece.out_index.ravel()] = np.arange(piece.n_out)
        pin, pout = inverse_in[feature_in], inverse_out[feature_out]
        mine = (pin >= 0) & (pout >= 0)
        if mine.any():
            parts.append((piece, mine, _kernel_index(piece, pin[mine], pout[mine])))
    plan = ((shape[0], shape[1]), int(spec.size), parts)
    _PLANS[site] = plan
    return plan


def _conv_samples(site: ModuleSite) -> tuple[tuple[int, ...], np.ndarray] | None:
    """A conv site's weight in torch's layout ``[out, in / groups, *k]`` (Keras: ``[*k, in / groups, out]``)."""
    if len(site.pieces) != 1 or not np.array_equal(site.pieces[0].out_index.ravel(), np.arange(site.out_features)):
        return None
    variable = site.pieces[0].kernel_variable
    kernel = tuple(int(d) for d in variable.shape)
    shape = (kernel[-1], kernel[-2], *kernel[:-2])
    spec = np.unravel_index(np.asarray(sample_indices(int(np.prod(shape))), dtype=np.int64), shape)
    flat = np.ravel_multi_index((*spec[2:], spec[1], spec[0]), kernel)
    return shape, host_array(variable).reshape(-1)[flat].astype(np.float32)


def _replaced(state: ModelState | None) -> dict[int, np.ndarray]:
    """id(variable) -> its value before any adapter's file replaced it (SPEC.md 5.3: an embedding saved whole), so
    that the fingerprint describes the base, as the torch backend's does."""
    if state is None:
        return {}
    overrides = [o for each in state.base_weights.values() for o in each]
    later = {id(o.superseded_by) for o in overrides if o.superseded_by is not None}
    return {id(o.variable): o.old for o in overrides if id(o) not in later}  # the first override's old value


def _site_samples(site: ModuleSite, replaced: dict[int, np.ndarray] | None = None) -> tuple[tuple[int, ...], np.ndarray] | None:
    """The spec-layout shape of the site's base weight and its sampled elements, or ``None`` when unknown.

    :param replaced: base values of variables an adapter's file replaced (:func:`_replaced`)."""
    if any(quantization(piece.layer) for piece in site.pieces):  # packed or scaled values (SPEC.md 6.8): unknown
        return None
    if site.kind == "conv":
        return _conv_samples(site)
    shape, count, parts = _plan(site)
    values: np.ndarray | None = None
    for piece, mine, flat in parts:
        # one read of the variable, then NumPy picks the elements: a framework op per sample set cost ~1.8 ms per module
        variable = piece.kernel_variable
        base = (replaced or {}).get(id(variable))
        picked = (np.asarray(base) if base is not None else host_array(variable)).reshape(-1)[flat]
        if len(parts) == 1 and flat.size == count:  # one piece holds every sample, in order (most modules)
            values = picked.astype(np.float32)
            break
        if values is None:
            values = np.full(count, np.nan, dtype=np.float32)
        values[mine] = picked
    return (shape, values) if values is not None and not np.isnan(values).any() else None


def remember_base(state: ModelState, names: list[str]) -> None:
    """Before ``names`` are merged: keep the fingerprint samples of each module they go into that holds no merged
    adapter yet (its kernel is the base), so that a save while merged records the base, not the merged weights.

    >>> remember_base(get_state(model), ["default"])                    # doctest: +SKIP
    """
    for key, layer in state.adapter_layers.items():
        if not isinstance(layer, AdapterLayer):  # a module saved whole: not part of the base's fingerprint
            continue
        if not layer.merged and any(n in layer._slots for n in names):  # its kernel is the base now: (re)sample
            state.base_samples[key] = (_site_samples(layer.site, _replaced(state)), None)


def unmerged_base(state: ModelState) -> None:
    """After an unmerge: note what each module's kernel holds now. Subtracting a delta can round differently from
    the addition, so the kernel may differ from the base in the last bit; while it stays as the unmerge left it,
    the fingerprint still describes the base the adapter was trained on (the samples kept by :func:`remember_base`).
    """
    for key in list(state.base_samples):
        layer = state.adapter_layers.get(key)
        kept = state.base_samples[key][0]
        if layer is None or kept is None:
            del state.base_samples[key]
            continue
        state.base_samples[key] = (kept, _site_samples(layer.site, _replaced(state)))


def _same(a: tuple[tuple[int, ...], np.ndarray] | None, b: tuple[tuple[int, ...], np.ndarray] | None) -> bool:
    return a is not None and b is not None and a[0] == b[0] and a[1].tobytes() == b[1].tobytes()


def _embedding_samples(model: Any, replaced: dict[int, np.ndarray] | None = None) -> \
        tuple[str, tuple[tuple[int, ...], np.ndarray]] | None:
    """Prefix and prompt tuning: the input embedding's spec module path (``model.embed_tokens``) and samples."""
    from .converters import backbone_of
    from .mapping import spec_sites

    token_embedding = getattr(backbone_of(model), "token_embedding", None)
    if token_embedding is None:
        return None
    for path, site in spec_sites(model).items():
        if site.kind == "embedding" and len(site.pieces) == 1 and site.pieces[0].layer is token_embedding \
                and site.pieces[0].kind == "embedding":
            sampled = _site_samples(site, replaced)
            return None if sampled is None else (path, sampled)
    return None


def _fingerprint(model: Any, adapter_name: str) -> str | None:
    state = get_state(model)
    if state is None:
        return None
    replaced = _replaced(state)
    if adapter_name in state.prompts:
        found = _embedding_samples(model, replaced)
        return None if found is None else fingerprint(dict([found]))
    weights: dict[str, Any] = {}
    for key, layer in state.adapter_layers.items():
        if not isinstance(layer, AdapterLayer):  # a module saved whole: not part of the base's fingerprint
            continue
        slot = layer._slots.get(adapter_name)
        if slot is None:
            continue
        kept, after_unmerge = state.base_samples.get(key, (None, None))
        if layer.merged:  # merged deltas are in the kernel: only the samples taken before the merge describe the base
            sampled = kept
        else:
            sampled = _site_samples(layer.site, replaced)
            if kept is not None and _same(sampled, after_unmerge):
                sampled = kept
        if sampled is None:
            return None
        weights[slot.path] = sampled
    return fingerprint(weights) if weights else None


def base_identity(model: Any, adapter_name: str) -> dict[str, str]:
    """What ``model`` tells about the base ``adapter_name`` sits on: ``task_type`` (from the keras-hub task class)
    and ``fingerprint`` -- each only when known (prefix/prompt tuning: of the input embedding keras-hub's
    converter names; merged adapters: of the kernels before the merge).

    :raises AdapterNotFoundError: no such adapter.
    """
    _check(get_state(model), [adapter_name])
    out: dict[str, str] = {}
    task = task_type_of(model)
    if task is not None:
        out["task_type"] = task
    fp = _fingerprint(model, adapter_name)
    if fp is not None:
        out["fingerprint"] = fp
    return out
