"""VB-LoRA (SPEC.md 17.4) exact against PEFT 0.21 in both saved forms; the vector bank stored once; refusals typed.

Each case: a PEFT VB-LoRA model with element-unique logits and bank is saved (logits, or with
``save_only_topk_weights`` their top-k indices and weights); ``adapterspec.load_adapter`` gives the outputs of PEFT's
own ``PeftModel`` of that folder; ``save_adapter`` writes byte-equal tensors (``base_model.vblora_vector_bank``
once, the indices in PEFT's integer dtype) and the same config, which PEFT loads with nothing missing or unexpected
and the same outputs; merging gives PEFT's merged outputs and unmerging restores the base weights.
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
    DTypeMismatchError,
    MissingTensorError,
    ShapeMismatchError,
    TensorError,
    UnexpectedTensorError,
    UnsupportedError,
)
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
BANK = "base_model.vblora_vector_bank"


def _fill(model: Any) -> None:
    """Element-unique logits (spread: distinct top-k) and bank values: a transpose or a swapped key shows."""
    with torch.no_grad():
        for index, (name, tensor) in enumerate(sorted(model.named_parameters())):
            if "vblora_logits" in name:
                tensor.copy_(unique_values(tuple(tensor.shape), index, scale=2.0))
            elif "vblora_vector_bank" in name:
                tensor.copy_(unique_values(tuple(tensor.shape), index, scale=0.4))


def _peft_folder(base: Any, config: Any, folder: Path) -> Any:
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(fresh(base), config)
        _fill(model)
        model.eval()
        model.save_pretrained(str(folder))
    return model


def _config(**kwargs: Any) -> Any:
    from peft import VBLoRAConfig

    return VBLoRAConfig(**kwargs)


def _cases() -> list[Any]:
    return [
        pytest.param("llama", dict(r=3, num_vectors=12, vector_length=16, topk=3, target_modules=LLAMA), id="llama"),
        pytest.param("llama", dict(r=3, num_vectors=300, vector_length=16, topk=3, target_modules=LLAMA,
                                   save_only_topk_weights=True), id="llama-topk-int16"),
        pytest.param("gpt2", dict(r=2, num_vectors=10, vector_length=16, topk=2, target_modules=GPT2,
                                  save_only_topk_weights=True), id="gpt2-conv1d-topk"),
        pytest.param("gpt2", dict(r=2, num_vectors=10, vector_length=32, topk=1, target_modules=GPT2),
                     id="gpt2-conv1d-top1"),
        pytest.param("bert", dict(r=2, num_vectors=8, vector_length=32, topk=2, target_modules=["query", "value", "dense"],
                                  task_type="SEQ_CLS", modules_to_save=["classifier"]), id="bert"),
    ]


@pytest.mark.parametrize(("kind", "fields"), _cases())
def test_peft_folder_roundtrip(kind: str, fields: dict[str, Any], request: pytest.FixtureRequest, tmp_path: Path,
                               caplog: pytest.LogCaptureFixture) -> None:
    base = request.getfixturevalue(kind)
    inputs = request.getfixturevalue("token_inputs")
    _peft_folder(base, _config(**fields), tmp_path / "peft")
    reference, said_peft = peft_load(base, tmp_path / "peft", caplog)  # PEFT's own model of the folder
    expected = logits(reference, inputs)
    base_out = logits(base, inputs)
    assert (expected - base_out).abs().max() > 1e-2, "the adapter must change the output for the test to mean anything"
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert BANK in original
    assert any(k.endswith("_topk_indices") for k in original) == bool(fields.get("save_only_topk_weights"))
    assert adapterspec.validate_adapter(tmp_path / "peft") == []

    # PEFT folder -> adapterspec
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_close(logits(model, inputs), expected)
    with adapterspec.disabled_adapters(model):
        assert_close(logits(model, inputs), base_out, atol=0)

    # adapterspec -> folder: byte-equal tensors (dtypes too), the same config
    adapterspec.save_adapter(model, tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(original)
    for key, tensor in original.items():
        assert saved[key].dtype == tensor.dtype and torch.equal(saved[key], tensor), key
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: v for k, v in ours_config.items() if k in peft_config} == peft_config

    # folder -> PEFT: no warning of its own, the same outputs
    loaded, said_ours = peft_load(base, tmp_path / "ours", caplog)
    assert said_ours == said_peft
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

    # deleting the adapter takes its shared bank off the model
    adapterspec.delete_adapter(model, "default")
    assert sorted(model.state_dict()) == sorted(base.state_dict())


def test_a_new_adapter_is_peft_init_and_trains_peft_parameters(llama: Any) -> None:
    """Injected without a file under the same torch seed, the bank and logits are PEFT's bit for bit (torch's global
    generator, PEFT's order); trainable parameters are PEFT's (bank and logits)."""
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    fields = dict(r=2, num_vectors=8, vector_length=16, topk=2, target_modules=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(fresh(llama), _config(**fields))
    theirs = get_peft_model_state_dict(reference)
    torch.manual_seed(11)
    model = fresh(llama)
    adapterspec.inject_adapter(model, {"peft_type": "VBLORA", **fields}, "default", trainable=True)
    ours = adapterspec.extract_adapter(model, "default").load_tensors("pt")
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in reference.parameters() if p.requires_grad)


def test_two_adapters_switch_and_run_together(llama: Any, token_inputs: Any, tmp_path: Path) -> None:
    """Each adapter keeps its own bank; switching gives each one's PEFT outputs."""
    from peft import PeftModel

    fields = dict(r=2, num_vectors=8, vector_length=16, topk=2, target_modules=["q_proj", "v_proj"])
    _peft_folder(llama, _config(**fields), tmp_path / "a")
    _peft_folder(llama, _config(**fields, save_only_topk_weights=True), tmp_path / "b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(fresh(llama), str(tmp_path / "a"), adapter_name="a").eval()
        reference.load_adapter(str(tmp_path / "b"), adapter_name="b")
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "a", adapter_name="a")
    adapterspec.load_adapter(model, tmp_path / "b", adapter_name="b")
    for name in ("a", "b"):
        reference.set_adapter(name)
        adapterspec.set_active_adapters(model, [name])
        assert_close(logits(model, token_inputs), logits(reference, token_inputs))
    reference.base_model.set_adapter(["a", "b"])
    adapterspec.set_active_adapters(model, ["a", "b"])
    assert_close(logits(model, token_inputs), logits(reference, token_inputs))


def test_vblora_with_lora_on_one_layer_adds_both_terms(llama: Any, token_inputs: Any, tmp_path: Path) -> None:
    """PEFT's PeftMixedModel takes no VB-LoRA: its reference is the VB-LoRA merged into the base (merge_and_unload)
    under the LoRA adapter -- the sum of the two added terms (SPEC.md 8.9)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    _small(llama, tmp_path / "a")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(fresh(llama), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                target_modules=["q_proj"])).save_pretrained(str(tmp_path / "l"))
        merged = PeftModel.from_pretrained(fresh(llama), str(tmp_path / "a")).merge_and_unload()
        reference = PeftModel.from_pretrained(merged, str(tmp_path / "l")).eval()
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "a", adapter_name="a")
    adapterspec.load_adapter(model, tmp_path / "l", adapter_name="l")
    adapterspec.set_active_adapters(model, ["a", "l"])
    assert_close(logits(model, token_inputs), logits(reference, token_inputs))


def _refused(base: Any, folder: Path, error: type[Exception], needle: str, **kwargs: Any) -> None:
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(error) as info:
        adapterspec.load_adapter(model, folder, **kwargs)
    assert needle in str(info.value)
    assert_same_snapshot(model, before)


def _edit(folder: Path, change: Any) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


def _small(llama: Any, folder: Path, **extra: Any) -> None:
    _peft_folder(llama, _config(r=2, num_vectors=8, vector_length=16, topk=2, target_modules=["q_proj", "v_proj"],
                                **extra), folder)


def test_bias_is_refused_naming_the_field(llama: Any, tmp_path: Path) -> None:
    _small(llama, tmp_path, bias="vblora_only")
    _refused(llama, tmp_path, UnsupportedError, "/bias")


def test_training_a_topk_adapter_is_refused(llama: Any, tmp_path: Path) -> None:
    """PEFT raises at the first training forward ('Found infinity values'); adapterspec refuses trainable upfront."""
    _small(llama, tmp_path, save_only_topk_weights=True)
    _refused(llama, tmp_path, UnsupportedError, "/save_only_topk_weights", trainable=True)
    with pytest.raises(UnsupportedError, match="/save_only_topk_weights"):
        adapterspec.inject_adapter(fresh(llama), {"peft_type": "VBLORA", "target_modules": ["q_proj"], "r": 2,
                                                  "num_vectors": 8, "vector_length": 16,
                                                  "save_only_topk_weights": True}, "default")


def test_a_missing_bank_is_refused(llama: Any, tmp_path: Path) -> None:
    _small(llama, tmp_path)
    _edit(tmp_path, lambda t: t.pop(BANK))
    assert any(BANK in str(e) for e in adapterspec.validate_adapter(tmp_path))
    _refused(llama, tmp_path, MissingTensorError, BANK)


def test_a_bank_of_another_shape_is_refused(llama: Any, tmp_path: Path) -> None:
    _small(llama, tmp_path)
    _edit(tmp_path, lambda t: t.update({BANK: t[BANK].T.contiguous()}))  # a transposed bank
    assert any(BANK in str(e) for e in adapterspec.validate_adapter(tmp_path))
    _refused(llama, tmp_path, ShapeMismatchError, BANK)


def test_swapped_logits_are_refused(llama: Any, tmp_path: Path) -> None:
    """q_proj's logits_A is [2, 4, 8], logits_B [4, 2, 8]: swapped, their rank axes disagree with r."""
    _peft_folder(llama, _config(r=2, num_vectors=8, vector_length=16, topk=2, target_modules=["q_proj"]), tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.vblora_logits_"

    def swap(t: dict[str, Any]) -> None:
        t[key + "A"], t[key + "B"] = t[key + "B"], t[key + "A"]
    _edit(tmp_path, swap)
    assert any(key in str(e) for e in adapterspec.validate_adapter(tmp_path))
    _refused(llama, tmp_path, ShapeMismatchError, key)


def test_the_other_form_and_wrong_index_dtype_are_refused(llama: Any, tmp_path: Path) -> None:
    _small(llama, tmp_path / "full")
    config = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    (tmp_path / "full" / "adapter_config.json").write_text(json.dumps(config | {"save_only_topk_weights": True}))
    _refused(llama, tmp_path / "full", UnexpectedTensorError, "save_only_topk_weights")
    _small(llama, tmp_path / "topk", save_only_topk_weights=True)
    index = "base_model.model.model.layers.0.self_attn.q_proj.vblora_logits_A_topk_indices"
    _edit(tmp_path / "topk", lambda t: t.update({index: t[index].to(torch.int64)}))
    errors = adapterspec.validate_adapter(tmp_path / "topk")
    assert any(isinstance(e, DTypeMismatchError) and e.key == index for e in errors)
    _refused(llama, tmp_path / "topk", DTypeMismatchError, index)


@pytest.mark.parametrize(("value", "needle"), [(8, "outside [0, num_vectors=8)"), (255, "index 255"),
                                               ("repeat", "repeats a top-k index beside another")])
def test_topk_indices_out_of_range_or_repeated_are_refused(llama: Any, tmp_path: Path, value: Any,
                                                           needle: str) -> None:
    """PEFT's loader fails on an index past the bank (scatter); torch would fail at the first forward, a clamping
    gather compute another mix: refused at load naming the key, the model unchanged; validate reports it too. A
    row repeating an index beside another (topk 3): PEFT's scatter keeps one of the repeated weights."""
    _peft_folder(llama, _config(r=2, num_vectors=8, vector_length=16, topk=3, target_modules=["q_proj", "v_proj"],
                                save_only_topk_weights=True), tmp_path)
    index = "base_model.model.model.layers.1.self_attn.v_proj.vblora_logits_B_topk_indices"

    def change(t: dict[str, Any]) -> None:
        if value == "repeat":
            t[index][0, 1, 1] = t[index][0, 1, 0]
        else:
            t[index][-1, -1, -1] = value
    _edit(tmp_path, change)
    errors = adapterspec.validate_adapter(tmp_path)
    assert [(type(e), e.key) for e in errors] == [(TensorError, index)] and needle in str(errors[0])
    _refused(llama, tmp_path, TensorError, needle)
    _refused(llama, tmp_path, TensorError, index)


def test_a_row_of_one_repeated_index_loads_as_peft(llama: Any, token_inputs: Any, tmp_path: Path) -> None:
    """topk 2, a row [i, i]: PEFT's loader keeps one weight, its softmax alone 1: the mix is vector i, as the stored
    weights' (summing to 1). Valid; the logits are PEFT's."""
    from peft import PeftModel

    _small(llama, tmp_path, save_only_topk_weights=True)
    index = "base_model.model.model.layers.1.self_attn.v_proj.vblora_logits_B_topk_indices"
    _edit(tmp_path, lambda t: t[index][0, 1].fill_(int(t[index][0, 1, 0])))
    assert adapterspec.validate_adapter(tmp_path) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(fresh(llama), str(tmp_path)).eval()
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path)
    assert_close(logits(model, token_inputs), logits(reference, token_inputs))


def test_vector_length_not_dividing_a_layer_is_refused(llama: Any, tmp_path: Path) -> None:
    """PEFT refuses in/out features not divisible by vector_length; so does adapterspec, naming the field."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "VBLORA", "r": 2, "num_vectors": 4,
                                                               "vector_length": 48, "target_modules": ["q_proj"]}))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{key}.vblora_logits_A": torch.ones(2, 1, 4), f"{key}.vblora_logits_B": torch.ones(1, 2, 4),
               BANK: torch.ones(4, 48)}, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    _refused(llama, tmp_path, UnsupportedError, "/vector_length")


def test_embedding_targets_are_refused_as_in_peft(llama: Any, tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "VBLORA", "r": 2, "num_vectors": 4,
                                                               "vector_length": 16,
                                                               "target_modules": ["embed_tokens"]}))
    key = "base_model.model.model.embed_tokens"
    save_file({f"{key}.vblora_logits_A": torch.ones(2, 8, 4), f"{key}.vblora_logits_B": torch.ones(4, 2, 4),
               BANK: torch.ones(4, 16)}, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    _refused(llama, tmp_path, UnsupportedError, "model.embed_tokens")


def test_bf16_model_unmerged_and_merged_equal_peft(llama: Any, token_inputs: Any, tmp_path: Path) -> None:
    """On a bfloat16 model the adapter runs in float32 and its float32 delta is added in place, as in PEFT."""
    from peft import PeftModel

    base = fresh(llama).to(torch.bfloat16)
    _peft_folder(base, _config(r=2, num_vectors=8, vector_length=16, topk=2, target_modules=["q_proj", "down_proj"]),
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


def test_one_training_step_equals_peft(llama: Any, token_inputs: Any, tmp_path: Path) -> None:
    """Loaded trainable, the loss's gradients on the bank and the logits are PEFT's (same forward, same backward
    through the top-k softmax), and the trainable parameters are PEFT's."""
    from peft import PeftModel

    fields = dict(r=2, num_vectors=8, vector_length=16, topk=3, target_modules=["q_proj", "v_proj", "down_proj"])
    _peft_folder(llama, _config(**fields), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(fresh(llama), str(tmp_path), is_trainable=True)
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path, trainable=True)
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in ours.values()) == sum(p.numel() for p in theirs.values())
    for net in (model, reference):
        out = net(**token_inputs).logits
        (out.float() ** 2).mean().backward()
    mine = {n.replace(".adapter_weights.default.", ".").replace("adapterspec_shared.default.", ""): p
            for n, p in ours.items()}
    peft = {"vblora_vector_bank" if "vblora_vector_bank" in n else  # PEFT names the shared bank under a layer
            n.removeprefix("base_model.model.").removesuffix(".default"): p for n, p in theirs.items()}
    assert sorted(mine) == sorted(peft)
    assert mine["vblora_vector_bank"].grad.abs().max() > 0
    for name, param in peft.items():
        assert_close(mine[name].grad, param.grad)


def test_topk_weights_summing_above_one_are_refused_unchanged(llama: Any, tmp_path: Path) -> None:
    """PEFT's loader computes log(1 - sum) = NaN for them (SPEC.md 17.4); a sum of exactly 1 loads."""
    _small(llama, tmp_path, save_only_topk_weights=True)
    key = "base_model.model.model.layers.0.self_attn.q_proj.vblora_logits_A_topk_weights"
    _edit(tmp_path, lambda t: t.update({key: torch.full_like(t[key], 1.0).contiguous()}))
    assert adapterspec.validate_adapter(tmp_path) == []
    adapterspec.load_adapter(fresh(llama), tmp_path)
    _edit(tmp_path, lambda t: t.update({key: torch.full_like(t[key], 1.25).contiguous()}))
    assert [e.key for e in adapterspec.validate_adapter(tmp_path)] == [key]
    _refused(llama, tmp_path, TensorError, key)
