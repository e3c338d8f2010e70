"""VB-LoRA (SPEC.md 17.4): LoRA factors mixed from one vector bank shared by all modules, PEFT 0.21's math.

The bank ``[N, L]`` (``base_model.vblora_vector_bank``) is held once per adapter by the model's
:class:`~adapterspec_torch.vera.Shared` holder (the mechanism VeRA's projections use). Each module's logits
``[r, in/L, N]`` / ``[out/L, r, N]`` pick their ``topk`` vectors; the softmax of those logits mixes them into the
rows of ``A`` ``[r, in]`` and the columns of ``B`` ``[out, r]``; the layer adds ``x @ A.T @ B.T``. An adapter saved
with ``save_only_topk_weights`` is held as stored (indices and the first ``topk - 1`` weights): its logits are
rebuilt as PEFT's loader rebuilds them (``log`` of the weights at the indices, ``-inf`` elsewhere) at each use.
The functions here are pure: :class:`~adapterspec_torch.layers.AdapterLayer` calls them with its base layer, one
adapter's tensors and the bank.

>>> import torch
>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "VBLORA", "target_modules": ["q"], "r": 2, "num_vectors": 6,
...                                "vector_length": 4})
>>> shapes(torch.nn.Linear(8, 4), "linear", cfg)
{'vblora_logits_A': (2, 2, 6), 'vblora_logits_B': (1, 2, 6)}
>>> shared_shapes(cfg)
{'vblora_vector_bank': (6, 4)}
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from adapterspec import AdapterConfig
from adapterspec._vblora import INDICES, WEIGHTS, index_dtype, settings, topk_only, value_errors
from adapterspec.errors import UnsupportedError

from .quantized import refuse_quantized, weight_shape

__all__ = ["KINDS", "METHODS", "check", "check_values", "delta_weight", "dtypes", "initialise", "matrices",
           "output", "shapes", "shared_shapes"]

#: The methods this module computes.
METHODS = ("VBLORA",)
#: The layer kinds PEFT's VB-LoRA adapts (``nn.Linear`` and transformers ``Conv1D``).
KINDS = ("linear", "conv1d_hf")

_TORCH_INDEX = {"U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}


def _in_out(module: nn.Module, kind: str) -> tuple[int, int]:
    shape = weight_shape(module, kind)
    if kind == "conv1d_hf":
        return shape[0], shape[1]
    return shape[1], shape[0]


def check(module: nn.Module, kind: str | None, path: str, config: AdapterConfig) -> None:
    """Refuse what PEFT refuses or cannot run: in/out features not divisible by ``vector_length`` (PEFT's
    ``update_layer`` raises), and a quantized layer (PEFT's VB-LoRA has no quantized layers).

    :raises UnsupportedError: naming ``path`` (and ``/vector_length`` where that field decides).
    """
    if kind not in KINDS:
        return
    refuse_quantized(module, path, "VB-LoRA")
    in_f, out_f = _in_out(module, kind)
    length = settings(config)[2]
    for what, size in (("in_features", in_f), ("out_features", out_f)):
        if size % length:
            raise UnsupportedError(f"{what} {size} of this layer is not divisible by vector_length {length} (PEFT "
                                   "refuses it)", key=path, pointer="/vector_length",
                                   hint="pick a vector_length dividing every adapted layer's sizes, or do not "
                                        "target this layer")


def check_values(config: AdapterConfig, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse top-k indices outside the bank or repeated in a row, and top-k weights that are negative or sum above 1
    in a row (SPEC.md 17.4), before anything is assigned: torch would raise an untyped ``IndexError`` at the first
    forward, PEFT's loader keeps one of repeated weights and computes NaN on such weights. The Keras backend's
    ``check_values`` refuses the same.

    :raises TensorError: naming the tensor's key (:func:`adapterspec._vblora.value_errors`).
    """
    if config.peft_type not in METHODS or not topk_only(config):
        return
    arrays = {k: (t.detach().float() if k.rpartition(".")[2] in WEIGHTS else t.detach()).cpu().numpy()
              for k, t in tensors.items() if k.rpartition(".")[2] in (*INDICES, *WEIGHTS) and t.device.type != "meta"}
    errors = value_errors(config, arrays)
    if errors:
        raise errors[0]


def shapes(module: nn.Module, kind: str, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """The module's tensors: the logits ``[r, in/L, N]`` / ``[out/L, r, N]``, or (``save_only_topk_weights``) their
    ``_topk_indices`` ``[..., topk]`` and ``_topk_weights`` ``[..., topk - 1]``."""
    r, num_vectors, length, topk = settings(config)
    in_f, out_f = _in_out(module, kind)
    a, b = (r, in_f // length), (out_f // length, r)
    if not topk_only(config):
        return {"vblora_logits_A": (*a, num_vectors), "vblora_logits_B": (*b, num_vectors)}
    return {"vblora_logits_A_topk_indices": (*a, topk), "vblora_logits_A_topk_weights": (*a, topk - 1),
            "vblora_logits_B_topk_indices": (*b, topk), "vblora_logits_B_topk_weights": (*b, topk - 1)}


def dtypes(config: AdapterConfig) -> dict[str, torch.dtype]:
    """The tensors not in the adapter's float dtype: the top-k indices, in PEFT's integer dtype for ``num_vectors``."""
    if not topk_only(config):
        return {}
    dtype = _TORCH_INDEX[index_dtype(settings(config)[1])]
    return {"vblora_logits_A_topk_indices": dtype, "vblora_logits_B_topk_indices": dtype}


def shared_shapes(config: AdapterConfig) -> dict[str, tuple[int, int]]:
    """The bank ``[num_vectors, vector_length]``."""
    _, num_vectors, length, _ = settings(config)
    return {"vblora_vector_bank": (num_vectors, length)}


def initialise(params: dict[str, torch.Tensor], shared: dict[str, torch.Tensor], config: AdapterConfig) -> None:
    """PEFT's init of one module, in PEFT's order on torch's global generator: a fresh bank ``U(-bound, bound)``
    (PEFT draws one per adapted module; the last module's stays), then ``logits_A``, ``logits_B`` ``N(0, std)``,
    each drawn on the CPU in float32 as PEFT does and copied (the same values as PEFT under the same seed)."""
    bound = float(config.get("init_vector_bank_bound", 0.02) if config.get("init_vector_bank_bound") is not None
                  else 0.02)
    std = float(config.get("init_logits_std") if config.get("init_logits_std") is not None else 0.1)
    bank = shared["vblora_vector_bank"]
    values = torch.zeros(tuple(bank.shape))
    nn.init.uniform_(values, -bound, bound)
    bank.copy_(values)
    for name in ("vblora_logits_A", "vblora_logits_B"):
        values = torch.zeros(tuple(params[name].shape))
        nn.init.normal_(values, 0, std)
        params[name].copy_(values)


def _logits(params: dict[str, torch.Tensor], name: str, num_vectors: int) -> torch.Tensor:
    """``name``'s logits: stored, or rebuilt from its top-k as PEFT's loader does (``log`` of the weights, the last
    one ``1 - sum``, in float32, scattered at the indices into a float32 ``-inf`` matrix), in the weights' dtype."""
    if name in params:
        return params[name]
    stored = params[name + "_topk_weights"]
    weights = stored.float()  # PEFT reads F32 top-k weights only (SPEC.md 17.4): exact when they are
    indices = params[name + "_topk_indices"].to(torch.long)
    weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
    logits = torch.log(weights)
    dense = torch.full((*logits.shape[:-1], num_vectors), float("-inf"), dtype=torch.float32, device=logits.device)
    return dense.scatter(-1, indices, logits).to(stored.dtype)


def _mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """PEFT's ``_get_low_rank_matrix``: the softmax of the top-k logits mixes their vectors."""
    top, indices = logits.topk(topk, dim=-1)
    weights = F.softmax(top, dim=-1)
    return (weights.unsqueeze(-1) * bank[indices]).sum(-2)


def matrices(params: dict[str, torch.Tensor], shared: dict[str, torch.Tensor], config: AdapterConfig, *,
             cast_to_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` ``[r, in]`` and ``B`` ``[out, r]`` (PEFT's ``_get_lora_matrices``)."""
    r, num_vectors, _, topk = settings(config)
    logits_a = _logits(params, "vblora_logits_A", num_vectors)
    logits_b = _logits(params, "vblora_logits_B", num_vectors)
    bank = shared["vblora_vector_bank"].to(logits_a.device)
    if cast_to_fp32:
        logits_a, logits_b, bank = logits_a.float(), logits_b.float(), bank.float()
    a = _mix(logits_a, bank, topk).reshape(logits_a.shape[0], -1)
    b = _mix(logits_b, bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
    return a, b


def delta_weight(base: nn.Module, kind: str, params: dict[str, torch.Tensor], shared: dict[str, torch.Tensor],
                 config: AdapterConfig) -> torch.Tensor:
    """``B @ A`` in the base weight's layout (transposed for Conv1D); computed in float32 for float16/bfloat16
    tensors on the CPU, as PEFT does."""
    bank = shared["vblora_vector_bank"]
    cast = bank.device.type == "cpu" and bank.dtype in (torch.float16, torch.bfloat16)
    a, b = matrices(params, shared, config, cast_to_fp32=cast)
    delta = b @ a
    return delta.T if kind == "conv1d_hf" else delta


def output(params: dict[str, torch.Tensor], shared: dict[str, torch.Tensor], config: AdapterConfig,
           x: torch.Tensor, dropout: float, training: bool) -> torch.Tensor:
    """The adapter's term added to ``base(x)``: ``dropout(x) @ A.T @ B.T``, ``x`` cast to the bank's dtype."""
    a, b = matrices(params, shared, config)
    x = x.to(shared["vblora_vector_bank"].dtype)
    if dropout and training:
        x = F.dropout(x, dropout, training=True)
    return F.linear(F.linear(x, a), b)
