"""VeRA (SPEC.md 15.5) on Keras layers: frozen random projections shared by all modules, scaled per module, PEFT
0.21's math.

``delta = (lambda_b[:, None] * B[:out]) @ (lambda_d[:, None] * A[:, :in])``: ``A`` ``[r, max_in]`` and ``B``
``[max_out, r]`` are stored once per adapter (``base_model.vera_A``/``vera_B``), as two frozen rows of the
adapter's bank held by one :class:`Shared` that every adapted layer of the adapter refers to; each layer slices
them to its own size. :func:`views` gives the factors of ``x @ delta.T`` in Keras layout (``[in, r]``,
``[r, out]``, the scales folded in). The torch backend's module of the same name computes the same on torch layers.

This backend adapts what PEFT's VeRA adapts on a keras-hub model: Dense and EinsumDense layers (an ``nn.Linear``
or a transformers ``Conv1D``, GPT-2's fused ``c_attn`` split over three layers included); embeddings and
convolutions are refused (:func:`check`). Training trains the lambdas (``vera_dropout`` on the input, as PEFT);
the projections stay frozen.

>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "VERA", "target_modules": ["q"], "r": 2})
>>> shapes(cfg, 8, 5)
{'vera_lambda_b': (5,), 'vera_lambda_d': (2,)}
>>> shared_shapes([(8, 5), (3, 7)], cfg)
{'vera_A': (2, 8), 'vera_B': (7, 2)}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from keras import ops

from adapterspec import AdapterConfig
from adapterspec._vera import SHARED, rank
from adapterspec.errors import UnsupportedError

from .sites import ModuleSite

if TYPE_CHECKING:
    from .bank import AdapterBank, GroupKey, Ref
    from .layers import Layout

__all__ = ["METHODS", "Shared", "check", "inits", "reserve", "shapes", "shared_inits", "shared_shapes", "views"]

#: The methods this module computes.
METHODS = ("VERA",)


@dataclass
class Shared:
    """``vera_A`` and ``vera_B`` of one adapter: their rows in the adapter's bank and their layouts (the file's),
    with the same accessors as an adapter layer's (:meth:`parameters`, :meth:`bank`), so that loading and
    saving treat them as one more holder of the adapter's tensors."""

    holder: AdapterBank
    layouts: Mapping[str, Layout]
    refs: Mapping[str, Ref]

    def parameters(self, name: str) -> tuple[str, Mapping[str, Layout], Mapping[str, Ref]]:
        """``("", layouts, refs)``: the shared tensors belong to no module."""
        return "", self.layouts, self.refs

    def bank(self, name: str) -> AdapterBank:
        """The bank holding the tensors."""
        return self.holder

    def get(self, param: str) -> Any:
        """The tensor's current value (``[r, max_in]`` or ``[max_out, r]``)."""
        return self.holder.get(self.refs[param])


def check(site: ModuleSite, path: str, config: AdapterConfig) -> None:
    """Refuse what this backend does not compute exactly for VeRA.

    :raises UnsupportedError: an embedding, a logits projection or a convolution (naming the module and its
        Keras layers; PEFT's VeRA adapts Linear and Conv1D only).
    """
    if site.kind != "linear" or any(piece.kind not in ("dense", "einsum") for piece in site.pieces):
        layers = ", ".join(f"{type(p.layer).__name__} {p.layer.path!r}" for p in site.pieces)
        raise UnsupportedError(f"the keras backend adapts only Dense/EinsumDense layers with VERA (module on "
                               f"{layers}; PEFT's VeRA adapts Linear and Conv1D)", key=path,
                               hint="remove the module from target_modules, or use the torch backend")


def shapes(config: AdapterConfig, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    """``vera_lambda_b`` ``[out]`` and ``vera_lambda_d`` ``[r]``."""
    return {"vera_lambda_b": (out_features,), "vera_lambda_d": (rank(config),)}


def shared_shapes(sizes: Sequence[tuple[int, int]], config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """``vera_A`` ``[r, max_in]``, ``vera_B`` ``[max_out, r]`` over the adapted modules' ``(in, out)`` (PEFT's
    ``_find_dim``)."""
    r = rank(config)
    return {"vera_A": (r, max(i for i, _ in sizes)), "vera_B": (max(o for _, o in sizes), r)}


def inits(config: AdapterConfig) -> dict[str, tuple[Any, ...]]:
    """PEFT's init: ``lambda_b`` zeros and ``lambda_d`` ``d_initial`` (``init_weights`` false: ones and
    standard normal)."""
    if config.get("init_weights", True) is False:
        return {"vera_lambda_b": ("ones",), "vera_lambda_d": ("normal", 1.0)}
    return {"vera_lambda_b": ("zeros",), "vera_lambda_d": ("constant", float(config.get("d_initial", 0.1)))}


def shared_inits(params: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[Any, ...]]:
    """Kaiming-uniform projections (gain sqrt(2), fan_in = axis 1) as PEFT draws them -- from Keras' generator, not
    torch's seeded by ``projection_prng_key`` (SPEC.md 15.5: reproducible on torch only); the projections are saved
    with the adapter, so PEFT loads them as they are."""
    return {name: ("uniform", math.sqrt(3.0) * math.sqrt(2) / math.sqrt(params[name][1])) for name in SHARED}


def views(get: Callable[[str], Any], shared: Shared, in_features: int, out_features: int,
          dtype: Any) -> tuple[Any, Any]:
    """``(A[:, :in].T * lambda_d, B[:out].T * lambda_b)`` in ``dtype``: ``[in, r]`` and ``[r, out]``, so that
    ``x @ first @ second`` is PEFT's ``lambda_b * (lambda_d * (x @ A.T)) @ B.T``."""
    a = ops.cast(shared.get("vera_A")[:, :in_features], dtype)
    b = ops.cast(shared.get("vera_B")[:out_features, :], dtype)
    lambda_d = ops.cast(get("vera_lambda_d"), dtype)
    lambda_b = ops.cast(get("vera_lambda_b"), dtype)
    return ops.transpose(a) * lambda_d[None, :], ops.transpose(b) * lambda_b[None, :]


def reserve(bank: AdapterBank, config: AdapterConfig, sizes: Sequence[tuple[int, int]], dtype: str,
            device: str | None, initialize: bool) -> Shared:
    """The adapter's :class:`Shared` projections: two frozen rows of ``bank`` sized over the targets' ``(in, out)``."""
    from .bank import GroupKey
    from .layers import Layout

    params = shared_shapes(sizes, config)
    layouts = {name: Layout(shape, shape, (0, 1)) for name, shape in params.items()}
    init = shared_inits(params) if initialize else {name: ("zeros",) for name in params}
    keys: dict[str, GroupKey] = {name: GroupKey(name, shape, dtype, device, init[name], False)
                                 for name, shape in params.items()}
    return Shared(bank, layouts, bank.reserve_keys(keys))
