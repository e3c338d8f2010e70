"""Packed storage of one adapter's variables: a few Keras variables for hundreds of tensors.

A Llama LoRA on 7 projections x 32 layers is 448 tensors but only ~7 distinct (parameter, shape)
pairs. Creating a framework variable costs about half a millisecond, so the bank packs them:

* groups (:meth:`AdapterBank.materialize`): one variable ``[count, *shape]`` per :class:`GroupKey`,
  each module reading its row (``variable[index]``; gradients flow to the row, so ``fit`` trains them as
  separate tensors). A trainable adapter, or one created with its initial values, is stored so.
* an arena (:meth:`AdapterBank.materialize_arena`): ONE flat variable holding every row, each module
  reading its span (reshaped). A loaded, frozen adapter is stored so: one variable to make, and its
  memory can be the buffer the file was read into (no copy at all).

Either way the variables are created with their data (no zero fill, no second copy).

The bank is a ``keras.layers.Layer`` tracked as a sublayer of a wrapped layer, so ``model.variables``
and ``model.trainable_variables`` include its variables.

>>> bank = AdapterBank("default")                                       # doctest: +SKIP
>>> ref = bank.reserve("lora_A.weight", (64, 4), "float32", None, ("zeros",), trainable=True)  # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

import keras
import numpy as np
from keras import ops

from .devices import device_scope, host_array

__all__ = ["AdapterBank", "GroupKey", "Ref", "as_tensor", "make_initializer"]


class GroupKey(NamedTuple):
    """What makes parameters share a variable: name, Keras shape, dtype, device, initialisation, trainability,
    and on a sharded model (JAX) the layout of one row (``sharding``: a ``jax.sharding.NamedSharding`` over the
    stored shape, see :mod:`~adapterspec_keras.sharding`; ``None``: made as on one device).

    (Tuples, not dataclasses: a load makes and hashes one per tensor.)
    """

    param: str
    shape: tuple[int, ...]
    dtype: str
    device: str | None
    init: tuple[Any, ...]
    trainable: bool
    sharding: Any = None


class Ref(NamedTuple):
    """One parameter of one module: row ``index`` of group ``key``'s variable."""

    key: GroupKey
    index: int  # type: ignore[assignment]  # shadows tuple.index, as a field name may


#: The alignment TensorFlow's CPU kernels assume of a tensor's buffer (``EIGEN_MAX_ALIGN_BYTES``).
_TF_ALIGN = 64


def as_tensor(value: np.ndarray, dtype: Any = None) -> Any:
    """``value`` as a tensor of the Keras backend -- with TensorFlow, sharing its memory (DLPack).

    TensorFlow's own conversion of a NumPy array copies it twice (``convert_to_eager_tensor`` copies
    it, then the tensor copies an unaligned buffer again); a variable made from the result copies it
    once more. Through DLPack only the variable's copy is left -- for arrays aligned as TensorFlow's
    kernels require (64 bytes; others take the copying path). The caller must not change ``value``
    while the tensor lives.

    >>> as_tensor(np.arange(3, dtype="float32")).shape
    TensorShape([3])
    """
    if keras.backend.backend() == "tensorflow" and value.flags.c_contiguous and value.ctypes.data % _TF_ALIGN == 0:
        import tensorflow as tf

        try:
            tensor = tf.experimental.dlpack.from_dlpack(value.__dlpack__())
        except (BufferError, TypeError, ValueError, AttributeError):  # a dtype DLPack lacks (bfloat16)
            tensor = None
        if tensor is not None and (dtype is None or tensor.dtype == tf.as_dtype(dtype)):
            return tensor
    return ops.convert_to_tensor(value, dtype=dtype)


def _np_dtype(dtype: str) -> Any:
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def make_initializer(init: tuple[Any, ...]) -> Any:
    """A Keras initializer from its description: ``("zeros",)``, ``("ones",)``, ``("uniform", bound)``, ``("normal", std)``
    (``("normal", std, mean)`` around ``mean``), ``("constant", value)``.

    >>> type(make_initializer(("uniform", 0.5))).__name__
    'RandomUniform'
    """
    kind = init[0]
    if kind == "uniform_pairs":  # HRA (SPEC.md 17.3): each value twice along the last axis
        return _UniformPairs(init[1])
    if kind == "uniform":
        return keras.initializers.RandomUniform(-init[1], init[1])
    if kind == "normal":
        return keras.initializers.RandomNormal(mean=init[2] if len(init) > 2 else 0.0, stddev=init[1])
    if kind == "constant":
        return keras.initializers.Constant(init[1])
    return kind  # "zeros", "ones"


class _UniformPairs(keras.initializers.Initializer):  # type: ignore[misc]  # keras ships no types
    """Uniform in ``[-bound, bound]`` with each value repeated twice along the last axis: PEFT's HRA start, whose
    paired Householder vectors cancel (SPEC.md 17.3)."""

    def __init__(self, bound: float) -> None:
        self.bound = bound

    def __call__(self, shape: Any, dtype: Any = None) -> Any:
        half = keras.random.uniform((*shape[:-1], shape[-1] // 2), -self.bound, self.bound, dtype=dtype)
        return ops.repeat(half, 2, axis=-1)

    def get_config(self) -> dict[str, Any]:
        return {"bound": self.bound}


class AdapterBank(keras.layers.Layer):  # type: ignore[misc]  # keras ships no types: its classes are Any
    """All variables of one adapter (one variable per :class:`GroupKey`), created in one go.

    :param adapter_name: the adapter's name (it names the layer: ``adapterspec_<name>``).
    """

    def __init__(self, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(name="adapterspec_" + re.sub(r"[^A-Za-z0-9_.-]", "_", adapter_name), **kwargs)
        self.adapter_name = adapter_name
        # plain dicts, not Keras' tracked ones (each insertion into those walks the tracker): add_weight tracks
        # the variables itself
        object.__setattr__(self, "_counts", {})
        object.__setattr__(self, "_variables", {})
        object.__setattr__(self, "_arena", None)  # the flat variable, when stored as an arena
        object.__setattr__(self, "_spans", {})  # the arena's [start, stop) of each row
        self.seed: Any = None
        self.built = True

    def reserve(self, param: str, shape: tuple[int, ...], dtype: str, device: str | None, init: tuple[Any, ...],
                *, trainable: bool) -> Ref:
        """A row for one module's parameter (before :meth:`materialize`)."""
        return self.reserve_keys({param: GroupKey(param, tuple(shape), dtype, device, init, trainable)})[param]

    def reserve_keys(self, keys: Mapping[str, GroupKey]) -> dict[str, Ref]:
        """A row in each group of ``keys`` (parameter name -> its group), before :meth:`materialize`.

        >>> bank.reserve_keys({"ia3_l": GroupKey("ia3_l", (8,), "float32", None, ("ones",), False)})  # doctest: +SKIP
        {'ia3_l': Ref(key=GroupKey(param='ia3_l', ...), index=0)}
        """
        if self.materialized and self._counts:
            raise RuntimeError("the bank is materialized already")  # an internal misuse, never a user error
        counts = self._counts
        refs = {}
        for param, key in keys.items():
            index = counts.get(key, 0)
            counts[key] = index + 1
            refs[param] = Ref(key, index)
        return refs

    def needs_seed(self) -> None:
        """Give the bank a seed generator (an adapter with ``lora_dropout``)."""
        if self.seed is None:
            self.seed = keras.random.SeedGenerator(0)

    @property
    def materialized(self) -> bool:
        return bool(self._variables) or self._arena is not None or not self._counts

    def materialize(self, values: dict[GroupKey, np.ndarray] | None = None) -> None:
        """Create the variables, one per group: from ``values`` (whole groups, as stored: ``Layout.stored_shape``)
        where given, else initialised."""
        if self.materialized:
            return
        values = values or {}
        for i, (key, count) in enumerate(self._counts.items()):
            shape = (count, *key.shape)
            given = values.get(key)
            initializer = make_initializer(key.init) if given is None else (
                lambda shape, dtype=None, _v=given: as_tensor(_v, dtype))
            if key.sharding is not None:
                self._variables[key] = self._add_sharded(key, shape, initializer, given, i)
                continue
            with device_scope(key.device):
                self._variables[key] = self.add_weight(
                    shape=shape, initializer=initializer, dtype=key.dtype, trainable=key.trainable,
                    name=re.sub(r"\W", "_", f"{key.param}_{i}"))  # torch backend: no "." in names

    def _add_sharded(self, key: GroupKey, shape: tuple[int, ...], initializer: Any, given: np.ndarray | None,
                     i: int) -> Any:
        """A group's variable laid out as ``key.sharding`` says for each row (the count axis whole): made with
        its value (placed shard by shard) or its initializer (run sharded), tracked as :meth:`add_weight` does."""
        import jax

        sharding = key.sharding
        partition: Any = jax.sharding.PartitionSpec  # untyped in jax's stubs
        layout = jax.sharding.NamedSharding(sharding.mesh, partition(None, *sharding.spec))
        from keras.src import backend  # add_weight's name scope: the variable's path is the bank's

        with backend.name_scope(self.name, caller=self):
            variable = backend.Variable(
                initializer=given.astype(_np_dtype(key.dtype), copy=False) if given is not None
                else keras.initializers.get(initializer),
                shape=shape, dtype=key.dtype, trainable=key.trainable, layout=layout,
                name=re.sub(r"\W", "_", f"{key.param}_{i}"))
        self._track_variable(variable)
        return variable

    def arena_dtype(self) -> str | None:
        """The dtype an arena would have: the groups' one dtype when they share it and their device and none
        is trainable (a trainable flat variable would get a dense gradient of its whole size per row) or sharded
        (its rows laid out like their base kernels: one variable per layout), else ``None``."""
        keys: list[GroupKey] = list(self._counts)
        if not keys or any(k.trainable or k.dtype != keys[0].dtype or k.device != keys[0].device
                           or k.sharding is not None for k in keys):
            return None
        return keys[0].dtype

    def materialize_arena(self, flat: np.ndarray, spans: Mapping[Ref, tuple[int, int]]) -> None:
        """Create ONE variable from ``flat`` (1-D, of :meth:`arena_dtype`) holding every row: row ``ref`` is
        ``flat[start:stop]`` (as stored, flattened). On TensorFlow the variable keeps ``flat``'s memory
        (:func:`as_tensor`): nothing else may hold it.

        >>> bank.materialize_arena(flat, {ref: (0, 64)})                  # doctest: +SKIP
        """
        dtype = self.arena_dtype()
        if self.materialized or dtype is None:
            raise RuntimeError("the bank cannot be stored as an arena")  # an internal misuse, never a user error
        if len(spans) != sum(self._counts.values()):
            raise RuntimeError("every row needs its span")  # an internal misuse, never a user error
        with device_scope(next(iter(self._counts)).device):
            arena = self.add_weight(shape=tuple(flat.shape), initializer=lambda shape, dtype=None: as_tensor(flat, dtype),
                                    dtype=dtype, trainable=False, name="arena")
        object.__setattr__(self, "_arena", arena)
        self._spans.update(spans)

    def release(self) -> None:
        """Let go of the variables (the adapter is deleted): their memory is freed now, when nothing else holds
        them, not at the next garbage collection of the bank layer's reference cycles -- a deleted adapter's
        tensors would otherwise stay in memory, and the next load write into fresh (page-faulting) memory.

        >>> bank.release()                                                # doctest: +SKIP
        """
        for variable in [*self._variables.values(), *([self._arena] if self._arena is not None else [])]:
            self._tracker.untrack(variable)
        self._variables.clear()
        object.__setattr__(self, "_arena", None)
        self._spans.clear()
        self.seed = None

    def groups(self) -> dict[GroupKey, int]:
        """Group -> number of rows."""
        return dict(self._counts)

    def variable(self, key: GroupKey) -> Any:
        """The Keras variable of a group (created, zero/initialised, if not yet); not for an arena."""
        if self._arena is not None:
            raise RuntimeError("an arena has no variable per group")  # an internal misuse, never a user error
        if not self._variables:
            self.materialize()
        return self._variables[key]

    def get(self, ref: Ref) -> Any:
        """One module's parameter, as stored: a slice of its variable (differentiable)."""
        if self._arena is not None:
            start, stop = self._spans[ref]
            return ops.reshape(self._arena[start:stop], ref.key.shape)
        return self.variable(ref.key)[ref.index]

    def numpy(self, ref: Ref) -> np.ndarray:
        """One module's parameter as a NumPy array, as stored (``Layout.stored_shape``)."""
        return cast(np.ndarray, ops.convert_to_numpy(self.get(ref)))

    def reader(self) -> Callable[[Ref], np.ndarray]:
        """A function giving each row as a NumPy array (as stored), from one read of the variables now.

        >>> read = bank.reader(); read(ref).shape                         # doctest: +SKIP
        (4, 64)
        """
        if self._arena is not None:
            flat = host_array(self._arena, snapshot=True)
            spans = self._spans
            return lambda ref: flat[spans[ref][0]:spans[ref][1]].reshape(ref.key.shape)
        blocks: dict[GroupKey, np.ndarray] = {}

        def read(ref: Ref) -> np.ndarray:
            block = blocks.get(ref.key)
            if block is None:
                block = blocks[ref.key] = host_array(self.variable(ref.key), snapshot=True)
            return cast(np.ndarray, block[ref.index])

        return read

    def assign(self, ref: Ref, value: Any) -> None:
        """Replace one module's parameter (a row of its group, or its span of the arena)."""
        if self._arena is not None:
            start, _ = self._spans[ref]
            flat = ops.reshape(ops.cast(value, self._arena.dtype), (-1,))
            self._arena.assign(ops.slice_update(ops.convert_to_tensor(self._arena), [start], flat))
            return
        variable = self.variable(ref.key)
        start = [ref.index] + [0] * len(ref.key.shape)
        row = ops.expand_dims(ops.cast(value, variable.dtype), 0)
        variable.assign(ops.slice_update(ops.convert_to_tensor(variable), start, row))

    def assign_group(self, key: GroupKey, block: np.ndarray) -> None:
        """Replace a whole group's rows (``block``: ``[count, *shape]``, as stored)."""
        if self._arena is None:
            self.variable(key).assign(block)
            return
        flat = np.array(ops.convert_to_numpy(self._arena))
        for index in range(len(block)):
            start, stop = self._spans[Ref(key, index)]
            flat[start:stop] = np.asarray(block[index]).reshape(-1)
        self._arena.assign(flat)
