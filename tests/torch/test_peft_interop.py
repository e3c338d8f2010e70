"""PEFT folders load into plain models with the same outputs, and folders we save load in PEFT unchanged.

Every method and layer kind: a PEFT model with element-unique adapter weights is saved; the folder is
loaded into a fresh copy of the same base model with ``adapterspec.load_adapter`` and the outputs are
compared with PEFT's (fp32, 1e-6). Then ``adapterspec.save_adapter`` writes it again; PEFT loads that
folder with exactly the same adapter state dict and outputs, and the tensors equal the original file's.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from torch_helpers import assert_close, fresh, logits, peft_reference  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _cases() -> list[Any]:
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    return [
        pytest.param("llama", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_ALL), id="llama-lora"),
        pytest.param("llama", lambda: LoraConfig(
            r=4, lora_alpha=6, use_rslora=True, target_modules=LLAMA_ALL,
            rank_pattern={"layers.1.self_attn.q_proj": 8, "down_proj": 2},
            alpha_pattern={r"layers\.0\..*v_proj": 3, "up_proj": 12}), id="llama-rslora-patterns"),
        pytest.param("llama", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_bias=True), id="llama-lora-bias"),
        pytest.param("llama", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_ALL, use_dora=True),
                     id="llama-dora"),
        pytest.param("llama", lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                feedforward_modules=["down_proj"]), id="llama-ia3"),
        pytest.param("llama", lambda: LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
                     id="llama-loha"),
        pytest.param("llama", lambda: LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
                     id="llama-lokr"),
        pytest.param("llama", lambda: LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"],
                                                 decompose_both=True, decompose_factor=4), id="llama-lokr-decomposed"),
        pytest.param("llama", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
                     id="llama-lora-embedding"),
        pytest.param("llama", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"],
                                                 use_dora=True), id="llama-dora-embedding"),
        pytest.param("llama", lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
                     id="llama-prefix"),
        pytest.param("llama", lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                     id="llama-prompt"),
        pytest.param("gpt2", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                                fan_in_fan_out=True), id="gpt2-lora-conv1d"),
        pytest.param("gpt2", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                fan_in_fan_out=True, use_dora=True), id="gpt2-dora-conv1d"),
        pytest.param("gpt2", lambda: IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                               feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True),
                     id="gpt2-ia3-conv1d"),
        pytest.param("gpt2", lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                     id="gpt2-prefix"),
        pytest.param("bert", lambda: LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                target_modules=["query", "value", "dense"],
                                                modules_to_save=["classifier"]), id="bert-lora-modules-to-save"),
        pytest.param("cnn", lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "conv3", "head"]),
                     id="cnn-lora"),
        pytest.param("cnn", lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "conv3"],
                                               use_dora=True), id="cnn-dora"),
        pytest.param("cnn", lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "head"], lora_bias=True),
                     id="cnn-lora-bias"),
        pytest.param("cnn", lambda: IA3Config(target_modules=["conv1", "conv2", "head"],
                                              feedforward_modules=["conv2"]), id="cnn-ia3"),
        pytest.param("cnn", lambda: LoHaConfig(r=2, alpha=4, target_modules=["conv1", "head"]), id="cnn-loha"),
        pytest.param("cnn", lambda: LoKrConfig(r=2, alpha=4, target_modules=["conv1", "head"]), id="cnn-lokr"),
        pytest.param("cnn", lambda: LoHaConfig(r=2, alpha=4, target_modules=["conv1", "conv2", "conv3"],
                                               use_effective_conv2d=True), id="cnn-loha-effective"),
        pytest.param("cnn", lambda: LoKrConfig(r=1, alpha=3, target_modules=["conv1"],  # PEFT fails on Conv1d here
                                               use_effective_conv2d=True), id="cnn-lokr-effective"),
    ]


def _inputs(kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    if kind == "cnn":
        return {"x": request.getfixturevalue("image_inputs")}
    return request.getfixturevalue("token_inputs")


def _run(model: Any, kind: str, inputs: dict[str, Any]) -> Any:
    if kind == "cnn":
        with torch.no_grad():
            return model(inputs["x"])
    return logits(model, inputs)


@pytest.mark.parametrize(("kind", "make_config"), _cases())
def test_peft_folder_roundtrip(kind: str, make_config: Any, request: pytest.FixtureRequest, tmp_path: Any,
                               caplog: pytest.LogCaptureFixture) -> None:
    base = request.getfixturevalue(kind)
    inputs = _inputs(kind, request)
    reference = peft_reference(base, make_config(), tmp_path / "peft")
    expected = _run(reference, kind, inputs)
    base_out = _run(base, kind, inputs)
    tail = expected[:, -base_out.shape[1]:] if expected.shape != base_out.shape else expected  # prompt tuning
    assert (tail - base_out).abs().max() > 1e-3, "the adapter must change the output for the test to mean anything"

    # PEFT folder -> adapterspec
    model = fresh(base)
    before_ids = [(name, id(module)) for name, module in model.named_modules()]
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_close(_run(model, kind, inputs), expected)
    with adapterspec.disabled_adapters(model):
        assert_close(_run(model, kind, inputs), base_out, atol=0)

    # adapterspec -> folder: the same tensors, an equivalent config
    adapterspec.save_adapter(model, tmp_path / "ours")
    original, saved = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(
        tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(saved[key], tensor), key
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "adapterspec_version" not in ours_config  # spec 1.1: in the safetensors metadata only
    assert {k: v for k, v in ours_config.items() if k in peft_config} == peft_config

    # folder -> PEFT: nothing missing or unexpected, same state and outputs
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    said = {}
    for source in ("peft", "ours"):
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            loaded = PeftModel.from_pretrained(fresh(base), str(tmp_path / source)).eval()
        said[source] = sorted({str(w.message) for w in caught} |
                              {r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING})
    # PEFT says nothing about what we write that it does not say about its own folder (before spec 1.1:
    # "Unexpected keyword arguments ['adapterspec_version'] ...") -- what is left is about the model and
    # transformers (a deprecation, lora_bias on a layer without bias); test_peft_loads_ours_silently has none
    assert said["ours"] == said["peft"]
    assert not [m for m in said["ours"] if "adapterspec" in m or "Unexpected keyword" in m]
    state = get_peft_model_state_dict(loaded)
    assert sorted(state) == sorted(saved)
    for key, tensor in state.items():
        assert torch.equal(tensor, saved[key]), key
    assert_close(_run(loaded, kind, inputs), expected)

    # delete restores the very module objects and the exact state dict
    adapterspec.delete_adapter(model, "default")
    assert [(name, id(module)) for name, module in model.named_modules()] == before_ids
    reference_state = base.state_dict()
    assert list(model.state_dict()) == list(reference_state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference_state[key]), key
    assert not hasattr(model, "_adapterspec_state")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_modules_are_original_objects_after_delete(kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> None:
    from peft import LoraConfig

    base = request.getfixturevalue(kind)
    targets = ["q_proj", "down_proj", "embed_tokens"] if kind == "llama" else ["c_attn", "wte"]
    peft_reference(base, LoraConfig(r=2, target_modules=targets, fan_in_fan_out=kind == "gpt2"), tmp_path)
    model = fresh(base)
    before = [(name, id(module)) for name, module in model.named_modules()]
    adapterspec.load_adapter(model, tmp_path)
    assert [(n, id(m)) for n, m in model.named_modules()] != before
    adapterspec.delete_adapter(model, "default")
    assert [(name, id(module)) for name, module in model.named_modules()] == before


def test_peft_loads_ours_silently(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A folder adapterspec writes loads in PEFT with no warning and no log record at all (spec 1.1 keeps the
    spec version out of adapter_config.json, where PEFT warned about it as a keyword from a newer PEFT)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from torch_helpers import fill_adapter_weights

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(6, 8), torch.nn.Linear(8, 4)

        def forward(self, x: Any) -> Any:
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    base = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(fresh(base), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))
    fill_adapter_weights(reference)
    reference.save_pretrained(tmp_path / "peft")
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "peft")
    adapterspec.save_adapter(model, tmp_path / "ours")
    assert "adapterspec_version" not in json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert adapterspec.read_adapter(tmp_path / "ours").metadata["adapterspec_version"] == adapterspec.SPEC_VERSION
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(fresh(base), str(tmp_path / "ours")).eval()
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    x = torch.arange(12, dtype=torch.float32).reshape(2, 6) / 10
    with torch.no_grad():
        assert_close(loaded(x), reference(x))


@pytest.mark.parametrize(("kind", "method", "given"), [("gpt2", "LORA", None), ("gpt2", "LORA", False),
                                                       ("gpt2", "IA3", None), ("gpt2", "VERA", None),
                                                       ("llama", "LORA", True), ("llama", "IA3", True)])
def test_new_adapter_records_peft_s_fan_in_fan_out(kind: str, method: str, given: Any,
                                                   request: pytest.FixtureRequest, tmp_path: Any) -> None:
    """PEFT's get_peft_model sets fan_in_fan_out true on a transformers Conv1D and false on a Linear (warning) and
    saves that: a new adapter records the same value, so PEFT loads our folder without its warning (before: GPT-2
    adapters saved fan_in_fan_out false and PEFT warned "Setting fan_in_fan_out to True" on every load)."""
    from peft import PeftModel
    from peft_saves import fan_in_fan_out_config, peft_saved_config

    base = request.getfixturevalue(kind)
    config = fan_in_fan_out_config(kind, method, given)
    theirs = peft_saved_config(fresh(base), config, tmp_path / "peft")["fan_in_fan_out"]
    model = fresh(base)
    adapterspec.inject_adapter(model, config, trainable=False)
    adapterspec.save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] == theirs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(fresh(base), str(tmp_path / "ours"))
    assert [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)] == []
