"""The ``TRAINABLE_TOKENS`` method (SPEC.md 15.2): re-trained token rows of embedding layers, PEFT's
``TrainableTokensModel``.

The layer is the one LoRA's ``trainable_token_indices`` uses (:meth:`AdapterLayer.add_tokens
<adapterspec_torch.layers.AdapterLayer.add_tokens>`); only the selection and the tensor's name differ:
``<module>.trainable_tokens_delta`` ``[len(token_indices), dim]`` (no ``token_adapter.`` infix). On a model with
``tie_word_embeddings`` whose input embedding is selected, the layers sharing its weight (``lm_head``) replace the
same rows with the same tensor, which PEFT saves under their names too.

>>> method_token_targets(model, cfg, universe)                           # doctest: +SKIP
[('model.embed_tokens', [5, 9], None), ('lm_head', [5, 9], 'model.embed_tokens')]
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from adapterspec import AdapterConfig
from adapterspec.errors import TargetNotFoundError, UnsupportedError

from .tying import tied_layers

__all__ = ["DELTA", "METHOD", "method_token_targets"]

#: The method's ``peft_type``.
METHOD = "TRAINABLE_TOKENS"
#: The tensor's name under its module.
DELTA = "trainable_tokens_delta"


def _input_embedding(model: nn.Module, universe: Sequence[tuple[str, str, nn.Module]]) -> str | None:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if getter is not None else None
    except (NotImplementedError, AttributeError):
        embedding = None
    if embedding is None:
        return None
    return next((spec for spec, _, module in universe
                 if module is embedding or getattr(module, "_modules", {}).get("base_layer") is embedding), None)


def method_token_targets(model: nn.Module, config: AdapterConfig,
                         universe: Sequence[tuple[str, str, nn.Module]]) -> list[tuple[str, list[int], str | None]]:
    """(spec path, ``token_indices``, tied source path or ``None``) per layer a ``TRAINABLE_TOKENS`` adapter changes.

    ``target_modules`` null selects the input embedding (PEFT writes its name); otherwise the usual matching
    (SPEC.md 4.3). With ``tie_word_embeddings`` and the input embedding selected, its tied layers follow it.

    :raises TargetNotFoundError: nothing is selected (names ``/target_modules``).
    :raises UnsupportedError: a tied layer is selected too (PEFT 0.21 wraps it twice, saving a
        ``base_layer.trainable_tokens_delta`` of its own).
    """
    indices = [int(i) for i in config.get("token_indices") or []]
    if config.get("target_modules") is None:
        embedding = _input_embedding(model, universe)
        selected = [embedding] if embedding is not None else []
    else:
        selected = [spec for spec, _, _ in universe if config.matches(spec)]
    if not selected:
        raise TargetNotFoundError(f"target_modules={config.get('target_modules')!r} selects no layer of the model",
                                  pointer="/target_modules", hint="name the embedding layer, or leave the field null")
    modules = {spec: module for spec, _, module in universe}
    for spec in selected:
        own = modules[spec]._modules.get("base_layer") or modules[spec]
        if isinstance(own, nn.Linear) and own.bias is not None:
            raise UnsupportedError("TRAINABLE_TOKENS on a Linear layer with a bias: PEFT 0.21 drops the bias while the "
                                   "adapter is active", key=spec, pointer="/target_modules",
                                   hint="select embedding layers, or Linear layers without bias")
    found: list[tuple[str, list[int], str | None]] = [(spec, indices, None) for spec in selected]
    embedding, tied = tied_layers(model, list(universe))
    if embedding is not None and embedding in selected:
        for head in tied:
            if head in selected:
                raise UnsupportedError(
                    f"target_modules selects {head!r}, which shares the input embedding's weight: PEFT 0.21 wraps it "
                    "twice (a base_layer.trainable_tokens_delta of its own)", key=head, pointer="/target_modules",
                    hint="select the input embedding only; the tied layer follows it")
            found.append((head, indices, embedding))
    return found
