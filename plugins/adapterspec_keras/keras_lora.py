"""Keras' own LoRA as a spec adapter: what ``enable_lora`` trained, in PEFT's names and layout.

keras-hub's fine-tuning guides train with Keras' built-in LoRA: ``backbone.enable_lora(rank)`` (the attention's
query and value layers) or ``layer.enable_lora(rank, lora_alpha)``. Such a ``Dense``, ``EinsumDense`` or
``Embedding`` holds ``lora_kernel_a`` (the kernel's shape with its last axis replaced by ``rank``) and
``lora_kernel_b`` (``[rank, kernel.shape[-1]]``) and computes with ``kernel + (lora_alpha / rank) * (a @ b)``.
:func:`keras_lora_adapter` reads them into a LoRA adapter whose delta is that one, exactly, on the transformers
modules keras-hub's converter maps the layers to, so PEFT (or any backend) loads it.

On a ``Dense`` (and an ``EinsumDense`` whose kernel has one output axis, last), Keras' LoRA is PEFT's of the same
rank: ``lora_A = a^T``, ``lora_B = b^T``. On an ``EinsumDense`` whose kernel has further output axes before the last
(keras-hub's query, key and value: ``(hidden, heads, head_dim)``), ``a @ b`` contracts only the rank axis, so each
head has its own ``a`` and all heads share ``b``: a delta of rank up to ``heads * rank``, not ``rank``. The adapter
then has rank ``heads * rank``: ``lora_A`` stacks the heads' ``a``, ``lora_B`` is block-diagonal, one copy of ``b^T``
per head (zeros elsewhere), and ``lora_alpha`` is ``heads * lora_alpha``, so the scaling is Keras' own. Where the
kernel's last axis is an input axis, the roles swap. An ``Embedding``'s LoRA is PEFT's embedding LoRA
(``lora_embedding_A = a^T``, ``lora_embedding_B = b^T``); a ``ReversibleEmbedding`` with tied weights applies it to
the logits too, which PEFT does with ``ensure_weight_tying`` (SPEC.md 15.2), so the adapter sets it and holds the
tied output layer's tensors.

The model is not changed. A keras-hub ``.lora.h5`` file (``backbone.save_lora_weights``) is read by loading it
first: ``backbone.load_lora_weights(path)``.

>>> import adapterspec, keras_hub                                       # doctest: +SKIP
>>> model = keras_hub.models.GemmaCausalLM.from_preset("./hf-gemma")    # doctest: +SKIP
>>> model.backbone.enable_lora(4); model.fit(...)                       # doctest: +SKIP
>>> adapter = keras_lora_adapter(model, base_model_name_or_path="google/gemma-2b")  # doctest: +SKIP
>>> adapterspec.write_adapter("gemma-lora", adapter.config, adapter.arrays)        # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from adapterspec import Adapter, LoadOptions
from adapterspec._rules import peft_fan_in_fan_out
from adapterspec.errors import TargetNotFoundError, UnsupportedError
from adapterspec.naming import make_key

from .devices import host_array
from .identity import task_type_of
from .mapping import spec_sites
from .quantized import packed_hint, quantization
from .sites import ModuleSite, Piece, keras_lora, model_layers, own_name, packed

__all__ = ["keras_lora_adapter"]

_HINT = "call enable_lora on the layers you train (keras-hub: backbone.enable_lora(rank)), or load_lora_weights first"


def keras_lora_adapter(model: Any, *, module_map: Mapping[str, Any] | None = None,
                       base_model_name_or_path: str | None = None) -> Adapter:
    """The LoRA Keras' own ``enable_lora`` put on ``model``'s layers, as an in-memory spec adapter (PEFT layout).

    :param module_map: spec module path -> Keras layer (or its path), for layers keras-hub's converter does not
        map (as :class:`~adapterspec.LoadOptions`' ``module_map``).
    :param base_model_name_or_path: recorded in the config (a keras-hub model does not know its preset).
    :raises TargetNotFoundError: no layer of ``model`` has Keras' LoRA on.
    :raises UnsupportedError: a layer with Keras' LoRA that no spec module maps to (a packed one the converter's map
        did not find among them; ``module_map`` maps it), a convolution, a
        quantized kernel whose LoRA a converter fused with others, or two layers of one module with different
        scalings -- naming the layer.

    >>> adapter = keras_lora_adapter(causal_lm)                           # doctest: +SKIP
    >>> adapter.config["r"], sorted(adapter.tensors)[:1]                  # doctest: +SKIP
    (16, ['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'])
    """
    native = [layer for layer in model_layers(model) if keras_lora(layer)]
    if not native:
        raise TargetNotFoundError(f"no layer of this {type(model).__name__} has Keras' own LoRA on (enable_lora)",
                                  key=type(model).__name__, hint=_HINT)
    sites = spec_sites(model, LoadOptions(module_map=dict(module_map)) if module_map else None)
    chosen = {path: site for path, site in sites.items() if any(keras_lora(p.layer) for p in site.pieces)}
    covered = {id(p.layer) for site in chosen.values() for p in site.pieces}
    missing = sorted((layer for layer in native if id(layer) not in covered), key=lambda layer: not packed(layer))
    if missing and packed(missing[0]):
        raise UnsupportedError(
            f"{type(missing[0]).__name__} {own_name(model, missing[0])!r} has Keras' LoRA on and is quantized "
            f"{quantization(missing[0])}, its kernel stored packed, not in its shape, and keras-hub's converter map did not "
            "find it, so the adapter would lose its delta",
            key=own_name(model, missing[0]), hint=packed_hint("every layer with Keras' LoRA on", int8=False))
    if missing:
        raise UnsupportedError(
            f"{type(missing[0]).__name__} {own_name(model, missing[0])!r} has Keras' LoRA on but is no transformers "
            "module of this model's mapping, so the adapter would lose its delta", key=own_name(model, missing[0]),
            hint="pass module_map={spec module path: keras layer} for it")
    tensors: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple[int, float]] = {}  # module -> (rank, alpha)
    tied: dict[str, str] = {}  # tied logits projection -> its embedding
    for path, site in chosen.items():
        if any(p.kind == "reverse" for p in site.pieces):
            continue  # the tied logits projection: written with its embedding (below)
        a, b, rank, alpha = _factors(path, site)
        shapes[path] = (rank, alpha)
        if site.kind == "embedding":
            tensors[make_key(path, "lora_embedding_A")] = a
            tensors[make_key(path, "lora_embedding_B")] = b
            for head in _tied_heads(sites, site):
                tied[head] = path
                tensors[make_key(head, "lora_A.weight")] = np.ascontiguousarray(b.T)
                tensors[make_key(head, "lora_B.weight")] = np.ascontiguousarray(a.T)
        else:
            tensors[make_key(path, "lora_A.weight")] = a
            tensors[make_key(path, "lora_B.weight")] = b
    config = _config(model, sites, shapes, tied, base_model_name_or_path)
    return Adapter.from_tensors(config, tensors)


def _factors(path: str, site: ModuleSite) -> tuple[np.ndarray, np.ndarray, int, float]:
    """``(lora_A [R, in], lora_B [out, R], R, lora_alpha)`` whose ``B @ A * lora_alpha / R`` is the module's
    delta, ``W[out, in]``, from the LoRA of each of its pieces (a piece without one adds nothing)."""
    blocks: list[tuple[np.ndarray, np.ndarray, Piece]] = []
    scales: set[float] = set()
    per_rank: set[tuple[float, int]] = set()
    for piece in site.pieces:
        if not keras_lora(piece.layer):
            continue
        if piece.kind == "conv":
            raise UnsupportedError(f"{type(piece.layer).__name__} {piece.layer.path!r}: Keras' LoRA on a convolution "
                                   "is not read yet", key=path, hint="leave enable_lora off convolutions")
        scales.add(float(piece.layer.lora_alpha) / int(piece.layer.lora_rank))
        per_rank.add((float(piece.layer.lora_alpha), int(piece.layer.lora_rank)))
        blocks.append((*_piece_factors(piece), piece))
    if len(scales) > 1:
        raise UnsupportedError(f"the Keras layers of {path} have LoRA with different lora_alpha / rank "
                               f"({sorted(scales)}), and a spec module has one scaling", key=path,
                               hint="enable_lora with one rank and lora_alpha on these layers")
    rank = sum(a.shape[0] for a, _, _ in blocks)
    a_full = np.zeros((rank, site.in_features), np.float32)
    b_full = np.zeros((site.out_features, rank), np.float32)
    start = 0
    for a, b, piece in blocks:
        rows = np.arange(start, start + a.shape[0])
        a_full[np.ix_(rows, piece.in_index.reshape(-1))] = a
        b_full[np.ix_(piece.out_index.reshape(-1), rows)] = b
        start += a.shape[0]
    alpha_k, rank_k = next(iter(per_rank)) if len(per_rank) == 1 else (scales.pop() * rank, rank)
    alpha = alpha_k * rank / rank_k  # the scaling alpha / R is Keras' alpha_k / rank_k, to the last bit
    return a_full, b_full, rank, alpha


def _piece_factors(piece: Piece) -> tuple[np.ndarray, np.ndarray]:
    """One layer's Keras LoRA as ``(A [R, kernel inputs], B [kernel outputs, R])``, kernel positions in the order of
    ``piece.in_index`` / ``piece.out_index`` (the kernel's input and output axes in kernel order, flattened)."""
    name = "embeddings" if piece.kind in ("embedding", "reverse") else "kernel"
    a = host_array(getattr(piece.layer, f"lora_{name}_a")).astype(np.float32)  # kernel.shape[:-1] + (r,)
    b = host_array(getattr(piece.layer, f"lora_{name}_b")).astype(np.float32)  # (r, kernel.shape[-1])
    r = b.shape[0]
    kin: tuple[int, ...] = (0,)
    kout: tuple[int, ...] = (1,)
    if piece.kind not in ("dense", "embedding"):
        letters = piece.kernel_spec
        kin = tuple(letters.index(c) for c in piece.kin)
        kout = tuple(letters.index(c) for c in piece.kout)
    if piece.out_slice is not None:  # columns start:stop of a fused Dense kernel
        b = b[:, piece.out_slice[0]:piece.out_slice[1]]
    last = a.ndim - 1  # the kernel's last axis: b's columns
    if last in kout:  # leading output axes (heads): one A block per head, B block-diagonal
        heads = [ax for ax in kout if ax != last]
        n = int(np.prod([a.shape[ax] for ax in heads], dtype=np.int64))
        a_rows = a.transpose(*heads, last, *kin).reshape(n * r, -1)  # row (head, rho), column: kernel input
        b_cols = np.kron(np.eye(n, dtype=np.float32), b.T)  # row (head, j), column (head, rho)
        return a_rows, b_cols
    outs = list(kout)
    groups = [ax for ax in kin if ax != last]  # leading input axes: one B block per group, A block-diagonal
    n = int(np.prod([a.shape[ax] for ax in groups], dtype=np.int64))
    b_cols = a.transpose(*outs, *groups, last).reshape(-1, n * r)  # row: kernel output, column (group, rho)
    a_rows = np.kron(np.eye(n, dtype=np.float32), b)  # row (group, rho), column (group, j)
    return a_rows, b_cols


def _tied_heads(sites: dict[str, ModuleSite], embedding: ModuleSite) -> list[str]:
    """The logits projections that read ``embedding``'s weight (a tied ``ReversibleEmbedding``)."""
    layer = embedding.pieces[0].layer
    return [path for path, site in sites.items()
            if any(p.kind == "reverse" and p.tied and p.layer is layer for p in site.pieces)]


def _config(model: Any, sites: dict[str, ModuleSite], shapes: dict[str, tuple[int, float]], tied: dict[str, str],
            base: str | None) -> dict[str, Any]:
    """PEFT's LoRA config: the modules by their last name where that picks exactly them, the most common rank and
    alpha, ``rank_pattern``/``alpha_pattern`` for the others (by last name where one value holds for the name)."""
    (rank, alpha), _ = Counter(shapes.values()).most_common(1)[0]
    chosen = set(shapes)
    by_name: dict[str, list[str]] = {}
    for path in sites:
        if not any(p.kind == "reverse" for p in sites[path].pieces):
            by_name.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    targets: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for head, embedding in tied.items():  # the tied layer's LoRA has the embedding's rank (SPEC.md 15.2)
        if shapes[embedding][0] != rank:
            rank_pattern[re.escape(head)] = shapes[embedding][0]
        if shapes[embedding][1] != alpha:
            alpha_pattern[re.escape(head)] = _number(shapes[embedding][1])
    for name, paths in by_name.items():
        mine = [p for p in paths if p in chosen]
        if not mine:
            continue
        whole = len(mine) == len(paths) and len({shapes[p] for p in mine}) == 1
        keys = [(name, mine[0])] if whole else [(re.escape(p), p) for p in mine]
        targets += [name] if whole else mine
        for key, path in keys:
            if shapes[path][0] != rank:
                rank_pattern[key] = shapes[path][0]
            if shapes[path][1] != alpha:
                alpha_pattern[key] = _number(shapes[path][1])
    kinds = ["conv1d_hf" if sites[p].hf_conv1d else sites[p].kind for p in shapes]
    config: dict[str, Any] = {
        "peft_type": "LORA", "r": rank, "lora_alpha": _number(alpha), "lora_dropout": 0.0, "bias": "none",
        "target_modules": targets, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": base, "task_type": task_type_of(model),
    }
    if tied:
        config["ensure_weight_tying"] = True
    if peft_fan_in_fan_out(config, kinds):
        config["fan_in_fan_out"] = True
    return config


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)
