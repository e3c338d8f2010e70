"""Profiles: each case names its profiles; a claimed profile fails the run unless every case of it passes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from broken_impls import AllUnsupported

from adapterspec.cli import main
from adapterspec.conformance import Corpus, NumericCase, RoundtripCase, Status, Unsupported, check_corpus, run_suite
from adapterspec.conformance.reference_impl import ReferenceImplementation

#: The folder cases outside core: DoRA, LoHa, LoKr and prompt-learning folders.
NOT_CORE_FOLDERS = {"dora", "dora-without-magnitude", "lora-init-mica-dora", "loha", "lokr", "prefix", "prompt", "prompt-shape-disagrees",
                    "prefix-sizes-from-model", "prefix-sizes-from-model-disagree", "dora-magnitude-wrong-shape",
                    "lokr-factorization-differs", "lokr-form-disagrees", "loha-effective-without-flag",
                    "oft-coft", "oft-not-a-triangle", "boft-butterfly-factors",
                    "p-tuning", "p-tuning-shape-disagrees", "prompt-head-not-listed",
                    "adalora-rank-pattern-disagrees", "lora-velora-with-dora",
                    "adalora-bias",
                    "vera-save-projection-false",
                    "vera-projection-missing",
                    "road", "road-alpha-missing", "road-length-not-a-group-multiple", "road-variant-unknown",
                    "road-group-size-not-dividing", "road-init-weights-null", "miss-init-weights-null",
                    "hra-null-booleans", "hra-gs-rank-above-features",  # SPEC 17 gaps (report of the spec-only impl)
                    "trainable-tokens-row-count",
                    "miss", "miss-bat", "miss-bias", "miss-block-transposed", "miss-mode-shape",  # SPEC 17
                    "hra-valid", "hra-bias", "hra-rank-mismatch", "hra-transposed",
                    "vblora", "vblora-topk", "vblora-topk-indices-i64", "vblora-other-form", "vblora-bank-missing",
                    "vblora-bank-shape", "vblora-topk-weights-f16", "vblora-topk-tensors-full-form", "vblora-topk-256-i16",
                    "vblora-topk-256-u8", "vblora-topk-above-num-vectors", "vblora-bias",
                    "vblora-topk-index-out-of-range",
                    "c3a-valid", "c3a-bias", "c3a-block-size-mismatch", "c3a-pattern-block-size",  # SPEC 17.7
                    "c3a-block-size-not-dividing", "c3a-pattern-not-a-regex",
                    "gralora", "gralora-hybrid", "gralora-bias", "gralora-rank-mismatch", "gralora-hybrid-missing",
                    "gralora-hybrid-unexpected", "gralora-r-not-divisible", "gralora-hybrid-rank-mismatch",
                    "gralora-exclude-modules-unknown", "gralora-k-not-dividing",  # SPEC 17.5
                    "delora-valid", "delora-init-weights-null", "delora-bias", "delora-rank-pattern-zero",  # SPEC 17.6
                    "delora-rank-mismatch", "delora-b-transposed", "delora-w-norm-missing", "delora-w-norm-shape",
                    "delora-lambda-shape", "delora-rank-pattern-zero-unused", "delora-lambda-pattern-unreached-bad-key",
                    "delora-lambda-pattern-reached-bad-key",
                    "beft-valid", "beft-init-weights-null", "beft-bias-flat", "beft-bias-two-rows"}  # SPEC 17.8


def test_every_case_names_its_profiles(corpus: Corpus) -> None:
    assert corpus.profiles.keys() == {"core", "full"}
    assert all("full" in c.profiles for c in corpus.cases)
    core = {c.name for c in corpus.in_profile("core")}
    numeric_core = {f"numeric/{c.id}" for c in corpus.cases if isinstance(c, NumericCase)
                    and c.method in ("LORA", "IA3") and c.layer in ("linear", "embedding") and "dora" not in c.tags}
    assert numeric_core == {n for n in core if n.startswith("numeric/")}
    assert len(numeric_core) == 38 and "numeric/lora-embedding-f32" in numeric_core
    assert {f"roundtrip/roundtrip-{n.removeprefix('numeric/')}" for n in numeric_core} == \
        {n for n in core if n.startswith("roundtrip/")}
    assert {c.name for c in corpus.cases if c.kind == "schema"} <= core
    assert {c.id for c in corpus.cases if c.kind == "folder" and c.name not in core} == NOT_CORE_FOLDERS
    # 411 in 1.13; 1.14 adds RoAd (3 numeric, 3 round trips, 4 folders), MiSS (1 schema, 4 numeric, 4 round trips,
    # 5 folders) and HRA (2 schema, 3 numeric, 3 round trips, 4 folders); schema cases are core; then SPEC 17's
    # gaps: 5 schema, 5 folders, 6 numeric (road_4 with two groups, bf16/f16 per method, null booleans), 6 round trips;
    # VB-LoRA: 2 numeric, 2 round trips, 13 folders; C3A (SPEC 17.7): 3 schema, 5 numeric (block_size_pattern order,
    # alternation, escaped whole path), 5 round trips, 6 folders;
    # GraLoRA (SPEC 17.5): 2 schema, 3 numeric, 3 round trips, 7 folders; then the gaps of a GraLoRA written from
    # SPEC 17.5 alone: 2 schema, 1 numeric (bf16), 1 round trip, 3 folders
    # DeLoRA (SPEC 17.6): 4 schema, 3 numeric, 3 round trips, 9 folders; then the gaps of a DeLoRA written from
    # SPEC 17.6 alone: 2 schema (string target_modules with layers_pattern), 3 folders (rank 0 unused, lambda keys)
    # BEFT (SPEC 17.8): 3 schema, 2 numeric, 2 round trips, 4 folders
    assert len(core) == 307 and len(corpus.cases) == 562
    for case in corpus.cases:
        if isinstance(case, RoundtripCase):
            assert case.source is not None and case.profiles == case.source.profiles


def _sizes(corpus: Corpus) -> tuple[int, int]:
    """(cases, core cases): the tests below compare the runner's counts with the corpus's own."""
    return len(corpus.cases), len(corpus.in_profile("core"))


def _not_schema_or_folder(corpus: Corpus) -> int:
    """The core cases that are neither schema nor folder cases (numeric and roundtrip)."""
    return sum(c.kind not in ("schema", "folder") for c in corpus.in_profile("core"))


def test_everything_unsupported_fails(corpus: Corpus) -> None:
    total, core = _sizes(corpus)
    report = run_suite(AllUnsupported(), corpus, profile="core")
    assert report.counts() == {"passed": 0, "failed": 0, "unsupported": total, "xfailed": 0, "xpassed": 0,
                               "total": total}
    assert not report.ok
    first = ", ".join(c.name for c in corpus.in_profile("core")[:5])
    assert first.startswith("schema/config-is-a-list, schema/version-major-2")
    assert report.claim_problems() == [f"profile 'core' claimed, but {core} of its cases are unsupported: {first} ..."]
    assert report.profile_counts()["core"] == {"passed": 0, "failed": 0, "unsupported": core, "xfailed": 0,
                                               "xpassed": 0, "total": core, "cases": core}
    assert not run_suite(AllUnsupported(), corpus).ok  # no claim: still, a run where nothing passed fails


class NoEmbedding(ReferenceImplementation):
    """The reference, without LoRA on embeddings (a core case) nor LoKr (a full-only one)."""

    name = "no-embedding"

    def run_numeric(self, case: Any, case_dir: Path) -> Any:
        if (case.layer == "embedding" and case.method == "LORA") or case.method == "LOKR":
            raise Unsupported(f"no {case.layer} / {case.method}")
        return super().run_numeric(case, case_dir)


def test_a_claimed_profile_needs_every_case_of_it(corpus: Corpus) -> None:
    numeric = ["^numeric/"]
    assert run_suite(NoEmbedding(), corpus, include=numeric).ok  # no claim: unsupported is allowed
    lokr = [c.name for c in corpus.cases if c.kind == "numeric" and "LOKR" == c.data["method"]]
    report = run_suite(NoEmbedding(), corpus, profile="core")
    assert report.by_status(Status.UNSUPPORTED) == ["numeric/lora-embedding-f32", "numeric/dora-embedding-f32", *lokr,
                                                    "numeric/lora-trainable-tokens-f32"]
    assert report.claim_problems() == ["profile 'core' claimed, but 2 of its cases are unsupported: "
                                       "numeric/lora-embedding-f32, numeric/lora-trainable-tokens-f32"]
    assert not report.ok
    # the same implementation can claim nothing more than what it does; the reference holds both profiles
    not_run = _not_schema_or_folder(corpus)
    assert run_suite(ReferenceImplementation(), corpus, include=["^(schema|folder)/"], profile="core").claim_problems()[0] \
        .startswith(f"profile 'core' claimed, but {not_run} of its cases were not run (--include/--exclude): numeric/lora-linear-f32")
    report = run_suite(ReferenceImplementation(), corpus, profile="core", xfail=["^numeric/lora-linear-f32$"])
    assert report.claim_problems() == []
    with pytest.raises(KeyError, match="no profile 'nonesuch'"):
        run_suite(ReferenceImplementation(), corpus, profile="nonesuch")


def test_cli_profile_exit_status(corpus: Corpus, capsys: pytest.CaptureFixture[str]) -> None:
    total, core = _sizes(corpus)
    assert main(["conformance", "--impl", "broken_impls:AllUnsupported", "-q"]) == 1
    out = capsys.readouterr().out
    assert f"all-unsupported: 0 passed, 0 failed, {total} unsupported" in out and "no case passed: the run fails" in out
    assert main(["conformance", "--impl", "broken_impls:AllUnsupported", "--profile", "core", "-q"]) == 1
    assert f"profile core: 0 passed, 0 failed, {core} unsupported, 0 xfailed, 0 xpassed ({core} of {core} cases run) -- " \
           "claimed: DOES NOT HOLD" in capsys.readouterr().out
    assert main(["conformance", "--impl", "reference", "--profile", "core", "--include", "^(schema|folder)/",
                 "--exclude", "^folder/(dora|loha|lokr|prefix|prompt)", "-q"]) == 1
    assert f"{_not_schema_or_folder(corpus)} of its cases were not run" in capsys.readouterr().out
    assert main(["conformance", "--impl", "reference", "--profile", "bogus"]) == 2
    assert "no profile 'bogus'" in capsys.readouterr().err
    assert main(["conformance", "list", "--profile", "core"]) == 0
    out = capsys.readouterr().out
    assert f"{core} cases; profiles: core ({core}), full ({total})" in out and "numeric/lokr-linear-f32" not in out
    assert "numeric/lora-linear-f32  [core,full]  " in out


def test_check_knows_profiles(corpus: Corpus, tmp_path: Path) -> None:
    root = tmp_path / "v1"
    shutil.copytree(corpus.root, root)
    folders = json.loads((root / "folders.json").read_text())
    folders[0]["profiles"] = ["core"]                 # not in full
    folders[1]["profiles"] = ["full", "extended"]     # undeclared
    (root / "folders.json").write_text(json.dumps(folders))
    roundtrips = json.loads((root / "roundtrip.json").read_text())
    roundtrips[0]["profiles"] = ["full"]              # its source is in core too
    (root / "roundtrip.json").write_text(json.dumps(roundtrips))
    problems = check_corpus(root)
    assert problems == ["folders.json/0/profiles: ['core'] does not contain items matching the given schema"]
    folders[0]["profiles"] = ["full", "core"]
    (root / "folders.json").write_text(json.dumps(folders))
    problems = [p for p in check_corpus(root) if "sha256" not in p]
    assert problems == ["folder/lora-peft-written: profile(s) ['extended'] are not declared in corpus.json",
                        "roundtrip/roundtrip-lora-linear-f32: profiles ['full'] differ from its source's ['core', 'full']"]
    meta = json.loads((root / "corpus.json").read_text())
    del meta["profiles"]
    (root / "corpus.json").write_text(json.dumps(meta))
    assert any(p.startswith("corpus.json") and "'profiles' is a required property" in p for p in check_corpus(root))


def test_the_core_description_names_the_initialisations_core_computes(corpus: Corpus) -> None:
    """Core holds LoRA adapters whose init_lora_weights makes the reader rebuild PEFT's residual base (an SVD or a
    QR of each adapted weight, SPEC 8.1): corpus.json's and the README's descriptions of core say so, since a
    reader claiming core must compute them (an implementation reading 'LoRA on Linear' did not expect it)."""
    inits = sorted({init for c in corpus.in_profile("core") if isinstance(c, NumericCase) and "init" in c.tags
                    for init in ("pissa", "olora") if f"-{init}" in c.id})
    assert inits == ["olora", "pissa"]
    readme = (Path(__file__).resolve().parents[2] / "conformance_tests" / "README.md").read_text("utf-8")
    (row,) = [line for line in readme.splitlines() if line.startswith("| `core` |")]
    for description in (corpus.profiles["core"], row):
        assert "init_lora_weights" in description and all(f"'{i}'" in description or f"`{i}`" in description
                                                           for i in inits), description
