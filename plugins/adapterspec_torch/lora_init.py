"""PiSSA and OLoRA: the residual base an adapter was trained against, rebuilt as PEFT rebuilds it (SPEC.md 8.1);
and a new adapter's orthogonal start.

PEFT 0.21.2 runs ``pissa_init`` / ``olora_init`` whenever it creates a LoRA layer with ``init_lora_weights``
``"pissa"`` / ``"olora"`` -- for a new adapter and at every load: it decomposes the layer's weight, takes ``A₀``,
``B₀`` from it and leaves the base as ``W_res = W − s·B₀A₀``. This module does the same, with PEFT's own torch
calls (so the residual is PEFT's to the bit), and puts ``W_res`` in as an override of the base weight
(:class:`~adapterspec_torch.auxiliary.Override`, saved under no key): the fingerprint still describes ``W``, and
deleting the adapter gives ``W`` back. A new adapter also takes ``A₀``, ``B₀`` (and DoRA's magnitude of
``W_res + s·B₀A₀``), as PEFT's new one does. A new ``"orthogonal"`` adapter takes PEFT's ``orthogonal_init``
(:func:`orthogonal_start`, the same torch calls: ``B₀A₀ = 0``), a new ``"mica"`` one PEFT's ``mica_init``.

>>> apply_init(model, get_state(model), cfg, "default", LoadOptions())   # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn

from adapterspec import AdapterConfig, LoadOptions
from adapterspec._lora_init import BASE_INITS, acted_init, layer_refusal
from adapterspec.errors import UnsupportedError

from .auxiliary import Override, _holders
from .layers import AdapterLayer, _in_out
from .offload import check_not_offloaded
from .quantized import weight_quantization
from .switch import ModelState

__all__ = ["apply_init", "orthogonal_start", "peft_residual"]


def peft_residual(init: str, weight: torch.Tensor, r: int, scaling: float, transposed: bool,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W_res, A₀, B₀)`` as PEFT 0.21.2's ``pissa_init`` / ``olora_init`` compute them for a layer's ``weight``
    (as stored: ``transposed`` for a transformers Conv1D, ``[in, out]``; ``W_res`` comes back stored alike).

    PiSSA works on ``[out, in]`` (PEFT's ``transpose(weight, fan_in_fan_out)``); OLoRA on the stored weight, as PEFT's
    does (so on a Conv1D only a square one fits the adapter's shapes: :func:`apply_init` refuses the others).
    """
    dtype = weight.dtype
    with torch.no_grad():
        if init == "pissa":
            w = weight.to(torch.float32)
            w = w.T if transposed else w
            v, s_values, uh = torch.linalg.svd(w, full_matrices=False)
            sr = s_values[:r] / scaling
            a = torch.diag(torch.sqrt(sr)) @ uh[:r]
            b = v[:, :r] @ torch.diag(torch.sqrt(sr))
            w_res = (w - scaling * b @ a).to(dtype)
            return (w_res.T if transposed else w_res).contiguous(), a, b
        w = weight.to(torch.float32)
        q, upper = torch.linalg.qr(w)
        a, b = upper[:r].contiguous(), q[:, :r].contiguous()
        return (w - scaling * b @ a).to(dtype), a, b


def orthogonal_start(r: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A₀, B₀)`` as PEFT 0.21.2's ``orthogonal_init`` draws them (torch's generator; ``r`` even; ``B₀A₀ = 0``,
    see :func:`adapterspec._lora_init.orthogonal_start`)."""
    q, _ = torch.linalg.qr(torch.randn(r, r))
    a = torch.randn(in_features, r // 2).mm(q[0::2, :]).T / 10.0
    b = torch.randn(r // 2, out_features).T.mm(q[1::2, :]) / 10.0
    return a.contiguous(), b.contiguous()


def apply_init(model: nn.Module, state: ModelState, config: AdapterConfig, adapter_name: str,
               options: LoadOptions) -> None:
    """Put the residual base of ``adapter_name`` (``init_lora_weights`` ``"pissa"``/``"olora"``) under each of its
    LoRA layers, as PEFT does when it creates them; a new adapter (``options.initialize``) also takes ``A₀``, ``B₀``
    -- and a new ``"orthogonal"`` or ``"mica"`` one PEFT's start of it.

    PEFT's embeddings run none of these inits but MiCA's (their base and start stay); convolutions cannot take them
    (PEFT refuses the config).

    :raises UnsupportedError: what :func:`adapterspec._lora_init.layer_refusal` refuses (a convolution; OLoRA on a
        non-square Conv1D; a layer whose weight holds a merged adapter or another adapter's residual, or is not
        float32, float16 or bfloat16; an odd rank for ``"orthogonal"``; MiCA's r above a side), naming the module.
    """
    init = acted_init(config, fresh=bool(options.initialize))
    if init is None:
        return
    overrides = state.base_weights.setdefault(adapter_name, [])
    replaced = {id(o.new) for each in state.base_weights.values() for o in each}
    base_frozen = bool(options.trainable and options.freeze_base)
    layers = [(spec_path, layer) for spec_path, own in state.modules[adapter_name].items()
              if isinstance(layer := state.wrappers.get(own), AdapterLayer) and adapter_name in layer.adapter_names()]
    holders = _holders(model, [layer.base_layer.weight for _, layer in layers])  # one walk of the model, not one a layer
    for spec_path, layer in layers:
        spec = layer._specs[adapter_name]
        old = layer.base_layer._parameters["weight"]
        assert old is not None
        in_features, out_features = _in_out(layer.base_layer, layer.kind)
        refusal = layer_refusal(init, kind=layer.kind, rank=spec.r, in_features=in_features,
                                out_features=out_features,
                                dtype=weight_quantization(old) or str(old.dtype).removeprefix("torch."),
                                hf_conv1d=layer.kind == "conv1d_hf",
                                not_base=bool(layer.merged_adapters) or id(old) in replaced)
        if init != "orthogonal":  # the others read the weight, and a residual base replaces it
            check_not_offloaded(layer.base_layer, spec_path, f"init_lora_weights {init!r}")
        if refusal is not None:
            pointer, reason, hint = refusal
            raise UnsupportedError(f"init_lora_weights {init!r} on {spec_path!r}: {reason}", key=spec_path,
                                   pointer=pointer, hint=hint)
        if init == "orthogonal" and layer.kind != "embedding":
            a, b = orthogonal_start(spec.r, in_features, out_features)
            _start_from(layer, adapter_name, a.to(old.dtype), b.to(old.dtype))
        elif init == "mica":
            _mica(layer, adapter_name)
        elif init in BASE_INITS and layer.kind != "embedding":
            transposed = layer.kind == "conv1d_hf"
            w_res, a, b = peft_residual(init, old.detach(), spec.r, spec.scaling, transposed)
            new = nn.Parameter(w_res, requires_grad=old.requires_grad and not base_frozen)
            slots = holders.get(id(old)) or _holders(model, [old]).get(id(old)) or [(layer.base_layer, "weight")]
            for holder, attr in slots:
                holder._parameters[attr] = new
            overrides.append(Override([], slots, old, new))
            if options.initialize:
                _start_from(layer, adapter_name, a, b)


def _mica(layer: AdapterLayer, adapter_name: str) -> None:
    """A new MiCA adapter's start, as PEFT 0.21.2's ``mica_init`` (its torch calls): ``B₀`` the left singular vectors
    of the ``r`` smallest singular values of the ``[out, in]`` weight (an embedding's ``[dim, num_embeddings]``),
    ``A₀`` zeros, both rounded to the weight's dtype. (Training leaves ``B`` frozen: ``frozen_params``.)"""
    weight = layer.base_layer.weight
    r = layer._specs[adapter_name].r
    with torch.no_grad():
        w = weight.to(torch.float32)
        w = w.T if layer.kind in ("conv1d_hf", "embedding") else w
        u = torch.linalg.svd(w, full_matrices=False)[0]
        b, a = u[:, -r:].contiguous(), torch.zeros(r, w.shape[1], device=w.device)
    _start_from(layer, adapter_name, a.to(weight.dtype), b.to(weight.dtype))


def _start_from(layer: AdapterLayer, adapter_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """A new adapter's ``A₀``, ``B₀`` (and DoRA's magnitude, of ``W_res + s·B₀A₀`` as PEFT's DoRA init takes it)."""
    params = layer._params_of(adapter_name)
    a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if layer.kind == "embedding" else \
        ("lora_A.weight", "lora_B.weight")
    if params[a_name].shape != a.shape or params[b_name].shape != b.shape:  # never broadcast
        raise AssertionError(f"A0 {list(a.shape)}, B0 {list(b.shape)} do not fit the layer's "
                             f"{list(params[a_name].shape)}, {list(params[b_name].shape)}")
    with torch.no_grad():
        params[a_name].copy_(a)
        params[b_name].copy_(b)
        if "lora_magnitude_vector" in params:
            layer._caches.pop(f"{adapter_name}-weight_norm", None)
            norm = layer._weight_norm(adapter_name, detach=True)
            params["lora_magnitude_vector"].copy_(norm.reshape(params["lora_magnitude_vector"].shape))
