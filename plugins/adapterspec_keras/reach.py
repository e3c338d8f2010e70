"""Whether the model's forward runs the layers an adapter wraps: the check that makes a no-op adapter an error.

The adapters run inside each wrapped layer's ``call``. A parent layer that reads a sublayer's kernel itself
(keras-hub's Gemma 4 MLP: ``ops.matmul(x, self.gating_ffw.kernel)``) never enters that ``call``, so an adapter on
it would load, be listed, and change nothing. After injecting, :func:`check_reached` runs the model once on a
dummy batch of one example of two tokens and refuses, naming them, the wrapped layers whose ``call`` never ran.

The check needs inputs it can make: a functional model (every keras-hub model) has symbolic ``inputs``; a
dimension left open is 1 (batch) or 2 (sequence), except an open dimension of a float input (an image of any size),
which cannot be guessed. Then, and for subclassed models without ``inputs``, the check is skipped: it cannot
say the adapter is unused. A forward that fails on the dummy batch is reported as a warning, not an error.

Whether a layer's ``call`` runs is a property of the model's structure, so the answer is remembered per model
and layer: a later load that wraps only layers checked before runs no forward (the first load of a model pays
one forward of two tokens; a model whose layers' ``call`` the user changes afterwards must be loaded anew).

>>> check_reached(model, {"model.layers.0.mlp.gate_proj": site})      # doctest: +SKIP
Traceback (most recent call last):
adapterspec.errors.UnsupportedError: model.layers.0.mlp.gate_proj: the model's forward never runs ...
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from adapterspec.errors import AdapterSpecWarning, UnsupportedError

from .sites import ModuleSite, Piece

__all__ = ["can_read_through", "check_reached", "dummy_inputs", "note_entry", "read_through_kernel", "reads_through",
           "refuse", "restore_kernel", "unreached"]

_ENTERED: contextvars.ContextVar[set[tuple[int, str]] | None] = contextvars.ContextVar("adapterspec_entered",
                                                                                      default=None)


def note_entry(layer: Any, role: str) -> None:
    """Called by every wrapped ``call``: remember that ``layer`` ran in ``role`` while a check is on."""
    entered = _ENTERED.get()
    if entered is not None:
        entered.add((id(layer), role))


@contextlib.contextmanager
def _recording() -> Iterator[set[tuple[int, str]]]:
    entered: set[tuple[int, str]] = set()
    token = _ENTERED.set(entered)
    try:
        yield entered
    finally:
        _ENTERED.reset(token)


def _dummy(tensor: Any) -> np.ndarray | None:
    dtype = str(tensor.dtype)
    shape = list(tensor.shape)
    if any(d is None for d in shape[1:]) and "float" in dtype:
        return None
    # two positions, not one: Keras warns of a softmax over an axis of size 1 (attention over one token)
    shape = [1 if i == 0 and d is None else 2 if d is None else int(d) for i, d in enumerate(shape)]
    name = str(getattr(tensor, "name", "") or "")
    return np.full(shape, 1 if "mask" in name else 0, dtype=dtype)


def dummy_inputs(model: Any) -> tuple[Any, str | None]:
    """A batch of one example (two tokens) for ``model``, or ``(None, why not)``.

    >>> dummy_inputs(causal_lm)[0]["token_ids"].shape                    # doctest: +SKIP
    (1, 2)
    """
    from keras import tree

    if not getattr(model, "inputs", None):
        return None, f"{type(model).__name__} is not a functional model: its inputs are unknown"
    # a functional model's own input structure (a dict for keras-hub); a Sequential has a list of one
    inputs = model.inputs
    structure = getattr(model, "_inputs_struct", None)
    if structure is None:
        structure = inputs[0] if len(inputs) == 1 else list(inputs)
    made = tree.map_structure(_dummy, structure)
    if any(x is None for x in tree.flatten(made)):
        return None, f"{type(model).__name__} takes a float input of open size (an image?): its size is unknown"
    return made, None


#: model -> (the (layer id, role) pairs a forward checked, with a weak reference to each layer; those it entered)
_CHECKED: weakref.WeakKeyDictionary[Any, tuple[dict[tuple[int, str], weakref.ref[Any]], set[tuple[int, str]]]] = \
    weakref.WeakKeyDictionary()


def _remembered(model: Any, pairs: dict[tuple[int, str], Any]) -> set[tuple[int, str]] | None:
    """The pairs an earlier forward of ``model`` entered, if it checked every pair of ``pairs`` (the same layers)."""
    try:
        known = _CHECKED.get(model)
    except TypeError:  # not weak-referenceable
        return None
    if known is None:
        return None
    checked, entered = known
    for pair, layer in pairs.items():
        ref = checked.get(pair)
        if ref is None or ref() is not layer:
            return None
    return entered


def _remember(model: Any, pairs: dict[tuple[int, str], Any], entered: set[tuple[int, str]]) -> None:
    try:
        checked, before = _CHECKED.get(model) or ({}, set())
        _CHECKED[model] = ({**checked, **{pair: weakref.ref(layer) for pair, layer in pairs.items()}},
                           (before - set(pairs)) | entered)
    except TypeError:  # not weak-referenceable: checked again at every load
        pass


def unreached(model: Any, sites: dict[str, ModuleSite]) -> dict[str, list[Piece]] | None:
    """Run ``model`` once on :func:`dummy_inputs`: the pieces of ``sites`` whose layer's ``call`` never ran.

    ``{}`` also when no inputs can be made (the check is skipped); ``None`` when the forward fails on them (it
    warns): the model cannot run on its own (keras-hub's Gemma 4 assistant raises in ``call``: it runs only
    through ``call_with_cache`` inside its target's ``generate``), so which layers it calls is unknown.

    >>> unreached(model, {"model.layers.0.mlp.gate_proj": site})        # doctest: +SKIP
    {'model.layers.0.mlp.gate_proj': [Piece(layer=<Dense name=ffw_gating>, ...)]}
    """
    pairs = {(id(p.layer), p.role): p.layer for site in sites.values() for p in site.pieces}
    entered = _remembered(model, pairs)
    if entered is None:
        inputs, _why_not = dummy_inputs(model)
        if inputs is None:
            return {}
        with _recording() as entered:
            try:
                model(inputs, training=False)
            except Exception as exc:  # noqa: BLE001 - the check cannot run: said, not hidden
                warnings.warn(f"adapterspec could not check that {type(model).__name__}'s forward runs the adapted "
                              f"layers: a forward on a dummy batch of two tokens failed ({type(exc).__name__}: {exc}); "
                              "a plain LoRA on a Dense / EinsumDense runs through its kernel (exact either way), any "
                              "other adapter is not checked", AdapterSpecWarning, stacklevel=3)
                return None
        _remember(model, pairs, entered)
    unused = {path: [p for p in site.pieces if (id(p.layer), p.role) not in entered] for path, site in sites.items()}
    return {path: pieces for path, pieces in unused.items() if pieces}


def check_reached(model: Any, sites: dict[str, ModuleSite]) -> None:
    """Refuse the sites whose layers' ``call`` the model's forward never runs (:func:`unreached`).

    :param sites: spec module path -> its site, every piece's layer wrapped already.
    :raises UnsupportedError: names the modules and Keras layers the forward does not run.

    >>> check_reached(model, {"model.layers.0.self_attn.q_proj": site})  # doctest: +SKIP
    """
    refuse(unreached(model, sites) or {})


def refuse(unused: dict[str, list[Piece]]) -> None:
    """:raises UnsupportedError: naming the modules of ``unused`` and their Keras layers (if any)."""
    if not unused:
        return
    listed = "; ".join(f"{path} -> " + ", ".join(p.layer.path + ("" if p.role == "forward" else f" ({p.role})")
                                                  for p in pieces) for path, pieces in list(unused.items())[:8])
    more = f" and {len(unused) - 8} more" if len(unused) > 8 else ""
    raise UnsupportedError(
        f"the model's forward never runs the call of the Keras layers these modules map to, so an adapter "
        f"on them would change nothing: {listed}{more} (a parent layer reads their kernel itself)",
        key=next(iter(unused)),
        hint="remove these modules from target_modules, or map them (module_map) to layers the forward calls")


# ---------------------------------------------------------------------------------------------------
# Kernels read through: a parent that reads ``layer.kernel`` itself reads the kernel plus the running adapters'
# deltas. Only for plain LoRA on a Dense / EinsumDense, whose ``kernel`` is a property of the class: the layer's
# class becomes a subclass (one per class) whose ``kernel`` adds them.

_READ_THROUGH: dict[type, type] = {}


def _read_through_class(cls: type) -> type:
    sub = _READ_THROUGH.get(cls)
    if sub is None:
        base = cls.kernel  # type: ignore[attr-defined]

        def kernel(self: Any) -> Any:
            from keras import ops

            value = base.fget(self)
            for adapter_layer, piece in self.__dict__.get("_adapterspec_kernel_entries", ()):
                delta = adapter_layer.kernel_delta(piece)
                if delta is not None:
                    value = ops.add(value, ops.cast(delta, value.dtype))
            return value

        sub = type(cls.__name__, (cls,), {"kernel": property(kernel), "_adapterspec_base_kernel": base,
                                          "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _READ_THROUGH[cls] = sub
    return sub


def can_read_through(config: Any, pieces: list[Piece], trainable: bool = False) -> bool:
    """Whether ``pieces`` can take adapter ``config`` through their kernel: plain LoRA on a Dense / EinsumDense
    (not to be trained with ``lora_dropout``, which a kernel cannot apply to the input)."""
    plain = config.get("peft_type") == "LORA" and not config.get("use_dora") and not config.get("lora_bias") \
        and not (trainable and config.get("lora_dropout"))
    return plain and all(p.kind in ("dense", "einsum") and p.role == "forward" and
                         isinstance(getattr(type(p.layer), "kernel", None), property) for p in pieces)


def read_through_kernel(layer: Any, entries: list[Any]) -> None:
    """Make reads of ``layer.kernel`` add the running adapters of ``entries`` (the list the wrapped call runs)."""
    if "_adapterspec_kernel_entries" in layer.__dict__:
        return
    object.__setattr__(layer, "_adapterspec_kernel_entries", entries)
    object.__setattr__(layer, "__class__", _read_through_class(type(layer)))


def restore_kernel(layer: Any) -> None:
    """Undo :func:`read_through_kernel`: ``layer`` is an instance of its own class again."""
    if "_adapterspec_kernel_entries" not in layer.__dict__:
        return
    object.__delattr__(layer, "_adapterspec_kernel_entries")
    object.__setattr__(layer, "__class__", type(layer).__mro__[1])


def reads_through(layer: Any) -> bool:
    """Whether ``layer``'s adapters run through its kernel (its ``call`` then needs no adapter part)."""
    return "_adapterspec_kernel_entries" in layer.__dict__
