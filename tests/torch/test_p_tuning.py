"""P-tuning (``P_TUNING``, SPEC.md 15.8): PEFT's folders load with PEFT's outputs, ours load in PEFT unchanged.

PEFT saves the prompt encoder's output (MLP or LSTM over the virtual-token embedding) as
``prompt_embeddings``; the encoder itself is not saved. Both encoders, on Llama and GPT-2.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from prompt_helpers import round_trip  # noqa: E402
from torch_helpers import assert_same_snapshot, fresh, snapshot  # noqa: E402


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_p_tuning_round_trip(request: pytest.FixtureRequest, arch: str, encoder: str, token_inputs: Any,
                             tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    from peft import PromptEncoderConfig

    base = request.getfixturevalue(arch)
    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16,
                                 encoder_reparameterization_type=encoder)
    diffs = round_trip(base, config, token_inputs, tmp_path, caplog)
    print(arch, encoder, diffs)


def test_saved_tensor_is_the_encoder_output(llama: Any, tmp_path: Any) -> None:
    """What the file holds: PEFT's encoder applied to its embedding, not the embedding (the spec's claim)."""
    from peft import PromptEncoderConfig
    from safetensors.torch import load_file
    from torch_helpers import peft_reference

    reference: Any = peft_reference(llama, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                               encoder_hidden_size=16), tmp_path)
    encoder = reference.prompt_encoder["default"]
    saved = load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"]
    with torch.no_grad():
        assert torch.equal(saved, encoder(torch.arange(3)[None])[0])
        assert not torch.allclose(saved, encoder.embedding.weight)


def test_fresh_p_tuning_is_refused(llama: Any) -> None:
    model = fresh(llama)
    before = snapshot(model)
    config = adapterspec.AdapterConfig.from_dict({"peft_type": "P_TUNING", "task_type": "CAUSAL_LM",
                                                  "num_virtual_tokens": 3})
    with pytest.raises(adapterspec.UnsupportedError, match="prompt encoder") as info:
        adapterspec.inject_adapter(model, config)
    assert info.value.pointer == "/peft_type"
    assert_same_snapshot(model, before)


def test_loaded_p_tuning_trains_and_saves_for_peft(llama: Any, token_inputs: Any, tmp_path: Any,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A loaded P-tuning prompt trains as it is used (the prompt itself; the base stays frozen); the file we
    save after a step loads in PEFT with our outputs."""
    from peft import PromptEncoderConfig
    from prompt_helpers import peft_loads
    from torch_helpers import assert_close, logits, peft_reference

    peft_reference(llama, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16),
                   tmp_path / "peft")
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "peft", trainable=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["_adapterspec_prompts.default"]
    before = next(p for n, p in model.named_parameters() if p.requires_grad).detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(**token_inputs, labels=token_inputs["input_ids"]).loss
    loss.backward()
    optimizer.step()
    after = next(p for n, p in model.named_parameters() if p.requires_grad)
    assert (after - before).abs().max() > 1e-4
    model.eval()
    adapterspec.save_adapter(model, tmp_path / "ours")
    loaded, said = peft_loads(llama, tmp_path / "ours", caplog)
    assert said == peft_loads(llama, tmp_path / "peft", caplog)[1]
    assert_close(logits(loaded, token_inputs), logits(model, token_inputs))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_with_projection_round_trip(request: pytest.FixtureRequest, arch: str, token_inputs: Any,
                                           tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Prefix tuning with ``prefix_projection`` is the same case (SPEC.md 4.1.4): PEFT saves the projection MLP's
    output, which loads like any prefix; a fresh one, which trains through the MLP, is refused."""
    from peft import PrefixTuningConfig

    base = request.getfixturevalue(arch)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
                                encoder_hidden_size=16)
    print(arch, round_trip(base, config, token_inputs, tmp_path, caplog))
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(adapterspec.UnsupportedError, match="prefix_projection") as info:
        adapterspec.inject_adapter(model, config.to_dict())
    assert info.value.pointer == "/prefix_projection"
    assert_same_snapshot(model, before)
