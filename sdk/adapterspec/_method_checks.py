"""Per-module tensor rules of each method: SPEC.md sections 5.2 and 6, checks 9-11 of section 10.

Each rule takes the config, a module name and that module's method tensors (parameter name ->
:class:`~adapterspec.checks.TensorInfo`) and returns every problem it finds: a missing or extra
tensor (check 9), a rank axis that disagrees with ``r``/``rank_pattern`` (check 10), partner shapes
that disagree with each other (check 11). Only shapes are used; the base model is not needed.

>>> from adapterspec.checks import TensorInfo
>>> from adapterspec.config import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "IA3", "target_modules": ["q"], "feedforward_modules": []})
>>> [str(e) for e in METHOD_CHECKS["IA3"](cfg, "l.q", {"ia3_l": TensorInfo((1, 8), "F32")})]
['base_model.model.l.q.ia3_l: shape [1, 8]: must be [out, 1] (not feedforward: scales the output) (fix: ...)']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from . import _miss as miss_facts
from . import _beft, _c3a, _delora, _gralora, _vblora
from ._adalora import stored_rank
from ._hra import PARAM as HRA_PARAM
from ._hra import rank as hra_rank
from ._lora_init import factor_rank
from ._road import length_problem as road_length_problem
from ._vera import SHARED, shared_key
from ._vera import rank as vera_rank
from .errors import AdapterSpecError, MissingTensorError, ShapeMismatchError, UnexpectedTensorError
from ._rules import velora_state_size
from .naming import VELORA_STATE, make_key
from .targets import pattern_value

if TYPE_CHECKING:
    from .checks import TensorInfo
    from .config import AdapterConfig

__all__ = ["METHOD_CHECKS", "factorization", "shared_errors", "velora_state_error"]

Params = Mapping[str, "TensorInfo"]
Errors = list[AdapterSpecError]


# -- error builders ------------------------------------------------------------------------
def _missing(module: str, param: str, why: str) -> MissingTensorError:
    return MissingTensorError(f"missing ({why})", key=make_key(module, param),
                              hint="save the adapter again; a complete adapter has this tensor")


def _extra(module: str, param: str, why: str, hint: str) -> UnexpectedTensorError:
    return UnexpectedTensorError(why, key=make_key(module, param), hint=hint)


def _shape(module: str, param: str, info: TensorInfo, message: str, hint: str) -> ShapeMismatchError:
    return ShapeMismatchError(f"shape {list(info.shape)}: {message}", key=make_key(module, param), hint=hint)


def _axes(module: str, p: Params, wanted: Mapping[str, tuple[int, ...]], hint: str) -> Errors:
    """A shape error for each tensor whose number of axes is not one of ``wanted[name]``."""
    return [_shape(module, name, p[name], f"must have {' or '.join(map(str, counts))} axes", hint)
            for name, counts in wanted.items() if name in p and len(p[name].shape) not in counts]


def _ranks(config: AdapterConfig, module: str, p: Params, axes: Mapping[str, tuple[int, ...]],
           in_out: tuple[int, int] | None = None) -> Errors:
    """Check 10: a rank error for each tensor whose rank axes (``axes[name]``) are not ``r_m`` (SPEC 4.4) -- on a
    linear layer of ``in_out`` features, the rank its factors have (:func:`~adapterspec._lora_init.factor_rank`)."""
    r = config.rank_for(module) if in_out is None else factor_rank(config, config.rank_for(module), *in_out)
    errors: Errors = []
    for name, positions in axes.items():
        bad = next((p[name].shape[i] for i in positions if name in p and p[name].shape[i] != r), None)
        if bad is not None:  # which field set r is asked only here: the rank_pattern may have thousands of keys
            source = "rank_pattern" if pattern_value(config.get("rank_pattern"), module, default=None) is not None \
                else "r"
            errors.append(ShapeMismatchError(f"rank {bad} disagrees with the config's {source}={r} for module {module!r}",
                                             key=make_key(module, name),
                                             hint=f"set {source} to {bad} for this module, or save the adapter again"))
    return errors


def _partners(module: str, p: Params, rank_of: tuple[str, int], others: Mapping[str, tuple[int, ...]]) -> Errors:
    """Check 11: the rank axes ``others[name]`` of the partner factors equal the rank axis ``rank_of``."""
    first, axis = rank_of
    r = p[first].shape[axis]
    errors: Errors = []
    for name, positions in others.items():
        bad = next((i for i in positions if name in p and p[name].shape[i] != r), None)
        if bad is not None:
            errors.append(_shape(module, name, p[name], f"dimension {bad} must equal {first}'s rank {r}",
                                 "the factors share their rank axis (SPEC.md 6.4, 6.5)"))
    return errors


# -- LoRA, DoRA ----------------------------------------------------------------------------
_LINEAR = ("lora_A.weight", "lora_B.weight")
_EMBEDDING = ("lora_embedding_A", "lora_embedding_B")


def _lora(config: AdapterConfig, module: str, p: Params) -> Errors:
    if len(p) == 2 and "lora_A.weight" in p and "lora_B.weight" in p \
            and not config.get("lora_bias") and not config.get("use_dora"):  # the common case: nothing else to check
        return _lora_factors(config, module, p, *_LINEAR, False)
    if any(n in p for n in _LINEAR) and any(n in p for n in _EMBEDDING):
        return [_extra(module, n, f"module {module!r} mixes lora_A/lora_B.weight with lora_embedding_A/B",
                       "keep lora_embedding_A/B for an Embedding, lora_A/B.weight for other layers")
                for n in _EMBEDDING if n in p]
    embedding = any(n in p for n in _EMBEDDING)
    a_name, b_name = _EMBEDDING if embedding else _LINEAR
    absent = [n for n in (a_name, b_name) if n not in p]
    if absent:
        return [_missing(module, n, f"module {module!r} has {', '.join(sorted(p))}; LoRA stores {a_name} with "
                                    f"{b_name}") for n in absent]
    errors = _lora_factors(config, module, p, a_name, b_name, embedding)
    out = p[b_name].shape[0] if len(p[b_name].shape) >= 2 else None
    return (errors + _lora_bias(config, module, p, embedding, out)
            + _dora(config, module, p, len(p[a_name].shape), out) + _velora(config, module, p))


def _lora_factors(config: AdapterConfig, module: str, p: Params, a_name: str, b_name: str, embedding: bool) -> Errors:
    a, b = p[a_name], p[b_name]
    if len(a.shape) != len(b.shape) or not (len(a.shape) == 2 if embedding else 2 <= len(a.shape) <= 5):
        return [_shape(module, b_name, b, f"{a_name} has {len(a.shape)} axes and {b_name} {len(b.shape)}: both need "
                                          "2 (Linear, Embedding) or the same 3-5 (convolutions)",
                       "save A as [r, in(, kernel...)] and B as [out, r(, 1...)]")]
    linear = len(a.shape) == 2 and not embedding
    errors = _ranks(config, module, p, {a_name: (0,)}, (a.shape[1], b.shape[0]) if linear else None)  # and B's rank axis equals A's (r/g for grouped convs)
    ra, rb = a.shape[0], b.shape[1]
    if rb != ra and not (len(b.shape) > 2 and rb > 0 and ra % rb == 0):
        errors.append(_shape(module, b_name, b, f"dimension 1 must equal lora_A's rank {ra}",
                             "B is [out, r]; was it saved transposed?"))
    if any(d != 1 for d in b.shape[2:]):
        errors.append(_shape(module, b_name, b, "a convolution's lora_B has kernel size 1",
                             f"save B as [out, r{', 1' * (len(b.shape) - 2)}]"))
    return errors


def _lora_bias(config: AdapterConfig, module: str, p: Params, embedding: bool, out: int | None) -> Errors:
    bias = p.get("lora_B.bias")
    if bias is None:
        needed = config.get("lora_bias") and not embedding
        return [_missing(module, "lora_B.bias", "the config sets lora_bias=true")] if needed else []
    if embedding:
        return [_extra(module, "lora_B.bias", "an Embedding's LoRA has no lora_B.bias", "remove the tensor")]
    if not config.get("lora_bias"):
        return [_extra(module, "lora_B.bias", "lora_B.bias without lora_bias=true in the config",
                       "set lora_bias to true, or remove the tensor")]
    if out is not None and tuple(bias.shape) != (out,):
        return [_shape(module, "lora_B.bias", bias, f"must be [lora_B.shape[0]] = [{out}]", "save the bias as [out]")]
    return []


def _dora(config: AdapterConfig, module: str, p: Params, ndim: int, out: int | None) -> Errors:
    magnitude = p.get("lora_magnitude_vector")
    if magnitude is None:
        return [_missing(module, "lora_magnitude_vector", "the config sets use_dora=true")] if config.get("use_dora") else []
    if not config.get("use_dora"):
        return [_extra(module, "lora_magnitude_vector", "DoRA magnitude without use_dora=true in the config",
                       "set use_dora to true, or remove the tensor")]
    want = (out,) if ndim == 2 else (1, out, *(1,) * (ndim - 2))  # convolutions: [1, out, 1...]
    if out is None or tuple(magnitude.shape) == want:
        return []
    return [_shape(module, "lora_magnitude_vector", magnitude,
                   f"must be {list(want)} (one value per output feature of lora_B)", f"save it as {list(want)}")]


def _velora(config: AdapterConfig, module: str, p: Params) -> Errors:
    if VELORA_STATE not in p:
        return []
    a = p.get("lora_A.weight")
    in_features = int(a.shape[1]) if a is not None and len(a.shape) == 2 else None
    error = velora_state_error(config, module, tuple(p[VELORA_STATE].shape), in_features)
    return [] if error is None else [error]


def velora_state_error(config: AdapterConfig, module: str, shape: tuple[int, ...],
                       in_features: int | None) -> AdapterSpecError | None:
    """What is wrong with VeLoRA's state of ``module`` (SPEC.md 5.2), or ``None``: only with ``velora_config``, only on
    a linear layer (PEFT's ``VeloraLinearVariant``: Linear and GPT-2's Conv1D; ``in_features`` ``None``: another
    kind), ``[ceil(in_features / num_groups)]``. A backend keeps the tensor as it is, so it checks it with this.

    >>> from adapterspec import AdapterConfig
    >>> cfg = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q"], "velora_config": {"num_groups": 4}})
    >>> print(velora_state_error(cfg, "q", (3,), 10))
    None
    >>> str(velora_state_error(cfg, "q", (2,), 10)).split(": must")[0]
    'base_model.model.q.lora_velora_embed: shape [2]'
    """
    if config.get("velora_config") is None:
        return _extra(module, VELORA_STATE, f"{VELORA_STATE} without velora_config in the config",
                      "remove the tensor (it is VeLoRA's training-time state), or set velora_config")
    if in_features is None:
        return _extra(module, VELORA_STATE, "VeLoRA adapts linear layers only (PEFT refuses it on embeddings and "
                                            "convolutions)", "remove the tensor, and the module from target_modules")
    want = (velora_state_size(config, in_features),)
    if shape != want:
        return ShapeMismatchError(f"shape {list(shape)}: must be {list(want)}: ceil(in_features {in_features} / "
                                  "velora_config.num_groups)", key=make_key(module, VELORA_STATE),
                                  hint=f"save it as {list(want)}")
    return None


# -- IA3 -----------------------------------------------------------------------------------
def _ia3(config: AdapterConfig, module: str, p: Params) -> Errors:
    info = p["ia3_l"]
    shape, feedforward = tuple(info.shape), config.is_feedforward(module)
    position = 1 if feedforward or len(shape) > 2 else 0  # convolutions: [1, channels, 1...] either way
    non_unit = [i for i, d in enumerate(shape) if d != 1]
    # feedforward_modules null: PEFT's default for the model's architecture, known only at load (SPEC 14.2)
    unknown = config.get("feedforward_modules") is None and len(shape) == 2
    if 2 <= len(shape) <= 5 and (non_unit in ([], [position]) or (unknown and len(non_unit) == 1)):
        return []
    if len(shape) != 2:
        want = "[1, channels, 1...] (a convolution) or 2-D"
    else:
        want = "[1, in] (feedforward: scales the input)" if feedforward else "[out, 1] (not feedforward: scales the output)"
    return [_shape(module, "ia3_l", info, f"must be {want}",
                   "fix feedforward_modules in the config, or save the vector in that layout")]


# -- LoHa ----------------------------------------------------------------------------------
_HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def _loha(config: AdapterConfig, module: str, p: Params) -> Errors:
    errors: Errors = [_missing(module, n, "LoHa stores hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b together")
                      for n in _HADA if n not in p]
    cores = [n for n in ("hada_t1", "hada_t2") if n in p]
    if len(cores) == 1:
        other = "hada_t2" if cores == ["hada_t1"] else "hada_t1"
        errors.append(_missing(module, other, f"module {module!r} has {cores[0]}; the effective conv form stores both"))
    if errors:
        return errors
    errors = _axes(module, p, {**{n: (2,) for n in _HADA}, "hada_t1": (4,), "hada_t2": (4,)},
                   "LoHa factors are matrices; hada_t1/hada_t2 are [r, r, kh, kw]")
    if errors:
        return errors
    for first, second in (("hada_w1_a", "hada_w2_a"), ("hada_w1_b", "hada_w2_b"), ("hada_t1", "hada_t2")):
        if first in p and p[first].shape != p[second].shape:
            errors.append(_shape(module, second, p[second], f"must have the shape of {first} {list(p[first].shape)}",
                                 "the two Hadamard factors of LoHa have equal shapes"))
    axis = 0 if cores else 1  # SPEC 6.4: hada_*_a is [r, out] in the effective form, [out, r] in the plain one
    return (errors + _ranks(config, module, p, {"hada_w1_a": (axis,)})
            + _partners(module, p, ("hada_w1_a", axis), {"hada_w1_b": (0,), "hada_t1": (0, 1)}))


# -- LoKr ----------------------------------------------------------------------------------
def _lokr(config: AdapterConfig, module: str, p: Params) -> Errors:
    errors = _lokr_form(module, p, "lokr_w1", ()) + _lokr_form(module, p, "lokr_w2", ("lokr_t2",))
    if errors:
        return errors
    errors = _axes(module, p, {"lokr_w1": (2,), "lokr_w1_a": (2,), "lokr_w1_b": (2,), "lokr_w2": (2, 3, 4),
                               "lokr_w2_a": (2,), "lokr_w2_b": (2,), "lokr_t2": (4,)},
                   "see SPEC.md 6.5 for the LoKr layouts")
    if errors:
        return errors
    axis = 0 if "lokr_t2" in p else 1  # effective conv form: w2_a is [r, out_k], w2_b [r, in_n]
    errors = _ranks(config, module, p, {"lokr_w1_a": (1,), "lokr_w2_a": (axis,)})
    if "lokr_w1_a" in p:
        errors += _partners(module, p, ("lokr_w1_a", 1), {"lokr_w1_b": (0,)})
    if "lokr_w2_a" in p:
        errors += _partners(module, p, ("lokr_w2_a", axis), {"lokr_w2_b": (0,), "lokr_t2": (0, 1)})
    return errors or _kronecker(config, module, p)


def _lokr_form(module: str, p: Params, whole: str, extras: tuple[str, ...]) -> Errors:
    """Check 9: exactly one form of a Kronecker factor -- ``whole``, or ``whole_a`` + ``whole_b`` (+ extras)."""
    parts = (f"{whole}_a", f"{whole}_b")
    present = [n for n in (*parts, *extras) if n in p]
    if whole in p:
        return [_extra(module, n, f"module {module!r} stores {whole} whole and also {n} (two forms of one factor)",
                       f"keep exactly one form: {whole}, or {whole}_a with {whole}_b") for n in present]
    if not present:
        return [_missing(module, whole, f"LoKr stores {whole}, or {whole}_a with {whole}_b")]
    return [_missing(module, n, f"module {module!r} has {', '.join(present)}") for n in parts if n not in p]


def _kronecker(config: AdapterConfig, module: str, p: Params) -> Errors:
    """Check 11 for LoKr: the factor shapes are PEFT's factorisation of ``out`` (and ``in`` when it is known)."""
    f = int(config.get("decompose_factor", -1))
    w1 = "lokr_w1" if "lokr_w1" in p else "lokr_w1_a"
    out_l = p[w1].shape[0]
    in_m = p["lokr_w1"].shape[1] if "lokr_w1" in p else p["lokr_w1_b"].shape[1]
    if "lokr_w2" in p:
        out_k, in_n = p["lokr_w2"].shape[0], p["lokr_w2"].shape[1]
    elif "lokr_t2" in p:
        out_k, in_n = p["lokr_w2_a"].shape[1], p["lokr_w2_b"].shape[1]
    else:  # plain decomposed form: a convolution folds its kernel into w2_b's columns, so in_n is unknown
        out_k, in_n = p["lokr_w2_a"].shape[0], None
    errors: Errors = []
    for what, pair in (("output", (out_l, out_k)), ("input", (in_m, in_n))):
        if pair[1] is None or not 0 < pair[0] * pair[1] <= _MAX_FACTORED:
            continue
        want = factorization(pair[0] * pair[1], f)
        if pair != want:
            errors.append(_shape(module, w1, p[w1], f"Kronecker factors {pair[0]} x {pair[1]} of the {what} dimension "
                                                    f"{pair[0] * pair[1]} are not the factorisation {list(want)} "
                                                    f"(decompose_factor={f})",
                                 "save the adapter again with PEFT's factorisation (SPEC.md 6.5)"))
    return errors


# -- OFT, BOFT (SPEC.md 15.6, 15.7) -----------------------------------------------------------
def _oft(config: AdapterConfig, module: str, p: Params) -> Errors:
    """``oft_R.weight`` is ``[blocks, b(b-1)/2]`` (one row with block_share): the upper triangles of the blocks."""
    if "oft_R.weight" not in p:
        return [_missing(module, "oft_R.weight", "OFT stores oft_R.weight per adapted module")]
    info = p["oft_R.weight"]
    hint = "save the adapter again with PEFT (SPEC.md 15.6)"
    if len(info.shape) != 2:
        return [_shape(module, "oft_R.weight", info, "must have 2 axes [blocks, b(b-1)/2]", hint)]
    n = info.shape[1]
    size = (1 + math.isqrt(1 + 8 * n)) // 2
    errors: Errors = []
    if size * (size - 1) // 2 != n or size < 2:
        errors.append(_shape(module, "oft_R.weight", info, f"{n} is not b(b-1)/2 for a block size b >= 2", hint))
    if config.get("block_share") and info.shape[0] != 1:
        errors.append(_shape(module, "oft_R.weight", info, "block_share is true: one shared block (1 row) is stored",
                             "set block_share to false, or save the adapter again"))
    return errors


def _boft(config: AdapterConfig, module: str, p: Params) -> Errors:
    """``boft_R`` is ``[1, blocks, b, b]`` (one butterfly factor), ``boft_s`` ``[out, 1]`` or ``[1, out]``."""
    errors: Errors = [_missing(module, n, "BOFT stores boft_R with boft_s per adapted module")
                      for n in ("boft_R", "boft_s") if n not in p]
    hint = "save the adapter again with PEFT (SPEC.md 15.7)"
    if "boft_R" in p:
        r = p["boft_R"]
        if len(r.shape) != 4 or r.shape[2] != r.shape[3]:
            errors.append(_shape(module, "boft_R", r, "must be [factors, blocks, b, b]", hint))
        elif r.shape[0] != 1:
            errors.append(_shape(module, "boft_R", r, f"{r.shape[0]} butterfly factors: adapterspec reads one",
                                 "train with boft_n_butterfly_factor 1"))
        else:
            for field, axis in (("boft_block_size", 2), ("boft_block_num", 1)):
                wanted = int(config.get(field, 0) or 0)
                if wanted and r.shape[axis] != wanted:
                    errors.append(_shape(module, "boft_R", r, f"axis {axis} is {r.shape[axis]}, the config's "
                                                              f"{field} is {wanted}", f"set {field} to {r.shape[axis]}"))
    if "boft_s" in p and (len(p["boft_s"].shape) != 2 or 1 not in p["boft_s"].shape):
        errors.append(_shape(module, "boft_s", p["boft_s"], "must be [out, 1] (Linear) or [1, out] (Conv2d)", hint))
    return errors


# -- HRA (SPEC.md 17.3) -----------------------------------------------------------------------
def _hra_check(config: AdapterConfig, module: str, p: Params) -> Errors:
    """``hra_u`` is ``[F, r]``: one Householder vector per column, ``r`` the config's (HRA has no rank_pattern)."""
    if HRA_PARAM not in p:
        return [_missing(module, HRA_PARAM, "HRA stores hra_u per adapted module")]
    info = p[HRA_PARAM]
    if len(info.shape) != 2:
        return [_shape(module, HRA_PARAM, info, "must have 2 axes [in_features, r]",
                       "save the adapter again with PEFT (SPEC.md 17.3)")]
    r = hra_rank(config)
    if info.shape[1] != r:
        return [ShapeMismatchError(f"rank {info.shape[1]} (axis 1) disagrees with the config's r={r} for module "
                                   f"{module!r}", key=make_key(module, HRA_PARAM),
                                   hint=f"set r to {info.shape[1]}, or save the adapter again")]
    return []


# -- AdaLoRA (SPEC.md 15.4) ------------------------------------------------------------------
def _adalora(config: AdapterConfig, module: str, p: Params) -> Errors:
    """``lora_A`` ``[k, in]``, ``lora_B`` ``[out, k]``, ``lora_E`` ``[k, 1]``: ``k`` the ranks ``rank_pattern``
    kept for the module (``init_r`` without an entry)."""
    errors: Errors = [_missing(module, n, "AdaLoRA stores lora_A, lora_B and lora_E per adapted module")
                      for n in ("lora_A", "lora_B", "lora_E") if n not in p]
    hint = "save the adapter again with PEFT (SPEC.md 15.4)"
    errors += _axes(module, p, {"lora_A": (2,), "lora_B": (2,), "lora_E": (2,)}, hint)
    if errors:
        return errors
    k = stored_rank(config, module)
    source = "rank_pattern" if f"{module}.lora_E" in (config.get("rank_pattern") or {}) else "init_r"
    for name, axis in (("lora_A", 0), ("lora_B", 1), ("lora_E", 0)):
        if p[name].shape[axis] != k:
            errors.append(ShapeMismatchError(
                f"rank {p[name].shape[axis]} (axis {axis}) disagrees with the config's {source} ({k} ranks) for "
                f"module {module!r}", key=make_key(module, name),
                hint="save the adapter again with PEFT: it writes the kept ranks with their rank_pattern"))
    if p["lora_E"].shape[1] != 1:
        errors.append(_shape(module, "lora_E", p["lora_E"], "must be [k, 1] (one singular value per rank)", hint))
    return errors


# -- VeRA (SPEC.md 15.5) ---------------------------------------------------------------------
def _vera(config: AdapterConfig, module: str, p: Params) -> Errors:
    """``vera_lambda_b`` ``[out]`` and ``vera_lambda_d`` ``[r]`` per module (the shared matrices: :func:`shared_errors`)."""
    errors: Errors = [_missing(module, n, "VeRA stores vera_lambda_b and vera_lambda_d per adapted module")
                      for n in ("vera_lambda_b", "vera_lambda_d") if n not in p]
    hint = "save the adapter again with PEFT (SPEC.md 15.5)"
    errors += _axes(module, p, {"vera_lambda_b": (1,), "vera_lambda_d": (1,)}, hint)
    r = vera_rank(config)
    if not errors and p["vera_lambda_d"].shape[0] != r:
        errors.append(ShapeMismatchError(f"rank {p['vera_lambda_d'].shape[0]} disagrees with the config's r={r} for "
                                         f"module {module!r}", key=make_key(module, "vera_lambda_d"),
                                         hint=f"set r to {p['vera_lambda_d'].shape[0]}, or save the adapter again"))
    return errors


def shared_errors(config: AdapterConfig, shared: Params, modules: Mapping[str, Params]) -> Errors:
    """The tensors a method stores once for all modules (SPEC.md 15.5): VeRA's ``base_model.vera_A`` ``[r, max_in]``
    and ``base_model.vera_B`` ``[max_out, r]``, ``max_out`` the longest ``vera_lambda_b``. Methods without
    shared tensors: none."""
    if config.peft_type == "VBLORA":
        return _vblora.shared_errors(config, shared)
    if config.peft_type != "VERA":
        return []
    hint = "save the adapter again with PEFT and save_projection true (SPEC.md 15.5)"
    errors: Errors = [MissingTensorError("missing (VeRA stores its shared projections once, with save_projection "
                                         "true)", key=shared_key(n), hint=hint) for n in SHARED if n not in shared]
    r = vera_rank(config)
    for name, axis in (("vera_A", 0), ("vera_B", 1)):
        info = shared.get(name)
        if info is None:
            continue
        if len(info.shape) != 2:
            errors.append(ShapeMismatchError(f"shape {list(info.shape)}: must have 2 axes", key=shared_key(name),
                                             hint=hint))
        elif info.shape[axis] != r:
            errors.append(ShapeMismatchError(f"shape {list(info.shape)}: axis {axis} must be the config's r={r}",
                                             key=shared_key(name), hint=f"set r to {info.shape[axis]}, or {hint}"))
    outs = [p["vera_lambda_b"].shape[0] for p in modules.values()
            if "vera_lambda_b" in p and len(p["vera_lambda_b"].shape) == 1]
    info = shared.get("vera_B")
    if outs and info is not None and len(info.shape) == 2 and info.shape[0] != max(outs):
        errors.append(ShapeMismatchError(f"shape {list(info.shape)}: axis 0 must be the largest output size of the "
                                         f"adapted modules, {max(outs)} (the longest vera_lambda_b)",
                                         key=shared_key("vera_B"), hint=hint))
    return errors


#: Larger dimensions are not checked (no layer has them; factorising costs O(sqrt(n))).
_MAX_FACTORED = 2**32


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (LyCORIS') split of ``dimension`` into two factors (SPEC.md 6.5), in O(sqrt(dimension)).

    >>> factorization(32), factorization(128, 4), factorization(127)
    ((4, 8), (4, 32), (1, 127))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    small = [d for d in range(2, math.isqrt(dimension) + 1) if dimension % d == 0]
    divisors = small + [dimension // d for d in reversed(small) if dimension // d != d] + [dimension]
    m, n = 1, dimension
    for new_m in divisors:  # PEFT walks the divisors upwards while m < n and new_m <= factor
        if m >= n or new_m > factor:
            break
        m, n = new_m, dimension // new_m
    return (n, m) if m > n else (m, n)


# -- MISS (SPEC.md 17.2) ------------------------------------------------------------------------
def _miss_block(config: AdapterConfig, module: str, p: Params) -> Errors:
    """``miss_block`` is ``[r, out]`` (plain), ``[r, mini_r]`` (``init_weights`` "mini") or ``[out/r, r, r]`` ("bat")."""
    name = miss_facts.PARAM
    if name not in p:
        return [_missing(module, name, "MiSS stores miss_block per adapted module")]
    info, r, kind = p[name], miss_facts.rank(config), miss_facts.mode(config)
    hint = "save the adapter again, or check r, init_weights and mini_r"
    if kind == miss_facts.BAT:
        if len(info.shape) != 3 or info.shape[1:] != (r, r):
            return [_shape(module, name, info, f"init_weights 'bat': must be [out/r, r, r] with r={r}", hint)]
    elif kind == miss_facts.MINI:
        if tuple(info.shape) != (r, miss_facts.mini_r(config)):
            return [_shape(module, name, info, f"init_weights 'mini': must be [r, mini_r] = [{r}, "
                                               f"{miss_facts.mini_r(config)}]", hint)]
    elif len(info.shape) != 2 or info.shape[0] != r:
        return [_shape(module, name, info, f"must be [r, out] with r={r}", hint)]
    return []


# -- TRAINABLE_TOKENS (SPEC.md 15.2) ---------------------------------------------------------
def _trainable_tokens(config: AdapterConfig, module: str, p: Params) -> Errors:
    """``trainable_tokens_delta`` is ``[len(token_indices), dim]``: the rows it puts in the layer's weight."""
    name = "trainable_tokens_delta"
    if name not in p:
        return [_missing(module, name, "TRAINABLE_TOKENS stores trainable_tokens_delta per layer")]
    info, rows = p[name], len(config.get("token_indices") or [])
    if len(info.shape) != 2 or info.shape[0] != rows:
        return [_shape(module, name, info, f"must be [len(token_indices), dim] = [{rows}, dim]",
                       "save the adapter again, or check token_indices")]
    return []


# -- LN_TUNING (SPEC.md 15.3) ------------------------------------------------------------------
def _ln_tuning(config: AdapterConfig, module: str, p: Params) -> Errors:
    """The copy's ``weight`` (and a LayerNorm's ``bias``, 1-D of the same length) under ``ln_tuning_layers.``."""
    weight, bias = p.get("ln_tuning_layers.weight"), p.get("ln_tuning_layers.bias")
    if weight is None:
        return [_missing(module, "ln_tuning_layers.weight", "LN tuning stores the layer's weight")]
    if bias is not None and (len(bias.shape) != 1 or bias.shape[0] != weight.shape[0]):
        return [_shape(module, "ln_tuning_layers.bias", bias, f"must be 1-D, [{weight.shape[0]}] as the weight's rows",
                       "save the adapter again")]
    return []


# -- RoAd (SPEC.md 17.1) --------------------------------------------------------------------------
def _road(config: AdapterConfig, module: str, p: Params) -> Errors:
    """``road_theta`` and ``road_alpha``: 1-D, the same length, a length the variant and group_size allow (the
    layer's own length, from its output features, is checked where the model is known)."""
    errors: Errors = [_missing(module, n, "RoAd stores road_theta and road_alpha per adapted module")
                      for n in ("road_theta", "road_alpha") if n not in p]
    hint = "save the adapter again with PEFT (SPEC.md 17.1)"
    errors += _axes(module, p, {"road_theta": (1,), "road_alpha": (1,)}, hint)
    if errors:
        return errors
    theta, alpha = p["road_theta"], p["road_alpha"]
    if alpha.shape != theta.shape:
        return [_shape(module, "road_alpha", alpha, f"must equal road_theta's shape {list(theta.shape)}", hint)]
    problem = road_length_problem(config, theta.shape[0])
    if problem is not None:
        return [_shape(module, name, p[name], problem, "set variant and group_size to the ones the adapter was "
                                                       "trained with, or save it again") for name in ("road_theta",
                                                                                                      "road_alpha")]
    return []


METHOD_CHECKS: Mapping[str, Callable[[AdapterConfig, str, Params], Errors]] = {
    "LORA": _lora,
    "IA3": _ia3,
    "LOHA": _loha,
    "LOKR": _lokr,
    "OFT": _oft,
    "BOFT": _boft,
    "ADALORA": _adalora,
    "VERA": _vera,
    "MISS": _miss_block,
    "VBLORA": _vblora.module_errors,
    "TRAINABLE_TOKENS": _trainable_tokens,
    "LN_TUNING": _ln_tuning,
    "ROAD": _road,
    "HRA": _hra_check,  # SPEC.md 17.3
    "C3A": _c3a.module_errors,  # SPEC.md 17.7
    "GRALORA": _gralora.module_errors,  # SPEC.md 17.5
    "DELORA": _delora.module_errors,  # SPEC.md 17.6
    "BEFT": _beft.module_errors,  # SPEC.md 17.8
}
