"""Adapter variables laid out like their base kernels on a sharded Keras model (JAX SPMD, SPEC.md 16).

Under an active ``keras.distribution`` on the JAX backend a kernel may be sharded over a device mesh
(``ModelParallel`` with a ``LayoutMap``): its value is a ``jax.Array`` with a ``NamedSharding``. The adapter
tensors of that layer then get the layout of their feature axes on the same mesh:

* the kernel's input axes sharded (row parallel): ``lora_A``'s input-feature axis is sharded the same way;
* its output axes sharded (column parallel): ``lora_B``'s output-feature axis (and ``lora_B.bias``, DoRA's
  magnitude, IA3's vector over outputs) likewise;
* the rank axis, and every tensor of another method, whole on every device (replicated).

A module's flattened feature axis takes a kernel's sharding only when that is the same split: one piece
covering the whole layer in kernel order (:func:`~adapterspec_keras.sites.layer_site`), its sharded axis the
outermost of its input (or output) axes and the flattened size divisible by the mesh axes' size (an EinsumDense
``query`` kernel ``[hidden, heads, head_dim]`` sharded on ``hidden``, an ``attention_output`` kernel
``[heads, head_dim, hidden]`` sharded on ``heads``). Any other layout leaves the adapter tensor replicated:
XLA then computes the same values, only without the saving of memory.

With no distribution active (or another backend) nothing here runs: :func:`placement_of` is ``None`` and
the variables are made as on one device.

>>> placement_of(site) is None  # no keras.distribution active           # doctest: +SKIP
True
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from .sites import ModuleSite, Piece, _axes

__all__ = ["Placement", "active", "param_sharding", "placement_of"]


class Placement(NamedTuple):
    """How a module's base kernel is split: its mesh, and the ``PartitionSpec`` entry its flattened input
    and output features take (``None``: whole)."""

    mesh: Any
    inputs: Any
    outputs: Any


def active() -> bool:
    """Whether a ``keras.distribution`` is active on the JAX backend (else adapter variables are made as today).

    >>> active()
    False
    """
    from keras.src.backend.common import global_state

    if global_state.get_global_attribute("distribution") is None:
        return False
    import keras

    return bool(keras.backend.backend() == "jax")


def _mesh_size(mesh: Any, entry: Any) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(int(mesh.shape[name]) for name in names)


def _feature_entry(spec: tuple[Any, ...], axes: tuple[int, ...], index: np.ndarray, mesh: Any) -> Any:
    """The spec entry of the flattened features over kernel ``axes``, or ``None`` (whole) when it is no split
    of the flattened axis (an inner axis sharded, two axes sharded, an index map not in kernel order)."""
    entries = [spec[a] if a < len(spec) else None for a in axes]
    sharded = [i for i, e in enumerate(entries) if e is not None]
    if not sharded or sharded != [0]:
        return None
    if not np.array_equal(index.ravel(), np.arange(index.size)):
        return None
    entry = entries[0]
    return entry if index.size % _mesh_size(mesh, entry) == 0 else None


def _kernel_spec(piece: Piece) -> tuple[tuple[Any, ...], Any] | None:
    """The kernel's ``PartitionSpec`` (in the piece's kernel order: transposed for a reverse embedding) and mesh,
    or ``None`` when it is not a ``NamedSharding``."""
    import jax

    variable = piece.kernel_variable
    sharding = getattr(getattr(variable, "value", None), "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    spec = tuple(sharding.spec) + (None,) * (len(variable.shape) - len(sharding.spec))
    return (spec[::-1] if piece.kind == "reverse" else spec), sharding.mesh


def placement_of(site: ModuleSite) -> Placement | None:
    """The split of ``site``'s base kernel adapter tensors follow, or ``None`` (no distribution active, a kernel
    not sharded, a module of several pieces or of a slice of a fused kernel: the adapter variables are made as
    they are on one device).

    >>> placement_of(site)                                              # doctest: +SKIP
    Placement(mesh=Mesh('batch': 2, 'model': 4), inputs='model', outputs=None)
    """
    if len(site.pieces) != 1 or site.pieces[0].out_slice is not None or not active():
        return None
    piece = site.pieces[0]
    found = _kernel_spec(piece)
    if found is None:
        return None
    spec, mesh = found
    if all(entry is None for entry in spec):
        return None
    shape = tuple(int(d) for d in piece.kernel_variable.shape)
    kin, kout = _axes(piece.kind, piece.layer, shape[::-1] if piece.kind == "reverse" else shape)
    inputs = _feature_entry(spec, kin, piece.in_index, mesh)
    outputs = _feature_entry(spec, kout, piece.out_index, mesh)
    if inputs is None and outputs is None:
        return None
    return Placement(mesh, inputs, outputs)


#: Which stored axis of a parameter is its input (``"in"``) or output (``"out"``) feature axis, by parameter
#: (the variable's stored layout, :attr:`~adapterspec_keras.layers.Layout.stored_shape`; conv: the Keras one).
_LINEAR = {"lora_A.weight": (1, "in"), "lora_B.weight": (0, "out"), "lora_embedding_A": (1, "in"),
           "lora_embedding_B": (0, "out"), "lora_B.bias": (0, "out"), "lora_magnitude_vector": (0, "out")}
_CONV = {"lora_A.weight": (-2, "in"), "lora_B.weight": (-1, "out"), "lora_B.bias": (0, "out"),
         "lora_magnitude_vector": (0, "out")}


def param_sharding(placement: Placement | None, method: str, param: str, stored_shape: tuple[int, ...],
                   *, conv: bool = False, feedforward: bool = False) -> Any:
    """The ``NamedSharding`` of one adapter tensor as stored (without its group's count axis), or ``None``
    (made as on one device: the distribution's default, replicated).

    >>> param_sharding(None, "LORA", "lora_A.weight", (4, 64)) is None
    True
    """
    if placement is None:
        return None
    if method == "LORA":
        found = (_CONV if conv else _LINEAR).get(param)
    elif method == "IA3" and param == "ia3_l" and len(stored_shape) == 1:
        found = (0, "in" if feedforward else "out")
    else:
        found = None
    if found is None:
        return None
    axis, role = found
    entry = placement.inputs if role == "in" else placement.outputs
    if entry is None:
        return None
    import jax

    spec: list[Any] = [None] * len(stored_shape)
    spec[axis] = entry
    partition: Any = jax.sharding.PartitionSpec  # untyped in jax's stubs
    return jax.sharding.NamedSharding(placement.mesh, partition(*spec))
