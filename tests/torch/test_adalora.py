"""AdaLoRA (SPEC.md 15.4) exact against PEFT 0.21 in both directions, after real rank allocation; refusals typed.

Each case trains a PEFT AdaLoRA model a few steps with ``update_and_allocate`` so that ranks really get pruned
(the saved ``rank_pattern`` keeps some, all or none of a module's ``init_r`` ranks), then gives the adapter
tensors element-unique values and saves with PEFT. The reference outputs are PEFT's own model loaded from that
folder. ``adapterspec.load_adapter`` gives them; ``save_adapter`` writes byte-equal tensors and the same config,
which PEFT loads with nothing missing or unexpected, no warning of its own and the same outputs; merging gives
PEFT's merged outputs and unmerging restores the base weights.
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
from adapterspec.errors import ShapeMismatchError, UnsupportedError  # noqa: E402
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
    """Element-unique A, B (scale 0.3) and singular values E around 1: the adapter clearly moves the outputs."""
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(model.named_parameters())):
            if ".lora_E." in name:
                param.copy_(unique_values(tuple(param.shape), index, around=1.0, scale=0.5))
            elif ".lora_A." in name or ".lora_B." in name:
                param.copy_(unique_values(tuple(param.shape), index, scale=0.3))


def _loss(model: Any, inputs: dict[str, Any]) -> Any:
    if "x" in inputs:
        return model(inputs["x"]).pow(2).mean()
    return model(**inputs, labels=inputs["input_ids"]).loss


def _trained(base: Any, config: Any, folder: Path, inputs: dict[str, Any]) -> None:
    """PEFT AdaLoRA trained ``config.total_step`` steps with rank allocation, filled, saved to ``folder``."""
    from peft import get_peft_model

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(fresh(base), config)
        model.train()
        optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for step in range(config.total_step):
            _loss(model, inputs).backward()
            optimiser.step()
            model.base_model.update_and_allocate(step)
            optimiser.zero_grad()
        _fill(model)
        model.eval()
        model.save_pretrained(str(folder))


def _run(model: Any, inputs: dict[str, Any]) -> Any:
    if "x" in inputs:
        with torch.no_grad():
            return model(inputs["x"])
    return logits(model, inputs)


def _cases() -> list[Any]:
    from peft import AdaLoraConfig

    return [
        pytest.param("llama", lambda: AdaLoraConfig(init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8,
                                                    lora_alpha=8, target_modules=LLAMA), id="llama"),
        pytest.param("gpt2", lambda: AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=6,
                                                   lora_alpha=16, target_modules=GPT2), id="gpt2-conv1d"),
        pytest.param("cnn", lambda: AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=6,
                                                  lora_alpha=4, target_modules=["conv1", "conv2", "head"]),
                     id="cnn-conv2d"),
    ]


@pytest.mark.parametrize(("kind", "make_config"), _cases())
def test_trained_peft_folder_roundtrip(kind: str, make_config: Any, request: pytest.FixtureRequest, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    base = request.getfixturevalue(kind)
    inputs = {"x": request.getfixturevalue("image_inputs")} if kind == "cnn" else request.getfixturevalue("token_inputs")
    config = make_config()
    _trained(base, config, tmp_path / "peft", inputs)
    saved_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    kept = [sum(v) for v in saved_config["rank_pattern"].values()]
    assert any(0 < k < config.init_r for k in kept) or (0 in kept and config.init_r in kept), kept  # really pruned
    reference, said_peft = peft_load(base, tmp_path / "peft", caplog)
    expected = _run(reference, inputs)
    base_out = _run(base, inputs)
    assert (expected - base_out).abs().max() > 1e-2, "the adapter must change the output for the test to mean anything"
    assert adapterspec.validate_adapter(tmp_path / "peft") == []

    # PEFT folder -> adapterspec
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_close(_run(model, inputs), expected)
    with adapterspec.disabled_adapters(model):
        assert_close(_run(model, inputs), base_out, atol=0)

    # adapterspec -> folder: byte-equal tensors, the same config
    adapterspec.save_adapter(model, tmp_path / "ours")
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(saved[key], tensor), key
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert {k: v for k, v in ours_config.items() if k in saved_config} == saved_config

    # folder -> PEFT: no warning of its own, nothing missing or unexpected, the same outputs
    from peft.utils import get_peft_model_state_dict

    loaded, said_ours = peft_load(base, tmp_path / "ours", caplog)
    assert said_ours == said_peft
    state = get_peft_model_state_dict(loaded)
    assert sorted(state) == sorted(saved)
    for key, tensor in state.items():
        assert torch.equal(tensor, saved[key]), key
    assert_close(_run(loaded, inputs), expected)

    # merge: PEFT's merged outputs; unmerge: the base weights back
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    merged_expected = _run(reference, inputs)
    adapterspec.merge_adapters(model)
    assert_close(_run(model, inputs), merged_expected)
    adapterspec.unmerge_adapters(model)
    restored = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()}
    for key, value in base.state_dict().items():
        assert_close(restored[key], value, atol=1e-5)
    assert_close(_run(model, inputs), expected)


def _peft_folder(base: Any, tmp_path: Path, **fields: Any) -> Path:
    from peft import AdaLoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(fresh(base), AdaLoraConfig(init_r=4, total_step=10, target_modules=["q_proj"],
                                                          **fields))
        _fill(model)
        model.save_pretrained(str(tmp_path))
    return tmp_path


def _refused(base: Any, folder: Path, error: type[Exception], needle: str) -> None:
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(error) as info:
        adapterspec.load_adapter(model, folder)
    assert needle in str(info.value)
    assert_same_snapshot(model, before)


def test_bias_is_refused_naming_the_field(llama: Any, tmp_path: Path) -> None:
    folder = _peft_folder(llama, tmp_path, bias="lora_only")
    _refused(llama, folder, UnsupportedError, "/bias")
    assert any("/bias" in str(e) for e in adapterspec.validate_adapter(folder))


def test_a_rank_pattern_that_disagrees_with_the_tensors_is_a_shape_error(llama: Any, tmp_path: Path) -> None:
    """The tensors keep 4 ranks; a config claiming 3 kept for one module is refused before any change."""
    folder = _peft_folder(llama, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["rank_pattern"] = {"model.layers.0.self_attn.q_proj.lora_E": [True, True, True, False]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    _refused(llama, folder, ShapeMismatchError, "model.layers.0.self_attn.q_proj.lora_")


def test_a_rank_pattern_of_other_values_is_a_config_error(llama: Any, tmp_path: Path) -> None:
    folder = _peft_folder(llama, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["rank_pattern"] = {"model.layers.0.self_attn.q_proj": 3}  # LoRA's form, not AdaLoRA's
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(adapterspec.ConfigError, match="rank_pattern"):
        adapterspec.load_adapter(fresh(llama), folder)


def test_a_missing_singular_value_tensor_is_refused(llama: Any, tmp_path: Path) -> None:
    folder = _peft_folder(llama, tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_E"]
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    _refused(llama, folder, adapterspec.MissingTensorError, "layers.1.self_attn.q_proj.lora_E")


def test_embedding_targets_are_refused_as_in_peft(llama: Any, tmp_path: Path) -> None:
    """PEFT's AdaLoRA adapts Linear, Conv1D and Conv2d only (it raises on an embedding); so does adapterspec."""
    config = {"peft_type": "ADALORA", "init_r": 2, "total_step": 10, "target_modules": ["embed_tokens"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    key = "base_model.model.model.embed_tokens"
    save_file({f"{key}.lora_A": torch.ones(2, 128), f"{key}.lora_B": torch.ones(64, 2),
               f"{key}.lora_E": torch.ones(2, 1)}, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    _refused(llama, tmp_path, UnsupportedError, "model.embed_tokens")


def test_training_is_refused_not_done_without_rank_allocation(llama: Any, tmp_path: Path) -> None:
    """Plain gradient steps on AdaLoRA's tensors are not AdaLoRA training (no allocation, no orthogonality loss)."""
    folder = _peft_folder(llama, tmp_path)
    model = fresh(llama)
    before = snapshot(model)
    with pytest.raises(UnsupportedError, match="training AdaLoRA"):
        adapterspec.load_adapter(model, folder, trainable=True)
    assert_same_snapshot(model, before)



def test_null_target_modules_take_peft_default_for_the_architecture(llama: Any, token_inputs: Any, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """target_modules null: PEFT's AdaLoRA table for llama (q_proj, v_proj), as PEFT resolves it (SPEC.md 14.2)."""
    from peft import AdaLoraConfig

    _trained(llama, AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=1, total_step=6,
                                  target_modules=["q_proj", "v_proj"]), tmp_path, token_inputs)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"target_modules": None}))
    reference, _ = peft_load(llama, tmp_path, caplog)
    expected = logits(reference, token_inputs)
    assert (expected - logits(llama, token_inputs)).abs().max() > 1e-2
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path)
    assert_close(logits(model, token_inputs), expected)


def test_bf16_model_unmerged_and_merged_equal_peft(llama: Any, token_inputs: Any, tmp_path: Path) -> None:
    """On a bfloat16 model the adapter runs in float32 and its float32 delta is added in place, as in PEFT: the
    outputs are PEFT's bit for bit, merged too (one rounding of the merged weight, not two)."""
    from peft import PeftModel

    base = fresh(llama).to(torch.bfloat16)
    folder = _peft_folder(base, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(fresh(base), str(folder)).eval()
    model = fresh(base)
    adapterspec.load_adapter(model, folder)
    assert torch.equal(logits(model, token_inputs), logits(reference, token_inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model)
    assert torch.equal(logits(model, token_inputs), logits(reference, token_inputs))
