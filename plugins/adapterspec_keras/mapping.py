"""Which Keras layer (and which slice of its kernel) each spec module path stands for.

The spec names modules as PEFT and transformers do (``"model.layers.0.self_attn.q_proj"``); a Keras
model names its layers its own way (``"transformer_layer_0/self_attention/query"``) and may lay a
weight out differently: keras-hub's attention kernels are ``(hidden, heads, head_dim)`` einsum
kernels, GPT-2's fused ``c_attn`` becomes three layers. A :class:`ModuleSite` records, for one spec
module, every :class:`Piece` -- Keras layer plus the index maps from its kernel's input and output
positions to the spec module's flattened ``in_features``/``out_features`` -- so the adapter math
can run on the Keras layers exactly as PEFT runs it on the torch module.

Three sources, in order of precedence:

1. ``LoadOptions.module_map``: spec path -> Keras layer (its ``path``, its ``name`` or the layer).
2. Built-in: for keras-hub models of every architecture keras-hub converts from transformers, the
   mapping is *derived* by running keras-hub's own converter (``convert_weights``) against a
   recording loader: each ``port_weight(variable, hf_key, hook)`` tells which HF weight feeds which
   Keras variable, and running ``hook`` on index probes tells how (transpose, reshape, slice).
3. Any other Keras model: its own layers, named by their Keras path with ``/`` read as ``.``.

>>> sites = spec_sites(causal_lm, LoadOptions())                        # doctest: +SKIP
>>> sites["transformer.h.0.attn.c_attn"].pieces[1].layer.path           # doctest: +SKIP
'transformer_layer_0/self_attention/key'
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adapterspec import LoadOptions
from adapterspec.errors import TargetNotFoundError

__all__ = [
    "BASE_MODEL_PREFIX",
    "ModuleSite",
    "Piece",
    "backbone_of",
    "converter_sites",
    "find_site",
    "layer_site",
    "model_layers",
    "spec_sites",
]

#: transformers' ``base_model_prefix`` per ``model_type``: the attribute of a ``*ForCausalLM`` (or other
#: head model) holding the base model, i.e. the first segment of PEFT module paths on such a model.
BASE_MODEL_PREFIX: dict[str, str] = {
    "albert": "albert", "bart": "model", "bert": "bert", "distilbert": "distilbert", "esm": "esm",
    "gemma": "model", "gemma2": "model", "gemma3": "model", "gemma3_text": "model", "gemma3n": "model",
    "gemma4": "model", "gemma4_text": "model", "gpt2": "transformer", "gpt_oss": "model", "llama": "model",
    "mistral": "model", "mixtral": "model", "qwen2": "model", "qwen2_moe": "model", "qwen3": "model",
    "qwen3_moe": "model", "qwen3_5": "model", "qwen3_5_moe": "model", "roberta": "roberta",
    "smollm3": "model", "t5gemma": "model", "t5gemma2": "model", "xlm-roberta": "roberta",
    "vit": "vit", "deit": "deit", "dinov2": "dinov2", "dinov3_vit": "model", "swin": "swin",
}

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
    """

    layer: Any
    kind: str
    in_index: np.ndarray
    out_index: np.ndarray
    input_spec: str = ""
    kernel_spec: str = ""
    output_spec: str = ""

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
            return self.layer.embeddings if self.tied else self.layer.reverse_embeddings
        if self.kind == "embedding":
            return self.layer.embeddings
        return self.layer.kernel

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
    """

    path: str
    kind: str
    in_features: int
    out_features: int
    pieces: list[Piece] = field(default_factory=list)
    source: str = "layers"

    @property
    def conv_spatial(self) -> tuple[int, ...]:
        """The kernel's spatial size (conv sites), ``()`` otherwise."""
        if self.kind != "conv":
            return ()
        return tuple(int(d) for d in self.pieces[0].layer.kernel.shape[:-2])


# --------------------------------------------------------------------------------------------------
# Pieces of plain Keras layers


def _keras() -> Any:
    import keras

    return keras


def _split_equation(equation: str) -> tuple[str, str, str]:
    inputs, output = equation.replace(" ", "").split("->")
    input_spec, kernel_spec = inputs.split(",")
    return input_spec, kernel_spec, output


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
    letters = lambda spec: set(spec.replace(".", ""))  # noqa: E731
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


def model_layers(model: Any) -> list[Any]:
    """Every layer inside ``model`` (depth first, the model itself excluded), each once."""
    seen: set[int] = set()
    out = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if id(layer) not in seen:
            seen.add(id(layer))
            out.append(layer)
    return out


def _own_name(model: Any, layer: Any) -> str:
    path = layer.path or layer.name
    root = (model.name or "") + "/"
    if path.startswith(root):
        path = path[len(root):]
    return path.replace("/", ".")


def _layer_sites(model: Any) -> dict[str, ModuleSite]:
    sites: dict[str, ModuleSite] = {}
    for layer in model_layers(model):
        site = layer_site(_own_name(model, layer), layer)
        if site is not None:
            sites.setdefault(site.path, site)
    return sites


# --------------------------------------------------------------------------------------------------
# Deriving the mapping from keras-hub's transformers converters


@dataclass
class _Record:
    key: str
    variable: Any
    hook: Callable[..., Any] | None


class _Opaque:
    """What the recording loader's ``get_tensor`` returns: absorbs any array operation, assigns nothing."""

    shape = ()
    ndim = 0
    T = property(lambda self: self)

    def __array_function__(self, func, types, args, kwargs):  # type: ignore[no-untyped-def]
        return _Opaque()

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):  # type: ignore[no-untyped-def]
        return _Opaque()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *a, **k: _Opaque()

    def __getitem__(self, item: Any) -> _Opaque:
        return _Opaque()

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def _op(self, *args: Any) -> _Opaque:
        return _Opaque()

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _op
    __matmul__ = __rmatmul__ = __neg__ = __pow__ = _op


class _RecordingLoader(contextlib.AbstractContextManager):
    """Stands in for keras-hub's ``SafetensorLoader``: records ``port_weight`` calls, reads nothing."""

    def __init__(self) -> None:
        self.records: list[_Record] = []
        self.prefix = ""
        self.safetensor_config = None
        self.preset = None

    def port_weight(self, keras_variable: Any, hf_weight_key: str, hook_fn: Callable[..., Any] | None = None) -> None:
        self.records.append(_Record(hf_weight_key, keras_variable, hook_fn))

    def get_tensor(self, hf_weight_key: str) -> Any:
        return _Opaque()

    def get_prefixed_key(self, hf_weight_key: str, dict_like: Any) -> str:
        return hf_weight_key

    def __exit__(self, *exc: Any) -> None:
        return None


_ASSIGN_LOCK = threading.Lock()


@contextlib.contextmanager
def _no_assign() -> Iterator[None]:
    """Make every Keras variable assignment a no-op: a converter's own ``.assign`` must not touch the model."""
    from keras.src.backend.common.variables import Variable

    names = ("assign", "assign_add", "assign_sub")
    with _ASSIGN_LOCK:
        saved = {n: Variable.__dict__.get(n) for n in names}
        try:
            for n in names:
                setattr(Variable, n, lambda self, value: self)
            yield
        finally:
            for n, fn in saved.items():
                setattr(Variable, n, fn)


def _converter_table() -> dict[str, tuple[Any, list[str]]]:
    """keras-hub's transformers converters: module name -> (module, the model types it handles).

    Read from keras-hub's own dispatch (``TransformersPresetLoader``), so new converters come in by themselves.
    """
    from keras_hub.src.utils.transformers import preset_loader

    source = inspect.getsource(preset_loader.TransformersPresetLoader.__init__)
    model_types = re.findall(r'"([A-Za-z0-9_.-]+)"', source)
    table: dict[str, tuple[Any, list[str]]] = {}
    for model_type in dict.fromkeys(model_types):
        loader = preset_loader.TransformersPresetLoader.__new__(preset_loader.TransformersPresetLoader)
        loader.config = {"model_type": model_type}
        loader.preset = None
        try:
            preset_loader.TransformersPresetLoader.__init__(loader, None, {"model_type": model_type})
        except Exception:  # noqa: BLE001 - a string that is not a model type
            continue
        module = loader.converter
        table.setdefault(module.__name__, (module, []))[1].append(model_type)
    return table


_TABLE_CACHE: dict[str, tuple[Any, list[str]]] = {}


def _converters() -> dict[str, tuple[Any, list[str]]]:
    if not _TABLE_CACHE:
        _TABLE_CACHE.update(_converter_table())
    return _TABLE_CACHE


class _ConfigProxy(dict):  # type: ignore[type-arg]
    """The few transformers config fields some ``convert_weights`` read, rebuilt from the backbone."""

    _FROM_BACKBONE = {"n_embd": "hidden_dim", "hidden_size": "hidden_dim", "num_hidden_layers": "num_layers",
                      "num_attention_heads": "num_query_heads", "tie_word_embeddings": "tie_word_embeddings"}

    def __init__(self, backbone: Any, model_type: str) -> None:
        super().__init__(model_type=model_type)
        for hf_key, attr in self._FROM_BACKBONE.items():
            if hasattr(backbone, attr):
                self[hf_key] = getattr(backbone, attr)


def backbone_of(model: Any) -> Any:
    """The keras-hub backbone of a task model (``model.backbone``), or the model itself."""
    backbone = getattr(model, "backbone", None)
    return backbone if backbone is not None else model


def _find_converter(backbone: Any) -> tuple[Any, list[str]] | None:
    """The converter of the most specific backbone class ``backbone`` is an instance of."""
    mro = type(backbone).__mro__
    found = [(mro.index(m.backbone_cls), m, types) for m, types in _converters().values()
             if isinstance(getattr(m, "backbone_cls", None), type) and isinstance(backbone, m.backbone_cls)]
    if not found:
        return None
    _, module, model_types = min(found, key=lambda f: f[0])
    return module, model_types


def _record(backbone: Any) -> tuple[list[_Record], str] | None:
    found = _find_converter(backbone)
    if found is None:
        return None
    module, model_types = found
    best: tuple[tuple[int, int], list[_Record], str] | None = None
    for model_type in model_types:
        loader = _RecordingLoader()
        try:
            with _no_assign():
                module.convert_weights(backbone, loader, _ConfigProxy(backbone, model_type))
        except Exception:  # noqa: BLE001 - the converter does not fit this backbone with this model type
            continue
        # the model type porting the most weights fits best; on a tie, the shortest HF names (a text-only
        # Gemma 3 is "model.layers...", not the multimodal "model.language_model.layers...")
        rank = (-len(loader.records), sum(len(r.key) for r in loader.records))
        if best is None or rank < best[0]:
            best = (rank, loader.records, model_type)
    return None if best is None else (best[1], best[2])


def _variable_owners(backbone: Any) -> dict[int, tuple[Any, str]]:
    """id(kernel-like variable) -> (layer, piece kind)."""
    owners: dict[int, tuple[Any, str]] = {}
    for layer in [backbone, *model_layers(backbone)]:
        kind = layer_kind(layer)
        if kind == "embedding":
            owners[id(layer.embeddings)] = (layer, "embedding")
            reverse = None if getattr(layer, "tie_weights", True) else getattr(layer, "reverse_embeddings", None)
            if reverse is not None:
                owners[id(reverse)] = (layer, "reverse")
        elif kind is not None and not (kind == "einsum" and not _einsum_supported(layer)):
            kernel = getattr(layer, "kernel", None)
            if kernel is not None:
                owners[id(kernel)] = (layer, kind)
    return owners


def _probe(hook: Callable[..., Any] | None, hf_shape: tuple[int, int], keras_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """Row and column (of the HF tensor) each Keras kernel element comes from, or ``None`` if ``hook`` does not fit."""
    rows = np.broadcast_to(np.arange(hf_shape[0], dtype=np.float64)[:, None], hf_shape).copy()
    cols = np.broadcast_to(np.arange(hf_shape[1], dtype=np.float64)[None, :], hf_shape).copy()
    out = []
    for probe in (rows, cols):
        try:
            value = probe if hook is None else hook(probe, list(keras_shape))
            value = np.asarray(value)
        except Exception:  # noqa: BLE001 - wrong guess of the HF shape
            return None
        if tuple(value.shape) != tuple(keras_shape):
            return None
        out.append(value)
    return out[0], out[1]


def _decode(rows: np.ndarray, cols: np.ndarray, kin: tuple[int, ...], kout: tuple[int, ...],
            in_is_rows: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """Separate the probes into an input index (over ``kin``) and an output index (over ``kout``)."""
    in_probe, out_probe = (rows, cols) if in_is_rows else (cols, rows)
    perm = kin + kout
    in_shape = tuple(rows.shape[i] for i in kin)
    out_shape = tuple(rows.shape[i] for i in kout)
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    in2 = np.transpose(in_probe, perm).reshape(n_in, n_out)
    out2 = np.transpose(out_probe, perm).reshape(n_in, n_out)
    if not (np.all(in2 == in2[:, :1]) and np.all(out2 == out2[:1, :])):
        return None
    in_index = in2[:, 0].astype(np.int64)
    out_index = out2[0, :].astype(np.int64)
    if len(np.unique(in_index)) != n_in or len(np.unique(out_index)) != n_out:
        return None
    return in_index.reshape(in_shape), out_index.reshape(out_shape)


_PROBE_CACHE: dict[Any, Any] = {}


def _hook_key(hook: Callable[..., Any] | None) -> Any:
    if hook is None:
        return None
    cells: tuple[Any, ...] = ()
    for cell in getattr(hook, "__closure__", None) or ():
        try:
            value = cell.cell_contents
            hash(value)
        except (ValueError, TypeError):
            return id(hook)  # not cacheable by value
        if callable(value):
            value = _hook_key(value)
        cells += (value,)
    return (getattr(hook, "__code__", id(hook)), cells)


def _solve(records: list[tuple[_Record, Any, str]]) -> tuple[str, int, int, list[Piece]] | None:
    """The site of one HF weight, from the Keras kernels it feeds: try HF shapes [out, in] and [in, out]."""
    shapes = []
    for record, layer, kind in records:
        shape = tuple(int(d) for d in record.variable.shape)
        kin, kout = _axes(kind, layer, shape)
        shapes.append((shape, kin, kout))
    n_ins = {math.prod(s[i] for i in kin) for s, kin, _ in shapes}
    if len(n_ins) != 1:
        return None
    n_in = n_ins.pop()
    total_out = sum(math.prod(s[i] for i in kout) for s, _, kout in shapes)
    for in_is_rows in (False, True):  # torch Linear [out, in] first; Conv1D / embedding [in, out]
        hf_shape = (n_in, total_out) if in_is_rows else (total_out, n_in)
        pieces = []
        for (record, layer, kind), (shape, kin, kout) in zip(records, shapes):
            cache_key = (_hook_key(record.hook), hf_shape, shape, kin, kout, in_is_rows)
            decoded = _PROBE_CACHE.get(cache_key, False) if cache_key[0] is not None or record.hook is None else False
            if decoded is False:
                probes = _probe(record.hook, hf_shape, shape)
                decoded = None if probes is None else _decode(*probes, kin, kout, in_is_rows)
                if isinstance(cache_key[0], tuple) or record.hook is None:
                    _PROBE_CACHE[cache_key] = decoded
            if decoded is None:
                break
            pieces.append(_make_piece(layer, kind, *decoded))
        else:
            covered = np.concatenate([p.out_index.ravel() for p in pieces])
            if len(np.unique(covered)) != covered.size:
                continue
            module_kind = "embedding" if pieces[0].kind == "embedding" else "linear"
            return module_kind, n_in, total_out, pieces
    return None


def _solve_conv(record: _Record, layer: Any) -> list[Piece] | None:
    shape = tuple(int(d) for d in record.variable.shape)
    hf_shape = (shape[-1], shape[-2], *shape[:-2])
    probe = np.arange(math.prod(hf_shape), dtype=np.float64).reshape(hf_shape)
    try:
        value = np.asarray(probe if record.hook is None else record.hook(probe, list(shape)))
    except Exception:  # noqa: BLE001
        return None
    spatial = tuple(range(2, len(hf_shape)))
    if value.shape != shape or not np.array_equal(value, np.transpose(probe, (*spatial, 1, 0))):
        return None
    return [_make_piece(layer, "conv", np.arange(shape[-2]), np.arange(shape[-1]))]


_SITE_CACHE: weakref.WeakKeyDictionary[Any, tuple[dict[str, ModuleSite], str | None]] = weakref.WeakKeyDictionary()


def converter_sites(backbone: Any) -> tuple[dict[str, ModuleSite], str | None]:
    """The sites keras-hub's transformers converter implies for ``backbone``, keyed by the converter's HF names.

    :returns: ``({hf module path: site}, model_type)``; ``({}, None)`` when keras-hub has no converter
        for this backbone class (or it could not be replayed).

    >>> sites, model_type = converter_sites(llama_backbone)              # doctest: +SKIP
    >>> model_type, sites["model.layers.0.self_attn.q_proj"].pieces[0].layer.path  # doctest: +SKIP
    ('llama', 'transformer_layer_0/self_attention/query')
    """
    cached = _SITE_CACHE.get(backbone)
    if cached is not None:
        return cached
    recorded = _record(backbone)
    if recorded is None:
        result: tuple[dict[str, ModuleSite], str | None] = ({}, None)
        _SITE_CACHE[backbone] = result
        return result
    records, model_type = recorded
    owners = _variable_owners(backbone)
    groups: dict[str, list[tuple[_Record, Any, str]]] = {}
    for record in records:
        owner = owners.get(id(record.variable))
        if owner is None or not record.key.endswith(".weight"):
            continue
        groups.setdefault(record.key[: -len(".weight")], []).append((record, *owner))
    sites: dict[str, ModuleSite] = {}
    for path, group in groups.items():
        if group[0][2] == "conv":
            pieces = _solve_conv(group[0][0], group[0][1]) if len(group) == 1 else None
            if pieces:
                p = pieces[0]
                sites[path] = ModuleSite(path, "conv", p.n_in, p.n_out, pieces, "converter")
            continue
        solved = _solve(group)
        if solved is not None:
            kind, n_in, n_out, pieces = solved
            sites[path] = ModuleSite(path, kind, n_in, n_out, pieces, "converter")
    _add_tied_head(backbone, sites)
    result = (sites, model_type)
    _SITE_CACHE[backbone] = result
    return result


def _add_tied_head(backbone: Any, sites: dict[str, ModuleSite]) -> None:
    """A tied ``ReversibleEmbedding`` also computes the logits: that is transformers' ``lm_head``."""
    if "lm_head" in sites or any(p.kind == "reverse" for s in sites.values() for p in s.pieces):
        return
    for site in list(sites.values()):
        piece = site.pieces[0]
        if piece.kind == "embedding" and getattr(piece.layer, "tie_weights", False):
            head = layer_site("lm_head", piece.layer, reverse=True, source="converter")
            if head is not None:
                sites["lm_head"] = head
            return


# --------------------------------------------------------------------------------------------------
# Spec names


def _spec_name(hf_path: str, prefix: str | None, task_model: bool) -> str:
    """The spec path of a converter key: PEFT names modules relative to the model it wrapped."""
    if not prefix or hf_path.split(".")[0] == "lm_head":
        return hf_path
    has = hf_path.startswith(prefix + ".")
    if task_model:
        return hf_path if has else f"{prefix}.{hf_path}"
    return hf_path[len(prefix) + 1:] if has else hf_path


def _resolve_layer(model: Any, target: Any, path: str) -> tuple[Any, bool]:
    """The Keras layer a ``module_map`` value names (a layer, its path or its name); ``(layer, reverse)``."""
    keras = _keras()
    if isinstance(target, keras.layers.Layer):
        return target, False
    name = str(target)
    reverse = False
    if name.endswith(":reverse"):
        name, reverse = name[: -len(":reverse")], True
    layers = model_layers(model)
    for attr in ("path", "name"):
        found = [l for l in layers if getattr(l, attr, None) == name or
                 (attr == "path" and _own_name(model, l) == name.replace("/", "."))]
        if len(found) == 1:
            return found[0], reverse
        if len(found) > 1:
            raise TargetNotFoundError(f"module_map sends {path!r} to {name!r}, which names {len(found)} layers",
                                      key=path, hint="use the layer's full path (layer.path), which is unique")
    raise TargetNotFoundError(f"module_map sends {path!r} to {name!r}, but the model has no such layer",
                              key=path, hint="use a layer path from [l.path for l in model._flatten_layers()]")


def spec_sites(model: Any, options: LoadOptions | None = None) -> dict[str, ModuleSite]:
    """Every spec module path ``model`` can take an adapter on, with its site, in model order.

    ``options.module_map`` (a dict, or a callable returning ``None`` for "not mapped") comes first;
    then the built-in mapping derived from keras-hub's converter (keras-hub models); else the
    model's own layers. A callable is asked about every path the other two sources know.

    >>> list(spec_sites(model))[:2]                                      # doctest: +SKIP
    ['model.embed_tokens', 'model.layers.0.self_attn.q_proj']
    """
    module_map = options.module_map if options is not None else None
    backbone = backbone_of(model)
    hf_sites, model_type = converter_sites(backbone)
    sites: dict[str, ModuleSite] = {}
    if hf_sites:
        prefix = BASE_MODEL_PREFIX.get(model_type or "")
        task_model = backbone is not model
        ordered = sorted(hf_sites.items(), key=lambda kv: kv[0].split(".")[0] == "lm_head")
        for hf_path, site in ordered:
            name = _spec_name(hf_path, prefix, task_model)
            sites[name] = ModuleSite(name, site.kind, site.in_features, site.out_features, site.pieces, site.source)
    else:
        sites = _layer_sites(model)
    if module_map is None:
        return sites
    if callable(module_map):
        mapped = {p: module_map(p) for p in sites}
        mapped = {p: v for p, v in mapped.items() if v is not None}
    else:
        mapped = dict(module_map)
    out: dict[str, ModuleSite] = {}
    for path, target in mapped.items():
        layer, reverse = _resolve_layer(model, target, path)
        site = layer_site(path, layer, reverse=reverse, source="module_map")
        if site is None:
            from adapterspec.errors import UnsupportedError

            raise UnsupportedError(f"module_map sends {path!r} to a {type(layer).__name__}, which adapters cannot wrap",
                                   key=path, hint="map it to a Dense, EinsumDense, Embedding or Conv layer")
        out[path] = site
    for path, site in sites.items():
        out.setdefault(path, site)
    return out


def _equivalent(a: str, b: str) -> bool:
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def find_site(sites: dict[str, ModuleSite], path: str) -> ModuleSite | None:
    """The site of spec path ``path``: exact, else the one site whose path equals it up to a leading prefix.

    Adapters trained on ``GPT2Model`` name ``h.0.attn.c_attn`` what on ``GPT2LMHeadModel`` is
    ``transformer.h.0.attn.c_attn``; both find the same site.

    :raises TargetNotFoundError: the path fits several sites.
    """
    if path in sites:
        return sites[path]
    found = [s for p, s in sites.items() if _equivalent(p, path)]
    if len(found) > 1:
        raise TargetNotFoundError(f"module {path!r} fits several layers: {[s.path for s in found]}", key=path,
                                  hint="pass module_map={spec path: keras layer path} to say which")
    return found[0] if found else None
