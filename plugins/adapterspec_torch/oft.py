"""OFT and BOFT (SPEC.md 15.6, 15.7): orthogonal block-diagonal rotations of a layer's input features, PEFT 0.21's math.

Both methods turn their tensors into a block-diagonal orthogonal matrix ``R`` (Cayley transform of skew-symmetric
blocks) and run the base layer on the rotated input (``x @ R``); merged, the weight becomes ``W @ R.T`` (BOFT also
scales each output by ``boft_s``). The functions here are pure: :class:`~adapterspec_torch.layers.AdapterLayer`
calls them with its base layer and the tensors of its active OFT/BOFT adapters.

>>> import torch
>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "OFT", "target_modules": ["q"], "r": 0, "oft_block_size": 4})
>>> shapes(torch.nn.Linear(8, 3), "linear", cfg, "q")
{'oft_R.weight': (2, 6)}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from adapterspec import AdapterConfig
from adapterspec._oft import Rotation, block_sizes, param_shapes, rotation_of
from adapterspec.errors import UnsupportedError

from .computed import current

__all__ = ["METHODS", "Rotation", "check", "check_conv", "features", "forward", "initialise", "merge", "rotation", "settings", "shapes",
           "unmerge"]

#: The methods this module computes.
METHODS = ("OFT", "BOFT")

_LAYERS = ("linear", "conv2d")


def features(module: nn.Module, kind: str) -> int:
    """The dimension rotated (OFT, BOFT) or reflected (HRA): ``in_features``, or ``in_channels * k * k`` for a ``k x k``
    Conv2d (PEFT's ``conv_filter_dim``, HRA's ``hra_u`` rows)."""
    if kind == "linear":
        return int(cast(nn.Linear, module).in_features)
    conv = cast(nn.Conv2d, module)
    return int(conv.in_channels * conv.kernel_size[0] * conv.kernel_size[0])


def _sizes(module: nn.Module, kind: str, config: AdapterConfig, path: str) -> tuple[int, int]:
    """(number of blocks, block size) of ``config`` on this layer, as PEFT 0.21 decides them."""
    return block_sizes(features(module, kind), config, path)


def check(module: nn.Module, kind: str | None, path: str, config: AdapterConfig) -> None:
    """Refuse a layer the OFT/BOFT math of this backend does not cover exactly.

    :raises UnsupportedError: naming ``path`` and the reason.

    >>> from adapterspec import AdapterConfig
    >>> cfg = AdapterConfig.from_dict({"peft_type": "OFT", "target_modules": ["c"], "r": 0, "oft_block_size": 3})
    >>> check(torch.nn.Conv2d(3, 4, 3), "conv2d", "c", cfg)
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: c: ...
    """
    method = config.peft_type
    if kind not in _LAYERS:
        raise UnsupportedError(f"{method} cannot adapt a {type(module).__qualname__} layer (this backend adapts: "
                               f"{', '.join(_LAYERS)})", key=path,
                               hint="remove the module from target_modules (or exclude it with exclude_modules)")
    if kind == "conv2d":
        conv = cast(nn.Conv2d, module)
        if method == "OFT" and tuple(conv.kernel_size) != (1, 1):
            raise UnsupportedError(
                f"OFT on a Conv2d with kernel {tuple(conv.kernel_size)}: PEFT 0.21's unmerged forward (unfold, rotate, "
                "fold with overlap-add) differs from its merged weight for kernels larger than 1x1, so no exact "
                "result exists", key=path, hint="target 1x1 convolutions and linear layers only")
        check_conv(conv, path, method)
    _sizes(module, kind, config, path)



def check_conv(conv: nn.Conv2d, path: str, method: str) -> None:
    """Refuse a Conv2d whose input-side transform (OFT's and BOFT's rotation, HRA's reflections) PEFT computes from
    one square kernel, one stride and padding value, zero padding, no groups or dilation (the Keras backend's
    ``oft.check_site``).

    :raises UnsupportedError: naming the module and what differs.
    """
    odd = [f"{name}={value}" for name, value, ok in (
        ("groups", conv.groups, conv.groups == 1), ("dilation", conv.dilation, set(conv.dilation) == {1}),
        ("kernel_size", conv.kernel_size, len(set(conv.kernel_size)) == 1),
        ("stride", conv.stride, len(set(conv.stride)) == 1),
        ("padding", conv.padding, not isinstance(conv.padding, str) and len(set(conv.padding)) == 1),
        ("padding_mode", conv.padding_mode, conv.padding_mode == "zeros")) if not ok]
    if odd:
        raise UnsupportedError(f"{method} on a Conv2d with {', '.join(odd)}: PEFT's {method} convolution uses a square "
                               "kernel, one stride and padding value, zero padding, no groups or dilation (otherwise "
                               "its merged weight computes something else, or PEFT fails)", key=path,
                               hint="do not target this layer")


def settings(module: nn.Module, kind: str, config: AdapterConfig, path: str) -> Rotation:
    """The :class:`Rotation` of ``config`` on this layer.

    >>> from adapterspec import AdapterConfig
    >>> settings(torch.nn.Linear(8, 3), "linear", AdapterConfig.from_dict(
    ...     {"peft_type": "BOFT", "target_modules": ["q"], "boft_block_size": 2}), "q").blocks
    4
    """
    return rotation_of(features(module, kind), config, path)


def shapes(module: nn.Module, kind: str, config: AdapterConfig, path: str) -> dict[str, tuple[int, ...]]:
    """The spec parameter names and shapes of ``config`` on this layer (PEFT's layout).

    >>> from adapterspec import AdapterConfig
    >>> shapes(torch.nn.Linear(8, 3), "linear", AdapterConfig.from_dict(
    ...     {"peft_type": "BOFT", "target_modules": ["q"], "boft_block_size": 2}), "q")
    {'boft_R': (1, 4, 2, 2), 'boft_s': (3, 1)}
    """
    out = int(cast(nn.Linear, module).out_features if kind == "linear" else cast(nn.Conv2d, module).out_channels)
    return param_shapes(features(module, kind), out, config, path, conv=kind != "linear")


def initialise(params: dict[str, torch.Tensor], config: AdapterConfig) -> None:
    """PEFT's initialisation: the identity rotation (zeros, ``boft_s`` ones), or ``init_weights: false``'s noise.

    >>> from adapterspec import AdapterConfig
    >>> p = {"oft_R.weight": torch.empty(2, 6)}
    >>> initialise(p, AdapterConfig.from_dict({"peft_type": "OFT", "target_modules": ["q"]}))
    >>> float(p["oft_R.weight"].abs().sum())
    0.0
    """
    init = config.get("init_weights", True)
    for name, tensor in params.items():
        if init is False:
            nn.init.normal_(tensor, mean=1.0 if name == "boft_s" else 0.0, std=0.1)
        elif name == "boft_s":
            nn.init.ones_(tensor)
        else:
            nn.init.zeros_(tensor)


def _oft_blocks(spec: Rotation, vector: torch.Tensor) -> torch.Tensor:
    """OFT's ``[r, b, b]`` rotation blocks from the ``[r, b(b-1)/2]`` upper triangles (PEFT's ``_cayley_batch``)."""
    b, size = vector.shape[0], spec.block_size
    rows, cols = torch.triu_indices(size, size, 1, device=vector.device)
    skew = torch.zeros(b, size, size, device=vector.device, dtype=vector.dtype)
    skew[:, rows, cols] = vector
    skew = skew - skew.transpose(-2, -1)
    if not spec.neumann:
        eye = torch.eye(size, device=vector.device).unsqueeze(0).expand(b, size, size)
        solved: torch.Tensor = torch.linalg.solve(eye + skew, eye - skew, left=False)
        return solved.to(vector.dtype)
    result = torch.eye(size, device=vector.device, dtype=vector.dtype).repeat(b, 1, 1)
    if spec.terms > 1:  # I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1), in PEFT's order of operations
        result.add_(skew, alpha=2.0)
        if spec.terms > 2:
            power = torch.bmm(skew, skew)
            result.add_(power, alpha=2.0)
            for _ in range(3, spec.terms - 1):
                power = torch.bmm(power, skew)
                result.add_(power, alpha=2.0)
            result.add_(torch.bmm(power, skew))
    return result


def _boft_blocks(spec: Rotation, tensor: torch.Tensor, training: bool) -> torch.Tensor:
    """BOFT's ``[blocks, b, b]`` rotation blocks (PEFT's ``cayley_batch``; ``boft_dropout`` while training)."""
    n, d, h, _ = tensor.shape
    data = tensor.reshape(n * d, h, h)
    skew = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(h, device=data.device).unsqueeze(0).expand(n * d, h, h)
    solved: torch.Tensor = torch.linalg.solve(eye + skew, eye - skew, left=False)
    blocks = solved.to(data.dtype)
    if training and spec.dropout > 0:  # PEFT's MultiplicativeDropoutLayer: some blocks become the identity
        torch.randint(0, n, (1,))  # PEFT draws the factor to drop in first (one factor here): the same random stream
        chosen = int(spec.dropout * d)
        mask = torch.cat([torch.ones(chosen, device=data.device), torch.zeros(d - chosen, device=data.device)])
        mask = mask[torch.randperm(d)].view(d, 1, 1)
        blocks = (1 - mask) * blocks + mask * torch.eye(h, device=data.device)
    return blocks


def rotation(spec: Rotation, params: dict[str, torch.Tensor], *, training: bool = False) -> torch.Tensor:
    """The full ``[features, features]`` block-diagonal orthogonal matrix ``R`` of one adapter.

    >>> spec = Rotation("OFT", blocks=2, block_size=2)
    >>> rotation(spec, {"oft_R.weight": torch.zeros(2, 1)}).equal(torch.eye(4))
    True
    """
    if spec.method == "OFT":
        blocks = _oft_blocks(spec, params["oft_R.weight"])
        parts = [blocks[0]] * spec.blocks if blocks.shape[0] == 1 else list(blocks.unbind(0))
    else:
        parts = list(_boft_blocks(spec, params["boft_R"], training).unbind(0))
    full: torch.Tensor = torch.block_diag(*parts)  # type: ignore[no-untyped-call]
    return full


def _rotate_oft(spec: Rotation, vector: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x @ R`` computed per block, as PEFT's ``OFTRotationModule.forward`` does (an ``[..., C, H, W]`` input is
    rotated per pixel: the layer is a 1x1 convolution)."""
    dtype = x.dtype
    if dtype != vector.dtype:
        x = x.to(vector.dtype)
    blocks = _oft_blocks(spec, vector)
    image = x.dim() == 4
    if image:
        batch, channels, height, width = x.shape
        x = x.permute(0, 2, 3, 1).reshape(batch * height * width, channels)
    shape = x.shape
    parts = x.reshape(*shape[:-1], spec.blocks, spec.block_size)
    if blocks.shape[0] == 1:
        blocks = blocks.repeat(spec.blocks, 1, 1)
    rotated = torch.einsum("...rk,rkc->...rc", parts, blocks).reshape(*shape)
    if image:
        rotated = rotated.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    return rotated.to(dtype)


def forward(base: nn.Module, kind: str, adapters: Sequence[tuple[Rotation, dict[str, torch.Tensor]]],
            x: torch.Tensor, args: Any, kwargs: Any, *, training: bool,
            output: Callable[[Any], torch.Tensor] | None = None) -> torch.Tensor:
    """The base layer's output with the active OFT or BOFT ``adapters`` applied in order (PEFT's ``forward``).

    :param output: applied to what the base layer returns (the caller's check that it is one tensor).

    >>> layer = torch.nn.Linear(4, 2)
    >>> spec = Rotation("OFT", blocks=2, block_size=2)
    >>> x = torch.ones(1, 4)
    >>> forward(layer, "linear", [(spec, {"oft_R.weight": torch.zeros(2, 1)})], x, (), {}, training=False).equal(layer(x))
    True
    """
    previous = x.dtype
    if adapters[0][0].method == "OFT":
        for spec, params in adapters:
            vector = params["oft_R.weight"]
            x = _rotate_oft(spec, vector, x.to(vector.dtype))
        out: torch.Tensor = base(x.to(previous), *args, **kwargs)
        return (out if output is None else output(out)).to(previous)
    weight = current(base, "weight")  # not base.weight: an old weight-norm hook sets that in base's forward only
    count = features(base, kind)
    out_features = int(cast(nn.Linear, base).out_features if kind == "linear" else weight.shape[0])  # packed weights
    total = torch.eye(count, device=x.device, dtype=previous if kind == "linear" else x.dtype)
    scale = torch.ones((out_features, 1), device=x.device, dtype=total.dtype)
    for spec, params in adapters:
        matrix = rotation(spec, params, training=training).to(x)
        total = matrix @ total
        s = params["boft_s"] if kind == "linear" else params["boft_s"].transpose(0, 1)
        scale = s * scale
    bias = cast("torch.Tensor | None", base.bias)
    if kind == "linear":
        result: torch.Tensor = base(x @ total.to(previous), *args, **kwargs)
        if output is not None:
            result = output(result)
        if bias is not None:
            result = result - bias
        result = result * scale.squeeze(-1)
        if bias is not None:
            result = result + bias
        return result.to(previous)
    conv = cast(nn.Conv2d, base)
    x = x.to(weight.dtype)
    rotated = torch.mm(total, weight.reshape(out_features, count).transpose(0, 1)).transpose(0, 1)
    rotated = (rotated * scale).reshape(weight.shape)
    result = F.conv2d(x.to(rotated.dtype), rotated, bias=None if bias is None else bias.to(rotated.dtype),
                      padding=conv.padding[0], stride=conv.stride[0])
    return result.to(previous)


def _matrix_of(spec: Rotation, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """``R`` for merging: computed in fp32 for (b)float16 adapters on CPU, as PEFT does."""
    first = next(iter(params.values()))
    if first.device.type == "cpu" and first.dtype in (torch.float16, torch.bfloat16):
        return rotation(spec, {k: v.float() for k, v in params.items()}).to(first.dtype)
    return rotation(spec, params)


def merge(weight: torch.Tensor, spec: Rotation, params: dict[str, torch.Tensor]) -> None:
    """Rotate (and for BOFT scale) the base weight ``weight`` in place: ``W <- (R @ W.T).T`` (``* boft_s``).

    >>> layer = torch.nn.Linear(4, 2)
    >>> before = layer.weight.detach().clone()
    >>> merge(layer.weight, Rotation("OFT", blocks=2, block_size=2), {"oft_R.weight": torch.zeros(2, 1)})
    >>> layer.weight.equal(before)
    True
    """
    with torch.no_grad():
        matrix = _matrix_of(spec, params)
        flat = weight.data.view(weight.shape[0], -1)
        result = torch.mm(matrix, flat.t().to(matrix.dtype)).t()
        if spec.method == "BOFT":
            s = params["boft_s"]
            result = result * (s if s.shape[1] == 1 else s.transpose(0, 1))
        flat.copy_(result)


def unmerge(weight: torch.Tensor, spec: Rotation, params: dict[str, torch.Tensor]) -> None:
    """Undo :func:`merge`: OFT multiplies by ``R``'s inverse (fp32), BOFT by ``R.T`` and ``1 / boft_s``, as PEFT does.

    >>> layer = torch.nn.Linear(4, 2)
    >>> before = layer.weight.detach().clone()
    >>> params = {"oft_R.weight": torch.tensor([[0.1], [0.2]])}
    >>> merge(layer.weight, Rotation("OFT", blocks=2, block_size=2), params)
    >>> unmerge(layer.weight, Rotation("OFT", blocks=2, block_size=2), params)
    >>> torch.allclose(layer.weight, before, atol=1e-6)
    True
    """
    with torch.no_grad():
        matrix = _matrix_of(spec, params)
        flat = weight.data.view(weight.shape[0], -1)
        if spec.method == "OFT":
            previous = matrix.dtype
            inverse = torch.linalg.inv(matrix.float()).to(previous)
            flat.copy_(torch.mm(inverse, flat.t().to(previous)).t())
            return
        s = params["boft_s"]
        result = torch.mm(matrix.t(), flat.t().to(matrix.dtype)).t()
        flat.copy_(result * (1 / (s if s.shape[1] == 1 else s.transpose(0, 1))))
