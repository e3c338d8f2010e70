"""PiSSA and OLoRA: the residual base an adapter was trained against, rebuilt as PEFT rebuilds it (SPEC.md 8.1);
and a new adapter's orthogonal start.

As the torch backend's module of the same name: PEFT 0.21.2 runs ``pissa_init`` / ``olora_init`` whenever it
creates a LoRA layer with ``init_lora_weights`` ``"pissa"`` / ``"olora"`` -- for a new adapter and at every load --
leaving the base as ``W_res = W − s·B₀A₀``. Here the module's weight is gathered from its Keras pieces in the spec's
``[out, in]`` layout, decomposed with NumPy (:func:`adapterspec._lora_init.residual`; an SVD or QR agrees with
torch's to rounding, their signs cancel in ``B₀A₀``) and written back into the kernels, recorded as overrides
(:class:`~adapterspec_keras.auxiliary.Override`, saved under no key): the fingerprint still describes ``W``, and
deleting the adapter gives ``W`` back. A new adapter also takes ``A₀``, ``B₀`` (and DoRA's magnitude). A new
``"orthogonal"`` adapter takes PEFT's orthogonal start (:func:`adapterspec._lora_init.orthogonal_start`, drawn
from Keras' seeded generator: ``B₀A₀ = 0``), a new ``"mica"`` one PEFT's minor singular vectors (:func:`_mica`).

>>> apply_init(model, get_state(model), cfg, "default", LoadOptions())   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops

from adapterspec import AdapterConfig, LoadOptions
from adapterspec._lora_init import BASE_INITS, acted_init, layer_refusal, mica_start, orthogonal_start, residual
from adapterspec.errors import UnsupportedError

from . import _ops
from .auxiliary import Override
from .layers import AdapterLayer
from .sites import ModuleSite
from .switch import ModelState

__all__ = ["apply_init", "site_weight"]


def site_weight(site: ModuleSite) -> np.ndarray:
    """The module's base weight in the spec's ``[out, in]`` layout, gathered from its pieces' kernels.

    :raises UnsupportedError: the pieces do not hold every element of it.
    """
    weight = np.zeros((site.out_features, site.in_features), dtype=np.float32)
    seen = np.zeros(weight.shape, dtype=bool)
    for piece in site.pieces:
        flat = np.asarray(ops.convert_to_numpy(_ops.flat_kernel(piece)), dtype=np.float32)  # [n_in, n_out]
        where = np.ix_(piece.out_index.ravel(), piece.in_index.ravel())
        weight[where] = flat.T
        seen[where] = True
    if not seen.all():
        raise UnsupportedError("the module's Keras kernels do not hold all of its weight", key=site.path,
                               pointer="/init_lora_weights", hint="leave this module out of target_modules")
    return weight


def apply_init(model: Any, state: ModelState, config: AdapterConfig, adapter_name: str, options: LoadOptions) -> None:
    """Put the residual base of ``adapter_name`` (``init_lora_weights`` ``"pissa"``/``"olora"``) into each of its
    LoRA modules' kernels, as PEFT does when it creates the layers; a new adapter (``options.initialize``) also takes
    ``A₀``, ``B₀`` -- and a new ``"orthogonal"`` or ``"mica"`` one PEFT's start of it. Embeddings keep their base
    and start (PEFT's run none of these inits but MiCA's); what a layer cannot take is refused as
    :func:`adapterspec._lora_init.layer_refusal` says, naming the module.
    Each kernel's override is recorded as soon as it is written, so a failure part way is undone with the adapter.
    """
    init = acted_init(config, fresh=bool(options.initialize))
    if init is None:
        return
    overrides = state.base_weights.setdefault(adapter_name, [])
    replaced = {id(o.variable) for name, each in state.base_weights.items() if name != adapter_name for o in each}
    mine: dict[int, Override] = {}  # a kernel several modules share (Swin's fused q/k/v): each writes its columns
    for layer in list(state.adapter_layers.values()):
        if not isinstance(layer, AdapterLayer) or adapter_name not in layer._slots:
            continue
        site, slot = layer.site, layer._slots[adapter_name]
        variables = list({id(p.kernel_variable): p.kernel_variable for p in site.pieces}.values())
        dtypes = sorted({_ops.dtype_name(v) for v in variables})
        kind = "conv1d_hf" if site.kind == "linear" and site.hf_conv1d else site.kind
        refusal = layer_refusal(init, kind=kind, rank=slot.rank, in_features=site.in_features,
                                out_features=site.out_features, dtype=", ".join(dtypes), hf_conv1d=site.hf_conv1d,
                                not_base=bool(layer.merged) or any(id(v) in replaced for v in variables))
        if refusal is not None:
            pointer, reason, hint = refusal
            raise UnsupportedError(f"init_lora_weights {init!r} on {slot.path!r}: {reason}", key=slot.path,
                                   pointer=pointer, hint=hint)
        if init == "orthogonal" and site.kind != "embedding":
            a, b = orthogonal_start(slot.rank, site.in_features, site.out_features, _normal)
            _start_from(layer, adapter_name, a, b)
        elif init == "mica":
            _mica(layer, adapter_name, dtypes[0])
        elif init in BASE_INITS and site.kind != "embedding":
            weight = site_weight(site)
            as_stored = init == "olora" and site.hf_conv1d  # PEFT's OLoRA factors the Conv1D weight as stored
            w_res, a, b = residual(init, weight.T if as_stored else weight, slot.rank, slot.scaling)
            w_res = w_res.T if as_stored else w_res
            for variable in variables:
                if id(variable) not in mine:
                    old = np.array(ops.convert_to_numpy(variable))
                    mine[id(variable)] = Override([], variable, old, old)
                    overrides.append(mine[id(variable)])
            for piece in site.pieces:
                _ops.assign_kernel(piece, w_res[np.ix_(piece.out_index.ravel(), piece.in_index.ravel())].T)
            for variable in variables:
                mine[id(variable)].new = np.array(ops.convert_to_numpy(variable))
            if options.initialize:
                _start_from(layer, adapter_name, a, b)


def _normal(shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal samples from Keras' generator (``keras.utils.set_random_seed`` makes them repeat)."""
    import keras

    return np.asarray(ops.convert_to_numpy(keras.random.normal(shape, dtype="float32")))


def _mica(layer: AdapterLayer, adapter_name: str, dtype: str) -> None:
    """A new MiCA adapter's start, as PEFT 0.21.2's ``mica_init`` (:func:`adapterspec._lora_init.mica_start`), rounded
    to the kernel's ``dtype`` as PEFT rounds it. (Training leaves ``B`` frozen: ``frozen_params``.)"""
    a, b = mica_start(site_weight(layer.site), layer._slots[adapter_name].rank)  # an embedding's [dim, num], as PEFT
    _start_from(layer, adapter_name, a, np.asarray(ops.convert_to_numpy(ops.cast(ops.cast(b, dtype), "float32"))))


def _start_from(layer: AdapterLayer, adapter_name: str, a: np.ndarray, b: np.ndarray) -> None:
    """A new adapter's ``A₀``, ``B₀`` (and DoRA's magnitude, of ``W_res + s·B₀A₀`` as PEFT's DoRA init takes it)."""
    _, layouts, refs = layer.parameters(adapter_name)
    a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if layer.site.kind == "embedding" else \
        ("lora_A.weight", "lora_B.weight")
    if layouts[a_name].spec_shape != a.shape or layouts[b_name].spec_shape != b.shape:
        raise AssertionError(f"A0 {list(a.shape)}, B0 {list(b.shape)} do not fit the layer's "  # never reshaped
                             f"{list(layouts[a_name].spec_shape)}, {list(layouts[b_name].spec_shape)}")
    bank = layer.bank(adapter_name)
    bank.assign(refs[a_name], layouts[a_name].to_stored(a))
    bank.assign(refs[b_name], layouts[b_name].to_stored(b))
    slot = layer._slots[adapter_name]
    if slot.use_dora:
        bank.assign(refs["lora_magnitude_vector"], layer._weight_norm(slot, scaling=slot.scaling))
