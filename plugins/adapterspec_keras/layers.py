"""The adapter layers: one per adapted spec module, holding any number of named adapters.

:class:`AdapterLayer` is a ``keras.layers.Layer`` that owns the adapter variables of one spec module
(``model.layers.0.self_attn.q_proj``) -- in the spec's parametrization (PEFT's rank-``r`` factors over
the module's flattened features). The math works in Keras layout (``lora_A`` as ``[in, r]``, ``lora_B``
as ``[r, out]``); the variables of those 2-D factors keep the file's ``[r, in]``/``[out, r]`` (loading is a
plain copy) and are transposed in the graph, convolution factors are stored in Keras layout (see
:class:`Layout`). It runs
PEFT's math exactly -- LoRA, rsLoRA, DoRA, ``lora_bias``, IA3; LoHa/LoKr, AdaLoRA and VeRA through
:mod:`~adapterspec_keras.lycoris`, :mod:`~adapterspec_keras.adalora`, :mod:`~adapterspec_keras.vera` -- on
each Keras layer (*piece*) the module maps to, including einsum attention kernels ``(hidden, heads,
head_dim)`` and GPT-2's fused ``c_attn`` split over three layers (one ``lora_A``, ``lora_B``'s rows split
between them) -- and the reverse, Swin's query, key and value fused by keras-hub into one kernel: three adapter
layers on one Keras layer, each changing only its columns (:attr:`~adapterspec_keras.sites.Piece.out_slice`).

It does not replace any Keras layer: :mod:`adapterspec_keras.inject` patches the wrapped layers'
``call`` to ask it for its contribution (:meth:`AdapterLayer.scale_input`, :meth:`AdapterLayer.apply`).
The variables themselves live packed in the adapter's :class:`~adapterspec_keras.bank.AdapterBank`
(one Keras variable per group of same-shaped parameters, or one flat arena for a loaded frozen adapter);
an adapter layer holds references.

>>> layer = AdapterLayer(site)                                          # doctest: +SKIP
>>> layer.add_adapter("default", cfg, "model.layers.0.self_attn.q_proj", LoadOptions(), bank)  # doctest: +SKIP
>>> sorted(layer.adapter_params("default"))                             # doctest: +SKIP
['lora_A.weight', 'lora_B.weight']
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import keras
import numpy as np
from keras import ops

from adapterspec import AdapterConfig, LoadOptions
from adapterspec._lora_init import factor_rank, frozen_params
from adapterspec._merge import rounds_delta_first
from adapterspec._mix import TOKEN_ROWS, Running
from adapterspec._rules import PORTABLE_METHODS
from adapterspec.errors import UnsupportedError
from adapterspec.naming import TRAINABLE_TOKENS_PARAM

from . import _ops, adalora, beft, c3a, delora, gralora, hra, lycoris, miss, oft, road, tokens, vblora, vera
from .bank import AdapterBank, GroupKey, Ref
from .devices import target_of
from .quantized import hint as quantized_hint
from .quantized import quantization
from .sharding import Placement, param_sharding, placement_of
from .sites import UNADAPTABLE, ModuleSite, Piece, keras_lora

__all__ = ["AdapterLayer", "Layout", "check_supported", "kernel_refusal", "layer_kind"]

#: IA3 unmerge divides by ``l + 1e-8``, as PEFT does.
_IA3_EPS = 1e-8

#: Kernel dtypes whose adapters are kept in float32 unless a dtype is given (SPEC.md 7.5).
_UPCAST = ("float16", "bfloat16")

#: The method modules whose ``check`` is the whole of a site's method-specific refusals (RoAd and MiSS go on to
#: the generic checks below theirs, in :func:`check_supported`).
_OWN_CHECKS: tuple[Any, ...] = (oft, hra, lycoris, adalora, vera, vblora, c3a, gralora, delora, beft)


def layer_kind(layer: Any) -> str | None:
    """``"dense"``, ``"einsum"``, ``"embedding"``, ``"conv"`` (what an adapter can wrap), or ``None``.

    >>> layer_kind(keras.layers.EinsumDense("ab,bc->ac", output_shape=4))
    'einsum'
    """
    from .sites import layer_kind as kind

    return kind(layer)


def _tied(layer: Any) -> bool:
    """A ``ReversibleEmbedding`` whose logits projection reads its ``embeddings`` (tied weights)."""
    return getattr(layer, "tie_weights", False) is True


def check_supported(site: ModuleSite, path: str, config: AdapterConfig) -> None:
    """Refuse a module this backend cannot adapt with ``config``'s method.

    :raises UnsupportedError: naming ``path`` and the layer type.

    >>> check_supported(site, "model.embed_tokens", ia3_config)         # doctest: +SKIP
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: model.embed_tokens: IA3 cannot adapt an embedding ...
    """
    method = config.peft_type
    if site.kind == UNADAPTABLE:  # as the torch backend's check_supported
        raise UnsupportedError(f"{method} {site.refused}", key=path,
                               hint="remove the module from target_modules (or exclude it with exclude_modules)")
    if site.refused:
        raise UnsupportedError(f"{path}: {site.refused}", key=path,
                               hint="leave this module out of target_modules, or use the torch backend")

    def layers() -> str:
        return ", ".join(f"{type(p.layer).__name__} {p.layer.path!r}" for p in site.pieces)

    native = [p.layer for p in site.pieces if keras_lora(p.layer)]
    if native:
        raise UnsupportedError(
            f"{type(native[0]).__name__} {native[0].path!r} has Keras' own LoRA on (enable_lora): its kernel is the "
            "base weight plus that LoRA's delta, which an adapter would sit on, and merges and saves would mix up",
            key=path, hint="to carry Keras' LoRA to PEFT or another model, read it with "
                           "adapterspec_keras.keras_lora_adapter(model); to load this adapter, use a model without "
                           "enable_lora, or leave this module out of target_modules")

    quantized_pieces = [p for p in site.pieces if quantization(p.layer)]
    quantized, kinds = [p.layer for p in quantized_pieces], {p.kind for p in quantized_pieces}
    if quantized and (method in (*oft.METHODS, *hra.METHODS) or (method == "LORA" and config.get("use_dora")) or
                      kinds - {"dense", "einsum"}):
        reads_kernel = method in (*oft.METHODS, *hra.METHODS) or (method == "LORA" and bool(config.get("use_dora")))
        reason = ("OFT rotates the kernel, whose values" if method in oft.METHODS else
                  "HRA reflects the kernel, whose values" if method in hra.METHODS else
                  "DoRA's weight norm reads the kernel, whose values" if reads_kernel
                  else f"a quantized {'/'.join(sorted(kinds - {'dense', 'einsum'}))} layer, which")
        raise UnsupportedError(f"{type(quantized[0]).__name__} {quantized[0].path!r} is quantized "
                               f"({quantization(quantized[0])}): {reason} the keras backend does not adapt (it runs "
                               "adapters on quantized Dense and EinsumDense layers)", key=path,
                               hint=quantized_hint(quantized, torch=reads_kernel and not kinds - {"dense", "einsum"}))
    implemented = ("LORA", "IA3", *road.METHODS, *miss.METHODS, *(m for module in _OWN_CHECKS for m in module.METHODS))
    if method not in implemented and method in PORTABLE_METHODS:
        raise UnsupportedError(f"{method} is portable in the spec (SPEC.md 15), not implemented on Keras yet; PEFT and "
                               f"the torch backend load it (module on {layers()})", key=path,
                               hint="load this adapter with the torch backend or PEFT")
    if method not in implemented:
        raise UnsupportedError(f"the keras backend does not implement {method} adapters (module on {layers()})",
                               key=path, hint="use a LORA, IA3, LOHA, LOKR, OFT, BOFT, ADALORA, VERA, ROAD, MISS, HRA, "
                                              "VBLORA, C3A, GRALORA, DELORA or BEFT adapter, or the torch backend")
    if any(piece.out_slice is not None for piece in site.pieces):
        _check_fused(site, path, config, layers())
    own = next((module for module in _OWN_CHECKS if method in module.METHODS), None)
    if own is not None:  # the method's own module decides alone
        own.check(site, path, config)
        return
    if method in road.METHODS:
        road.check(site, path, config)
    if method in miss.METHODS:
        miss.check(site, path, config)
    if method == "IA3" and site.kind == "embedding":
        raise UnsupportedError(f"IA3 cannot adapt an embedding ({layers()}); PEFT cannot either", key=path,
                               hint="remove the module from target_modules")
    if method == "IA3" and any(piece.kind == "conv" and getattr(piece.layer, "rank", 2) == 1 for piece in site.pieces):
        raise UnsupportedError(f"IA3 cannot adapt a 1-D convolution ({layers()}); PEFT cannot either (SPEC.md 6.3)",
                               key=path, hint="remove the module from target_modules")
    for piece in site.pieces:
        if piece.kind == "conv" and getattr(piece.layer, "groups", 1) != 1:
            raise UnsupportedError(f"grouped convolution {piece.layer.path!r} cannot take an adapter", key=path,
                                   hint="exclude it with exclude_modules")
    if method == "LORA":
        _check_lora_conv(site, path)
        if config.get("lora_bias") and site.kind == "embedding":
            raise UnsupportedError("lora_bias on an embedding is not defined by PEFT", key=path,
                                   hint="set lora_bias to false")
        if config.get("velora_config") is not None and site.kind in ("embedding", "conv"):
            raise UnsupportedError(f"VeLoRA (velora_config) adapts linear layers only, not an {site.kind} "
                                   f"({layers()}); PEFT refuses it too", key=path, pointer="/velora_config",
                                   hint="set velora_config to null, or remove the module from target_modules")


def _rounded(delta: Any, piece: Piece) -> Any:
    """``delta`` rounded to the piece's kernel dtype (and back to its own): PEFT's ``delta.to(weight.dtype)`` before
    an add (:func:`adapterspec._merge.rounds_delta_first`)."""
    return ops.cast(ops.cast(delta, piece.kernel_variable.dtype), delta.dtype)


def _check_lora_conv(site: ModuleSite, path: str) -> None:
    """Refuse LoRA (or DoRA) on a convolution that dilates its kernel: PEFT runs ``lora_A`` with the layer's kernel
    size, strides and padding but without its dilation, so its unmerged and merged results differ (SPEC.md 8.1).
    Dilation along an axis where the kernel has size 1 changes nothing and is accepted."""
    for piece in site.pieces:
        if piece.kind != "conv":
            continue
        layer = piece.layer
        rates, kernel = tuple(layer.dilation_rate), tuple(layer.kernel_size)
        if any(d != 1 and k != 1 for d, k in zip(rates, kernel)):
            raise UnsupportedError(
                f"LoRA on {type(layer).__name__} {layer.path!r} with dilation_rate={rates}: PEFT runs lora_A without "
                "the layer's dilation, so the adapter's unmerged and merged results differ (SPEC.md 8.1: refused)",
                key=path, hint="leave this layer out of target_modules (or exclude it with exclude_modules)")


def kernel_refusal(method: str, *, lora_bias: bool = False, feedforward: bool = False,
                   has_bias: bool = False) -> str | None:
    """Why adapter ``method`` cannot run through the kernel of a layer whose parent reads it (:meth:`AdapterLayer.
    effective_kernel`), or ``None`` when it can: the parent contracts its input with the kernel and adds the layer's
    bias itself, so only a change of the kernel reaches the output.

    >>> kernel_refusal("IA3", has_bias=True)
    'IA3 scales the output of a layer with a bias, which changes the bias too; a kernel cannot carry that'
    """
    if method not in ("LORA", "IA3", *lycoris.METHODS, *oft.METHODS, *adalora.METHODS, *vera.METHODS, *hra.METHODS,
                      *vblora.METHODS, *delora.METHODS):
        return f"{method} cannot run on a kernel its parent reads"
    if lora_bias:
        return "lora_bias adds a bias of its own, which a kernel cannot carry"
    if method == "IA3" and not feedforward and has_bias:
        return "IA3 scales the output of a layer with a bias, which changes the bias too; a kernel cannot carry that"
    return None


def _kernel_refusal(slot: _Slot, has_bias: bool) -> str | None:
    return kernel_refusal(slot.method, lora_bias=slot.lora_bias, feedforward=slot.feedforward, has_bias=has_bias)


#: the methods checked exact against PEFT on a module that is a slice of a fused kernel (test_fused_kernels.py)
_FUSED_METHODS = ("LORA", "IA3", "LOHA", "LOKR")


def _check_fused(site: ModuleSite, path: str, config: AdapterConfig, layers: str) -> None:
    """Refuse what is not exact (or not verified) on a module that is a slice of a fused kernel (Swin's query).

    An IA3 feed-forward vector scales the layer's input, which the fused layer's other modules share."""
    method = config.peft_type
    if method not in _FUSED_METHODS:
        raise UnsupportedError(f"{method} on a module fused with others into one kernel ({layers}, its columns "
                               f"{list(site.pieces[0].out_slice or ())}) is not implemented by the keras backend; "
                               f"{', '.join(_FUSED_METHODS)} are", key=path,
                               hint="leave this module out of target_modules, or use the torch backend")
    if method == "IA3" and config.is_feedforward(path):
        raise UnsupportedError(f"IA3 feed-forward on {path} scales the input of {layers}, which the modules fused "
                               "into its kernel share: that cannot be exact", key=path,
                               hint="leave this module out of feedforward_modules (or target_modules), or use the "
                                    "torch backend")


@dataclass(frozen=True)
class Layout:
    """How one adapter tensor is laid out in Keras versus in the file.

    ``spec = transpose(keras, perm).reshape(spec_shape)``; :meth:`to_keras` inverts it exactly.

    >>> Layout((8, 4), (4, 8), (1, 0)).to_spec(np.zeros((8, 4))).shape
    (4, 8)
    """

    keras_shape: tuple[int, ...]
    spec_shape: tuple[int, ...]
    perm: tuple[int, ...]

    def to_spec(self, value: np.ndarray) -> np.ndarray:
        """A Keras-layout array in the spec's layout (a new contiguous array)."""
        return np.ascontiguousarray(np.transpose(np.asarray(value), self.perm).reshape(self.spec_shape))

    def to_keras(self, value: np.ndarray) -> np.ndarray:
        """A spec-layout array in Keras layout (a view where possible)."""
        return np.transpose(np.asarray(value).reshape(self.transposed_shape), self.inverse)

    @functools.cached_property
    def spec_stored(self) -> bool:
        """Whether the variable keeps the spec's layout: a plain 2-D transpose (LoRA's A and B of a Dense,
        EinsumDense or Embedding), which the layer's math applies (:meth:`_Slot.get`) instead of every load
        and save -- loading is then a copy of the file's rows, not a transposing one."""
        return self.perm == (1, 0) and self.spec_shape == self.keras_shape[::-1]

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of the tensor the variable holds: :attr:`spec_shape` if :attr:`spec_stored`, else :attr:`keras_shape`."""
        return self.spec_shape if self.spec_stored else self.keras_shape

    def to_stored(self, value: np.ndarray) -> np.ndarray:
        """A spec-layout array as the variable holds it (a view where possible)."""
        return np.asarray(value) if self.spec_stored else self.to_keras(value)

    def from_stored(self, value: np.ndarray) -> np.ndarray:
        """What the variable holds, in the spec's layout (a new contiguous array)."""
        return np.ascontiguousarray(value) if self.spec_stored else self.to_spec(value)

    @property
    def transposed_shape(self) -> tuple[int, ...]:
        """The spec tensor reshaped so that one transpose (:attr:`inverse`) gives the Keras layout."""
        return tuple(self.keras_shape[i] for i in self.perm)

    @property
    def inverse(self) -> tuple[int, ...]:
        """The permutation from :attr:`transposed_shape` to the Keras layout."""
        return _inverse(self.perm)


@functools.lru_cache(maxsize=None)
def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(perm)), key=perm.__getitem__))


@dataclass
class _Slot:
    """One adapter on one module."""

    path: str
    method: str
    rank: int
    scaling: float
    use_dora: bool
    lora_bias: bool
    dropout: float
    feedforward: bool
    bank: AdapterBank | None = None
    refs: dict[str, Ref] = field(default_factory=dict)
    layouts: dict[str, Layout] = field(default_factory=dict)
    indices: tuple[int, ...] = ()  # TOKENS: the rows replaced
    source: AdapterLayer | None = None  # TOKENS: the layer holding the rows, when tied to its matrix
    saved_rows: dict[int, np.ndarray] = field(default_factory=dict)  # TOKENS merged: piece -> the base rows
    random_rows: bool = False  # TOKENS: a new adapter's rows start as normals, not the base rows (init_weights false)
    rotation: oft.Rotation | hra.Reflections | None = None  # OFT/BOFT: block layout and options; HRA: r, apply_GS
    shared: vera.Shared | None = None  # VERA: the adapter's shared projections; VBLORA: its vector bank
    road_settings: road.Road | None = None  # ROAD: variant and group size
    block: miss.Block | None = None  # MISS: mode, r, mini_r, dropout
    circulant: bool | None = None  # C3A: set (True) for a C3A adapter, the field AdapterLayer._alone reads
    config: AdapterConfig | None = None  # VBLORA: r, num_vectors, vector_length, topk (SPEC.md 17.4)
    granular: gralora.Granular | None = None  # GRALORA: r, gralora_k, hybrid_r, scaling, dropout (SPEC.md 17.5)
    round_merge: bool = False  # PEFT rounds the delta to the kernel's dtype before a merge adds it (SPEC.md 7.3)
    round_unmerge: bool = False  # ... before an unmerge subtracts it (else: the float32 delta, rounded once)

    def get(self, param: str) -> Any:
        """The parameter's current value (a slice of the bank's variable; differentiable)."""
        assert self.bank is not None
        value = self.bank.get(self.refs[param])
        return ops.transpose(value) if self.layouts[param].spec_stored else value


def _lora_layouts_of(kind: str, n_in: int, n_out: int, k: tuple[int, ...], r: int, use_dora: bool,
                     lora_bias: bool) -> Mapping[str, Layout]:
    if kind == "embedding":
        out = {"lora_embedding_A": Layout((n_in, r), (r, n_in), (1, 0)),
               "lora_embedding_B": Layout((r, n_out), (n_out, r), (1, 0))}
    elif kind == "conv":
        nd = len(k)
        perm = (nd + 1, nd) + tuple(range(nd))
        out = {"lora_A.weight": Layout((*k, n_in, r), (r, n_in, *k), perm),
               "lora_B.weight": Layout((*(1,) * nd, r, n_out), (n_out, r, *(1,) * nd), perm)}
    else:
        out = {"lora_A.weight": Layout((n_in, r), (r, n_in), (1, 0)),
               "lora_B.weight": Layout((r, n_out), (n_out, r), (1, 0))}
    if lora_bias:
        out["lora_B.bias"] = Layout((n_out,), (n_out,), (0,))
    if use_dora:
        shape = (1, n_out, *(1,) * len(k)) if kind == "conv" else (n_out,)
        out["lora_magnitude_vector"] = Layout((n_out,), shape, (0,))
    return MappingProxyType(out)


def _ia3_layout_of(kind: str, n: int, k: tuple[int, ...], feedforward: bool) -> Mapping[str, Layout]:
    if kind == "conv":
        shape: tuple[int, ...] = (1, n, *(1,) * len(k))
    else:
        shape = (1, n) if feedforward else (n, 1)
    return MappingProxyType({"ia3_l": Layout((n,), shape, (0,))})


def _lora_inits(kind: str, fan_in: int, r: int, init: Any) -> dict[str, tuple[Any, ...]]:
    """Initialiser descriptions (see :func:`~adapterspec_keras.bank.make_initializer`), PEFT's choices
    (``init``: the config's ``init_lora_weights``)."""
    uniform = ("uniform", 1.0 / math.sqrt(fan_in))
    inits: dict[str, tuple[Any, ...]]
    if kind == "embedding":  # PEFT: A zero, B normal
        inits = {"lora_embedding_A": ("normal", 1.0) if init is False else ("zeros",),
                 "lora_embedding_B": ("normal", 1.0)}
    else:
        a_init = ("normal", 1.0 / r) if init == "gaussian" else uniform
        b_init = ("uniform", 1.0 / math.sqrt(r)) if init is False else ("zeros",)
        inits = {"lora_A.weight": a_init, "lora_B.weight": b_init}
    inits["lora_B.bias"] = ("zeros",)
    inits["lora_magnitude_vector"] = ("ones",)
    return inits


@functools.lru_cache(maxsize=1024)
def _lora_plan(kind: str, n_in: int, n_out: int, k: tuple[int, ...], r: int, use_dora: bool, lora_bias: bool,
               init: Any, dtype: str, device: str | None, trainable: bool, initialize: bool,
               placement: Placement | None = None, frozen: frozenset[str] = frozenset(),
               ) -> tuple[Mapping[str, Layout], Mapping[str, GroupKey]]:
    """A LoRA slot's layouts and bank groups: made once per module shape and config, not per module
    (``placement``: the base kernel's split on a sharded model, :func:`~adapterspec_keras.sharding.placement_of`;
    ``frozen``: parameters PEFT does not train, MiCA's B, kept in untrainable groups)."""
    layouts = _lora_layouts_of(kind, n_in, n_out, k, r, use_dora, lora_bias)
    inits = _lora_inits(kind, n_in * math.prod(k), r, init) if initialize else None
    keys = _group_keys(layouts, inits, dtype, device, trainable, _shardings(placement, "LORA", layouts,
                                                                            conv=kind == "conv"))
    if trainable and frozen:
        keys = MappingProxyType({param: key._replace(trainable=False) if param in frozen else key
                                 for param, key in keys.items()})
    return layouts, keys


@functools.lru_cache(maxsize=1024)
def _ia3_plan(kind: str, n: int, k: tuple[int, ...], feedforward: bool, ones: bool, dtype: str, device: str | None,
              trainable: bool, initialize: bool,
              placement: Placement | None = None) -> tuple[Mapping[str, Layout], Mapping[str, GroupKey]]:
    """An IA3 slot's layout and bank group (``ones``: ``init_ia3_weights``)."""
    layouts = _ia3_layout_of(kind, n, k, feedforward)
    inits = {"ia3_l": ("ones",) if ones else ("normal", 1.0)} if initialize else None
    return layouts, _group_keys(layouts, inits, dtype, device, trainable,
                                _shardings(placement, "IA3", layouts, feedforward=feedforward))


def _lycoris_plan(config: AdapterConfig, path: str, n_in: int, n_out: int, kernel: tuple[int, ...], dtype: str,
                  device: str | None, trainable: bool,
                  initialize: bool) -> tuple[Mapping[str, Layout], Mapping[str, GroupKey]]:
    """A LoHa/LoKr slot's layouts (the file's, kept as they are) and bank groups."""
    params = lycoris.shapes(config, path, n_in, n_out, kernel)
    layouts = MappingProxyType({param: Layout(shape, shape, tuple(range(len(shape)))) for param, shape in params.items()})
    inits = lycoris.inits(config, params) if initialize else None
    return layouts, _group_keys(layouts, inits, dtype, device, trainable)


def _rotated_flat(site: ModuleSite, piece: Piece,
                  adapters: Sequence[tuple[oft.Rotation | hra.Reflections, Callable[[str], Any]]], flat: Any) -> Any:
    """The piece's kernel with the running OFT/BOFT (:func:`oft.rotated_flat`) or HRA (:func:`hra.reflected_flat`)
    adapters applied: they run alone, one method per layer."""
    if isinstance(adapters[0][0], hra.Reflections):
        return hra.reflected_flat(site, piece, [(s, g) for s, g in adapters if isinstance(s, hra.Reflections)], flat)
    return oft.rotated_flat(site, piece, [(s, g) for s, g in adapters if isinstance(s, oft.Rotation)], flat)


def _hra_plan(site: ModuleSite, config: AdapterConfig, dtype: str, device: str | None, trainable: bool,
              initialize: bool) -> tuple[Mapping[str, Layout], Mapping[str, GroupKey]]:
    """An HRA slot's layout (the file's ``[F, r]``, kept as it is) and bank group (SPEC.md 17.3)."""
    params = hra.shapes(site, config)
    layouts = MappingProxyType({param: Layout(shape, shape, tuple(range(len(shape)))) for param, shape in params.items()})
    inits = hra.inits(config, params) if initialize else None
    return layouts, _group_keys(layouts, inits, dtype, device, trainable)


def _oft_plan(site: ModuleSite, config: AdapterConfig, path: str, dtype: str, device: str | None, trainable: bool,
              initialize: bool) -> tuple[Mapping[str, Layout], Mapping[str, GroupKey]]:
    """An OFT/BOFT slot's layouts (the file's, kept as they are) and bank groups."""
    params = oft.shapes(site, config, path)
    layouts = MappingProxyType({param: Layout(shape, shape, tuple(range(len(shape)))) for param, shape in params.items()})
    inits = oft.inits(config, params) if initialize else None
    return layouts, _group_keys(layouts, inits, dtype, device, trainable)


def _miss_plan(site: ModuleSite, config: AdapterConfig, path: str, dtype: str, device: str | None, trainable: bool,
               initialize: bool) -> tuple[Mapping[str, Layout], Mapping[str, GroupKey]]:
    """A MiSS slot's layout (the file's, kept as it is) and bank group."""
    params = miss.shapes(site, config, path)
    layouts = MappingProxyType({param: Layout(shape, shape, tuple(range(len(shape)))) for param, shape in params.items()})
    return layouts, _group_keys(layouts, miss.inits(config, params) if initialize else None, dtype, device, trainable)


def _adalora_plan(config: AdapterConfig, path: str, n_in: int, n_out: int, kernel: tuple[int, ...], dtype: str,
                  device: str | None, trainable: bool, initialize: bool) -> tuple[Mapping[str, Layout], Mapping[str, GroupKey]]:
    """An AdaLoRA slot's layouts (``lora_A``/``lora_B`` kept in the file's layout and read transposed, as LoRA's;
    ``lora_E`` as it is) and bank groups."""
    params = adalora.shapes(config, path, n_in, n_out, kernel)
    k, cols = params["lora_A"]
    layouts = MappingProxyType({"lora_A": Layout((cols, k), (k, cols), (1, 0)),
                                "lora_B": Layout((k, n_out), (n_out, k), (1, 0)),
                                "lora_E": Layout((k, 1), (k, 1), (0, 1))})
    inits = adalora.inits(config, params) if initialize else None
    return layouts, _group_keys(layouts, inits, dtype, device, trainable)


def _vera_plan(config: AdapterConfig, n_in: int, n_out: int, dtype: str, device: str | None, trainable: bool,
               initialize: bool) -> tuple[Mapping[str, Layout], Mapping[str, GroupKey]]:
    """A VeRA slot's layouts (the file's) and bank groups (the shared projections: :func:`vera.reserve`)."""
    params = vera.shapes(config, n_in, n_out)
    layouts = MappingProxyType({param: Layout(shape, shape, (0,)) for param, shape in params.items()})
    return layouts, _group_keys(layouts, vera.inits(config) if initialize else None, dtype, device, trainable)


def _shardings(placement: Placement | None, method: str, layouts: Mapping[str, Layout], *, conv: bool = False,
               feedforward: bool = False) -> Mapping[str, Any] | None:
    """Each parameter's ``NamedSharding`` on a sharded model (:func:`~adapterspec_keras.sharding.param_sharding`),
    or ``None`` when none has one (one device, a replicated base: the variables are made as always)."""
    if placement is None:
        return None
    out = {param: param_sharding(placement, method, param, layout.stored_shape, conv=conv, feedforward=feedforward)
           for param, layout in layouts.items()}
    return out if any(value is not None for value in out.values()) else None


def _group_keys(layouts: Mapping[str, Layout], inits: Mapping[str, tuple[Any, ...]] | None, dtype: str,
                device: str | None, trainable: bool,
                shardings: Mapping[str, Any] | None = None) -> Mapping[str, GroupKey]:
    # without inits (load_adapter fills the variables right after): zeros, no random init
    if shardings is not None:
        return MappingProxyType({param: GroupKey(param, layout.stored_shape, dtype, device,
                                                 inits[param] if inits is not None else ("zeros",), trainable,
                                                 shardings.get(param))
                                 for param, layout in layouts.items()})
    return MappingProxyType({param: GroupKey(param, layout.stored_shape, dtype, device,
                                             inits[param] if inits is not None else ("zeros",), trainable)
                             for param, layout in layouts.items()})


def _training() -> bool:
    from keras.src.backend.common.global_state import get_global_attribute

    ctx = get_global_attribute("current_call_ctx")
    return bool(getattr(ctx, "training", False))


class AdapterLayer:
    """The adapters of one spec module; the wrapped Keras layers call it from their patched ``call``.

    :param site: the module's :class:`~adapterspec_keras.sites.ModuleSite` (its Keras pieces).
    """

    def __init__(self, site: ModuleSite) -> None:
        self.site = site
        self._slots: dict[str, _Slot] = {}
        self._active: list[str] = []
        self._merged: list[str] = []
        self._dora_norms: dict[tuple[str, int], Any] = {}
        self._base_backups: dict[str, tuple[Any, np.ndarray]] = {}
        self._base_saved: set[str] = set()
        self._w0: list[Any] | None = None

    # -- adapters ----------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: AdapterConfig, path: str, options: LoadOptions,
                    bank: AdapterBank, *, check: bool = True, target: tuple[str | None, str] | None = None,
                    shared: vera.Shared | None = None) -> None:
        """Reserve adapter ``name``'s parameters for module ``path`` in ``bank``, initialised as ``config`` says
        once the bank is materialized; inactive.

        LoRA: ``lora_A`` random (PEFT's kaiming-uniform bound ``1/sqrt(fan_in)``), ``lora_B`` zero (so the
        output is unchanged), DoRA magnitude ``||W||`` per output row (:meth:`finish_init`); IA3: ones.
        With ``options.initialize`` false (:func:`adapterspec.load_adapter`), everything starts at zero.

        :param check: refuse a module the method cannot adapt (:func:`check_supported`); ``False`` when the
            caller checked already.
        :param target: the variables' (device, dtype), when the caller knows it (:func:`~adapterspec_keras.devices.target_of`).
        :param shared: VeRA: the adapter's shared projections (:func:`~adapterspec_keras.vera.reserve`).
        """
        if check:
            check_supported(self.site, path, config)
        site = self.site
        device, dtype = target if target is not None else target_of(site.pieces[0].kernel_variable, options)
        if options.dtype is None and dtype in _UPCAST:
            dtype = "float32"  # SPEC.md 7.5: PEFT keeps adapters on a half-precision base in float32
        initialize = bool(getattr(options, "initialize", True))
        trainable = bool(options.trainable)
        placement = placement_of(site) if device is None else None  # a device asked for: the variables go there
        if config.peft_type == "LORA":
            r = config.rank_for(path)
            slot = _Slot(path, "LORA", r, config.scaling_for(path), bool(config.get("use_dora")),
                         bool(config.get("lora_bias")), float(config.get("lora_dropout") or 0.0), False)
            slot.round_merge = rounds_delta_first(config, embedding=site.kind == "embedding", unmerge=False)
            slot.round_unmerge = rounds_delta_first(config, embedding=site.kind == "embedding", unmerge=True)
            init = config.get("init_lora_weights", True)
            if site.kind == "linear":
                r = factor_rank(config, r, site.in_features, site.out_features)
            layouts, keys = _lora_plan(site.kind, site.in_features, site.out_features, site.conv_spatial, r,
                                       slot.use_dora, slot.lora_bias,
                                       False if init is False else "gaussian" if init == "gaussian" else True,
                                       dtype, device, trainable, initialize, placement, frozen_params(config))
        elif config.peft_type in lycoris.METHODS:
            lycoris.check(site, path, config, trainable=trainable)
            slot = _Slot(path, config.peft_type, config.rank_for(path), config.scaling_for(path), False, False, 0.0,
                         False)
            layouts, keys = _lycoris_plan(config, path, site.in_features, site.out_features, site.conv_spatial,
                                          dtype, device, trainable, initialize)
        elif config.peft_type in hra.METHODS:  # SPEC.md 17.3: runs through the rotation paths (a kernel product)
            hra.check(site, path, config, initialize=initialize)
            slot = _Slot(path, "HRA", 0, 1.0, False, False, 0.0, False, rotation=hra.settings(config))
            layouts, keys = _hra_plan(site, config, dtype, device, trainable, initialize)
        elif config.peft_type in oft.METHODS:
            oft.check(site, path, config, trainable=trainable)
            slot = _Slot(path, config.peft_type, 0, 1.0, False, False, 0.0, False,
                         rotation=oft.settings(site, config, path))
            layouts, keys = _oft_plan(site, config, path, dtype, device, trainable, initialize)
        elif config.peft_type in adalora.METHODS:
            adalora.check(site, path, config, trainable=trainable)
            scale, ranknum = adalora.factors(config, path)
            slot = _Slot(path, "ADALORA", ranknum, scale, False, False, 0.0, False)
            layouts, keys = _adalora_plan(config, path, site.in_features, site.out_features, site.conv_spatial,
                                          dtype, device, trainable, initialize)
        elif config.peft_type in vera.METHODS:
            vera.check(site, path, config)
            if shared is None:
                raise UnsupportedError("a VeRA adapter needs its shared projections", key=path,
                                       hint="inject VeRA adapters with adapterspec.inject_adapter / load_adapter")
            slot = _Slot(path, "VERA", 0, 1.0, False, False, float(config.get("vera_dropout") or 0.0), False,
                         shared=shared)
            layouts, keys = _vera_plan(config, site.in_features, site.out_features, dtype, device, trainable,
                                       initialize)
        elif config.peft_type in road.METHODS:
            road.check(site, path, config)
            slot = _Slot(path, "ROAD", 0, 1.0, False, False, 0.0, False, road_settings=road.settings(config))
            params = road.shapes(site, config)
            layouts = MappingProxyType({p: Layout(shape, shape, (0,)) for p, shape in params.items()})
            keys = _group_keys(layouts, road.inits(config) if initialize else None, dtype, device, trainable)
        elif config.peft_type in miss.METHODS:
            miss.check(site, path, config)
            block = miss.settings(config)
            other = next((s.block for s in self._slots.values() if s.block is not None and s.block.mode != block.mode),
                         None)
            if other is not None:  # as the torch backend's AdapterLayer._miss_block
                raise UnsupportedError(f"MiSS init_weights mode {block.mode!r} on a layer that holds a MiSS adapter of "
                                       f"mode {other.mode!r}: PEFT 0.21.2 runs every MiSS adapter of a layer in the "
                                       "mode of the first one, so its result is not defined", key=path,
                                       pointer="/init_weights",
                                       hint="load MiSS adapters of one init_weights mode into one model")
            slot = _Slot(path, "MISS", block.r, 1.0, False, False, block.dropout, False, block=block)
            layouts, keys = _miss_plan(site, config, path, dtype, device, trainable, initialize)
        elif config.peft_type in c3a.METHODS:
            c3a.check(site, path, config)
            slot = _Slot(path, "C3A", 0, 1.0, False, False, 0.0, False, circulant=True)
            params = c3a.shapes(site, config, path)
            layouts = MappingProxyType({p: Layout(shape, shape, (0, 1, 2)) for p, shape in params.items()})
            keys = _group_keys(layouts, c3a.inits(config, params, site.in_features, site.out_features)
                               if initialize else None, dtype, device, trainable)
        elif config.peft_type in vblora.METHODS:
            vblora.check(site, path, config)
            if shared is None:
                raise UnsupportedError("a VB-LoRA adapter needs its shared vector bank", key=path,
                                       hint="inject VB-LoRA adapters with adapterspec.inject_adapter / load_adapter")
            slot = _Slot(path, "VBLORA", 0, 1.0, False, False, float(config.get("vblora_dropout") or 0.0), False,
                         shared=shared, config=config)
            params = vblora.shapes(config, site.in_features, site.out_features)
            layouts = MappingProxyType({param: Layout(shape, shape, (0, 1, 2)) for param, shape in params.items()})
            keys = dict(_group_keys(layouts, vblora.inits(config) if initialize else None, dtype, device, trainable))
            for param, kind in vblora.dtypes(config).items():  # the top-k form's integer indices, frozen
                keys[param] = keys[param]._replace(dtype=kind, trainable=False)
        elif config.peft_type in gralora.METHODS:
            gralora.check(site, path, config)
            granular = gralora.settings(config)
            slot = _Slot(path, "GRALORA", granular.r, granular.scaling, False, False, granular.dropout, False,
                         granular=granular)
            params = gralora.shapes(site, config, path)
            layouts = MappingProxyType({p: Layout(shape, shape, tuple(range(len(shape)))) for p, shape in params.items()})
            keys = _group_keys(layouts, gralora.inits(config, params) if initialize else None, dtype, device, trainable)
        elif config.peft_type in delora.METHODS:  # SPEC.md 17.6: runs through the VeRA paths (views)
            delora.check(site, path, config)
            slot = _Slot(path, "DELORA", delora.rank(config, path), 1.0, False, False,
                         max(float(config.get("module_dropout") or 0.0), 0.0), False)  # PEFT: p <= 0 no dropout
            slot.round_merge = True  # PEFT rounds the delta to the weight's dtype before a merge adds it, not an unmerge
            params = delora.shapes(config, path, site.in_features, site.out_features)
            layouts = MappingProxyType({param: Layout(shape[::-1], shape, (1, 0)) if len(shape) == 2
                                        else Layout(shape, shape, (0,)) for param, shape in params.items()})
            keys = dict(_group_keys(layouts, delora.inits(config, path, site.in_features) if initialize else None,
                                    dtype, device, trainable))
            for param in delora.FROZEN:  # w_norm: a PEFT buffer, never trained
                keys[param] = keys[param]._replace(trainable=False)
        elif config.peft_type in beft.METHODS:  # SPEC.md 17.8: a bias added to the output, merged into the base bias
            beft.check(site, path, config)
            slot = _Slot(path, "BEFT", 0, 1.0, False, False, 0.0, False)
            params = beft.shapes(config, path, site.out_features)
            layouts = MappingProxyType({p: Layout(shape, shape, (0, 1)) for p, shape in params.items()})
            keys = _group_keys(layouts, beft.inits(config) if initialize else None, dtype, device, trainable)
        else:
            feedforward = config.is_feedforward(path)
            slot = _Slot(path, "IA3", 0, 1.0, False, False, 0.0, feedforward)
            layouts, keys = _ia3_plan(site.kind, site.in_features if feedforward else site.out_features,
                                      site.conv_spatial, feedforward, config.get("init_ia3_weights", True) is not False,
                                      dtype, device, trainable, initialize, placement)
        slot.layouts = layouts  # type: ignore[assignment]  # shared between modules: read-only
        slot.bank = bank
        if slot.dropout > 0:
            bank.needs_seed()
        slot.refs = bank.reserve_keys(keys)
        self._slots[name] = slot

    def add_tokens(self, name: str, indices: list[int], options: LoadOptions, bank: AdapterBank, *,
                   source: AdapterLayer | None = None, param: str = TRAINABLE_TOKENS_PARAM,
                   saved_when_tied: bool = False, random_rows: bool = False) -> None:
        """Trainable token rows for adapter ``name`` (LoRA's ``trainable_token_indices``): while it is active, rows
        ``indices`` of the module's matrix are the adapter's ``[len(indices), dim]`` tensor (PEFT's
        ``TrainableTokensLayer``; an embedding, or an output layer, see :mod:`adapterspec_keras.tokens`).

        The rows start as a copy of the current ones (PEFT's init, :meth:`finish_init`) unless
        ``options.initialize`` is false; ``random_rows`` (the ``TRAINABLE_TOKENS`` method's ``init_weights`` false or
        null): standard normals, PEFT's distribution from Keras' generator (the torch backend's ``add_tokens``).

        :param source: the layer holding the rows, for an output layer tied to its embedding (no tensor of its own).
        :param param: the tensor's name under the module (the ``TRAINABLE_TOKENS`` method stores
            ``trainable_tokens_delta``, SPEC.md 15.2).
        :param saved_when_tied: a tied layer also lists the source's tensor under its own name -- the same bank row,
            so it is saved twice and a file whose two copies differ is refused at load (the ``TRAINABLE_TOKENS``
            method, as PEFT saves it).
        """
        site = self.site
        tokens.check_site(site, site.path, indices, param)
        slot = _Slot(site.path, tokens.TOKENS, 0, 1.0, False, False, 0.0, False, bank=bank,
                     indices=tuple(int(i) for i in indices), source=source)
        layouts: dict[str, Layout] = {}
        if source is None:
            device, dtype = target_of(site.pieces[0].kernel_variable, options)
            if options.dtype is None and dtype in _UPCAST:
                dtype = "float32"
            shape = tokens.row_shape(site, len(indices))
            layouts[param] = Layout(shape, shape, (0, 1))
            slot.refs = bank.reserve_keys(_group_keys(layouts, {param: ("normal", 1.0) if random_rows else ("zeros",)},
                                                      dtype, device, bool(options.trainable)))
            slot.random_rows = random_rows
        elif saved_when_tied:
            owner = source._slots[name]
            layouts, slot.refs = dict(owner.layouts), dict(owner.refs)
        slot.layouts = layouts
        self._slots[name] = slot

    def _token_rows(self, slot: _Slot, name: str) -> Any:
        owner = slot.source._slots[name] if slot.source is not None else slot
        return owner.get(next(iter(owner.refs)))

    def finish_init(self, name: str) -> None:
        """After the bank is materialized: DoRA's magnitude starts as ``||W||`` per output (B is zero); token rows
        as the base rows."""
        slot = self._slots[name]
        if slot.method == tokens.TOKENS and slot.source is None and not slot.random_rows:
            assert slot.bank is not None
            flat = np.asarray(ops.convert_to_numpy(_ops.flat_kernel(self.site.pieces[0])))
            base = flat[list(slot.indices)] if self.site.kind == "embedding" else flat[:, list(slot.indices)].T
            slot.bank.assign(next(iter(slot.refs.values())), base)
        if slot.use_dora:
            assert slot.bank is not None
            slot.bank.assign(slot.refs["lora_magnitude_vector"], self._weight_norm(slot, scaling=slot.scaling))
        if slot.method in delora.METHODS:  # PEFT: the base weight's column norms when the adapter is made
            assert slot.bank is not None
            slot.bank.assign(slot.refs["delora_w_norm"], delora.w_norm(self.site))
        if slot.method in beft.METHODS:  # PEFT casts the draw to a floating base weight's dtype (SPEC.md 17.8)
            assert slot.bank is not None
            kernel = self.site.pieces[0].kernel_variable.dtype
            if _ops.dtype_name(self.site.pieces[0].kernel_variable) in _UPCAST:
                drawn = slot.get(beft.PARAM)
                slot.bank.assign(slot.refs[beft.PARAM],
                                 ops.convert_to_numpy(ops.cast(ops.cast(drawn, kernel), "float32")))

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` (its variables go with its bank); a merged one's delta stays in the base weights."""
        self._slots.pop(name)
        self._active = [n for n in self._active if n != name]
        self._merged = [n for n in self._merged if n != name]
        self._base_saved.discard(name)
        backup = self._base_backups.pop(name, None)
        if backup is not None:
            backup[0].assign(backup[1])
        for key in [k for k in self._dora_norms if k[0] == name]:
            del self._dora_norms[key]

    def _base_shape(self) -> tuple[int, ...]:
        site = self.site
        return (site.in_features, site.out_features) if site.kind == "embedding" else (site.out_features, site.in_features)

    def check_base_weight(self, shape: tuple[int, ...], key: str) -> None:
        """Refuse a full base weight (``<module>.base_layer.weight``) that does not fit this module.

        :raises ShapeMismatchError: wrong shape.
        :raises UnsupportedError: the module is split over several Keras layers or index-mapped.
        """
        from adapterspec.errors import ShapeMismatchError

        site = self.site
        piece = site.pieces[0]
        simple = len(site.pieces) == 1 and piece.out_slice is None and piece.n_in == site.in_features and \
            piece.n_out == site.out_features and \
            np.array_equal(piece.in_index.ravel(), np.arange(piece.n_in)) and \
            np.array_equal(piece.out_index.ravel(), np.arange(piece.n_out)) and site.kind != "conv"
        if not simple:
            raise UnsupportedError("a full base weight can only replace a module that is one plain Keras layer",
                                   key=key, hint="drop the tensor and load a base model with those weights")
        if tuple(shape) != self._base_shape():
            raise ShapeMismatchError(f"shape {list(shape)} does not fit {piece.layer.path!r}: expected "
                                     f"{list(self._base_shape())}", key=key,
                                     hint="the adapter was trained for another base model (or vocabulary size)")

    def replace_base_weight(self, name: str, value: np.ndarray) -> None:
        """Make the module's base weight ``value`` (PEFT layout) unless it is that already; :meth:`remove_adapter`
        restores the previous one (PEFT saves ``embed_tokens.base_layer.weight`` with a LoRA on embeddings)."""
        self._base_saved.add(name)
        piece = self.site.pieces[0]
        variable = piece.kernel_variable
        flat = np.asarray(value) if self.site.kind == "embedding" else np.asarray(value).T
        new = ops.convert_to_numpy(_ops.kernel_from_flat(piece, ops.convert_to_tensor(flat)))
        old = ops.convert_to_numpy(variable)
        if old.shape == new.shape and np.array_equal(old, new.astype(old.dtype)):
            return
        self._base_backups.setdefault(name, (variable, old))
        variable.assign(new.astype(old.dtype))

    def base_weight(self) -> np.ndarray:
        """The module's base weight in the file's layout (``[out, in]``; embeddings ``[num, dim]``)."""
        piece = self.site.pieces[0]
        flat = ops.convert_to_numpy(_ops.flat_kernel(piece))
        return np.ascontiguousarray(flat if self.site.kind == "embedding" else flat.T)

    def saves_base_weight(self, name: str) -> bool:
        """Whether adapter ``name`` came with the module's full base weight (and so saves it again)."""
        return name in self._base_saved

    def adapter_names(self) -> list[str]:
        """The adapters this layer holds, in insertion order."""
        return list(self._slots)

    def path_of(self, name: str) -> str:
        """The spec module path adapter ``name`` was given for this module (its keys use it)."""
        return self._slots[name].path

    def rename(self, name: str, path: str) -> None:
        """Give adapter ``name`` another spec path for this module (a file names it ``h.0.attn.c_attn``...)."""
        self._slots[name].path = path

    def parameters(self, name: str) -> tuple[str, Mapping[str, Layout], Mapping[str, Ref]]:
        """Adapter ``name``'s module path, and its parameters' layouts and bank rows (not copies: read only)."""
        slot = self._slots[name]
        return slot.path, slot.layouts, slot.refs

    def adapter_params(self, name: str) -> dict[str, Any]:
        """Spec parameter name (``"lora_A.weight"``, ``"ia3_l"``...) -> its current value (Keras layout)."""
        slot = self._slots[name]
        return {param: slot.get(param) for param in slot.refs}

    def shared_of(self, name: str) -> vera.Shared | None:
        """VeRA: adapter ``name``'s shared projections (``None`` for other methods)."""
        return self._slots[name].shared

    def refs(self, name: str) -> dict[str, Ref]:
        """Spec parameter name -> where it lives in the adapter's bank."""
        return dict(self._slots[name].refs)

    def bank(self, name: str) -> AdapterBank:
        """The bank holding adapter ``name``'s variables."""
        bank = self._slots[name].bank
        assert bank is not None
        return bank

    def layouts(self, name: str) -> dict[str, Layout]:
        """Spec parameter name -> its :class:`Layout`, for adapter ``name``."""
        return dict(self._slots[name].layouts)

    def running_of(self, names: Sequence[str]) -> list[Running]:
        """The adapters of ``names`` this layer holds, as the SDK's :func:`~adapterspec._mix.mix_refusal` judges
        whether they may run together."""
        return [Running(n, TOKEN_ROWS if slot.method == tokens.TOKENS else slot.method, slot.use_dora, slot.indices)
                for n in names if (slot := self._slots.get(n)) is not None]

    def set_active(self, names: list[str]) -> None:
        """Run exactly these adapters (those this layer holds), in this order."""
        self._active = [n for n in names if n in self._slots]

    @property
    def merged(self) -> list[str]:
        """The adapters whose deltas are in the base weights now, in merge order."""
        return list(self._merged)

    def in_variables(self) -> list[str]:
        """The adapters whose values are in the base variables now: merged ones, and those whose file gave the
        module's base weight (:meth:`replace_base_weight`); a load of the variables would overwrite them."""
        return [*self._merged, *(n for n in self._slots if n in self._base_saved and n not in self._merged)]

    def runs(self, piece: Piece | None = None) -> bool:
        """Whether any adapter takes part in the forward pass (active and not merged)."""
        return any(n not in self._merged for n in self._active)

    # -- forward -----------------------------------------------------------------------------------
    def _running(self) -> list[tuple[str, _Slot]]:
        return [(n, self._slots[n]) for n in self._active if n not in self._merged]

    def scale_input(self, piece: Piece, x: Any) -> Any:
        """The input the base layer sees: ``x`` times the product of active IA3 feed-forward vectors."""
        for _, slot in self._running():
            if slot.method == "IA3" and slot.feedforward:
                x = _ops.scale_in(piece, x, _ops.gather_in(piece, slot.get("ia3_l"), self.site.in_features))
        return x

    def apply(self, piece: Piece, x: Any, result: Any) -> Any:
        """``result`` (the base layer's output before activation) plus/times each running adapter's part, PEFT's order.

        A piece that is a slice of a fused kernel (:attr:`Piece.out_slice`) changes only its columns of ``result``:
        the other modules' adapters on that layer change theirs."""
        if piece.out_slice is not None:
            start, stop = piece.out_slice
            part = self._apply(piece, x, result[..., start:stop])
            return ops.concatenate([result[..., :start], part, result[..., stop:]], axis=-1)
        return self._apply(piece, x, result)

    def _apply(self, piece: Piece, x: Any, result: Any) -> Any:
        rotations = self._rotations()
        if rotations:
            return self._apply_rotations(piece, rotations, x, result)
        blocks = self._miss_slots()
        if blocks:
            return self._apply_miss(piece, blocks, x, result)
        kernels = self._alone("circulant", "C3A")
        if kernels:  # SPEC.md 17.7: other methods and a second C3A adapter are refused
            return self._apply_c3a(piece, kernels, x, result)
        granular = self._alone("granular", "GraLoRA")  # SPEC.md 17.5: GraLoRA runs beside no other method
        if granular:
            return self._apply_gralora(piece, granular, x, result)
        self._alone("road_settings", "RoAd")  # RoAd runs alone: refused beside another method
        running = self._running()
        deloras = [slot for _, slot in running if slot.method in delora.METHODS]
        befts = [slot for _, slot in running if slot.method in beft.METHODS]
        for name, slot in running:
            if slot.method in beft.METHODS:
                if slot is befts[0]:  # SPEC.md 17.8: PEFT sums a layer's BEFT biases, then adds them once
                    result = beft.output(piece, [s.get(beft.PARAM) for s in befts], self.site.out_features, result)
                continue
            if slot.method == tokens.TOKENS:
                result = tokens.apply_rows(piece, x, result, self._token_rows(slot, name), slot.indices)
                continue
            if slot.method == "IA3":
                if not slot.feedforward:
                    result = _ops.scale_out(piece, result, _ops.gather_out(piece, slot.get("ia3_l"),
                                                                              self.site.out_features))
                continue
            if slot.method in lycoris.METHODS:
                result = self._apply_lycoris(piece, slot, x, result)
                continue
            if slot.method in adalora.METHODS:
                result = self._apply_adalora(piece, slot, x, result)
                continue
            if slot.method in delora.METHODS:
                if slot is deloras[0]:  # PEFT sums a layer's DeLoRA terms in the output's dtype, then adds them once
                    result = self._apply_delora(piece, deloras, x, result)
                continue
            if slot.method in vera.METHODS or slot.method in vblora.METHODS:
                result = self._apply_vera(piece, slot, x, result)
                continue
            if slot.road_settings is not None:  # RoAd rotates the output
                result = road.forward(self.site, piece, [(slot.road_settings, slot.get)], result)
                continue
            result = self._apply_lora(piece, slot, x, result)
        return result

    def _rotations(self) -> list[_Slot]:
        """The running OFT/BOFT/HRA adapters, in order.

        :raises UnsupportedError: they run together with another method's adapter on this module (as the torch
            backend: PEFT holds one method per layer).
        """
        running = [slot for _, slot in self._running()]
        found = [slot for slot in running if slot.rotation is not None]
        if not found:
            return []
        methods = {slot.method for slot in found}
        if len(found) != len(running) or len(methods) > 1:
            others = sorted({slot.method for slot in running if slot.rotation is None})
            raise UnsupportedError(f"{', '.join(sorted(methods))} adapters cannot run together with "
                                   f"{others or 'each other'} on one layer (PEFT holds one method per layer)",
                                   key=self.site.path,
                                   hint="activate the rotation adapters without other methods' adapters")
        return found

    def _alone(self, field: str, label: str) -> list[_Slot]:
        """The running adapters whose slot sets ``field`` (a method PEFT runs on a layer by itself: MiSS, RoAd), in
        order (the torch backend's ``AdapterLayer._alone``).

        :raises UnsupportedError: they run together with another method's adapter on this module (PEFT holds one
            method per layer; mixes are refused when activated, :func:`adapterspec._mix.mix_refusal`).
        """
        running = [slot for _, slot in self._running()]
        found = [slot for slot in running if getattr(slot, field) is not None]
        if found and len(found) != len(running):
            others = sorted({slot.method for slot in running if getattr(slot, field) is None})
            raise UnsupportedError(f"{label} adapters cannot run together with {others} on one layer (PEFT holds one "
                                   "method per layer)", key=self.site.path,
                                   hint=f"activate the {label} adapters without other methods' adapters")
        return found

    def _miss_slots(self) -> list[_Slot]:
        """The running MiSS adapters, in order (:meth:`_alone`)."""
        return self._alone("block", "MiSS")

    def _apply_miss(self, piece: Piece, slots: list[_Slot], x: Any, result: Any) -> Any:
        """MiSS unmerged: ``result + op(x, D)`` per block/mini adapter (``D`` its delta, :func:`miss.block_flat`;
        ``miss_dropout`` on ``x`` while training), or bat's ``result + op(x, K' - K)``, ``K'`` the kernel each adapter
        transformed in turn (:func:`miss.bat_flat`); a float32 adapter on a half-precision layer in float32."""
        out_dtype = result.dtype
        dtype = "float32" if _ops.dtype_name(result) in _UPCAST and \
            next(iter(slots[0].refs.values())).key.dtype == "float32" else out_dtype
        x = ops.cast(x, dtype)
        total = ops.cast(result, dtype)
        if slots[0].block is not None and slots[0].block.mode == miss.BAT:
            flat = ops.cast(_ops.flat_kernel(piece), dtype)
            kernel = flat
            for slot in slots:
                kernel = kernel + miss.bat_flat(self.site, piece, slot.get, kernel)
            part = self._base_linear(piece, x, dtype, kernel=_ops.kernel_from_flat(piece, kernel - flat))
            return ops.cast(total + part, out_dtype)
        for slot in slots:
            assert slot.block is not None
            dropped = x
            if slot.dropout > 0 and _training():
                assert slot.bank is not None
                dropped = keras.random.dropout(x, slot.dropout, seed=slot.bank.seed)
            delta = miss.block_flat(self.site, piece, slot.block, slot.get, dtype)
            total = total + self._base_linear(piece, dropped, dtype, kernel=_ops.kernel_from_flat(piece, delta))
        return ops.cast(total, out_dtype)

    def _apply_c3a(self, piece: Piece, slots: list[_Slot], x: Any, result: Any) -> Any:
        """C3A unmerged (the torch backend's ``c3a.forward``): ``result + op(x, D / in)`` in float32 (PEFT's float32
        term), cast to the output's dtype, the input's gradient PEFT's backward's (:func:`c3a.backward_flat`); one
        adapter (PEFT's forward chains a second one: refused)."""
        if len(slots) != 1:
            raise UnsupportedError("two C3A adapters cannot run together on one layer (PEFT 0.21.2's forward chains "
                                   "them)", key=self.site.path, hint="activate one C3A adapter per layer")
        x32 = ops.cast(x, "float32")
        term = c3a.term_flat(self.site, piece, slots[0].get)
        part = self._base_linear(piece, ops.stop_gradient(x32), "float32", kernel=_ops.kernel_from_flat(piece, term))
        back = self._base_linear(piece, x32, "float32",  # PEFT's input gradient; t - sg(t) adds an exact zero
                                 kernel=_ops.kernel_from_flat(piece, c3a.backward_flat(self.site, piece, slots[0].get)))
        return result + ops.cast(part + (back - ops.stop_gradient(back)), result.dtype)

    def _apply_gralora(self, piece: Piece, slots: list[_Slot], x: Any, result: Any) -> Any:
        """GraLoRA unmerged: each adapter's terms added in the active order (:func:`gralora.output`, PEFT's dtypes;
        ``gralora_dropout`` while training, one draw per term)."""
        training = _training()
        for slot in slots:
            assert slot.granular is not None and slot.bank is not None
            dropout = None
            if slot.dropout > 0 and training:
                seed = slot.bank.seed

                def dropout(value: Any, rate: float = slot.dropout, seed: Any = seed) -> Any:
                    return keras.random.dropout(value, rate, seed=seed)
            result = gralora.output(self.site, piece, slot.granular, slot.get, x, result, dropout=dropout)
        return result

    def _apply_rotations(self, piece: Piece, slots: list[_Slot], x: Any, result: Any) -> Any:
        """OFT/BOFT unmerged: the layer's contraction with its rotated (BOFT: and scaled) kernel, computed as
        ``result + op(x, K' - K)`` so that the layer's bias and activation stay its own; a float32 adapter on a
        half-precision layer in float32."""
        out_dtype = result.dtype
        dtype = "float32" if _ops.dtype_name(result) in _UPCAST and \
            next(iter(slots[0].refs.values())).key.dtype == "float32" else out_dtype
        flat = ops.cast(_ops.flat_kernel(piece), dtype)
        rotated = _rotated_flat(self.site, piece, [(s.rotation, s.get) for s in slots if s.rotation], flat)
        part = self._base_linear(piece, ops.cast(x, dtype), dtype, kernel=_ops.kernel_from_flat(piece, rotated - flat))
        return ops.cast(ops.cast(result, dtype) + part, out_dtype)

    def _apply_lycoris(self, piece: Piece, slot: _Slot, x: Any, result: Any) -> Any:
        """LoHa/LoKr unmerged: ``result + op(x, ΔW)``, the layer's own contraction with the piece's share of ΔW
        (PEFT's ``F.linear(x, delta_weight)``); a float32 adapter on a half-precision layer in float32."""
        out_dtype = result.dtype
        dtype = "float32" if _ops.dtype_name(result) in _UPCAST and \
            next(iter(slot.refs.values())).key.dtype == "float32" else out_dtype
        flat = self._lycoris_flat(piece, slot, dtype)
        part = self._base_linear(piece, ops.cast(x, dtype), dtype, kernel=_ops.kernel_from_flat(piece, flat))
        return ops.cast(ops.cast(result, dtype) + part, out_dtype)

    def _adalora_views(self, piece: Piece, slot: _Slot, dtype: Any) -> tuple[Any, Any]:
        """The piece's rows of ``(A * E).T`` (``[n_in, k]``) and columns of ``B.T`` (``[k, n_out]``), in ``dtype``."""
        a, b = adalora.views(slot.get, dtype)
        return _ops.gather_in(piece, a, self.site.in_features), _ops.gather_out(piece, b, self.site.out_features)

    def _apply_adalora(self, piece: Piece, slot: _Slot, x: Any, result: Any) -> Any:
        """AdaLoRA unmerged: ``result + x @ (A * E).T @ B.T * scaling / (ranknum + 1e-5)`` (PEFT's ``SVDLinear``);
        a float32 adapter on a half-precision layer in float32. A module whose ranks were all pruned adds nothing."""
        if slot.rank == 0:
            return result
        out_dtype = result.dtype
        dtype = "float32" if _ops.dtype_name(result) in _UPCAST and \
            next(iter(slot.refs.values())).key.dtype == "float32" else out_dtype
        if self.site.kind == "conv":  # SVDConv2d: a convolution with the reshaped, scaled delta
            kernel = _ops.kernel_from_flat(piece, self._adalora_conv_flat(slot, dtype))
            part = self._base_linear(piece, ops.cast(x, dtype), dtype, kernel=kernel)
            return ops.cast(ops.cast(result, dtype) + part, out_dtype)
        a, b = self._adalora_views(piece, slot, dtype)
        part = adalora.divide(_ops.expand_out(piece, _ops.contract_in(piece, ops.cast(x, dtype), a), b), slot.scaling,
                              slot.rank)
        return ops.cast(ops.cast(result, dtype) + part, out_dtype)

    def _adalora_conv_flat(self, slot: _Slot, dtype: Any) -> Any:
        """A 2-D convolution's AdaLoRA delta ``[out, in, kh, kw]`` as its Keras kernel ``[kh, kw, in, out]``,
        flattened as :func:`_ops.flat_kernel`."""
        site = self.site
        delta = adalora.delta_spec(slot.get, slot.scaling, slot.rank, dtype,
                                   (site.out_features, site.in_features, *site.conv_spatial))
        return ops.reshape(ops.transpose(delta, (2, 3, 1, 0)), (-1, site.out_features))

    def _vera_views(self, piece: Piece, slot: _Slot, dtype: Any) -> tuple[Any, Any]:
        """The piece's rows of ``A[:, :in].T * lambda_d`` (``[n_in, r]``) and columns of ``B[:out].T * lambda_b``
        (``[r, n_out]``), in ``dtype`` (VB-LoRA: ``A.T``, ``B.T`` mixed from its bank; DeLoRA: :func:`delora.views`)."""
        site = self.site
        if slot.method in delora.METHODS:  # (w_norm * A.T * s, B.T): SPEC.md 17.6
            a, b = delora.views(slot.get, slot.rank, dtype)
            return _ops.gather_in(piece, a, site.in_features), _ops.gather_out(piece, b, site.out_features)
        assert slot.shared is not None
        if slot.config is not None and slot.method in vblora.METHODS:  # A.T, B.T mixed from the bank (SPEC.md 17.4)
            a, b = vblora.views(slot.get, slot.shared, slot.config, dtype)
        else:
            a, b = vera.views(slot.get, slot.shared, site.in_features, site.out_features, dtype)
        return _ops.gather_in(piece, a, site.in_features), _ops.gather_out(piece, b, site.out_features)

    def _vera_term(self, piece: Piece, slot: _Slot, x: Any, result: Any) -> tuple[Any, str]:
        """The term of a VeRA-path adapter (VeRA, VB-LoRA, DeLoRA) on this piece, ``dropout(x) @ A.T @ B.T`` through
        :meth:`_vera_views`, and the dtype it is computed in: float32 for a float32 adapter on a half-precision layer,
        else the output's."""
        dtype = "float32" if _ops.dtype_name(result) in _UPCAST and \
            next(iter(slot.refs.values())).key.dtype == "float32" else _ops.dtype_name(result)
        a, b = self._vera_views(piece, slot, dtype)
        x = ops.cast(x, dtype)
        if slot.dropout > 0 and _training():
            assert slot.bank is not None
            x = keras.random.dropout(x, slot.dropout, seed=slot.bank.seed)
        return _ops.expand_out(piece, _ops.contract_in(piece, x, a), b), dtype

    def _apply_vera(self, piece: Piece, slot: _Slot, x: Any, result: Any) -> Any:
        """VeRA unmerged: ``result + lambda_b * (lambda_d * (dropout(x) @ A.T)) @ B.T`` (PEFT's ``vera.Linear``, the
        scales folded into the factors), added in the term's dtype (:meth:`_vera_term`), then cast back."""
        part, dtype = self._vera_term(piece, slot, x, result)
        return ops.cast(ops.cast(result, dtype) + part, result.dtype)

    def _apply_delora(self, piece: Piece, slots: list[_Slot], x: Any, result: Any) -> Any:
        """DeLoRA unmerged (the torch backend's ``delora.output``, PEFT's ``DeloraLinear.forward``): each running
        adapter's term (:meth:`_vera_term`: ``w_norm`` and the bound folded into the factors) added in the active
        order into a zero tensor of the output's dtype, rounded to it at each step (PEFT's ``add_out += h``), then
        added to the base output once."""
        add = ops.zeros_like(result)
        for slot in slots:
            part, dtype = self._vera_term(piece, slot, x, result)
            add = ops.cast(ops.cast(add, dtype) + part, result.dtype)
        return result + add

    def _lycoris_flat(self, piece: Piece, slot: _Slot, dtype: Any) -> Any:
        """The piece's ``[n_in, n_out]`` share of a LoHa/LoKr ``ΔW`` (computed ``[out, in]`` over the module;
        a convolution's ``[out, in, *k]`` as its Keras kernel ``[*k, in, out]``, flattened as :func:`_ops.flat_kernel`)."""
        site = self.site
        kernel = site.conv_spatial
        delta = lycoris.delta_spec(slot.method, slot.get, slot.refs.__contains__, slot.scaling, dtype,
                                   (site.out_features, site.in_features, *kernel))
        if site.kind == "conv":
            nd = len(kernel)
            return ops.reshape(ops.transpose(delta, (*range(2, nd + 2), 1, 0)), (-1, site.out_features))
        flat = _ops.gather_in(piece, ops.transpose(delta), self.site.in_features)
        return _ops.gather_out(piece, flat, self.site.out_features)

    def _views(self, piece: Piece, slot: _Slot, dtype: Any) -> tuple[Any, Any]:
        site = self.site
        if site.kind == "embedding":
            a, b = slot.get("lora_embedding_A"), slot.get("lora_embedding_B")
        else:
            a, b = slot.get("lora_A.weight"), slot.get("lora_B.weight")
        if site.kind != "conv":
            a = _ops.gather_in(piece, a, site.in_features)
        b = _ops.gather_out(piece, b, site.out_features)
        return ops.cast(a, dtype), ops.cast(b, dtype)

    def _apply_lora(self, piece: Piece, slot: _Slot, x: Any, result: Any) -> Any:
        out_dtype = result.dtype
        if _ops.dtype_name(result) in _UPCAST and next(iter(slot.refs.values())).key.dtype == "float32":
            # float32 adapter on a half-precision layer: its part is computed in float32, as PEFT does
            x, result = ops.cast(x, "float32"), ops.cast(result, "float32")
            return ops.cast(self._lora_part(piece, slot, x, result), out_dtype)
        return self._lora_part(piece, slot, x, result)

    def _lora_part(self, piece: Piece, slot: _Slot, x: Any, result: Any) -> Any:
        dtype = result.dtype
        a, b = self._views(piece, slot, dtype)
        dropped = x
        dropout_on = slot.dropout > 0 and _training() and piece.kind != "embedding"
        if dropout_on:
            assert slot.bank is not None  # _views just read its parameters from it
            dropped = keras.random.dropout(x, slot.dropout, seed=slot.bank.seed)
        lora = _ops.expand_out(piece, _ops.contract_in(piece, dropped, a), b)
        if slot.lora_bias:
            lora = _ops.add_out(piece, lora, _ops.gather_out(piece, slot.get("lora_B.bias"), self.site.out_features))
        if not slot.use_dora:
            return result + lora * ops.cast(slot.scaling, dtype)
        # DoRA (PEFT's DoraLinearLayer.forward): norm of W + s*BA per output, detached
        flat = ops.cast(_ops.flat_kernel(piece), dtype)
        norm = ops.sqrt(ops.sum(ops.square(flat + slot.scaling * _ops.lora_delta_flat(piece, a, b)), axis=0))
        norm = ops.stop_gradient(norm)
        magnitude = ops.cast(_ops.gather_out(piece, slot.get("lora_magnitude_vector"), self.site.out_features), dtype)
        scale = _ops.scale_out(piece, ops.ones_like(result), magnitude / norm)
        if dropout_on:
            base = self._base_linear(piece, dropped, dtype)
        else:
            bias = _ops.bias_of(piece)
            base = result if bias is None else result - ops.cast(_ops.add_out(piece, ops.zeros_like(result), bias), dtype)
        return result + (scale - 1) * base + scale * lora * ops.cast(slot.scaling, dtype)

    @staticmethod
    def _base_linear(piece: Piece, x: Any, dtype: Any, kernel: Any = None) -> Any:
        """The base layer's pre-activation output without bias, for an input other than its own (dropout) --
        or, with ``kernel`` (the kernel variable's layout; Dense/EinsumDense), that contraction with ``kernel``."""
        layer = piece.layer
        if kernel is not None:
            if piece.kind == "einsum":
                return ops.einsum(layer.equation, x, kernel)
            if piece.kind == "conv":
                return ops.conv(x, kernel, strides=layer.strides, padding=layer.padding,
                                data_format=layer.data_format, dilation_rate=layer.dilation_rate)
            return ops.matmul(x, kernel)
        if piece.kind == "einsum":
            return ops.einsum(layer.equation, x, ops.cast(layer.kernel, dtype))
        if piece.kind == "conv":
            return ops.conv(x, ops.cast(layer.kernel, dtype), strides=layer.strides, padding=layer.padding,
                            data_format=layer.data_format, dilation_rate=layer.dilation_rate)
        return ops.matmul(x, ops.cast(_ops.flat_kernel(piece), dtype))

    # -- weight deltas and merging -----------------------------------------------------------------
    def _weight_norm(self, slot: _Slot, *, scaling: float) -> Any:
        """DoRA: ||W + scaling * B@A|| per output feature, over the whole module (all pieces)."""
        norms = np.zeros(self.site.out_features, dtype=np.float64)
        for piece in self.site.pieces:
            dtype = piece.kernel_variable.dtype
            a, b = self._views(piece, slot, dtype)
            flat = _ops.flat_kernel(piece) + scaling * _ops.lora_delta_flat(piece, a, b)
            norms[piece.out_index.ravel()] = ops.convert_to_numpy(ops.sqrt(ops.sum(ops.square(flat), axis=0)))
        return norms

    def delta_weight(self, name: str, piece: Piece, dtype: Any = None) -> Any:
        """LoRA, LoHa, LoKr, OFT, BOFT, AdaLoRA, VeRA: the change adapter ``name`` makes to the piece's kernel, ``[n_in, n_out]`` (see :func:`_ops.flat_kernel`),
        in ``dtype`` (default: the kernel's)."""
        slot = self._slots[name]
        if slot.method in lycoris.METHODS:
            return self._lycoris_flat(piece, slot, piece.kernel_variable.dtype if dtype is None else dtype)
        if slot.rotation is not None:  # OFT/BOFT: R_p @ K (* boft_s) - K, for the kernel as it is now
            flat = ops.cast(_ops.flat_kernel(piece), piece.kernel_variable.dtype if dtype is None else dtype)
            return _rotated_flat(self.site, piece, [(slot.rotation, slot.get)], flat) - flat
        if slot.road_settings is not None:  # RoAd: K @ R_p.T - K, for the kernel as it is now
            flat = ops.cast(_ops.flat_kernel(piece), piece.kernel_variable.dtype if dtype is None else dtype)
            return road.merge_flat(self.site, piece, slot.road_settings, slot.get, flat) - flat
        if slot.block is not None and slot.block.mode == miss.BAT:  # for the kernel as it is now
            flat = ops.cast(_ops.flat_kernel(piece), piece.kernel_variable.dtype if dtype is None else dtype)
            return miss.bat_flat(self.site, piece, slot.get, flat)
        if slot.circulant:  # C3A: D rounded to the kernel's dtype, divided by in (PEFT's get_delta_weight)
            return c3a.delta_flat(self.site, piece, slot.get, piece.kernel_variable.dtype if dtype is None else dtype)
        if slot.granular is not None:  # PEFT's get_delta_weight (SPEC.md 17.5)
            return gralora.delta_flat(self.site, piece, slot.granular, slot.get,
                                      piece.kernel_variable.dtype if dtype is None else dtype)
        if slot.block is not None:
            return miss.block_flat(self.site, piece, slot.block, slot.get,
                                   piece.kernel_variable.dtype if dtype is None else dtype)
        if slot.method in adalora.METHODS and self.site.kind == "conv":
            return self._adalora_conv_flat(slot, piece.kernel_variable.dtype if dtype is None else dtype)
        if slot.method in adalora.METHODS:
            a, b = self._adalora_views(piece, slot, piece.kernel_variable.dtype if dtype is None else dtype)
            return adalora.divide(_ops.lora_delta_flat(piece, a, b), slot.scaling, slot.rank)
        if slot.method in vera.METHODS or slot.method in vblora.METHODS or slot.method in delora.METHODS:
            a, b = self._vera_views(piece, slot, piece.kernel_variable.dtype if dtype is None else dtype)
            return _ops.lora_delta_flat(piece, a, b)
        a, b = self._views(piece, slot, piece.kernel_variable.dtype if dtype is None else dtype)
        return _ops.lora_delta_flat(piece, a, b) * slot.scaling

    def _merge_dtype(self, slot: _Slot, piece: Piece) -> str:
        """float32 for a float32 adapter on a half-precision kernel (PEFT's merge adds a float32 delta, rounded
        once; SPEC.md 7.3), else the kernel's dtype."""
        kernel = _ops.dtype_name(piece.kernel_variable)
        if kernel in _UPCAST and next(iter(slot.refs.values())).key.dtype == "float32":
            return "float32"
        return kernel

    def effective_kernel(self, piece: Piece, kernel: Any) -> Any:
        """The kernel the unmerged forward of the running adapters contracts the input with, given ``kernel`` (the
        piece's kernel as the layers before made it; in the kernel variable's layout): ``kernel`` itself when none
        runs.

        For a layer whose kernel its parent reads itself (:mod:`adapterspec_keras.reach`): each running adapter
        changes the kernel as it changes the layer's output in :meth:`apply` (PEFT's unmerged forward), with the
        merge's own math -- LoRA/rsLoRA, LoHa, LoKr, AdaLoRA, VeRA add :meth:`delta_weight`; DoRA rescales
        ``K + ΔW`` by ``m / ||W + ΔW||`` (``W`` the kernel variable, the norm detached, as PEFT's forward); IA3
        scales the output columns (feed-forward: the input rows, applied last, as :meth:`scale_input` scales the
        input of every adapter); OFT/BOFT add ``R(W) - W`` (:func:`oft.rotated_flat`). The parent then adds the
        layer's bias itself, unchanged: what would change it (``lora_bias``; IA3 on the output of a layer with a
        bias) is refused (:func:`~adapterspec_keras.reach.read_through_refusal`, and here again).

        :raises UnsupportedError: an adapter a kernel cannot carry (naming the module), or a slice of a fused kernel.

        >>> layer.effective_kernel(piece, piece.kernel_variable)            # doctest: +SKIP
        <tf.Tensor: shape=(64, 128), dtype=float32, ...>
        """
        running = self._running()
        if not running:
            return kernel
        path = self.site.path
        if piece.out_slice is not None:
            raise UnsupportedError(f"{path}: an adapter on a slice of a fused kernel cannot run on a kernel its parent "
                                   "reads", key=path, hint="target other modules")
        for _, slot in running:
            why = _kernel_refusal(slot, _ops.bias_of(piece) is not None)
            if why:
                raise UnsupportedError(f"{path}: {why}", key=path, hint="merge the adapter, or target other modules")
        out_dtype = kernel.dtype
        dtype = "float32" if _ops.dtype_name(kernel) in _UPCAST and \
            any(next(iter(slot.refs.values())).key.dtype == "float32" for _, slot in running) else out_dtype
        flat = ops.cast(_ops.flat_kernel(piece, kernel), dtype)
        rotations = self._rotations()
        if rotations:  # they run alone (PEFT holds one method per layer): R(W), as _apply_rotations
            base = ops.cast(_ops.flat_kernel(piece), dtype)
            rotated = _rotated_flat(self.site, piece, [(s.rotation, s.get) for s in rotations if s.rotation], base)
            return ops.cast(_ops.kernel_from_flat(piece, flat + rotated - base), out_dtype)
        rows = None
        for name, slot in running:
            if slot.method == "IA3":
                vector = self._ia3_vector(piece, slot)
                if slot.feedforward:
                    rows = vector if rows is None else rows * ops.cast(vector, rows.dtype)
                else:
                    flat = flat * ops.cast(vector, dtype)
                continue
            if slot.method in adalora.METHODS and slot.rank == 0:
                continue  # all its ranks pruned: adds nothing (_apply_adalora)
            delta = self.delta_weight(name, piece, dtype)
            if slot.use_dora:
                flat = self._dora_rescaled(piece, slot, flat, ops.cast(_ops.flat_kernel(piece), dtype), delta,
                                           detach=True)[0]
            else:
                flat = flat + delta
        if rows is not None:
            flat = flat * ops.cast(rows, dtype)
        return ops.cast(_ops.kernel_from_flat(piece, flat), out_dtype)

    def adds_only(self) -> bool:
        """Whether every running adapter only adds a term to the output (no DoRA, IA3, OFT/BOFT rescaling)."""
        return all(slot.method != "IA3" and slot.rotation is None and slot.road_settings is None and not slot.use_dora
                   for _, slot in self._running())

    def check_unmerge(self) -> None:
        """Refuse, before anything changes, an unmerge :meth:`unmerge` cannot do (a merged RoAd adapter whose matrix
        is singular: :func:`~adapterspec_keras.road.check_invertible`).

        :raises UnsupportedError: naming the adapter.
        """
        for name in self._merged:
            slot = self._slots[name]
            if slot.road_settings is not None:
                road.check_invertible(slot.road_settings, slot.get("road_theta"), slot.get("road_alpha"), name)

    def check_merge(self, names: list[str]) -> None:
        """Refuse, before anything changes, a merge :meth:`merge` cannot do exactly.

        :raises UnsupportedError: token rows of their own on an output layer tied to its embedding; lora_bias on a
            layer without a bias; a quantized layer (SPEC.md 6.8).
        """
        quantized = [p.layer for p in self.site.pieces if quantization(p.layer)]
        if quantized and any(name in self._slots and name not in self._merged for name in names):
            raise UnsupportedError(f"cannot merge into {type(quantized[0]).__name__} {quantized[0].path!r}, which is "
                                   f"quantized ({quantization(quantized[0])}): the sum would be rounded to the "
                                   "quantization grid, not the adapter's output", key=self.site.path,
                                   hint="run the adapter unmerged, or load it onto the unquantized model to merge")
        for name in names:
            slot = self._slots.get(name)
            if slot is not None and name not in self._merged and slot.road_settings is not None:
                for piece in self.site.pieces:
                    why = road.bias_refusal(piece)
                    if why:
                        raise UnsupportedError(why, key=self.site.path, hint="keep the adapter unmerged")
            if slot is not None and name not in self._merged and slot.method in beft.METHODS:
                for piece in self.site.pieces:
                    beft.check_merge(piece, self.site.path)
            if slot is not None and name not in self._merged and slot.lora_bias:
                for piece in self.site.pieces:
                    if _ops.bias_of(piece) is None:
                        raise UnsupportedError(f"lora_bias cannot merge into {piece.layer.path!r}, which has no bias",
                                               key=self.site.path, hint="keep the adapter unmerged")
            shared = [p for p in self.site.pieces if p.tied or (p.kind == "embedding" and _tied(p.layer))]
            if slot is not None and name not in self._merged and slot.method != tokens.TOKENS and shared:
                other = "lookup" if shared[0].kind == "reverse" else "logits projection (lm_head)"
                raise UnsupportedError(
                    f"the weight of {self.site.path!r} is also the {other} of {shared[0].layer.path!r} (tied "
                    f"weights): merging the adapter into it would change the {other} too, which the unmerged adapter "
                    "does not", key=self.site.path,
                    hint="keep the adapter unmerged, or untie the weights first (build the model with "
                         "tie_word_embeddings=False and the embeddings copied to its reverse_embeddings)")
            if slot is not None and slot.method == tokens.TOKENS and slot.source is None and \
                    any(piece.tied for piece in self.site.pieces):
                raise UnsupportedError("token rows of an output layer tied to its embedding, with indices of their "
                                       "own, cannot merge into the shared matrix", key=self.site.path,
                                       hint="keep the adapter unmerged")

    def merge(self, names: list[str]) -> None:
        """Add the deltas of ``names`` into the base kernels in place (DoRA: rescale by m/||W + dW||; IA3: scale)."""
        for name in names:
            if name not in self._slots or name in self._merged:
                continue
            slot = self._slots[name]
            base = self._unmerged_flats() if slot.use_dora else None
            for i, piece in enumerate(self.site.pieces):
                self._merge_piece(name, slot, i, piece, None if base is None else base[i])
            self._merged.append(name)

    def _unmerged_flats(self) -> list[Any]:
        """The pieces' kernels with the merged adapters taken out (PEFT's ``_unmerged_base_weight``): a DoRA
        merge takes its norm from them, the same way the unmerged forward does."""
        if self._w0 is not None:
            return self._w0
        merged = list(self._merged)
        if not merged:
            return [_ops.flat_kernel(p) for p in self.site.pieces]
        self.unmerge()
        self._w0 = [ops.convert_to_tensor(ops.convert_to_numpy(_ops.flat_kernel(p))) for p in self.site.pieces]
        try:
            self.merge(merged)
            return self._w0
        finally:
            self._w0 = None

    def _merge_piece(self, name: str, slot: _Slot, index: int, piece: Piece, base: Any = None) -> None:
        if slot.method == tokens.TOKENS:
            if slot.source is None:  # a tied output layer with rows of its own: check_merge refused it
                rows = np.asarray(ops.convert_to_numpy(self._token_rows(slot, name)))
                slot.saved_rows[index] = tokens.merge_rows(piece, rows, slot.indices)
            return  # tied: the embedding's merge wrote the rows into the shared matrix
        if slot.method in beft.METHODS:  # SPEC.md 17.8: the bias only
            beft.merge(piece, slot.get(beft.PARAM), self.site.out_features)
            return
        flat = _ops.flat_kernel(piece)
        if slot.method == "IA3":
            self._scale_piece(piece, slot, flat, inverse=False)
            return
        if slot.road_settings is not None:  # W <- R @ W, b <- R @ b in the kernel's dtype (PEFT's merge)
            _ops.assign_kernel(piece, road.merge_flat(self.site, piece, slot.road_settings, slot.get, flat))
            bias = _ops.bias_of(piece)
            if bias is not None:
                _ops.assign_bias(piece, road.merge_bias(self.site, piece, slot.road_settings, slot.get,
                                                        ops.convert_to_tensor(bias)))
            return
        dtype = self._merge_dtype(slot, piece)
        flat = ops.cast(flat, dtype)
        if slot.rotation is not None:
            new = _rotated_flat(self.site, piece, [(slot.rotation, slot.get)], flat)
            _ops.assign_kernel(piece, new)
            return
        delta = self.delta_weight(name, piece, dtype)
        if slot.lora_bias:
            self._add_bias(piece, slot, sign=1.0)
        if slot.use_dora:
            new, self._dora_norms[(name, index)] = self._dora_rescaled(piece, slot, flat, ops.cast(base, dtype), delta)
        else:
            new = flat + (_rounded(delta, piece) if slot.round_merge else delta)
        _ops.assign_kernel(piece, new)

    def _dora_rescaled(self, piece: Piece, slot: _Slot, flat: Any, base: Any, delta: Any, *,
                       detach: bool = False) -> tuple[Any, Any]:
        """DoRA: ``(flat + delta) * m / ||base + delta||`` per output feature, and that norm (``detach``: without
        gradient, as PEFT's forward takes it) -- the merged kernel, and the kernel the unmerged forward uses."""
        norm = ops.sqrt(ops.sum(ops.square(base + delta), axis=0))
        if detach:
            norm = ops.stop_gradient(norm)
        magnitude = _ops.gather_out(piece, slot.get("lora_magnitude_vector"), self.site.out_features)
        return (flat + delta) * ops.cast(magnitude / norm, flat.dtype)[None, :], norm

    def _add_bias(self, piece: Piece, slot: _Slot, sign: float) -> None:
        bias = _ops.bias_of(piece)
        if bias is None:
            raise UnsupportedError(f"lora_bias cannot merge into {piece.layer.path!r}, which has no bias",
                                   key=self.site.path, hint="keep the adapter unmerged")
        extra = _ops.gather_out(piece, slot.get("lora_B.bias"), self.site.out_features) * slot.scaling * sign
        _ops.assign_bias(piece, bias + ops.cast(ops.reshape(extra, tuple(bias.shape)), bias.dtype))

    def _ia3_vector(self, piece: Piece, slot: _Slot) -> Any:
        """IA3's vector shaped to scale the piece's ``[n_in, n_out]`` kernel: ``[n_in, 1]`` (feed-forward: the
        input rows) or ``[1, n_out]`` (the output columns)."""
        if slot.feedforward:
            vector = _ops.gather_in(piece, slot.get("ia3_l"), self.site.in_features)
            if piece.kind == "conv":
                vector = ops.tile(vector, (math.prod(self.site.conv_spatial),))
            return vector[:, None]
        return _ops.gather_out(piece, slot.get("ia3_l"), self.site.out_features)[None, :]

    def _scale_piece(self, piece: Piece, slot: _Slot, flat: Any, *, inverse: bool) -> None:
        vector = self._ia3_vector(piece, slot)
        if _ops.dtype_name(flat) in _UPCAST and _ops.dtype_name(vector) == "float32":
            flat = ops.cast(flat, "float32")  # as PEFT merges: in float32, rounded once to the kernel's dtype
        vector = ops.cast(vector, flat.dtype)
        new = flat / (vector + _IA3_EPS) if inverse else flat * vector
        _ops.assign_kernel(piece, new)
        bias = _ops.bias_of(piece)
        if bias is not None and not slot.feedforward:
            scale = ops.reshape(_ops.gather_out(piece, slot.get("ia3_l"), self.site.out_features), tuple(bias.shape))
            value = ops.convert_to_tensor(bias)
            if _ops.dtype_name(value) in _UPCAST and _ops.dtype_name(scale) == "float32":
                value = ops.cast(value, "float32")
            scale = ops.cast(scale, value.dtype)
            _ops.assign_bias(piece, value / (scale + _IA3_EPS) if inverse else value * scale)

    def unmerge(self) -> None:
        """Undo :meth:`merge` for every merged adapter, in reverse order (as PEFT: subtract, or divide).

        :raises UnsupportedError: a merged RoAd adapter's matrix is singular (:meth:`check_unmerge`); nothing changed.
        """
        self.check_unmerge()
        while self._merged:
            name = self._merged.pop()
            slot = self._slots[name]
            for i, piece in enumerate(self.site.pieces):
                if slot.method == tokens.TOKENS:
                    if i in slot.saved_rows:
                        tokens.unmerge_rows(piece, slot.saved_rows.pop(i), slot.indices)
                    continue
                if slot.method in beft.METHODS:
                    beft.unmerge(piece, slot.get(beft.PARAM), self.site.out_features)
                    continue
                flat = _ops.flat_kernel(piece)
                if slot.method == "IA3":
                    self._scale_piece(piece, slot, flat, inverse=True)
                    continue
                if slot.road_settings is not None:  # R^-1 (float32, rounded to the kernel's dtype), as PEFT
                    settings = slot.road_settings
                    _ops.assign_kernel(piece, road.unmerge_flat(self.site, piece, settings, slot.get, flat))
                    bias = _ops.bias_of(piece)
                    if bias is not None:
                        _ops.assign_bias(piece, road.unmerge_bias(self.site, piece, settings, slot.get,
                                                                  ops.convert_to_tensor(bias)))
                    continue
                dtype = self._merge_dtype(slot, piece)
                flat = ops.cast(flat, dtype)
                if slot.rotation is not None:
                    new = hra.unmerge_flat(self.site, piece, slot.rotation, slot.get, flat) \
                        if isinstance(slot.rotation, hra.Reflections) else \
                        oft.unmerge_flat(self.site, piece, slot.rotation, slot.get, flat)
                    _ops.assign_kernel(piece, new)
                    continue
                if slot.block is not None and slot.block.mode == miss.BAT:
                    _ops.assign_kernel(piece, miss.bat_flat(self.site, piece, slot.get, flat, reverse=True))
                    continue
                delta = self.delta_weight(name, piece, dtype)
                if slot.use_dora:
                    norm = self._dora_norms.pop((name, i))
                    magnitude = _ops.gather_out(piece, slot.get("lora_magnitude_vector"), self.site.out_features)
                    new = flat / ops.cast(magnitude / norm, flat.dtype)[None, :] - delta
                else:
                    new = flat - (_rounded(delta, piece) if slot.round_unmerge else delta)
                _ops.assign_kernel(piece, new)
                if slot.lora_bias:
                    self._add_bias(piece, slot, sign=-1.0)
