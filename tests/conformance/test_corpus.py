"""The corpus is sound: its check passes, it is small, its data can make a wrong implementation fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapterspec.conformance import Corpus, FolderCase, NumericCase, SchemaCase, check_corpus
from adapterspec.conformance import _io, reference
from adapterspec.conformance.check import MAX_CORPUS_BYTES
from adapterspec.conformance.reference_impl import module_tensors, replacements
from adapterspec.conformance.reference_tokens import token_weight
from adapterspec.naming import TRAINABLE_TOKENS_PARAM, make_key
from adapterspec.targets import token_indices


def test_check_passes(corpus: Corpus) -> None:
    assert check_corpus(corpus.root) == []


def test_corpus_covers_the_spec(corpus: Corpus) -> None:
    numeric = [c for c in corpus.cases if isinstance(c, NumericCase)]
    methods = {(c.method, c.layer) for c in numeric}
    for pair in [("LORA", "linear"), ("LORA", "embedding"), ("LORA", "conv2d"), ("LORA", "conv1d"),
                 ("LORA", "gpt2_conv1d"), ("IA3", "linear"), ("IA3", "conv2d"), ("IA3", "gpt2_conv1d"),
                 ("LOHA", "linear"), ("LOHA", "conv2d"), ("LOKR", "linear"), ("LOKR", "conv2d"),
                 ("PREFIX_TUNING", "decoder"), ("PROMPT_TUNING", "decoder")]:
        assert pair in methods, pair
    tags = {t for c in numeric for t in c.tags}
    assert {"dora", "rslora", "rank_pattern", "alpha_pattern", "fused", "fan_in_fan_out", "feedforward",
            "f16", "bf16", "effective_conv2d"} <= tags
    assert {c.dtype for c in numeric} == {"float32", "float16", "bfloat16"}
    folders = {c.id: c for c in corpus.cases if isinstance(c, FolderCase)}
    errors = {c.error for c in folders.values() if not c.valid}
    assert {"MissingTensorError", "UnexpectedTensorError", "ShapeMismatchError", "DTypeMismatchError",
            "VersionError", "FileFormatError", "IntegrityError", "UnsafeFileError", "TargetNotFoundError"} <= errors
    assert sum(isinstance(c, SchemaCase) for c in corpus.cases) >= 50


def test_corpus_is_small(corpus: Corpus) -> None:
    size = sum(p.stat().st_size for p in corpus.root.rglob("*") if p.is_file())
    assert size < MAX_CORPUS_BYTES


def test_case_files_are_plain_json_and_safetensors(corpus: Corpus) -> None:
    suffixes = {p.suffix for p in corpus.root.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors", ".bin"}  # .bin: the one pickle a reader must refuse


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_numeric_values_are_element_unique(corpus: Corpus, dtype: str) -> None:
    for case in corpus.cases:
        if not isinstance(case, NumericCase) or case.dtype != dtype:
            continue
        for key, value in _io.read_arrays(case.adapter / "adapter_model.safetensors").items():
            if value.size >= 4 and not key.endswith("_topk_indices"):  # VB-LoRA's integer indices (SPEC 17.4)
                share = len(np.unique(value)) / value.size
                assert share > (0.9 if dtype == "float32" else 0.5), (case.name, key, share)


def test_adapter_changes_every_targeted_output(corpus: Corpus) -> None:
    """Expected outputs differ from the base layer's far beyond the tolerance: an implementation that
    ignores the adapter on a module cannot pass."""
    from adapterspec import read_adapter

    for case in corpus.cases:
        if not isinstance(case, NumericCase) or case.compute != "modules":
            continue
        adapter = read_adapter(case.adapter)
        arrays = _io.read_arrays(case.adapter / "adapter_model.safetensors")
        grouped = module_tensors(adapter, arrays)
        expected = _io.read_arrays(case.expected)
        base = _io.read_arrays(case.weights) | replacements(adapter, arrays)  # modules to save: replaced, not adapted
        for path in case.modules:  # LoRA's token rows replace the embedding's (SPEC 4.1.2): not adapted either
            delta = arrays.get(make_key(path, TRAINABLE_TOKENS_PARAM))
            if delta is not None:
                rows = token_indices(adapter.config, path)
                base[f"{path}.weight"] = token_weight(base[f"{path}.weight"], {"token_indices": rows},
                                                      {"trainable_tokens_delta": delta})
        inputs = _io.read_arrays(case.inputs)
        tol = case.tolerance
        for path, spec in case.modules.items():
            plain = reference.base_forward(spec, base[f"{path}.weight"], base.get(f"{path}.bias"), inputs[path])
            moved = np.max(np.abs(plain - expected[path]) / (tol.atol + tol.rtol * np.abs(expected[path])))
            if path in grouped and not _scaled_by_zero(adapter.config, path):
                assert moved > 10, (case.name, path, moved)
            else:  # untargeted modules (and an update scaled by lora_alpha 0) keep their output exactly
                assert moved == 0, (case.name, path, moved)


def _scaled_by_zero(config: Any, path: str) -> bool:
    """A LoRA module whose alpha is 0 (``numeric/lora-alpha-zero-f32``): its update is scaled away."""
    return config.peft_type == "LORA" and config.scaling_for(path) == 0


def _copy(corpus: Corpus, tmp_path: Path) -> Path:
    root = tmp_path / "v1"
    shutil.copytree(corpus.root, root)
    return root


def test_check_finds_a_changed_file(corpus: Corpus, tmp_path: Path) -> None:
    root = _copy(corpus, tmp_path)
    expected = root / "numeric" / "lora-linear-f32" / "expected.safetensors"
    blob = bytearray(expected.read_bytes())
    blob[-1] ^= 1
    expected.write_bytes(bytes(blob))
    (root / "stray.json").write_text("{}")
    problems = check_corpus(root)
    assert any("numeric/lora-linear-f32/expected.safetensors: sha256" in p for p in problems), problems
    assert any("stray.json is not listed" in p for p in problems), problems


def test_check_finds_duplicate_ids_and_schema_disagreements(corpus: Corpus, tmp_path: Path) -> None:
    root = _copy(corpus, tmp_path)
    path = root / "schema" / "lora.json"
    cases = json.loads(path.read_text())
    cases.append(dict(cases[0]))                                    # a duplicate id
    cases.append({"id": "wrong-verdict", "description": "r=0 claimed valid", "valid": True,
                  "config": {"peft_type": "LORA", "target_modules": ["q"], "r": 0}, "profiles": ["core", "full"]})
    path.write_text(json.dumps(cases))
    problems = check_corpus(root)
    assert any("id 'lora-r-negative' is used by 2 cases" in p for p in problems), problems
    assert any("schema/wrong-verdict: valid in the corpus, refused by the schema" in p for p in problems), problems


def test_check_finds_malformed_case_files(corpus: Corpus, tmp_path: Path) -> None:
    root = _copy(corpus, tmp_path)
    path = root / "folders.json"
    cases = json.loads(path.read_text())
    del cases[0]["model"]
    cases[1]["valid"] = "yes"
    path.write_text(json.dumps(cases))
    problems = check_corpus(root)
    assert any(p.startswith("folders.json/0") and "'model' is a required property" in p for p in problems), problems
    assert any(p.startswith("folders.json/1/valid") for p in problems), problems


def test_check_finds_a_missing_case_file(corpus: Corpus, tmp_path: Path) -> None:
    root = _copy(corpus, tmp_path)
    (root / "numeric" / "dora-linear-f32" / "inputs.safetensors").unlink()
    problems = check_corpus(root)
    assert any("numeric/dora-linear-f32: missing" in p for p in problems), problems
