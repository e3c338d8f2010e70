"""Per-model bookkeeping and adapter switching: names, active set, delete, merge, unmerge.

All bookkeeping lives in ONE place, :class:`ModelState` at ``model._adapterspec_state`` (set with
``object.__setattr__`` so Keras does not track it); it is removed when the last adapter goes.
Switching only changes which adapters each :class:`~adapterspec_keras.layers.AdapterLayer` runs:
base weights are never copied. Compiled ``fit``/``predict``/``generate`` functions are dropped on every
change, since Keras traces the Python-level adapter state into them: the model's own, and those of every
Keras model an adapted layer was called under (a task model around an adapted backbone, a functional
model wrapping it: Keras' call context names the outermost one); any other model holding an adapted layer (one
compiled before the first load) remakes its functions at its next ``fit``/``predict``/``generate``
(:func:`watch_compiled`). One case is out of reach and keeps the
adapters it was traced with, so trace it again (``outer.make_predict_function(force=True)``, or set its
``predict_function``/``generate_function`` to ``None``) after a switch, merge or delete: a function traced
outside Keras' ``fit``/``predict``/``generate`` -- a ``tf.function`` or ``jax.jit`` of your own.
(Where a trace names no model in Keras' call context -- the JAX trainer's ``stateless_call``, keras-hub's
``generate_step`` -- the Keras models whose methods are on the stack while it is traced are the callers.)

>>> import keras
>>> adapter_names(keras.Sequential([keras.layers.Dense(2)]))
[]
"""

from __future__ import annotations

import functools
import sys
import types
import weakref
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from adapterspec import AdapterConfig
from adapterspec._merge import base_load_refusal
from adapterspec._mix import mix_refusal
from adapterspec.config import merge_refusal
from adapterspec.errors import AdapterNotFoundError, UnsupportedError

from .guard import wrap_once

__all__ = [
    "STATE_ATTR",
    "ModelState",
    "active_adapters",
    "adapter_names",
    "check_base_loadable",
    "check_mix",
    "check_optimizer",
    "delete",
    "get_state",
    "invalidate",
    "merge",
    "note_caller",
    "note_patched",
    "own_state",
    "set_active",
    "unmerge",
    "watch_compiled",
]

STATE_ATTR = "_adapterspec_state"


@dataclass
class ModelState:
    """What adapterspec knows about one Keras model's adapters.

    :param names: adapter names in load order.
    :param active: the adapters taking part in the forward pass.
    :param configs: name -> the config the adapter was injected with.
    :param modules: name -> module paths (spec names) it adapts.
    :param merged: adapters whose deltas are in the base weights now, in merge order.
    :param originals: id(Keras layer) -> (layer, its own ``call`` attribute before patching or ``None``).
    :param entries: id(Keras layer) -> the (adapter layer, piece) pairs its patched ``call`` runs.
    :param adapter_layers: site key -> :class:`~adapterspec_keras.layers.AdapterLayer`, in model order.
    :param banks: adapter name -> (its :class:`~adapterspec_keras.bank.AdapterBank`, the Keras layer tracking it).
    :param prompts: prefix-tuning adapter name -> its :class:`~adapterspec_keras.prompts.PrefixSlot`.
    :param prompt_patches: id(object) -> (decoder layer / position embedding / model, patched attribute, its own
        value before patching or ``None``).
    :param trainable: adapters injected trainable.
    :param parked: trainable adapters frozen while they are not active (:func:`park_inactive`).
    :param frozen: (object, attribute, previous value) of every base ``trainable`` flag changed to train adapters.
    :param stored_dtypes: name -> {canonical key: the NumPy dtype its file stored} for tensors loaded into another
        dtype (float32 on a half-precision base, SPEC.md 7.5), so that saving can write them back as stored.
    :param base_samples: site key -> (the base fingerprint's samples of that module, or ``None``, taken just before
        an adapter was first merged into it; the samples of what an unmerge left there, or ``None``), so that a save
        while merged, or after an unmerge that rounded differently, records the base (SPEC.md 9.1).
    :param base_weights: name -> the base-model variables its file replaced (:class:`~adapterspec_keras.auxiliary.Override`:
        an embedding saved whole, trained biases, SPEC.md 5.3), given back when it is deleted.
    :param auxiliary: name -> {canonical key: the file's tensor} of those replacements, saved again with it.
    :param tied: name -> {spec path of a layer tied to the input embedding: (the embedding's spec path, ``"targets"``)}
        (``ensure_weight_tying``, SPEC.md 15.2; :mod:`~adapterspec_keras.tying`).
    :param callers: the outermost Keras models the adapted layers were called under (:func:`note_caller`), whose
        compiled functions :func:`invalidate` drops too.
    :param scope_seen: the last trace :func:`note_caller` looked into (once per trace).
    """

    names: list[str] = field(default_factory=list)
    active: list[str] = field(default_factory=list)
    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    modules: dict[str, list[str]] = field(default_factory=dict)
    merged: list[str] = field(default_factory=list)
    originals: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    entries: dict[int, list[tuple[Any, Any]]] = field(default_factory=dict)
    adapter_layers: dict[Any, Any] = field(default_factory=dict)
    banks: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    prompts: dict[str, Any] = field(default_factory=dict)
    prompt_patches: dict[int, tuple[Any, str, Any]] = field(default_factory=dict)
    trainable: list[str] = field(default_factory=list)
    parked: set[str] = field(default_factory=set)
    frozen: list[tuple[Any, str, Any]] = field(default_factory=list)
    stored_dtypes: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_samples: dict[Any, Any] = field(default_factory=dict)
    base_weights: dict[str, list[Any]] = field(default_factory=dict)
    auxiliary: dict[str, dict[str, Any]] = field(default_factory=dict)
    tied: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)
    callers: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)
    scope_seen: weakref.ref[Any] | None = None


def get_state(model: Any, *, create: bool = False) -> ModelState | None:
    """``model``'s :class:`ModelState` (created when ``create``), or ``None`` when it has no adapter.

    >>> import keras
    >>> get_state(keras.Sequential()) is None
    True
    """
    state: ModelState | None = model.__dict__.get(STATE_ATTR)
    if state is None and create:
        state = ModelState()
        object.__setattr__(model, STATE_ATTR, state)
    return state


def own_state(model: Any) -> ModelState | None:
    """``model``'s :class:`ModelState`, or ``None`` when neither it nor any layer inside it has adapters.

    :raises AdapterNotFoundError: ``model`` wraps the model the adapters were loaded into (a keras-hub task around
        an adapted backbone, a functional model): a call on the wrapper did nothing, silently.
    """
    state = get_state(model)
    if state is None and hasattr(model, "_flatten_layers"):
        for layer, inner in _inner_states(model):
            if inner.names:
                where = next((f"model.{_public(model, attr)}" for attr, value in vars(model).items() if value is layer),
                             f"the layer {layer.name!r}")
                raise AdapterNotFoundError(
                    f"this {type(model).__name__} holds no adapters itself: it wraps the {type(layer).__name__} "
                    f"they were loaded into ({where}, adapters {inner.names})", key=layer.name,
                    hint=f"call this on {where}, the model they were loaded into")
    return state


def _public(model: Any, attr: str) -> str:
    """``attr``, or the public name that reads it (keras-hub's ``backbone`` property for ``_backbone``)."""
    name = attr.lstrip("_")
    return name if name != attr and getattr(model, name, None) is getattr(model, attr) else attr


def drop_state_if_empty(model: Any) -> None:
    """Remove the bookkeeping once no adapter is left (the model is then as it was)."""
    state = get_state(model)
    if state is not None and not state.names and not state.adapter_layers and not state.originals \
            and not state.prompt_patches:
        object.__delattr__(model, STATE_ATTR)
        from .guard import unguard_save

        unguard_save(model)


#: The attributes where Keras (and keras-hub) keep a model's compiled functions.
_COMPILED = ("train_function", "test_function", "predict_function", "generate_function")


def invalidate(model: Any) -> None:
    """Drop Keras' compiled ``fit``/``evaluate``/``predict``/``generate`` functions so the next call retraces: those
    of ``model``, its backbone, and every model its adapted layers were called under (:func:`note_caller`); any other
    model's are remade when it next asks for them (:func:`watch_compiled`).

    >>> import keras
    >>> invalidate(keras.Sequential())
    """
    _CHANGES[0] += 1
    state = get_state(model)
    callers = list(state.callers) if state is not None else []
    for obj in (model, getattr(model, "backbone", None), *callers):
        if obj is not None:
            _drop_compiled(obj)


def _drop_compiled(obj: Any) -> None:
    for attr in _COMPILED:
        if obj.__dict__.get(attr) is not None:
            object.__setattr__(obj, attr, None)


#: How many times any model's adapters changed (load, switch, merge, delete), and every Keras layer whose ``call``
#: was patched for adapters, now or before.
_CHANGES = [0]
_PATCHED: weakref.WeakSet[Any] = weakref.WeakSet()
_SEEN_ATTR = "_adapterspec_changes_seen"
_HOLDS_ATTR = "_adapterspec_holds_adapters"

#: (module, class, method): where Keras and keras-hub make (or return the cached) compiled function of each call.
_MAKERS = (("keras", "Model", "make_train_function"), ("keras", "Model", "make_test_function"),
           ("keras", "Model", "make_predict_function"), ("keras_hub.models", "CausalLM", "make_generate_function"))


def note_patched(layer: Any) -> None:
    """Remember ``layer``'s ``call`` was patched: a model holding it may keep a function compiled before."""
    _PATCHED.add(layer)


def watch_compiled() -> None:
    """Have every Keras model remake a compiled function made before an adapter change, if it holds a layer that
    runs (or ran) adapters (once per process; cheap after the first).

    :func:`invalidate` drops the functions of the models it knows. A model it does not know -- one compiled before
    the first load, around the adapted one (``task.predict`` then ``load_adapter(task.backbone, ...)``; a functional
    wrapper) -- kept the function traced without the adapters on TensorFlow, which never runs the patched Python
    again: ``predict`` gave the base's logits, ``generate`` the base's tokens and ``fit`` trained the frozen base, with
    no error. Keras asks ``make_*_function`` at every ``fit``/``evaluate``/``predict`` call and keras-hub
    ``make_generate_function`` at every ``generate``: there a model whose last look predates a change drops its
    functions first when it holds such a layer.
    """
    for module_name, class_name, name in _MAKERS:
        wrap_once(module_name, class_name, name, _fresh)


def _fresh(make: Any) -> Any:
    train = make.__name__ == "make_train_function"

    @functools.wraps(make)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get(_SEEN_ATTR) != _CHANGES[0]:
            holds = bool(_PATCHED) and any(layer in _PATCHED for layer in self._flatten_layers(include_self=True))
            if holds:
                _drop_compiled(self)
            object.__setattr__(self, _HOLDS_ATTR, holds)
            object.__setattr__(self, _SEEN_ATTR, _CHANGES[0])
        if train and self.__dict__.get(_HOLDS_ATTR):
            check_optimizer(self)
        return make(self, *args, **kwargs)

    return method


def _inner_states(model: Any) -> Iterator[tuple[Any, ModelState]]:
    """Each layer inside ``model`` that holds adapter state (the model they were loaded into), with its state."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        state = get_state(layer)
        if state is not None:
            yield layer, state


def _state_within(model: Any) -> ModelState | None:
    """The state of ``model`` or of the one model inside it that has adapters (a task around its backbone)."""
    return get_state(model) or next((state for _, state in _inner_states(model)), None)


def check_optimizer(model: Any) -> None:
    """Refuse to train ``model`` with an optimizer built for other trainable variables -- after a switch of the
    active adapters (:func:`park_inactive`) without a new ``compile`` -- or with a trainable adapter merged.

    TensorFlow and torch raised Keras' own ``ValueError`` ("Unknown variable"); JAX's trainer passed the new
    adapter's gradients to the moments and iteration count of the old one, with no error: 0.017 from a compiled run
    after one epoch of Adam.

    :raises UnsupportedError: the optimizer holds state for other variables than the model's trainable ones, or a
        trainable adapter is merged (the forward skips it).
    """
    state = _state_within(model)
    merged = [name for name in state.merged if name in state.trainable] if state is not None else []
    if merged:  # the forward skips a merged adapter: TF and torch raised raw errors, JAX trained nothing, silently
        raise UnsupportedError(f"adapter {merged[0]!r} is merged: training cannot reach its variables", key=merged[0],
                               hint="unmerge_adapters(model) before training")
    optimizer = getattr(model, "optimizer", None)
    known = getattr(optimizer, "_trainable_variables", None) if getattr(optimizer, "built", False) else None
    if known is None:
        return
    now = model.trainable_variables
    if len(now) == len(known) and {id(v) for v in now} == {id(v) for v in known}:
        return
    active = f" (active adapters now: {state.active})" if state is not None else ""
    raise UnsupportedError(f"model {model.name!r} was compiled for other trainable variables than it has now"
                           f"{active}; its optimizer holds the state of those", key=model.name,
                           hint="call model.compile(...) again after set_active_adapters, before training "
                                "(Keras' rule after a change of trainable variables)")


@functools.cache
def _call_context_reader() -> Callable[[], Any]:
    try:
        from keras.src.backend.common import global_state
    except ImportError:  # another Keras layout: only the model and its backbone are known
        return lambda: None
    return functools.partial(global_state.get_global_attribute, "current_call_ctx")


@functools.cache
def _trace_reader() -> Callable[[], Any]:
    """What identifies the trace being made now: TensorFlow's graph inside a ``tf.function``, Keras' stateless
    scope (JAX's trainer and keras-hub's JAX ``generate`` trace in one); ``None`` when running eagerly."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        inside, graph = tf.inside_function, tf.compat.v1.get_default_graph
        return lambda: graph() if inside() else None
    try:
        from keras.src.backend.common.stateless_scope import get_stateless_scope
    except ImportError:
        return lambda: None
    return cast("Callable[[], Any]", get_stateless_scope)


def note_caller(state: ModelState) -> Any:
    """Called by every patched ``call``: remember the outermost Keras layer of the current call (Keras' call
    context: ``predict`` of a task model around the adapted backbone, a functional wrapper), whose compiled
    functions then hold this model's adapters as traced. Returns the call context (``None`` outside one).

    Not every trace names its model in a call context: Keras' JAX trainer runs ``stateless_call``, which calls
    the model's ``call`` directly, and keras-hub's ``generate`` runs the task model's ``generate_step``, which
    calls the backbone's layers one by one. So while a trace is made (:func:`_trace_reader`; once per trace),
    every Keras model whose method is on the Python stack is remembered too.
    """
    context = _call_context_reader()()
    entry = getattr(context, "entry_layer", None)
    if entry is not None and entry not in state.callers:
        state.callers.add(entry)
    trace = _trace_reader()()
    if trace is not None and (state.scope_seen is None or state.scope_seen() is not trace):
        state.scope_seen = weakref.ref(trace)  # not the graph itself: it would outlive its trace
        frame: types.FrameType | None = sys._getframe(1)
        while frame is not None:
            owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
            if owner is not None and _COMPILED[0] in getattr(owner, "__dict__", {}):
                state.callers.add(owner)
            frame = frame.f_back
    return context


def _check(state: ModelState | None, names: list[str]) -> None:
    loaded = state.names if state is not None else []
    for name in names:
        if name not in loaded:
            raise AdapterNotFoundError(f"no adapter named {name!r} is loaded (loaded: {loaded})", key=name,
                                       hint="load_adapter() it first")


def adapter_names(model: Any) -> list[str]:
    """The adapters loaded in ``model``, in load order.

    >>> adapter_names(model)                                            # doctest: +SKIP
    ['default', 'fr']
    """
    state = own_state(model)
    return list(state.names) if state is not None else []


def active_adapters(model: Any) -> list[str]:
    """The adapters in the forward pass now (``[]`` when disabled or none).

    >>> active_adapters(model)                                          # doctest: +SKIP
    ['default']
    """
    state = own_state(model)
    return list(state.active) if state is not None else []


def set_active(model: Any, adapter_names: list[str]) -> None:
    """Make exactly ``adapter_names`` active (several add up; ``[]`` disables), unmerging first.

    :raises AdapterNotFoundError: a name is not loaded (nothing changes).
    :raises UnsupportedError: adapters that may not run together on one layer (:func:`check_mix`); nothing changes.

    >>> set_active(model, ["fr"])                                       # doctest: +SKIP
    """
    state = own_state(model)
    _check(state, adapter_names)
    if state is None:
        return
    active = list(dict.fromkeys(adapter_names))
    check_mix(state, active)
    if state.merged:
        unmerge(model)
    state.active = active
    for layer in state.adapter_layers.values():
        layer.set_active(state.active)
    park_inactive(state)
    invalidate(model)


def check_mix(state: ModelState, names: list[str]) -> None:
    """Refuse adapters ``names`` that may not run together on one of the model's layers (the SDK's
    :func:`~adapterspec._mix.mix_refusal`, SPEC.md 8.9: IA3, OFT/BOFT or DoRA with another method, two copies of a
    module saved whole -- LN tuning's too --, two adapters replacing one token row), before anything changes.

    :raises UnsupportedError: naming the adapters and the module.
    """
    if len(names) < 2:
        return
    for layer in state.adapter_layers.values():
        running_of = getattr(layer, "running_of", None)  # adapter layers and modules saved whole
        if running_of is not None:
            refusal = mix_refusal(layer.site.path, running_of(names))
            if refusal is not None:
                raise refusal


def park_inactive(state: ModelState) -> None:
    """Freeze the variables of every trainable adapter that is not active, and unfreeze the active ones this froze
    (as PEFT's ``set_adapter``; one the user froze stays frozen).

    An inactive adapter must not change while another trains. On JAX the gradient of a variable the forward pass did
    not use is zeros, not ``None`` as on TensorFlow and torch, and Adam or AdamW moved it anyway: an adapter trained
    before a switch moved as far as the one trained after it (0.014 in two epochs). A model compiled before the
    switch must be compiled again to train the newly active adapter (Keras' rule after ``trainable`` changes; its
    optimizer refuses a variable it was not built with).
    """
    for name in state.trainable:
        bank = state.banks[name][0] if name in state.banks else None
        if bank is None:
            continue
        if name in state.active and name in state.parked:
            bank.trainable = True
            state.parked.discard(name)
        elif name not in state.active and bank.trainable:
            bank.trainable = False
            state.parked.add(name)


def delete(model: Any, adapter_name: str, *, unloading: bool = False) -> None:
    """Remove an adapter; a Keras layer left without adapters gets its original ``call`` back. When it was the only
    active one, the first adapter left becomes active (as PEFT's ``delete_adapter``).

    The other adapters stay as they are: merged ones merged, their weights bit for bit; the base tensors the
    adapter's file replaced come back (:func:`~adapterspec_keras.auxiliary.restore`). A merged adapter is unmerged
    first, with every other merged one (:func:`unmerge`).

    :param unloading: ``unload`` deletes every adapter: a merged adapter's delta then stays in the base weights
        (``unload(merge=True)``), and while any adapter is merged, replaced base tensors stay too.
    :raises AdapterNotFoundError: no adapter of that name.
    :raises UnsupportedError: (not ``unloading``) a base tensor the adapter's file replaced belongs to a layer a
        merged adapter is merged into (:func:`~adapterspec_keras.auxiliary.restore_refusal`); nothing changed.

    >>> delete(model, "fr")                                             # doctest: +SKIP
    """
    from .auxiliary import restore_refusal
    from .inject import remove_adapter_modules

    state = own_state(model)
    _check(state, [adapter_name])
    assert state is not None
    if not unloading and adapter_name in state.merged:
        unmerge(model)
    refusal = None if unloading else restore_refusal(state, adapter_name)
    if refusal is not None:
        raise refusal
    was_active = adapter_name in state.active
    remove_adapter_modules(model, adapter_name, unloading=unloading)
    state.names.remove(adapter_name)
    state.active = [n for n in state.active if n != adapter_name]
    if was_active and not state.active and state.names:  # the first one left, as PEFT and the torch backend
        state.active = [state.names[0]]
        for layer in state.adapter_layers.values():
            layer.set_active(state.active)
        park_inactive(state)
    if adapter_name in state.merged:  # its delta stays in the kernels: they are the base now, or unknown
        state.base_samples.clear()
    state.merged = [n for n in state.merged if n != adapter_name]
    state.configs.pop(adapter_name, None)
    state.modules.pop(adapter_name, None)
    state.stored_dtypes.pop(adapter_name, None)
    state.tied.pop(adapter_name, None)
    invalidate(model)
    drop_state_if_empty(model)


def merge(model: Any, adapter_names: list[str]) -> None:
    """Add the adapters' weight deltas into the base weights, in place; the forward then skips them.

    :raises AdapterNotFoundError: a name is not loaded.
    :raises UnsupportedError: prefix/prompt tuning (no weight delta), what a layer cannot merge exactly
        (:meth:`~adapterspec_keras.layers.AdapterLayer.check_merge`), or adapters that may not run together on one
        layer (:func:`check_mix`: the merged ones, those to merge and the active ones); nothing changes then.

    >>> merge(model, ["default"])                                       # doctest: +SKIP
    """
    state = own_state(model)
    _check(state, adapter_names)
    assert state is not None or not adapter_names
    if state is None:
        return
    for name in adapter_names:
        if state.configs[name].is_prompt_learning:
            raise UnsupportedError(f"{state.configs[name].peft_type} adapter {name!r} has no weight delta to merge",
                                   key=name, hint="keep it unmerged")
        tied = list(state.tied.get(name, {}))
        if tied:  # SPEC.md 15.2
            raise UnsupportedError(f"the LoRA of {tied[0]!r} is tied to the input embedding's (ensure_weight_tying) and "
                                   "shares its weight: merging would add the delta twice, as PEFT 0.21 does",
                                   key=name, pointer="/ensure_weight_tying", hint="keep the adapter unmerged")
    todo = [n for n in adapter_names if n not in state.merged]
    from .identity import remember_base  # identity imports this module

    for layer in state.adapter_layers.values():
        layer.check_merge(todo)
    refusal = merge_refusal(state.active, state.merged, todo,
                            [(layer.site.path, layer.adapter_names()) for layer in state.adapter_layers.values()
                             if layer.site.kind not in ("saved", "parameters")  # (as torch: adapter layers)
                             and any(n in todo for n in layer.adapter_names())])
    if refusal is not None:  # SPEC.md 8.9
        raise refusal
    check_mix(state, list(dict.fromkeys([*state.active, *state.merged, *todo])))
    remember_base(state, todo)
    for layer in state.adapter_layers.values():
        layer.merge(todo)
    state.merged.extend(todo)
    invalidate(model)


def unmerge(model: Any) -> None:
    """Subtract every merged adapter from the base weights again (no-op when none is merged).

    >>> unmerge(model)                                                  # doctest: +SKIP
    """
    state = own_state(model)
    if state is None or not state.merged:
        return
    for layer in state.adapter_layers.values():
        check = getattr(layer, "check_unmerge", None)
        if check is not None:
            check()  # RoAd: a singular matrix cannot be undone; refused before any layer changes
    for layer in state.adapter_layers.values():
        layer.unmerge()
    state.merged = []
    from .identity import unmerged_base

    unmerged_base(state)
    invalidate(model)


def check_base_loadable(model: Any, *, loading: str = "load_weights", skip: Collection[int] = ()) -> None:
    """Refuse to read a file's weights into ``model`` while an adapter's values are in the variables of a layer of it
    (the model the adapters were loaded into, a model around it, or a part of it holding an adapted layer): a merged
    adapter, a module's copy saved whole (running in the module's variables), a base weight or other tensor the
    adapter's file replaced. The file cannot hold the adapter (Keras' saving refuses while one is loaded), so the load
    would put the base where the adapter's values are. Keras' ``load_weights`` paths ask before they read anything
    (:mod:`~adapterspec_keras.guard`). As torch's function of the same name, which refuses a merged adapter only.

    :param skip: ids of layers the load leaves out (Keras' ``objects_to_skip``).
    :raises UnsupportedError: naming the module and the adapter (SDK ``base_load_refusal``); nothing read.

    >>> import keras
    >>> check_base_loadable(keras.Sequential([keras.layers.Dense(2)]))
    """
    from .inject import _PATCHED_BY  # inject imports this module

    judged: set[int] = set()  # every patched layer of a model names its one state: judge each state once
    for layer in [model, *model._flatten_layers(include_self=False, recursive=True)]:
        state = get_state(layer) or getattr(layer.__dict__.get("call"), _PATCHED_BY, None)
        if state is None or id(layer) in skip or id(state) in judged:
            continue
        judged.add(id(state))
        found = _held_in_variables(state)
        if found is not None:
            raise base_load_refusal(loading, found[0], found[1], merged=found[2])


def _held_in_variables(state: ModelState) -> tuple[str, str, bool] | None:
    """(module path or tensor key, adapter, merged) of the first place an adapter's values are in the model's own
    variables (a merged one first), or ``None``."""
    layers = list(state.adapter_layers.values())
    merged = next((each for each in layers if each.merged), None)
    if merged is not None:
        return merged.site.path, merged.merged[0], True
    held = next((each for each in layers if each.in_variables()), None)
    if held is not None:
        return held.site.path, held.in_variables()[0], False
    for name, overrides in state.base_weights.items():
        for override in overrides:  # (PiSSA's residual is saved under no key: its variable then)
            return (override.keys[0] if override.keys else override.variable.path), name, False
    return None
