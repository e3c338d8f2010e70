"""RoAd (SPEC.md 17.1) exact against PEFT 0.21 in both directions; merge/unmerge as PEFT; refusals typed.

Each case: a PEFT RoAd model with element-unique angles and scales is saved; ``adapterspec.load_adapter`` gives
PEFT's outputs bit for bit; ``save_adapter`` writes byte-equal tensors and the same config, which PEFT loads with
nothing missing or unexpected and no warning of its own; merging gives PEFT's merged weights bit for bit, and
unmerging PEFT's unmerged weights bit for bit (an fp32 matrix inverse: the base back within rounding, not exactly).
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
from adapterspec.errors import (  # noqa: E402
    ConfigError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnsupportedError,
)
from safetensors.torch import load_file, save_file  # noqa: E402
from torch_helpers import (  # noqa: E402
    assert_close,
    assert_peft_loads_ours,
    assert_same_snapshot,
    assert_saved_as_peft_saved,
    fresh,
    logits,
    peft_load,
    snapshot,
    unique_values,
)

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _fill(model: Any) -> None:
    """Element-unique angles (around 0) and scales (around 1): a swapped half, a transpose or a wrong key shows."""
    with torch.no_grad():
        for index, (name, tensor) in enumerate(sorted(model.named_parameters())):
            if "road_theta" in name:
                tensor.copy_(unique_values(tuple(tensor.shape), index, scale=0.6))
            elif "road_alpha" in name:
                tensor.copy_(unique_values(tuple(tensor.shape), index, around=1.0, scale=0.3))


def _peft_folder(base: Any, config: Any, folder: Path) -> Any:
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(fresh(base), config)
        _fill(model)
        model.eval()
        model.save_pretrained(str(folder))
    return model


def _weights(model: Any) -> dict[str, Any]:
    """The base weights and biases of the adapted layers, under their base names."""
    return {k.replace(".base_layer.", ".").replace(".original_module.", "."): v.detach().clone()
            for k, v in model.state_dict().items()
            if "road_" not in k and ".modules_to_save." not in k and (k.endswith(".weight") or k.endswith(".bias"))}


def _cases() -> list[Any]:
    from peft import RoadConfig

    return [
        pytest.param("llama", lambda: RoadConfig(variant="road_1", group_size=8, target_modules=LLAMA), id="road_1"),
        pytest.param("llama", lambda: RoadConfig(variant="road_2", group_size=16, target_modules=LLAMA), id="road_2"),
        pytest.param("llama", lambda: RoadConfig(variant="road_4", group_size=4, target_modules=LLAMA), id="road_4"),
        pytest.param("bert", lambda: RoadConfig(variant="road_4", group_size=8, target_modules=["query", "value", "dense"],
                                                task_type="SEQ_CLS", modules_to_save=["classifier"]),
                     id="bert-bias-road_4"),
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
    assert adapterspec.validate_adapter(tmp_path / "peft") == []

    # PEFT folder -> adapterspec: PEFT's outputs bit for bit (the same elementwise operations in the same order)
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert torch.equal(logits(model, inputs), expected)
    with adapterspec.disabled_adapters(model):
        assert_close(logits(model, inputs), base_out, atol=0)

    # adapterspec -> folder -> PEFT: byte-equal tensors, the same config, PEFT's outputs
    adapterspec.save_adapter(model, tmp_path / "ours")
    assert_saved_as_peft_saved(tmp_path / "peft", tmp_path / "ours")
    assert_peft_loads_ours(base, tmp_path / "peft", tmp_path / "ours", caplog, inputs, expected)

    # merge: PEFT's merged weights (and biases) bit for bit; unmerge: PEFT's unmerged ones bit for bit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model)
    theirs, ours = _weights(reference.base_model.model), _weights(model)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    assert_close(logits(model, inputs), logits(reference, inputs), atol=0)
    assert_close(logits(model, inputs), expected)
    reference.unmerge_adapter()
    adapterspec.unmerge_adapters(model)
    theirs, ours = _weights(reference.base_model.model), _weights(model)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    original = _weights(base)
    for key, value in original.items():
        assert_close(ours[key], value, atol=1e-6)  # PEFT's inverse: within rounding, not bit-exact
    assert torch.equal(logits(model, inputs), logits(reference, inputs))

    adapterspec.delete_adapter(model, "default")
    assert sorted(model.state_dict()) == sorted(base.state_dict())


def test_two_road_adapters_compose_and_merge_as_peft(llama: Any, token_inputs: Any, tmp_path: Path) -> None:
    """Two active RoAd adapters rotate one after the other in the active order (PEFT's loop), merged too."""
    from peft import PeftModel, RoadConfig

    _peft_folder(llama, RoadConfig(variant="road_2", group_size=8, target_modules=["q_proj", "v_proj"]), tmp_path / "a")
    _peft_folder(llama, RoadConfig(variant="road_1", group_size=4, target_modules=["v_proj", "o_proj"]), tmp_path / "b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(fresh(llama), str(tmp_path / "a"), adapter_name="a").eval()
        reference.load_adapter(str(tmp_path / "b"), adapter_name="b")
        reference.base_model.set_adapter(["a", "b"])
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "a", "a")
    adapterspec.load_adapter(model, tmp_path / "b", "b")
    adapterspec.set_active_adapters(model, ["a", "b"])
    assert torch.equal(logits(model, token_inputs), logits(reference, token_inputs))
    adapterspec.set_active_adapters(model, ["b"])
    reference.set_adapter("b")
    assert torch.equal(logits(model, token_inputs), logits(reference, token_inputs))
    adapterspec.set_active_adapters(model, ["a", "b"])
    reference.base_model.set_adapter(["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model, ["a", "b"])
    assert torch.equal(logits(model, token_inputs), logits(reference, token_inputs))


def test_road_with_another_method_on_one_layer_is_refused(llama: Any, tmp_path: Path) -> None:
    """PEFT holds one method per layer and its PeftMixedModel takes no RoAd: activating both is refused unchanged."""
    from peft import LoraConfig, RoadConfig

    _peft_folder(llama, RoadConfig(variant="road_1", group_size=8, target_modules=["q_proj"]), tmp_path / "road")
    _peft_folder(llama, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "lora")
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "road", "road")
    adapterspec.load_adapter(model, tmp_path / "lora", "lora")
    adapterspec.set_active_adapters(model, ["road"])
    with pytest.raises(UnsupportedError, match="ROAD"):
        adapterspec.set_active_adapters(model, ["road", "lora"])
    assert adapterspec.active_adapters(model) == ["road"]
    with pytest.raises(UnsupportedError, match="ROAD"):
        adapterspec.merge_adapters(model, ["road", "lora"])


def test_new_adapter_is_peft_init_and_trains_peft_parameters(llama: Any, token_inputs: Any) -> None:
    """Injected: theta zeros and alpha ones (the identity, PEFT's init); init_weights false draws PEFT's normals from
    torch's generator in PEFT's order; the trainable parameters are PEFT's, and a step changes the output."""
    from peft import RoadConfig, get_peft_model

    config = {"peft_type": "ROAD", "variant": "road_4", "group_size": 8, "target_modules": ["q_proj", "up_proj"]}
    model = fresh(llama)
    adapterspec.inject_adapter(model, config, "default", trainable=True)
    assert torch.equal(logits(model, token_inputs), logits(llama, token_inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(fresh(llama), RoadConfig(variant="road_4", group_size=8,
                                                            target_modules=["q_proj", "up_proj"]))
    ours = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    theirs = sorted(n for n, p in reference.named_parameters() if p.requires_grad)
    assert len(ours) == len(theirs) == 8  # theta and alpha of q_proj and up_proj in both layers
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        sum(p.numel() for p in reference.parameters() if p.requires_grad)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=50.0)
    model.train()
    out = model(**token_inputs, labels=token_inputs["input_ids"])
    out.loss.backward()
    optimizer.step()
    model.eval()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters() if p.requires_grad)
    assert (logits(model, token_inputs) - logits(llama, token_inputs)).abs().max() > 1e-3

    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(fresh(llama), RoadConfig(variant="road_2", group_size=8, init_weights=False,
                                                            target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(5)
    model = fresh(llama)
    adapterspec.inject_adapter(model, {"peft_type": "ROAD", "variant": "road_2", "group_size": 8,
                                       "init_weights": False, "target_modules": ["q_proj", "v_proj"]}, "default")
    from peft.utils import get_peft_model_state_dict

    mine = adapterspec.extract_adapter(model, "default").load_tensors("pt")
    peft_state = get_peft_model_state_dict(reference)
    assert sorted(mine) == sorted(peft_state)
    for key, tensor in peft_state.items():
        assert torch.equal(mine[key], tensor), key


def _refused(base: Any, folder: Path, error: type[Exception], needle: str) -> None:
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(error) as info:
        adapterspec.load_adapter(model, folder)
    assert needle in str(info.value)
    assert_same_snapshot(model, before)


def _edit(folder: Path, change: Any) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


Q = "base_model.model.model.layers.0.self_attn.q_proj"


def test_tensor_problems_are_refused_unchanged(llama: Any, tmp_path: Path) -> None:
    from peft import RoadConfig

    config = RoadConfig(variant="road_2", group_size=8, target_modules=["q_proj", "v_proj"])
    cases: list[tuple[Any, type[Exception], str, bool]] = [
        (lambda t: t.pop(f"{Q}.road_alpha"), MissingTensorError, f"{Q}.road_alpha", True),
        (lambda t: t.update({f"{Q}.road_gamma": t[f"{Q}.road_alpha"].clone()}), UnexpectedTensorError, "road_gamma", True),
        (lambda t: t.update({f"{Q}.road_alpha": t[f"{Q}.road_alpha"][:60].contiguous()}), ShapeMismatchError,
         f"{Q}.road_alpha", True),
        (lambda t: t.update({f"{Q}.road_alpha": t[f"{Q}.road_alpha"].reshape(8, 8).contiguous()}), ShapeMismatchError,
         f"{Q}.road_alpha", True),
        # a length the variant allows but not this layer's out features (64): only the model tells
        (lambda t: t.update({f"{Q}.road_alpha": t[f"{Q}.road_alpha"][:32].contiguous(),
                             f"{Q}.road_theta": t[f"{Q}.road_theta"][:32].contiguous()}), ShapeMismatchError,
         f"{Q}.road_", False),
    ]
    for index, (change, error, needle, seen_without_model) in enumerate(cases):
        folder = tmp_path / str(index)
        _peft_folder(llama, config, folder)
        _edit(folder, change)
        problems = adapterspec.validate_adapter(folder)
        assert any(needle in str(e) for e in problems) == seen_without_model, (index, problems)
        _refused(llama, folder, error, needle)


def test_group_size_not_dividing_the_layer_is_refused_naming_the_field(llama: Any, tmp_path: Path) -> None:
    """group_size 48 does not divide q_proj's 64 outputs: PEFT raises, adapterspec refuses with /group_size."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "ROAD", "variant": "road_2",
                                                               "group_size": 48, "target_modules": ["q_proj"]}))
    save_file({f"{Q}.road_theta": torch.zeros(48), f"{Q}.road_alpha": torch.ones(48)},
              tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    _refused(llama, tmp_path, UnsupportedError, "/group_size")


def test_config_values_peft_refuses_are_config_errors() -> None:
    for bad in ({"variant": "road_3"}, {"group_size": 7}, {"group_size": 0}):
        with pytest.raises(ConfigError):
            adapterspec.AdapterConfig.from_dict({"peft_type": "ROAD", "target_modules": ["q"], **bad})


def test_layers_peft_does_not_adapt_are_refused(gpt2: Any, llama: Any, tmp_path: Path) -> None:
    """PEFT's RoAd adapts nn.Linear only: GPT-2's Conv1D and an embedding are refused naming the module."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "ROAD", "variant": "road_2",
                                                               "group_size": 8, "target_modules": ["c_attn"]}))
    tensors = {f"base_model.model.transformer.h.{i}.attn.c_attn.{p}": torch.ones(192) for i in range(2)
               for p in ("road_theta", "road_alpha")}
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    _refused(gpt2, tmp_path, UnsupportedError, "c_attn")
    model = fresh(llama)
    with pytest.raises(UnsupportedError, match="embed_tokens"):
        adapterspec.inject_adapter(model, {"peft_type": "ROAD", "group_size": 8, "target_modules": ["embed_tokens"]})


def test_singular_unmerge_is_refused_with_the_weights_unchanged(llama: Any, token_inputs: Any, tmp_path: Path) -> None:
    """A zero scale makes R singular: PEFT's unmerge fails (torch.linalg.inv); adapterspec refuses it typed and
    leaves the merged weights as they are."""
    from peft import RoadConfig

    _peft_folder(llama, RoadConfig(variant="road_1", group_size=8, target_modules=["q_proj"]), tmp_path)
    _edit(tmp_path, lambda t: t[f"{Q}.road_alpha"].__setitem__(3, 0.0))
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path)
    adapterspec.merge_adapters(model)
    before = snapshot(model)
    with pytest.raises(UnsupportedError, match="singular"):
        adapterspec.unmerge_adapters(model)
    assert_same_snapshot(model, before)


def test_null_target_modules_take_peft_default(llama: Any, token_inputs: Any, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """target_modules null: PEFT's RoAd table for llama (q_proj, v_proj), as PEFT resolves it (SPEC.md 14.2)."""
    from peft import RoadConfig

    _peft_folder(llama, RoadConfig(group_size=8, target_modules=["q_proj", "v_proj"]), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"target_modules": None}))
    reference, _ = peft_load(llama, tmp_path, caplog)
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path)
    assert torch.equal(logits(model, token_inputs), logits(reference, token_inputs))


def test_bf16_model_equals_peft_unmerged_and_merged(llama: Any, token_inputs: Any, tmp_path: Path) -> None:
    """On a bfloat16 model the adapter runs in float32 (the output cast up, rotated, cast back) and merges R in
    bfloat16, as PEFT: the outputs are PEFT's bit for bit."""
    from peft import PeftModel, RoadConfig

    base = fresh(llama).to(torch.bfloat16)
    _peft_folder(base, RoadConfig(variant="road_4", group_size=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                 tmp_path)
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
