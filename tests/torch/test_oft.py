"""OFT and BOFT (SPEC.md 15.6, 15.7) exact against PEFT 0.21 in both directions, merge included; refusals typed.

Each case: a PEFT model with element-unique adapter weights is saved; ``adapterspec.load_adapter`` gives PEFT's
outputs on a fresh copy of the base; ``save_adapter`` writes byte-equal tensors that PEFT loads with nothing
missing or unexpected and the same outputs; merging gives PEFT's merged outputs and unmerging restores the weights.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from adapterspec.errors import UnsupportedError  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch_helpers import (  # noqa: E402
    assert_close,
    assert_same_snapshot,
    fresh,
    logits,
    peft_load,
    peft_reference,
    snapshot,
    unique_values,
)

LLAMA = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _fill(model: Any) -> None:
    """Element-unique rotations far from the identity, BOFT scales around 1."""
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(model.named_parameters())):
            if "boft_s" in name:
                param.copy_(unique_values(tuple(param.shape), index, around=1.0, scale=0.3))
            elif "oft_R" in name or "boft_R" in name:
                param.copy_(unique_values(tuple(param.shape), index, scale=0.3))


def _cases() -> list[Any]:
    from peft import BOFTConfig, OFTConfig

    return [
        pytest.param("llama", lambda: OFTConfig(r=0, oft_block_size=8, target_modules=LLAMA), id="llama-oft"),
        pytest.param("llama", lambda: OFTConfig(r=4, oft_block_size=0, target_modules=["k_proj", "o_proj"],
                                                num_cayley_neumann_terms=3), id="llama-oft-rank-3-terms"),
        pytest.param("llama", lambda: OFTConfig(r=0, oft_block_size=16, target_modules=["q_proj", "gate_proj"],
                                                use_cayley_neumann=False, block_share=True),
                     id="llama-oft-cayley-shared"),
        pytest.param("bert", lambda: OFTConfig(r=0, oft_block_size=4, target_modules=["query", "value", "dense"],
                                               task_type="SEQ_CLS", modules_to_save=["classifier"]),
                     id="bert-oft"),
        pytest.param("cnn", lambda: OFTConfig(r=0, oft_block_size=4, target_modules=["conv2", "head"]),
                     id="cnn-oft-conv1x1"),
        pytest.param("llama", lambda: BOFTConfig(boft_block_size=4, target_modules=LLAMA), id="llama-boft"),
        pytest.param("bert", lambda: BOFTConfig(boft_block_num=8, boft_block_size=0, task_type="SEQ_CLS",
                                                target_modules=["query", "value", "dense"],
                                                modules_to_save=["classifier"]), id="bert-boft"),
        pytest.param("cnn", lambda: BOFTConfig(boft_block_size=9, target_modules=["conv1"]), id="cnn-boft-conv3x3"),
        pytest.param("cnn", lambda: BOFTConfig(boft_block_size=4, target_modules=["conv2", "head"]),
                     id="cnn-boft-conv1x1"),
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
    reference = peft_reference(base, make_config(), tmp_path / "peft", fill=_fill)
    expected = _run(reference, kind, inputs)
    base_out = _run(base, kind, inputs)
    assert (expected - base_out).abs().max() > 1e-2, "the adapter must change the output for the test to mean anything"
    assert adapterspec.validate_adapter(tmp_path / "peft") == []

    # PEFT folder -> adapterspec
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_close(_run(model, kind, inputs), expected)
    with adapterspec.disabled_adapters(model):
        assert_close(_run(model, kind, inputs), base_out, atol=0)

    # adapterspec -> folder: byte-equal tensors, the same config
    adapterspec.save_adapter(model, tmp_path / "ours")
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(saved[key], tensor), key
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: v for k, v in ours_config.items() if k in peft_config} == peft_config

    # folder -> PEFT: no warning of its own, nothing missing or unexpected, the same outputs
    from peft.utils import get_peft_model_state_dict

    _, said_peft = peft_load(base, tmp_path / "peft", caplog)
    loaded, said_ours = peft_load(base, tmp_path / "ours", caplog)
    assert said_ours == said_peft
    state = get_peft_model_state_dict(loaded)
    assert sorted(state) == sorted(saved)
    for key, tensor in state.items():
        assert torch.equal(tensor, saved[key]), key
    assert_close(_run(loaded, kind, inputs), expected)

    # merge: PEFT's merged outputs; unmerge: the base weights back (OFT through a matrix inverse: its rounding)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    merged_expected = _run(reference, kind, inputs)
    adapterspec.merge_adapters(model)
    assert_close(_run(model, kind, inputs), merged_expected)
    assert_close(_run(model, kind, inputs), expected, atol=1e-4)  # merged equals unmerged up to the inversion
    adapterspec.unmerge_adapters(model)
    restored = {k.replace(".base_layer.", ".").replace(".original_module.", "."): v
                for k, v in model.state_dict().items()}
    for key, value in base.state_dict().items():
        assert_close(restored[key], value, atol=1e-5)
    assert_close(_run(model, kind, inputs), expected)


def _refused(base: Any, folder: Any, needle: str) -> UnsupportedError:
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as info:
        adapterspec.load_adapter(model, folder)
    assert needle in str(info.value)
    assert_same_snapshot(model, before)
    return info.value


@pytest.mark.parametrize(("make_config", "needle"), [
    pytest.param(lambda c: c.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj"], coft=True), "/coft",
                 id="coft"),
    pytest.param(lambda c: c.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj"], bias="all"), "/bias",
                 id="oft-bias"),
    pytest.param(lambda c: c.BOFTConfig(boft_block_size=4, target_modules=["q_proj"], bias="boft_only"), "/bias",
                 id="boft-bias"),
    pytest.param(lambda c: c.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj"]),
                 "/boft_n_butterfly_factor", id="boft-butterfly-factors"),
])
def test_unsupported_variants_are_refused(make_config: Any, needle: str, llama: Any, tmp_path: Any) -> None:
    peft_reference(llama, make_config(peft), tmp_path, fill=_fill)
    _refused(llama, tmp_path, needle)
    assert any(needle in str(e) for e in adapterspec.validate_adapter(tmp_path))


@pytest.mark.parametrize("make_config", [
    pytest.param(lambda c: c.OFTConfig(r=32, oft_block_size=0, target_modules=None), id="oft"),
    pytest.param(lambda c: c.BOFTConfig(boft_block_size=4, boft_block_num=0, target_modules=None), id="boft"),
])
def test_null_target_modules_take_peft_default_for_the_architecture(make_config: Any, llama: Any, token_inputs: Any,
                                                                    tmp_path: Any) -> None:
    """PEFT's own method_comparison config boft/llama-3.2-3B-default has ``target_modules: null``: PEFT fills
    its per-architecture table (OFT's and BOFT's copy LoRA's: llama -> q_proj, v_proj) and loads the folder.
    It was a TargetNotFoundError ("no module of the model matches target_modules=None")."""
    peft_reference(llama, make_config(peft), tmp_path, fill=_fill)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]  # PEFT writes the list it resolved
    path.write_text(json.dumps({**config, "target_modules": None}))  # as in the published config
    assert adapterspec.validate_adapter(tmp_path) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = logits(peft.PeftModel.from_pretrained(fresh(llama), str(tmp_path)).eval(), token_inputs)
    assert (expected - logits(llama, token_inputs)).abs().max() > 1e-2
    model = fresh(llama)
    modules = adapterspec.load_adapter(model, tmp_path)
    assert sorted(modules) == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert_close(logits(model, token_inputs), expected)


def test_oft_on_a_larger_conv_kernel_is_refused(cnn: Any, tmp_path: Any) -> None:
    """PEFT's OFT Conv2d forward (unfold, rotate, overlap-add fold) disagrees with its own merge for k > 1."""
    from peft import OFTConfig

    peft_reference(cnn, OFTConfig(r=0, oft_block_size=3, target_modules=["conv1"]), tmp_path, fill=_fill)
    error = _refused(cnn, tmp_path, "conv1")
    assert "kernel (3, 3)" in str(error)


def test_oft_and_lora_on_one_layer_refuse_to_run_together(llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    from peft import LoraConfig, OFTConfig

    peft_reference(llama, OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj"]), tmp_path / "oft", fill=_fill)
    peft_reference(llama, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "lora")
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "oft", "o")
    adapterspec.load_adapter(model, tmp_path / "lora", "l")
    before = snapshot(model)
    for names in (["o", "l"], ["l", "o"]):  # refused when activated (it raised at the forward), nothing changed
        with pytest.raises(UnsupportedError, match="cannot run together") as info:
            adapterspec.set_active_adapters(model, names)
        assert info.value.key == "model.layers.0.self_attn.q_proj" and "['o']" in info.value.message
        assert_same_snapshot(model, before)
    assert logits(model, token_inputs).shape == (2, 9, 128)


def test_two_oft_adapters_compose_like_peft(llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    """Active together, OFT adapters rotate the input one after the other, BOFT ones multiply (PEFT's order)."""
    from peft import BOFTConfig, OFTConfig

    for config, salt in ((OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"]), 0),
                         (BOFTConfig(boft_block_size=8, target_modules=["q_proj", "v_proj"]), 1)):
        reference = peft_reference(llama, config, tmp_path / f"a{salt}", fill=_fill)
        reference.add_adapter("b", config)
        _fill_named(reference, "b", salt + 7)
        reference.save_pretrained(str(tmp_path / f"ab{salt}"))
        reference.base_model.set_adapter(["default", "b"])
        expected = logits(reference, token_inputs)
        model = fresh(llama)
        adapterspec.load_adapter(model, tmp_path / f"ab{salt}")
        adapterspec.load_adapter(model, tmp_path / f"ab{salt}" / "b", "b")
        adapterspec.set_active_adapters(model, ["default", "b"])
        assert_close(logits(model, token_inputs), expected)


def _fill_named(model: Any, adapter: str, salt: int) -> None:
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(model.named_parameters())):
            if f".{adapter}" in name and ("oft_R" in name or "boft_" in name):
                around = 1.0 if "boft_s" in name else 0.0
                param.copy_(unique_values(tuple(param.shape), salt + index, around=around, scale=0.3))


@pytest.mark.parametrize("config", [
    pytest.param({"peft_type": "OFT", "r": 0, "oft_block_size": 8, "target_modules": ["q_proj", "down_proj"]},
                 id="oft"),
    pytest.param({"peft_type": "OFT", "r": 4, "oft_block_size": 0, "target_modules": ["v_proj"], "block_share": True,
                  "use_cayley_neumann": False}, id="oft-shared-cayley"),
    pytest.param({"peft_type": "BOFT", "boft_block_size": 4, "target_modules": ["q_proj", "down_proj"]}, id="boft"),
])
def test_inject_starts_at_the_identity_and_trains_what_peft_trains(config: dict[str, Any], llama: Any,
                                                                   token_inputs: Any) -> None:
    from peft import get_peft_model
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(fresh(llama), PEFT_TYPE_TO_CONFIG_MAPPING[config["peft_type"]](
            **{k: v for k, v in config.items() if k != "peft_type"}))
    model = fresh(llama)
    adapterspec.inject_adapter(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == reference.get_nb_trainable_parameters()[0]
    assert_close(logits(model, token_inputs), logits(llama, token_inputs), atol=1e-6)
    noisy = fresh(llama)
    adapterspec.inject_adapter(noisy, config | {"init_weights": False})
    assert (logits(noisy, token_inputs) - logits(llama, token_inputs)).abs().max() > 1e-3


def _grads_by_key(model: Any, peft_names: bool) -> dict[str, Any]:
    """Adapter gradients keyed ``<module path>.<spec parameter>`` for PEFT's model and ours alike."""
    if peft_names:
        return {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                for n, p in model.named_parameters() if p.requires_grad and ("oft_R" in n or "boft_" in n)}
    from adapterspec_torch import AdapterLayer

    grads: dict[str, Any] = {f"{path}.{param}": tensor.grad for path, module in model.named_modules()
                             if isinstance(module, AdapterLayer)
                             for param, tensor in module.adapter_params("default").items()}
    return grads


@pytest.mark.parametrize("make_config", [
    pytest.param(lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "up_proj"]), id="oft"),
    pytest.param(lambda: peft.BOFTConfig(boft_block_size=8, target_modules=["q_proj", "up_proj"]), id="boft"),
])
def test_gradients_equal_peft(make_config: Any, llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    reference = peft_reference(llama, make_config(), tmp_path, fill=_fill).train()
    reference(**token_inputs).logits.square().mean().backward()
    expected = _grads_by_key(reference, True)
    model = fresh(llama).train()
    adapterspec.load_adapter(model, tmp_path, trainable=True)
    model(**token_inputs).logits.square().mean().backward()
    got = _grads_by_key(model, False)
    assert sorted(got) == sorted(expected) and len(got) >= 4
    for key, grad in expected.items():
        assert grad is not None and grad.abs().max() > 0, key
        # the same operations as PEFT's: measured equal; 1e-5 of the largest gradient allows another BLAS order
        assert_close(got[key], grad, atol=1e-5 * float(grad.abs().max()))


@pytest.mark.parametrize("config", [
    pytest.param({"peft_type": "OFT", "r": 0, "oft_block_size": 8, "target_modules": ["q_proj", "up_proj"]}, id="oft"),
    pytest.param({"peft_type": "BOFT", "boft_block_size": 8, "target_modules": ["q_proj", "up_proj"]}, id="boft"),
])
def test_an_injected_adapter_saved_loads_in_peft_silently(config: dict[str, Any], llama: Any, token_inputs: Any,
                                                           tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Written without a PEFT folder to copy from: PEFT loads it (an OFT config says which PEFT's series it uses)."""
    model = fresh(llama)
    adapterspec.inject_adapter(model, config | {"init_weights": False})
    expected = logits(model, token_inputs)
    adapterspec.save_adapter(model, tmp_path)
    loaded, said = peft_load(llama, tmp_path, caplog)
    assert not [m for m in said if "OFT" in m or "cayley" in m.lower() or "Unexpected" in m], said
    assert_close(logits(loaded, token_inputs), expected)


def test_oft_on_an_embedding_is_refused(llama: Any, tmp_path: Any) -> None:
    """PEFT 0.21 rotates embedding outputs (oft_embedding_R); adapterspec 1.1 does not define it (SPEC.md 15.6)."""
    from peft import OFTConfig

    peft_reference(llama, OFTConfig(r=0, oft_block_size=8, target_modules=["embed_tokens", "q_proj"]), tmp_path,
                   fill=_fill)
    model = fresh(llama)
    before = snapshot(model)
    with pytest.raises(adapterspec.AdapterSpecError) as info:
        adapterspec.load_adapter(model, tmp_path)
    assert "embed_tokens" in str(info.value) and "oft_embedding_R" in str(info.value)
    assert_same_snapshot(model, before)


def test_boft_dropout_while_training_is_peft_s(llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    """boft_dropout replaces random blocks by the identity while training, drawing PEFT's random numbers in PEFT's
    order: with one seed both models drop the same blocks; evaluation uses every block."""
    config = peft.BOFTConfig(boft_block_size=4, boft_dropout=0.5, target_modules=["q_proj", "up_proj"])
    reference = peft_reference(llama, config, tmp_path, fill=_fill)
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path)
    assert_close(logits(model, token_inputs), logits(reference, token_inputs))
    reference.train()
    model.train()
    outputs = []
    for run in (reference, model):
        torch.manual_seed(7)
        outputs.append(logits(run, token_inputs))
    assert_close(outputs[1], outputs[0])
    torch.manual_seed(8)
    assert (logits(model, token_inputs) - outputs[1]).abs().max() > 1e-4  # another draw drops other blocks


def test_docstring_examples() -> None:
    import doctest

    from adapterspec_torch import oft

    result = doctest.testmod(oft, optionflags=doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL)
    assert result.failed == 0 and result.attempted >= 10


@pytest.mark.parametrize("make_config", [
    pytest.param(lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "up_proj"]), id="oft"),
    pytest.param(lambda: peft.BOFTConfig(boft_block_size=8, target_modules=["q_proj", "up_proj"]), id="boft"),
])
def test_bfloat16_base_equals_peft_unmerged_and_merged(make_config: Any, llama: Any, token_inputs: Any,
                                                      tmp_path: Any) -> None:
    """PEFT's dtype policy (fp32 adapter on a bf16 base; the casts around the rotation): the same bf16 outputs."""
    from peft import PeftModel

    peft_reference(llama, make_config(), tmp_path, fill=_fill)
    base = fresh(llama).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(fresh(base), str(tmp_path)).eval()
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    assert {p.dtype for n, p in model.named_parameters() if "adapter_weights" in n} == {torch.float32}
    assert_close(logits(model, token_inputs).float(), logits(reference, token_inputs).float(), atol=0)  # measured 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model)
    assert_close(logits(model, token_inputs).float(), logits(reference, token_inputs).float(), atol=0)
