"""Whether the model's forward runs the layers an adapter wraps: the check that makes a no-op adapter an error.

The adapters run inside each wrapped layer's ``call``. A parent layer that reads a sublayer's kernel itself
(keras-hub's Gemma 4 MLP: ``ops.matmul(x, self.gating_ffw.kernel)``) never enters that ``call``, so an adapter on
it would load, be listed, and change nothing. After injecting, :func:`check_reached` runs the model once on a
dummy batch of one example of two tokens and finds the wrapped layers whose ``call`` never ran. Such a layer takes
the adapter through its kernel when the adapter's unmerged forward is a change of the kernel
(:func:`read_through_kernel`: reads of ``layer.kernel`` return the kernel the unmerged forward uses -- LoRA,
rsLoRA, DoRA, IA3, LoHa, LoKr, OFT, BOFT, AdaLoRA, VeRA); what a kernel cannot carry (``lora_bias``, IA3 on the
output of a layer with a bias, training with a dropout, a fused kernel's slice) is refused, naming the layers.

The check needs inputs it can make: a functional model (every keras-hub model) has symbolic ``inputs``; a
dimension left open is 1 (batch) or 2 (sequence), except an open dimension of a float input (an image of any size,
keras-hub's multimodal Gemma 3 and Gemma 4), which cannot be guessed. Then, and for subclassed models without
``inputs``, each wrapped layer's parent is run alone instead (:func:`reach_report`; its parent if it cannot run
alone, up to three levels), on a dummy of the input shape it was built with, with reads of the layers' ``kernel``
recorded: a layer whose kernel an ancestor read without entering the layer's ``call`` is unreached; one that no
ancestor called or read (they need other inputs, or call it only on some inputs) is *unknown*, and takes the
adapter through its kernel too (exact whether or not its ``call`` runs); an adapter a kernel cannot carry is
refused on it when the layer sits inside another layer (whose ``call`` may read its kernel, as keras-hub's blocks
do), and warned about when the model holds it directly (a container the user calls layers of). A forward of the
whole model that fails on the dummy batch (a model that runs only through another method, keras-hub's Gemma 4
assistant) leaves every layer unknown, with a warning. Before an adapter a kernel cannot carry is refused on an
unknown layer, the whole model is run once more on guessed sizes (``reach_report(search=True)``): one image (each
open dimension of a float input 1) and 2, 4, 8, ... 256 tokens until it runs -- keras-hub's T5Gemma 2 takes
images of open count and runs with as many image tokens as it puts per image; what that forward calls is reached,
a layer whose kernel it reads without the call unreached, any other stays unknown.

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

from .quantized import quantization
from .sites import ModuleSite, Piece

__all__ = ["check_reached", "dummy_inputs", "note_entry", "parents_of", "reach_report",
           "read_through_kernel", "read_through_refusal", "reads_through", "refuse", "restore_kernel", "unreached"]

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


def _dummy(tensor: Any, length: int = 2, image: int | None = None) -> np.ndarray | None:
    """Zeros (ones for a mask) of ``tensor``'s shape: an open batch dimension 1, another open dimension ``length``
    -- of a float input ``image``, or ``None`` (not guessed)."""
    dtype = str(tensor.dtype)
    shape = list(tensor.shape)
    is_float = "float" in dtype
    if any(d is None for d in shape[1:]) and is_float and image is None:
        return None
    size = image if is_float and image is not None else length
    shape = [1 if i == 0 and d is None else size if d is None else int(d) for i, d in enumerate(shape)]
    name = str(getattr(tensor, "name", "") or "")
    return np.full(shape, 1 if "mask" in name else 0, dtype=dtype)


def _made(model: Any, length: int, image: int | None) -> tuple[Any, str | None]:
    """:func:`dummy_inputs` with open dimensions ``length`` (``image`` for a float input; ``None``: not guessed)."""
    from keras import tree

    if not getattr(model, "inputs", None):
        return None, f"{type(model).__name__} is not a functional model: its inputs are unknown"
    # a functional model's own input structure (a dict for keras-hub); a Sequential has a list of one
    inputs = model.inputs
    structure = getattr(model, "_inputs_struct", None)
    if structure is None:
        structure = inputs[0] if len(inputs) == 1 else list(inputs)
    made = tree.map_structure(lambda t: _dummy(t, length, image), structure)
    if any(x is None for x in tree.flatten(made)):
        return None, f"{type(model).__name__} takes a float input of open size (an image?): its size is unknown"
    return made, None


def dummy_inputs(model: Any) -> tuple[Any, str | None]:
    """A batch of one example (two tokens) for ``model``, or ``(None, why not)``.

    >>> dummy_inputs(causal_lm)[0]["token_ids"].shape                    # doctest: +SKIP
    (1, 2)
    """
    # two positions, not one: Keras warns of a softmax over an axis of size 1 (attention over one token)
    return _made(model, 2, None)


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


def unreached(model: Any, sites: dict[str, ModuleSite]) -> dict[str, list[Piece]]:
    """The pieces of ``sites`` whose layer's ``call`` the model's forward never runs (:func:`reach_report`).

    >>> unreached(model, {"model.layers.0.mlp.gate_proj": site})        # doctest: +SKIP
    {'model.layers.0.mlp.gate_proj': [Piece(layer=<Dense name=ffw_gating>, ...)]}
    """
    return reach_report(model, sites)[0]


def reach_report(model: Any, sites: dict[str, ModuleSite], *,
                 search: bool = False) -> tuple[dict[str, list[Piece]], dict[str, list[Piece]]]:
    """Run ``model`` once on :func:`dummy_inputs`: ``(unreached, unknown)``, the pieces of ``sites`` whose layer's
    ``call`` never ran, and those the check could not decide.

    A model whose inputs cannot be made (a float input of open size) has each wrapped layer's parent run alone
    (:func:`_probe_parents`): unreached are the layers whose kernel it read without entering their ``call``,
    unknown the layers it neither called nor read, or whose parent could not run alone. A forward of the whole
    model that fails (a model that cannot run on its own) warns, and reports every layer unknown.

    :param search: for the layers still undecided, run the whole model on guessed sizes (:func:`_searched`: one
        image, and 2, 4, 8, ... tokens, until it runs), which costs up to :data:`_LENGTHS` forwards: asked for only
        where the answer decides between loading and refusing.

    >>> reach_report(multimodal_gemma4, {"model.vision_tower.encoder.layers.0.mlp.up_proj.linear": site})
    ...                                                                   # doctest: +SKIP
    ({'model.vision_tower.encoder.layers.0.mlp.up_proj.linear': [Piece(layer=<EinsumDense name=dense>, ...)]}, {})
    """
    pairs = {(id(p.layer), p.role): p.layer for site in sites.values() for p in site.pieces}
    entered = _remembered(model, pairs)
    decided = pairs
    if entered is None:
        inputs, _why_not = dummy_inputs(model)
        if inputs is None:
            entered, decided = _probe_parents(model, sites)
        else:
            with _recording() as entered:
                try:
                    model(inputs, training=False)
                except Exception as exc:  # noqa: BLE001 - the check cannot run: said, not hidden
                    # the model cannot run on its own (keras-hub's Gemma 4 assistant raises in call: it runs only
                    # through call_with_cache inside its target's generate): every layer is undecided
                    if not search:
                        warnings.warn(f"adapterspec could not check that {type(model).__name__}'s forward runs the "
                                      f"adapted layers: a forward on a dummy batch of two tokens failed "
                                      f"({type(exc).__name__}: {exc}); an adapter on a Dense / EinsumDense runs "
                                      "through its kernel (exact either way), where a kernel cannot carry it the "
                                      "layer is not checked",
                                      AdapterSpecWarning, stacklevel=3)
                        return {}, {path: list(site.pieces) for path, site in sites.items()}
                    entered, decided = set(), {}
        if search and len(decided) < len(pairs):
            found = _searched(model, {pair: layer for pair, layer in pairs.items() if pair not in decided})
            if found is not None:
                entered, decided = entered | found[0], {**decided, **found[1]}
        _remember(model, decided, entered)
    unused: dict[str, list[Piece]] = {}
    unknown: dict[str, list[Piece]] = {}
    for path, site in sites.items():
        for p in site.pieces:
            pair = (id(p.layer), p.role)
            if pair not in decided:
                unknown.setdefault(path, []).append(p)
            elif pair not in entered:
                unused.setdefault(path, []).append(p)
    return unused, unknown


def parents_of(model: Any) -> dict[int, Any]:
    """id(layer) -> the layer that holds it (its nearest tracked parent), for every layer under ``model``."""
    parents: dict[int, Any] = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for child in layer._flatten_layers(include_self=False, recursive=False):
            parents.setdefault(id(child), layer)
    return parents


def _probe_input(layer: Any) -> Any | None:
    """A zero float input of the one shape ``layer`` was built with (open dimensions 1, then 2), or ``None``."""
    from keras import ops

    shapes = getattr(layer, "_build_shapes_dict", None)
    if not isinstance(shapes, dict) or len(shapes) != 1:
        return None
    shape = next(iter(shapes.values()))
    if not isinstance(shape, (tuple, list)) or not shape or \
            not all(d is None or isinstance(d, int) and not isinstance(d, bool) for d in shape):
        return None
    dtype = str(getattr(layer, "compute_dtype", "") or "")
    if "float" not in dtype:
        return None
    return ops.zeros([1 if i == 0 and d is None else 2 if d is None else d for i, d in enumerate(shape)], dtype=dtype)


#: how many levels of ancestors above a wrapped layer :func:`_probe_parents` tries (an attention layer that cannot
#: run alone is run by its decoder block)
_PROBE_DEPTH = 3


#: the sizes :func:`_searched` tries for the open dimensions of a model's other inputs (tokens per sequence), with
#: one image: a multimodal model runs only with as many image tokens as it puts per image (T5Gemma 2: 4 here, 256 in
#: the released models)
_LENGTHS = (2, 4, 8, 16, 32, 64, 128, 256)


@contextlib.contextmanager
def _kernel_reads(layers: list[Any]) -> Iterator[None]:
    """While inside, reads of each layer's ``kernel`` are recorded (as the ``"kernel"`` role), no adapter added."""
    watched = [layer for layer in layers if isinstance(getattr(type(layer), "kernel", None), property)
               and not reads_through(layer)]
    for layer in watched:
        read_through_kernel(layer, [])
    try:
        yield
    finally:
        for layer in watched:
            restore_kernel(layer)


def _searched(model: Any, pairs: dict[tuple[int, str], Any]
              ) -> tuple[set[tuple[int, str]], dict[tuple[int, str], Any]] | None:
    """Run the whole model on one image (each open dimension of a float input 1) and the first of :data:`_LENGTHS`
    for its other open dimensions that runs, recording calls and kernel reads; ``None``: none runs.

    :returns: the pairs of ``pairs`` entered, and those decided: entered, or whose kernel was read without the
        layer's ``call`` (a parent reading it itself). A layer neither called nor read stays undecided: the
        guessed sizes may leave out a part of the model (no audio, say).
    """
    if _made(model, 2, 1)[0] is None:
        return None
    with _kernel_reads([layer for (_, role), layer in pairs.items() if role == "forward"]):
        for length in _LENGTHS:
            inputs, _ = _made(model, length, 1)
            with _recording() as seen:
                try:
                    model(inputs, training=False)
                except Exception:  # noqa: BLE001 - not these sizes: the next ones
                    continue
            decided = {pair: layer for pair, layer in pairs.items() if pair in seen or (pair[0], "kernel") in seen}
            return {pair for pair in pairs if pair in seen}, decided
    return None


def _probe_parents(model: Any,
                   sites: dict[str, ModuleSite]) -> tuple[set[tuple[int, str]], dict[tuple[int, str], Any]]:
    """Run each wrapped layer's parent alone on :func:`_probe_input`, recording calls and kernel reads; a layer the
    parent did not decide (it cannot run alone, or neither called the layer nor read its kernel) tries the parent's
    parent, up to :data:`_PROBE_DEPTH` levels below the model.

    :returns: the (layer id, role) pairs entered, and the pairs decided (with their layers): entered, or whose
        kernel an ancestor read without entering the layer's ``call`` (a parent that reads the kernel itself).
    """
    parents = parents_of(model)
    pending = [(p, p.layer) for site in sites.values() for p in site.pieces if p.role == "forward"]
    probed: dict[int, set[tuple[int, str]] | None] = {}
    entered: set[tuple[int, str]] = set()
    decided: dict[tuple[int, str], Any] = {}
    with _kernel_reads([p.layer for p, _ in pending]):
        for _ in range(_PROBE_DEPTH):
            undecided = []
            for piece, holder in pending:
                parent = parents.get(id(holder))
                if parent is None or parent is model:
                    continue
                if id(parent) not in probed:
                    probed[id(parent)] = _probe(parent)
                seen = probed[id(parent)]
                pair = (id(piece.layer), piece.role)
                if seen is not None and (pair in seen or (id(piece.layer), "kernel") in seen):
                    decided[pair] = piece.layer
                    entered |= {pair} & seen
                else:
                    undecided.append((piece, parent))
            pending = undecided
    return entered, decided


def _probe(layer: Any) -> set[tuple[int, str]] | None:
    """The (layer id, role) pairs entered while ``layer`` runs alone on :func:`_probe_input`; ``None``: it cannot."""
    x = _probe_input(layer)
    if x is None:
        return None
    with _recording() as seen:
        try:
            layer(x, training=False)
        except Exception:  # noqa: BLE001 - this layer cannot run alone: its sublayers stay undecided here
            return None
    return seen


def check_reached(model: Any, sites: dict[str, ModuleSite]) -> None:
    """Refuse the sites whose layers' ``call`` the model's forward never runs (:func:`unreached`).

    :param sites: spec module path -> its site, every piece's layer wrapped already.
    :raises UnsupportedError: names the modules and Keras layers the forward does not run.

    >>> check_reached(model, {"model.layers.0.self_attn.q_proj": site})  # doctest: +SKIP
    """
    refuse(unreached(model, sites) or {})


def refuse(unused: dict[str, list[Piece]], why: dict[str, str | None] | None = None, method: str = "") -> None:
    """:raises UnsupportedError: naming the modules of ``unused`` and their Keras layers (if any), and (``why``:
    module path -> reason) why adapter ``method`` cannot run through their kernel either."""
    if not unused:
        return
    listed = "; ".join(f"{path} -> " + ", ".join(p.layer.path + ("" if p.role == "forward" else f" ({p.role})")
                                                  for p in pieces) for path, pieces in list(unused.items())[:8])
    more = f" and {len(unused) - 8} more" if len(unused) > 8 else ""
    reasons = "; ".join(f"{path}: {why[path]}" for path in list(unused)[:8] if why and why.get(path))
    raise UnsupportedError(
        f"the model's forward never runs the call of the Keras layers these modules map to, so an adapter "
        f"on them would change nothing: {listed}{more} (a parent layer reads their kernel itself)" +
        (f"; this {method} adapter cannot run through their kernel ({reasons})" if reasons else ""),
        key=next(iter(unused)),
        hint="remove these modules from target_modules, or map them (module_map) to layers the forward calls")


# ---------------------------------------------------------------------------------------------------
# Kernels read through: a parent that reads ``layer.kernel`` itself reads the kernel the running adapters' unmerged
# forward would use (:meth:`~adapterspec_keras.layers.AdapterLayer.effective_kernel`: LoRA, rsLoRA, DoRA, IA3, LoHa,
# LoKr, OFT, BOFT, AdaLoRA, VeRA, and several of them in PEFT's order). Only on a Dense / EinsumDense, whose
# ``kernel`` is a property of the class: the layer's class becomes a subclass (one per class) whose ``kernel`` does it.

_READ_THROUGH: dict[type, type] = {}

#: config fields of a dropout a kernel cannot apply (it drops inputs of the adapter's term only, or the whole term)
_DROPOUTS = ("lora_dropout", "vera_dropout", "rank_dropout", "module_dropout", "boft_dropout")


def _read_through_class(cls: type) -> type:
    sub = _READ_THROUGH.get(cls)
    if sub is None:
        base = cls.kernel  # type: ignore[attr-defined]

        def kernel(self: Any) -> Any:
            note_entry(self, "kernel")
            value = base.fget(self)
            running = [(adapter_layer, piece) for adapter_layer, piece in
                       self.__dict__.get("_adapterspec_kernel_entries", ()) if adapter_layer.runs()]
            if len(running) > 1 and not all(adapter_layer.adds_only() for adapter_layer, _ in running):
                paths = ", ".join(adapter_layer.site.path for adapter_layer, _ in running)
                raise UnsupportedError(f"{self.path}: the adapters of {paths} run on one kernel its parent reads, and "
                                       "one of them rescales it (DoRA, IA3, OFT/BOFT): their order cannot be kept",
                                       key=running[0][0].site.path, hint="activate one of these modules' adapters")
            for adapter_layer, piece in running:
                value = adapter_layer.effective_kernel(piece, value)
            return value

        sub = type(cls.__name__, (cls,), {"kernel": property(kernel), "_adapterspec_base_kernel": base,
                                          "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _READ_THROUGH[cls] = sub
    return sub


def read_through_refusal(config: Any, path: str, pieces: list[Piece], trainable: bool = False) -> str | None:
    """Why the pieces of module ``path`` cannot take adapter ``config`` through their kernel, or ``None`` when they
    can: a whole Dense / EinsumDense kernel (not a fused kernel's slice), an adapter whose unmerged forward is a
    change of that kernel (:func:`~adapterspec_keras.layers.kernel_refusal`: not ``lora_bias``, not IA3 on the output
    of a layer with a bias), not trained with a dropout (which a kernel cannot apply to the adapter's term alone).

    >>> read_through_refusal(AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["up"],
    ...                      "lora_bias": True}), "mlp.up", pieces)  # doctest: +SKIP
    'lora_bias adds a bias of its own, which a kernel cannot carry'
    """
    from .layers import kernel_refusal

    for piece in pieces:
        if piece.kind not in ("dense", "einsum") or piece.role != "forward" or \
                not isinstance(getattr(type(piece.layer), "kernel", None), property):
            return f"{type(piece.layer).__name__} is not a Dense / EinsumDense whose kernel can carry an adapter"
        if piece.out_slice is not None:
            return "the module is a slice of a fused kernel, which the adapters of its other modules share"
        if quantization(piece.layer):  # SPEC.md 6.8
            return f"{type(piece.layer).__name__} is quantized ({quantization(piece.layer)}): its kernel holds " \
                   "packed or scaled values, which cannot carry an adapter"
    method = str(config.get("peft_type"))
    why = kernel_refusal(method, lora_bias=bool(config.get("lora_bias")),
                         feedforward=method == "IA3" and config.is_feedforward(path),
                         has_bias=any(getattr(p.layer, "bias", None) is not None for p in pieces))
    if why:
        return why
    dropped = [f for f in _DROPOUTS if trainable and config.get(f)]
    if dropped:
        return f"training with {dropped[0]} > 0 drops the input of the adapter's term alone, which a kernel cannot"
    return None


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
