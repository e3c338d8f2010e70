r"""Mutation testing of the conformance corpus: single-rule mutants of the reference implementation.

Each :class:`Mutant` breaks one normative rule of SPEC.md sections 2-10 in the reference implementation
(``--impl reference``: adapterspec's core reader plus the float64 NumPy math), by replacing one function
or constant for the duration of a ``with`` block. The corpus is only as good as the mutants it kills: a
mutant that passes every case is a rule no case checks (an independent implementation could break it
and still claim conformance). ``tests/conformance/test_mutants.py`` runs each one, stopping at the first
failing case; ``python tests/conformance/mutants.py`` prints the table of ``conformance_tests/README.md``.

>>> len(MUTANTS) > 50
True
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import tempfile
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapterspec import (
    _adalora, _safetensors, adapter, checks, config, folder, naming, read_adapter, spec, targets, write_adapter,
)
from adapterspec import _method_checks as method_checks
from adapterspec._regex import Pattern
from adapterspec.errors import DTypeMismatchError, FileFormatError, UnexpectedTensorError
from adapterspec.conformance import Corpus, Status, _io, load_corpus, reference, reference_impl
from adapterspec.conformance.cases import Case
from adapterspec.conformance.runner import load_error_hierarchy, run_case

__all__ = ["KINDS", "MUTANTS", "Mutant", "applied", "kill", "table"]

KINDS = ("schema", "folder", "numeric", "roundtrip")
#: what each kind of case exercises: the schema cases only validate a config
_LOADS = ("folder", "numeric", "roundtrip")

Patch = tuple[Any, str, Any]


@dataclass(frozen=True)
class Mutant:
    """A single-rule change of the reference implementation.

    :param id: a short name, unique.
    :param section: the SPEC.md section whose rule it breaks (``"4.3"``).
    :param rule: the rule, as the spec states it.
    :param patches: ``(object, attribute, wrong value)`` triples, computed when the mutant is applied.
    :param first: case names (regexes) tried first: where the mutant is expected to die (speed only).
    :param kinds: the kinds of case that can observe the change (schema cases only validate configs).
    :param equivalent: why no case can observe the change, for a mutant that is not expected to die.
    """

    id: str
    section: str
    rule: str
    patches: Callable[[], list[Patch]]
    first: tuple[str, ...] = ()
    kinds: tuple[str, ...] = KINDS
    equivalent: str | None = None


def _clear_caches() -> None:
    # answers memoised across configs would hide a mutant of the code that computed them
    config._VALID.clear()
    config._SHARED_MATCHES.clear()


@contextlib.contextmanager
def applied(mutant: Mutant) -> Iterator[None]:
    """The mutant in effect inside the block (memoised answers cleared on entry and exit).

    >>> with applied(MUTANTS[0]):                                                   # doctest: +SKIP
    ...     ...
    """
    _clear_caches()
    try:
        with contextlib.ExitStack() as stack:
            for owner, name, value in mutant.patches():
                original = getattr(owner, name)
                stack.callback(setattr, owner, name, original)
                setattr(owner, name, value)
            yield
    finally:
        _clear_caches()


def _ordered(mutant: Mutant, cases: Sequence[Case]) -> list[Case]:
    eligible = [c for c in cases if c.kind in mutant.kinds]
    first = [c for c in eligible if any(re.search(p, c.name) for p in mutant.first)]
    return first + [c for c in eligible if c not in first]


def kill(mutant: Mutant, corpus: Corpus, impl: Any | None = None) -> tuple[str | None, int]:
    """The first case the mutant fails (``None``: it survives) and how many cases ran.

    >>> kill(MUTANTS[0], load_corpus())                                             # doctest: +SKIP
    ('folder/major-version-2', 1)
    """
    impl = impl if impl is not None else reference_impl.ReferenceImplementation()
    hierarchy = load_error_hierarchy(corpus.root)
    ran = 0
    with tempfile.TemporaryDirectory(prefix="adapterspec-mutant-") as tmp, applied(mutant):
        for case in _ordered(mutant, corpus.cases):
            workdir = Path(tmp) / f"{ran:04d}"
            workdir.mkdir()
            ran += 1
            if run_case(impl, case, workdir, hierarchy).status is Status.FAILED:
                return case.name, ran
    return None, ran


# -- wrong variants of the rules ------------------------------------------------------------------------


class _Source:
    """A string target_modules / exclude_modules kept as text, for the regex mutants."""

    def __init__(self, source: str) -> None:
        self.source, self.compiled = source, re.compile(source)

    def fullmatch(self, path: str) -> bool:
        return self.compiled.fullmatch(path) is not None


def _matches(*, exclude: bool = True, save: bool = True, regex: str = "fullmatch", exact: bool = True,
             exact_skips_layers: bool = True, dot: bool = True, layers: bool = True,
             exclude_dot: bool = True) -> Callable[..., bool]:
    """``Targeting.matches`` (SPEC 4.3) with one step changed by the flag set to its wrong value."""

    def selects(selector: Any, path: str) -> bool:
        if isinstance(selector, _Source):
            return selector.fullmatch(path)
        return targets._selects(selector, path)

    def matches(self: targets.Targeting, path: str) -> bool:
        if exclude and self.exclude is not None and (
                selects(self.exclude, path) if exclude_dot or not isinstance(self.exclude, frozenset)
                else path.endswith(tuple(self.exclude))):
            return False
        if save and any(pattern.match(path) for pattern in self.save):
            return False
        if self.targets is None:
            return False
        if isinstance(self.targets, _Source):
            return getattr(re, regex)(self.targets.source, path) is not None
        if isinstance(self.targets, Pattern):
            return self.targets.fullmatch(path)
        if exact and path in self.targets:
            if exact_skips_layers:
                return True
        elif not any(path.endswith(("." if dot else "") + t) for t in self.targets):
            return False
        if self.layers is None or not layers:
            return True
        return targets.layer_index(path, self.layers_pattern) in self.layers

    return matches


def _pattern_source() -> list[Patch]:
    original = targets._selector

    def selector(value: Any) -> Any:
        return _Source(value) if isinstance(value, str) else original(value)

    return [(targets, "_selector", selector)]


def _targeting(**flags: Any) -> Callable[[], list[Patch]]:
    def patches() -> list[Patch]:
        extra = _pattern_source() if "regex" in flags else []
        return extra + [(targets.Targeting, "matches", _matches(**flags))]
    return patches


def _pattern_rule(match: Callable[[str, str], bool], *, last: bool = False) -> Callable[[], list[Patch]]:
    """rank_pattern / alpha_pattern (SPEC 4.4) matched by ``match(key, path)``, or with the last key winning:
    in the math (``reference._pattern``) and in the checks (``AdapterConfig``'s tables, ``pattern_value``)."""

    def value(patterns: Mapping[str, Any] | None, path: str, default: Any) -> Any:
        items = list((patterns or {}).items())
        for key, found in reversed(items) if last else items:
            if match(key, path):
                return found
        return default

    class Table:
        def __init__(self, patterns: Mapping[str, Any] | None) -> None:
            self.patterns = patterns

        def value(self, path: str, *, default: Any) -> Any:
            return value(self.patterns, path, default)

    def pattern_value(patterns: Mapping[str, Any] | None, path: str, *, default: Any) -> Any:
        return value(patterns, path, default)

    return lambda: [(reference, "_pattern", value), (config, "PatternTable", Table),
                    (method_checks, "pattern_value", pattern_value)]


def _anchored(key: str, path: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", path) is not None


def _without(field: str, *, methods: tuple[str, ...] = ("LORA", "LOHA", "LOKR")) -> Callable[[], list[Patch]]:
    """``field`` (rank_pattern / alpha_pattern) ignored for ``methods``, in the math and the checks."""
    original_rank_and_alpha, original_table = reference.rank_and_alpha, config.AdapterConfig._table

    def rank_and_alpha(cfg: Mapping[str, Any], path: str) -> tuple[int, float]:
        if cfg["peft_type"] in methods:
            cfg = {k: v for k, v in cfg.items() if k != field}
        return original_rank_and_alpha(cfg, path)

    def table(self: config.AdapterConfig, name: str) -> targets.PatternTable:
        if name == field and self.peft_type in methods:
            return targets.PatternTable({})
        return original_table(self, name)

    return lambda: [(reference, "rank_and_alpha", rank_and_alpha), (config.AdapterConfig, "_table", table)]


def _is_feedforward(match: Callable[[str, str], bool]) -> Callable[[], list[Patch]]:
    """IA3's feedforward rule (SPEC 4.3) with list entries matched by ``match(entry, path)``."""

    def is_ff(cfg: Mapping[str, Any], path: str) -> bool:
        entries = cfg.get("feedforward_modules") or []
        if isinstance(entries, str):
            return re.fullmatch(entries, path) is not None
        return any(match(e, path) for e in entries)

    return lambda: [(reference, "_is_feedforward", is_ff), (config, "is_feedforward", is_ff)]


def _returning(value: Any) -> Callable[..., Any]:
    return lambda *args, **kwargs: value


def _math(name: str, wrong: Callable[..., Any]) -> Callable[[], list[Patch]]:
    return lambda: [(reference, name, wrong)]


def _wrap(owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Callable[[], list[Patch]]:
    return lambda: [(owner, name, make(getattr(owner, name)))]


# the wrong math, each a one-line change of reference.py

def _scaling_alpha_only(cfg: Mapping[str, Any], path: str) -> float:
    return reference.rank_and_alpha(cfg, path)[1]


def _scaling_no_rslora(cfg: Mapping[str, Any], path: str) -> float:
    r, alpha = reference.rank_and_alpha(cfg, path)
    return alpha / r


def _lokr_full_unscaled(original: Callable[..., Any]) -> Callable[..., Any]:
    def lokr(module: Any, weight: Any, cfg: Mapping[str, Any], path: str, t: Mapping[str, Any]) -> Any:
        if "lokr_w1" in t and "lokr_w2" in t:
            r, _ = reference.rank_and_alpha(cfg, path)
            cfg = {**cfg, "alpha": r, "alpha_pattern": {}}
        return original(module, weight, cfg, path, t)
    return lokr


def _lokr_kron_swapped(module: Any, weight: Any, cfg: Mapping[str, Any], path: str, t: Mapping[str, Any]) -> Any:
    """reference._lokr with the Kronecker factors in the wrong order: kron(W2, W1')."""
    f = {k: np.asarray(v, dtype=np.float64) for k, v in t.items()}
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif "lokr_t2" in f:
        w2 = np.einsum("ijkl,ip,jr->prkl", f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
    w1 = w1.reshape(w1.shape + (1,) * (w2.ndim - 2))
    return weight + reference.scaling(cfg, path) * np.kron(w2, w1).reshape(np.shape(weight))


def _loha_sum(original: Callable[..., Any]) -> Callable[..., Any]:
    def loha(module: Any, weight: Any, cfg: Mapping[str, Any], path: str, t: Mapping[str, Any]) -> Any:
        if "hada_t1" in t:
            return original(module, weight, cfg, path, t)
        f = {k: np.asarray(v, dtype=np.float64) for k, v in t.items()}
        delta = f["hada_w1_a"] @ f["hada_w1_b"] + f["hada_w2_a"] @ f["hada_w2_b"]
        return weight + reference.scaling(cfg, path) * delta.reshape(np.shape(weight))
    return loha


def _loha_effective_untransposed(original: Callable[..., Any]) -> Callable[..., Any]:
    def loha(module: Any, weight: Any, cfg: Mapping[str, Any], path: str, t: Mapping[str, Any]) -> Any:
        if "hada_t1" not in t:
            return original(module, weight, cfg, path, t)
        f = {k: np.asarray(v, dtype=np.float64) for k, v in t.items()}

        def rebuild(core: str, a: str, b: str) -> Any:  # _a read as [out, r] as in the plain form
            return np.einsum("ijkl,jr,pi->prkl", f[core], f[b], f[a].reshape(f[a].shape[::-1]))
        delta = rebuild("hada_t1", "hada_w1_a", "hada_w1_b") * rebuild("hada_t2", "hada_w2_a", "hada_w2_b")
        return weight + reference.scaling(cfg, path) * delta.reshape(np.shape(weight))
    return loha


def _lora_mutant(change: str) -> Callable[..., Any]:
    """reference._lora with one step of SPEC 6.1/8.1/8.2 changed."""

    def lora(module: Mapping[str, Any], weight: Any, bias: Any, cfg: Mapping[str, Any], path: str,
             t: Mapping[str, Any]) -> tuple[Any, Any]:
        kind = module["kind"]
        s = reference.scaling(cfg, path)
        weight = reference._initial_base(kind, weight, cfg, path)  # PiSSA / OLoRA residuals (SPEC 8.1)
        if kind == "embedding":
            a, b = reference._f64(t["lora_embedding_A"]), reference._f64(t["lora_embedding_B"])
            if change == "embedding-swapped":
                a, b = b.T, a.T
        else:
            a, b = reference._f64(t["lora_A.weight"]), reference._f64(t["lora_B.weight"])
        r = a.shape[0]
        if change == "b-transposed":
            flat = b.reshape(b.shape[0], -1)
            b = flat.reshape(flat.shape[1], flat.shape[0]).T.reshape(b.shape)
        field_decides = change == "fan-in-fan-out-from-field" and kind == "gpt2_conv1d" and not cfg.get("fan_in_fan_out")
        if change == "embedding-unscaled" and kind == "embedding":
            s = 1.0
        w = weight if (change == "fan-in-fan-out" and kind == "gpt2_conv1d") or field_decides \
            else reference._out_in(kind, weight)
        delta = b.reshape(-1, r) @ a.reshape(r, -1)
        adapted = w + s * (delta.T if change == "fan-in-fan-out" and kind == "gpt2_conv1d" else delta)
        if "lora_magnitude_vector" in t and change != "dora-ignored":
            magnitude = reference._f64(t["lora_magnitude_vector"]).reshape(-1)
            if change == "dora-norm-of-whole":
                adapted = (magnitude / np.linalg.norm(adapted))[:, None] * adapted
            elif change == "dora-norm-of-base":
                adapted = (magnitude / np.linalg.norm(w, axis=1))[:, None] * adapted
            elif change == "dora-norm-plain-scale":  # the norm of W + (alpha / r) B A, whatever use_rslora says
                plain = w + reference.rank_and_alpha(cfg, path)[1] / r * delta
                adapted = (magnitude / np.linalg.norm(plain, axis=1))[:, None] * adapted
            else:
                adapted = (magnitude / np.linalg.norm(adapted, axis=1))[:, None] * adapted
        if "lora_B.bias" in t and not (change == "conv-bias-ignored" and kind in ("conv1d", "conv2d")):
            extra = (1.0 if change == "bias-unscaled" else s) * reference._f64(t["lora_B.bias"])
            bias = extra if bias is None else reference._f64(bias) + extra
        if (change == "fan-in-fan-out" and kind == "gpt2_conv1d") or field_decides:
            return adapted.reshape(weight.shape), bias
        return reference._from_out_in(kind, adapted, weight.shape), bias

    return lora


def _ia3_mutant(change: str) -> Callable[..., Any]:
    original = reference.forward

    def forward(module: Mapping[str, Any], base: Mapping[str, Any], x: Any, cfg: Mapping[str, Any], path: str,
                tensors: Mapping[str, Any]) -> Any:
        if cfg["peft_type"] != "IA3" or not tensors:
            return original(module, base, x, cfg, path, tensors)
        weight = reference._f64(base["weight"])
        bias = None if base.get("bias") is None else reference._f64(base["bias"])
        scale = reference._f64(tensors["ia3_l"]).reshape(-1)
        channel_axis = 1 if module["kind"] in ("conv1d", "conv2d") and change != "channels-last" else -1
        if change == "feedforward-scales-output" or not reference._is_feedforward(cfg, path):
            if change == "bias-unscaled":
                y = reference.base_forward(module, weight, None, x)
            else:
                y = reference.base_forward(module, weight, bias, x)
            shape = [1] * y.ndim
            shape[channel_axis] = y.shape[channel_axis]
            if scale.size != y.shape[channel_axis]:
                raise ValueError("ia3_l does not fit the output")
            y = y * scale.reshape(shape)
            if change == "bias-unscaled" and bias is not None:
                y = y + (bias.reshape((1, -1) + (1,) * (y.ndim - 2)) if channel_axis == 1 else bias)
            return y
        return original(module, base, x, cfg, path, tensors)

    return forward


def _prompt_appended(prompt_embeddings: Any, inputs_embeds: Any) -> Any:
    x = reference._f64(inputs_embeds)
    p = np.broadcast_to(reference._f64(prompt_embeddings)[None], (x.shape[0], *np.shape(prompt_embeddings)))
    return np.concatenate([x, p], axis=1)


def _conv_without(field: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return lambda original: _conv_no(original, field)


def _conv_no(original: Callable[..., Any], field: str) -> Callable[..., Any]:
    def base_forward(module: Mapping[str, Any], weight: Any, bias: Any, x: Any) -> Any:
        if module["kind"] in ("conv1d", "conv2d"):
            module = {**module, field: None}
        return original(module, weight, bias, x)
    return base_forward


class _Silent:
    """A ``warnings`` module whose ``warn`` does nothing."""

    @staticmethod
    def warn(*args: Any, **kwargs: Any) -> None:
        return None

    catch_warnings = warnings.catch_warnings
    simplefilter = warnings.simplefilter


def _read_adapter(**forced: Any) -> Callable[[], list[Patch]]:
    original = read_adapter

    def read(path: Any, **kwargs: Any) -> Any:
        return original(path, **{**kwargs, **forced})

    return lambda: [(reference_impl, "read_adapter", read)]


def _bf16_misread(original: Callable[..., Any]) -> Callable[..., Any]:
    def to_numpy(self: _io.RawTensor) -> Any:
        if self.dtype == "BF16":  # the two bytes of each value swapped
            bits = np.frombuffer(self.data, dtype=">u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(self.shape)
        return original(self)
    return to_numpy


def _roundtrip_widens() -> list[Patch]:
    original = write_adapter

    def write(path: Any, cfg: Any, tensors: Mapping[str, Any], **kwargs: Any) -> Any:
        widened = {k: np.asarray(v, dtype=np.float32) if np.asarray(v).dtype.kind == "f" or
                   str(np.asarray(v).dtype) == "bfloat16" else v for k, v in tensors.items()}
        return original(path, cfg, widened, **kwargs)

    return [(reference_impl, "write_adapter", write)]


def _roundtrip_sorts_patterns() -> list[Patch]:
    """A writer that sorts the members of rank_pattern / alpha_pattern (as PEFT's sort_keys does)."""
    original = write_adapter

    def write(path: Any, cfg: Any, tensors: Mapping[str, Any], **kwargs: Any) -> Any:
        data = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        for field in ("rank_pattern", "alpha_pattern"):
            if isinstance(data.get(field), dict):
                data[field] = dict(sorted(data[field].items()))
        return original(path, data, tensors, **kwargs)

    return [(reference_impl, "write_adapter", write)]


def _modules_to_save_ignored() -> list[Patch]:
    return [(reference_impl, "replacements", _returning({}))]


def _no_check_against_model(part: str) -> Callable[[], list[Patch]]:
    """check_against_model with one of its checks (SPEC 10, 18-20) removed."""
    original, check_layer = reference_impl.check_against_model, reference_impl._check_layer
    check_supported = reference_impl._check_supported

    def check(adapter_: Any, model: Mapping[str, Any]) -> None:
        cfg = adapter_.config
        if cfg.is_prompt_learning or part != "target-exists":
            return original(adapter_, model)
        # the mutant: a module the model lacks is taken to exist (and to fit whatever the adapter holds)
        modules = dict(model.get("modules") or reference_impl._decoder_modules(model.get("decoder") or {}))
        for key in adapter_.tensors:
            name = naming.parse_key(key, cfg.peft_type, cfg)
            if name.role == "adapter" and name.module not in modules:
                modules[name.module] = {"kind": "made-up"}
        return original(adapter_, {**model, "modules": modules})

    def lenient_layer(cfg: Any, path: str, layer: Mapping[str, Any], shapes: Mapping[str, Any]) -> None:
        if layer.get("kind") == "made-up" or part == "shapes":
            return None
        return check_layer(cfg, path, layer, shapes)

    def lenient_kind(cfg: Any, path: str, layer: Mapping[str, Any]) -> None:
        if layer.get("kind") == "made-up":
            return None
        return check_supported(cfg, path, layer)

    def missing_module(adapter_: Any, model: Mapping[str, Any]) -> None:
        cfg = adapter_.config
        if cfg.is_prompt_learning:
            return original(adapter_, model)
        names = {naming.parse_key(k, cfg.peft_type, cfg).module for k in adapter_.tensors}
        modules = model.get("modules") or reference_impl._decoder_modules(model.get("decoder") or {})
        return original(adapter_, {**model, "modules": {p: m for p, m in modules.items() if p in names}})

    if part == "missing-module":
        return lambda: [(reference_impl, "check_against_model", missing_module)]
    return lambda: [(reference_impl, "check_against_model", check), (reference_impl, "_check_layer", lenient_layer),
                    (reference_impl, "_check_supported", lenient_kind)]


def _method_check(method: str, wrong: Callable[..., Any]) -> Callable[[], list[Patch]]:
    return lambda: [(checks, "METHOD_CHECKS", {**method_checks.METHOD_CHECKS, method: wrong})]


def _lora_check_without(param: str) -> Callable[..., Any]:
    """The LoRA checks (SPEC 10, check 9) blind to ``param``: it is neither required nor refused."""
    original = method_checks.METHOD_CHECKS["LORA"]

    def check(cfg: Any, module: str, p: Mapping[str, Any]) -> list[Any]:
        return [e for e in original(cfg, module, p) if not (getattr(e, "key", "") or "").endswith(param)]

    return check


def _errors_without(word: str) -> Callable[[], list[Patch]]:
    """tensor_errors without the errors whose message contains ``word`` (one check of SPEC 10)."""
    original = checks.tensor_errors

    def tensor_errors(cfg: Any, tensors: Mapping[str, Any]) -> list[Any]:
        return [e for e in original(cfg, tensors) if word not in str(e)]

    return lambda: [(adapter, "tensor_errors", tensor_errors)]


def _accepts_truncated() -> list[Patch]:
    original = _safetensors.read_header

    def read_header(path: Path, file: Any = None) -> Any:
        try:
            return original(path, file)
        except Exception:  # noqa: BLE001 - the mutant: the header "looks fine"
            import json
            import struct

            blob = Path(path).read_bytes()
            (n,) = struct.unpack("<Q", blob[:8])
            header = json.loads(blob[8:8 + n])
            metadata = header.pop("__metadata__", {}) or {}
            infos = {k: checks.TensorInfo(tuple(v["shape"]), v["dtype"]) for k, v in header.items()}
            spans = {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()}
            return _safetensors.Header(infos, metadata, blob[8:8 + n], len(blob), spans)

    return [(_safetensors, "read_header", read_header)]


def _parse_key(*, prefix_optional: bool = False, malformed_ok: bool = False) -> list[Patch]:
    """parse_key (SPEC 5.4) accepting keys without ``base_model.model.`` or with a malformed module name."""
    original = naming.parse_key

    def parse_key(key: str, peft_type: str, cfg: Mapping[str, Any] | None = None) -> naming.TensorName:
        if prefix_optional and key != naming.PROMPT_KEY and not key.startswith(spec.PEFT_PREFIX):
            key = spec.PEFT_PREFIX + key
        try:
            return original(key, peft_type, cfg)
        except UnexpectedTensorError as exc:
            if not (malformed_ok and "is malformed" in str(exc)):
                raise
            found = naming._method_tensor(key, key[len(spec.PEFT_PREFIX):], peft_type)
            if found is None:
                raise
            return found

    return [(checks, "parse_key", parse_key), (reference_impl, "parse_key", parse_key)]


def _exclude_regex_prefix() -> list[Patch]:
    """A string exclude_modules matched at the start of the name only (re.match, not re.fullmatch)."""
    original_init = targets.Targeting.__init__

    class _Prefix:
        def __init__(self, source: str) -> None:
            self.source = source

    def init(self: targets.Targeting, cfg: Mapping[str, Any]) -> None:
        original_init(self, cfg)
        if isinstance(cfg.get("exclude_modules"), str) and cfg.get("exclude_modules"):
            self.exclude = _Prefix(cfg["exclude_modules"])  # type: ignore[assignment]

    original_selects = targets._selects

    def selects(selector: Any, path: str) -> bool:
        if isinstance(selector, _Prefix):
            return re.match(selector.source, path) is not None
        return original_selects(selector, path)

    return [(targets.Targeting, "__init__", init), (targets, "_selects", selects)]


def _default(field: str, value: Any) -> Callable[[], list[Patch]]:
    """PEFT's default for an absent ``field`` (SPEC 4.1) replaced by ``value``."""
    original = config._defaults
    return lambda: [(config, "_defaults", lambda peft_type: {**original(peft_type), field: value})]


def _mixed_dtypes_refused() -> list[Patch]:
    original = checks.tensor_errors

    def tensor_errors(cfg: Any, tensors: Mapping[str, Any]) -> list[Any]:
        dtypes = {info.dtype for info in tensors.values()}
        extra = [DTypeMismatchError("mixed dtypes", key=next(iter(tensors)))] if len(dtypes) > 1 else []
        return original(cfg, tensors) + extra

    return [(adapter, "tensor_errors", tensor_errors)]


def _format_required() -> list[Patch]:
    original = adapter._check_metadata_version

    def check(cfg: Any, metadata: Mapping[str, str], weights: Path) -> None:
        if metadata.get("format") != "pt":
            raise FileFormatError("metadata 'format' is not 'pt'", path=weights)
        return original(cfg, metadata, weights)

    return [(adapter, "_check_metadata_version", check)]


def _sha256_case_insensitive() -> list[Patch]:
    original = adapter.Adapter._check_checksum

    def check(self: Any, file: Any) -> bool:
        recorded = self.metadata.get(spec.METADATA_SHA256)
        if recorded is not None and recorded.lower() != recorded:
            self.metadata = {**self.metadata, spec.METADATA_SHA256: recorded.lower()}
        return original(self, file)

    return [(adapter.Adapter, "_check_checksum", check)]


def _lokr_w1_flat(module: Any, weight: Any, cfg: Mapping[str, Any], path: str, t: Mapping[str, Any]) -> Any:
    """reference._lokr without the trailing unit axes on W1 (numpy's kron then pads it in front)."""
    f = {k: np.asarray(v, dtype=np.float64) for k, v in t.items()}
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif "lokr_t2" in f:
        w2 = np.einsum("ijkl,ip,jr->prkl", f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
    return weight + reference.scaling(cfg, path) * np.kron(w1, w2).reshape(np.shape(weight))


def _feedforward_searched() -> list[Patch]:
    """IA3's string feedforward_modules searched in the path instead of matched as a whole (SPEC 4.3)."""

    def is_ff(cfg: Mapping[str, Any], path: str) -> bool:
        entries = cfg.get("feedforward_modules") or []
        if isinstance(entries, str):
            return re.search(entries, path) is not None
        return path.endswith(tuple(entries))

    return [(reference, "_is_feedforward", is_ff), (config, "is_feedforward", is_ff)]


def _alpha_zero_as_default() -> list[Patch]:
    """lora_alpha 0 read as absent (a truth test): PEFT's default 8 instead."""
    original = reference.rank_and_alpha

    def rank_and_alpha(cfg: Mapping[str, Any], path: str) -> tuple[int, float]:
        if cfg.get("lora_alpha") == 0:
            cfg = {**cfg, "lora_alpha": 8}
        return original(cfg, path)

    return [(reference, "rank_and_alpha", rank_and_alpha)]


def _prefix_config_heads_kept() -> list[Patch]:
    """Prefix tuning laid out with the heads the config gives, not the model's key/value heads (SPEC 14.3)."""
    original = reference_impl.prefix_sizes

    def sizes(cfg: Mapping[str, Any], decoder: Mapping[str, Any]) -> dict[str, int]:
        given = {k: int(cfg[k]) for k in ("token_dim", "num_attention_heads") if cfg.get(k) is not None}
        return {**original(cfg, decoder), **given}

    return [(reference_impl, "prefix_sizes", sizes)]


def _bias_replacements_ignored() -> list[Patch]:
    """Trained biases (``bias`` lora_only / all) not put in place of the base ones (SPEC 8.8)."""
    original = reference_impl.replacements

    def replacements(adapter_: Any, arrays: Mapping[str, Any]) -> dict[str, Any]:
        cfg = adapter_.config
        kept = {k: v for k, v in arrays.items() if naming.parse_key(k, cfg.peft_type, cfg).role != "bias"}
        return original(adapter_, kept)

    return [(reference_impl, "replacements", replacements)]


def _bom_accepted() -> list[Patch]:
    """adapter_config.json read with its byte-order mark skipped (SPEC 3.1: none allowed)."""
    lenient = types.SimpleNamespace(**{**vars(json), "loads": lambda text, **kw: json.loads(text.lstrip("\ufeff"), **kw)})
    return [(config, "json", lenient)]


# -- the catalogue --------------------------------------------------------------------------------------

def _m(id_: str, section: str, rule: str, patches: Callable[[], list[Patch]], *first: str,
       kinds: tuple[str, ...] = KINDS, equivalent: str | None = None) -> Mutant:
    return Mutant(id_, section, rule, patches, tuple(first), kinds, equivalent)


def _saved_alone_refused() -> list[Patch]:
    """Take an adapter recording no save (saved alone since, SPEC 3.4) for one of another save."""
    check = folder._check_one_save

    def refusing(where: Path, saves: Mapping[str, str], recorded: Mapping[str, str | None]) -> None:
        check(where, saves, {name: recorded.get(name) or "none" for name in saves})

    return [(folder, "_check_one_save", refusing)]


MUTANTS: tuple[Mutant, ...] = (
    # 2 Versioning
    _m("version-newer-major-loaded", "2", "a newer major version is refused (VersionError)",
       lambda: [(spec, "SUPPORTED_MAJOR", 2)], "major-version-2"),
    _m("version-newer-minor-silent", "2", "a newer minor version loads with a warning",
       lambda: [(spec, "warnings", _Silent)], "newer-minor-version-metadata", kinds=_LOADS),
    _m("version-metadata-ignored", "2", "the version in the safetensors metadata is checked too",
       lambda: [(adapter, "_check_metadata_version", _returning(None))], "metadata-", kinds=_LOADS),
    _m("version-differs-silent", "2", "readers SHOULD warn when the metadata's version differs from the config's",
       lambda: [(adapter, "warnings", _Silent)], "metadata-version-differs", kinds=_LOADS),
    _m("version-pattern-loose", "2", "the version is MAJOR.MINOR, the whole string, no leading zeros",
       lambda: [(spec, "_VERSION_RE", re.compile(r"\s*0*(\d+)\.0*(\d+)\s*"))], "version-malformed"),
    _m("unknown-fields-refused", "2", "readers MUST NOT fail because of unknown fields",
       _wrap(config, "validate_config", lambda f: lambda data, strict=False, path=None: f(data, strict=True, path=path)),
       "newer-minor-version"),
    _m("unsupported-field-ignored", "2", "a known field the reader does not implement is refused (UnsupportedError)",
       lambda: [(adapter, "unsupported_features", _returning([]))], "unsupported|qalora|not-portable", kinds=_LOADS),
    # 3 Directory layout
    _m("pickle-without-opt-in", "3.1", "adapter_model.bin is read only with an explicit opt-in",
       _read_adapter(allow_pickle=True), "pickle", kinds=_LOADS),
    _m("manifest-path-escapes", "3.4", "a manifest name or path that leaves the folder is refused (UnsafeFileError)",
       lambda: [(folder, "_refuse_unsafe_entries", _returning(None))], "manifest", kinds=_LOADS),
    _m("manifest-symlink-escapes", "3.4", "a manifest path that leaves the folder through a symbolic link is refused",
       lambda: [(folder, "_within", _returning(True))], kinds=(), equivalent="the corpus is plain files (no "
       "symbolic links, so that any implementation can read it): tests/test_folder.py covers this rule"),
    _m("subfolder-name-unchecked", "3.5", "without a manifest, subfolders with invalid adapter names are skipped",
       lambda: [(folder, "_valid_name", _returning(True))], "invalid-subfolder", kinds=_LOADS),
    # 4.1-4.2 Config
    _m("schema-not-checked", "4.1", "the config validates against adapter_config.schema.json",
       lambda: [(config, "config_errors", _returning([]))], "^schema/"),
    _m("regex-not-compiled", "4.2", "every regular expression of the config compiles (rule 1)",
       lambda: [(config, "regex_problems", _returning([]))], "regex|pattern"),
    _m("rules-beyond-schema-skipped", "4.2", "IA3 subset rule, token_dim divisible by heads (rules 2-3)",
       lambda: [(config, "rule_problems", _returning([]))], "subset|divisible|feedforward"),
    _m("default-lora-alpha", "4.1", "an absent field takes PEFT's default (lora_alpha 8)",
       _default("lora_alpha", 16), "defaults", kinds=_LOADS),
    _m("default-r", "4.1", "an absent field takes PEFT's default (r 8)", _default("r", 4), "defaults", kinds=_LOADS),
    _m("json-duplicate-keys-accepted", "3.1", "objects with duplicate member names are refused (FileFormatError)",
       lambda: [(config, "_unique_members", dict)], "duplicate-key", kinds=_LOADS),
    _m("json-nan-accepted", "3.1", "NaN / Infinity are not JSON: refused (FileFormatError)",
       lambda: [(config, "_refuse_constant", float)], "config-nan", kinds=_LOADS),
    # 4.3 Target matching
    _m("exclude-modules-ignored", "4.3", "exclusion wins (step 1)", _targeting(exclude=False), "exclude",
       kinds=_LOADS),
    _m("modules-to-save-adapted", "4.3", "modules to save never get an adapter (step 2)", _targeting(save=False),
       "modules-to-save", kinds=_LOADS),
    _m("target-regex-search", "4.3", "a string target_modules must match the WHOLE name (step 3)",
       _targeting(regex="search"), "regex", kinds=_LOADS),
    _m("target-regex-prefix", "4.3", "a string target_modules must match up to the end of the name (step 3)",
       _targeting(regex="match"), "regex", kinds=_LOADS),
    _m("target-exact-entry-ignored", "4.3", "an entry equal to the name selects it (step 4)", _targeting(exact=False),
       "linear", kinds=_LOADS),
    _m("layers-applied-to-exact-entry", "4.3", "layers_to_transform is not applied to an exact entry (step 4)",
       _targeting(exact_skips_layers=False), "layers", kinds=_LOADS),
    _m("target-suffix-without-dot", "4.3", "list entries match on '.' boundaries (step 5)", _targeting(dot=False),
       "boundary", kinds=_LOADS),
    _m("layers-to-transform-ignored", "4.3", "layers_to_transform restricts the layers (step 5)",
       _targeting(layers=False), "layers", kinds=_LOADS),
    _m("layer-index-greedy", "4.3", "the layer index is the FIRST numbered segment (lazy .*?)",
       lambda: [(targets, "_DEFAULT_LAYER", re.compile(r".*\.[^.]*\.(?P<idx>\d+)\."))], "layers", kinds=_LOADS),
    _m("layers-pattern-ignored", "4.3", "with layers_pattern, the index follows '<layers_pattern>.'",
       _wrap(targets, "layer_index", lambda f: lambda path, layers_pattern=None: f(path)), "layers", kinds=_LOADS),
    _m("exclude-regex-prefix", "4.3", "a string exclude_modules must match the WHOLE name (step 1)",
       _exclude_regex_prefix, "exclude-regex", kinds=_LOADS),
    _m("modules-to-save-not-recognised", "4.3", "a module is saved whole iff its name ends with a modules_to_save entry",
       lambda: [(naming, "is_modules_to_save", _returning(False))], "modules-to-save", kinds=_LOADS),
    _m("feedforward-dot-boundary", "4.3", "IA3 feedforward entries match as a plain suffix, no '.' boundary",
       _is_feedforward(lambda e, p: p == e or p.endswith("." + e)), "feedforward-suffix", kinds=_LOADS),
    _m("feedforward-exact-only", "4.3", "IA3 feedforward entries match as a suffix, not only the whole name",
       _is_feedforward(lambda e, p: p == e), "ia3", kinds=_LOADS),
    # 4.4 rank_pattern / alpha_pattern
    _m("pattern-last-key-wins", "4.4", "when several keys match, the first in document order wins",
       _pattern_rule(_anchored, last=True), "pattern-order", kinds=_LOADS),
    _m("pattern-matched-anywhere", "4.4", "a key matches a '.'-aligned suffix up to the end (anchored)",
       _pattern_rule(lambda k, p: re.search(k, p) is not None), "pattern-anchoring", kinds=_LOADS),
    _m("pattern-without-dot-boundary", "4.4", "a key matches after a '.' (or the whole name)",
       _pattern_rule(lambda k, p: re.match(rf".*({k})$", p) is not None), "pattern-anchoring", kinds=_LOADS),
    _m("pattern-not-grouped", "4.4", "the key is wrapped in a group: an alternation applies as a whole",
       _pattern_rule(lambda k, p: re.match(rf"(.*\.)?{k}$", p) is not None), "pattern-anchoring", kinds=_LOADS),
    _m("rank-pattern-ignored", "4.4", "rank_pattern overrides r per module", _without("rank_pattern"), "pattern",
       kinds=_LOADS),
    _m("alpha-pattern-ignored", "4.4", "alpha_pattern overrides lora_alpha per module",
       _without("alpha_pattern", methods=("LORA",)), "pattern", kinds=_LOADS),
    _m("alpha-pattern-ignored-lycoris", "4.4", "alpha_pattern overrides alpha for LoHa/LoKr too",
       _without("alpha_pattern", methods=("LOHA", "LOKR")), "lo[hk]a-.*pattern", kinds=_LOADS),
    # 5 Tensor naming
    _m("key-prefix-optional", "5.4", "keys MUST start with base_model.model.",
       lambda: _parse_key(prefix_optional=True), "key-without-prefix", kinds=_LOADS),
    _m("adapter-name-in-key-accepted", "5.4", "a key that still holds the adapter name is refused, with a precise hint",
       lambda: [(naming, "_refuse_adapter_name", _returning(None))], "adapter-name", kinds=_LOADS,
       equivalent="the generic rule (5.4 step 4) refuses the key with the same class and key "
       "(`folder/key-with-adapter-name`); only the hint differs, and no case judges hints"),
    _m("auxiliary-unaccounted-accepted", "5.4", "an auxiliary tensor the config does not account for is refused",
       _wrap(naming, "_auxiliary", lambda f: lambda key, rest, cfg: f(key, rest, cfg) or naming.TensorName(
           key, rest.rpartition(".")[0], rest.rpartition(".")[2], "modules_to_save")), "unexpected-tensor-name",
       kinds=_LOADS),
    _m("module-name-unchecked", "5.4", "module names are non-empty '.'-separated segments (check 15)",
       lambda: _parse_key(malformed_ok=True), "module-name", kinds=_LOADS),
    # 6 Layouts
    _m("lora-b-read-transposed", "6.1", "lora_B is [out, r]", _math("_lora", _lora_mutant("b-transposed")),
       "numeric/lora-linear", kinds=_LOADS),
    _m("embedding-factors-swapped", "6.1", "lora_embedding_A is [r, V], lora_embedding_B [d, r]",
       _math("_lora", _lora_mutant("embedding-swapped")), "embedding", kinds=_LOADS),
    _m("fan-in-fan-out-ignored", "6.1", "GPT-2 Conv1D stores [in, out]: the update is transposed",
       _math("_lora", _lora_mutant("fan-in-fan-out")), "gpt2", kinds=_LOADS),
    _m("lora-partner-shapes-unchecked", "6.1", "lora_B's rank axis equals lora_A's (check 11)",
       _errors_without("must equal lora_A's rank"), "lora-b-transposed", kinds=_LOADS,
       equivalent="check 20 (shapes against the model) refuses the same tensor with the same class and key; "
       "SPEC 10 lets a reader that runs checks 18-20 skip check 11"),
    _m("dora-magnitude-shape-unchecked", "6.2", "the DoRA magnitude is [out] / [1, out, 1...]",
       _errors_without("one value per output feature"), "dora", kinds=_LOADS, equivalent=None),
    _m("ia3-orientation-unchecked", "6.3", "ia3_l is [out, 1] (scales the output) or [1, in] (feedforward)",
       _errors_without("scales the"), "ia3-wrong-orientation", kinds=_LOADS),
    _m("loha-effective-a-untransposed", "6.4", "in the effective form hada_w*_a is [r, out]",
       _wrap(reference, "_loha", _loha_effective_untransposed), "loha-conv2d-effective", kinds=_LOADS),
    _m("lokr-kron-swapped", "6.5", "W = kron(W1, W2), W1 the small left factor",
       _math("_lokr", _lokr_kron_swapped), "lokr", kinds=_LOADS),
    _m("lokr-factorization-unchecked", "6.5", "LoKr factor shapes are PEFT's factorisation",
       lambda: [(method_checks, "_kronecker", _returning([]))], "lokr", kinds=_LOADS),
    _m("lokr-w1-without-unit-axes", "6.5", "W1' = W1 with two trailing unit axes when W2 has 4",
       _math("_lokr", _lokr_w1_flat), "lokr-conv2d", kinds=_LOADS),
    _m("ia3-conv-channels-last", "6.3", "a convolution's ia3_l scales its channel axis ([1, n, 1, 1])",
       _math("forward", _ia3_mutant("channels-last")), "ia3-conv2d", kinds=_LOADS),
    _m("prompt-shape-unchecked", "6.6", "prompt_embeddings has the shape the config gives (check 12)",
       lambda: [(checks, "_prompt_errors", _returning([]))], "prompt-shape", kinds=_LOADS),
    # 7 dtypes
    _m("dtype-int32-allowed", "7", "method tensors are F32, F16, BF16 or F64",
       lambda: [(checks, "ALLOWED_DTYPES", checks.ALLOWED_DTYPES | {"I32"})], "dtype", kinds=_LOADS),
    _m("f64-refused", "7", "F64 is an allowed dtype", lambda: [(checks, "ALLOWED_DTYPES", checks.ALLOWED_DTYPES - {"F64"})],
       "lora-f64", kinds=_LOADS),
    _m("bf16-refused", "7", "BF16 is an allowed dtype", lambda: [(checks, "ALLOWED_DTYPES", checks.ALLOWED_DTYPES - {"BF16"})],
       "bf16", kinds=_LOADS),
    _m("mixed-dtypes-refused", "7", "readers MUST accept mixed dtypes (7.2)", _mixed_dtypes_refused, "mixed-dtypes",
       kinds=_LOADS),
    _m("bf16-misread", "7", "BF16 is the top half of a float32 (little-endian)",
       _wrap(_io.RawTensor, "to_numpy", _bf16_misread), "bf16", kinds=_LOADS),
    _m("roundtrip-widens-to-f32", "7", "tensors are kept in their stored dtype (round trip bit-exact)",
       lambda: _roundtrip_widens(), "roundtrip/.*-f16", kinds=("roundtrip",)),
    _m("adapter-dtype-on-half-base", "7", "on a half-precision base the adapter is held in float32 (7.5)",
       lambda: [], kinds=(), equivalent="the reference computes everything in float64 from the stored values; "
       "holding the adapter in float32 rather than the base's dtype changes outputs by less than the half-precision "
       "tolerance on the corpus' small layers (PEFT in float16 uses at most 16% of it)"),
    # 8 Math
    _m("lora-scale-ignores-r", "8.1", "s = alpha / r", _math("scaling", _scaling_alpha_only), "numeric/lora",
       kinds=_LOADS),
    _m("rslora-ignored", "8.1", "use_rslora: s = alpha / sqrt(r)", _math("scaling", _scaling_no_rslora), "rslora",
       kinds=_LOADS),
    _m("lora-bias-unscaled", "8.1", "lora_B.bias is scaled like the rest of the update",
       _math("_lora", _lora_mutant("bias-unscaled")), "lora-bias", kinds=_LOADS),
    _m("dora-magnitude-ignored", "8.2", "DoRA rescales each output row to the magnitude",
       _math("_lora", _lora_mutant("dora-ignored")), "dora", kinds=_LOADS),
    _m("dora-norm-of-base", "8.2", "the DoRA norm is of W + s B A, not of W", _math("_lora", _lora_mutant("dora-norm-of-base")),
       "dora", kinds=_LOADS),
    _m("ia3-feedforward-scales-output", "8.3", "feedforward IA3 scales the input", _math("forward", _ia3_mutant(
        "feedforward-scales-output")), "ia3", kinds=_LOADS),
    _m("ia3-bias-unscaled", "8.3", "not feedforward: y = (x W^T + b) * l, the bias scaled too",
       _math("forward", _ia3_mutant("bias-unscaled")), "ia3", kinds=_LOADS),
    _m("prefix-key-value-swapped", "8.4", "layer l's keys are slot 2l, its values slot 2l + 1",
       _wrap(reference, "prefix_key_values", lambda f: lambda cfg, p: f(cfg, p)[:, ::-1]), "prefix", kinds=_LOADS),
    _m("prompt-appended", "8.5", "the virtual tokens come BEFORE the input", _math("prompt_concat", _prompt_appended),
       "prompt", kinds=_LOADS),
    _m("loha-sum-not-product", "8.6", "LoHa: dW = s (W1a W1b) * (W2a W2b), a Hadamard product",
       _wrap(reference, "_loha", _loha_sum), "loha", kinds=_LOADS),
    _m("lokr-full-unscaled", "8.7", "LoKr: s = alpha / r in every case, also with both factors full",
       _wrap(reference, "_lokr", _lokr_full_unscaled), "lokr-linear-full", kinds=_LOADS),
    _m("modules-to-save-ignored", "8.8", "tensors of modules to save replace the base module's",
       _modules_to_save_ignored, "modules-to-save", kinds=_LOADS),
    _m("conv-stride-ignored", "8.1", "the adapted convolution keeps the base layer's stride",
       _wrap(reference, "base_forward", _conv_without("stride")), "conv2d", kinds=_LOADS),
    _m("conv-padding-ignored", "8.1", "the adapted convolution keeps the base layer's padding",
       _wrap(reference, "base_forward", _conv_without("padding")), "conv", kinds=_LOADS),
    _m("lora-embedding-unscaled", "8.1", "an Embedding's update is scaled by s too",
       _math("_lora", _lora_mutant("embedding-unscaled")), "lora-embedding", kinds=_LOADS),
    _m("dora-norm-of-whole-weight", "8.2", "the DoRA norm is per output row, not of the whole matrix",
       _math("_lora", _lora_mutant("dora-norm-of-whole")), "dora", kinds=_LOADS),
    _m("fan-in-fan-out-from-field", "4.2", "the layer kind decides fan_in_fan_out, not the field (rule 5)",
       _math("_lora", _lora_mutant("fan-in-fan-out-from-field")), "gpt2-field-false", kinds=_LOADS),
    # 9 safetensors metadata
    _m("sha256-not-verified", "9", "adapterspec_sha256 is verified (IntegrityError on mismatch)",
       lambda: [(adapter.Adapter, "_check_checksum", _returning(True))], "sha256", kinds=_LOADS),
    _m("metadata-format-required", "9", "readers accept any 'format' metadata value, or none",
       _format_required, "without-format", kinds=_LOADS),
    _m("sha256-format-unchecked", "9", "adapterspec_sha256 is 64 LOWERCASE hex digits (FileFormatError)",
       _sha256_case_insensitive, "sha256-uppercase", kinds=_LOADS),
    # 10 Validation rules
    _m("saved-module-shape-unchecked", "10", "auxiliary tensors have the shape of the tensors they replace (check 21)",
       lambda: [(reference_impl, "_check_saved_modules", _returning(None))], "modules-to-save-wrong-shape",
       kinds=_LOADS),
    _m("manifest-names-unchecked", "10", "manifest: default is a listed name; names differ beyond letter case (check 17)",
       lambda: [(folder, "_check_manifest_names", _returning(None))], "manifest", kinds=_LOADS),
    _m("truncated-data-accepted", "10", "every tensor's byte range lies inside the data section (check 6)",
       _accepts_truncated, "truncated", kinds=_LOADS),
    _m("missing-partner-accepted", "10", "tensor sets are complete per module (check 9)",
       _errors_without("missing ("), "without-magnitude", kinds=_LOADS),
    _m("lora-bias-without-flag-accepted", "10", "lora_B.bias present iff lora_bias (check 9)",
       _method_check("LORA", _lora_check_without("lora_B.bias")), "lora-bias", kinds=_LOADS),
    _m("dora-without-magnitude-accepted", "10", "lora_magnitude_vector present iff use_dora (check 9)",
       _method_check("LORA", _lora_check_without("lora_magnitude_vector")), "dora", kinds=_LOADS),
    _m("rank-unchecked", "10", "the rank axis of every factor equals r_m (check 10)",
       _errors_without("disagrees with the config's"), "rank-disagrees", kinds=_LOADS),
    _m("no-tensor-accepted", "10", "a file with no method tensor is refused",
       _errors_without("holds no"), "no-tensors", kinds=_LOADS,
       equivalent="check 19 refuses the same file with the same class: the config selects modules of the model, "
       "none of which has tensors"),
    _m("target-not-in-model-accepted", "10", "every module named by a key exists in the model (check 18)",
       _no_check_against_model("target-exists"), "target-not-in-model", kinds=_LOADS),
    _m("missing-module-accepted", "10", "a selected module without tensors is refused (check 19)",
       _no_check_against_model("missing-module"), "missing-module", kinds=_LOADS),
    _m("untargeted-tensor-accepted", "10", "tensors of a module the config does not select are refused (check 19)",
       _errors_without("is not targeted by the config"), "untargeted", kinds=_LOADS),
    _m("model-shape-unchecked", "10", "shapes agree with the model's layers (check 20)",
       _no_check_against_model("shapes"), "shape-disagrees-with-model", kinds=_LOADS),
    # corpus 1.11: the rules an independent implementation broke and still passed corpus 1.10
    _m("bom-accepted", "3.1", "adapter_config.json has no byte-order mark (FileFormatError)", _bom_accepted,
       "config-bom", kinds=_LOADS),
    _m("alpha-zero-as-default", "4.1", "lora_alpha 0 is a value (the update is scaled by 0), not PEFT's default",
       _alpha_zero_as_default, "alpha-zero", kinds=_LOADS),
    _m("exclude-plain-suffix", "4.3", "exclude_modules list entries match on '.' boundaries (step 1)",
       _targeting(exclude_dot=False), "exclude-suffix-boundary", kinds=_LOADS),
    _m("feedforward-regex-search", "4.3", "a string feedforward_modules must match the WHOLE name",
       _feedforward_searched, "feedforward-regex", kinds=_LOADS),
    _m("layers-pattern-list-first-only", "4.3", "each layers_pattern of a list is tried, the first that gives an "
       "index decides", _wrap(targets, "layer_index", lambda f: lambda path, layers_pattern=None: f(
           path, layers_pattern[:1] if isinstance(layers_pattern, list) else layers_pattern)),
       "layers-pattern-list", kinds=_LOADS),
    _m("dora-norm-plain-scale", "8.2", "with use_rslora the DoRA norm is of W + (alpha / sqrt(r)) B A",
       _math("_lora", _lora_mutant("dora-norm-plain-scale")), "dora-rslora", kinds=_LOADS),
    _m("lora-conv-bias-ignored", "8.1", "lora_B.bias is added on convolutions too",
       _math("_lora", _lora_mutant("conv-bias-ignored")), "conv2d-bias", kinds=_LOADS),
    _m("bias-replacements-ignored", "8.8", "trained biases (bias lora_only / all) replace the base layers' biases",
       _bias_replacements_ignored, "lora-bias-(all|lora-only)", kinds=_LOADS),
    _m("trainable-token-rows-ignored", "4.1", "LoRA's trainable_token_indices rows replace the embedding's rows",
       lambda: [(reference_impl, "token_weight", lambda weight, cfg, t: weight)], "lora-trainable-tokens",
       kinds=_LOADS),
    _m("roundtrip-sorts-patterns", "4.4", "writers keep the member order of rank_pattern / alpha_pattern",
       _roundtrip_sorts_patterns, "roundtrip/.*pattern-document-order", kinds=("roundtrip",)),
    _m("prefix-config-heads-kept", "14.3", "prefix tuning on a GQA model uses the key/value heads, whatever the "
       "config gives", _prefix_config_heads_kept, "prefix-tuning-gqa-config-heads", kinds=_LOADS),
    _m("adalora-alpha-zero-literal", "15.4", "AdaLoRA: a lora_alpha <= 0 scales by the rank instead",
       lambda: [(_adalora, "scaling", lambda cfg, module: float(cfg.get("lora_alpha", 8)))], "adalora-alpha-zero",
       kinds=_LOADS),
    _m("auxiliary-module-not-in-model-accepted", "10", "the module an auxiliary tensor replaces a parameter of "
       "exists in the model (check 18)", lambda: [(reference_impl, "_check_auxiliary_modules", _returning(None))],
       "not-in-model", kinds=_LOADS),
    # corpus 1.12
    _m("header-name-twice-accepted", "11.2", "no tensor and no metadata member is named twice in the safetensors "
       "header (FileFormatError)", lambda: [(_safetensors, "_refuse_repeated_names", _returning(None))], "header-",
       kinds=_LOADS),
    # corpus 1.13: one save of a set of adapters
    _m("set-of-two-saves-accepted", "3.4", "adapters recording another save than their manifest entry's save_id are "
       "refused (check 17)", lambda: [(folder, "_check_one_save", _returning(None))], "manifest-two-saves",
       kinds=_LOADS),
    _m("adapter-saved-alone-refused", "3.4", "an adapter recording no adapterspec_save_id is read as it is",
       _saved_alone_refused, "manifest-save-id", kinds=_LOADS),
)


def table(corpus: Corpus | None = None) -> str:
    """The mutants as a Markdown table (section, rule, mutant, the case that kills it), and the kill rate.

    >>> print(table())                                                             # doctest: +SKIP
    """
    corpus = corpus if corpus is not None else load_corpus()
    rows = ["| § | rule | mutant | killed by |", "|---|---|---|---|"]
    killed = total = 0
    for mutant in MUTANTS:
        if mutant.equivalent:
            rows.append(f"| {mutant.section} | {mutant.rule} | `{mutant.id}` | equivalent: {mutant.equivalent} |")
            continue
        total += 1
        case, _ = kill(mutant, corpus)
        killed += case is not None
        rows.append(f"| {mutant.section} | {mutant.rule} | `{mutant.id}` | {f'`{case}`' if case else '**survives**'} |")
    rate = f"{killed} of {total} mutants killed ({100 * killed / total:.0f}%)" if total else "no mutants"
    return "\n".join(rows) + f"\n\n{rate}; {len(MUTANTS) - total} equivalent.\n"


if __name__ == "__main__":
    sys.stdout.write(table())
