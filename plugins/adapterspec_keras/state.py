"""Adapter tensors in and out: load a file's tensors into injected layers, extract them with canonical keys.

The file holds PEFT's layout (``lora_A.weight`` ``[r, in]``, ``lora_B.weight`` ``[out, r]``...). The
variables keep it for LoRA on Dense/EinsumDense/Embedding (the layer transposes in its math) and hold Keras
layout for convolutions; :class:`~adapterspec_keras.layers.Layout` converts both ways, exactly.

Loading looks each key up among the injected parameters' canonical keys (parsing only the others), checks
everything, then fills the adapter's bank: a frozen adapter becomes one variable made of the very buffer the
file was read into (:func:`_fill_banks`), so a load copies the data once, from the file.

>>> load_state(model, adapterspec.read_adapter("my-lora"), "default", LoadOptions())  # doctest: +SKIP
['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', ...]
>>> config, tensors = extract_state(model, "default")                  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from adapterspec import Adapter, AdapterConfig, LoadOptions
from adapterspec.errors import (
    AdapterNotFoundError,
    MissingTensorError,
    ShapeMismatchError,
    TargetNotFoundError,
    UnexpectedTensorError,
)
from adapterspec.naming import (
    BASE_LAYER_PARAM,
    MAX_KEY_LENGTH,
    PARAMETERS,
    PROMPT_KEY,
    TRAINABLE_TOKENS_PARAM,
    VELORA_STATE,
    make_key,
    parse_key,
)

from adapterspec._method_checks import velora_state_error
from adapterspec._vera import shared_key

from . import vblora, vera
from .auxiliary import Target, apply_overrides, auxiliary_tensors, plan_auxiliary
from .tying import check_tied_tensors
from .bank import Ref
from .layers import AdapterLayer, Layout
from .mapping import equivalent, find_site, spec_sites
from .sites import ModuleSite, keras_lora, model_layers
from .switch import get_state, own_state

__all__ = ["expected_params", "extract_state", "load_state"]

#: What holds an adapter's tensors: its layers, and VeRA's shared projections.
_Holder = AdapterLayer | vera.Shared


def _shared_of(layers: list[AdapterLayer], adapter_name: str) -> vera.Shared | None:
    """VeRA: the adapter's shared projections (every layer refers to the same), else ``None``."""
    for layer in layers:
        if type(layer) is AdapterLayer:
            return layer.shared_of(adapter_name)
    return None


def _layers_of(model: Any, adapter_name: str) -> list[AdapterLayer]:
    state = own_state(model)
    if state is None or adapter_name not in state.names:
        loaded = state.names if state is not None else []
        hint = "load or inject it first"
        if any(keras_lora(layer) for layer in model_layers(model)):
            hint += ("; this model has Keras' own LoRA (enable_lora), which adapterspec_keras.keras_lora_adapter(model) "
                     "reads as an adapter (adapterspec.write_adapter writes it)")
        raise AdapterNotFoundError(f"no adapter named {adapter_name!r} is loaded (loaded: {loaded})",
                                   key=adapter_name, hint=hint)
    return [layer for layer in state.adapter_layers.values() if adapter_name in layer.adapter_names()]


def expected_params(model: Any, adapter_name: str) -> dict[str, tuple[_Holder, str, Layout]]:
    """Canonical key -> (adapter layer, spec parameter name, layout), for every tensor adapter ``adapter_name`` stores.

    >>> sorted(expected_params(model, "default"))[0]                    # doctest: +SKIP
    'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
    """
    out: dict[str, tuple[_Holder, str, Layout]] = {}
    layers = _layers_of(model, adapter_name)
    for layer in layers:
        path = layer.path_of(adapter_name)
        for param, layout in layer.layouts(adapter_name).items():
            out[make_key(path, param)] = (layer, param, layout)
    shared = _shared_of(layers, adapter_name)
    if shared is not None:  # VeRA's projections, stored once (SPEC.md 15.5)
        for param, layout in shared.layouts.items():
            out[shared_key(param)] = (shared, param, layout)
    return out


def _owner(module: str, by_path: dict[str, AdapterLayer],
           sites: Callable[[], dict[str, ModuleSite]] | None = None) -> AdapterLayer | None:
    """The injected layer of file module ``module``: by path, up to a leading prefix, or (given ``sites``) by
    another name of the same Keras site (transformers 5's module path for a checkpoint key, or back)."""
    if module in by_path:
        return by_path[module]
    known = sites() if sites is not None else {}
    if module in known:
        # a site's own name decides before a suffix match: T5Gemma 2's checkpoint key
        # ``encoder.layers.0.self_attn.k_proj`` (the text encoder) also ends the vision tower's module path
        # ``encoder.vision_tower.encoder.layers.0.self_attn.k_proj``
        found = [layer for layer in by_path.values() if layer.site.key == known[module].key]
        return found[0] if len(found) == 1 else None
    found = [layer for path, layer in by_path.items() if equivalent(path, module, layer.site.root)]
    if len(found) == 1 or sites is None:
        return found[0] if len(found) == 1 else None
    site = find_site(known, module)
    found = [layer for layer in by_path.values() if site is not None and layer.site.key == site.key]
    return found[0] if len(found) == 1 else None


def _plan_other(model: Any, key: str, adapter: Adapter, by_path: dict[str, AdapterLayer], adapter_name: str,
                options: LoadOptions, base_plan: dict[str, AdapterLayer], aux_plan: dict[str, list[Target]],
                unmapped: list[str], kept: list[str]) -> tuple[tuple[AdapterLayer, str, Layout], str] | None:
    """Where a key that is not an injected parameter's canonical key goes: an injected parameter under another
    module root (``h.0.attn.c_attn``; with the file's module path), a module's base weight (into ``base_plan``), a
    base tensor the file replaces (an embedding saved whole, a trained bias: into ``aux_plan``), a tensor kept as
    it is to be saved again (VeLoRA's ``lora_velora_embed`` of an adapted module: into ``kept``), an unmapped
    module (into ``unmapped``) -- else an error."""
    config = adapter.config
    name = parse_key(key, config.peft_type, config, with_model=True)  # an embedding saved whole: plan_auxiliary checks it

    def sites() -> dict[str, ModuleSite]:
        return spec_sites(model, options)

    if name.role == "base_layer" and (owner := _owner(name.module, by_path, sites)) is not None:
        base_plan[key] = owner
        return None
    if name.role == "ignored":  # PEFT's bookkeeping copies (SPEC.md 5.4): accepted, not loaded, saved again
        kept.append(key)
        return None
    if name.role in ("embedding", "bias"):  # base tensors the file replaces (SPEC.md 5.3, 8.8)
        owner = _owner(name.module, by_path, sites)
        shape = tuple(int(d) for d in adapter.tensors[key].shape)
        aux_plan[key] = plan_auxiliary(model, key, name, shape, owner, sites, options)
        return None
    if name.role == "modules_to_save" and find_site(sites(), name.module) is None:
        from .modules_to_save import converter_modules

        if name.module not in converter_modules(model):  # check 18 before 19, as on torch
            raise TargetNotFoundError(
                f"module {name.module!r}, saved whole (modules_to_save), is not a module of this Keras model: "
                "keras-hub's converter does not port it (a task head keras-hub builds afresh, e.g. a text "
                "classifier's), so no layer holds PEFT's weights for it", key=key,
                hint="load this adapter with the torch backend (keras-hub's head is not the one PEFT saved), or "
                     "pass module_map={spec module path: keras layer path}")
    if name.role != "adapter":
        raise UnexpectedTensorError(f"{name.role} tensors have no place in this adapter on the Keras model",
                                    key=key, hint="drop the tensor, or add its module to target_modules")
    layer = _owner(name.module, by_path, sites)
    if name.param == VELORA_STATE and layer is not None:  # SPEC.md 5.2: accepted, never used, saved again
        in_features = layer.site.in_features if layer.site.kind == "linear" else None
        problem = velora_state_error(config, name.module, tuple(int(d) for d in adapter.tensors[key].shape),
                                     in_features)
        if problem is not None:
            raise problem
        kept.append(key)
        return None
    if layer is None:
        if find_site(sites(), name.module) is None:
            unmapped.append(name.module)
            return None
        raise UnexpectedTensorError(f"module {name.module!r} received no adapter at injection", key=key,
                                    hint="check target_modules / exclude_modules / layers_to_transform")
    layouts = layer.parameters(adapter_name)[1]
    if name.param not in layouts:
        raise UnexpectedTensorError(
            f"{name.param!r} is not a parameter of this {config.peft_type} adapter on {name.module!r} "
            f"(expected: {sorted(layouts)})", key=key, hint="remove the tensor, or fix the config")
    return (layer, name.param, layouts[name.param]), name.module


def _mirror_bookkeeping(tensors: dict[str, np.ndarray], config: AdapterConfig) -> None:
    """PEFT's ``<m>.modules_to_save.<p>`` copy (``bias="all"``, SPEC.md 5.4) is the module copy's ``<p>``: saved
    again as the copy holds it now, as the torch backend mirrors it (``original_module.<p>``: as the file had it)."""
    for key in list(tensors):
        if ".modules_to_save." not in key:
            continue
        name = parse_key(key, config.peft_type, config, with_model=True)
        live = make_key(name.module, name.param.removeprefix("modules_to_save."))
        if name.role == "ignored" and live in tensors:
            tensors[key] = tensors[live]


def _refuse_truncated_vocabulary(layer: AdapterLayer, key: str, shape: tuple[int, ...],
                                 expected: tuple[int, ...]) -> None:
    """A tensor with more vocabulary rows than the Keras embedding keeps: keras-hub's converter truncated the
    vocabulary (PaliGemma keeps the tokens below ``image_token_index``). Refused with the reason (SPEC.md 12):
    the adapter's rows for the dropped tokens have no place, and loading the others alone would change what
    the adapter computes."""
    pieces = [p for p in layer.site.pieces if p.kind in ("embedding", "reverse")]
    differ = [i for i, (a, b) in enumerate(zip(shape, expected)) if a != b]
    if not pieces or len(shape) != len(expected) or len(differ) != 1:
        return
    rows = int(pieces[0].layer.embeddings.shape[0])
    axis = differ[0]
    if expected[axis] != rows or shape[axis] <= rows:
        return
    raise ShapeMismatchError(
        f"the adapter has {shape[axis]} vocabulary rows where the Keras embedding {pieces[0].layer.path!r} keeps "
        f"{rows}: keras-hub's converter truncated the vocabulary (PaliGemma keeps the tokens below "
        f"image_token_index), so the adapter's rows for the {shape[axis] - rows} dropped tokens have no place and "
        "it is refused rather than loaded in part", key=key,
        hint="leave the embedding and lm_head out of target_modules, or use the torch backend")


def load_state(model: Any, adapter: Adapter, adapter_name: str, options: LoadOptions) -> list[str]:
    """Put ``adapter``'s tensors into the layers injected for ``adapter_name``: all checks first, then assign.

    A file may name modules relative to another root than the built-in mapping (``h.0.attn.c_attn``
    for ``transformer.h.0.attn.c_attn``); such modules take the file's name, so saving gives the
    same keys back.

    :returns: the canonical keys loaded.
    :raises TargetNotFoundError: a tensor's module has no counterpart in the Keras model.
    :raises MissingTensorError: an injected parameter has no tensor in the file.
    :raises UnexpectedTensorError: a tensor has no injected parameter.
    :raises ShapeMismatchError: a tensor's shape does not fit its parameter.

    >>> load_state(model, adapter, "default", LoadOptions())           # doctest: +SKIP
    """
    layers = _layers_of(model, adapter_name)
    state = get_state(model)
    if state is not None and adapter_name in state.prompts:
        return _load_prompt(state, adapter_name, adapter)
    config = adapter.config
    # every injected parameter under its canonical key: a file PEFT wrote names them so, and each of its
    # keys is then a lookup; any other key (another module root, a base weight, an error) is parsed
    known = frozenset((*PARAMETERS.get(config.peft_type, ()), TRAINABLE_TOKENS_PARAM))
    canonical: dict[str, tuple[_Holder, str, Layout]] = {}
    by_path: dict[str, AdapterLayer] = {}
    for layer in layers:
        path, layouts, _ = layer.parameters(adapter_name)
        by_path[path] = layer
        if "" in path.split("."):  # malformed: parse_key refuses its keys
            continue
        for param, layout in layouts.items():
            key = make_key(path, param)
            if (param in known or getattr(layer, "saves_whole", False)) and len(key) <= MAX_KEY_LENGTH:
                canonical[key] = (layer, param, layout)
    shared = _shared_of(layers, adapter_name)
    if shared is not None:  # VeRA's projections, stored once (SPEC.md 15.5)
        for param, layout in shared.layouts.items():
            canonical[shared_key(param)] = (shared, param, layout)
    plan: dict[str, tuple[_Holder, str, Layout]] = {}
    renames: dict[int, tuple[AdapterLayer, str]] = {}
    unmapped: list[str] = []
    base_plan: dict[str, AdapterLayer] = {}
    aux_plan: dict[str, list[Target]] = {}
    kept: list[str] = []
    for key, info in adapter.tensors.items():
        entry = canonical.get(key)
        if entry is None:
            other = _plan_other(model, key, adapter, by_path, adapter_name, options, base_plan, aux_plan, unmapped,
                                kept)
            if other is None:
                continue
            (owner, name, owned), module = other
            if module != owner.path_of(adapter_name):
                renames[id(owner)] = (owner, module)
            entry = (owner, name, owned)
        holder, param, layout = entry
        if tuple(info.shape) != layout.spec_shape:
            if isinstance(holder, vera.Shared) and param in vblora.SHARED:  # SPEC.md 17.4
                raise ShapeMismatchError(
                    f"shape {list(info.shape)} does not fit this model's VB-LoRA vector bank: expected "
                    f"{list(layout.spec_shape)} (num_vectors, vector_length)", key=key,
                    hint="set num_vectors and vector_length to the bank's shape, or save the adapter again with PEFT")
            if isinstance(holder, vera.Shared):
                raise ShapeMismatchError(
                    f"shape {list(info.shape)} does not fit this model's VeRA projection: expected "
                    f"{list(layout.spec_shape)} (r, and the largest input / output size of the adapted modules)",
                    key=key, hint="the adapter was trained for another base model, or targets other modules")
            _refuse_truncated_vocabulary(holder, key, tuple(info.shape), layout.spec_shape)
            raise ShapeMismatchError(
                f"shape {list(info.shape)} does not fit the Keras layer(s) "
                f"{[p.layer.path for p in holder.site.pieces]}: expected {list(layout.spec_shape)}", key=key,
                hint="the adapter was trained for another base model (or a different size)")
        plan[key] = entry
    if unmapped:
        from .auxiliary import absent_modules

        mods = sorted(set(unmapped))
        raise absent_modules(model, mods, mods[0])
    covered = {(id(holder), param) for holder, param, _ in plan.values()}
    for layer in layers:
        for param in layer.parameters(adapter_name)[1]:
            if (id(layer), param) not in covered:
                raise MissingTensorError(f"the file has no {param!r} for module {layer.path_of(adapter_name)!r}",
                                         key=make_key(layer.path_of(adapter_name), param),
                                         hint="the adapter file is incomplete, or targets other modules")
    for param in shared.layouts if shared is not None else ():
        if (id(shared), param) not in covered and param in vblora.SHARED:  # SPEC.md 17.4
            raise MissingTensorError(f"the file has no shared VB-LoRA vector bank {param!r}", key=shared_key(param),
                                     hint="save the adapter again with PEFT (it stores the bank once per adapter)")
        if (id(shared), param) not in covered:
            raise MissingTensorError(f"the file has no shared VeRA projection {param!r}", key=shared_key(param),
                                     hint="save the adapter again with save_projection true (PEFT's default)")
    for key, layer in base_plan.items():
        layer.check_base_weight(tuple(adapter.tensors[key].shape), key)
    arrays = adapter.load_tensors("numpy")  # the contract: tensors come through the Adapter
    vblora.check_values(adapter.config, arrays)  # SPEC.md 17.4: index and weight values, before anything is assigned
    if state is not None:
        check_tied_tensors(state, adapter_name, arrays)  # SPEC.md 15.2, before anything is assigned
    fill = _check_tied(plan, arrays, adapter_name, layers)
    root = _owned_buffer(arrays) if adapter.arrays is None else None  # not an in-memory adapter's (the caller's)
    for key, layer in base_plan.items():
        layer.replace_base_weight(adapter_name, arrays[key])
    if aux_plan and state is not None:
        apply_overrides(state, adapter_name, aux_plan, arrays)
    if kept and state is not None:
        state.auxiliary.setdefault(adapter_name, {}).update(
            {key: np.ascontiguousarray(arrays[key]).copy() for key in kept})
    for layer, path in renames.values():
        layer.rename(adapter_name, path)
    _fill_banks(fill, arrays, adapter_name, root)
    state = get_state(model)
    if state is not None:
        state.modules[adapter_name] = [layer.path_of(adapter_name) for layer in layers]
        stored = {key: arrays[key].dtype for key, (layer, param, _) in plan.items()  # upcast by SPEC.md 7.5
                  if arrays[key].dtype.itemsize == 2 and str(arrays[key].dtype) in ("float16", "bfloat16")
                  and layer.parameters(adapter_name)[2][param].key.dtype == "float32"}
        if stored:
            state.stored_dtypes[adapter_name] = stored
    return list(plan)


def _check_tied(plan: dict[str, tuple[_Holder, str, Layout]], arrays: Mapping[str, Any], adapter_name: str,
                layers: list[AdapterLayer]) -> dict[str, tuple[_Holder, str, Layout]]:
    """``plan`` with each bank row once: a row several keys name (a tied layer's ``trainable_tokens_delta``, the
    input embedding's, SPEC.md 15.2) takes the first layer's tensor, and the others must equal it.

    :raises UnexpectedTensorError: naming the key of a tied layer whose tensor differs.
    """
    order = {id(layer): i for i, layer in enumerate(layers)}
    by_ref: dict[Any, list[str]] = {}
    for key, (holder, param, _) in plan.items():
        if isinstance(holder, AdapterLayer):
            by_ref.setdefault(holder.parameters(adapter_name)[2][param], []).append(key)
    fill = dict(plan)
    for keys in by_ref.values():
        if len(keys) < 2:
            continue
        first, *others = sorted(keys, key=lambda k: order.get(id(plan[k][0]), len(order)))
        for key in others:
            if arrays[key].shape != arrays[first].shape or not np.array_equal(arrays[key], arrays[first]):
                raise UnexpectedTensorError(f"the tied layer's tensor must equal {first}, and it does not", key=key,
                                            hint="save the adapter again from the tied model")
            del fill[key]
    return fill


def _load_prompt(state: Any, adapter_name: str, adapter: Adapter) -> list[str]:
    """Prefix tuning: the single ``prompt_embeddings`` tensor, ``[num_virtual_tokens, 2 * layers * token_dim]``."""
    slot = state.prompts[adapter_name]
    expected = slot.layout.spec_shape
    extra = sorted(k for k in adapter.tensors if k != PROMPT_KEY)
    if extra:
        raise UnexpectedTensorError(f"a prefix-tuning adapter stores only {PROMPT_KEY!r}", key=extra[0],
                                    hint="remove the other tensors")
    if PROMPT_KEY not in adapter.tensors:
        raise MissingTensorError(f"the file has no {PROMPT_KEY!r}", key=PROMPT_KEY, hint="the adapter is incomplete")
    if tuple(adapter.tensors[PROMPT_KEY].shape) != expected:
        raise ShapeMismatchError(f"shape {list(adapter.tensors[PROMPT_KEY].shape)} does not fit this model's "
                                 f"prefix {list(expected)}", key=PROMPT_KEY,
                                 hint="load the adapter into the model it was trained for")
    value = np.asarray(adapter.load_tensors("numpy")[PROMPT_KEY])[None]
    if slot.bank.materialized:
        slot.bank.variable(slot.ref.key).assign(value.astype(_np_dtype(slot.ref.key.dtype)))
    else:
        slot.bank.materialize({slot.ref.key: value.astype(_np_dtype(slot.ref.key.dtype))})
    if str(value.dtype) in ("float16", "bfloat16") and slot.ref.key.dtype == "float32":  # upcast by SPEC.md 7.5
        state.stored_dtypes[adapter_name] = {PROMPT_KEY: value.dtype}
    else:
        state.stored_dtypes.pop(adapter_name, None)
    return [PROMPT_KEY]


_HUGE_PAGE = 2 << 20


def _aligned_empties(specs: list[tuple[tuple[int, ...], Any]], align: int = 64) -> tuple[np.ndarray, list[np.ndarray]]:
    """Empty arrays of these (shape, dtype), each ``align``-byte aligned (TensorFlow can then use it without a
    copy), carved from one allocation -- and that allocation's span holding them all (``uint8``): one large
    buffer is backed by huge pages (NumPy advises them from 4 MiB), where several smaller ones would take a
    page fault every 4 KiB on first write."""
    sizes = [-(-math.prod(shape) * np.dtype(dtype).itemsize // align) * align for shape, dtype in specs]
    total = sum(sizes)
    first = _HUGE_PAGE if total >= 2 * _HUGE_PAGE else align
    raw = np.empty(total + first, dtype=np.uint8)
    offset = (-raw.ctypes.data) % first
    region = raw[offset:offset + total]
    out = []
    for (shape, dtype), size in zip(specs, sizes):
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        out.append(raw[offset:offset + nbytes].view(dtype).reshape(shape))
        offset += size
    return region, out


#: An arena made of the buffer the file was read into holds every tensor of the file: not when the adapter's own
#: tensors are less than this share of it (a file with a full embedding matrix beside its LoRA factors).
_MIN_SHARE = 0.9


def _owned_buffer(arrays: dict[str, Any]) -> np.ndarray | None:
    """The buffer ``arrays`` are all views of, if nothing else refers to it or them (CPython reference counts:
    a cache of the dict, of a view or of the buffer would see an arena made of it change), else ``None``."""
    root = getattr(next(iter(arrays.values()), None), "base", None)
    if not isinstance(root, np.ndarray) or root.base is not None or root.ndim != 1 or root.dtype != np.uint8 \
            or not root.flags.writeable or not hasattr(sys, "getrefcount"):
        return None
    # the dict: load_state's name for it, this parameter, getrefcount's argument
    if sys.getrefcount(arrays) != 3:
        return None
    for view in arrays.values():
        # each view: the dict, the loop's name, getrefcount's argument
        if type(view) is not np.ndarray or view.base is not root or sys.getrefcount(view) != 3:
            return None
    # the buffer: each view's base, the name root, getrefcount's argument
    return root if sys.getrefcount(root) == len(arrays) + 2 else None


def _shared_arena(plan: dict[str, tuple[_Holder, str, Layout]], arrays: Mapping[str, np.ndarray],
                  root: np.ndarray, adapter_name: str, dtype: Any) -> tuple[np.ndarray, dict[Any, tuple[int, int]]] | None:
    """The arena as a span of ``root``, the buffer the file was read into (no copy): each row where the file has
    it. Only when every planned tensor is stored as the file has it (spec layout, the variables' dtype)."""
    dtype = np.dtype(dtype)
    itemsize = dtype.itemsize
    base = root.ctypes.data
    places = []
    nbytes = 0
    for key, (layer, param, layout) in plan.items():
        array = arrays[key]
        if not (array.dtype is dtype or array.dtype == dtype) or not layout.spec_stored or not array.flags.c_contiguous:
            return None
        try:  # its address (a fifth of array.ctypes.data's time)
            at = ctypes.addressof(ctypes.c_char.from_buffer(array)) - base  # type: ignore[arg-type]  # numpy's stubs: __buffer__ on 3.12+
        except (TypeError, ValueError, BufferError):  # read-only or empty
            return None
        places.append((layer.parameters(adapter_name)[2][param], at, at + array.nbytes))
        nbytes += array.nbytes
    first, last = min(p[1] for p in places), max(p[2] for p in places)
    start = first - (base + first) % _ALIGN  # TensorFlow wants the start 64-byte aligned: take a few bytes before
    if start < 0 or (first - start) % itemsize or nbytes < _MIN_SHARE * (last - first):
        return None
    if any((at - start) % itemsize for _, at, _ in places):
        return None
    flat = root[start:start + (last - start) // itemsize * itemsize].view(dtype)
    return flat, {ref: ((at - start) // itemsize, (end - start) // itemsize) for ref, at, end in places}


#: TensorFlow's kernels' alignment (see :func:`adapterspec_keras.bank.as_tensor`).
_ALIGN = 64


def _fill_banks(plan: dict[str, tuple[_Holder, str, Layout]], arrays: Mapping[str, Any], adapter_name: str,
                root: np.ndarray | None = None) -> None:
    """Write the tensors into the bank, in the variables' layout (:meth:`Layout.to_stored`: the file's rows as
    they are for LoRA on Dense/EinsumDense/Embedding, a transposing copy for convolutions).

    A frozen adapter of one dtype becomes one arena variable (:meth:`AdapterBank.materialize_arena`): made of
    ``root``, the buffer the file was read into, when it is ours alone and holds the tensors as stored (no copy);
    else of the rows stacked group by group into one new buffer (one copy). A trainable one gets one variable
    per group, each stacked in one copy; a bank made already is assigned."""
    if not plan:
        return
    bank = next(iter(plan.values()))[0].bank(adapter_name)
    dtype = None if bank.materialized else bank.arena_dtype()
    if dtype is not None and root is not None:
        shared = _shared_arena(plan, arrays, root, adapter_name, _np_dtype(dtype))
        if shared is not None:
            bank.materialize_arena(*shared)
            return
    counts = bank.groups()
    rows: dict[Any, list[Any]] = {}
    for key, (layer, param, layout) in plan.items():
        ref = layer.parameters(adapter_name)[2][param]
        group = rows.get(ref.key)
        if group is None:
            group = rows[ref.key] = [None] * counts[ref.key]
        group[ref.index] = layout.to_stored(arrays[key])
    region, blocks = _aligned_empties([((len(group), *k.shape), _np_dtype(k.dtype)) for k, group in rows.items()])
    staged = {}
    for (k, group), block in zip(rows.items(), blocks):  # casting as an assignment would: float16 into float32
        staged[k] = np.stack(group, out=block, casting="unsafe")
    if bank.materialized:
        for k, block in staged.items():
            bank.assign_group(k, block)
    elif dtype is not None:
        spans = {}
        for k, block in staged.items():
            offset, size = (block.ctypes.data - region.ctypes.data) // block.itemsize, math.prod(k.shape)
            for index in range(len(block)):
                spans[Ref(k, index)] = (offset + index * size, offset + (index + 1) * size)
        bank.materialize_arena(region.view(_np_dtype(dtype)), spans)
    else:
        bank.materialize(staged)


def _np_dtype(dtype: str) -> Any:
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def extract_state(model: Any, adapter_name: str) -> tuple[AdapterConfig, dict[str, np.ndarray]]:
    """``adapter_name``'s config and tensors, canonical keys, spec (PEFT) layout, contiguous NumPy arrays.

    :raises AdapterNotFoundError: no such adapter.

    >>> config, tensors = extract_state(model, "default")              # doctest: +SKIP
    """
    layers = _layers_of(model, adapter_name)
    state = get_state(model)
    assert state is not None
    tensors: dict[str, np.ndarray] = {}
    if adapter_name in state.prompts:
        slot = state.prompts[adapter_name]
        tensors[PROMPT_KEY] = np.ascontiguousarray(slot.bank.numpy(slot.ref))
        layers = []
    read = layers[0].bank(adapter_name).reader() if layers else None  # one read of the variables
    for layer in layers:
        path, layouts, refs = layer.parameters(adapter_name)
        for param, ref in refs.items():
            tensors[make_key(path, param)] = layouts[param].from_stored(read(ref))  # type: ignore[misc]  # set: layers
        if layer.saves_base_weight(adapter_name):
            tensors[make_key(path, BASE_LAYER_PARAM)] = layer.base_weight()
    shared = _shared_of(layers, adapter_name)
    if shared is not None and read is not None:  # VeRA's projections, stored once (SPEC.md 15.5)
        for param, ref in shared.refs.items():
            tensors[shared_key(param)] = shared.layouts[param].from_stored(read(ref))
    tensors.update(auxiliary_tensors(state, adapter_name))  # SPEC.md 5.3: as the file had them
    _mirror_bookkeeping(tensors, state.configs[adapter_name])
    for key, dtype in state.stored_dtypes.get(adapter_name, {}).items():
        if key not in tensors:
            continue
        as_stored = tensors[key].astype(dtype)  # back in the file's dtype, when that loses nothing (SPEC.md 7.5)
        if np.array_equal(as_stored.astype(tensors[key].dtype), tensors[key]):
            tensors[key] = as_stored
    return state.configs[adapter_name], tensors
