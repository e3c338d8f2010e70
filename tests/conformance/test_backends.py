"""The built-in torch and Keras implementations, and the PEFT driver, against the corpus.

The backends must pass every case they claim; what they cannot do must show as UNSUPPORTED. Known
backend bugs the suite found are listed (as xfail, so the report still shows them) until fixed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

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
    assert {"numeric/vblora-linear-f32", "numeric/vblora-gpt2-conv1d-topk-f32", "folder/vblora-topk"} <= passed
    assert {"numeric/gralora-linear-f32", "numeric/gralora-linear-hybrid-k3-f32", "numeric/gralora-gpt2-conv1d-f32",
            "folder/gralora-hybrid"} <= passed  # SPEC 17.5
    assert {"numeric/beft-linear-f32", "numeric/beft-linear-f16", "roundtrip/roundtrip-beft-linear-f32",
            "roundtrip/roundtrip-beft-linear-f16", "folder/beft-valid", "folder/beft-init-weights-null"} <= passed
    assert not report.by_status(Status.UNSUPPORTED)  # BEFT (SPEC 17.8) too
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


# -- auxiliary tensors against the model: every implementation refuses them alike --------------------------

_P = "base_model.model."
_Q, _V = _P + "model.layers.0.self_attn.q_proj", _P + "model.layers.0.self_attn.v_proj"
_LORA = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
_TOKENS = _P + "model.embed_tokens.token_adapter.trainable_tokens_delta"


def _ramp(*shape: int, k: float = 1.0) -> Any:
    import numpy as np

    return np.sin(np.arange(math.prod(shape)) * 0.37 + k).reshape(shape).astype(np.float32)


def _linear(i: int, o: int, bias: bool = False) -> dict[str, Any]:
    return {"kind": "linear", "in_features": i, "out_features": o, "bias": bias}


_ATTN = {"model.layers.0.self_attn.q_proj": _linear(8, 8), "model.layers.0.self_attn.v_proj": _linear(8, 4)}
_VOCAB = _ATTN | {"model.embed_tokens": {"kind": "embedding", "num_embeddings": 10, "embedding_dim": 8}}
_OTHER = _ATTN | {"model.other": _linear(8, 3, bias=True)}

#: id -> (config, extra tensors beside q_proj's and v_proj's LoRA pairs, model modules, error, key). The answers
#: are SPEC 10's checks in order: 18 (the module exists), 19 (it takes such a tensor), 20-21 (shapes).
_AUXILIARY = {
    "lm-head-not-in-model": (_LORA, {_P + "lm_head.weight": (10, 8)}, _ATTN, "TargetNotFoundError",
                             _P + "lm_head.weight"),
    "saved-module-not-in-model": (_LORA | {"modules_to_save": ["score"]}, {_P + "score.weight": (2, 8)}, _ATTN,
                                  "TargetNotFoundError", _P + "score.weight"),
    "bias-all-not-in-model": (_LORA | {"bias": "all"}, {_P + "model.other.bias": (3,)}, _ATTN, "TargetNotFoundError",
                              _P + "model.other.bias"),
    "bias-lora-only-layer-without-bias": (_LORA | {"bias": "lora_only"}, {f"{_Q}.base_layer.bias": (5,)}, _ATTN,
                                          "UnexpectedTensorError", f"{_Q}.base_layer.bias"),
    "saved-module-bias-absent": (_LORA | {"modules_to_save": ["q_proj"]}, {f"{_Q}.bias": (8,)}, _ATTN,
                                 "UnexpectedTensorError", f"{_Q}.bias"),
    "embedding-whole-shape": (_LORA, {_P + "model.embed_tokens.weight": (10, 4)}, _VOCAB, "ShapeMismatchError",
                              _P + "model.embed_tokens.weight"),
    "bias-all-shape": (_LORA | {"bias": "all"}, {_P + "model.other.bias": (4,)}, _OTHER, "ShapeMismatchError",
                       _P + "model.other.bias"),
    "token-index-outside": (_LORA | {"trainable_token_indices": [1, 12]}, {_TOKENS: (2, 8)}, _VOCAB,
                            "ShapeMismatchError", _TOKENS),
    "token-rows-missing": (_LORA | {"trainable_token_indices": [1, 2]}, {}, _VOCAB, "MissingTensorError", _TOKENS),
}


def _verdicts(impl_name: str, folders: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]],
              root: Path) -> dict[str, tuple[str, str | None]]:
    """id -> (error class, key) of each folder ``(config, tensors, model)`` loaded by ``impl_name``, or ``("loaded",
    None)``."""
    import json
    import warnings

    from safetensors.numpy import save_file

    from adapterspec.conformance import FolderCase, resolve_implementation
    from adapterspec.conformance.contract import Refusal

    pytest.importorskip({"reference": "numpy", "torch": "torch", "keras": "keras"}[impl_name])
    impl = resolve_implementation(impl_name)
    got: dict[str, tuple[str, str | None]] = {}
    for id_, (config, tensors, model) in folders.items():
        folder = root / id_
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(config), "utf-8")
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        case = FolderCase(id_, "", {"id": id_, "path": id_, "valid": False, "model": model}, root)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                impl.load_folder(case, folder)
            got[id_] = ("loaded", None)
        except Exception as exc:  # noqa: BLE001 - the refusal is what is compared
            refusal = Refusal.from_exception(exc)
            got[id_] = (refusal.error, refusal.key)
    return got


@pytest.mark.parametrize("impl_name", ["reference", "torch", "keras"])
def test_auxiliary_tensors_are_checked_against_the_model_alike(impl_name: str, tmp_path: Path) -> None:
    folders = {}
    for id_, (config, extra, modules, _, _) in _AUXILIARY.items():
        tensors = {f"{_Q}.lora_A.weight": _ramp(2, 8), f"{_Q}.lora_B.weight": _ramp(8, 2, k=2),
                   f"{_V}.lora_A.weight": _ramp(2, 8, k=3), f"{_V}.lora_B.weight": _ramp(4, 2, k=4)}
        if "modules_to_save" in config and "q_proj" in config["modules_to_save"]:
            tensors = {k: v for k, v in tensors.items() if not k.startswith(_Q)}
        tensors |= {k: _ramp(*shape, k=5) for k, shape in extra.items()}
        folders[id_] = (config, tensors, {"dtype": "float32", "modules": modules})
    got = _verdicts(impl_name, folders, tmp_path)
    assert got == {id_: (error, key) for id_, (_, _, _, error, key) in _AUXILIARY.items()}


_DECODER = {"dtype": "float32", "modules": {}, "decoder": {
    "architecture": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 2, "vocab_size": 32}}
_LAYERS = {"self_attn.q_proj": (8, 8), "self_attn.k_proj": (8, 8), "self_attn.v_proj": (8, 8),
           "self_attn.o_proj": (8, 8), "mlp.gate_proj": (8, 16), "mlp.up_proj": (8, 16), "mlp.down_proj": (16, 8)}


def _decoder_lora(*names: str) -> dict[str, Any]:
    return {f"{_P}model.layers.{i}.{name}.lora_{ab}.weight": _ramp(*shape, k=i)
            for i in range(2) for name in names
            for ab, shape in (("A", (2, _LAYERS[name][0])), ("B", (_LAYERS[name][1], 2)))}


_LM_HEAD_LORA = {_P + "lm_head.lora_A.weight": _ramp(2, 8), _P + "lm_head.lora_B.weight": _ramp(32, 2)}
#: id -> (config, tensors, error, key) on the LlamaForCausalLM a `decoder` description implies (conformance README,
#: section 4): model.embed_tokens its input embedding, lm_head its output layer, which all-linear leaves out.
_ON_A_DECODER = {
    "embedding-saved-whole": ({"target_modules": ["q_proj"]}, _decoder_lora("self_attn.q_proj") | {
        _P + "model.embed_tokens.weight": _ramp(32, 8)}, "loaded", None),
    "output-layer-saved-whole": ({"target_modules": ["q_proj"]}, _decoder_lora("self_attn.q_proj") | {
        _P + "lm_head.weight": _ramp(32, 8)}, "loaded", None),
    "embedding-saved-whole-shape": ({"target_modules": ["q_proj"]}, _decoder_lora("self_attn.q_proj") | {
        _P + "model.embed_tokens.weight": _ramp(30, 8)}, "ShapeMismatchError", _P + "model.embed_tokens.weight"),
    "token-rows": ({"target_modules": ["q_proj"], "trainable_token_indices": [1, 3]}, _decoder_lora(
        "self_attn.q_proj") | {_P + "model.embed_tokens.token_adapter.trainable_tokens_delta": _ramp(2, 8)},
        "loaded", None),
    "all-linear": ({"target_modules": "all-linear"}, _decoder_lora(*_LAYERS), "loaded", None),
    "all-linear-output-layer": ({"target_modules": "all-linear"}, _decoder_lora(*_LAYERS) | _LM_HEAD_LORA,
                                "UnexpectedTensorError", _P + "lm_head.lora_A.weight"),
    "output-layer-targeted": ({"target_modules": ["q_proj", "lm_head"]}, _decoder_lora("self_attn.q_proj")
                              | _LM_HEAD_LORA, "loaded", None),
}


@pytest.mark.parametrize("impl_name", ["reference", "torch", "keras"])
def test_a_decoder_description_is_llama_for_causal_lm(impl_name: str, tmp_path: Path) -> None:
    folders = {id_: ({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}, tensors, _DECODER)
               for id_, (config, tensors, _, _) in _ON_A_DECODER.items()}
    got = _verdicts(impl_name, folders, tmp_path)
    assert got == {id_: (error, key) for id_, (_, _, error, key) in _ON_A_DECODER.items()}
