"""Sites: which Keras layers (and which slice of each kernel) compute one spec module.

A :class:`ModuleSite` records, for one spec module (``model.layers.0.self_attn.q_proj``), every
:class:`Piece` -- a Keras layer plus index maps from its kernel's input and output positions to the
module's flattened ``in_features``/``out_features`` -- so the adapter math runs on Keras layers exactly
as PEFT runs it on the torch module (einsum kernels ``(hidden, heads, head_dim)``; GPT-2's fused
``c_attn`` split over three layers; Swin's query, key and value, three column ranges of one fused kernel).

>>> import keras
>>> site = layer_site("fc", keras.layers.Dense(3))                      # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adapterspec.errors import TargetNotFoundError

__all__ = ["UNADAPTABLE", "ModuleSite", "Piece", "base_variable", "keras_lora", "layer_kind", "layer_site",
           "model_layers", "own_name", "packed", "parameter_variables", "resolve_layer", "unadaptable_site"]


@dataclass(eq=False)
class Piece:
    """One Keras layer's share of a spec module.

    :param layer: the Keras layer.
    :param kind: ``"dense"``, ``"einsum"``, ``"embedding"`` (lookup), ``"reverse"`` (the logits
        projection of a ``ReversibleEmbedding``, i.e. ``lm_head``) or ``"conv"``.
    :param in_index: for each input position of the kernel (the kernel's input axes, in kernel
        order), the spec module's input feature it is; ``in_index.shape`` is those axes' shape.
    :param out_index: likewise for the kernel's output axes and the module's output features.
    :param input_spec, kernel_spec, output_spec: the einsum equation's parts (``"einsum"`` only).
    :param out_slice: ``(start, stop)``: the piece is only those columns of the layer's Dense kernel (and of its
        outputs), ``out_index`` covering just them -- a converter fused several modules into one kernel (Swin's
        query, key and value); ``None``: all of the layer's outputs.
    """

    layer: Any
    kind: str
    in_index: np.ndarray
    out_index: np.ndarray
    input_spec: str = ""
    kernel_spec: str = ""
    output_spec: str = ""
    out_slice: tuple[int, int] | None = None

    @property
    def kin(self) -> str:
        """The kernel's input letters (contracted with the input), in kernel order."""
        return "".join(c for c in self.kernel_spec if c in self.input_spec and c not in self.output_spec)

    @property
    def kout(self) -> str:
        """The kernel's output letters, in kernel order."""
        return "".join(c for c in self.kernel_spec if c in self.output_spec)

    @property
    def role(self) -> str:
        """``"reverse"`` for the logits projection of a reversible embedding, else ``"forward"``."""
        return "reverse" if self.kind == "reverse" else "forward"

    @property
    def tied(self) -> bool:
        """A reverse piece whose kernel is the transposed ``embeddings`` (tied weights)."""
        return self.kind == "reverse" and bool(getattr(self.layer, "tie_weights", False))

    @property
    def kernel_variable(self) -> Any:
        """The variable holding the base weight (``embeddings`` for a tied reverse piece)."""
        if self.kind == "reverse":
            return base_variable(self.layer) if self.tied else self.layer.reverse_embeddings
        if self.kind == "embedding":
            return base_variable(self.layer)
        base = getattr(type(self.layer), "_adapterspec_base_kernel", None)  # a kernel read through (reach.py)
        return base.fget(self.layer) if base is not None else base_variable(self.layer)

    @property
    def bias_variable(self) -> Any:
        """The layer's bias variable, or ``None``."""
        if self.kind in ("embedding", "reverse"):
            return None
        return getattr(self.layer, "bias", None)

    @property
    def n_in(self) -> int:
        return int(self.in_index.size)

    @property
    def n_out(self) -> int:
        return int(self.out_index.size)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.in_index.shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.out_index.shape)


@dataclass(eq=False)
class ModuleSite:
    """A spec module and the Keras pieces that compute it.

    :param path: the spec module path.
    :param kind: ``"linear"`` (``nn.Linear``/``Conv1D``: ``lora_A.weight``...), ``"embedding"``
        (``lora_embedding_A``...) or ``"conv"``.
    :param in_features, out_features: the spec module's (PEFT's) feature counts.
    :param pieces: the Keras layers; their ``out_index`` together cover the outputs.
    :param source: ``"module_map"``, ``"converter"`` or ``"layers"`` (how it was found).
    :param refused: why no adapter can go on this module (it has no pieces then), ``""`` if it can.
    :param hf_conv1d: the checkpoint stores the weight ``[in, out]`` (transformers' ``Conv1D``, GPT-2), which
        PEFT's OFT/BOFT/LoHa/LoKr do not adapt (found by a converter; ``False`` otherwise).
    :param root: the leading segment a path naming this module may add or drop: PEFT names a module relative to
        the model it wrapped, base or task model (``h.0.attn.c_attn``, ``transformer.h.0.attn.c_attn``); a keras-hub
        converter's site takes only the base-model prefix (``""``: none), since another suffix names another module
        (SAM 3's ``text_encoder.text_projection`` ends with ``text_projection``); ``None``: any prefix.
    """

    path: str
    kind: str
    in_features: int
    out_features: int
    pieces: list[Piece] = field(default_factory=list)
    source: str = "layers"
    refused: str = ""
    hf_conv1d: bool = False  # the transformers weight is stored [in, out]: a transformers Conv1D (GPT-2)
    root: str | None = None

    @functools.cached_property
    def key(self) -> tuple[Any, ...]:
        """Identity of the module's Keras side: its pieces' layers and roles (two spec names may share it)."""
        if not self.pieces:
            return ("refused", self.refused)
        return tuple((id(p.layer), p.role, int(p.out_index.ravel()[0]), p.out_slice) for p in self.pieces)

    @property
    def conv_spatial(self) -> tuple[int, ...]:
        """The kernel's spatial size (conv sites), ``()`` otherwise."""
        if self.kind != "conv":
            return ()
        return tuple(int(d) for d in self.pieces[0].layer.kernel.shape[:-2])


def _keras() -> Any:
    import keras

    return keras


def _split_equation(equation: str) -> tuple[str, str, str]:
    inputs, output = equation.replace(" ", "").split("->")
    input_spec, kernel_spec = inputs.split(",")
    return input_spec, kernel_spec, output


def keras_lora(layer: Any) -> bool:
    """Keras' own LoRA is on ``layer`` (``layer.enable_lora(rank)``, keras-hub's ``backbone.enable_lora``).

    >>> import keras
    >>> keras_lora(keras.layers.Dense(4))
    False
    """
    return getattr(layer, "lora_enabled", False) is True


def base_variable(layer: Any) -> Any:
    """The variable holding a layer's weight (``kernel``, an embedding's ``embeddings``).

    With Keras' own LoRA on (:func:`keras_lora`), the ``kernel``/``embeddings`` property reads the weight plus
    Keras' LoRA delta, a new tensor at each read; the variable is then ``_kernel``/``_embeddings``.
    """
    name = "embeddings" if layer_kind(layer) == "embedding" else "kernel"
    if keras_lora(layer) and not packed(layer):
        return getattr(layer, "_" + name)
    return getattr(layer, name)


#: quantization modes whose stored kernel is packed: the ``kernel`` property unpacks it (a new tensor either way)
_PACKED = ("int4", "gptq", "awq")


def packed(layer: Any) -> bool:
    """Whether ``layer``'s kernel is stored packed (int4, GPTQ, AWQ), so that it no longer has its shape.

    >>> import keras
    >>> layer = keras.layers.Dense(4)
    >>> layer.build((None, 8)); layer.quantize("int8"); packed(layer)
    False
    """
    return getattr(layer, "quantization_mode", None) in _PACKED


def layer_kind(layer: Any) -> str | None:
    """The piece kind of a Keras layer (``"dense"``, ``"einsum"``, ``"embedding"``, ``"conv"``) or ``None``.

    >>> import keras
    >>> layer_kind(keras.layers.Dense(4))
    'dense'
    """
    keras = _keras()
    if isinstance(layer, keras.layers.EinsumDense):
        return "einsum"
    if isinstance(layer, keras.layers.Dense):
        return "dense"
    if isinstance(layer, keras.layers.Embedding):
        return "embedding"
    conv_base = getattr(getattr(keras.src.layers, "convolutional", None), "base_conv", None)
    if conv_base is not None and isinstance(layer, conv_base.BaseConv) and not getattr(layer, "transpose", False):
        return "conv"
    if type(layer).__name__ in ("Conv1D", "Conv2D", "Conv3D"):
        return "conv"
    return None


def _axes(piece_kind: str, layer: Any, kernel_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The kernel's input and output axes (positions in the kernel) for a piece kind."""
    if piece_kind in ("dense", "embedding", "reverse"):
        return (0,), (1,)
    if piece_kind == "einsum":
        input_spec, kernel_spec, output_spec = _split_equation(layer.equation)
        kin = tuple(i for i, c in enumerate(kernel_spec) if c in input_spec and c not in output_spec)
        kout = tuple(i for i, c in enumerate(kernel_spec) if c in output_spec)
        return kin, kout
    rank = len(kernel_shape)
    return (rank - 2,), (rank - 1,)


def _make_piece(layer: Any, kind: str, in_index: np.ndarray, out_index: np.ndarray) -> Piece:
    if kind == "einsum":
        input_spec, kernel_spec, output_spec = _split_equation(layer.equation)
        return Piece(layer, kind, in_index, out_index, input_spec, kernel_spec, output_spec)
    return Piece(layer, kind, in_index, out_index)


def _einsum_supported(layer: Any) -> bool:
    """Equations an adapter can follow: each kernel letter is an input or an output axis (not both),
    the other letters pass from input to output, and an ellipsis, if any, leads."""
    input_spec, kernel_spec, output_spec = _split_equation(layer.equation)
    if "." in kernel_spec or any("..." in s and not s.startswith("...") for s in (input_spec, output_spec)):
        return False
    if not all((c in input_spec) != (c in output_spec) for c in kernel_spec):
        return False

    def letters(spec: str) -> set[str]:
        return set(spec.replace(".", ""))

    return letters(input_spec) - letters(kernel_spec) == letters(output_spec) - letters(kernel_spec)


def layer_site(path: str, layer: Any, *, reverse: bool = False, source: str = "layers") -> ModuleSite | None:
    """The site of a whole Keras layer taken as one spec module, its kernel's axes flattened in order.

    This is how keras-hub's converters lay out a transformers ``Linear``: kernel = ``W.T`` reshaped.

    :param reverse: the logits projection of a ``ReversibleEmbedding`` (``lm_head``) instead of its lookup.
    :returns: ``None`` for a layer kind adapters cannot wrap.
    """
    kind = "reverse" if reverse else layer_kind(layer)
    if kind is None or (kind == "einsum" and not _einsum_supported(layer)):
        return None
    if kind == "reverse":
        shape = tuple(int(d) for d in layer.embeddings.shape[::-1])
    else:
        variable = layer.embeddings if kind == "embedding" else getattr(layer, "kernel", None)
        if variable is None:
            return None
        shape = tuple(int(d) for d in variable.shape)
    kin, kout = _axes(kind, layer, shape)
    in_shape = tuple(shape[i] for i in kin)
    out_shape = tuple(shape[i] for i in kout)
    piece = _make_piece(layer, kind, np.arange(math.prod(in_shape)).reshape(in_shape),
                        np.arange(math.prod(out_shape)).reshape(out_shape))
    module_kind = {"embedding": "embedding", "conv": "conv"}.get(kind, "linear")
    return ModuleSite(path, module_kind, piece.n_in, piece.n_out, [piece], source)


#: The kind of :func:`unadaptable_site`'s sites: a layer no adapter wraps, refused when a target names it.
UNADAPTABLE = "unadaptable"

#: What an adapter wraps (SPEC.md 12), as :func:`unadaptable_site`'s refusal names it.
_ADAPTS = "Dense, EinsumDense, Embedding, Conv1D, Conv2D, Conv3D"


def unadaptable_site(path: str, layer: Any) -> ModuleSite | None:
    """The refused site of a layer with a kernel that no adapter wraps (a transposed, depthwise or separable
    convolution; an ``EinsumDense`` whose equation it cannot follow), so that a target naming it is refused as the
    torch backend refuses a ``ConvTranspose2d`` (``LORA cannot adapt a ... layer``), not said to match no layer;
    ``None`` for a layer without a kernel (or one :func:`layer_site` takes).

    >>> import keras
    >>> layer = keras.layers.DepthwiseConv2D(3)
    >>> layer.build((None, 5, 5, 2))
    >>> unadaptable_site("c", layer).refused[:48]
    'cannot adapt a keras.layers.DepthwiseConv2D laye'
    """
    if not any(hasattr(layer, name) for name in ("kernel", "depthwise_kernel", "pointwise_kernel")):
        return None
    name = type(layer).__name__
    qualified = f"keras.layers.{name}" if getattr(_keras().layers, name, None) is type(layer) else \
        f"{type(layer).__module__}.{type(layer).__qualname__}"
    equation = f" with equation {layer.equation!r}" if layer_kind(layer) == "einsum" else ""
    return ModuleSite(path, UNADAPTABLE, 0, 0, [], refused=f"cannot adapt a {qualified} layer{equation} (this "
                                                               f"backend adapts: {_ADAPTS})")


def model_layers(model: Any) -> list[Any]:
    """Every layer inside ``model`` (depth first, the model itself excluded), each once."""
    seen: set[int] = set()
    out = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if id(layer) not in seen:
            seen.add(id(layer))
            out.append(layer)
    return out


def own_name(model: Any, layer: Any) -> str:
    path: str = layer.path or layer.name
    root = (model.name or "") + "/"
    if path.startswith(root):
        path = path[len(root):]
    return path.replace("/", ".")


def resolve_layer(model: Any, target: Any, path: str) -> tuple[Any, bool]:
    """The Keras layer a ``module_map`` value names (a layer, its path or its name); ``(layer, reverse)``."""
    import keras

    if isinstance(target, keras.layers.Layer):
        return target, False
    name = str(target)
    reverse = False
    if name.endswith(":reverse"):
        name, reverse = name[: -len(":reverse")], True
    layers = model_layers(model)
    for attr in ("path", "name"):
        found = [l for l in layers if getattr(l, attr, None) == name or
                 (attr == "path" and own_name(model, l) == name.replace("/", "."))]
        if len(found) == 1:
            return found[0], reverse
        if len(found) > 1:
            raise TargetNotFoundError(f"module_map sends {path!r} to {name!r}, which names {len(found)} layers",
                                      key=path, hint="use the layer's full path (layer.path), which is unique")
    raise TargetNotFoundError(f"module_map sends {path!r} to {name!r}, but the model has no such layer",
                              key=path, hint="use a layer path from [l.path for l in model._flatten_layers()]")


def parameter_variables(layer: Any) -> dict[str, Any]:
    """The variables a hand-built Keras layer holds as public attributes, 2-D or 3-D, in assignment order: what
    ``target_parameters`` can adapt on a layer ``module_map`` names, each read as the transformers parameter of the
    same name, in its layout (``[out, in]`` or ``[E, out, in]``, not transposed).

    >>> import keras
    >>> parameter_variables(keras.layers.Dense(2))
    {}
    """
    return {name: value for name, value in vars(layer).items()
            if not name.startswith("_") and isinstance(value, _keras().Variable) and len(value.shape) in (2, 3)}
