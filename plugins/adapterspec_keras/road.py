"""RoAd (SPEC.md 17.1) on Keras layers: 2-D rotations of pairs of a module's outputs, PEFT 0.21's math (the mirror
of :mod:`adapterspec_torch.road`, function for function).

Each group of ``group_size`` outputs of the module pairs feature ``i`` with feature ``i + group_size/2``; the pair
``(y_i, y_j)`` becomes ``(y_i * c_i - y_j * s_i, y_j * c_j + y_i * s_j)`` (:func:`columns`). A keras-hub layer
computes the module's outputs in its own order (an EinsumDense ``(heads, head_dim)``, a piece of a split module:
:class:`~adapterspec_keras.sites.Piece`'s ``out_index``), so the rotation runs on the piece's output positions: each
position ``p`` is feature ``f = out_index[p]``, its partner the position of ``f``'s partner feature
(:func:`piece_pairs`) -- a module whose pair falls in two pieces is refused (:func:`check`). The unmerged forward
rotates the layer's output (bias included, before activation) elementwise (:func:`forward`, PEFT's ``_apply_road``);
a merge rotates the kernel's output columns and the bias the same way (:func:`merge_flat`: ``W <- R @ W``,
``b <- R @ b``, ``R`` in the kernel's dtype); an unmerge multiplies by ``R^-1`` computed in float32 and rounded to
the kernel's dtype as PEFT's unmerge (:func:`unmerge_flat`; ``R`` is 2x2 blocks, whose inverses are computed in
closed form -- the same matrix as ``torch.linalg.inv``'s within float32 rounding), a singular ``R`` refused before
any change (:func:`check_invertible`).

>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "ROAD", "target_modules": ["q"], "variant": "road_2", "group_size": 4})
>>> shapes_for(cfg, 8)
{'road_theta': (8,), 'road_alpha': (8,)}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from keras import ops

from adapterspec import AdapterConfig
from adapterspec._road import group_size, out_features_problem, variant, vector_length
from adapterspec.errors import UnsupportedError

from ._ops import dtype_name
from .sites import ModuleSite, Piece

__all__ = ["KINDS", "METHODS", "Road", "apply", "bias_refusal", "check", "check_invertible", "columns", "forward",
           "inits", "inverse_columns", "merge_bias", "merge_flat", "partner", "piece_pairs", "settings", "shapes",
           "shapes_for", "unmerge_bias", "unmerge_flat"]

#: The methods this module computes.
METHODS = ("ROAD",)
#: The piece kinds adapted (PEFT 0.21's RoAd adapts ``nn.Linear`` only: keras-hub's Dense / EinsumDense).
KINDS = ("dense", "einsum")

_HALF = ("float16", "bfloat16")

class Road(NamedTuple):
    """The variant and group size of one RoAd adapter."""

    variant: str
    group_size: int


def settings(config: AdapterConfig) -> Road:
    """The :class:`Road` of ``config``."""
    return Road(variant(config), group_size(config))


def partner(spec: Road, features: np.ndarray) -> np.ndarray:
    """Each module output feature's partner: ``i + group_size/2`` in the first half of its group, ``i - group_size/2``
    in the second.

    >>> partner(Road("road_1", 4), np.arange(8)).tolist()
    [2, 3, 0, 1, 6, 7, 4, 5]
    """
    size, half = spec.group_size, spec.group_size // 2
    within = features % size
    return np.asarray(features - within + (within + half) % size)


def piece_pairs(site: ModuleSite, piece: Piece, spec: Road) -> tuple[np.ndarray, np.ndarray] | None:
    """``(features, partners)`` of the piece's output positions, in its kernel's output order: the module feature at
    each position and the position of its partner feature; ``None`` when some partner is not among the piece's
    outputs (a pair falls in two pieces)."""
    features = np.asarray(piece.out_index).ravel().astype(np.int64)
    where = np.full(site.out_features, -1, dtype=np.int64)
    where[features] = np.arange(features.size)
    partners = where[partner(spec, features)]
    if (partners < 0).any():
        return None
    return features, partners


def check(site: ModuleSite, path: str, config: AdapterConfig) -> None:
    """Refuse a module the RoAd math of this backend does not cover exactly (the torch backend's ``check``).

    :raises UnsupportedError: naming ``path``: not a linear module on Dense/EinsumDense layers (an embedding, a
        convolution, a transformers ``Conv1D``: PEFT's RoAd adapts ``nn.Linear`` only; a ReversibleEmbedding's logits
        projection: not implemented here); output
        features ``group_size`` does not divide (``/group_size``, PEFT's ``update_layer`` raises); a pair of rotated
        outputs computed by two Keras layers.
    """
    layers = ", ".join(f"{type(p.layer).__name__} {p.layer.path!r}" for p in site.pieces)
    kinds = {piece.kind for piece in site.pieces}
    if site.hf_conv1d:
        raise UnsupportedError(f"RoAd cannot adapt a transformers Conv1D module (GPT-2's, weight stored [in, out]; "
                               f"module on {layers}): PEFT's RoAd adapts nn.Linear only, so PEFT could not load the "
                               "adapter", key=path, hint="remove the module from target_modules, or use LoRA/IA3")
    if "reverse" in kinds:
        raise UnsupportedError(f"RoAd on the logits projection of a ReversibleEmbedding ({layers}) is not implemented "
                               "by the keras backend (PEFT adapts this nn.Linear; a tied one cannot merge)", key=path,
                               hint="remove the module from target_modules, or use the torch backend")
    if site.kind != "linear" or not kinds <= set(KINDS):
        raise UnsupportedError(f"the keras backend adapts only Dense/EinsumDense layers of a linear module with RoAd "
                               f"(module on {layers}; PEFT's RoAd adapts nn.Linear only)", key=path,
                               hint="remove the module from target_modules (or exclude it with exclude_modules)")
    problem = out_features_problem(config, int(site.out_features))
    if problem is not None:
        raise UnsupportedError(problem, key=path, pointer="/group_size",
                               hint="choose a group_size dividing the output size of every adapted layer, or leave "
                                    "this layer out of target_modules")
    spec = settings(config)
    for piece in site.pieces:
        if piece_pairs(site, piece, spec) is None:
            raise UnsupportedError(
                f"RoAd rotates pairs of outputs (i, i + group_size/2 = {spec.group_size // 2}) of {path}; "
                f"{type(piece.layer).__name__} {piece.layer.path!r} computes only some of the module's outputs and a "
                "pair falls in two Keras layers, so the rotation is not defined on one layer", key=path,
                hint="choose a group_size whose groups lie within one Keras layer, leave this module out of "
                     "target_modules, or use the torch backend")


def bias_refusal(piece: Piece) -> str | None:
    """Why the piece's bias cannot take a merge (``b <- R @ b``), or ``None``: an EinsumDense bias broadcast over
    some output axes, or laid out in another order than the kernel's outputs, cannot hold a rotated bias."""
    bias = piece.bias_variable
    if bias is None:
        return None
    size = int(np.prod(tuple(bias.shape), dtype=np.int64)) if piece.out_slice is None else piece.n_out
    if size != piece.n_out:
        return (f"the bias of {type(piece.layer).__name__} {piece.layer.path!r} is shared by some of its outputs "
                "(EinsumDense bias_axes), so it cannot hold the rotated bias a RoAd merge writes")
    if piece.kind == "einsum":
        named = piece.output_spec.replace("...", "")
        order = sorted(piece.kout, key=named.index)
        if "".join(order) != piece.kout:
            return (f"the bias of {type(piece.layer).__name__} {piece.layer.path!r} orders its outputs unlike its "
                    "kernel, which a RoAd merge of this backend does not handle")
    return None


def shapes_for(config: AdapterConfig, out_features: int) -> dict[str, tuple[int, ...]]:
    """``road_theta`` and ``road_alpha``: ``[out/2]``, ``[out]`` or ``[2*out]`` (road_1, road_2, road_4)."""
    size = vector_length(variant(config), int(out_features))
    return {"road_theta": (size,), "road_alpha": (size,)}


def shapes(site: ModuleSite, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """:func:`shapes_for` of this module (the torch backend's ``shapes``)."""
    return shapes_for(config, site.out_features)


def inits(config: AdapterConfig) -> dict[str, tuple[Any, ...]]:
    """Initialiser descriptions (:func:`~adapterspec_keras.bank.make_initializer`) as PEFT initialises (the torch
    backend's ``initialise``): ``theta`` zeros and ``alpha`` ones (the identity); with ``init_weights: false``,
    ``theta ~ N(0, 0.5)`` and ``alpha ~ N(1, 0.5)`` -- PEFT's distributions from Keras' generator, not torch's values.

    >>> inits(AdapterConfig.from_dict({"peft_type": "ROAD", "target_modules": ["q"]}))
    {'road_theta': ('zeros',), 'road_alpha': ('ones',)}
    """
    if config.get("init_weights", True) is False:
        return {"road_theta": ("normal", 0.5, 0.0), "road_alpha": ("normal", 0.5, 1.0)}
    return {"road_theta": ("zeros",), "road_alpha": ("ones",)}


def columns(spec: Road, theta: Any, alpha: Any) -> tuple[Any, Any]:
    """``(c, s)``, each ``[out]`` in module order: the diagonal of ``R`` and the coefficients of the partner element
    (PEFT's ``_prepare_cols``)."""
    size = spec.group_size
    if spec.variant == "road_1":  # group_size/2 values per group, used by both halves
        theta = ops.reshape(ops.repeat(ops.reshape(theta, (-1, size // 2)), 2, axis=0), (-1,))
        alpha = ops.reshape(ops.repeat(ops.reshape(alpha, (-1, size // 2)), 2, axis=0), (-1,))
        return alpha * ops.cos(theta), alpha * ops.sin(theta)
    if spec.variant == "road_2":
        return alpha * ops.cos(theta), alpha * ops.sin(theta)
    theta, alpha = ops.reshape(theta, (-1, 2, size)), ops.reshape(alpha, (-1, 2, size))  # road_4: cos, sin halves
    return ops.reshape(alpha[:, 0, :] * ops.cos(theta[:, 0, :]), (-1,)), \
        ops.reshape(alpha[:, 1, :] * ops.sin(theta[:, 1, :]), (-1,))


def _signs(spec: Road, count: int) -> np.ndarray:
    """``-1`` for the first half of each group (``y_i c_i - y_j s_i``), ``+1`` for the second."""
    within = np.arange(count) % spec.group_size
    return np.where(within < spec.group_size // 2, -1.0, 1.0)


def _signed(spec: Road, theta: Any, alpha: Any) -> tuple[Any, Any]:
    """``(c, ±s)`` in module order: ``y'_f = y_f * c_f + y_partner(f) * (±s)_f``."""
    first, second = columns(spec, theta, alpha)
    return first, second * ops.cast(_signs(spec, int(second.shape[0])), second.dtype)


def inverse_columns(spec: Road, theta: Any, alpha: Any) -> tuple[Any, Any]:
    """``(c', ±s')`` of ``R^-1`` in float32, module order: each pair's 2x2 block ``[[c_i, -s_i], [s_j, c_j]]`` has
    the inverse ``[[c_j, s_i], [-s_j, c_i]] / (c_i c_j + s_i s_j)``."""
    first, signed = _signed(spec, ops.cast(theta, "float32"), ops.cast(alpha, "float32"))
    second = signed * ops.cast(_signs(spec, int(signed.shape[0])), "float32")
    other = partner(spec, np.arange(int(first.shape[0])))
    det = first * ops.take(first, other, axis=0) + second * ops.take(second, other, axis=0)
    return ops.take(first, other, axis=0) / det, -signed / det


def check_invertible(spec: Road, theta: Any, alpha: Any, name: str) -> None:
    """Refuse to unmerge an adapter whose ``R`` has no inverse (before any weight changes).

    :raises UnsupportedError: naming the adapter.
    """
    inverse = inverse_columns(spec, theta, alpha)
    if not all(bool(np.isfinite(ops.convert_to_numpy(part)).all()) for part in inverse):
        raise UnsupportedError("the RoAd rotation-and-scale matrix of this adapter is singular (a zero road_alpha, or "
                               "two paired angles a quarter turn apart), so its merge cannot be undone (PEFT's unmerge "
                               "fails on it too)", key=name,
                               hint="reload the base model instead of unmerging, or unload(model, merge=True)")


def _out_axes(piece: Piece, ndim: int) -> list[int]:
    """The axes of a layer output holding the piece's kernel output axes, in kernel order."""
    if piece.kind != "einsum":
        return [ndim - 1]
    named = piece.output_spec.replace("...", "")
    offset = ndim - len(named)
    return [offset + named.index(c) for c in piece.kout]


def apply(piece: Piece, first: Any, signed: Any, partners: np.ndarray, y: Any) -> Any:
    """``y`` with its piece outputs rotated (elementwise, PEFT's ``_apply_road``): ``y_p * first_p +
    y_partner(p) * signed_p``, ``first``/``signed`` ``[n_out]`` in the piece's kernel output order.

    :param y: a layer output (``[..., n_out]``; an EinsumDense's output axes as its equation orders them).
    """
    ndim = len(y.shape)
    axes = _out_axes(piece, ndim)
    rest = [a for a in range(ndim) if a not in axes]
    perm = rest + axes
    moved = perm != list(range(ndim))
    yt = ops.transpose(y, perm) if moved else y
    shape = ops.shape(yt)
    flat = ops.reshape(yt, (*shape[:len(rest)], piece.n_out)) if len(axes) > 1 else yt
    out = flat * first + ops.take(flat, partners, axis=-1) * signed
    if len(axes) > 1:
        out = ops.reshape(out, shape)
    if moved:
        out = ops.transpose(out, [perm.index(i) for i in range(ndim)])
    return out


def _piece_columns(site: ModuleSite, piece: Piece, spec: Road, first: Any, signed: Any) -> tuple[Any, Any, np.ndarray]:
    pairs = piece_pairs(site, piece, spec)
    if pairs is None:  # check refused it at load
        raise UnsupportedError(f"a RoAd pair of {site.path} falls in two Keras layers", key=site.path)
    features, partners = pairs
    if np.array_equal(features, np.arange(site.out_features)):
        return first, signed, partners
    return ops.take(first, features, axis=0), ops.take(signed, features, axis=0), partners


def forward(site: ModuleSite, piece: Piece, adapters: Sequence[tuple[Road, Callable[[str], Any]]], result: Any) -> Any:
    """The piece's output ``result`` rotated by each running adapter in order (PEFT's ``forward``: cast to the
    adapter's dtype before each, back to the output's dtype at the end)."""
    dtype = result.dtype
    for spec, get in adapters:
        theta, alpha = get("road_theta"), get("road_alpha")
        first, signed, partners = _piece_columns(site, piece, spec, *_signed(spec, theta, alpha))
        result = apply(piece, first, signed, partners, ops.cast(result, theta.dtype))
    return ops.cast(result, dtype)


def _rotate_columns(site: ModuleSite, piece: Piece, spec: Road, pair: tuple[Any, Any], flat: Any) -> Any:
    """``flat``'s last axis (the piece's outputs, kernel order) times ``R_p`` of ``(first, signed)``, with ``R``
    rounded to ``flat``'s dtype as PEFT's ``road_R.to(orig_dtype)``; a half-precision ``flat`` sums the two products
    in float32 and rounds once (a matmul's accumulation)."""
    name = dtype_name(flat)
    first, signed, partners = _piece_columns(site, piece, spec, *pair)
    first, signed = ops.cast(first, flat.dtype), ops.cast(signed, flat.dtype)
    if name in _HALF:
        wide = ops.cast(flat, "float32")
        out = wide * ops.cast(first, "float32") + ops.take(wide, partners, axis=-1) * ops.cast(signed, "float32")
        return ops.cast(out, flat.dtype)
    return flat * first + ops.take(flat, partners, axis=-1) * signed


def merge_flat(site: ModuleSite, piece: Piece, spec: Road, get: Callable[[str], Any], flat: Any) -> Any:
    """The piece's ``[n_in, n_out]`` kernel after merging one adapter: ``K <- K @ R_p.T`` (``W <- R @ W``)."""
    return _rotate_columns(site, piece, spec, _signed(spec, get("road_theta"), get("road_alpha")), flat)


def merge_bias(site: ModuleSite, piece: Piece, spec: Road, get: Callable[[str], Any], bias: Any) -> Any:
    """The piece's bias after merging one adapter (``b <- R @ b``), shaped as ``bias``."""
    flat = ops.reshape(bias, (piece.n_out,))
    return ops.reshape(merge_flat(site, piece, spec, get, flat), tuple(bias.shape))


def unmerge_flat(site: ModuleSite, piece: Piece, spec: Road, get: Callable[[str], Any], flat: Any) -> Any:
    """Undo :func:`merge_flat` as PEFT does: ``R^-1`` in float32, rounded to the kernel's dtype (not bit-exact).

    :raises UnsupportedError: ``R`` is singular (:func:`check_invertible`)."""
    check_invertible(spec, get("road_theta"), get("road_alpha"), site.path)
    return _rotate_columns(site, piece, spec, inverse_columns(spec, get("road_theta"), get("road_alpha")), flat)


def unmerge_bias(site: ModuleSite, piece: Piece, spec: Road, get: Callable[[str], Any], bias: Any) -> Any:
    """Undo :func:`merge_bias`."""
    flat = ops.reshape(bias, (piece.n_out,))
    return ops.reshape(unmerge_flat(site, piece, spec, get, flat), tuple(bias.shape))
