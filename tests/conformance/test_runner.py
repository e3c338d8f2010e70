"""The runner and its reports: the reference passes everything; filters, xfail, unsupported, JSON, JUnit, CLI."""

from __future__ import annotations

import doctest
import importlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from broken_impls import TransposesLoraB

from adapterspec.conformance import (
    Corpus,
    Refused,
    Status,
    Unsupported,
    resolve_implementation,
    run_suite,
    select,
)
from adapterspec.conformance.reference_impl import ReferenceImplementation

REPO = Path(__file__).resolve().parents[2]


def test_reference_passes_every_case(corpus: Corpus, reference: ReferenceImplementation) -> None:
    report = run_suite(reference, corpus)
    failed = {r.name: r.message for r in report.results if r.status is not Status.PASSED}
    assert failed == {}
    assert report.ok and report.counts()["passed"] == len(corpus.cases) > 150


def test_select_include_exclude(corpus: Corpus) -> None:
    names = [c.name for c in select(corpus.cases, include=["^numeric/lora-", "dora"], exclude=["bf16"])]
    assert "numeric/lora-linear-f32" in names and "numeric/dora-conv2d-f32" in names
    assert "roundtrip/roundtrip-dora-linear-f32" in names
    assert not any("bf16" in n for n in names) and "numeric/ia3-linear-f32" not in names


class OnlyConfigs:
    """Claims the schema cases only; refuses r=0 the way a non-Python implementation would."""

    name = "only-configs"

    def supports(self, case: Any) -> bool | str:
        return True if case.kind == "schema" else "configs only"

    def validate_config(self, config: Any) -> None:
        ReferenceImplementation().validate_config(config)


class RaisesUnsupported(ReferenceImplementation):
    name = "raises-unsupported"

    def run_numeric(self, case: Any, case_dir: Path) -> Any:
        if case.method != "LORA":
            raise Unsupported(f"no {case.method}")
        return super().run_numeric(case, case_dir)


def test_unsupported_is_never_passed(corpus: Corpus) -> None:
    report = run_suite(OnlyConfigs(), corpus)
    counts = report.counts()
    schema = sum(c.kind == "schema" for c in corpus.cases)
    assert counts["passed"] == schema and counts["unsupported"] == len(corpus.cases) - schema
    assert counts["failed"] == 0 and report.ok
    report = run_suite(RaisesUnsupported(), corpus, include=["^numeric/"])
    assert set(report.by_status(Status.UNSUPPORTED)) == {
        c.name for c in corpus.cases if c.kind == "numeric" and c.data["method"] != "LORA"}
    assert all(r.message.startswith("no ") for r in report.results if r.status is Status.UNSUPPORTED)


class RefusesUnsupported:
    """Refuses every config and folder with ``Refused("UnsupportedError")`` naming /peft_type (README section 2)."""

    name = "refuses-unsupported"

    def supports(self, case: Any) -> bool | str:
        return True

    def validate_config(self, config: Any) -> None:
        raise Refused("UnsupportedError", pointer="/peft_type", message="not implemented here")

    def load_folder(self, case: Any, path: Path) -> None:
        self.validate_config(None)


def test_refused_with_unsupported_error_is_unsupported_where_the_case_does_not_expect_it(corpus: Corpus) -> None:
    include = ["^folder/missing-tensor$", "^schema/config-is-a-list$", "^folder/lora-peft-written$",
               "^folder/fourierft-not-portable$"]
    report = run_suite(RefusesUnsupported(), corpus, include=include)
    status = {r.name: r.status for r in report.results}
    assert status == {"folder/missing-tensor": Status.UNSUPPORTED, "schema/config-is-a-list": Status.UNSUPPORTED,
                      "folder/lora-peft-written": Status.UNSUPPORTED, "folder/fourierft-not-portable": Status.PASSED}
    assert all(r.message == "not implemented here" for r in report.results if r.status is Status.UNSUPPORTED)


class WrongErrors(ReferenceImplementation):
    """Refuses everything it should, but with the wrong class, or without naming the key."""

    name = "wrong-errors"

    def load_folder(self, case: Any, path: Path) -> None:
        try:
            super().load_folder(case, path)
        except Exception as exc:
            if case.id == "missing-tensor":
                raise Refused("MissingTensorError", message="something is missing") from exc
            if case.id == "dtype-int32":
                raise ValueError("bad dtype") from exc
            if case.id == "sha256-mismatch":  # a more specific class is fine... and this one is its parent
                raise Refused("FileFormatError", message=str(exc)) from exc
            if case.id == "lora-b-transposed":  # names lora_A; the message mentions the expected lora_B
                raise Refused("ShapeMismatchError", key=case.key.replace("lora_B", "lora_A"),
                              message=f"disagrees with {case.key}") from exc
            raise


def test_error_class_and_key_are_checked(corpus: Corpus) -> None:
    report = run_suite(WrongErrors(), corpus, include=["^folder/"])
    failed = {r.name: r.message for r in report.results if r.status is Status.FAILED}
    assert set(failed) == {"folder/missing-tensor", "folder/dtype-int32", "folder/sha256-mismatch",
                           "folder/lora-b-transposed"}
    assert "must name key 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight'" in failed["folder/missing-tensor"]
    assert "refused with ValueError: bad dtype; expected DTypeMismatchError" in failed["folder/dtype-int32"]
    assert "expected IntegrityError" in failed["folder/sha256-mismatch"]
    # a key that is given is judged alone: the message is the fallback only for a refusal without one
    assert "must name key 'base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight'; got key='base_model" \
           ".model.model.layers.0.self_attn.v_proj.lora_A.weight'" in failed["folder/lora-b-transposed"]


def _rewrite_metadata(path: Path, change: Any) -> None:
    """Rewrite a safetensors file's ``__metadata__`` with ``change(metadata) -> metadata`` (the data unchanged)."""
    import struct

    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    metadata = change(dict(header.pop("__metadata__", {})))
    raw = json.dumps({"__metadata__": metadata, **header} if metadata else header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])


def _rewrite_config(path: Path, change: Any) -> None:
    config = json.loads((path / "adapter_config.json").read_text("utf-8"))
    (path / "adapter_config.json").write_text(json.dumps(change(config)), "utf-8")


#: A writer breaking one MUST of SPEC.md 2.2, 4.1, 4.4 or 9 -> the runner's message naming the break.
_BAD_WRITERS = {
    "version-2": (lambda dst: _rewrite_metadata(dst / "adapter_model.safetensors",
                                                lambda m: m | {"adapterspec_version": "2.0"}),
                  "adapterspec_version '2.0'; a writer of spec 1.2 records '1.2' there"),
    "zero-sha256": (lambda dst: _rewrite_metadata(dst / "adapter_model.safetensors",
                                                  lambda m: m | {"adapterspec_sha256": "0" * 64}),
                    "has adapterspec_sha256 '0000000000"),
    "no-metadata": (lambda dst: _rewrite_metadata(dst / "adapter_model.safetensors", lambda m: {}),
                    "adapterspec_version None"),
    "patterns-reversed": (lambda dst: _rewrite_config(dst, lambda c: c | {
        "rank_pattern": dict(reversed(list(c["rank_pattern"].items())))}),
                          "rank_pattern: saved with its members in another order"),
    "r-as-float": (lambda dst: _rewrite_config(dst, lambda c: c | {"r": float(c["r"])}),
                   "/r: an integer field written as 4.0"),
    "version-in-config": (lambda dst: _rewrite_config(dst, lambda c: c | {"adapterspec_version": "1.1"}),
                          "adapterspec_version: written into adapter_config.json"),
}


class BadWriter(ReferenceImplementation):
    """The reference, whose round trip then breaks one writer rule (:data:`_BAD_WRITERS`)."""

    def __init__(self, how: str) -> None:
        self.name, self.how = f"bad-writer-{how}", how

    def roundtrip(self, case: Any, src: Path, dst: Path) -> None:
        super().roundtrip(case, src, dst)
        _BAD_WRITERS[self.how][0](dst)


@pytest.mark.parametrize("how", sorted(_BAD_WRITERS))
def test_roundtrip_judges_what_a_writer_must_write(corpus: Corpus, how: str) -> None:
    report = run_suite(BadWriter(how), corpus, include=["^roundtrip/roundtrip-lora-pattern-order-f32$"])
    (result,) = report.results
    assert result.status is Status.FAILED and _BAD_WRITERS[how][1] in result.message, result.message
    assert run_suite(ReferenceImplementation(), corpus, include=["^roundtrip/roundtrip-lora-pattern-order-f32$"]).ok


def test_xfail(corpus: Corpus) -> None:
    patterns = ["numeric/lora-linear-f32", "numeric/ia3-linear-f32"]
    report = run_suite(TransposesLoraB(), corpus, include=["^numeric/(lora|ia3)-linear-f32$"], xfail=patterns)
    assert report.by_status(Status.XFAILED) == ["numeric/lora-linear-f32"]
    assert report.by_status(Status.XPASSED) == ["numeric/ia3-linear-f32"]
    assert report.ok
    strict = run_suite(TransposesLoraB(), corpus, include=["^numeric/ia3-linear-f32$"], xfail=patterns,
                       strict_xfail=True)
    assert not strict.ok


def test_json_and_junit_reports(corpus: Corpus, tmp_path: Path) -> None:
    import argparse

    from adapterspec.conformance.cli import add_parser, run

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["conformance", "--impl", "adapterspec.conformance.reference_impl:ReferenceImplementation",
                              "--include", "^numeric/lora-linear", "--include", "^folder/missing-tensor$",
                              "--json", str(tmp_path / "r.json"), "--junit", str(tmp_path / "r.xml"), "-q"])
    assert run(args) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["implementation"] == "reference" and data["ok"] is True
    assert data["summary"] == {"passed": 4, "failed": 0, "unsupported": 0, "xfailed": 0, "xpassed": 0, "total": 4}
    assert {r["name"] for r in data["results"]} == {"numeric/lora-linear-f32", "numeric/lora-linear-f16",
                                                   "numeric/lora-linear-bf16", "folder/missing-tensor"}
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "4" and suite.get("failures") == "0"
    assert {c.get("name") for c in suite.iter("testcase")} == {r["name"] for r in data["results"]}


def test_print_table(corpus: Corpus) -> None:
    import io

    from adapterspec.conformance.report import print_table

    report = run_suite(TransposesLoraB(), corpus, include=["^numeric/(lora|ia3)-linear-f32$"])
    out = io.StringIO()
    print_table(report, out)
    text = out.getvalue()
    assert "PASS   numeric/ia3-linear-f32" in text and "FAIL   numeric/lora-linear-f32" in text
    assert "failed (1):\n  numeric/lora-linear-f32: output 'layer' differs at" in text
    core, total = len(corpus.in_profile("core")), len(corpus.cases)
    assert text.rstrip().endswith(
        "transposes-lora-b: 1 passed, 1 failed, 0 unsupported, 0 xfailed, 0 xpassed (2 cases)\n"
        f"profile core: 1 passed, 1 failed, 0 unsupported, 0 xfailed, 0 xpassed (2 of {core} cases run)\n"
        f"profile full: 1 passed, 1 failed, 0 unsupported, 0 xfailed, 0 xpassed (2 of {total} cases run)")


def test_cli_exit_status_and_junit_failures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from adapterspec.cli import main

    code = main(["conformance", "--impl", "broken_impls:IgnoresAlpha", "--include", "^numeric/lora-linear-f32$",
                 "--include", "^numeric/ia3-linear-f32$", "--junit", str(tmp_path / "r.xml")])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL   numeric/lora-linear-f32" in out and "PASS   numeric/ia3-linear-f32" in out
    assert "ignores-alpha: 1 passed, 1 failed, 0 unsupported" in out
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    failures = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert failures == ["numeric/lora-linear-f32"]


def test_cli_check_and_list(capsys: pytest.CaptureFixture[str]) -> None:
    from adapterspec.cli import main

    assert main(["conformance", "check"]) == 0
    assert "ok (" in capsys.readouterr().out
    assert main(["conformance", "list", "--include", "^folder/truncated"]) == 0
    out = capsys.readouterr().out
    assert "folder/truncated-data" in out and "folder/truncated-header" in out and "numeric/" not in out
    assert "reference" in out and "peft" in out and "torch" in out


def test_unknown_implementation_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from adapterspec.cli import main

    assert main(["conformance", "--impl", "nonesuch"]) == 2
    assert "unknown implementation 'nonesuch'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cannot load implementation"):
        resolve_implementation("no_such_module:Impl")


@pytest.mark.parametrize("name", ["reference", "runner", "contract", "report", "protocol", "implementations", "cli",
                                  "cases", "check", "reference_impl", "peft_driver"])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(f"adapterspec.conformance.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL)
    assert result.failed == 0


class SilencesWarnings(ReferenceImplementation):
    """The reference, with every warning of a load silenced (a reader that keeps unknown fields without a word)."""

    name = "silences-warnings"

    def load_folder(self, case: Any, path: Path) -> None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            super().load_folder(case, path)


def test_expected_warnings_are_checked(corpus: Corpus) -> None:
    include = ["^folder/(newer-minor-version|lora-duplicate-targets|metadata-version-differs|lora-peft-written)$"]
    report = run_suite(SilencesWarnings(), corpus, include=include)
    status = {r.name: r.status for r in report.results}
    assert status == {"folder/newer-minor-version": Status.FAILED, "folder/lora-duplicate-targets": Status.FAILED,
                      "folder/metadata-version-differs": Status.FAILED, "folder/lora-peft-written": Status.PASSED}
    (dup,) = [r for r in report.results if r.name == "folder/lora-duplicate-targets"]
    assert dup.message == ("loaded, but without the expected warning(s) AdapterSpecWarning at /target_modules/2 "
                           "(reported: none)")
    # SPEC 2.3: one warning that fields added since are not acted upon; one per unknown field only in a strict
    # mode (SPEC 2.5), so none is expected
    assert corpus.by_name("folder/newer-minor-version").warnings == [  # type: ignore[attr-defined]
        {"category": "AdapterSpecWarning"}]
    assert run_suite(ReferenceImplementation(), corpus, include=include).ok


def test_manifest_examples_are_cases(corpus: Corpus) -> None:
    examples = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "spec" / "v1" / "examples" / "manifest").rglob("*.json"))
    cases = [c for c in corpus.cases if c.data.get("source", "").startswith("spec/v1/examples/manifest/")]
    assert sorted(c.data["source"] for c in cases) == examples and len(examples) == 13
    for case in cases:
        assert case.data["multi"] is True and case.valid == case.data["source"].startswith("spec/v1/examples/manifest/valid/")  # type: ignore[attr-defined]
        assert "core" in case.profiles
    assert corpus.by_name("folder/manifest-example-missing-path").data["pointer"] == "/adapters/a"


def test_reference_recomputes_prefix_sizes_on_a_gqa_model() -> None:
    """SPEC 14.3: on a model with num_key_value_heads PEFT recomputes prefix tuning's token_dim and
    num_attention_heads even when the config gives them (PEFT's method_comparison prefixtuning/llama-3.2-3B-*
    configs give the hidden size and the attention heads): only the tensor is checked against the model's
    key/value width. It was a ShapeMismatchError ("token_dim 16 but the model needs 8"), at validation already."""
    import numpy as np

    from adapterspec import Adapter
    from adapterspec.conformance.reference_impl import check_against_model
    from adapterspec.errors import ShapeMismatchError

    model = {"dtype": "float32", "modules": {}, "decoder": {
        "architecture": "llama", "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32}}
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "num_layers": 2,
              "token_dim": 16, "num_attention_heads": 4, "num_transformer_submodules": 1}
    fits = np.arange(3 * 2 * 2 * 8, dtype=np.float32).reshape(3, 32)  # key/value width 2 heads x 4
    check_against_model(Adapter.from_tensors(config, {"prompt_embeddings": fits}), model)
    wide = Adapter.from_tensors(config, {"prompt_embeddings": np.concatenate([fits, fits], axis=1)})  # the config's
    with pytest.raises(ShapeMismatchError) as info:
        check_against_model(wide, model)
    assert info.value.key == "prompt_embeddings" and "2 * 8]" in info.value.message
