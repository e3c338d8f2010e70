"""The built-in torch and Keras implementations, and the PEFT driver, against the corpus.

The backends must pass every case they claim; what they cannot do must show as UNSUPPORTED. Known
backend bugs the suite found are listed (as xfail, so the report still shows them) until fixed.
"""

from __future__ import annotations

import pytest

from adapterspec.conformance import Corpus, Status, run_suite

#: Cases a backend still fails, with why; remove an entry when the backend is fixed (XPASS shows it).
KNOWN_FAILURES = {
    "torch": {},
    "keras": {},
}


def _run(impl: object, corpus: Corpus, backend: str, **kw: object) -> object:
    report = run_suite(impl, corpus, xfail=[f"^{name}$" for name in KNOWN_FAILURES[backend]], **kw)
    failed = {r.name: r.message for r in report.results if r.status is Status.FAILED}
    assert failed == {}, f"{backend} fails cases it claims"
    return report


def test_torch_passes_what_it_claims(corpus: Corpus) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from adapterspec_torch.conformance import TorchImplementation

    report = _run(TorchImplementation(), corpus, "torch")
    counts = report.counts()
    assert counts["passed"] >= 170, counts
    # LoRA, DoRA, IA3, prompt learning and every layer kind are claimed and pass
    passed = set(report.by_status(Status.PASSED))
    assert {"numeric/dora-conv2d-f32", "numeric/lora-fused-qkv-gpt2-f32", "numeric/prefix-tuning-gqa-f32",
            "numeric/lokr-linear-bf16", "roundtrip/roundtrip-loha-conv1d-f32", "folder/sha256-mismatch"} <= passed


def test_keras_passes_what_it_claims(corpus: Corpus) -> None:
    pytest.importorskip("keras")
    from adapterspec_keras.conformance import KerasImplementation

    report = _run(KerasImplementation(), corpus, "keras", exclude=["^schema/"])
    passed = set(report.by_status(Status.PASSED))
    if not passed & {c.name for c in corpus.cases if c.kind == "numeric"}:
        pytest.skip("the keras backend claims no numeric case yet")
    assert {"numeric/lora-linear-bf16", "numeric/dora-gpt2-conv1d-f32", "numeric/ia3-conv2d-f32",
            "roundtrip/roundtrip-lora-fused-qkv-linear-f32"} <= passed
    assert {"numeric/lora-target-parameters-experts-f32",
            "roundtrip/roundtrip-lora-target-parameters-experts-f32"} <= passed  # SPEC 15.1 on a hand-built layer
    assert {"numeric/trainable-tokens-embedding-f32", "numeric/trainable-tokens-linear-f32",
            "numeric/ln-tuning-layer-norm-f32", "roundtrip/roundtrip-ln-tuning-layer-norm-f32"} <= passed
    assert {"folder/lora-target-modules-null", "folder/ia3-targets-null"} <= passed  # PEFT's llama default
    assert "folder/embedding-saved-whole" in passed  # a base embedding a PEFT file replaces (SPEC 5.3, 8.8)
    assert set(report.by_status(Status.UNSUPPORTED)) == set()
    assert not report.by_status(Status.FAILED)


def test_peft_driver_shows_where_peft_departs(corpus: Corpus) -> None:
    pytest.importorskip("peft")
    from adapterspec.conformance.peft_driver import PeftImplementation

    report = run_suite(PeftImplementation(), corpus, include=[
        "^numeric/(lora-linear-f32|dora-conv2d-f32|ia3-linear-f16|lokr-linear-f32|prefix-tuning-f32|prompt-tuning-f32)$",
        "^folder/(lora-peft-written|key-without-prefix|truncated-data|dtype-int32|pickle-only|config-r-zero)$",
        "^roundtrip/roundtrip-lora-linear-(f32|bf16)$", "^schema/(example-r-zero|lora-r-negative)$"])
    status = {r.name: r.status for r in report.results}
    assert status == {
        # PEFT computes what the spec says...
        "numeric/lora-linear-f32": Status.PASSED, "numeric/dora-conv2d-f32": Status.PASSED,
        "numeric/ia3-linear-f16": Status.PASSED, "numeric/lokr-linear-f32": Status.PASSED,
        "numeric/prefix-tuning-f32": Status.PASSED, "numeric/prompt-tuning-f32": Status.PASSED,
        "folder/lora-peft-written": Status.PASSED, "folder/truncated-data": Status.PASSED,
        "folder/config-r-zero": Status.PASSED,  # refused when the layers are made, not when the config is read
        # ...but loads what the spec refuses, reads configs leniently, writes no adapterspec metadata (SPEC 9)
        # and widens a bf16 adapter to float32
        "roundtrip/roundtrip-lora-linear-f32": Status.FAILED,
        "folder/key-without-prefix": Status.FAILED, "folder/dtype-int32": Status.FAILED,
        "folder/pickle-only": Status.FAILED, "schema/lora-r-negative": Status.FAILED,
        "schema/example-r-zero": Status.FAILED,
        "roundtrip/roundtrip-lora-linear-bf16": Status.FAILED,
    }
    messages = {r.name: r.message for r in report.results}
    assert messages["folder/key-without-prefix"].startswith("loaded an adapter it must refuse")
    assert "saved as F32[2, 6], source BF16[2, 6]" in messages["roundtrip/roundtrip-lora-linear-bf16"]
    assert "the saved safetensors metadata has adapterspec_version None" in messages["roundtrip/roundtrip-lora-linear-f32"]
