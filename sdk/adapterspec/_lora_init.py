"""LoRA's ``init_lora_weights`` (SPEC.md 8.1): the inits that change the base model, and what readers and writers do.

PEFT 0.21.2 runs a LoRA layer's init whenever it creates the layer -- for a new adapter, and again when it loads one.
PiSSA (``"pissa"``) and OLoRA (``"olora"``) take the adapter's first ``A₀``, ``B₀`` from the base weight (its
largest singular triplets, its QR factors) and leave the base as the residual ``W_res = W − s·B₀A₀``, which the
adapter was trained against. So PEFT's load of such an adapter onto the original base rebuilds ``W_res`` (both
decompositions are deterministic) and computes what the trained model computed. adapterspec does the same
(:func:`residual`), while the adapter is loaded: deleting it gives the original weight back.

The other inits either need what no file holds, and are refused (``pissa_niter_<N>``: a randomised SVD, which
rebuilds a different residual on each load; ``corda``: PEFT's ``preprocess_corda`` data; ``loftq``: a quantised
base), or start a new adapter as ``true`` does and have a data-driven step adapterspec does not implement (``eva``,
``lora_ga``: a warning), or train differently (``mica``: PEFT freezes ``lora_B``, :func:`frozen_params`). A new ``"orthogonal"`` adapter starts
from PEFT's orthogonal pair (:func:`orthogonal_start`), a new ``"mica"`` one from the base's minor singular vectors
(:func:`mica_start`).

>>> import numpy as np
>>> w = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
>>> w_res, a, b = residual("pissa", w, r=2, scaling=0.5)
>>> bool(np.allclose(w_res + 0.5 * b @ a, w, atol=1e-6)), a.shape, b.shape
(True, (2, 4), (3, 2))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["BASE_INITS", "acted_init", "base_init", "factor_rank", "frozen_params", "init_refusals", "init_warnings", "layer_refusal",
           "mica_start", "orthogonal_start", "residual", "unsupported"]

#: The inits whose residual base a reader rebuilds from the original weight (SPEC.md 8.1).
BASE_INITS = ("pissa", "olora")

#: Fresh-adapter inits that start as ``true`` (``A`` Kaiming-uniform, ``B`` zeros) in PEFT until a data-driven
#: step (PEFT's ``initialize_lora_eva_weights``, ``preprocess_loraga``) replaces them.
_DATA_STEP = {"eva": "EVA's initialisation from activations (PEFT's initialize_lora_eva_weights)",
              "lora_ga": "LoRA-GA's initialisation from gradients (PEFT's preprocess_loraga)"}


def _init(config: Mapping[str, Any]) -> Any:
    return config.get("init_lora_weights", True) if config.get("peft_type") == "LORA" else True


def base_init(config: Mapping[str, Any]) -> str | None:
    """``"pissa"`` or ``"olora"`` when the adapter's layers are built on a residual of the base weight, else ``None``.

    >>> base_init({"peft_type": "LORA", "init_lora_weights": "olora"}), base_init({"peft_type": "LORA"})
    ('olora', None)
    """
    init = _init(config)
    return init if isinstance(init, str) and init in BASE_INITS else None


def factor_rank(config: Mapping[str, Any], r: int, in_features: int, out_features: int) -> int:
    """The rank a linear layer's LoRA factors have: ``r``, or for PiSSA/OLoRA ``min(r, in, out)`` -- a decomposition
    of the weight has no more factors than its smaller side, and PEFT stores that many (SPEC.md 8.1).

    >>> factor_rank({"peft_type": "LORA", "init_lora_weights": "pissa"}, 4, 8, 1)
    1
    """
    return min(r, in_features, out_features) if base_init(config) else r


def acted_init(config: Mapping[str, Any], *, fresh: bool) -> str | None:
    """The ``init_lora_weights`` a backend acts on beyond its plain LoRA init: ``"pissa"``/``"olora"`` (a load or a
    new adapter: the residual base), ``"orthogonal"`` or ``"mica"`` (a new adapter: :func:`orthogonal_start`,
    :func:`mica_start`), else ``None``.

    >>> acted_init({"peft_type": "LORA", "init_lora_weights": "orthogonal"}, fresh=False) is None
    True
    """
    found = base_init(config)
    if found is None and fresh and _init(config) in ("orthogonal", "mica"):
        return str(_init(config))
    return found


def frozen_params(config: Mapping[str, Any]) -> frozenset[str]:
    """The adapter tensors PEFT does not train for this config: MiCA's ``lora_B.weight`` / ``lora_embedding_B``
    (PEFT's ``MiCALinearVariant`` registers them frozen, at a load too); else none.

    >>> sorted(frozen_params({"peft_type": "LORA", "init_lora_weights": "mica"}))
    ['lora_B.weight', 'lora_embedding_B']
    """
    return _MICA_FROZEN if _init(config) == "mica" else frozenset()


_MICA_FROZEN = frozenset({"lora_B.weight", "lora_embedding_B"})


def unsupported(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(JSON pointer, reason)`` for an ``init_lora_weights`` whose layers no reader can build as PEFT built them
    (check 5 of SPEC.md section 10: the adapter is refused, at a load and for a new adapter alike).

    >>> unsupported({"peft_type": "LORA", "init_lora_weights": "pissa_niter_4"})[0][0]
    '/init_lora_weights'
    >>> unsupported({"peft_type": "LORA", "init_lora_weights": "pissa"})
    []
    """
    init = _init(config)
    if not isinstance(init, str):
        return []
    if init in BASE_INITS and config.get("target_parameters"):
        return [("/init_lora_weights", f"init_lora_weights {init!r} with target_parameters: PEFT rebuilds a residual of "
                                       "each adapted parameter too, which adapterspec does not (SPEC.md 15.1)")]
    if init == "mica" and config.get("use_dora") is True:
        return [("/init_lora_weights", "init_lora_weights 'mica' with use_dora: PEFT 0.21.2 has no LoRA variant that "
                                       "combines them (it raises), and neither do adapterspec v1 readers")]
    if init.startswith("pissa_niter_"):
        return [("/init_lora_weights", f"init_lora_weights {init!r} builds the layers on a residual of the base that "
                                       "PEFT computes with a randomised SVD (torch.svd_lowrank), which no load can "
                                       "rebuild as it was ('pissa', an exact SVD, is rebuilt)")]
    if init == "corda":
        return [("/init_lora_weights", "init_lora_weights 'corda' builds the layers from PEFT's preprocess_corda "
                                       "statistics of the training data, which no adapter file holds")]
    if init == "loftq":
        return [("/init_lora_weights", "init_lora_weights 'loftq' builds the layers on a quantised residual of the "
                                       "base, which adapterspec does not rebuild")]
    return []


#: The weight dtypes PEFT decomposes (its pissa_init, olora_init and mica_init raise on others).
_DECOMPOSED = ("float32", "float16", "bfloat16")


def layer_refusal(init: str, *, kind: str, rank: int, in_features: int, out_features: int, dtype: str,
                  hf_conv1d: bool, not_base: bool) -> tuple[str, str, str] | None:
    """``(JSON pointer, reason, hint)`` when one adapted layer cannot take ``init`` (an :func:`acted_init` value) as
    PEFT 0.21.2 takes it, else ``None``; both backends ask it with the layer's facts, so they refuse alike.

    :param kind: the layer kind (``"linear"``, ``"conv1d_hf"``, ``"embedding"``; any other is a convolution).
    :param dtype: the base weight's dtype name (``"float32"``...).
    :param hf_conv1d: a transformers Conv1D (its weight stored ``[in, out]``).
    :param not_base: the weight holds a merged adapter or another adapter's residual.

    >>> layer_refusal("orthogonal", kind="linear", rank=3, in_features=8, out_features=8, dtype="float32",
    ...               hf_conv1d=False, not_base=False)[1]
    "PEFT's orthogonal init needs an even rank, not 3"
    """
    if kind == "embedding" and init != "mica":  # PEFT's embeddings run MiCA's init alone of these
        return None
    if kind not in ("linear", "conv1d_hf", "embedding"):
        return ("/init_lora_weights", f"PEFT 0.21.2 runs this init on linear layers only, and refuses it on a {kind} "
                                      "layer", "leave convolutions out of target_modules")
    if init == "orthogonal":
        return ("/init_lora_weights", f"PEFT's orthogonal init needs an even rank, not {rank}",
                "use an even r") if rank % 2 else None
    if init != "mica" and not_base:
        return ("/init_lora_weights", "the layer's weight is not the base now (it holds a merged adapter or another "
                                      "adapter's residual), which PEFT would decompose instead",
                "unmerge, or delete the other adapter first")
    if dtype not in _DECOMPOSED:
        return ("/init_lora_weights", f"PEFT decomposes float32, float16 or bfloat16 weights only, not {dtype}",
                "load the base in float32")
    if init == "mica" and rank > min(in_features, out_features):
        return ("/r", f"MiCA needs r <= min(in_features, out_features) = {min(in_features, out_features)}, not {rank} "
                      "(PEFT refuses it)", "lower r (or its rank_pattern entry) for this module")
    if init == "olora" and hf_conv1d and in_features != out_features:
        return ("/init_lora_weights", "PEFT's OLoRA factors a transformers Conv1D weight as stored ([in, out] "
                                      f"[{in_features}, {out_features}]), which fits the adapter's shapes only when it "
                                      "is square", "leave this layer out of target_modules, or use 'pissa'")
    return None


def init_refusals(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(JSON pointer, reason, hint)`` for an ``init_lora_weights`` a new adapter cannot start from here (besides
    :func:`unsupported`): an orthogonal or MiCA start of LoRA on parameters.

    >>> init_refusals({"peft_type": "LORA", "init_lora_weights": "mica", "target_parameters": ["w"]})[0][0]
    '/target_parameters'
    """
    if _init(config) == "orthogonal" and config.get("target_parameters"):
        return [("/target_parameters", "a new adapter with init_lora_weights 'orthogonal' on parameters "
                                       "(target_parameters): PEFT's orthogonal start of LoRA on a parameter is not "
                                       "implemented here", "use init_lora_weights true, or initialise with PEFT")]
    if _init(config) == "mica" and config.get("target_parameters"):
        return [("/target_parameters", "a new adapter with init_lora_weights 'mica' on parameters (target_parameters): "
                                       "PEFT 0.21.2 has no MiCA variant for them (it raises)",
                 "use init_lora_weights true, or leave target_parameters out")]
    return []


def init_warnings(config: Mapping[str, Any], *, fresh: bool) -> list[tuple[str, str]]:
    """``(JSON pointer, message)`` for an ``init_lora_weights`` that loads or starts as PEFT does, but not as trained
    (a load) or intended (a new adapter).

    >>> init_warnings({"peft_type": "LORA", "init_lora_weights": "lora_ga"}, fresh=False)[0][0]
    '/init_lora_weights'
    """
    init = _init(config)
    if not isinstance(init, str) or init not in _DATA_STEP:
        return []
    if fresh:
        return [("/init_lora_weights", f"init_lora_weights {init!r}: the adapter starts as init_lora_weights true "
                                       f"does (as in PEFT); {_DATA_STEP[init]} is not implemented here")]
    if init == "lora_ga":  # lora_ga_init changes the base; PEFT's load, without the gradients, leaves it as it is
        return [("/init_lora_weights", "init_lora_weights 'lora_ga': the adapter was trained against a base PEFT "
                                       "changed with the training gradients, which the file does not hold; it is "
                                       "applied to this base as it is (as PEFT's load applies it)")]
    return []


def residual(init: str, weight: np.ndarray, r: int, scaling: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(W_res, A₀, B₀)`` of PEFT 0.21.2's ``pissa_init`` / ``olora_init`` for a float ``weight`` in the spec's
    ``[out, in]`` layout (W_res in ``weight``'s dtype, A₀ and B₀ in float32).

    PEFT decomposes in float32 with torch's LAPACK; here the float32 weight is decomposed in float64, the exact
    truncation PEFT's approximates: another float32 SVD would add its own rounding to PEFT's. Where the ``r``-th and
    ``r+1``-th singular values lie close, a float32 SVD's truncation moves by about ``eps · ||W|| / gap``, the
    computation's own conditioning, which no implementation but PEFT's own calls reproduces exactly.

    * ``"pissa"``: ``W = V S Uᴴ``; ``A₀ = diag(√(S_r / s)) Uᴴ_r``, ``B₀ = V_r diag(√(S_r / s))``;
    * ``"olora"``: ``W = Q R``; ``A₀ = R[:r]``, ``B₀ = Q[:, :r]``;

    then ``W_res = W − s·B₀A₀``. Singular vectors and QR factors are unique up to signs, which cancel in ``B₀A₀``.
    """
    w = np.asarray(weight, dtype=np.float32).astype(np.float64)  # the weight as PEFT reads it, decomposed exactly
    if init == "pissa":
        v, s_values, uh = np.linalg.svd(w, full_matrices=False)
        root = np.sqrt(s_values[:r] / scaling)
        a, b = root[:, None] * uh[:r], v[:, :r] * root[None, :]
    elif init == "olora":
        q, upper = np.linalg.qr(w)
        a, b = upper[:r], q[:, :r]
    else:
        raise ValueError(f"no residual for init_lora_weights {init!r}")
    return (w - scaling * b @ a).astype(weight.dtype), a.astype(np.float32), b.astype(np.float32)


def orthogonal_start(r: int, in_features: int, out_features: int, normal: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(A₀, B₀)`` of PEFT 0.21.2's ``orthogonal_init`` (``r`` even): ``Q`` of the QR of an ``[r, r]`` normal matrix,
    ``A₀ = (G_A Q[0::2]).ᵀ / 10`` and ``B₀ = G_Bᵀ Q[1::2] / 10`` with normal ``G_A`` ``[in, r/2]``, ``G_B``
    ``[r/2, out]``. The rows of ``Q`` are orthonormal, so ``B₀A₀ = 0``: the model starts as the base.

    :param normal: ``normal(shape)`` -> standard normal samples (the backend's generator).

    >>> a, b = orthogonal_start(4, 6, 5, np.random.default_rng(0).standard_normal)
    >>> a.shape, b.shape, bool(np.abs(b @ a).max() < 1e-6)
    ((4, 6), (5, 4), True)
    """
    q, _ = np.linalg.qr(np.asarray(normal((r, r)), dtype=np.float32))
    a = (np.asarray(normal((in_features, r // 2)), dtype=np.float32) @ q[0::2, :]).T / np.float32(10.0)
    b = np.asarray(normal((r // 2, out_features)), dtype=np.float32).T @ q[1::2, :] / np.float32(10.0)
    return np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)


def mica_start(weight: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A₀, B₀)`` of PEFT 0.21.2's ``mica_init`` for a float ``weight`` in the spec's ``[out, in]`` layout (an
    embedding's ``[dim, num_embeddings]``): ``B₀`` the ``r`` left singular vectors of the smallest singular values,
    ``A₀`` zeros, so the model starts as the base (``r`` at most the smaller side).

    >>> a, b = mica_start(np.diag([3.0, 2.0, 1.0]).astype(np.float32), 1)
    >>> a.tolist(), np.abs(b).ravel().tolist()
    ([[0.0, 0.0, 0.0]], [0.0, 0.0, 1.0])
    """
    u = np.linalg.svd(np.asarray(weight, dtype=np.float32).astype(np.float64), full_matrices=False)[0]
    return np.zeros((r, weight.shape[1]), dtype=np.float32), np.ascontiguousarray(u[:, -r:], dtype=np.float32)
