"""The NNX layers of the Flax backend: adapter weights, and the wrappers put in place of adapted layers.

An adapted ``nnx.Linear`` (or ``nnx.Embed``) is replaced, at the same attribute path, by an
:class:`AdaptedLinear` (:class:`AdaptedEmbed`) that holds the original layer object as ``base_layer``
and one weights module per adapter in ``adapters`` (an ``nnx.Dict``). Tensors are kept in Flax
layout -- kernels are ``[in, out]`` -- so ``lora_A`` is ``[in, r]`` here and ``[r, in]`` in the file.

Which adapters run is static module data (``active``, ``merged``): switching reassigns two tuples,
never copies a weight, and ``nnx.jit`` retraces on the change. A graph definition taken once
(``graphdef, state = nnx.split(model)`` for a ``jax.jit`` over the state) is stale after
``set_active_adapters``, ``disabled_adapters``, ``merge_adapters``, ``unmerge_adapters``, ``delete_adapter``,
``unload``, ``load_adapter`` and ``inject_adapter``: split again after them (the old one with the new state runs the
old structure on the new weights -- after a merge, the delta twice -- without an error).

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> layer = AdaptedLinear(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
>>> layer.adapters["default"] = LoraWeights("q", jnp.ones((2, 1)), jnp.ones((1, 3)), scaling=0.5)
>>> layer.active = ("default",)
>>> bool(jnp.allclose(layer(jnp.ones((1, 2))), layer.base_layer(jnp.ones((1, 2))) + 1.0))
True
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from adapterspec.config import Running
from adapterspec.errors import UnsupportedError

__all__ = [
    "AdaptedEmbed",
    "AdaptedLinear",
    "AdapterParam",
    "AdapterVariable",
    "DoraNorm",
    "FrozenParam",
    "IA3Weights",
    "LoraWeights",
    "WRAPPERS",
    "Weights",
    "frozen_type",
    "running_of",
]

#: PEFT adds this to IA3 vectors before dividing them out of a merged weight.
IA3_UNMERGE_EPS = 1e-8


class AdapterParam(nnx.Param):  # type: ignore[misc]
    """A trainable adapter tensor (``trainable=True``). Train the adapters alone with ``wrt=AdapterParam``:
    the base layers' weights are plain ``nnx.Param``.

    >>> import optax                                                         # doctest: +SKIP
    >>> optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=AdapterParam)   # doctest: +SKIP
    """


class AdapterVariable(nnx.Variable):  # type: ignore[misc]
    """A frozen adapter tensor (the default when loading): not an ``nnx.Param``, so no optimizer updates it."""


class FrozenParam(nnx.Variable[Any]):
    """A base-model parameter frozen while a trainable adapter is loaded (``freeze_base``, PEFT's
    ``get_peft_model``): not an ``nnx.Param``, so ``nnx.Optimizer(..., wrt=nnx.Param)`` and
    ``nnx.grad(..., argnums=nnx.DiffState(0, nnx.Param))`` leave it alone. The variable object stays the same (its
    class is switched, so tied and held references still see one variable); :attr:`thawed` is the class it gets back.

    >>> layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    >>> layer.kernel.__class__ = frozen_type(type(layer.kernel))
    >>> sorted(nnx.state(layer, nnx.Param)), type(layer.kernel).thawed is nnx.Param
    (['bias'], True)
    """

    __slots__ = ()
    thawed: ClassVar[type] = nnx.Param


_FROZEN: dict[type, type] = {nnx.Param: FrozenParam}


def frozen_type(cls: type) -> type:
    """The :class:`FrozenParam` class for parameters of class ``cls`` (an ``nnx.Param`` subclass), made once.

    :raises UnsupportedError: ``cls`` adds slots of its own, so its objects cannot change class.

    >>> frozen_type(nnx.Param) is FrozenParam
    True
    """
    found = _FROZEN.get(cls)
    if found is None:
        namespace: dict[str, Any] = {"thawed": cls, "__module__": __name__, "__qualname__": f"Frozen{cls.__qualname__}"}
        if cls.__dictoffset__ == 0:
            namespace["__slots__"] = ()
        found = types.new_class(f"Frozen{cls.__name__}", (FrozenParam,), exec_body=lambda ns: ns.update(namespace))
        try:  # the layouts must agree for an object to change class
            object.__setattr__(object.__new__(cls), "__class__", found)
        except TypeError:
            raise UnsupportedError(
                f"parameters of class {cls.__qualname__} cannot be frozen (it adds slots of its own)",
                hint="pass freeze_base=False and train with wrt=AdapterParam") from None
        _FROZEN[cls] = found
    return found


class DoraNorm(nnx.Variable):  # type: ignore[misc]
    """The weight norm a DoRA adapter was merged with (unmerging needs it: the merged weight has another norm)."""


def _variable(value: jax.Array, trainable: bool) -> nnx.Variable:
    return AdapterParam(value) if trainable else AdapterVariable(value)


class LoraWeights(nnx.Module):
    """One LoRA (or DoRA) adapter of one layer, Flax layout.

    :param module: the spec module path it adapts (the key prefix on disk).
    :param lora_a: ``[in, r]`` (``[num_embeddings, r]`` on an embedding).
    :param lora_b: ``[r, out]`` (``[r, features]`` on an embedding).
    :param scaling: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
    :param bias: ``lora_B``'s bias ``[out]`` (``lora_bias``), or ``None``.
    :param magnitude: DoRA's magnitude vector ``[out]``, or ``None`` for plain LoRA.
    :param trainable: :class:`AdapterParam` variables if true, :class:`AdapterVariable` otherwise.
    :param round_merge: a merge rounds the delta to the weight's dtype before adding it (else it adds the delta in the
        adapter's dtype and rounds the sum once); ``round_unmerge``: likewise for an unmerge -- PEFT's rule,
        :func:`adapterspec.config.rounds_delta_first` (a LoRA on a linear layer: ``False``, ``True``).
    """

    def __init__(self, module: str, lora_a: jax.Array, lora_b: jax.Array, *, scaling: float,
                 bias: jax.Array | None = None, magnitude: jax.Array | None = None, trainable: bool = False,
                 round_merge: bool = False, round_unmerge: bool = True) -> None:
        self.module = module
        self.scaling = float(scaling)
        self.round_merge = bool(round_merge)
        self.round_unmerge = bool(round_unmerge)
        self.lora_A = _variable(lora_a, trainable)
        self.lora_B = _variable(lora_b, trainable)
        self.lora_B_bias = _variable(bias, trainable) if bias is not None else nnx.data(None)
        self.magnitude = _variable(magnitude, trainable) if magnitude is not None else nnx.data(None)
        self.merged_norm = nnx.data(None)

    @property
    def is_dora(self) -> bool:
        """Whether this is a DoRA adapter (it has a magnitude vector)."""
        return self.magnitude is not None

    def delta(self, dtype: Any = None) -> jax.Array:
        """``scaling * A @ B`` in kernel layout (``[in, out]``; ``[num_embeddings, features]`` on an embedding),
        computed in the adapter's dtype and cast to ``dtype`` (``None``: left in the adapter's).

        >>> LoraWeights("q", jnp.ones((3, 1)), jnp.ones((1, 2)), scaling=2.0).delta(jnp.float32).tolist()
        [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
        """
        delta = self.scaling * (self.lora_A[...] @ self.lora_B[...])
        return delta if dtype is None else delta.astype(dtype)

    def merge_delta(self, weight: jax.Array, *, unmerge: bool) -> jax.Array:
        """The delta a merge adds to (``unmerge``: subtracts from) ``weight``: rounded to its dtype first, or in
        the adapter's dtype for the sum to be rounded once (:attr:`round_merge` / :attr:`round_unmerge`, PEFT's)."""
        return self.delta(weight.dtype if (self.round_unmerge if unmerge else self.round_merge) else None)

    def low_rank(self, x: jax.Array) -> jax.Array:
        """``B(A(x))`` without the scaling (``lora_B``'s bias included), in the adapter's dtype.

        >>> LoraWeights("q", jnp.ones((2, 1)), jnp.ones((1, 2)), scaling=2.0, bias=jnp.ones(2)).low_rank(jnp.ones((1, 2)))
        Array([[3., 3.]], dtype=float32)
        """
        out = x.astype(self.lora_A.get_value().dtype) @ self.lora_A[...] @ self.lora_B[...]
        return out + self.lora_B_bias[...] if self.lora_B_bias is not None else out


class IA3Weights(nnx.Module):
    """One IA3 adapter of one linear layer: the vector ``l`` scaling its output (or, feed-forward, its input).

    :param module: the spec module path it adapts.
    :param ia3_l: ``[out]``, or ``[in]`` when ``feedforward``.
    """

    def __init__(self, module: str, ia3_l: jax.Array, *, feedforward: bool, trainable: bool = False) -> None:
        self.module = module
        self.feedforward = bool(feedforward)
        self.ia3_l = _variable(ia3_l, trainable)


Weights = LoraWeights | IA3Weights


def _product(vectors: list[jax.Array]) -> jax.Array:
    """The product of IA3 vectors, in their dtype (PEFT multiplies the active ones together first)."""
    out = vectors[0]
    for vector in vectors[1:]:
        out = out * vector
    return out


def running_of(layer: AdaptedLinear | AdaptedEmbed, names: Sequence[str]) -> list[Running]:
    """The adapters of ``names`` that ``layer`` holds, as the SDK's :func:`adapterspec.config.mix_refusal` judges
    whether they may run together (the torch and Keras backends' ``running_of``).

    >>> running_of(AdaptedLinear(nnx.Linear(2, 2, rngs=nnx.Rngs(0))), ["default"])
    []
    """
    return [Running(n, "IA3" if isinstance(w, IA3Weights) else "LORA", isinstance(w, LoraWeights) and w.is_dora)
            for n in names if (w := layer.adapters.get(n)) is not None]


def _live(layer: AdaptedLinear | AdaptedEmbed) -> list[Weights]:
    """The weights that take part in the forward pass: active, loaded here, not merged."""
    return [layer.adapters[n] for n in layer.active if n in layer.adapters and n not in layer.merged]


class AdaptedLinear(nnx.Module):
    """An ``nnx.Linear`` with adapters: ``base_layer`` is the very layer object that was at this path.

    Forward pass (PEFT's): feed-forward IA3 vectors scale the input, the others the output; then each
    live LoRA adds ``scaling * B(A(x))``, DoRA as in PEFT (``(m/||W + sBA|| - 1) * (base - bias) + m/||.|| * sBA x``).
    As in PEFT, the input goes into each adapter in the adapter's dtype (float32 on a half-precision base, SPEC.md
    7.5), the terms are added to the base output in that dtype, and the sum is cast to the base output's dtype once.
    Dropout is not applied (adapters loaded here are for inference).
    """

    def __init__(self, base_layer: nnx.Linear) -> None:
        self.base_layer = base_layer
        self.adapters: nnx.Dict = nnx.Dict()
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()

    # read-only views of the wrapped layer, so code that reads them keeps working
    @property
    def kernel(self) -> nnx.Variable:
        """The wrapped layer's kernel ``[in, out]``."""
        return self.base_layer.kernel

    @property
    def bias(self) -> nnx.Variable | None:
        """The wrapped layer's bias."""
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        """The wrapped layer's input size."""
        return int(self.base_layer.in_features)

    @property
    def out_features(self) -> int:
        """The wrapped layer's output size."""
        return int(self.base_layer.out_features)

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        live = _live(self)
        if not live:
            out: jax.Array = self.base_layer(inputs, *args, **kwargs)
            return out
        x = inputs
        ia3_in = [w.ia3_l[...] for w in live if isinstance(w, IA3Weights) and w.feedforward]
        if ia3_in:  # PEFT: the input in the vectors' dtype times their product, back in the input's dtype
            scale = _product(ia3_in)
            x = (x.astype(scale.dtype) * scale).astype(inputs.dtype)
        result = self.base_layer(x, *args, **kwargs)
        ia3_out = [w.ia3_l[...] for w in live if isinstance(w, IA3Weights) and not w.feedforward]
        if ia3_out:
            result = (result * _product(ia3_out)).astype(result.dtype)
        dtype = result.dtype
        # the LoRA terms are added in the adapters' dtype (float32 on a half-precision base, SPEC.md 7.5) and the sum is
        # cast back to the base output's dtype once, as PEFT's (and the torch backend's) forward does
        for w in live:
            if not isinstance(w, LoraWeights):
                continue
            low_rank = w.low_rank(inputs)
            if not w.is_dora:
                result = result + low_rank * w.scaling
                continue
            weight = self.base_layer.kernel[...].astype(low_rank.dtype)
            norm = jax.lax.stop_gradient(jnp.linalg.norm(weight + w.delta(weight.dtype), axis=0))
            scale = w.magnitude[...] / norm
            base_result = result
            if self.base_layer.bias is not None:
                base_result = base_result - self.base_layer.bias[...]
            result = result + ((scale - 1) * base_result + scale * low_rank * w.scaling)
        return result.astype(dtype)

    def weight_variables(self) -> tuple[nnx.Variable, nnx.Variable | None]:
        """The base layer's kernel and bias variables (what merging writes)."""
        return self.base_layer.kernel, self.base_layer.bias

    def merged_state(self, names: tuple[str, ...]) -> tuple[jax.Array, jax.Array | None, dict[str, jax.Array]]:
        """Kernel and bias with ``names`` merged in turn into the current ones, and the norms of the DoRA
        adapters among them -- computed, not assigned (the caller commits all layers at once).

        :raises UnsupportedError: a ``lora_B`` bias would have to merge into a layer without bias.
        """
        norms: dict[str, jax.Array] = {}
        kernel = self.base_layer.kernel[...]
        bias = self.base_layer.bias[...] if self.base_layer.bias is not None else None
        unmerged = self.unmerged_state()[0]
        # as PEFT (and the torch backend): computed in the adapter's dtype (float32 on a half-precision base) and
        # rounded to the weight's once, but a plain LoRA's delta rounded first where PEFT rounds it (merge_delta)
        for name in names:
            w = self.adapters[name]
            if isinstance(w, IA3Weights):
                l = w.ia3_l[...]
                kernel = (kernel * (l[:, None] if w.feedforward else l[None, :])).astype(kernel.dtype)
                if bias is not None and not w.feedforward:
                    bias = (bias * l).astype(bias.dtype)
                continue
            if w.lora_B_bias is not None:
                if bias is None:
                    raise UnsupportedError(
                        "cannot merge lora_B's bias into a layer without bias", key=w.module,
                        hint="keep the adapter unmerged (use_bias=False layers cannot take lora_bias)")
                bias = (bias + w.scaling * w.lora_B_bias[...]).astype(bias.dtype)
            if w.is_dora:
                delta = w.delta()
                # PEFT: the norm is that of the unmerged weight plus this delta
                norm = jnp.linalg.norm(unmerged + delta, axis=0)
                norms[name] = norm
                kernel = ((w.magnitude[...] / norm)[None, :] * (kernel + delta)).astype(kernel.dtype)
            else:
                kernel = (kernel + w.merge_delta(kernel, unmerge=False)).astype(kernel.dtype)
        return kernel, bias, norms

    def unmerged_state(self) -> tuple[jax.Array, jax.Array | None]:
        """Kernel and bias with every merged adapter subtracted again, newest first -- no assignment.

        >>> layer = AdaptedLinear(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
        >>> layer.adapters["a"] = LoraWeights("q", jnp.ones((2, 1)), jnp.ones((1, 2)), scaling=1.0)
        >>> kernel, bias, norms = layer.merged_state(("a",))
        >>> layer.base_layer.kernel.set_value(kernel); layer.merged = ("a",)
        >>> bool(jnp.allclose(layer.unmerged_state()[0], kernel - 1.0))
        True
        """
        kernel = self.base_layer.kernel[...]
        bias = self.base_layer.bias[...] if self.base_layer.bias is not None else None
        for name in reversed(self.merged):
            w = self.adapters[name]
            if isinstance(w, IA3Weights):
                l = w.ia3_l[...] + IA3_UNMERGE_EPS
                kernel = (kernel / (l[:, None] if w.feedforward else l[None, :])).astype(kernel.dtype)
                if bias is not None and not w.feedforward:
                    bias = (bias / l).astype(bias.dtype)
                continue
            if w.is_dora:
                factor = w.magnitude[...] / w.merged_norm[...]
                kernel = (kernel / factor[None, :] - w.delta()).astype(kernel.dtype)
            else:
                kernel = (kernel - w.merge_delta(kernel, unmerge=True)).astype(kernel.dtype)
            if w.lora_B_bias is not None and bias is not None:
                bias = (bias - w.scaling * w.lora_B_bias[...]).astype(bias.dtype)
        return kernel, bias


class AdaptedEmbed(nnx.Module):
    """An ``nnx.Embed`` with LoRA adapters (``lora_embedding_A``/``_B``): ``y = E[x] + scaling * A[x] @ B``.

    ``attend`` (tied output layers) uses the base embedding only, as PEFT does for a tied head,
    unless adapters are merged.
    """

    def __init__(self, base_layer: nnx.Embed) -> None:
        self.base_layer = base_layer
        self.adapters: nnx.Dict = nnx.Dict()
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()

    @property
    def embedding(self) -> nnx.Variable:
        """The wrapped layer's embedding matrix ``[num_embeddings, features]``."""
        return self.base_layer.embedding

    @property
    def num_embeddings(self) -> int:
        """The wrapped layer's vocabulary size."""
        return int(self.base_layer.num_embeddings)

    @property
    def features(self) -> int:
        """The wrapped layer's embedding size."""
        return int(self.base_layer.features)

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        result: jax.Array = self.base_layer(inputs, *args, **kwargs)
        dtype = result.dtype
        for w in _live(self):  # added in the adapters' dtype, cast back once (PEFT's Embedding)
            assert isinstance(w, LoraWeights)
            after_a = jnp.take(w.lora_A[...], inputs, axis=0)
            result = result + after_a @ w.lora_B[...] * w.scaling
        return result.astype(dtype)

    def attend(self, query: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """The wrapped layer's ``attend``."""
        return self.base_layer.attend(query, *args, **kwargs)

    def weight_variables(self) -> tuple[nnx.Variable, None]:
        """The base layer's embedding variable (what merging writes)."""
        return self.base_layer.embedding, None

    def merged_state(self, names: tuple[str, ...]) -> tuple[jax.Array, None, dict[str, jax.Array]]:
        """The embedding matrix with ``names`` merged in -- computed, not assigned."""
        table = self.base_layer.embedding[...]
        for name in names:
            table = (table + self.adapters[name].merge_delta(table, unmerge=False)).astype(table.dtype)
        return table, None, {}

    def unmerged_state(self) -> tuple[jax.Array, None]:
        """The embedding matrix with every merged adapter subtracted -- no assignment."""
        table = self.base_layer.embedding[...]
        for name in reversed(self.merged):
            table = (table - self.adapters[name].merge_delta(table, unmerge=True)).astype(table.dtype)
        return table, None


#: The wrapper class of each layer kind the backend adapts.
WRAPPERS: dict[type, type] = {nnx.Linear: AdaptedLinear, nnx.Embed: AdaptedEmbed}
