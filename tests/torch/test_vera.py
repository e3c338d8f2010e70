"""VeRA (SPEC.md 15.5) exact against PEFT 0.21 in both directions; the shared projections stored once; refusals typed.

Each case: a PEFT VeRA model with element-unique lambdas and projections is saved with ``save_projection``;
``adapterspec.load_adapter`` gives PEFT's outputs; ``save_adapter`` writes byte-equal tensors (``base_model.vera_A``
and ``base_model.vera_B`` once) and the same config, which PEFT loads with nothing missing or unexpected, no warning
of its own and the same outputs; merging gives PEFT's merged outputs and unmerging restores the base weights.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from adapterspec.errors import MissingTensorError, ShapeMismatchError, UnsupportedError  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch_helpers import (  # noqa: E402
    assert_close,
    assert_same_snapshot,
    fresh,
    logits,
    peft_load,
    snapshot,
    unique_values,
)

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
GPT2 = ["c_attn", "c_proj", "c_fc"]


def _fill(model: Any) -> None:
    """Element-unique lambdas (b around 1, d around 0.5) and projections: a transpose or a wrong slice shows."""
    with torch.no_grad():
        tensors = sorted(list(model.named_parameters()) + list(model.named_buffers()))
        for index, (name, tensor) in enumerate(tensors):
            if "vera_lambda_b" in name:
                tensor.copy_(unique_values(tuple(tensor.shape), index, around=1.0, scale=0.5))
            elif "vera_lambda_d" in name:
                tensor.copy_(unique_values(tuple(tensor.shape), index, around=0.5, scale=0.5))
            elif "vera_A" in name or "vera_B" in name:
                tensor.copy_(unique_values(tuple(tensor.shape), index, scale=0.3))


def _peft_folder(base: Any, config: Any, folder: Path) -> Any:
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(fresh(base), config)
        _fill(model)
        model.eval()
        model.save_pretrained(str(folder))
    return model


def _cases() -> list[Any]:
    from peft import VeraConfig

    return [
        pytest.param("llama", lambda: VeraConfig(r=8, target_modules=LLAMA), id="llama"),
        pytest.param("gpt2", lambda: VeraConfig(r=6, target_modules=GPT2, projection_prng_key=7), id="gpt2-conv1d"),
        pytest.param("bert", lambda: VeraConfig(r=4, target_modules=["query", "value", "dense"], task_type="SEQ_CLS",
                                                modules_to_save=["classifier"]), id="bert"),
    ]


@pytest.mark.parametrize(("kind", "make_config"), _cases())
def test_peft_folder_roundtrip(kind: str, make_config: Any, request: pytest.FixtureRequest, tmp_path: Path,
                               caplog: pytest.LogCaptureFixture) -> None:
    base = request.getfixturevalue(kind)
    inputs = request.getfixturevalue("token_inputs")
    reference = _peft_folder(base, make_config(), tmp_path / "peft")
    expected = logits(reference, inputs)
    base_out = logits(base, inputs)
    assert (expected - base_out).abs().max() > 1e-2, "the adapter must change the output for the test to mean anything"
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert "base_model.vera_A" in original and "base_model.vera_B" in original
    assert adapterspec.validate_adapter(tmp_path / "peft") == []
    _, said_peft = peft_load(base, tmp_path / "peft", caplog)

    # PEFT folder -> adapterspec
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_close(logits(model, inputs), expected)
    with adapterspec.disabled_adapters(model):
        assert_close(logits(model, inputs), base_out, atol=0)

    # adapterspec -> folder: byte-equal tensors, the same config
    adapterspec.save_adapter(model, tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(saved[key], tensor), key
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: v for k, v in ours_config.items() if k in peft_config} == peft_config

    # folder -> PEFT: no warning of its own, nothing missing or unexpected, the same outputs
    from peft.utils import get_peft_model_state_dict

    loaded, said_ours = peft_load(base, tmp_path / "ours", caplog)
    assert said_ours == said_peft
    state = get_peft_model_state_dict(loaded)
    assert sorted(state) == sorted(saved)
    for key, tensor in state.items():
        assert torch.equal(tensor, saved[key]), key
    assert_close(logits(loaded, inputs), expected)

    # merge: PEFT's merged outputs; unmerge: the base weights back
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    merged_expected = logits(reference, inputs)
    adapterspec.merge_adapters(model)
    assert_close(logits(model, inputs), merged_expected)
    adapterspec.unmerge_adapters(model)
    restored = {k.replace(".base_layer.", ".").replace(".original_module.", "."): v
                for k, v in model.state_dict().items()}
    for key, value in base.state_dict().items():
        assert_close(restored[key], value, atol=1e-5)
    assert_close(logits(model, inputs), expected)

    # deleting the adapter takes its shared projections off the model
    adapterspec.delete_adapter(model, "default")
    assert sorted(model.state_dict()) == sorted(base.state_dict())


def test_a_new_adapter_gets_peft_projections(gpt2: Any) -> None:
    """Injected without a file, the projections are PEFT's (same generator, seed and order); lambdas PEFT's init."""
    from peft import VeraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(fresh(gpt2), VeraConfig(r=4, target_modules=GPT2, projection_prng_key=3))
    model = fresh(gpt2)
    adapterspec.inject_adapter(model, {"peft_type": "VERA", "r": 4, "target_modules": GPT2,
                                       "projection_prng_key": 3}, "default")
    ours = adapterspec.extract_adapter(model, "default").load_tensors("pt")
    from peft.utils import get_peft_model_state_dict

    theirs = get_peft_model_state_dict(reference)
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key


def _refused(base: Any, folder: Path, error: type[Exception], needle: str) -> None:
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(error) as info:
        adapterspec.load_adapter(model, folder)
    assert needle in str(info.value)
    assert_same_snapshot(model, before)


def test_save_projection_false_is_refused_naming_the_field(llama: Any, tmp_path: Path) -> None:
    from peft import VeraConfig

    _peft_folder(llama, VeraConfig(r=4, target_modules=["q_proj"], save_projection=False), tmp_path)
    assert not any(k.startswith("base_model.vera_") for k in load_file(tmp_path / "adapter_model.safetensors"))
    _refused(llama, tmp_path, UnsupportedError, "/save_projection")
    assert any("/save_projection" in str(e) for e in adapterspec.validate_adapter(tmp_path))


def test_bias_is_refused_naming_the_field(llama: Any, tmp_path: Path) -> None:
    from peft import VeraConfig

    _peft_folder(llama, VeraConfig(r=4, target_modules=["q_proj"], bias="vera_only"), tmp_path)
    _refused(llama, tmp_path, UnsupportedError, "/bias")


def _edit(folder: Path, change: Any) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


def test_a_missing_projection_is_refused(llama: Any, tmp_path: Path) -> None:
    from peft import VeraConfig

    _peft_folder(llama, VeraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path)
    _edit(tmp_path, lambda t: t.pop("base_model.vera_B"))
    _refused(llama, tmp_path, MissingTensorError, "base_model.vera_B")


def test_a_projection_of_another_width_is_refused_with_the_model(llama: Any, tmp_path: Path) -> None:
    """vera_A must be [r, largest input size of the adapted modules]: a narrower one is a shape error at load."""
    from peft import VeraConfig

    _peft_folder(llama, VeraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path)
    _edit(tmp_path, lambda t: t.update({"base_model.vera_A": t["base_model.vera_A"][:, :32].contiguous()}))
    assert adapterspec.validate_adapter(tmp_path) == []  # the input sizes are the model's: only a load sees them
    _refused(llama, tmp_path, ShapeMismatchError, "base_model.vera_A")


def test_a_projection_of_another_rank_is_refused_without_the_model(llama: Any, tmp_path: Path) -> None:
    from peft import VeraConfig

    _peft_folder(llama, VeraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path)
    _edit(tmp_path, lambda t: t.update({"base_model.vera_B": torch.cat([t["base_model.vera_B"]] * 2, dim=1)}))
    assert any("base_model.vera_B" in str(e) for e in adapterspec.validate_adapter(tmp_path))
    _refused(llama, tmp_path, ShapeMismatchError, "base_model.vera_B")


def test_embedding_targets_are_refused_as_in_peft(llama: Any, tmp_path: Path) -> None:
    """PEFT's VeRA adapts Linear and Conv1D only; so does adapterspec (UnsupportedError naming the module)."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA", "r": 2,
                                                               "target_modules": ["embed_tokens"]}))
    key = "base_model.model.model.embed_tokens"
    save_file({f"{key}.vera_lambda_b": torch.ones(64), f"{key}.vera_lambda_d": torch.ones(2),
               "base_model.vera_A": torch.ones(2, 128), "base_model.vera_B": torch.ones(64, 2)},
              tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    _refused(llama, tmp_path, UnsupportedError, "model.embed_tokens")


def test_null_target_modules_take_peft_default_for_the_architecture(gpt2: Any, token_inputs: Any, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """target_modules null: PEFT's VeRA table for gpt2 (c_attn), as PEFT resolves it (SPEC.md 14.2)."""
    from peft import VeraConfig

    _peft_folder(gpt2, VeraConfig(r=4, target_modules=["c_attn"]), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"target_modules": None}))
    reference, _ = peft_load(gpt2, tmp_path, caplog)
    expected = logits(reference, token_inputs)
    assert (expected - logits(gpt2, token_inputs)).abs().max() > 1e-2
    model = fresh(gpt2)
    adapterspec.load_adapter(model, tmp_path)
    assert_close(logits(model, token_inputs), expected)


def test_bf16_model_unmerged_and_merged_equal_peft(llama: Any, token_inputs: Any, tmp_path: Path) -> None:
    """On a bfloat16 model the adapter runs in float32 and its float32 delta is added in place, as in PEFT: the
    outputs are PEFT's bit for bit, merged too (one rounding of the merged weight, not two)."""
    from peft import PeftModel, VeraConfig

    base = fresh(llama).to(torch.bfloat16)
    _peft_folder(base, VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(fresh(base), str(tmp_path)).eval()
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    assert torch.equal(logits(model, token_inputs), logits(reference, token_inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model)
    assert torch.equal(logits(model, token_inputs), logits(reference, token_inputs))
