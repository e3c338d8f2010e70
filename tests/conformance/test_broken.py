"""Deliberately broken implementations fail the suite, and the report names exactly the cases they break."""

from __future__ import annotations

from typing import Any

from broken_impls import AcceptsTruncatedFiles, IgnoresAlpha, TransposesLoraB

from adapterspec.conformance import Corpus, NumericCase, Status, run_suite


def _failed(report: Any) -> set[str]:
    return set(report.by_status(Status.FAILED))


def test_transposed_lora_b_fails_every_lora_case(corpus: Corpus) -> None:
    report = run_suite(TransposesLoraB(), corpus, include=["^numeric/"])
    lora = {c.name for c in corpus.cases if isinstance(c, NumericCase) and c.method == "LORA"}
    assert len(lora) >= 15
    assert _failed(report) == lora
    assert all("differs at" in r.message for r in report.results if r.status is Status.FAILED)
    assert not report.ok


def test_ignoring_alpha_fails_every_scaled_case(corpus: Corpus) -> None:
    report = run_suite(IgnoresAlpha(), corpus, include=["^numeric/"])
    # scale 1 anyway: r = lora_alpha = 8 (PEFT's defaults), AdaLoRA's lora_alpha 0 (it scales by init_r)
    unscaled = {"numeric/lora-default-r-f32", "numeric/adalora-alpha-zero-f32"}
    scaled = {c.name for c in corpus.cases if isinstance(c, NumericCase)
              and c.method in ("LORA", "LOHA", "LOKR", "ADALORA", "GRALORA")} - unscaled  # GraLoRA: alpha/(r+hybrid_r)
    assert _failed(report) == scaled
    assert "numeric/rslora-patterns-f32" in scaled and "numeric/lokr-linear-bf16" in scaled
    # IA3, prompt learning, OFT and BOFT have no alpha: they still pass
    assert set(report.by_status(Status.PASSED)) == {f"numeric/{i}" for i in (
        "ia3-linear-f32", "ia3-linear-f16", "ia3-conv2d-f32", "ia3-gpt2-conv1d-f32", "ia3-feedforward-suffix-f32",
        "ia3-unknown-layers-to-transform-f32", "ia3-feedforward-regex-f32", "prefix-tuning-gqa-config-heads-f32",
        "prefix-tuning-f32", "prefix-tuning-gqa-f32", "prompt-tuning-f32")} | unscaled | {f"numeric/{i}" for i in (  # OFT/BOFT: rotations
        "oft-linear-f32", "oft-linear-cayley-shared-f32", "oft-linear-rank-3-terms-f32", "oft-conv2d-1x1-f32",
        "boft-linear-f32", "boft-conv2d-f32")} | {"numeric/p-tuning-f32"} | {f"numeric/{i}" for i in (
        "vera-linear-f32", "vera-gpt2-conv1d-f32",  # VeRA: no alpha
        "trainable-tokens-embedding-f32", "trainable-tokens-linear-f32", "ln-tuning-layer-norm-f32",  # nor these
        "road-1-linear-f32", "road-2-linear-f32", "road-4-linear-f32", "road-4-linear-groups-f32",
        "road-2-linear-bf16")} | {  # RoAd (SPEC 17.1): no alpha
        f"numeric/miss-linear{i}" for i in ("-f32", "-padded-f32", "-mini-f32", "-bat-f32", "-null-init-f32",
                                            "-f16")} | {  # nor MiSS (SPEC 17.2)
        f"numeric/{i}" for i in ("hra-linear-f32", "hra-linear-gs-f32", "hra-conv2d-f32", "hra-linear-null-booleans-f32",
                                 "hra-linear-f16")} | {
        "numeric/vblora-linear-f32", "numeric/vblora-gpt2-conv1d-topk-f32"} | {  # HRA, VB-LoRA: no alpha
        f"numeric/c3a-{i}" for i in ("linear-f32", "linear-f16", "pattern-order-f32", "pattern-alternation-f32",
                                     "pattern-escaped-whole-path-f32")} | {  # nor C3A (SPEC 17.7)
        f"numeric/delora-linear{i}" for i in ("-f32", "-null-init-f32", "-f16")} | {  # nor DeLoRA (SPEC 17.6)
        "numeric/beft-linear-f32", "numeric/beft-linear-f16"}  # nor BEFT (SPEC 17.8)


def test_accepting_a_truncated_file_fails_that_case(corpus: Corpus) -> None:
    report = run_suite(AcceptsTruncatedFiles(), corpus, include=["^folder/"])
    assert _failed(report) == {"folder/truncated-data"}
    (result,) = [r for r in report.results if r.name == "folder/truncated-data"]
    assert result.message.startswith("loaded an adapter it must refuse (expected FileFormatError")
    assert "folder/truncated-header" in report.by_status(Status.PASSED)
