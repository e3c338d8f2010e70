"""The adapter layers: one wrapper per adapted module, holding any number of named adapters.

:class:`AdapterLayer` wraps ``nn.Linear``, ``nn.Embedding``, ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``
and transformers' ``Conv1D`` and runs PEFT's math exactly (LoRA, rsLoRA, DoRA, lora_bias, IA3, LoHa,
LoKr). :class:`ModulesToSaveLayer` holds one full copy of a module per adapter (``modules_to_save``).
Parameters are addressed by the spec's names (``lora_A.weight``, ``lora_magnitude_vector``...), so
canonical keys come from them directly.

When one module holds adapters of several methods, a forward pass applies IA3's input scaling, the
base layer, IA3's output scaling, then adds the LoRA/LoHa/LoKr terms in the active order (PEFT puts
one method on a module at a time; for one method this is PEFT's computation). Mixes whose result would
depend on the order -- IA3, OFT/BOFT or DoRA with another method, two copies of a module saved whole, two
adapters replacing one token row -- are refused when activated or merged (``running_of`` feeds the SDK's
:func:`~adapterspec._mix.mix_refusal`).

>>> import torch
>>> from adapterspec import AdapterConfig, LoadOptions
>>> cfg = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q"], "r": 2})
>>> layer = AdapterLayer(torch.nn.Linear(8, 4))
>>> layer.add_adapter("default", cfg, "q", LoadOptions())
>>> sorted(layer.adapter_params("default"))
['lora_A.weight', 'lora_B.weight']
"""

from __future__ import annotations

import functools
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from adapterspec import AdapterConfig, LoadOptions
from adapterspec._lora_init import factor_rank, frozen_params
from adapterspec._merge import rounds_delta_first
from adapterspec._method_checks import factorization
from adapterspec._mix import SAVED_WHOLE, TOKEN_ROWS, Running
from adapterspec.errors import UnsupportedError
from adapterspec.naming import TRAINABLE_TOKENS_PARAM

from . import adalora, beft, c3a, delora, gralora, hra, miss, oft, road, vblora, vera
from ._keys import adapter_of, slot
from .computed import check_writable, copy_module, current, store
from .devices import UPCAST_DTYPES, adapter_target_of, as_dtype
from .offload import check_not_offloaded, onloaded
from .quantized import dense_weight, quantization, readable, weight_shape

__all__ = ["TOKENS", "ActiveSet", "AdapterLayer", "ModulesToSaveLayer", "PendingParam", "check_supported", "layer_kind",
           "linear_in_features", "param_shapes"]

#: The pseudo-method of trainable token rows (LoRA's ``trainable_token_indices``) inside an :class:`AdapterLayer`.
TOKENS = "TOKENS"

_global_forward_hooks = torch.nn.modules.module._global_forward_hooks  # a dict torch keeps: its emptiness is read
_global_backward_hooks = torch.nn.modules.module._global_backward_hooks  # full backward hooks wrap the output in
_global_backward_pre_hooks = torch.nn.modules.module._global_backward_pre_hooks  # a view: no in-place add on it

_CONV_KINDS = ("conv1d", "conv2d", "conv3d")
_ATTR = {"lora_A.weight": "lora_A_weight", "lora_B.weight": "lora_B_weight", "lora_B.bias": "lora_B_bias"}
_LINEAR_KINDS = ("linear", "conv1d_hf")
_SUPPORTED = {
    "LORA": ("linear", "conv1d_hf", "embedding", *_CONV_KINDS),
    "IA3": ("linear", "conv1d_hf", "conv2d", "conv3d"),
    "LOHA": ("linear", "conv1d", "conv2d"),
    "LOKR": ("linear", "conv1d", "conv2d"),
    "OFT": ("linear", "conv2d"),
    "BOFT": ("linear", "conv2d"),
    "ADALORA": adalora.KINDS,
    "VERA": vera.KINDS,
    "ROAD": road.KINDS,
    "MISS": miss.KINDS,
    "HRA": hra.KINDS,
    "VBLORA": vblora.KINDS,
    "C3A": c3a.KINDS,  # SPEC.md 17.7
    "GRALORA": gralora.KINDS,  # SPEC.md 17.5
    "DELORA": delora.KINDS,  # SPEC.md 17.6
    "BEFT": beft.KINDS,  # SPEC.md 17.8
}


@functools.cache
def _hf_conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d_hf"`` (transformers Conv1D), ``"embedding"``, ``"conv1d"``, ``"conv2d"``,
    ``"conv3d"``, or ``None`` for a layer kind this backend does not adapt.

    >>> layer_kind(torch.nn.Conv2d(1, 1, 3)), layer_kind(torch.nn.ReLU())
    ('conv2d', None)
    """
    if isinstance(module, nn.Linear):  # the common case first: no other kind subclasses Linear
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv3d):
        return "conv3d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    conv1d_hf = _hf_conv1d_type()
    if conv1d_hf is not None and isinstance(module, conv1d_hf):
        return "conv1d_hf"
    return None


#: transformers' ``nn.Linear`` subclasses whose ``forward`` returns a tuple, not annotated as such: MoE routers that
#: return their top-k scores with their logits (Llama 4). Others are found by their annotation (:func:`returns_tuple`).
_TUPLE_LAYERS = frozenset({"Llama4Router", "PhimoeTopKRouter"})


_RETURNS_TUPLE: dict[type, bool] = {}  # returns_tuple's answers (one class is asked once per adapted module)


def returns_tuple(cls: type) -> bool:
    """Whether layers of class ``cls`` return a tuple from ``forward`` rather than one tensor (an MoE router's scores
    and logits), so that no adapter's term can be added to their output: a known router class
    (``Llama4Router``, ``PhimoeTopKRouter``), or a ``forward`` annotated to return a tuple.

    >>> class Router(torch.nn.Linear):
    ...     def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ...         return super().forward(x), x
    >>> returns_tuple(Router), returns_tuple(torch.nn.Linear)
    (True, False)
    """
    known = _RETURNS_TUPLE.get(cls)
    if known is None:
        annotation = getattr(getattr(cls, "forward", None), "__annotations__", {}).get("return")
        if isinstance(annotation, str):
            known = annotation.removeprefix("typing.").startswith(("tuple", "Tuple"))
        else:
            known = annotation is tuple or typing.get_origin(annotation) is tuple
        known = _RETURNS_TUPLE[cls] = known or cls.__name__ in _TUPLE_LAYERS
    return known


def check_supported(module: nn.Module, path: str, config: AdapterConfig) -> None:
    """Refuse a layer this backend cannot adapt with ``config``'s method.

    :raises UnsupportedError: naming ``path`` and the layer type.

    >>> from adapterspec import AdapterConfig
    >>> check_supported(torch.nn.ReLU(), "act", AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["act"]}))
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: act: ...
    """
    kind = layer_kind(module)
    method = config.peft_type
    allowed = _SUPPORTED.get(method, ())
    if kind not in allowed:
        raise UnsupportedError(
            f"{method} cannot adapt a {type(module).__module__}.{type(module).__qualname__} layer "
            f"(this backend adapts: {', '.join(allowed) or 'nothing'})", key=path,
            hint="remove the module from target_modules (or exclude it with exclude_modules)")
    if returns_tuple(type(module)):
        raise UnsupportedError(
            f"a {type(module).__module__}.{type(module).__qualname__} returns a tuple from its forward (an MoE "
            "router's scores and logits), not one tensor an adapter's output could be added to; PEFT's forward "
            "fails on it too", key=path,
            hint="leave the router out of target_modules (or exclude it with exclude_modules); to adapt its weight, "
                 "name the parameter in target_parameters (e.g. 'router.weight')")
    if method in oft.METHODS:
        oft.check(module, kind, path, config)
    if method in hra.METHODS:
        hra.check(module, kind, path, config)
    if method in adalora.METHODS:
        adalora.check(module, kind, path, config)
    if method in road.METHODS:
        road.check(module, path, config)
    if method in miss.METHODS:
        miss.check(module, kind, path, config)
    if method in vblora.METHODS:
        vblora.check(module, kind, path, config)
    if method in c3a.METHODS:
        c3a.check(module, kind, path, config)
    if method in gralora.METHODS:
        gralora.check(module, kind, path, config)
    if method in delora.METHODS:
        delora.check(module, kind, path, config)
    if method == "LORA" and config.get("velora_config") is not None and kind not in _LINEAR_KINDS:
        raise UnsupportedError(f"VeLoRA (velora_config) adapts Linear layers only, not a {type(module).__qualname__}; "
                               "PEFT refuses it too", key=path, pointer="/velora_config",
                               hint="set velora_config to null, or remove the module from target_modules")
    quantized = quantization(module) if kind != "linear" else None  # embeddings are refused: SPEC.md 6.8
    if quantized is not None:
        raise UnsupportedError(f"this {type(module).__qualname__}'s weight is quantized ({quantized}); the torch "
                               "backend runs adapters on quantized Linear layers only", key=path,
                               hint="load the adapter onto the unquantized model")
    if method == "LORA" and config.get("use_dora") and not readable(module):
        raise UnsupportedError(f"DoRA reads the base weight's values, and this layer's weight is quantized "
                               f"({quantization(module)}) in a way the torch backend cannot dequantize "
                               "(it reads bitsandbytes' 4-bit and 8-bit weights)", key=path,
                               hint="load the adapter onto the unquantized model")
    if method == "LORA" and kind == "embedding" and config.get("lora_bias"):
        raise UnsupportedError("lora_bias is not supported on embedding layers (as in PEFT)", key=path,
                               hint="set lora_bias to false or do not target the embedding")
    if kind in _CONV_KINDS and method == "LORA":
        _check_lora_conv(_conv(module), path, config)
    if kind in _CONV_KINDS and method in _ZERO_PADDED:
        _check_padding_mode(_conv(module), path, method)


def _check_lora_conv(conv: nn.modules.conv._ConvNd, path: str, config: AdapterConfig) -> None:
    """Refuse a LoRA (or DoRA) convolution whose unmerged form is not its merged one: PEFT's ``lora_A`` is a conv with
    the base layer's kernel size, stride and padding but no dilation (SPEC.md 8.1), so a base layer that dilates its
    kernel computes one thing merged and another unmerged (or fails); the padding mode: :func:`_check_padding_mode`."""
    if config.rank_for(path) % conv.groups != 0:
        raise UnsupportedError(f"LoRA rank {config.rank_for(path)} is not divisible by the conv's groups={conv.groups}",
                               key=path, hint="choose a rank divisible by groups, or do not target this layer")
    if any(d != 1 and k != 1 for d, k in zip(conv.dilation, conv.kernel_size)):
        raise UnsupportedError(
            f"LoRA on a {type(conv).__qualname__} with dilation={tuple(conv.dilation)}: PEFT runs lora_A without the "
            "layer's dilation, so the adapter's unmerged and merged results differ (SPEC.md 8.1: refused)", key=path,
            hint="leave this layer out of target_modules (or exclude it with exclude_modules)")


#: The methods whose unmerged term on a convolution is a convolution with zero padding -- PEFT's ``lora_A``, or the
#: input convolved with the delta weight (LoHa, LoKr, AdaLoRA) -- and their names in messages.
_ZERO_PADDED = {"LORA": "LoRA", "LOHA": "LoHa", "LOKR": "LoKr", "ADALORA": "AdaLoRA"}


def _check_padding_mode(conv: nn.modules.conv._ConvNd, path: str, method: str) -> None:
    """Refuse a convolution that pads otherwise than with zeros (``padding_mode`` reflect, replicate, circular) for a
    method whose unmerged term PEFT computes with zero padding: merged, the layer pads the input for the delta as for
    its weight, so the two results differ (SPEC.md 8.1, 8.6, 8.7, 15.4). IA3 scales channels, which padding only
    copies: it stays exact."""
    if conv.padding_mode == "zeros":
        return
    term = "runs lora_A" if method == "LORA" else "convolves the input with the adapter's delta weight"
    raise UnsupportedError(
        f"{_ZERO_PADDED[method]} on a {type(conv).__qualname__} with padding_mode={conv.padding_mode!r}: PEFT {term} "
        "with zero padding, not the layer's padding mode, so the adapter's unmerged and merged results differ "
        "(SPEC.md 8.1: refused)", key=path,
        hint="leave this layer out of target_modules (or exclude it with exclude_modules)")


# torch types a module's attributes as ``Tensor | Module`` (its ``__getattr__``): these give the attributes of
# the layer class layer_kind's isinstance checks found.
def _peft_move_dtype(base: nn.Module) -> torch.dtype | None:
    """The dtype PEFT's ``_move_adapter_to_device_of_base_layer`` casts a new adapter's tensors to: that of the
    base layer's ``weight`` (or GPTQ ``qweight``; a ``MultiheadAttention``'s ``out_proj``), a bitsandbytes 4-bit
    layer's ``compute_dtype``; ``None`` where it is not a floating dtype (no cast)."""
    if isinstance(base, nn.MultiheadAttention):
        base = base.out_proj
    dtype = None
    for attr in ("weight", "qweight"):
        weight = getattr(base, attr, None)
        if weight is not None:
            dtype = weight.dtype
            break
    compute = getattr(base, "compute_dtype", None)
    if isinstance(compute, torch.dtype):
        dtype = compute
    return dtype if dtype is not None and (dtype.is_floating_point or dtype.is_complex) else None


def _weight(module: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)


def _conv(module: nn.Module) -> nn.modules.conv._ConvNd:
    return cast(nn.modules.conv._ConvNd, module)


def linear_in_features(layer: AdapterLayer) -> int | None:
    """The input features of an adapted Linear or transformers Conv1D (its weight's ``in``), ``None`` for other
    kinds (VeLoRA's state is sized by it, SPEC.md 5.2)."""
    return _in_out(layer.base_layer, layer.kind)[0] if layer.kind in _LINEAR_KINDS else None


def _in_out(module: nn.Module, kind: str | None) -> tuple[int, int]:
    if kind == "linear":
        linear = cast(nn.Linear, module)
        return linear.in_features, linear.out_features
    if kind == "conv1d_hf":
        return int(_weight(module).shape[0]), int(_weight(module).shape[1])
    if kind == "embedding":
        embedding = cast(nn.Embedding, module)
        return embedding.num_embeddings, embedding.embedding_dim
    return _conv(module).in_channels, _conv(module).out_channels


def param_shapes(module: nn.Module, config: AdapterConfig, path: str, *,
                 kind: str | None = None, rank: int | None = None) -> dict[str, tuple[int, ...]]:
    """The spec parameter names and shapes adapter ``config`` gives module ``path`` (PEFT's layout).

    :param kind: :func:`layer_kind` of ``module``, if the caller knows it.
    :param rank: ``config.rank_for(path)``, if the caller knows it.

    >>> from adapterspec import AdapterConfig
    >>> cfg = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q"], "r": 2})
    >>> param_shapes(torch.nn.Linear(8, 4), cfg, "q")
    {'lora_A.weight': (2, 8), 'lora_B.weight': (4, 2)}
    """
    kind = kind or layer_kind(module)
    method = config.peft_type
    in_f, out_f = _in_out(module, kind)
    if method == "LORA":
        r = config.rank_for(path) if rank is None else rank
        if kind in ("linear", "conv1d_hf"):
            r = factor_rank(config, r, in_f, out_f)
        shapes: dict[str, tuple[int, ...]]
        if kind == "embedding":
            shapes = {"lora_embedding_A": (r, in_f), "lora_embedding_B": (out_f, r)}
        elif kind in _CONV_KINDS:
            ones = (1,) * (_weight(module).dim() - 2)
            conv = _conv(module)
            shapes = {"lora_A.weight": (r, in_f, *conv.kernel_size), "lora_B.weight": (out_f, r // conv.groups, *ones)}
        else:
            shapes = {"lora_A.weight": (r, in_f), "lora_B.weight": (out_f, r)}
        if config.get("lora_bias"):
            shapes["lora_B.bias"] = (out_f,)
        if config.get("use_dora"):
            shapes["lora_magnitude_vector"] = (1, out_f) + (1,) * (_weight(module).dim() - 2) if kind in _CONV_KINDS else (out_f,)
        return shapes
    if method == "IA3":
        feedforward = config.is_feedforward(path)
        if kind in _CONV_KINDS:
            features = in_f if feedforward else out_f
            return {"ia3_l": (1, features) + (1,) * (_weight(module).dim() - 2)}
        return {"ia3_l": (1, in_f) if feedforward else (out_f, 1)}
    if method in oft.METHODS and kind is not None:
        return oft.shapes(module, kind, config, path)
    if method in adalora.METHODS and kind is not None:
        return adalora.shapes(module, kind, config, path)
    if method in vera.METHODS and kind is not None:
        return vera.shapes(module, kind, config)
    if method in road.METHODS:
        return road.shapes(module, config)
    if method in miss.METHODS and kind is not None:
        return miss.shapes(module, kind, config, path)
    if method in hra.METHODS and kind is not None:
        return hra.shapes(module, kind, config)
    if method in vblora.METHODS and kind is not None:
        return vblora.shapes(module, kind, config)
    if method in c3a.METHODS and kind is not None:
        return c3a.shapes(module, kind, config, path)
    if method in gralora.METHODS and kind is not None:
        return gralora.shapes(module, kind, config, path)
    if method in delora.METHODS:
        return delora.shapes(module, config, path)
    if method in beft.METHODS:
        return beft.shapes(module, config, path)
    shape = weight_shape(module, kind)
    effective = _effective_kernel(module, kind, config)
    if method == "LOHA":
        r = config.rank_for(path) if rank is None else rank
        if effective is not None:  # the CP form: a core tensor per factor, the factors [r, out] and [r, in / groups]
            cols = shape[1]
            return {"hada_w1_a": (r, out_f), "hada_w1_b": (r, cols), "hada_w2_a": (r, out_f), "hada_w2_b": (r, cols),
                    "hada_t1": (r, r, *effective), "hada_t2": (r, r, *effective)}
        cols = math.prod(shape[1:])
        return {"hada_w1_a": (out_f, r), "hada_w1_b": (r, cols), "hada_w2_a": (out_f, r), "hada_w2_b": (r, cols)}
    if method == "LOKR":
        r = config.rank_for(path) if rank is None else rank
        factor = int(config.get("decompose_factor", -1))
        in_dim = in_f // _conv(module).groups if kind in _CONV_KINDS else in_f
        in_m, in_n = factorization(in_dim, factor)
        out_l, out_k = factorization(out_f, factor)
        kernel = tuple(shape[2:])
        use_w1 = not (config.get("decompose_both", False) and r < max(out_l, in_m) / 2)
        use_w2 = r >= max(out_k, in_n) / 2 if kernel else not (r < max(out_k, in_n) / 2)
        shapes = {}
        if use_w1:
            shapes["lokr_w1"] = (out_l, in_m)
        else:
            shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (out_l, r), (r, in_m)
        if use_w2:
            shapes["lokr_w2"] = (out_k, in_n, *kernel)
        elif effective is not None:
            shapes["lokr_t2"], shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (r, r, *effective), (r, out_k), (r, in_n)
        else:
            shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (out_k, r), (r, in_n * math.prod(kernel))
        return shapes
    raise UnsupportedError(f"{method} does not adapt layers", key=path, hint="use a layer-adapting method")


def _effective_kernel(module: nn.Module, kind: str | None, config: AdapterConfig) -> tuple[int, int] | None:
    """LoHa/LoKr ``use_effective_conv2d``: the kernel of the CP core tensors (``(k, 1)`` for Conv1d), or ``None``
    when the plain form applies (not a conv layer, the flag off, or a kernel of size 1, as PEFT decides)."""
    if kind not in ("conv1d", "conv2d") or config.peft_type not in ("LOHA", "LOKR") \
            or not config.get("use_effective_conv2d"):
        return None
    kernel = tuple(_conv(module).kernel_size)
    if all(k == 1 for k in kernel):
        return None
    return (kernel[0], kernel[1]) if kind == "conv2d" else (kernel[0], 1)


def _writes_bias(spec: _Spec) -> bool:
    """Whether merging ``spec``'s adapter writes the base layer's bias (IA3 on outputs, LoRA's ``lora_bias``)."""
    return (spec.method == "IA3" and not spec.feedforward) or (spec.method == "LORA" and spec.lora_bias) \
        or spec.road_settings is not None or spec.method in beft.METHODS


#: The LyCORIS methods, whose training forward has PEFT's rank and module dropout.
_LYCORIS = ("LOHA", "LOKR")


def _rank_dropout(weight: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """PEFT's LyCORIS rank dropout of a delta weight: each output channel kept with probability ``1 - rank_dropout``
    (one draw per channel from the CPU generator, as PEFT draws them), the kept ones rescaled by ``1 / share kept``
    when ``rank_dropout_scale`` (LoHa always; its mask in the weight's dtype, LoKr's in float32)."""
    drop = (torch.rand(weight.size(0)) > spec.rank_dropout).to(weight.dtype if spec.method == "LOHA" else torch.float32)
    drop = drop.view(-1, *[1] * (weight.dim() - 1)).to(weight.device)
    if spec.rank_dropout_scale:
        drop = drop / drop.mean()
    return (weight * drop).to(weight.dtype)  # PEFT's in-place product keeps the weight's dtype


class _HadaWeight(torch.autograd.Function):
    """LoHa's ``((w1a @ w1b) * (w2a @ w2b)) * scale`` with PEFT 0.21's backward (its ``HadaWeight``): the same
    values as autograd's in float32, and PEFT's precision under autocast, where the backward recomputes the two
    products from the float32 factors (autograd's reused the half-precision ones: gradients up to 2e-4 off PEFT's on
    |g| 0.02). The effective-conv (CP) form keeps autograd: PEFT's custom backward there is not its gradient."""

    @staticmethod
    def forward(ctx: Any, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b, scale)
        return ((w1a @ w1b) * (w2a @ w2b)) * scale

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w1a, w1b, w2a, w2b, scale = ctx.saved_tensors
        grad = grads[0] * scale
        first = grad * (w2a @ w2b)
        second = grad * (w1a @ w1b)
        return first @ w1b.T, w1a.T @ first, second @ w2b.T, w2a.T @ second, None  # type: ignore[return-value]


def _cp_weight(core: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The CP reconstruction ``einsum("ijkl,ip,jr->prkl", core, left, right)`` of LoHa/LoKr's effective conv form."""
    return torch.einsum("i j k l, i p, j r -> p r k l", core, left, right)


def _transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


def _compile_module_state() -> Any:
    """A function returning a fresh copy of what ``nn.Module.__init__`` sets up (empty containers new, plain
    values shared), compiled to one dict literal from this torch version's own template: wrappers are made by
    the hundred when an adapter loads, and ``__init__``'s per-attribute ``__setattr__`` is most of their cost."""
    template = nn.Module().__dict__
    scope: dict[str, Any] = {"_TEMPLATE": template}
    items = []
    for i, (key, value) in enumerate(template.items()):
        if type(value) is dict and not value:
            items.append(f"{key!r}: {{}}")
        elif isinstance(value, (dict, set)) and not value:
            scope[f"_F{i}"] = type(value)
            items.append(f"{key!r}: _F{i}()")
        elif isinstance(value, (dict, set, list)):
            items.append(f"{key!r}: _TEMPLATE[{key!r}].copy()")
        else:
            items.append(f"{key!r}: _TEMPLATE[{key!r}]")
    exec("def _module_state():\n    return {" + ", ".join(items) + "}\n", scope)  # noqa: S102 - our own source
    return scope["_module_state"]


_module_state = _compile_module_state()


def _new_module(cls: type[nn.Module]) -> Any:
    module = cls.__new__(cls)
    object.__setattr__(module, "__dict__", _module_state())
    return module


class PendingParam(NamedTuple):
    """A parameter announced but not created yet: its shape, device, dtype and trainability.

    With ``options.initialize=False`` (``load_adapter``) injection creates no tensor: ``load_state`` makes
    each parameter from its loaded tensor (:meth:`_Weights.fill`), so no memory is allocated, initialised or
    copied twice. Until then the layer must not run (the adapter is not active).
    """

    shape: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    requires_grad: bool


def _kaiming(tensor: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


@dataclass(frozen=True)
class _Facts:
    """What every module of one adapter shares: read from its config once, not once per module."""

    method: str
    fixed: bool  # no rank_pattern / alpha_pattern: r and scaling are the same everywhere
    r: int
    scaling: float
    use_dora: bool
    lora_bias: bool
    dropout: float


_LAST_FACTS: tuple[AdapterConfig | None, _Facts | None] = (None, None)  # (config, facts): the modules of one adapter come one after another


def _facts(config: AdapterConfig) -> _Facts:
    global _LAST_FACTS
    last_config, facts = _LAST_FACTS
    if last_config is config and facts is not None:
        return facts
    method = config.peft_type
    ranked = method in ("LORA", "LOHA", "LOKR")
    fixed = ranked and not config.get("rank_pattern") and not config.get("alpha_pattern")
    facts = _Facts(method=method, fixed=fixed, r=config.rank_for("") if fixed else 0,
                   scaling=config.scaling_for("") if fixed else 0.0, use_dora=bool(config.get("use_dora")),
                   lora_bias=bool(config.get("lora_bias")), dropout=float(config.get("lora_dropout") or 0.0))
    _LAST_FACTS = (config, facts)
    return facts


@dataclass
class ActiveSet:
    """The names of the active adapters, shared by every layer of one model (switching is one assignment).

    >>> ActiveSet(("default",)).names
    ('default',)
    """

    names: tuple[str, ...] = ()


@dataclass
class _Spec:
    """What a layer needs to know about one of its adapters besides its tensors."""

    method: str
    r: int = 0
    scaling: float = 1.0
    use_dora: bool = False
    lora_bias: bool = False
    feedforward: bool = False
    dropout: float = 0.0
    rank_dropout: float = 0.0  # LOHA/LOKR: output channels of the delta dropped while training
    module_dropout: float = 0.0  # LOHA/LOKR: the whole adapter skipped while training
    rank_dropout_scale: bool = True  # LOHA always, LOKR when configured: the kept channels rescaled by 1/share
    names: dict[str, str] = field(default_factory=dict)  # spec parameter name -> attribute name
    indices: tuple[int, ...] = ()  # TOKENS: the rows replaced
    source: AdapterLayer | None = None  # TOKENS: the layer holding the rows, when tied to another layer's
    index: torch.Tensor | None = None  # TOKENS: ``indices`` as a tensor on the weight's device (cached)
    rotation: oft.Rotation | None = None  # OFT/BOFT: block layout and options
    shared: vera.Shared | None = None  # VERA: the adapter's shared projections (held by the model, not the layer)
    road_settings: road.Road | None = None  # ROAD: variant and group size
    block: miss.Block | None = None  # MISS: mode, r, mini_r, dropout
    reflections: hra.Reflections | None = None  # HRA: its rank and apply_GS
    circulant: bool | None = None  # C3A: set (True) for a C3A adapter, the field AdapterLayer._alone reads
    config: AdapterConfig | None = None  # VBLORA: r, num_vectors, vector_length, topk (SPEC.md 17.4)
    granular: gralora.Granular | None = None  # GRALORA: r, gralora_k, hybrid_r, scaling, dropout (SPEC.md 17.5)
    round_merge: bool = False  # PEFT rounds the delta to the weight's dtype before a merge adds it (SPEC.md 7.3)
    round_unmerge: bool = False  # ... before an unmerge subtracts it (else: the float32 delta, in place)


class _Weights(nn.Module):
    """The parameters of one adapter in one layer, registered under attribute-safe names (and, until
    ``load_state`` fills them, the :class:`PendingParam` of those not created yet, in ``pending``)."""

    def get(self, attr: str) -> torch.Tensor | None:
        return self._parameters.get(attr)

    def fill(self, attr: str, value: torch.Tensor, *, device: torch.device | None = None) -> nn.Parameter:
        """Make pending parameter ``attr`` from ``value`` (no copy when its device and dtype are right).

        :param device: ``value``'s device, if the caller knows it (asking the tensor costs more than the rest).
        """
        spec = self.__dict__["pending"].pop(attr)
        if value.dtype != spec.dtype or (device if device is not None else value.device) != spec.device:
            value = value.to(device=spec.device, dtype=spec.dtype)
        param = self._parameters[attr] = torch.Tensor._make_subclass(nn.Parameter, value, spec.requires_grad)
        return param


def _hooked(base: nn.Module) -> bool:
    """Whether a hook sees ``base``'s output, so LoRA may not be added into it in place: a forward hook would
    see the sum, not ``base(x)``; a full backward hook makes the output a view that autograd refuses to
    change in place."""
    return bool(base._forward_hooks or base._backward_hooks or base._backward_pre_hooks or _global_forward_hooks
                or _global_backward_hooks or _global_backward_pre_hooks)


class AdapterLayer(nn.Module):
    """A base layer plus named adapters; ``forward`` = base output plus the active adapters, PEFT's math.

    :param base_layer: the original module (kept as ``self.base_layer``, never copied).

    >>> layer = AdapterLayer(torch.nn.Linear(8, 4))
    >>> layer.adapter_names()
    []
    """

    _modules: dict[str, nn.Module]  # type: ignore[assignment]  # narrower than Module's: no child is None
    _caches: dict[str, torch.Tensor]
    _specs: dict[str, _Spec]

    def __init__(self, base_layer: nn.Module) -> None:
        self.__dict__.update(_module_state())  # nn.Module.__init__, faster
        kind = layer_kind(base_layer)
        if kind is None:
            raise UnsupportedError(f"cannot wrap a {type(base_layer).__qualname__} layer",
                                   hint="adapt Linear, Embedding, Conv1d/2d/3d or transformers Conv1D layers")
        self._modules["base_layer"] = base_layer
        weights = _new_module(nn.ModuleDict)
        self.__dict__["training"] = weights.__dict__["training"] = base_layer.training
        self._modules["adapter_weights"] = weights
        self.__dict__.update(
            kind=kind, fan_in_fan_out=kind == "conv1d_hf", _specs={}, _switch=ActiveSet(), _plan_key=None,
            _plan=([], [], [], []), _fast=None, _merged=[], _caches={}, _sharding=None, _path="")

    # -- attribute access falls through to the wrapped layer (weight, in_features, padding_idx...) --
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self._modules["base_layer"], name)

    # -- adapters -----------------------------------------------------------------------
    def add_adapter(self, name: str, config: AdapterConfig, path: str, options: LoadOptions, *,
                    checked: bool = False, shared: vera.Shared | None = None) -> None:
        """Create adapter ``name``'s parameters for module ``path``, initialised as ``config`` says
        (left uninitialised when ``options.initialize`` is false: the caller fills them next).

        Parameters go to ``options.device``/``options.dtype`` or the base layer's; they are trainable
        only if ``options.trainable``. The adapter is not activated.

        :param checked: :func:`check_supported` already passed for this layer and config.
        :param shared: VeRA: the adapter's shared projections (:class:`~adapterspec_torch.vera.Shared`).
        :raises UnsupportedError: the layer cannot take ``config``'s method (names ``path``).
        """
        base = self._modules["base_layer"]
        if not checked:
            check_supported(base, path, config)
        if not self._path:
            self.__dict__["_path"] = path
        facts = _facts(config)
        method = facts.method
        ranked = method in ("LORA", "LOHA", "LOKR")
        r = (facts.r if facts.fixed else config.rank_for(path)) if ranked else 0
        shapes = param_shapes(base, config, path, kind=self.kind, rank=r if ranked else None)
        weight = base._parameters.get("weight")
        if options.device is None and options.dtype is None and weight is not None and weight.is_floating_point() \
                and not weight.is_meta:
            device, dtype = weight.device, weight.dtype  # adapter_target_of's answer, without its lookups
            if dtype in UPCAST_DTYPES:
                dtype = torch.float32
        else:
            device, dtype = adapter_target_of(base, options)
        spec = _Spec(method=method)
        if ranked:
            spec.r = r
            spec.scaling = facts.scaling if facts.fixed else config.scaling_for(path)
        if method == "LORA":
            spec.use_dora, spec.lora_bias, spec.dropout = facts.use_dora, facts.lora_bias, facts.dropout
            embedding = self.kind == "embedding"
            spec.round_merge = rounds_delta_first(config, embedding=embedding, unmerge=False)
            spec.round_unmerge = rounds_delta_first(config, embedding=embedding, unmerge=True)
        elif method == "IA3":
            spec.feedforward = config.is_feedforward(path)
        elif method in _LYCORIS:
            spec.rank_dropout = float(config.get("rank_dropout") or 0.0)
            spec.module_dropout = float(config.get("module_dropout") or 0.0)
            spec.rank_dropout_scale = method == "LOHA" or bool(config.get("rank_dropout_scale"))
        elif method in oft.METHODS:
            spec.rotation = oft.settings(base, self.kind, config, path)
        elif method in hra.METHODS:
            spec.reflections = hra.settings(config)
        elif method in c3a.METHODS:
            spec.circulant = True
        elif method in adalora.METHODS:
            spec.scaling, spec.r = adalora.factors(config, path)
            spec.dropout = float(config.get("lora_dropout") or 0.0)
        elif method in vera.METHODS:
            if shared is None:
                raise UnsupportedError("a VeRA adapter needs its shared projections", key=path,
                                       hint="inject VeRA adapters with adapterspec.inject_adapter / load_adapter")
            spec.shared, spec.dropout = shared, float(config.get("vera_dropout") or 0.0)
        elif method in road.METHODS:
            spec.road_settings = road.settings(config)
        elif method in miss.METHODS:
            spec.block = self._miss_block(miss.settings(config), path)
        elif method in vblora.METHODS:
            if shared is None:
                raise UnsupportedError("a VB-LoRA adapter needs its shared vector bank", key=path,
                                       hint="inject VB-LoRA adapters with adapterspec.inject_adapter / load_adapter")
            spec.shared, spec.dropout = shared, float(config.get("vblora_dropout") or 0.0)
            spec.config = config
        elif method in gralora.METHODS:
            spec.granular = gralora.settings(config)
        elif method in delora.METHODS:  # SPEC.md 17.6: PEFT rounds the delta before a merge adds it, not an unmerge
            spec.r, spec.dropout = delora.rank(config, path), max(float(config.get("module_dropout") or 0.0), 0.0)
            spec.round_merge = True
        weights = _new_module(_Weights)
        trainable = bool(options.trainable)
        frozen = frozen_params(config) if method == "LORA" else frozenset()  # MiCA: PEFT never trains lora_B
        if method in delora.METHODS:
            frozen = delora.FROZEN  # DeLoRA's w_norm: a PEFT buffer
        pending: dict[str, PendingParam] = {}
        weights.__dict__.update(training=self.training, pending=pending)
        params = weights._parameters
        typed = vblora.dtypes(config) if method in vblora.METHODS else {}  # VB-LoRA's integer top-k indices
        for param, shape in shapes.items():
            attr = _ATTR.get(param) or param.replace(".", "_")
            spec.names[param] = attr
            grad = trainable and param not in frozen and param not in typed
            kind_dtype = typed.get(param, dtype)
            if options.initialize:
                params[attr] = nn.Parameter(torch.empty(shape, device=device, dtype=kind_dtype), requires_grad=grad)
            else:
                pending[attr] = PendingParam(shape, device, kind_dtype, grad)
        self._modules["adapter_weights"]._modules[slot(name)] = weights
        self._specs[name] = spec
        self.__dict__["_plan_key"] = None  # plain attribute: skip nn.Module.__setattr__
        if device.type != "meta" and options.initialize:
            try:
                with torch.no_grad():
                    self._initialise(name, config)
            except BaseException:
                self.remove_adapter(name)
                raise

    def add_tokens(self, name: str, indices: Sequence[int], options: LoadOptions, *,
                   source: AdapterLayer | None = None, param: str = TRAINABLE_TOKENS_PARAM,
                   saved_when_tied: bool = False, random_rows: bool = False) -> None:
        """Trainable token rows for adapter ``name`` (LoRA's ``trainable_token_indices``): while it is active,
        rows ``indices`` of the weight are replaced by the adapter's ``[len(indices), dim]`` tensor (PEFT's
        ``TrainableTokensLayer``; an embedding, or an output layer whose weight is tied to one).

        The rows start as a copy of the current ones (PEFT's init) unless ``options.initialize`` is false;
        ``random_rows`` (the ``TRAINABLE_TOKENS`` method's ``init_weights`` false or null): standard normals drawn in
        the weight's dtype, as PEFT's ``torch.randn(..., dtype=weight.dtype)``.

        :param source: the layer whose rows these are, for a layer tied to it (no tensor of its own).
        :param param: the tensor's name under the module (the ``TRAINABLE_TOKENS`` method stores
            ``trainable_tokens_delta``, SPEC.md 15.2).
        :param saved_when_tied: a tied layer also lists the source's tensor under its own name (the
            ``TRAINABLE_TOKENS`` method saves it there too); :func:`adapterspec_torch.tying.tie` points it at the
            source's once that exists.
        :raises UnsupportedError: the layer is not an embedding or a linear layer.

        >>> layer = AdapterLayer(torch.nn.Embedding(10, 4))
        >>> layer.add_tokens("default", [3, 1], LoadOptions())
        >>> layer.adapter_params("default")["token_adapter.trainable_tokens_delta"].shape
        torch.Size([2, 4])
        """
        if self.kind not in ("embedding", "linear"):
            raise UnsupportedError(f"trainable_token_indices needs an embedding (or a tied linear output) layer, "
                                   f"not a {type(self.base_layer).__qualname__}", key=name,
                                   hint="name an embedding layer in trainable_token_indices")
        quantized = quantization(self._modules["base_layer"])
        if quantized is not None:
            raise UnsupportedError(f"trainable token rows replace rows of the layer's weight, which is quantized "
                                   f"({quantized})", key=name,
                                   hint="load the adapter onto the unquantized model")
        check_not_offloaded(self._modules["base_layer"], name, "trainable token rows")
        spec = _Spec(method=TOKENS, indices=tuple(int(i) for i in indices), source=source)
        weights = _new_module(_Weights)
        weights.__dict__.update(training=self.training, pending={})
        if source is None or saved_when_tied:
            base = self._modules["base_layer"]
            device, dtype = adapter_target_of(base, options)
            attr = param.replace(".", "_")
            spec.names[param] = attr
            shape = (len(spec.indices), _weight(base).shape[1])
            if source is not None:  # a placeholder until tie() points it at the source's tensor
                weights.__dict__["pending"][attr] = PendingParam(shape, device, dtype, bool(options.trainable))
            elif options.initialize:
                rows = torch.empty(shape, device=device, dtype=dtype)
                if device.type != "meta" and _weight(base).device.type != "meta":
                    with torch.no_grad():
                        rows.copy_(torch.randn(shape, dtype=_weight(base).dtype, device=_weight(base).device)
                                   if random_rows else _weight(base)[list(spec.indices)])
                weights._parameters[attr] = nn.Parameter(rows, requires_grad=bool(options.trainable))
            else:
                weights.__dict__["pending"][attr] = PendingParam(shape, device, dtype, bool(options.trainable))
        self._modules["adapter_weights"]._modules[slot(name)] = weights
        self._specs[name] = spec
        self.__dict__["_plan_key"] = None  # plain attribute: skip nn.Module.__setattr__

    def _token_rows(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, their indices on ``device``) of token adapter ``name``."""
        spec = self._specs[name]
        owner = spec.source if spec.source is not None else self
        rows = owner._param(name, next(iter(owner._specs[name].names)))
        if spec.index is None or spec.index.device != device:
            spec.index = torch.tensor(spec.indices, dtype=torch.long, device=device)
        return rows, spec.index

    def _with_tokens(self, names: list[str]) -> torch.Tensor:
        """The base weight with the rows of token adapters ``names`` put in, in order (PEFT's ``get_merged_weights``)."""
        weight = _weight(self.base_layer)
        for n in names:
            rows, index = self._token_rows(n, weight.device)
            weight = weight.index_copy(0, index, rows.to(weight))
        return weight

    def _initialise(self, name: str, config: AdapterConfig) -> None:
        spec, w = self._specs[name], self.adapter_weights[slot(name)]
        p = {param: getattr(w, attr) for param, attr in spec.names.items()}
        if spec.method == "LORA":
            init = config.get("init_lora_weights", True)
            # PEFT's update_layer draws what its layers' constructors draw (torch.randn for an embedding's pair, the
            # nn.Linear / nn.ConvNd defaults otherwise) whatever init_lora_weights says; reset_lora_parameters then
            # draws again unless it is false: the same draws in the same order give PEFT's values under one seed
            if self.kind == "embedding":
                a, b = p["lora_embedding_A"], p["lora_embedding_B"]
                a.normal_()
                b.normal_()
                if init is not False:
                    nn.init.zeros_(a)
                    nn.init.normal_(b)
            else:
                a, b = p["lora_A.weight"], p["lora_B.weight"]
                _kaiming(a)
                _kaiming(b)
                if "lora_B.bias" in p:
                    bound = 1 / math.sqrt(math.prod(b.shape[1:])) if b.numel() else 0
                    nn.init.uniform_(p["lora_B.bias"], -bound, bound)
                if init is not False:
                    if isinstance(init, str) and init.lower() == "gaussian":
                        nn.init.normal_(a, std=1 / spec.r)
                    else:
                        _kaiming(a)
                    nn.init.zeros_(b)
                    if "lora_B.bias" in p:
                        nn.init.zeros_(p["lora_B.bias"])
        elif spec.method == "IA3":
            if config.get("init_ia3_weights", True):
                nn.init.ones_(p["ia3_l"])
            else:
                p["ia3_l"].normal_()
        elif spec.method == "LOHA":
            for key in ("hada_t1", "hada_t2", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
                if key in p:
                    _kaiming(p[key])
            if config.get("init_weights", True):
                nn.init.zeros_(p["hada_w2_b"])
        elif spec.method in oft.METHODS:
            oft.initialise(p, config)
        elif spec.method in hra.METHODS:
            hra.initialise(p, config)
        elif spec.method in c3a.METHODS:
            c3a.initialise(p, config, *_in_out(self._modules["base_layer"], self.kind))
        elif spec.method in adalora.METHODS:
            adalora.initialise(p, config)
        elif spec.method in vera.METHODS:
            vera.initialise(p, config)
        elif spec.method in road.METHODS:
            road.initialise(p, config)
        elif spec.method in miss.METHODS:
            miss.initialise(p, config)
        elif spec.method in vblora.METHODS and spec.shared is not None:
            vblora.initialise(p, spec.shared.tensors(), config)
        elif spec.method in gralora.METHODS:
            gralora.initialise(p, config)
        elif spec.method in delora.METHODS:
            with onloaded(self._modules["base_layer"]):  # w_norm reads the base weight (accelerate's, offloaded)
                delora.initialise(p, _weight(self._modules["base_layer"]), config, self._path)
        elif spec.method in beft.METHODS:  # SPEC.md 17.8: rounded through the base weight's dtype as PEFT's
            beft.initialise(p, self._modules["base_layer"]._parameters.get("weight"), config)
        elif spec.method == "LOKR":
            init = config.get("init_weights", True)
            for tensor in p.values():
                _kaiming(tensor)
            if init == "lycoris":
                nn.init.zeros_(p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_b"])
            elif init:
                nn.init.zeros_(p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"])
        through = _peft_move_dtype(self._modules["base_layer"])
        if through in UPCAST_DTYPES:
            # PEFT's _move_adapter_to_device_of_base_layer casts every new tensor of the adapter (VeRA's shared
            # projections and VB-LoRA's vector bank too) to the base weight's dtype, and autocast_adapter_dtype
            # casts them back to float32: the start values are the draws rounded to that dtype (SPEC.md 7.5).
            shared = list(spec.shared.tensors().values()) if spec.shared is not None else []
            for tensor in [*p.values(), *shared]:
                if tensor.is_floating_point() and tensor.dtype != through and tensor.device.type != "meta":
                    tensor.copy_(tensor.to(through))
        if spec.method == "LORA" and spec.use_dora:
            p["lora_magnitude_vector"].copy_(self._dora_start(name, through).reshape(
                p["lora_magnitude_vector"].shape))

    def _dora_start(self, name: str, through: torch.dtype | None) -> torch.Tensor:
        """A new DoRA magnitude as PEFT's ``DoraLinearLayer.update_layer`` computes it: after the move, so on a
        float16/bfloat16 base from ``B @ A`` in that dtype (float16: in float32, then rounded) and the base
        weight in its own dtype; else :meth:`_weight_norm`."""
        if through not in UPCAST_DTYPES:
            return self._weight_norm(name, detach=True)
        embedding = self.kind == "embedding"
        a = self._param(name, "lora_embedding_A" if embedding else "lora_A.weight").to(through)
        b = self._param(name, "lora_embedding_B" if embedding else "lora_B.weight").to(through)
        if through == torch.float16:
            a, b = a.float(), b.float()
        with onloaded(self._modules["base_layer"]):
            weight = dense_weight(self.base_layer, name)
            if self.kind in _CONV_KINDS:
                r = a.shape[0]
                lora_weight = torch.mm(b.view([-1, r]), a.view([r, -1])).reshape(weight.shape)
            else:
                lora_weight = b @ a
            norm = self._norm_of(weight, lora_weight.to(through), self._specs[name].scaling)
        return norm.detach()

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s parameters; if it was merged, its delta stays in the base weight."""
        if slot(name) in self.adapter_weights:
            del self.adapter_weights[slot(name)]
        self._specs.pop(name, None)
        if name in self._merged:
            self._merged.remove(name)
        self._caches.pop(f"{name}-weight_norm", None)
        self._caches.pop(f"{name}-rows", None)
        self.__dict__["_plan_key"] = None  # plain attribute: skip nn.Module.__setattr__

    def adapter_names(self) -> list[str]:
        """The adapters this layer holds, in insertion order."""
        return list(self._specs)

    def _check_not_training_merged(self) -> None:
        """Refuse a training forward while a merged adapter's parameters require grad: the forward skips them, so
        they would get no gradient (torch raised its raw "does not require grad", or the base trained alone).

        :raises UnsupportedError: so.
        """
        for name in self._merged:
            if any(getattr(p, "requires_grad", False) for p in self.adapter_params(name).values()):
                raise UnsupportedError(f"adapter {name!r} is merged: training cannot reach its parameters",
                                       key=name, hint="unmerge_adapters(model) before training (or freeze it)")

    def adapter_params(self, name: str) -> dict[str, nn.Parameter | PendingParam]:
        """Spec parameter name (``"lora_A.weight"``, ``"ia3_l"``...) -> parameter, for adapter ``name``
        (a :class:`PendingParam` for one injected without initialisation and not loaded yet)."""
        w = self.adapter_weights[slot(name)]
        params, pending = w._parameters, w.__dict__.get("pending") or {}
        return {param: params[attr] if attr in params else pending[attr]
                for param, attr in self._specs[name].names.items()}

    def running_of(self, names: Sequence[str]) -> list[Running]:
        """The adapters of ``names`` this layer holds, as the SDK's :func:`~adapterspec._mix.mix_refusal` judges
        whether they may run together."""
        return [Running(n, TOKEN_ROWS if spec.method == TOKENS else spec.method, spec.use_dora, spec.indices)
                for n in names if (spec := self._specs.get(n)) is not None]

    def set_active(self, names: Sequence[str]) -> None:
        """Run exactly these adapters (those this layer holds) in ``forward``.

        The set is shared with every layer injected into the same model (one assignment switches all).
        """
        self._switch.names = tuple(names)

    @property
    def merged_adapters(self) -> list[str]:
        """The adapters whose deltas are in the base weight now, in merge order."""
        return list(self._merged)

    # -- the math ---------------------------------------------------------------------
    def _param(self, name: str, param: str) -> torch.Tensor:
        tensor: torch.Tensor = self.adapter_weights[slot(name)]._parameters[self._specs[name].names[param]]
        return tensor

    def _check_placed(self, names: Sequence[str]) -> None:
        """Refuse to compute with adapter tensors that have no values (on the meta device, as accelerate leaves the
        ones it offloads: ``dispatch_model`` / ``cpu_offload`` after the adapter was loaded).

        :raises UnsupportedError: naming the adapter.
        """
        weights = self._modules["adapter_weights"]._modules
        for name in names:
            module = weights.get(slot(name))
            first = next(iter(module._parameters.values()), None) if module is not None else None
            if first is not None and first.is_meta:
                raise UnsupportedError("this layer's adapter tensors are on the meta device (accelerate offloaded them: "
                                       "the model was dispatched after the adapter was loaded), so it cannot compute",
                                       key=name, hint="load the adapter after dispatch_model / from_pretrained("
                                                      "device_map=...): its tensors then stay where the layer computes")

    def _params_of(self, name: str) -> dict[str, torch.Tensor]:
        """Spec parameter name -> tensor of adapter ``name`` (the parameters, loaded)."""
        params = self.adapter_weights[slot(name)]._parameters
        return {param: params[attr] for param, attr in self._specs[name].names.items()}

    def _has(self, name: str, param: str) -> bool:
        return param in self._specs[name].names

    def delta_weight(self, name: str) -> torch.Tensor:
        """The change adapter ``name`` adds to the base weight, in the base weight's layout.

        LoRA: ``scaling * B @ A`` (transposed for ``fan_in_fan_out``, a convolution for conv layers);
        LoHa/LoKr: their reconstructed weight. IA3 scales instead (see :meth:`merge`).
        """
        spec = self._specs[name]
        if spec.method in delora.METHODS:
            return delora.delta_weight(self._params_of(name), spec.r)
        if spec.method in adalora.METHODS:
            return adalora.delta_weight(self.base_layer, self.kind, self._params_of(name), spec.scaling, spec.r)
        if spec.method in vblora.METHODS and spec.shared is not None and spec.config is not None:
            return vblora.delta_weight(self.base_layer, self.kind, self._params_of(name), spec.shared.tensors(),
                                       spec.config)
        if spec.granular is not None:
            return gralora.delta_weight(self.kind, spec.granular, self._params_of(name))
        if spec.shared is not None:
            return vera.delta_weight(self.base_layer, self.kind, self._params_of(name), spec.shared.tensors())
        if spec.method == "LORA":
            if self.kind == "embedding":
                a, b = self._param(name, "lora_embedding_A"), self._param(name, "lora_embedding_B")
            else:
                a, b = self._param(name, "lora_A.weight"), self._param(name, "lora_B.weight")
            dtype = a.dtype if self.kind != "linear" and self.kind != "conv1d_hf" else b.dtype
            cast = b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
            if cast:
                a, b = a.float(), b.float()
            out: torch.Tensor
            if self.kind == "embedding":
                out = (b @ a).T * spec.scaling
            elif self.kind in _CONV_KINDS:
                if _weight(self.base_layer).size()[2:4] == (1, 1):
                    out = (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * spec.scaling
                else:
                    out = self._conv_fn()(a.transpose(0, 1), b)
                    out = out * spec.scaling if self.base_layer.groups > 1 else out.transpose(0, 1) * spec.scaling
            else:
                out = _transpose(b @ a, self.fan_in_fan_out) * spec.scaling
            return out.to(dtype) if cast else out
        if spec.method == "LOHA":
            p = functools.partial(self._param, name)
            if self._has(name, "hada_t1"):
                weight = (_cp_weight(p("hada_t1"), p("hada_w1_a"), p("hada_w1_b"))
                          * _cp_weight(p("hada_t2"), p("hada_w2_a"), p("hada_w2_b"))) * torch.tensor(spec.scaling)
            else:
                weight = _HadaWeight.apply(  # type: ignore[no-untyped-call]  # unannotated in torch
                    p("hada_w1_a"), p("hada_w1_b"), p("hada_w2_a"), p("hada_w2_b"), torch.tensor(spec.scaling))
            return weight.reshape(weight_shape(self._modules["base_layer"], self.kind))
        if spec.method == "LOKR":
            w1 = self._param(name, "lokr_w1") if self._has(name, "lokr_w1") else (
                self._param(name, "lokr_w1_a") @ self._param(name, "lokr_w1_b"))
            if self._has(name, "lokr_w2"):
                w2 = self._param(name, "lokr_w2")
            elif self._has(name, "lokr_t2"):
                w2 = _cp_weight(self._param(name, "lokr_t2"), self._param(name, "lokr_w2_a"),
                                self._param(name, "lokr_w2_b"))
            else:
                w2 = self._param(name, "lokr_w2_a") @ self._param(name, "lokr_w2_b")
            if w2.dim() == 4:
                w1 = w1.unsqueeze(2).unsqueeze(2)
            weight = torch.kron(w1, w2.contiguous()) * spec.scaling
            return weight.reshape(weight_shape(self._modules["base_layer"], self.kind))
        raise UnsupportedError(f"{spec.method} has no additive weight delta", key=name, hint="use merge()")

    def _conv_fn(self) -> Any:
        return {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}[self.kind]

    def _lora_weight(self, name: str) -> torch.Tensor:
        """``B @ A`` in the base weight's orientation, computed the way PEFT's DoRA computes it."""
        if self.kind == "embedding":
            a, b = self._param(name, "lora_embedding_A").T, self._param(name, "lora_embedding_B").T
            return (a @ b).T
        a, b = self._param(name, "lora_A.weight"), self._param(name, "lora_B.weight")
        if self.kind in _CONV_KINDS:
            r = a.shape[0]
            return torch.mm(b.view([-1, r]), a.view([r, -1])).reshape(self.base_layer.weight.shape)
        eye = torch.eye(a.shape[1], device=a.device, dtype=a.dtype)
        return F.linear(F.linear(eye, a), b).T

    def _norm_of(self, weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
        """PEFT's DoRA weight norm of ``weight + scaling * lora_weight`` (per output channel)."""
        if self.kind in _CONV_KINDS:
            total = weight + scaling * lora_weight
            norm: torch.Tensor = total.norm(p=2, dim=tuple(range(1, total.dim())), keepdim=True).transpose(1, 0)
            return norm
        total = _transpose(weight, self.fan_in_fan_out or self.kind == "embedding") + scaling * lora_weight
        norm = torch.linalg.norm(total, dim=1).to(total.dtype)
        return norm

    def _weight_norm(self, name: str, *, detach: bool) -> torch.Tensor:
        spec = self._specs[name]
        lora_weight = self._lora_weight(name)
        with onloaded(self._modules["base_layer"]):
            weight = dense_weight(self.base_layer, name)
            if self.kind in _LINEAR_KINDS:
                weight = weight.to(lora_weight.dtype)
            norm = self._norm_of(weight, lora_weight.detach() if detach else lora_weight, spec.scaling)
        return norm.detach()

    def _plan_for(self, names: tuple[str, ...]) -> tuple[list[str], list[str], list[str], list[str]]:
        ia3_in: list[str] = []
        ia3_out: list[str] = []
        additive: list[str] = []
        tokens: list[str] = []
        for n in names:
            spec = self._specs.get(n)
            if spec is None:
                continue
            if spec.method == "IA3":
                (ia3_in if spec.feedforward else ia3_out).append(n)
            elif spec.method == TOKENS:
                tokens.append(n)
            else:
                additive.append(n)
        return ia3_in, ia3_out, additive, tokens

    def _fast_for(self, plan: tuple[list[str], list[str], list[str], list[str]]) -> tuple[str, _Spec] | None:
        """The adapter, if ``plan`` is one plain LoRA (no DoRA, no bias) on a plain ``nn.Linear`` or transformers
        ``Conv1D``, whose output (a new tensor no one else holds) the LoRA term can be added to in place."""
        ia3_in, ia3_out, additive, tokens = plan
        if ia3_in or ia3_out or tokens or len(additive) != 1 or self.kind not in _LINEAR_KINDS:
            return None
        base_type = type(self._modules["base_layer"])
        if base_type is not nn.Linear and base_type is not _hf_conv1d_type():
            return None
        spec = self._specs[additive[0]]
        if spec.method != "LORA" or spec.use_dora or spec.lora_bias:
            return None
        return additive[0], spec

    def _lora_in_place(self, name: str, spec: _Spec, x: torch.Tensor, args: Any, kwargs: Any) -> torch.Tensor:
        """``base(x) + scaling * B(A(x))`` with the LoRA term added into the base output by one ``addmm_``
        (no intermediate ``B(A(x))``, product by the scale and sum as new tensors): PEFT's math, with one
        rounding less. Autograd records the in-place add (a Linear's backward needs its input, not its output)."""
        base = self._modules["base_layer"]
        weights = cast(nn.Module, self._modules["adapter_weights"]._modules[slot(name)])
        params = cast("dict[str, torch.Tensor]", weights._parameters)  # A and B exist: _lora_plan checked the spec
        a, b = params["lora_A_weight"], params["lora_B_weight"]
        if a.is_meta and not x.is_meta:
            self._check_placed((name,))
        result: torch.Tensor = base(x, *args, **kwargs)  # a plain Linear / Conv1D (_fast_for): one tensor
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        if result.dtype != a.dtype or b.dtype != a.dtype or not result.is_contiguous():  # autocast, mixed dtypes
            return self._lora(name, spec, x, result).to(result.dtype)
        hidden = F.linear(x.reshape(-1, x.shape[-1]), a)
        result.view(-1, result.shape[-1]).addmm_(hidden, b.t(), alpha=spec.scaling)
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._sharding is not None:  # a sharded base layer (FSDP2, tensor parallel): SPEC.md 16
            from .distributed import sharded_forward

            return sharded_forward(self, x, args, kwargs)
        names = self._switch.names
        if names is not self._plan_key:
            self.__dict__["_plan"] = self._plan_for(names)
            self.__dict__["_fast"] = self._fast_for(self._plan)
            self.__dict__["_plan_key"] = names
        fast = self._fast
        if fast is not None and not self._merged and not (fast[1].dropout and self.training) \
                and not _hooked(self._modules["base_layer"]):
            return self._lora_in_place(fast[0], fast[1], x, args, kwargs)  # hooks would see the sum, not base(x)
        if not x.is_meta:
            self._check_placed(names)
        ia3_in, ia3_out, additive, tokens = self._plan
        rotations = self._rotations(names) if not self._merged else []
        if rotations:
            return oft.forward(self._modules["base_layer"], self.kind, rotations, x, args, kwargs,
                               training=self.training, output=self._tensor)
        roads = self._roads(names) if not self._merged else []
        if roads:  # RoAd rotates the base layer's output (SPEC.md 17.1); mixes with other methods are refused
            return road.forward(self._tensor(self.base_layer(x, *args, **kwargs)), roads)
        blocks = self._miss_blocks(names) if not self._merged else []
        if blocks:
            return miss.forward(self._modules["base_layer"], blocks, x, args, kwargs, training=self.training,
                                output=self._tensor)
        kernels = self._c3a_kernels(names) if not self._merged else []
        if kernels:  # SPEC.md 17.7: PEFT's float32 FFT term; other methods and a second C3A adapter are refused
            return c3a.forward(self._modules["base_layer"], kernels, x, args, kwargs, output=self._tensor)
        reflections = self._reflections(names) if not self._merged else []
        if reflections:  # HRA reads the base weight and bias: accelerate's, where offloaded
            with onloaded(self._modules["base_layer"]):
                return hra.forward(self._modules["base_layer"], self.kind, reflections, x, args, kwargs)
        if self._merged or not (ia3_in or ia3_out or additive or tokens):
            if self._merged and self.training and torch.is_grad_enabled():
                self._check_not_training_merged()
            out: torch.Tensor = self.base_layer(x, *args, **kwargs)
            return out
        if additive and any(self._specs[n].granular is not None for n in additive):
            self._alone(names, "granular", "GraLoRA")  # SPEC.md 17.5: GraLoRA runs beside no other method
        previous_dtype = x.dtype
        conv = self.kind in _CONV_KINDS
        base_input = x
        if ia3_in:
            dtype = previous_dtype
            scaling: torch.Tensor | int = 1
            for n in ia3_in:
                vector = self._param(n, "ia3_l")
                dtype = vector.dtype
                scaling = scaling * (vector if conv else vector.flatten())
            target = self.base_layer.weight.dtype if conv else previous_dtype
            base_input = (x.to(dtype) * scaling).to(target)
        if tokens:
            result = self._tokens_forward(base_input, tokens)
        else:
            result = self.base_layer(base_input, *args, **kwargs)
            if not isinstance(result, torch.Tensor):
                self._not_a_tensor(result)
        if ia3_out:
            dtype, scaling = result.dtype, 1
            for n in ia3_out:
                vector = self._param(n, "ia3_l")
                dtype = vector.dtype
                scaling = scaling * (vector if conv else vector.flatten())
            result = result.to(dtype) * scaling if conv else (result * scaling).to(result.dtype)
        if (ia3_in or ia3_out) and conv:  # PEFT's IA3 convolutions cast back; its Linear keeps the base output's dtype
            result = result.to(previous_dtype)
        if not additive:
            return result
        result_dtype = result.dtype
        deloras = [n for n in additive if self._specs[n].method in delora.METHODS]
        befts = [n for n in additive if self._specs[n].method in beft.METHODS]
        for n in additive:
            spec = self._specs[n]
            if spec.method in beft.METHODS:
                if n == befts[0]:  # SPEC.md 17.8: PEFT sums a layer's BEFT biases, then adds them once
                    result = beft.output([self._param(b, beft.PARAM) for b in befts], result)
            elif spec.method in delora.METHODS:
                if n == deloras[0]:  # PEFT sums a layer's DeLoRA terms in the output's dtype, then adds them once
                    result = delora.output([(self._params_of(d), self._specs[d].r, self._specs[d].dropout)
                                            for d in deloras], x, result, self.training)
            elif spec.method == "LORA":
                if self.kind == "embedding":
                    result = self._embedding_lora(n, spec, x, result)
                else:
                    x = x.to(self._param(n, "lora_A.weight").dtype)
                    result = self._lora(n, spec, x, result)
            elif spec.method in adalora.METHODS:
                result = result + adalora.output(self.base_layer, self.kind, self._params_of(n), spec.scaling, spec.r,
                                                 x, spec.dropout, self.training)
            elif spec.method in vblora.METHODS and spec.shared is not None and spec.config is not None:
                result = result + vblora.output(self._params_of(n), spec.shared.tensors(), spec.config, x,
                                                spec.dropout, self.training)
            elif spec.granular is not None:
                result = gralora.output(spec.granular, self._params_of(n), x, result, training=self.training)
            elif spec.shared is not None:
                result = result + vera.output(self.base_layer, self.kind, self._params_of(n), spec.shared.tensors(), x,
                                              spec.dropout, self.training)
            else:
                lycoris_training = self.training and spec.method in _LYCORIS
                # PEFT's LyCORIS layers toss the module-dropout coin for each active adapter at each training forward
                # (module_dropout 0 too): the same draws keep the random stream -- every later dropout -- PEFT's
                if lycoris_training and not bool(torch.rand(1) > spec.module_dropout):
                    continue
                delta = self.delta_weight(n)
                if lycoris_training and spec.rank_dropout:
                    delta = _rank_dropout(delta, spec)
                x_in = x.to(delta.dtype)
                if conv:
                    base = self.base_layer
                    delta_out = self._conv_fn()(x_in, delta, stride=base.stride, padding=base.padding,
                                                dilation=base.dilation, groups=base.groups)
                else:
                    delta_out = F.linear(x_in, delta)
                result = result + delta_out
        if all(self._specs[n].method in _LYCORIS or self._specs[n].granular is not None
               or self._specs[n].method in delora.METHODS for n in additive):
            result_dtype = previous_dtype  # PEFT's LoHa/LoKr/GraLoRA/DeLoRA layers cast back to the input's dtype, LoRA's
            # to the base's (they differ under autocast: a float32 input, a bfloat16 base output)
        return result.to(result_dtype)

    def _tensor(self, out: Any) -> torch.Tensor:
        """``out``, the base layer's output, if it is one tensor (else :meth:`_not_a_tensor` raises)."""
        if not isinstance(out, torch.Tensor):
            self._not_a_tensor(out)
        return out

    def _not_a_tensor(self, out: Any) -> typing.NoReturn:
        """Refuse to add an adapter's term to an output that is not one tensor: a layer whose ``forward`` returns a
        tuple (an MoE router's scores and logits) that :func:`returns_tuple` could not tell at load.

        :raises UnsupportedError: naming the module.
        """
        base = self._modules["base_layer"]
        raise UnsupportedError(
            f"this {type(base).__qualname__}'s forward returned a {type(out).__name__}, not one tensor: no adapter's "
            "output can be added to it (PEFT's forward fails on it too)", key=self._path or None,
            hint="leave this module out of target_modules (or exclude it with exclude_modules); to adapt its weight, "
                 "name the parameter in target_parameters")

    def _rotations(self, names: tuple[str, ...]) -> list[tuple[oft.Rotation, dict[str, torch.Tensor]]]:
        """(layout, tensors) of the active OFT/BOFT adapters, in order.

        :raises UnsupportedError: they are active together with another method's adapter on this layer.
        """
        found = [(n, self._specs[n]) for n in names if n in self._specs and self._specs[n].rotation is not None]
        if not found:
            return []
        others = [n for n in names if n in self._specs and self._specs[n].rotation is None]
        methods = {spec.method for _, spec in found}
        if others or len(methods) > 1:
            raise UnsupportedError(f"{', '.join(sorted(methods))} adapters cannot run together with {others or 'each other'} "
                                   "on one layer (PEFT holds one method per layer)", key=found[0][0],
                                   hint="activate the rotation adapters without other methods' adapters")
        return [(cast(oft.Rotation, spec.rotation), {p: self._param(n, p) for p in spec.names}) for n, spec in found]

    def _roads(self, names: tuple[str, ...]) -> list[tuple[road.Road, torch.Tensor, torch.Tensor]]:
        """(settings, theta, alpha) of the active RoAd adapters, in order (:meth:`_alone`)."""
        return [(cast(road.Road, spec.road_settings), self._param(n, "road_theta"), self._param(n, "road_alpha"))
                for n, spec in self._alone(names, "road_settings", "RoAd")]

    def check_unmerge(self) -> None:
        """Refuse, before anything changes, an unmerge :meth:`unmerge` cannot do (a merged RoAd adapter whose matrix
        is singular: :func:`~adapterspec_torch.road.check_invertible`).

        :raises UnsupportedError: naming the adapter.
        """
        for name in self._merged:
            spec = self._specs[name]
            if spec.road_settings is not None:
                road.check_invertible(spec.road_settings, self._param(name, "road_theta"), self._param(name, "road_alpha"),
                                      name)

    def _miss_block(self, block: miss.Block, path: str) -> miss.Block:
        """``block``, if this layer's other MiSS adapters run in its mode: PEFT 0.21.2 sets a layer's mode once,
        from its first MiSS adapter, and runs every later one in it (SPEC.md 17.2).

        :raises UnsupportedError: another mode, naming ``/init_weights``.
        """
        other = next((s.block for s in self._specs.values() if s.block is not None and s.block.mode != block.mode),
                     None)
        if other is not None:
            raise UnsupportedError(f"MiSS init_weights mode {block.mode!r} on a layer that holds a MiSS adapter of mode "
                                   f"{other.mode!r}: PEFT 0.21.2 runs every MiSS adapter of a layer in the mode of the "
                                   "first one, so its result is not defined", key=path, pointer="/init_weights",
                                   hint="load MiSS adapters of one init_weights mode into one model")
        return block

    def _alone(self, names: tuple[str, ...], field: str, label: str) -> list[tuple[str, _Spec]]:
        """The active adapters of ``names`` whose spec sets ``field`` (a method PEFT runs on a layer by itself: MiSS,
        HRA, RoAd), in order, with their specs.

        :raises UnsupportedError: they are active together with another method's adapter on this layer.
        """
        found = [(n, self._specs[n]) for n in names if n in self._specs and getattr(self._specs[n], field) is not None]
        others = [n for n in names if n in self._specs and getattr(self._specs[n], field) is None]
        if found and others:
            raise UnsupportedError(f"{label} adapters cannot run together with {others} on one layer (PEFT holds one "
                                   "method per layer)", key=found[0][0],
                                   hint=f"activate the {label} adapters without other methods' adapters")
        return found

    def _miss_blocks(self, names: tuple[str, ...]) -> list[tuple[miss.Block, dict[str, torch.Tensor]]]:
        """(settings, tensors) of the active MiSS adapters, in order (:meth:`_alone`)."""
        return [(cast(miss.Block, spec.block), {p: self._param(n, p) for p in spec.names})
                for n, spec in self._alone(names, "block", "MiSS")]

    def _reflections(self, names: tuple[str, ...]) -> list[tuple[hra.Reflections, torch.Tensor]]:
        """(spec, hra_u) of the active HRA adapters, in order (SPEC.md 17.3; :meth:`_alone`)."""
        return [(cast(hra.Reflections, spec.reflections), self._param(n, hra.PARAM))
                for n, spec in self._alone(names, "reflections", "HRA")]

    def _c3a_kernels(self, names: tuple[str, ...]) -> list[torch.Tensor]:
        """``c3a_kernel`` of the active C3A adapters, in order (SPEC.md 17.7; :meth:`_alone`)."""
        return [self._param(n, c3a.PARAM) for n, _ in self._alone(names, "circulant", "C3A")]

    def _tokens_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """The base layer's output with the token rows of ``names`` in its weight (PEFT's ``TrainableTokensLayer``)."""
        weight = self._with_tokens(names)
        if self.kind == "embedding":
            out = self._embed(x, weight)
            embed_scale = self._embed_scale()
            return out * embed_scale.to(out.dtype) if embed_scale is not None else out
        # a linear output layer tied to the embedding; PEFT drops the bias here, the spec (8.8) keeps it
        return F.linear(x, weight, self.base_layer.bias)

    def _lora_ab(self, name: str, spec: _Spec, x: torch.Tensor) -> torch.Tensor:
        a = self._param(name, "lora_A.weight")
        b = self._param(name, "lora_B.weight")
        bias = self._param(name, "lora_B.bias") if spec.lora_bias else None
        if self.kind in _CONV_KINDS:
            base, conv = self.base_layer, self._conv_fn()
            hidden = conv(x, a, None, base.stride, base.padding)
            out: torch.Tensor = conv(hidden, b, bias, 1, 0, 1, base.groups)
            return out
        return F.linear(F.linear(x, a), b, bias)

    def _lora(self, name: str, spec: _Spec, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        dropping = spec.dropout > 0 and self.training
        if not spec.use_dora:
            x_d = F.dropout(x, spec.dropout, training=True) if dropping else x
            return result + self._lora_ab(name, spec, x_d) * spec.scaling
        with onloaded(self._modules["base_layer"]):  # DoRA reads the weight and bias: accelerate's, where offloaded
            return self._dora(name, spec, x, result, dropping)

    def _dora(self, name: str, spec: _Spec, x: torch.Tensor, result: torch.Tensor, dropping: bool) -> torch.Tensor:
        base = self.base_layer
        magnitude = self._param(name, "lora_magnitude_vector")
        lora_weight = self._lora_weight(name)
        if self.kind in _CONV_KINDS:
            weight = base.weight
        else:
            lora_weight = lora_weight.to(x.dtype)
            weight = dense_weight(base, name).to(x.dtype)
        norm = self._norm_of(weight, lora_weight.detach(), spec.scaling).detach()
        if self.kind in _CONV_KINDS:
            scale = magnitude / norm
        else:
            scale = (magnitude / norm).view(1, -1)
        if dropping:
            x = F.dropout(x, spec.dropout, training=True)
            if self.kind in _CONV_KINDS:
                base_result = self._conv_fn()(x, weight, None, base.stride, base.padding, base.dilation, base.groups)
            else:
                base_result = F.linear(x, _transpose(weight, self.fan_in_fan_out))
        else:
            base_result = result
            if base.bias is not None:
                shape = (1, -1) + (1,) * (result.dim() - 2) if self.kind in _CONV_KINDS else (-1,)
                base_result = base_result - base.bias.view(*shape)
        lora_result = self._lora_ab(name, spec, x)
        out: torch.Tensor = result + ((scale - 1) * base_result + scale * lora_result * spec.scaling)
        return out

    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(x, weight, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
                           scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)

    def _embed_scale(self) -> torch.Tensor | None:
        base = self.base_layer
        scale = getattr(base, "embed_scale", None)
        if scale is None:
            return None
        if isinstance(scale, (int, float)):
            return torch.tensor(scale, device=base.weight.device, dtype=base.weight.dtype)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return scale
        return None

    def _embedding_lora(self, name: str, spec: _Spec, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        a = self._param(name, "lora_embedding_A").T
        b = self._param(name, "lora_embedding_B").T
        embed_scale = self._embed_scale()
        if not spec.use_dora:
            out = (self._embed(x, a) @ b) * spec.scaling
            if embed_scale is not None:
                out = out * embed_scale.to(out.dtype)
            return result + out
        magnitude = self._param(name, "lora_magnitude_vector")
        lora_weight = (a @ b).T
        norm = self._norm_of(self.base_layer.weight, lora_weight.detach(), spec.scaling).detach()
        scale = magnitude / norm
        dora = scale * (self._embed(x, a) @ b) * spec.scaling
        if embed_scale is not None:
            dora = dora * embed_scale.to(dora.dtype)
        return scale * result + dora

    # -- merging ----------------------------------------------------------------------
    def _unmerged_weight(self) -> torch.Tensor:
        """The base weight without the merged adapters (PEFT's ``_unmerged_base_weight``)."""
        cached = self._caches.get("unmerged_base_weight")
        if cached is not None:
            return cached
        merged = list(self._merged)
        if merged:
            self.unmerge()
        weight = current(self._modules["base_layer"], "weight").detach().clone()
        if merged:
            self._caches["unmerged_base_weight"] = weight
            try:
                self.merge(merged)
            finally:
                self._caches.pop("unmerged_base_weight", None)
        return weight

    def _dora_factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        factor = self._param(name, "lora_magnitude_vector") / norm
        if self.kind in _CONV_KINDS:
            return factor.view(-1, *([1] * (self.base_layer.weight.dim() - 1)))
        if self.kind == "embedding":
            return factor.view(1, -1)
        return _transpose(factor.view(-1, 1), self.fan_in_fan_out)

    def _ia3_for_weight(self, name: str) -> torch.Tensor:
        vector = self._param(name, "ia3_l").data
        if self.kind not in _CONV_KINDS:
            return _transpose(vector, self.fan_in_fan_out)
        if not self._specs[name].feedforward:
            return vector.transpose(0, 1)
        base = self.base_layer
        if base.groups == 1:
            return vector
        per_in, per_out = base.in_channels // base.groups, base.out_channels // base.groups
        vector = vector.reshape(base.groups, 1, per_in, *vector.shape[2:])
        vector = vector.expand(base.groups, per_out, per_in, *vector.shape[3:])
        return vector.reshape(base.out_channels, per_in, *vector.shape[3:])

    def check_merge(self, names: Sequence[str]) -> None:
        """Refuse, before anything changes, a merge :meth:`merge` cannot do exactly (the model-level merge asks
        every layer first, so that a refusal leaves every weight as it was).

        :raises UnsupportedError: a sharded layer, a conv layer with groups > 1, lora_bias without a base bias,
            a quantized base weight (:func:`~adapterspec_torch.quantized.quantization`), or one computed at each
            forward without an exact write (spectral norm: :func:`~adapterspec_torch.computed.check_writable`).
        """
        todo = [name for name in names if name in self._specs and name not in self._merged]
        if not todo:
            return
        if self._sharding is not None:
            raise UnsupportedError("merging into a sharded layer (FSDP2, tensor parallel) is not implemented",
                                   key=todo[0], hint="run the adapters unmerged")
        base = self._modules["base_layer"]
        quantized = quantization(base)
        if quantized is not None:
            raise UnsupportedError(f"cannot merge into a quantized base weight ({quantized}): the sum would be "
                                   "rounded to the quantization grid, not the adapter's output", key=todo[0],
                                   hint="run the adapter unmerged, or load it onto the unquantized model to merge")
        check_not_offloaded(base, todo[0], "merging")
        for name in todo:
            spec = self._specs[name]
            check_writable(base, "weight", self._path or name, name)
            if _writes_bias(spec) and getattr(base, "bias", None) is not None:
                check_writable(base, "bias", self._path or name, name)
            if self.kind in _CONV_KINDS and _conv(base).groups > 1 and spec.method == "LORA":
                raise UnsupportedError("merging LoRA into a conv layer with groups > 1 is not supported",
                                       key=name, hint="keep the adapter unmerged")
            if spec.method == "LORA" and spec.lora_bias and base.bias is None:
                raise UnsupportedError("lora_bias cannot be merged: the base layer has no bias",
                                       key=name, hint="keep the adapter unmerged")
            if spec.method in beft.METHODS:
                beft.check_merge(base, self._path or name)

    def merge(self, names: Sequence[str]) -> None:
        """Add the deltas of ``names`` into the base weight in place (DoRA rescales by ``m / ||W + dW||``,
        IA3 multiplies); already merged ones and ones this layer does not hold are skipped. A weight computed at
        each forward (weight norm) is written back through what computes it (:func:`~adapterspec_torch.computed.
        store`).

        :raises UnsupportedError: what :meth:`check_merge` refuses (then nothing changed).
        """
        self.check_merge(names)
        base = self.base_layer
        with torch.no_grad():
            for name in names:
                if name not in self._specs or name in self._merged:
                    continue
                spec = self._specs[name]
                weight = current(base, "weight")  # a computed weight: a new tensor, stored back below
                orig_dtype = weight.dtype
                bias: Any = getattr(base, "bias", None)  # an Embedding has none
                if spec.rotation is not None:
                    oft.merge(weight, spec.rotation, {p: self._param(name, p) for p in spec.names})
                elif spec.road_settings is not None:
                    road.merge(weight, bias, spec.road_settings, self._param(name, "road_theta"),
                               self._param(name, "road_alpha"))
                elif spec.block is not None:
                    miss.merge(weight, spec.block, {p: self._param(name, p) for p in spec.names})
                elif spec.reflections is not None:
                    hra.merge(weight, spec.reflections, self._param(name, hra.PARAM))
                elif spec.circulant:
                    c3a.merge(weight, self._param(name, c3a.PARAM))
                elif spec.method in beft.METHODS:  # SPEC.md 17.8: the bias only
                    beft.merge(bias, self._param(name, beft.PARAM))
                elif spec.method == TOKENS:
                    tied = spec.source is not None and spec.source.base_layer.weight is weight
                    if not tied:  # a tied layer's rows are in the shared weight once its source merged them
                        rows, index = self._token_rows(name, weight.device)
                        self._caches[f"{name}-rows"] = weight.data.index_select(0, index).clone()
                        weight.data.index_copy_(0, index, rows.data.to(weight))
                elif spec.method == "IA3":
                    weight.data = torch.mul(weight.data, self._ia3_for_weight(name)).to(orig_dtype)
                    if not spec.feedforward and bias is not None:
                        vector = self._param(name, "ia3_l").reshape(bias.shape)
                        bias.data = torch.mul(bias.data, vector.data).to(bias.dtype)
                elif spec.method == "LORA" and spec.use_dora:
                    delta = self.delta_weight(name)
                    unmerged = self._unmerged_weight()
                    lora_part = delta.T if self.kind == "embedding" else (
                        delta if self.kind in _CONV_KINDS else _transpose(delta, self.fan_in_fan_out))
                    norm = self._norm_of(unmerged, lora_part, 1).detach()
                    self._caches[f"{name}-weight_norm"] = norm
                    weight.data = (self._dora_factor(name, norm) * (weight.data + delta)).to(orig_dtype)
                elif spec.method in adalora.METHODS or spec.shared is not None or spec.granular is not None:
                    weight.data += self.delta_weight(name)  # PEFT adds its float32 delta in place: one rounding
                else:  # PEFT adds the float32 delta in place (one rounding), or rounds it first (adapterspec._merge)
                    delta = self.delta_weight(name)
                    weight.data += delta.to(orig_dtype) if spec.round_merge else delta
                    if spec.method == "LORA" and spec.lora_bias:
                        bias.data += self._param(name, "lora_B.bias") * spec.scaling
                self._store(weight, bias)
                self._merged.append(name)

    def unmerge(self) -> None:
        """Undo :meth:`merge` for every merged adapter, in reverse order."""
        base = self.base_layer
        with torch.no_grad():
            while self._merged:
                name = self._merged.pop()
                spec = self._specs[name]
                weight = current(base, "weight")  # a computed weight: a new tensor, stored back below
                orig_dtype = weight.dtype
                bias: Any = getattr(base, "bias", None)  # an Embedding has none
                if spec.rotation is not None:
                    oft.unmerge(weight, spec.rotation, {p: self._param(name, p) for p in spec.names})
                elif spec.road_settings is not None:
                    road.unmerge(weight, bias, spec.road_settings, self._param(name, "road_theta"),
                                 self._param(name, "road_alpha"))
                elif spec.block is not None:
                    miss.unmerge(weight, spec.block, {p: self._param(name, p) for p in spec.names})
                elif spec.reflections is not None:
                    hra.unmerge(weight, spec.reflections, self._param(name, hra.PARAM))
                elif spec.circulant:
                    c3a.unmerge(weight, self._param(name, c3a.PARAM))
                elif spec.method in beft.METHODS:
                    beft.unmerge(bias, self._param(name, beft.PARAM))
                elif spec.method == TOKENS:
                    rows = self._caches.pop(f"{name}-rows", None)
                    if rows is not None:
                        weight.data.index_copy_(0, self._token_rows(name, weight.device)[1], rows)
                elif spec.method == "IA3":
                    weight.data = torch.div(weight.data, self._ia3_for_weight(name) + 1e-8).to(orig_dtype)
                    if not spec.feedforward and bias is not None:
                        vector = self._param(name, "ia3_l").reshape(bias.shape)
                        bias.data = torch.div(bias.data, vector.data + 1e-8).to(bias.dtype)
                elif spec.method == "LORA" and spec.use_dora:
                    delta = self.delta_weight(name)
                    norm = self._caches.pop(f"{name}-weight_norm")
                    weight.data = (weight.data / self._dora_factor(name, norm) - delta).to(orig_dtype)
                elif spec.method in adalora.METHODS or spec.shared is not None or spec.granular is not None:
                    weight.data -= self.delta_weight(name)  # as PEFT: in place, one rounding
                else:
                    delta = self.delta_weight(name)
                    weight.data -= delta.to(orig_dtype) if spec.round_unmerge else delta
                    if spec.method == "LORA" and spec.lora_bias:
                        bias.data -= self._param(name, "lora_B.bias") * spec.scaling
                self._store(weight, bias)

    def _store(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Write a merge's ``weight`` (and ``bias``) back where the base layer computes them at each forward
        (:func:`~adapterspec_torch.computed.store`); a stored parameter was changed in place already."""
        base = self._modules["base_layer"]
        store(base, "weight", weight)
        if bias is not None:
            store(base, "bias", bias)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, adapters={self.adapter_names()}"


class ModulesToSaveLayer(nn.Module):
    """A module saved whole: the original plus one copy per adapter; the active adapter's copy runs (two adapters
    with a copy are refused when activated together, :meth:`running_of`).

    :param original_module: the module as it was (kept, never modified).

    >>> layer = ModulesToSaveLayer(torch.nn.Linear(2, 2))
    >>> layer.add_adapter("default", LoadOptions())
    >>> sorted(layer.adapter_params("default"))
    ['bias', 'weight']
    """

    _modules: dict[str, nn.Module]  # type: ignore[assignment]  # narrower than Module's: no child is None

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self._switch = ActiveSet()
        self._casts: dict[str, torch.dtype] = {}  # adapter -> the dtype its copy computes in, if not the original's
        self._prefixes: dict[str, str] = {}  # adapter -> the infix of its tensors' names (LN tuning's)
        self._merged: str | None = None  # the adapter whose copy was running when it was merged

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self.active_module(), name)

    def add_adapter(self, name: str, options: LoadOptions, *, prefix: str = "") -> None:
        """Add a copy of the original module for adapter ``name``: on ``options.device`` and in ``options.dtype``
        (floating-point tensors only) when given, else on the original's device and in its dtypes.

        :param prefix: put before the copy's tensor names (``"ln_tuning_layers."``: LN tuning, SPEC.md 15.3).

        A copy in another dtype than the original's computes in its dtype: floating-point inputs are cast to it,
        and a floating-point output back to the input's dtype (as adapter layers do).

        :raises UnsupportedError: the module holds a quantized weight (:func:`~adapterspec_torch.quantized.
            quantization`), whose copy the spec's file cannot carry.
        """
        quantized = next((q for m in self.original_module.modules() if (q := quantization(m)) is not None), None)
        if quantized is not None:
            raise UnsupportedError(f"a module saved whole (modules_to_save) cannot hold a quantized weight ({quantized}):"
                                   " the adapter's file carries floating-point tensors", key=name,
                                   hint="keep this module unquantized (e.g. bitsandbytes' llm_int8_skip_modules), "
                                        "or load the adapter onto the unquantized model")
        check_not_offloaded(self.original_module, name, "a module saved whole (modules_to_save)")
        duplicate = copy_module(self.original_module)  # copy.deepcopy, also of a module under an old weight-norm hook
        dtype = as_dtype(options.dtype)
        if options.device is not None or dtype is not None:
            duplicate.to(device=torch.device(options.device) if options.device is not None else None, dtype=dtype)
        original = next((p.dtype for p in self.original_module.parameters() if p.is_floating_point()), None)
        if dtype is not None and original is not None and dtype != original:
            self._casts[name] = dtype
        duplicate.requires_grad_(bool(options.trainable))
        self.modules_to_save[slot(name)] = duplicate
        if prefix:
            self._prefixes[name] = prefix

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s copy; if it was merged (:meth:`merge`), the copy becomes the original module
        (as PEFT's ``merge_and_unload`` keeps the trained copy)."""
        if name == self._merged:
            kept = self.modules_to_save[slot(name)]
            original = next((p.dtype for p in self.original_module.parameters() if p.is_floating_point()), None)
            if name in self._casts and original is not None:
                kept.to(dtype=original)  # it computed in its own dtype; as the original it gets the original's
            self.original_module = kept
            self._merged = None
        if slot(name) in self.modules_to_save:
            del self.modules_to_save[slot(name)]
        self._casts.pop(name, None)
        self._prefixes.pop(name, None)

    def merge(self, names: Sequence[str]) -> None:
        """Mark the copy running now as merged if it belongs to one of ``names``: deleting its adapter then keeps it.

        >>> layer = ModulesToSaveLayer(torch.nn.Linear(2, 2))
        >>> layer.add_adapter("default", LoadOptions())
        >>> layer.set_active(["default"])
        >>> layer.merge(["default"]); copy = layer.active_module(); layer.remove_adapter("default")
        >>> layer.original_module is copy
        True
        """
        name = self._active()[0]
        if self._merged is None and name in names:
            self._merged = name

    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        self._merged = None

    def adapter_names(self) -> list[str]:
        """The adapters holding a copy, in insertion order."""
        return [adapter_of(key) for key in self.modules_to_save.keys()]

    def adapter_params(self, name: str) -> dict[str, torch.Tensor]:
        """The copy's state dict (parameter name -> tensor) for adapter ``name``."""
        prefix = self._prefixes.get(name, "")
        copy = self.modules_to_save[slot(name)]
        return {prefix + key: value for key, value in copy.state_dict(keep_vars=True).items()}

    def running_of(self, names: Sequence[str]) -> list[Running]:
        """The adapters of ``names`` holding a copy here, as the SDK's :func:`~adapterspec._mix.mix_refusal` judges
        whether they may run together (one copy runs at a time)."""
        copies = self._modules["modules_to_save"]._modules
        return [Running(n, SAVED_WHOLE) for n in names if slot(n) in copies]

    def set_active(self, names: Sequence[str]) -> None:
        """Run the copy of the first active adapter that has one, else the original (the set is model-wide)."""
        self._switch.names = tuple(names)

    def _active(self) -> tuple[str | None, nn.Module]:
        copies = self._modules["modules_to_save"]._modules
        for name in self._switch.names:
            module = copies.get(slot(name))
            if module is not None:
                return name, module
        return None, self._modules["original_module"]

    def active_module(self) -> nn.Module:
        """The module the forward pass runs now."""
        return self._active()[1]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        name, module = self._active()  # one copy: two active ones are refused when activated (running_of)
        dtype = self._casts.get(name) if name is not None and self._casts else None
        if dtype is None:
            return module(*args, **kwargs)
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()),
                     None)

        def cast(value: Any, to: torch.dtype) -> Any:
            return value.to(to) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

        out = module(*(cast(a, dtype) for a in args), **{k: cast(v, dtype) for k, v in kwargs.items()})
        return cast(out, first.dtype) if first is not None else out
