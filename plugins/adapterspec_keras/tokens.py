"""Trainable token rows (LoRA's ``trainable_token_indices``, PEFT's ``TrainableTokensLayer``) on Keras layers.

While the adapter is active, rows ``indices`` of an embedding's matrix are the adapter's
``token_adapter.trainable_tokens_delta`` (``[len(indices), dim]``; despite the name, not deltas): a lookup of one
of those ids gives its row, and a logits projection (``lm_head``: a ``ReversibleEmbedding``'s reverse call, or a
Dense output layer) computes those output features with them. With tied word embeddings (an array of indices,
or an object whose names give the head the embedding's indices) the head uses the embedding's rows: one tensor,
saved under the embedding's key (PEFT's ``_set_trainable`` and its weight tying; SPEC.md 5.3, 8.8).

Unmerged the forward pass puts the rows in (:func:`apply_rows`); merged they are written into the kernel
(:func:`merge_rows`), and unmerging writes the saved base rows back -- bit-exact either way.

The ``TRAINABLE_TOKENS`` method (SPEC.md 15.2, PEFT's ``TrainableTokensModel``) uses the same rows; only the
selection (:func:`method_token_targets`) and the tensor's name differ: ``<module>.trainable_tokens_delta`` (no
``token_adapter.`` infix), saved under a tied output layer's name too.

>>> find_token_targets(model, cfg, sites, set())                          # doctest: +SKIP
[('model.embed_tokens', [3, 7], None), ('lm_head', [3, 7], 'model.embed_tokens')]
>>> method_token_targets(model, method_cfg, sites)                        # doctest: +SKIP
[('model.embed_tokens', [5, 9], None), ('lm_head', [5, 9], 'model.embed_tokens')]
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops

from adapterspec import AdapterConfig
from adapterspec.errors import ShapeMismatchError, TargetNotFoundError, UnsupportedError
from adapterspec.naming import TRAINABLE_TOKENS_PARAM, make_key

from . import _ops
from .sites import ModuleSite, Piece

__all__ = ["DELTA", "METHOD", "TOKENS", "apply_rows", "check_site", "find_token_targets", "merge_rows",
           "method_token_targets", "row_shape", "unmerge_rows"]

#: The pseudo-method of trainable token rows inside an :class:`~adapterspec_keras.layers.AdapterLayer`.
TOKENS = "TOKENS"
#: The ``TRAINABLE_TOKENS`` method's ``peft_type``.
METHOD = "TRAINABLE_TOKENS"
#: The ``TRAINABLE_TOKENS`` method's tensor name under its module.
DELTA = "trainable_tokens_delta"


def _input_embedding(model: Any, sites: dict[str, ModuleSite]) -> str | None:
    """The spec path of the model's input embedding (keras-hub's ``token_embedding``, PEFT's
    ``get_input_embeddings()``), or ``None`` when the model has none to tell."""
    from .converters import backbone_of

    token = getattr(backbone_of(model), "token_embedding", None)
    if token is None:
        return None
    return next((path for path, site in sites.items()
                 if site.kind == "embedding" and site.pieces[0].layer is token), None)


def _tied_heads(sites: dict[str, ModuleSite], embedding: str | None) -> list[str]:
    """The spec paths of logits projections whose kernel is the embedding's matrix (tied word embeddings)."""
    if embedding is None:
        return []
    layer = sites[embedding].pieces[0].layer
    return [path for path, site in sites.items()
            if any(p.kind == "reverse" and p.tied and p.layer is layer for p in site.pieces)]


def find_token_targets(model: Any, config: AdapterConfig, sites: dict[str, ModuleSite],
                       taken: set[str]) -> list[tuple[str, list[int], str | None]]:
    """LoRA ``trainable_token_indices``: (spec path, indices, tied source path or ``None``) per module whose rows
    the adapter replaces, PEFT's rules (as the torch backend's function of the same name):

    * an array names the model's input embedding; an object maps names to indices, each name selecting every
      module whose path ends with it;
    * with tied word embeddings, the logits projection sharing the embedding's matrix replaces the same rows
      (no tensor of its own), unless the object gives it other indices (then it has its own rows).

    :raises TargetNotFoundError: a name of the object selects no module, or there is no input embedding.
    :raises UnsupportedError: a selected module is also adapted by this adapter.
    :raises ShapeMismatchError: an index outside the matrix.
    """
    indices = config.get("trainable_token_indices") if config.peft_type == "LORA" else None
    if not indices:
        return []
    embedding = _input_embedding(model, sites)
    if isinstance(indices, list):
        # a model whose input embedding is unknown: PEFT's fallback name (SPEC.md 4.3)
        layers = {embedding if embedding is not None else "embed_tokens": [int(i) for i in indices]}
    else:
        layers = {name: [int(i) for i in rows] for name, rows in indices.items()}
    tied = _tied_heads(sites, embedding)
    found: list[tuple[str, list[int], str | None]] = []
    for name, rows in layers.items():
        matches = [path for path in sites if path.endswith(name)]
        if not matches:
            raise TargetNotFoundError(f"trainable_token_indices names {name!r}, which matches no module of the model",
                                      pointer="/trainable_token_indices", hint="name the embedding layer")
        found.extend((path, rows, None) for path in matches)
    chosen = {path: rows for path, rows, _ in found}
    if embedding in chosen:
        rows = chosen[embedding]
        named = [path for path in tied if path in chosen]
        if all(chosen[path] == rows for path in named):  # else each keeps its own rows, untied (PEFT's mismatch)
            found = [(path, r, None) for path, r, _ in found if path not in named]
            found.extend((path, rows, embedding) for path in tied)
    for path, rows, _ in found:
        if path in taken:
            raise UnsupportedError("module is named by trainable_token_indices and also adapted by this adapter",
                                   key=path, hint="remove it from target_modules, or from trainable_token_indices")
        check_site(sites[path], path, rows)
    return found


def method_token_targets(model: Any, config: AdapterConfig,
                         sites: dict[str, ModuleSite]) -> list[tuple[str, list[int], str | None]]:
    """The ``TRAINABLE_TOKENS`` method: (spec path, ``token_indices``, tied source path or ``None``) per layer whose
    rows the adapter replaces (as the torch backend's function of the same name).

    ``target_modules`` null selects the input embedding (PEFT writes its path); otherwise the usual matching
    (SPEC.md 4.3), a module known by two names once. With tied word embeddings and the input embedding selected,
    the logits projection sharing its matrix follows it (same rows, same tensor, saved under its name too).

    :raises TargetNotFoundError: nothing is selected (names ``/target_modules``).
    :raises UnsupportedError: a tied layer is selected too (PEFT 0.21 wraps it twice), or a Dense layer with a
        bias (PEFT 0.21 drops the bias while the adapter is active).
    """
    indices = [int(i) for i in config.get("token_indices") or []]
    embedding = _input_embedding(model, sites)
    if config.get("target_modules") is None:
        selected = [embedding] if embedding is not None else []
    else:
        taken: set[Any] = set()
        selected = []
        for path, site in sites.items():
            if config.matches(path) and site.key not in taken:
                taken.add(site.key)
                selected.append(path)
    if not selected:
        raise TargetNotFoundError(f"target_modules={config.get('target_modules')!r} selects no layer of the model",
                                  pointer="/target_modules", hint="name the embedding layer, or leave the field null")
    for path in selected:
        if any(p.kind == "dense" and p.bias_variable is not None for p in sites[path].pieces):
            raise UnsupportedError("TRAINABLE_TOKENS on a Dense layer with a bias: PEFT 0.21 drops the bias while the "
                                   "adapter is active", key=path, pointer="/target_modules",
                                   hint="select embedding layers, or Dense layers without bias")
    found: list[tuple[str, list[int], str | None]] = [(path, indices, None) for path in selected]
    if embedding is not None and embedding in selected:
        for head in _tied_heads(sites, embedding):
            if head in selected:
                raise UnsupportedError(
                    f"target_modules selects {head!r}, which shares the input embedding's matrix: PEFT 0.21 wraps it "
                    "twice (a base_layer.trainable_tokens_delta of its own)", key=head, pointer="/target_modules",
                    hint="select the input embedding only; the tied layer follows it")
            found.append((head, indices, embedding))
    for path, rows, _ in found:
        check_site(sites[path], path, rows, DELTA)
    return found


def check_site(site: ModuleSite, path: str, indices: list[int], param: str = TRAINABLE_TOKENS_PARAM) -> None:
    """Refuse a module whose rows this backend cannot replace, or indices outside its matrix.

    :param param: the rows tensor's name (``trainable_tokens_delta`` for the ``TRAINABLE_TOKENS`` method).
    :raises UnsupportedError: not one embedding / Dense / logits-projection layer, or repeated indices.
    :raises ShapeMismatchError: an index outside the matrix.
    """
    field = "/token_indices" if param == DELTA else "/trainable_token_indices"
    piece = site.pieces[0]
    whole = len(site.pieces) == 1 and piece.out_slice is None and piece.n_in == site.in_features and \
        piece.n_out == site.out_features and \
        np.array_equal(piece.in_index.ravel(), np.arange(piece.n_in)) and \
        np.array_equal(piece.out_index.ravel(), np.arange(piece.n_out))
    if not whole or piece.kind not in ("embedding", "reverse", "dense"):
        raise UnsupportedError(f"{field[1:]} needs an embedding or an output layer that is one plain "
                               f"Keras layer, not {[type(p.layer).__name__ for p in site.pieces]}", key=path,
                               hint=f"name the embedding layer in {field[1:]}")
    if len(set(indices)) != len(indices):
        raise UnsupportedError(f"{field[1:]} for {path!r} repeats an index", pointer=field,
                               hint="list each token index once")
    rows = site.in_features if site.kind == "embedding" else site.out_features
    bad = [i for i in indices if not 0 <= i < rows]
    if bad:
        raise ShapeMismatchError(f"{field[1:]} {bad} are outside the layer's {rows} rows",
                                 key=make_key(path, param),
                                 hint="resize the model's embeddings first, or check the indices")


def row_shape(site: ModuleSite, count: int) -> tuple[int, int]:
    """The shape of the rows tensor: ``[count, dim]`` (an embedding) or ``[count, in_features]`` (a projection)."""
    return (count, site.out_features if site.kind == "embedding" else site.in_features)


def apply_rows(piece: Piece, x: Any, result: Any, rows: Any, indices: tuple[int, ...]) -> Any:
    """The layer's output with the token rows in: looked-up ids of ``indices`` give their row (an embedding), or
    the output features ``indices`` are computed with the rows (a projection; its bias kept, as ``F.linear``)."""
    index = np.asarray(indices, dtype="int32")
    if piece.kind == "embedding":
        ids = ops.cast(x, "int32")
        match = ops.equal(ops.expand_dims(ids, -1), ops.convert_to_tensor(index))
        hit = ops.any(match, axis=-1, keepdims=True)
        position = ops.argmax(ops.cast(match, "int32"), axis=-1)
        return ops.where(hit, ops.take(ops.cast(rows, result.dtype), position, axis=0), result)
    n_out = int(result.shape[-1])
    onehot = np.zeros((len(index), n_out), dtype=_ops.dtype_name(result))
    onehot[np.arange(len(index)), index] = 1  # a matmul with it places each column exactly (x * 1 + zeros)
    columns = ops.matmul(ops.cast(x, result.dtype), ops.transpose(ops.cast(rows, result.dtype)))
    full = ops.matmul(columns, ops.convert_to_tensor(onehot))
    if piece.bias_variable is not None:
        full = _ops.add_out(piece, full, piece.bias_variable)
    mask = np.zeros(n_out, dtype=bool)
    mask[index] = True
    return ops.where(ops.convert_to_tensor(mask), full, result)


def _flat(piece: Piece) -> np.ndarray:
    return np.array(ops.convert_to_numpy(_ops.flat_kernel(piece)))


def _assign(piece: Piece, flat: np.ndarray) -> None:
    variable = piece.kernel_variable
    variable.assign(ops.cast(_ops.kernel_from_flat(piece, ops.convert_to_tensor(flat)), variable.dtype))


def merge_rows(piece: Piece, rows: np.ndarray, indices: tuple[int, ...]) -> np.ndarray:
    """Write the rows into the kernel (PEFT's ``index_copy_``); returns the base rows, for :func:`unmerge_rows`."""
    flat = _flat(piece)
    index = list(indices)
    if piece.kind == "embedding":
        saved = flat[index].copy()
        flat[index] = rows
    else:
        saved = flat[:, index].T.copy()
        flat[:, index] = np.asarray(rows).T
    _assign(piece, flat)
    return saved


def unmerge_rows(piece: Piece, saved: np.ndarray, indices: tuple[int, ...]) -> None:
    """Put the base rows :func:`merge_rows` returned back."""
    flat = _flat(piece)
    index = list(indices)
    if piece.kind == "embedding":
        flat[index] = saved
    else:
        flat[:, index] = saved.T
    _assign(piece, flat)
