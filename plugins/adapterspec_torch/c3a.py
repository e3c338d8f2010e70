"""C3A, circular convolution adaptation (SPEC.md 17.7): PEFT 0.21.2's math on ``nn.Linear``.

An adapter's ``c3a_kernel`` ``[out/b, in/b, b]`` is a block-circulant ``[out, in]`` matrix ``C`` (block ``(i, j)``
the circulant of ``kernel[i, j]``). Unmerged, the layer adds ``(C x) / in`` to the base output, computed in float32
through FFTs as PEFT's ``BlockCircularConvolution`` does (the same operations, so the same float32 rounding, and
its hand-written backward); merged, the weight becomes ``W + (C rounded to W's dtype) / in``, and unmerging
subtracts the same delta. The functions here are pure: :class:`~adapterspec_torch.layers.AdapterLayer` calls them
with its base layer and the tensor of its active C3A adapter.

>>> import torch
>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "C3A", "target_modules": ["q"], "block_size": 4})
>>> shapes(torch.nn.Linear(8, 12), "linear", cfg, "q")
{'c3a_kernel': (3, 2, 4)}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.fft import fft, ifft

from adapterspec import AdapterConfig
from adapterspec._c3a import PARAM, kernel_shape
from adapterspec.errors import UnsupportedError

from .quantized import quantization

__all__ = ["KINDS", "METHODS", "PARAM", "check", "circulant", "delta_weight", "forward", "initialise",
           "merge", "shapes", "unmerge"]

#: The methods this module computes.
METHODS = ("C3A",)
#: The layer kinds PEFT's C3A adapts (``nn.Linear`` only: PEFT raises TypeError on anything else).
KINDS = ("linear",)


def _in_out(module: nn.Module) -> tuple[int, int]:
    linear = cast(nn.Linear, module)
    return int(linear.in_features), int(linear.out_features)


def check(module: nn.Module, kind: str | None, path: str, config: AdapterConfig) -> None:
    """Refuse a layer PEFT's C3A refuses (not an ``nn.Linear``, a block size not dividing its sizes) or whose merge
    would add to quantized values.

    :raises UnsupportedError: naming ``path`` (and the field where one is at fault).

    >>> cfg = AdapterConfig.from_dict({"peft_type": "C3A", "target_modules": ["q"], "block_size": 3})
    >>> check(torch.nn.Linear(8, 12), "linear", "q", cfg)
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: /block_size: ...
    """
    if kind not in KINDS:
        raise UnsupportedError(f"C3A adapts Linear layers only, not a {type(module).__qualname__} (PEFT 0.21.2 refuses "
                               "it too)", key=path, hint="remove the module from target_modules (or exclude it with "
                                                         "exclude_modules)")
    kernel_shape(*_in_out(module), config, path)
    quantized = quantization(module)
    if quantized is not None:
        raise UnsupportedError(f"C3A adds its delta to the base weight's values, and this layer's weight is quantized "
                               f"({quantized})", key=path, hint="load the adapter onto the unquantized model")


def shapes(module: nn.Module, kind: str, config: AdapterConfig, path: str) -> dict[str, tuple[int, ...]]:
    """``{"c3a_kernel": (out/b, in/b, b)}`` of ``config`` on this layer (PEFT's layout)."""
    del kind
    return {PARAM: kernel_shape(*_in_out(module), config, path)}


def initialise(params: dict[str, torch.Tensor], config: AdapterConfig, in_features: int, out_features: int) -> None:
    """PEFT's ``reset_c3a_parameters``, drawn as PEFT draws it (torch's generator, a float32 tensor on the CPU, then
    cast): ``init_weights`` true zeros; ``"gaussian"`` standard normals; ``"xavier_uniform"`` or false uniform in
    ``+-sqrt(3) * sqrt(2 / (in + out))``; ``"kaiming_uniform"`` uniform in ``+-sqrt(1 / in)``.

    >>> p = {"c3a_kernel": torch.ones(1, 2, 2)}
    >>> initialise(p, AdapterConfig.from_dict({"peft_type": "C3A", "target_modules": ["q"], "block_size": 2,
    ...                                        "init_weights": True}), 4, 2)
    >>> float(p["c3a_kernel"].abs().sum())
    0.0
    """
    kernel = params[PARAM]
    init = config.get("init_weights", "xavier_uniform")
    value = torch.zeros(kernel.shape, dtype=torch.float32)
    if init == "gaussian":
        nn.init.normal_(value)
    elif init == "kaiming_uniform":
        bound = 1.0 * math.sqrt(1.0 / float(in_features))
        nn.init.uniform_(value, -bound, bound)
    elif init is not True:  # "xavier_uniform" or false (the schema allows no other value)
        bound = math.sqrt(3.0) * (1.0 * math.sqrt(2.0 / float(in_features + out_features)))
        nn.init.uniform_(value, -bound, bound)
    with torch.no_grad():
        kernel.copy_(value)


class _BlockCircularConvolution(torch.autograd.Function):
    """PEFT's ``BlockCircularConvolution`` (c3a/utils.py): the forward through FFTs and its hand-written backward,
    operation for operation."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # noqa: D102 - PEFT's
        _, n, b = w.shape
        x = x.reshape(*x.shape[:-1], n, b)
        ctx.save_for_backward(x, w)
        x = torch.einsum("...nb,mnb->...mb", ifft(x), fft(w))
        x = fft(x).real
        return x.reshape(*x.shape[:-2], -1)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102 - PEFT's
        x, w = ctx.saved_tensors
        m, _, b = w.shape
        grad_output = grads[0].reshape(*grads[0].shape[:-1], m, b)
        grad_output_fft = fft(grad_output)
        x_grad = fft(torch.einsum("...mb,mnb->...nb", grad_output_fft, ifft(w))).real
        x_grad = x_grad.reshape(*x_grad.shape[:-2], -1)
        w_grad = fft(torch.einsum("...mb,...nb->mnb", grad_output_fft, ifft(x))).real
        return x_grad, w_grad


def circulant(kernel: torch.Tensor) -> torch.Tensor:
    """The ``[out, in]`` block-circulant matrix of ``kernel`` as PEFT's ``get_circulant_fast`` computes it (FFTs of
    the identity), in ``kernel``'s dtype.

    >>> circulant(torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.float64)).round().tolist()
    [[1.0, 2.0, 3.0], [3.0, 1.0, 2.0], [2.0, 3.0, 1.0]]
    """
    _, n, b = kernel.shape
    x = torch.eye(n * b, dtype=kernel.dtype, device=kernel.device)
    x = x.reshape(*x.shape[:-1], n, b)
    x = torch.einsum("...nb,mnb->...mb", ifft(x), fft(kernel))
    out: torch.Tensor = fft(x).real.flatten(start_dim=1).T
    return out


def delta_weight(weight: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: the float32 circulant rounded to the weight's dtype, then divided by ``in``."""
    return circulant(kernel.to(torch.float32)).to(weight.dtype) / weight.size(-1)


def forward(base: nn.Module, adapters: Sequence[torch.Tensor], x: torch.Tensor, args: Any, kwargs: Any, *,
            output: Callable[[Any], torch.Tensor] | None = None) -> torch.Tensor:
    """The layer's output with the active C3A adapter's kernel (``adapters``: one, the mix rule refuses more) applied
    as PEFT's ``forward``: the base output plus ``conv(x) / in`` in float32, cast to the base output's dtype, the sum
    cast back to the input's dtype.

    :param output: applied to what the base layer returns (the caller's check that it is one tensor).

    >>> layer = torch.nn.Linear(4, 2)
    >>> x = torch.ones(1, 4)
    >>> forward(layer, [torch.zeros(1, 2, 2)], x, (), {}).equal(layer(x))
    True
    """
    if len(adapters) != 1:
        raise UnsupportedError("two C3A adapters cannot run together on one layer (PEFT 0.21.2's forward chains them)",
                               hint="activate one C3A adapter per layer")
    previous = x.dtype
    out = base(x, *args, **kwargs)
    result = out if output is None else output(out)
    x32 = x.to(torch.float32)
    conv: torch.Tensor = _BlockCircularConvolution.apply(  # type: ignore[no-untyped-call]  # unannotated in torch
        x32, adapters[0].to(torch.float32))
    result = result + (conv / x32.size(-1)).to(result.dtype)
    final: torch.Tensor = result.to(previous)
    return final


def merge(weight: torch.Tensor, kernel: torch.Tensor) -> None:
    """``W <- W + delta`` in place (:func:`delta_weight`, PEFT's ``merge``).

    >>> layer = torch.nn.Linear(2, 2)
    >>> before = layer.weight.detach().clone()
    >>> merge(layer.weight, torch.tensor([[[2.0, 0.0]]]))
    >>> torch.allclose(layer.weight - before, torch.eye(2))
    True
    """
    with torch.no_grad():
        weight.data += delta_weight(weight.data, kernel)  # PEFT assigns weight + delta: the same sum


def unmerge(weight: torch.Tensor, kernel: torch.Tensor) -> None:
    """Undo :func:`merge` as PEFT does: ``W <- W - delta`` (the same rounded delta)."""
    with torch.no_grad():
        weight.data -= delta_weight(weight.data, kernel)
