"""GraLoRA (``GRALORA``; SPEC.md 17.5): a ``k x k`` grid of low-rank blocks (plus an optional plain LoRA pair),
PEFT 0.21.2's math.

The input is cut into ``k`` blocks of ``in/k`` features; block ``n`` goes through ``gralora_A[n]`` ``[in/k, r]``;
the ``r`` outputs of each are cut into ``k`` slices of ``r/k``; output block ``j`` gathers the ``j``-th slice of
every input block (``[k * r/k] = [r]``) and goes through ``gralora_B[j]`` ``[r, out/k]``. With ``hybrid_r > 0`` a
plain LoRA ``B_general @ A_general`` runs beside it. Both terms are scaled by ``alpha / (r + hybrid_r)`` and added
to the base output. The functions here are pure: :class:`~adapterspec_torch.layers.AdapterLayer` calls them with
its base layer and one adapter's tensors.

>>> import torch
>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "GRALORA", "target_modules": ["q"], "r": 4, "hybrid_r": 1})
>>> shapes(torch.nn.Linear(8, 6), "linear", cfg, "q")
{'gralora_A': (2, 4, 4), 'gralora_B': (2, 4, 3), 'gralora_A_general.weight': (1, 8), 'gralora_B_general.weight': (6, 1)}
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from adapterspec import AdapterConfig
from adapterspec._gralora import Granular, param_shapes, settings
from adapterspec.errors import UnsupportedError

from .quantized import refuse_quantized, weight_shape

__all__ = ["KINDS", "METHODS", "Granular", "check", "delta_weight", "initialise", "output", "settings", "shapes"]

#: The methods this module computes.
METHODS = ("GRALORA",)
#: The layer kinds PEFT's GraLoRA adapts (``nn.Linear`` and transformers ``Conv1D``; PEFT raises TypeError on others).
KINDS = ("linear", "conv1d_hf")


def _in_out(module: nn.Module, kind: str) -> tuple[int, int]:
    shape = weight_shape(module, kind)
    return (shape[0], shape[1]) if kind == "conv1d_hf" else (shape[1], shape[0])


def check(module: nn.Module, kind: str | None, path: str, config: AdapterConfig) -> None:
    """Refuse what PEFT refuses or has no layer for: sizes ``gralora_k`` does not divide (``/gralora_k``), a
    quantized layer (PEFT 0.21 has no quantized GraLoRA layer).

    :raises UnsupportedError: naming ``path``.
    """
    if kind not in KINDS:
        return
    refuse_quantized(module, path, "GraLoRA")
    param_shapes(*_in_out(module, kind), config, path)


def shapes(module: nn.Module, kind: str, config: AdapterConfig, path: str) -> dict[str, tuple[int, ...]]:
    """The module's tensors (:func:`adapterspec._gralora.param_shapes`)."""
    return param_shapes(*_in_out(module, kind), config, path)


def initialise(params: dict[str, torch.Tensor], config: AdapterConfig) -> None:
    """PEFT's init on torch's global generator, in PEFT's order (the same values under the same seed): per block
    ``n``, kaiming-uniform ``A_n`` ``[r, in/k]`` then ``B_n`` ``[out/k, r]`` (zeros unless ``init_weights`` is
    false), stacked and transposed; then the hybrid pair: the two draws ``nn.Linear`` makes when PEFT builds it,
    then kaiming ``A_general`` and ``B_general`` (zeros unless ``init_weights`` is false). Drawn in float32 on the
    CPU, as PEFT does, and copied."""
    g = settings(config)
    random_b = not config.get("init_weights", True)  # PEFT: ``if init_weights`` (null too starts B at noise)
    a, b = params["gralora_A"], params["gralora_B"]
    blocks_a, blocks_b = [], []
    for _ in range(g.k):
        new_a = torch.empty(g.r, a.shape[1])
        new_b = torch.empty(b.shape[2], g.r)
        nn.init.kaiming_uniform_(new_a, a=math.sqrt(5))
        if random_b:
            nn.init.kaiming_uniform_(new_b, a=math.sqrt(5))
        else:
            nn.init.zeros_(new_b)
        blocks_a.append(new_a)
        blocks_b.append(new_b)
    a.copy_(torch.stack(blocks_a).transpose(1, 2))
    b.copy_(torch.stack(blocks_b).transpose(1, 2))
    if g.hybrid_r > 0:
        general_a = torch.empty(tuple(params["gralora_A_general.weight"].shape))
        general_b = torch.empty(tuple(params["gralora_B_general.weight"].shape))
        nn.init.kaiming_uniform_(general_a, a=math.sqrt(5))  # nn.Linear(in, hybrid_r)'s own reset_parameters
        nn.init.kaiming_uniform_(general_b, a=math.sqrt(5))  # nn.Linear(hybrid_r, out)'s
        nn.init.kaiming_uniform_(general_a, a=math.sqrt(5))
        if random_b:
            nn.init.kaiming_uniform_(general_b, a=math.sqrt(5))
        else:
            nn.init.zeros_(general_b)
        params["gralora_A_general.weight"].copy_(general_a)
        params["gralora_B_general.weight"].copy_(general_b)


def _blocks(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """PEFT's two einsums on ``x`` ``[B, L, in]``: ``[B, L, out]``."""
    batch, length, in_features = x.shape
    sub = a.shape[2] // k
    hidden = torch.einsum("blni, nir -> blnr", x.view(batch, length, k, in_features // k), a)
    hidden = hidden.view(batch, length, k, k, sub).permute(0, 1, 3, 2, 4).reshape(batch, length, k, k * sub)
    return torch.einsum("bljr, jro -> bljo", hidden, b).reshape(batch, length, -1)


def output(g: Granular, params: dict[str, torch.Tensor], x: torch.Tensor, result: torch.Tensor, *,
           training: bool) -> torch.Tensor:
    """``result`` (the base output) plus the adapter's terms, as PEFT's forward adds them: the block term cast to
    the result's dtype, times the scaling, then (``hybrid_r > 0``) the hybrid term likewise; ``x`` cast to
    ``gralora_A``'s dtype, dropout drawn once per term. PEFT takes 2-D ``[B, in]`` and 3-D ``[B, L, in]`` inputs;
    other leading shapes are flattened to rows (the same per-row formula)."""
    a, b = params["gralora_A"], params["gralora_B"]
    dtype = result.dtype
    x = x.to(a.dtype)
    lead = x.shape[:-1]
    rows = x if x.dim() == 3 else x.unsqueeze(1) if x.dim() == 2 else x.reshape(-1, 1, x.shape[-1])
    dropped = F.dropout(rows, g.dropout, training=True) if g.dropout and training else rows
    term = _blocks(dropped, a, b, g.k).reshape(*lead, -1)
    result = result + g.scaling * term.to(dtype)
    if g.hybrid_r > 0:
        dropped = F.dropout(rows, g.dropout, training=True) if g.dropout and training else rows
        hybrid = F.linear(F.linear(dropped, params["gralora_A_general.weight"]), params["gralora_B_general.weight"])
        result = result + g.scaling * hybrid.reshape(*lead, -1).to(dtype)
    return result


def delta_weight(kind: str, g: Granular, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: the scaled update in the base weight's layout (``[in, out]`` for a Conv1D), in
    ``gralora_A``'s dtype -- computed in float32 for (b)float16 tensors on the CPU and cast back, as PEFT does."""
    a, b = params["gralora_A"], params["gralora_B"]
    dtype = a.dtype
    cast = a.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    if cast:
        a, b = a.float(), b.float()
    k, block_in, r = a.shape
    in_features, sub = k * block_in, r // k
    index = torch.arange(in_features, device=a.device)
    blocks, within = index // block_in, index % block_in
    scattered = torch.zeros(in_features, k, r, device=a.device, dtype=a.dtype)
    scattered.scatter_(1, blocks.unsqueeze(1).unsqueeze(2).expand(-1, 1, r), a[blocks, within, :].unsqueeze(1))
    delta = torch.einsum("ikr, kro -> iko",
                         scattered.view(in_features, k, k, sub).permute(0, 2, 1, 3).reshape(in_features, k, r),
                         b).reshape(in_features, -1).T
    if g.hybrid_r > 0:
        general_a, general_b = params["gralora_A_general.weight"], params["gralora_B_general.weight"]
        if cast:
            general_a, general_b = general_a.float(), general_b.float()
        delta = delta + general_b @ general_a
    delta = (delta.T if kind == "conv1d_hf" else delta) * g.scaling
    return delta.to(dtype) if cast else delta
