"""Whether the model's forward runs the layers an adapter wraps: the check that makes a no-op adapter an error.

The adapters run inside each wrapped layer's ``call``. A parent layer that reads a sublayer's kernel itself
(keras-hub's Gemma 4 MLP: ``ops.matmul(x, self.gating_ffw.kernel)``) never enters that ``call``, so an adapter on
it would load, be listed, and change nothing. After injecting, :func:`check_reached` runs the model once on a
dummy batch of one example of two tokens and refuses, naming them, the wrapped layers whose ``call`` never ran.

The check needs inputs it can make: a functional model (every keras-hub model) has symbolic ``inputs``; a
dimension left open is 1 (batch) or 2 (sequence), except an open dimension of a float input (an image of any size),
which cannot be guessed. Then, and for subclassed models without ``inputs``, the check is skipped: it cannot
say the adapter is unused. A forward that fails on the dummy batch is reported as a warning, not an error.

>>> check_reached(model, {"model.layers.0.mlp.gate_proj": site})      # doctest: +SKIP
Traceback (most recent call last):
adapterspec.errors.UnsupportedError: model.layers.0.mlp.gate_proj: the model's forward never runs ...
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from adapterspec.errors import AdapterSpecWarning, UnsupportedError

from .sites import ModuleSite

__all__ = ["check_reached", "dummy_inputs", "note_entry"]

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


def check_reached(model: Any, sites: dict[str, ModuleSite]) -> None:
    """Run ``model`` once on :func:`dummy_inputs` and refuse sites whose layers' ``call`` never ran.

    :param sites: spec module path -> its site, every piece's layer wrapped already.
    :raises UnsupportedError: names the modules and Keras layers the forward does not run.

    >>> check_reached(model, {"model.layers.0.self_attn.q_proj": site})  # doctest: +SKIP
    """
    inputs, _why_not = dummy_inputs(model)
    if inputs is None:
        return
    with _recording() as entered:
        try:
            model(inputs, training=False)
        except Exception as exc:  # noqa: BLE001 - the check cannot run: said, not hidden
            warnings.warn(f"adapterspec could not check that {type(model).__name__}'s forward runs the adapted "
                          f"layers: a forward on a dummy batch of two tokens failed ({type(exc).__name__}: {exc})",
                          AdapterSpecWarning, stacklevel=3)
            return
    unused = {path: [p.layer.path + ("" if p.role == "forward" else f" ({p.role})") for p in site.pieces
                     if (id(p.layer), p.role) not in entered]
              for path, site in sites.items()}
    unused = {path: layers for path, layers in unused.items() if layers}
    if unused:
        listed = "; ".join(f"{path} -> {', '.join(layers)}" for path, layers in list(unused.items())[:8])
        more = f" and {len(unused) - 8} more" if len(unused) > 8 else ""
        raise UnsupportedError(
            f"the model's forward never runs the call of the Keras layers these modules map to, so an adapter "
            f"on them would change nothing: {listed}{more} (a parent layer reads their kernel itself)",
            key=next(iter(unused)),
            hint="remove these modules from target_modules, or map them (module_map) to layers the forward calls")
