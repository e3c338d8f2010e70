"""The built-in mapping of keras-hub models, derived from keras-hub's own transformers converters.

For every architecture keras-hub converts from transformers (``keras_hub/src/utils/transformers/convert_*.py``),
its ``convert_weights(backbone, loader, config)`` is replayed against a recording loader: each
``port_weight(variable, hf_key, hook)`` says which HF weight feeds which Keras variable, and running
``hook`` on index probes says how (transpose, reshape, slice, even a cast). Nothing is read from disk
and nothing is assigned: the model is untouched. New converters come in by themselves.

>>> sites, model_type = converter_sites(llama_backbone)              # doctest: +SKIP
>>> model_type, sites["model.layers.0.self_attn.q_proj"].pieces[0].layer.path  # doctest: +SKIP
('llama', 'transformer_layer_0/self_attention/query')
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from adapterspec.errors import UnsupportedError

from .sites import (
    ModuleSite,
    Piece,
    _axes,
    _einsum_supported,
    _make_piece,
    base_variable,
    keras_lora,
    layer_kind,
    layer_site,
    model_layers,
    packed,
)

__all__ = ["backbone_of", "converter_sites", "head_sites", "multimodal", "text_only"]


@dataclass
class _Record:
    key: str
    variable: Any
    hook: Callable[..., Any] | None


class _PackedWeight:
    """What reading ``kernel``/``embeddings`` of a layer stored packed (int4, GPTQ, AWQ: :func:`packed`) gives a
    converter while it is replayed: the property unpacks the weight into a new tensor at each read, which no recorded
    ``port_weight`` could be traced back to its layer, and unpacking every layer of a large model costs its size again.

    This stand-in is the same object at each read of one layer's weight (so a record names its layer), has the
    weight's logical shape and dtype, and unpacks the weight only when a converter uses its values.
    """

    def __init__(self, layer: Any, read: Callable[[], Any]) -> None:
        self.layer = layer
        self._read = read
        self.shape = _unpacked_shape(layer, read)

    @property
    def dtype(self) -> Any:
        return self._read().dtype

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self._read(), dtype=dtype)

    def assign(self, value: Any) -> _PackedWeight:
        loader = getattr(_REPLAYING, "loader", None)
        if loader is not None:
            loader.note_assign(self, value)
        return self

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy/pickle protocols and the like: not the weight's
            raise AttributeError(name)
        return getattr(self._read(), name)


def _unpacked_shape(layer: Any, read: Callable[[], Any]) -> tuple[int, ...]:
    """The shape of a packed layer's weight as its property returns it, from the layer's own record of it where
    Keras keeps one (int4 Dense and Embedding: ``_orig_output_dim``; EinsumDense: ``original_kernel_shape``), else
    by unpacking it once."""
    stored = getattr(layer, "_embeddings", None) if layer_kind(layer) == "embedding" else getattr(layer, "_kernel", None)
    mode = getattr(layer, "quantization_mode", None)
    if mode == "int4" and stored is not None and len(stored.shape) == 2 and isinstance(getattr(layer, "_orig_output_dim", None), int):
        return (int(stored.shape[0]), int(layer._orig_output_dim))
    original = getattr(layer, "original_kernel_shape", None) if mode == "int4" else None
    if isinstance(original, (tuple, list)) and all(isinstance(d, int) for d in original):
        return tuple(original)
    return tuple(int(d) for d in read().shape)


class _Opaque:
    """What the recording loader's ``get_tensor`` returns: absorbs any array operation, assigns nothing."""

    shape = ()
    ndim = 0
    T = property(lambda self: self)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> _Opaque:
        return _Opaque()

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> _Opaque:
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
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __pow__ = __rpow__ = __matmul__ = __rmatmul__ = _op
    __and__ = __rand__ = __or__ = __ror__ = __xor__ = __rxor__ = __lshift__ = __rshift__ = _op
    __rlshift__ = __rrshift__ = __lt__ = __le__ = __gt__ = __ge__ = __neg__ = __pos__ = __abs__ = __invert__ = _op


class _Field(_Opaque):
    """What the field probe returns for transformers config field ``name`` (absorbs arithmetic like ``_Opaque``)."""

    def __init__(self, name: str) -> None:
        self.name = name


class _FieldProbe(dict[str, Any]):
    """A transformers config whose every field is a :class:`_Field`, fed to ``convert_backbone_config``."""

    def __getitem__(self, key: Any) -> _Field:
        return _Field(str(key))

    def get(self, key: Any, default: Any = None) -> _Field:
        return _Field(str(key))

    def __contains__(self, key: object) -> bool:
        return True


class _RecordingLoader(contextlib.AbstractContextManager["_RecordingLoader"]):
    """Stands in for keras-hub's ``SafetensorLoader``: records ``port_weight`` calls, reads nothing."""

    def __init__(self) -> None:
        self.records: list[_Record] = []
        self.prefix = ""
        self.safetensor_config = None
        self.preset = None
        #: keys read by ``get_tensor`` since the last variable assignment, and each variable a converter assigned
        #: itself (outside ``port_weight``) with the keys read before it (Swin: q, k, v then the fused kernel)
        self.reads: list[str] = []
        self.assigned: list[tuple[Any, list[str]]] = []
        #: id(layer) -> the stand-in its packed weight property returned (:class:`_PackedWeight`), one per layer
        self.packed: dict[int, _PackedWeight] = {}

    def port_weight(self, keras_variable: Any, hf_weight_key: str, hook_fn: Callable[..., Any] | None = None) -> None:
        self.records.append(_Record(hf_weight_key, keras_variable, hook_fn))

    def get_tensor(self, hf_weight_key: str) -> Any:
        self.reads.append(hf_weight_key)
        return _Opaque()

    def note_assign(self, variable: Any, value: Any = None) -> None:
        self.assigned.append((variable, self.reads))
        self.reads = []

    def get_prefixed_key(self, hf_weight_key: str, dict_like: Any) -> str:
        return hf_weight_key

    def __exit__(self, *exc: Any) -> None:
        return None


class _ProbingLoader(_RecordingLoader):
    """A second replay for the kernels a converter fuses itself: ``get_tensor`` of a probed key returns that
    key's probe (every element its own integer), and the value assigned to a watched variable is kept."""

    def __init__(self, probes: dict[str, np.ndarray], watched: set[int]) -> None:
        super().__init__()
        self.probes = probes
        self.watched = watched
        self.values: dict[int, np.ndarray] = {}

    def get_tensor(self, hf_weight_key: str) -> Any:
        probe = self.probes.get(hf_weight_key)
        return _Opaque() if probe is None else probe.copy()

    def note_assign(self, variable: Any, value: Any = None) -> None:
        if id(variable) in self.watched and value is not None and not isinstance(value, _Opaque):
            try:
                self.values[id(variable)] = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):  # not an array: the layout stays unknown (refused)
                pass


_ASSIGN_LOCK = threading.Lock()
_REPLAYING = threading.local()  # the recording loader whose converter runs now (notes its own assignments)


#: the arithmetic a converter may do between a Keras variable and a tensor it read (XLM-RoBERTa adds one)
_VARIABLE_OPS = ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
                 "__pow__", "__rpow__", "__matmul__", "__rmatmul__")


def _opaque_aware(fn: Callable[..., Any]) -> Callable[..., Any]:
    def op(self: Any, other: Any) -> Any:
        return _Opaque() if isinstance(other, _Opaque) else fn(self, other)
    return op


@contextlib.contextmanager
def _no_assign() -> Iterator[None]:
    """Make every Keras variable assignment a no-op: a converter's own ``.assign`` must not touch the model;
    arithmetic between a variable and a recorded (opaque) tensor gives an opaque tensor."""
    from keras.src.backend.common.variables import Variable

    names = ("assign", "assign_add", "assign_sub")
    with _ASSIGN_LOCK:
        saved = {n: Variable.__dict__.get(n) for n in (*names, *_VARIABLE_OPS)}
        try:
            def assign(self: Any, value: Any) -> Any:
                loader = getattr(_REPLAYING, "loader", None)
                if loader is not None:
                    loader.note_assign(self, value)
                return self

            for n in names:
                setattr(Variable, n, assign)
            for n in _VARIABLE_OPS:
                setattr(Variable, n, _opaque_aware(getattr(Variable, n)))
            yield
        finally:
            for n, fn in saved.items():
                if fn is None:
                    delattr(Variable, n)
                else:
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


def _backbone_fields(module: Any, backbone: Any) -> tuple[dict[str, Any], str]:
    """The transformers config fields the converter's ``convert_backbone_config`` passes on unchanged, with
    their values read back from the backbone's config: ``({field: value}, why some may be missing)``.

    ``convert_backbone_config`` maps the transformers config to the backbone's arguments; fed a probe whose
    every field is a :class:`_Field`, the arguments that come out as a ``_Field`` name the field they hold.
    """
    convert = getattr(module, "convert_backbone_config", None)
    if convert is None:
        return {}, f"{module.__name__} has no convert_backbone_config"
    try:
        arguments = convert(_FieldProbe())
    except Exception as exc:  # noqa: BLE001 - reported in the error of any field then missing
        return {}, f"{module.__name__}.convert_backbone_config could not be inverted ({type(exc).__name__}: {exc})"
    config = backbone.get_config()
    fields = {v.name: config[k] for k, v in (arguments or {}).items() if isinstance(v, _Field) and k in config}
    return fields, f"the {type(backbone).__name__} config does not hold it"


class _ConfigProxy(dict[str, Any]):
    """The transformers config fields ``convert_weights`` reads, rebuilt from the backbone: a few by name, the
    others from the backbone's config where ``convert_backbone_config`` passes them on (:func:`_backbone_fields`)."""

    _FROM_BACKBONE = {"n_embd": "hidden_dim", "hidden_size": "hidden_dim", "num_hidden_layers": "num_layers",
                      "num_attention_heads": "num_query_heads", "tie_word_embeddings": "tie_word_embeddings"}

    def __init__(self, backbone: Any, model_type: str, module: Any = None) -> None:
        super().__init__(model_type=model_type)
        self._fields, self._why = _backbone_fields(module, backbone) if module is not None else ({}, "")
        for hf_key, attr in self._FROM_BACKBONE.items():
            if hasattr(backbone, attr):
                self[hf_key] = getattr(backbone, attr)

    def __missing__(self, key: Any) -> Any:
        if key in self._fields:
            return self._fields[key]
        raise KeyError(f"transformers config field {key!r} ({self._why})")

    def add_sub_config(self, backbone: Any, module: Any, field: str, attr: str) -> None:
        """``self[field] = {"model_type": t}`` where the backbone's ``attr`` sub-model is of the model type ``t``
        that the converter tells apart (``model_type == "opt"`` in its source) and that its class is named after
        (BLIP-2's ``text_config``: ``BLIP2CustomOPT`` is ``opt``)."""
        sub = getattr(backbone, attr, None)
        if sub is None or module is None:
            return
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError):
            return
        name = type(sub).__name__.lower()
        found = [t for t in dict.fromkeys(re.findall(r'model_type\s*==\s*"([A-Za-z0-9_-]+)"', source)) if t in name]
        if len(found) == 1:
            self[field] = {"model_type": found[0]}

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self or key in self._fields else default


def backbone_of(model: Any) -> Any:
    """The keras-hub backbone of a task model (``model.backbone``), or the model itself."""
    backbone = getattr(model, "backbone", None)
    return backbone if backbone is not None else model


def _find_converter(backbone: Any) -> tuple[Any, list[str]] | None:
    """The converter of the most specific backbone class ``backbone`` is an instance of."""
    if sys.modules.get("keras_hub") is None:  # no keras-hub class was ever made: a plain Keras model (or no keras-hub)
        return None
    mro = type(backbone).__mro__
    found = [(mro.index(m.backbone_cls), m, types) for m, types in _converters().values()
             if isinstance(getattr(m, "backbone_cls", None), type) and isinstance(backbone, m.backbone_cls)]
    if not found:
        return None
    _, module, model_types = min(found, key=lambda f: f[0])
    return module, model_types


def text_only(model_type: str) -> bool:
    """transformers' model types of a multimodal model's text part alone (``gemma3_text``, ``gemma4_text``)."""
    return model_type.endswith("_text")


def multimodal(backbone: Any) -> bool:
    """A backbone holding an image or audio encoder (keras-hub's Gemma 3/3n/4 and Qwen3.5 without one are text-only;
    PaliGemma's is its ``vit_encoder``)."""
    return any(getattr(backbone, attr, None) is not None for attr in ("vision_encoder", "vit_encoder", "audio_encoder"))


@contextlib.contextmanager
def _base_weights() -> Iterator[None]:
    """While this thread replays a converter, ``kernel``/``embeddings`` of a layer with Keras' own LoRA on read
    the variable (:func:`~adapterspec_keras.sites.base_variable`), not the weight plus the LoRA delta (a new
    tensor at each read, which no ``port_weight`` could be traced back to its layer). Call under ``_ASSIGN_LOCK``."""
    import keras

    patched = [(cls, name, cls.__dict__[name]) for cls, name in (
        (keras.layers.Dense, "kernel"), (keras.layers.EinsumDense, "kernel"), (keras.layers.Embedding, "embeddings"))
        if isinstance(cls.__dict__.get(name), property)]

    def reader(name: str, original: property) -> property:
        def read(layer: Any) -> Any:
            loader = getattr(_REPLAYING, "loader", None)
            if loader is not None and packed(layer):
                stand_in = loader.packed.get(id(layer))
                if stand_in is None:
                    stand_in = loader.packed[id(layer)] = _PackedWeight(layer, lambda: original.fget(layer))  # type: ignore[misc]
                return stand_in
            if loader is not None and keras_lora(layer):
                return getattr(layer, "_" + name)
            return original.fget(layer)  # type: ignore[misc]
        return property(read, original.fset, original.fdel, original.__doc__)

    try:
        for cls, name, original in patched:
            setattr(cls, name, reader(name, original))
        yield
    finally:
        for cls, name, original in patched:
            setattr(cls, name, original)


def _replay(backbone: Any, module: Any, model_type: str, loader: _RecordingLoader) -> None:
    """Run the converter's ``convert_weights`` against ``loader``, assigning nothing."""
    with _no_assign(), _base_weights():
        config = _ConfigProxy(backbone, model_type, module)
        config.add_sub_config(backbone, module, "text_config", "language_model")
        _REPLAYING.loader = loader
        try:
            module.convert_weights(backbone, loader, config)
        finally:
            _REPLAYING.loader = None


def _record(backbone: Any) -> tuple[list[_Record], str] | None:
    found = _find_converter(backbone)
    if found is None:
        return None
    module, model_types = found
    best: tuple[tuple[int, bool, int], list[_Record], str] | None = None
    failures: list[tuple[str, Exception]] = []
    for model_type in model_types:
        loader = _RecordingLoader()
        try:
            _replay(backbone, module, model_type, loader)
        except Exception as exc:  # noqa: BLE001 - kept: an error unless another model type of it replays
            failures.append((model_type, exc))
            continue
        # the model type porting the most weights fits best; on a tie, a multimodal backbone takes the
        # multimodal model type (gemma3 and gemma3_text record the same weights: the vision encoder's too), a
        # text-only one the shortest HF names ("model.layers...", not "model.language_model.layers...")
        rank = (-len(loader.records), text_only(model_type) and multimodal(backbone),
                sum(len(r.key) for r in loader.records))
        if best is None or rank < best[0]:
            best = (rank, loader.records, model_type)
            _FUSED[backbone] = loader.assigned
            _PACKED_READS[backbone] = list(loader.packed.values())
    if best is None:
        first = failures[0][1]
        causes = "; ".join(f"model_type {t!r}: {type(e).__name__}: {e}" for t, e in failures)
        raise UnsupportedError(
            f"keras-hub's converter {module.__name__} could not be replayed on this {type(backbone).__name__}, so "
            f"the transformers module names of its layers are unknown ({causes})", key=type(backbone).__name__,
            hint="pass module_map={spec module path: keras layer path} for every target, and report this "
                 "converter to adapterspec") from first
    return best[1], best[2]


def _with_packed(owners: dict[int, tuple[Any, str]], stand_ins: Iterable[_PackedWeight]) -> dict[int, tuple[Any, str]]:
    """``owners`` with the stand-ins a replay read for packed weights (each its layer's, :class:`_PackedWeight`)."""
    for stand_in in stand_ins:
        kind = layer_kind(stand_in.layer)
        if kind is not None and not (kind == "einsum" and not _einsum_supported(stand_in.layer)):
            owners[id(stand_in)] = (stand_in.layer, kind)
    return owners


def _variable_owners(backbone: Any) -> dict[int, tuple[Any, str]]:
    """id(kernel-like variable) -> (layer, piece kind)."""
    owners: dict[int, tuple[Any, str]] = {}
    for layer in [backbone, *model_layers(backbone)]:
        kind = layer_kind(layer)
        if kind == "embedding":
            owners[id(base_variable(layer))] = (layer, "embedding")
            reverse = None if getattr(layer, "tie_weights", True) else getattr(layer, "reverse_embeddings", None)
            if reverse is not None:
                owners[id(reverse)] = (layer, "reverse")
        elif kind is not None and not (kind == "einsum" and not _einsum_supported(layer)):
            kernel = base_variable(layer) if getattr(layer, "built", False) else None
            if kernel is not None:
                owners[id(kernel)] = (layer, kind)
    return owners


_DIGIT = 256  # integers below 256 survive any cast a hook may do (bfloat16 keeps 8 bits)


def _probe(hook: Callable[..., Any] | None, hf_shape: tuple[int, ...], keras_shape: tuple[int, ...]) -> np.ndarray | None:
    """For each Keras kernel element, the flat index of the HF tensor element ``hook`` puts there, or ``None``
    if ``hook`` does not fit that HF shape.

    The indices go through the hook once as integers (:func:`_probe_at_once`); where that does not come back as
    indices (a hook that casts to a float too narrow for them, takes floats only, computes, or gives a kernel of
    another size than the HF weight, as a slice does), they go through as base-256 digits, so that hooks that cast
    keep them exact (keras-hub's Mistral converter casts to float16; bfloat16 keeps integers below 256).
    """
    at_once = _probe_at_once(hook, hf_shape, keras_shape)
    return at_once if at_once is not None else _probe_by_digits(hook, hf_shape, keras_shape)


def _probe_at_once(hook: Callable[..., Any] | None, hf_shape: tuple[int, ...],
                   keras_shape: tuple[int, ...]) -> np.ndarray | None:
    """:func:`_probe` in one pass of the hook over the indices themselves (``int32`` where they fit), or ``None``
    unless what comes back is indices: the same integer type, each in range (no cast can have changed them; what
    they mean is :func:`_decode`'s check, or :func:`_solve_conv`'s), or floats that are exactly each index once.

    That is the answer the digit probe gives for such a hook, in a fraction of its time and memory (a Llama-7B
    ``gate_proj``: one pass over 45M ``int32`` indices, where the digits take four passes over ``float32``,
    ``float64`` and ``int64`` copies): the first load of an adapter into a large keras-hub model probes each
    distinct converter hook once. A cast too narrow for the indices rounds some of them onto others, so it never
    passes for a rearrangement.
    """
    size = math.prod(hf_shape)
    if size != math.prod(keras_shape):
        return None
    index = np.arange(size, dtype=np.int32 if size < 2**31 else np.int64).reshape(hf_shape)
    try:
        value = np.asarray(index if hook is None else hook(index, list(keras_shape)))
    except Exception:  # noqa: BLE001 - a hook that takes floats only, or a wrong guess of the HF shape
        return None
    if tuple(value.shape) != tuple(keras_shape) or value.dtype.kind not in "iuf":
        return None
    if size and (value.min() < 0 or value.max() >= size):
        return None
    if value.dtype == index.dtype:  # integers through: no cast can have rounded them
        return value
    flat = value.astype(index.dtype)
    if value.dtype.kind == "f" and not np.array_equal(flat, value):  # a float that is no index (or NaN)
        return None
    seen = np.zeros(size, dtype=bool)
    seen[flat.ravel()] = True
    return flat if seen.all() else None


def _probe_by_digits(hook: Callable[..., Any] | None, hf_shape: tuple[int, ...],
                     keras_shape: tuple[int, ...]) -> np.ndarray | None:
    """:func:`_probe` with the indices passed through ``hook`` as base-256 digits, one pass per digit."""
    total = np.zeros(keras_shape, dtype=np.int64)
    scale, rest = 1, np.arange(math.prod(hf_shape), dtype=np.int64).reshape(hf_shape)
    while True:
        digit = (rest % _DIGIT).astype(np.float32)
        try:
            value = np.asarray(digit if hook is None else hook(digit, list(keras_shape)))
        except Exception:  # noqa: BLE001 - wrong guess of the HF shape
            return None
        if tuple(value.shape) != tuple(keras_shape):
            return None
        total += np.asarray(value, dtype=np.float64).astype(np.int64) * scale
        rest, scale = rest // _DIGIT, scale * _DIGIT
        if not rest.any():
            return total


def _decode(flat: np.ndarray, hf_columns: int, kin: tuple[int, ...], kout: tuple[int, ...],
            in_is_rows: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """Separate a probe (each Keras kernel element's flat HF index, ``row * hf_columns + column``) into an input
    index (over the kernel's axes ``kin``) and an output index (over ``kout``), or ``None`` unless every element is
    exactly their combination, each index once (the HF rows the output, or with ``in_is_rows`` the input).

    The indices are read off one slice each and the whole probe compared with their combination: two passes over
    it, whatever its size (a Llama-7B ``gate_proj`` has 45M elements).
    """
    grid = np.transpose(flat, kin + kout)  # a view: [*in axes, *out axes]
    in_shape, out_shape = grid.shape[: len(kin)], grid.shape[len(kin):]
    first_out: tuple[Any, ...] = (*(slice(None),) * len(kin), *(0,) * len(kout))
    at_first_out, at_first_in = grid[first_out], grid[(0,) * len(kin)]
    if in_is_rows:
        in_index, out_index = at_first_out // hf_columns, at_first_in % hf_columns
        rebuilt = in_index.reshape(*in_shape, *(1,) * len(kout)) * hf_columns + out_index
    else:
        in_index, out_index = at_first_out % hf_columns, at_first_in // hf_columns
        rebuilt = out_index * hf_columns + in_index.reshape(*in_shape, *(1,) * len(kout))
    if not np.array_equal(grid, rebuilt):
        return None
    if len(np.unique(in_index)) != in_index.size or len(np.unique(out_index)) != out_index.size:
        return None
    # copies (a view would keep the whole probe alive in _PROBE_CACHE), 0-d arrays over no axes
    return np.array(in_index, dtype=np.int64), np.array(out_index, dtype=np.int64)


_PROBE_CACHE: dict[Any, tuple[np.ndarray, np.ndarray] | None] = {}


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


def _solve(records: list[tuple[_Record, Any, str]]) -> tuple[str, int, int, list[Piece], bool] | None:
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
            decoded: tuple[np.ndarray, np.ndarray] | None | Literal[False] = _PROBE_CACHE.get(cache_key, False) if cache_key[0] is not None or record.hook is None else False
            if decoded is False:
                flat = _probe(record.hook, hf_shape, shape)
                decoded = None if flat is None else _decode(flat, hf_shape[1], kin, kout, in_is_rows)
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
            return module_kind, n_in, total_out, pieces, in_is_rows
    return None


def _solve_conv(record: _Record, layer: Any) -> list[Piece] | None:
    shape = tuple(int(d) for d in record.variable.shape)
    hf_shape = (shape[-1], shape[-2], *shape[:-2])
    flat = _probe(record.hook, hf_shape, shape)
    spatial = tuple(range(2, len(hf_shape)))
    expected = np.transpose(np.arange(math.prod(hf_shape)).reshape(hf_shape), (*spatial, 1, 0))
    if flat is None or not np.array_equal(flat, expected):
        return None
    return [_make_piece(layer, "conv", np.arange(shape[-2]), np.arange(shape[-1]))]


#: per backbone, the variables its converter assigned itself and the HF keys it read for each (see _RecordingLoader)
_FUSED: weakref.WeakKeyDictionary[Any, list[tuple[Any, list[str]]]] = weakref.WeakKeyDictionary()
#: per backbone, the stand-ins of packed weights its converter's replay read (:class:`_PackedWeight`)
_PACKED_READS: weakref.WeakKeyDictionary[Any, list[_PackedWeight]] = weakref.WeakKeyDictionary()

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
    owners = _with_packed(_variable_owners(backbone), _PACKED_READS.pop(backbone, []))
    sites = _solve_records(records, owners)
    _add_tied_head(backbone, sites)
    _add_fused(backbone, owners, sites, model_type)
    result = (sites, model_type)
    _SITE_CACHE[backbone] = result
    return result


def _solve_records(records: list[_Record], owners: dict[int, tuple[Any, str]]) -> dict[str, ModuleSite]:
    """The sites of recorded ``port_weight`` calls: each HF weight's Keras layer and index maps (by probes)."""
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
            kind, n_in, n_out, pieces, in_rows = solved
            sites[path] = ModuleSite(path, kind, n_in, n_out, pieces, "converter", hf_conv1d=in_rows and kind == "linear")
    return sites


_HEAD_CACHE: weakref.WeakKeyDictionary[Any, dict[str, ModuleSite]] = weakref.WeakKeyDictionary()


def head_sites(model: Any) -> dict[str, ModuleSite]:
    """The sites of the layers a keras-hub *task* model holds outside its backbone and that keras-hub's converter
    ports itself (its ``convert_head``: ViT's classifier, the Gemma 4 assistant's ``pre_projection`` and
    ``post_projection``), keyed by their HF names -- already the transformers task model's module paths, which
    PEFT uses (``pre_projection``, not ``model.pre_projection``).

    Every converter of the backbone's class that has a ``convert_head`` is replayed on ``model`` (Gemma 4's and
    its assistant's share ``Gemma4Backbone``; only the assistant's ports a head, and only onto an assistant):
    the ones that fail on this task model port nothing to it.

    :returns: ``{hf module path: site}``; ``{}`` for a backbone, or a task without a head converter.

    >>> sorted(head_sites(assistant))                                    # doctest: +SKIP
    ['post_projection', 'pre_projection']
    """
    backbone = backbone_of(model)
    if backbone is model or sys.modules.get("keras_hub") is None:
        return {}
    cached = _HEAD_CACHE.get(model)
    if cached is not None:
        return dict(cached)
    heads = [(m, types) for m, types in _converters().values() if callable(getattr(m, "convert_head", None))
             and isinstance(getattr(m, "backbone_cls", None), type) and isinstance(backbone, m.backbone_cls)]
    owners = _variable_owners(model)
    sites: dict[str, ModuleSite] = {}
    for module, model_types in heads:
        loader = _RecordingLoader()
        with _no_assign(), _base_weights():
            _REPLAYING.loader = loader
            try:
                module.convert_head(model, loader, _ConfigProxy(backbone, model_types[0], module))
            except Exception:  # noqa: BLE001 - another task's head (no such layer on this model): nothing ported
                continue
            finally:
                _REPLAYING.loader = None
        for path, site in _solve_records(loader.records, _with_packed(dict(owners), loader.packed.values())).items():
            sites.setdefault(path, site)
    _HEAD_CACHE[model] = sites
    return dict(sites)


def _add_fused(backbone: Any, owners: dict[int, tuple[Any, str]], sites: dict[str, ModuleSite],
               model_type: str | None) -> None:
    """Modules a converter fuses into one kernel itself (``get_tensor`` + ``np.concatenate`` + ``assign``: Swin's
    query, key and value): each gets a site on its own columns of the fused Dense kernel (a :class:`Piece` with
    ``out_slice``), found by replaying the converter once more with probe tensors (:func:`_fused_pieces`). A
    fusion whose layout the probes do not pin down gives refused sites naming the layer, so a target on them is
    an error, never skipped."""
    fused = [(variable, keys) for variable, keys in _FUSED.get(backbone, [])
             if id(variable) in owners and len([k for k in keys if k.endswith(".weight")]) >= 2]
    if not fused:
        return
    solved = _fused_pieces(backbone, owners, fused, model_type)
    for variable, keys in fused:
        layer = owners[id(variable)][0]
        weights = [k[: -len(".weight")] for k in keys if k.endswith(".weight")]
        pieces = solved.get(id(variable))
        if pieces is not None:
            for path, piece in zip(weights, pieces):
                sites.setdefault(path, ModuleSite(path, "linear", piece.n_in, piece.n_out, [piece], "converter"))
            continue
        why = (f"keras-hub's {model_type} converter fuses {weights} into the kernel of {type(layer).__name__} "
               f"{layer.path!r} itself (get_tensor + concatenate + assign) in a layout this backend could not "
               "resolve into column ranges of a Dense kernel, one per projection")
        for path in weights:
            sites.setdefault(path, ModuleSite(path, "linear", 0, 0, [], "converter", refused=why))


def _fused_pieces(backbone: Any, owners: dict[int, tuple[Any, str]], fused: list[tuple[Any, list[str]]],
                  model_type: str | None) -> dict[int, list[Piece]]:
    """id(fused kernel) -> one piece per fused weight (in the order the converter read them).

    The converter is replayed with each fused weight read as a probe of shape ``[n_out / n, n_in]`` (a torch
    ``Linear``, the kernel's outputs shared equally) whose elements are their own flat index (offset per
    weight), and each bias likewise. The kernel it assigns then says, column by column, which weight and which
    output row feeds it; a layout that is not one contiguous column range per weight (each column one output
    row, each kernel row one input feature) -- or a bias not laid out like the kernel -- is not resolved.
    """
    found = _find_converter(backbone)
    if found is None or model_type is None:
        return {}
    probes: dict[str, np.ndarray] = {}
    shapes: dict[int, tuple[int, int, int]] = {}
    watched: set[int] = set()
    for variable, keys in fused:
        layer, kind = owners[id(variable)]
        weights = [k for k in keys if k.endswith(".weight")]
        shape = tuple(int(d) for d in variable.shape)
        if kind != "dense" or len(shape) != 2 or shape[1] % len(weights):
            continue
        n_in, per = shape[0], shape[1] // len(weights)
        shapes[id(variable)] = (n_in, per, len(weights))
        watched.add(id(variable))
        for i, key in enumerate(weights):
            probes[key] = np.arange(per * n_in, dtype=np.float64).reshape(per, n_in) + i * per * n_in
            probes[key[: -len(".weight")] + ".bias"] = np.arange(per, dtype=np.float64) + i * per
        bias = getattr(layer, "bias", None)
        if bias is not None:
            watched.add(id(bias))
    if not shapes:
        return {}
    loader = _ProbingLoader(probes, watched)
    try:
        _replay(backbone, found[0], model_type, loader)
    except Exception:  # noqa: BLE001 - it replayed once already; anything else leaves the fusion refused
        return {}
    out: dict[int, list[Piece]] = {}
    for variable, _ in fused:
        if id(variable) not in shapes:
            continue
        layer = owners[id(variable)][0]
        bias = getattr(layer, "bias", None)
        pieces = _decode_fused(layer, loader.values.get(id(variable)), *shapes[id(variable)],
                               None if bias is None else loader.values.get(id(bias), np.empty(0)))
        if pieces is not None:
            out[id(variable)] = pieces
    return out


def _decode_fused(layer: Any, kernel: np.ndarray | None, n_in: int, per: int, count: int,
                  bias: np.ndarray | None) -> list[Piece] | None:
    """The pieces of the ``count`` weights a probed fused kernel holds (see :func:`_fused_pieces`), or ``None``."""
    if kernel is None or kernel.shape != (n_in, per * count) or not np.array_equal(kernel, np.round(kernel)):
        return None
    which, local = np.divmod(kernel.astype(np.int64), per * n_in)
    row, column = np.divmod(local, n_in)
    if not (np.all(which == which[:1]) and np.all(row == row[:1]) and np.all(column == column[:, :1])):
        return None
    in_index = column[:, 0]
    if not np.array_equal(np.sort(in_index), np.arange(n_in)):
        return None
    pieces = []
    for i in range(count):
        columns = np.flatnonzero(which[0] == i)
        out_index = row[0, columns]
        if columns.size != per or not np.array_equal(columns, np.arange(columns[0], columns[0] + per)) or \
                not np.array_equal(np.sort(out_index), np.arange(per)):
            return None
        start = int(columns[0])
        if bias is not None and (bias.shape != (per * count,) or
                                 not np.array_equal(bias[start:start + per], out_index + i * per)):
            return None
        pieces.append(Piece(layer, "dense", in_index.copy(), out_index.copy(), out_slice=(start, start + per)))
    return pieces


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


