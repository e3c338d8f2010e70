"""Fields a method knows, at values other than the corpus': the same outputs as PEFT, or a typed refusal.

Every float32 numeric case is run again once per field its method's schema knows, with that field set to
another value (a flipped boolean, another enum value, other numbers, a layer restriction, a pattern, a
regex target...). PEFT 0.21 computes the case from the changed config (``PeftImplementation.run_numeric``,
the same driver the corpus' expected outputs come from), and each implementation must then either give
PEFT's outputs within the case's tolerance or refuse with an ``AdapterSpecError``; where PEFT itself
refuses the config, the implementation must refuse it too. Before this test, prefix tuning with a
``num_attention_heads`` other than the model's key/value heads laid the prefix out with the config's heads
(PEFT recomputes them from the model); OFT/BOFT/AdaLoRA/VeRA configs with ``layers_pattern`` but no
``layers_to_transform`` were accepted where PEFT raises; Keras and the reference adapted the layers under a
``target_modules`` that also selects their containers; and the reference computed configs whose OFT sizes, expert
rank or ``trainable_token_indices`` disagree with the tensors or the model, or an ``all-linear`` that selects no
layer or leaves tensors untargeted (94 of 1,725 changed configs).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapterspec.config import load_schema
from adapterspec.conformance import Corpus, load_corpus
from adapterspec.conformance.implementations import resolve_implementation
from adapterspec.errors import AdapterSpecError

pytest.importorskip("peft")
pytest.importorskip("torch")

#: Fields that record the run or the training set-up, not the adapter: never changed here.
_UNCHANGED = {"peft_type", "inference_mode", "revision", "base_model_name_or_path", "task_type", "peft_version",
              "adapterspec_version", "auto_mapping", "modules_to_save", "loftq_config", "eva_config", "corda_config",
              "lora_ga_config", "megatron_config", "megatron_core", "tokenizer_name_or_path", "tokenizer_kwargs",
              "prompt_tuning_init_text", "runtime_config", "target_parameters"}
#: Values for fields whose type alone says little (anything that is a selector or a pattern).
_SPECIAL: dict[str, list[Any]] = {
    "layers_to_transform": [[0], [1], 0], "layers_pattern": ["layers", "nope"],
    "exclude_modules": [".*"], "target_modules": [".*", "all-linear"], "feedforward_modules": [".*", []],
    "trainable_token_indices": [[0]], "layer_replication": [[[0, 1]]], "alora_invocation_tokens": [[1]],
    "init_lora_weights": [False, "gaussian"],
}
_PATTERNS = {"rank_pattern": 1, "alpha_pattern": 97.0}


def _alternatives(field: str, spec: dict[str, Any], config: dict[str, Any]) -> list[Any]:
    """Other values of ``field`` than the config's, of the types its schema allows."""
    current = config.get(field, spec.get("default"))
    types = spec.get("type") if isinstance(spec.get("type"), list) else [spec.get("type")]
    if field in _SPECIAL:
        values = list(_SPECIAL[field])
    elif field in _PATTERNS:
        targets = config.get("target_modules")
        values = [{".*": _PATTERNS[field]}]
        if isinstance(targets, list) and targets:
            values.append({targets[0]: _PATTERNS[field]})
    elif spec.get("enum"):
        values = list(spec["enum"])
    elif "boolean" in types:
        values = [not current] if isinstance(current, bool) else [True, False]
    elif "integer" in types:
        values = [1, 2, (current or 0) + 3]
    elif "number" in types:
        values = [0.5, 97.0]
    else:
        values = []
    if "null" in types and field not in _SPECIAL:
        values.append(None)  # a null boolean: PEFT's truth test reads it as false (SPEC 4.1.1)
    return [v for v in values if v != current or (v is None) != (current is None)]


def _mutations(corpus: Corpus) -> Iterator[tuple[Any, str, Any]]:
    schema = load_schema()
    for case in corpus.cases:
        if case.kind != "numeric" or case.dtype != "float32":
            continue
        config = json.loads((case.adapter / "adapter_config.json").read_text())
        fields = {**schema["properties"], **schema["$defs"][config["peft_type"]].get("properties", {})}
        for field, spec in fields.items():
            if field not in _UNCHANGED:
                for value in _alternatives(field, spec, config):
                    yield case, field, value


def _run(impl: Any, case: Any, workdir: Path) -> tuple[str, Any]:
    """``("ok", outputs)``, ``("refused", error)`` (an ``AdapterSpecError``) or ``("error", exception)``."""
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "ok", impl.run_numeric(case, workdir)
    except AdapterSpecError as exc:
        return "refused", exc
    except Exception as exc:  # noqa: BLE001 - PEFT's refusals are not typed; ours must be
        return "error", exc


def _as_f64(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def _worst(expected: dict[str, Any], got: dict[str, Any], atol: float, rtol: float) -> float:
    """The largest error relative to the tolerance (``inf`` for a missing output or another shape)."""
    worst = 0.0
    for key, want in expected.items():
        if key not in got:
            return float("inf")
        a, b = _as_f64(want), _as_f64(got[key])
        if a.shape != b.shape:
            return float("inf")
        worst = max(worst, float((np.abs(a - b) / (atol + rtol * np.abs(a))).max(initial=0)))
    return worst


@pytest.fixture(scope="module")
def changed_cases(tmp_path_factory: pytest.TempPathFactory, corpus: Corpus) -> list[tuple[Any, str, Any, Any]]:
    """``(case, field, value, PEFT's outcome)`` for every mutation, each case in its own copy of the corpus."""
    from adapterspec.conformance.peft_driver import PeftImplementation

    peft = PeftImplementation()
    root = tmp_path_factory.mktemp("known")
    copy = load_corpus(Path(shutil.copytree(corpus.root, root / "v1")))
    out = []
    for i, (case, field, value) in enumerate(_mutations(copy)):
        path = case.adapter / "adapter_config.json"
        original = path.read_text()
        path.write_text(json.dumps({**json.loads(original), field: value}))
        try:
            out.append((case, field, value, _run(peft, case, root / f"peft{i}")))
        finally:
            path.write_text(original)
    return out


def test_the_mutations_cover_every_method_and_peft_computes_most(changed_cases: list[tuple[Any, ...]]) -> None:
    methods = {json.loads((c.adapter / "adapter_config.json").read_text())["peft_type"] for c, *_ in changed_cases}
    assert {"LORA", "IA3", "LOHA", "LOKR", "OFT", "BOFT", "ADALORA", "VERA", "PREFIX_TUNING"} <= methods
    computed = sum(outcome[0] == "ok" for *_, outcome in changed_cases)
    assert len(changed_cases) > 1000 and computed > len(changed_cases) // 2


@pytest.mark.parametrize("name", ["reference", "torch", "keras"])
def test_a_changed_known_field_gives_peft_outputs_or_a_typed_refusal(changed_cases: list[tuple[Any, ...]],
                                                                     tmp_path: Path, name: str) -> None:
    if name == "keras":
        pytest.importorskip("keras")
    impl = resolve_implementation(name)
    problems: dict[str, str] = {}
    for i, (case, field, value, (peft_status, peft_result)) in enumerate(changed_cases):
        path = case.adapter / "adapter_config.json"
        original = path.read_text()
        path.write_text(json.dumps({**json.loads(original), field: value}))
        try:
            status, result = _run(impl, case, tmp_path / str(i))
        finally:
            path.write_text(original)
        label = f"{case.name} {field}={json.dumps(value)}"
        if status == "error":
            problems[label] = f"untyped {type(result).__name__}: {result}"[:300]
        elif status == "ok" and peft_status != "ok":
            problems[label] = f"computed, where PEFT refuses: {peft_result}"[:300]
        elif status == "ok":
            tol = case.tolerance
            worst = _worst(peft_result, result, tol.atol, tol.rtol)
            if worst > 1:
                problems[label] = f"differs from PEFT: {worst:.3g} of the tolerance"
    if problems:
        pytest.fail(f"{len(problems)} of {len(changed_cases)} changed configs:\n"
                    + "\n".join(f"{k}: {v[:200]!r}" for k, v in problems.items()), pytrace=False)


@pytest.mark.parametrize("name", ["torch", "keras"])
def test_a_changed_known_field_survives_a_round_trip_and_loads_in_peft(changed_cases: list[tuple[Any, ...]],
                                                                      tmp_path: Path, name: str) -> None:
    """Every third changed config an implementation loads, saved again: the same tensors bit for bit, an
    equivalent config (``all-linear`` may be written resolved, SPEC 4.3), and a folder PEFT loads."""
    from types import SimpleNamespace

    from safetensors.numpy import load_file

    from adapterspec.conformance.peft_driver import PeftImplementation
    from adapterspec.conformance.runner import config_differences, derived_sizes

    if name == "keras":
        pytest.importorskip("keras")
    impl, peft = resolve_implementation(name), PeftImplementation()
    problems: dict[str, str] = {}
    saved_count = 0
    for i, (case, field, value, _) in enumerate(changed_cases[::3]):
        path = case.adapter / "adapter_config.json"
        original = path.read_text()
        changed = {**json.loads(original), field: value}
        path.write_text(json.dumps(changed))
        out = tmp_path / str(i)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                impl.roundtrip(SimpleNamespace(source=case), case.adapter, out)
        except AdapterSpecError:
            continue  # refused (typed): nothing written
        finally:
            path.write_text(original)
        saved_count += 1
        label = f"{case.name} {field}={json.dumps(value)}"
        saved = json.loads((out / "adapter_config.json").read_text())
        resolved = field == "target_modules" and value == "all-linear" and isinstance(saved.get(field), list)
        derived = field in _FROM_THE_MODEL and case.method in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")
        diffs = config_differences({**changed, field: saved[field]} if resolved or derived else changed, saved,
                                   derived_sizes(changed, case.model))
        before = load_file(str(case.adapter / "adapter_model.safetensors"))
        after = load_file(str(out / "adapter_model.safetensors"))
        if diffs:
            problems[label] = f"config: {diffs}"
        elif sorted(before) != sorted(after) or any(not np.array_equal(before[k], after[k]) for k in before):
            problems[label] = f"tensors differ: {sorted(set(before) ^ set(after))[:3]}"
        else:
            status, error = _run_load(peft, SimpleNamespace(multi=False, model=case.model, dtype=case.dtype), out)
            if status != "ok":
                problems[label] = f"PEFT cannot load the saved folder: {error}"
    assert saved_count > 200
    if problems:
        pytest.fail(f"{len(problems)} of {saved_count} round trips:\n"
                    + "\n".join(f"{k}: {v[:200]!r}" for k, v in problems.items()), pytrace=False)


#: Prompt-learning sizes a writer may write as it derived them from the model, as PEFT does (SPEC 14.3).
_FROM_THE_MODEL = frozenset({"num_attention_heads", "token_dim", "num_layers", "num_transformer_submodules"})


def _run_load(peft: Any, case: Any, folder: Path) -> tuple[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.load_folder(case, folder)
        return "ok", None
    except Exception as exc:  # noqa: BLE001 - PEFT's errors are not typed
        return "error", f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("name", ["reference", "torch", "keras"])
def test_tying_does_not_excuse_tensors_of_untargeted_modules(corpus: Corpus, tmp_path: Path, name: str) -> None:
    """``ensure_weight_tying`` leaves a layer tied to the embedding to the model; with a targeting that selects no
    module, the tensors of the others are untargeted and PEFT refuses the adapter (the reference computed it:
    found by a probe of changed field pairs)."""
    if name == "keras":
        pytest.importorskip("keras")
    from adapterspec.conformance.peft_driver import PeftImplementation

    copy = load_corpus(Path(shutil.copytree(corpus.root, tmp_path / "v1")))
    case = next(c for c in copy.cases if c.name == "numeric/lora-patterns-f32")
    path = case.adapter / "adapter_config.json"
    original = json.loads(path.read_text())
    impl, peft = resolve_implementation(name), PeftImplementation()
    for i, change in enumerate(({"exclude_modules": ".*"}, {"layers_to_transform": [1]})):
        path.write_text(json.dumps({**original, "ensure_weight_tying": True, **change}))
        assert _run(peft, case, tmp_path / f"peft{i}")[0] == "error"
        status, result = _run(impl, case, tmp_path / f"ours{i}")
        assert status == "refused", (change, status, result)
