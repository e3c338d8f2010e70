"""A folder that does not fit the model is refused with a typed error naming the key, and the model is
left exactly as it was: state dict values, module objects, loaded and active adapters."""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch_helpers import assert_same_snapshot, fresh, logits, peft_reference, snapshot  # noqa: E402

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture
def good(llama: Any, tmp_path: Any) -> Any:
    from peft import LoraConfig

    peft_reference(llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
                   tmp_path / "good")
    return tmp_path / "good"


@pytest.fixture
def model_with_adapter(llama: Any, tmp_path: Any) -> Any:
    """A model that already has an active adapter ``first`` (IA3), so rollback of the active set is visible."""
    from peft import IA3Config

    peft_reference(llama, IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
                   tmp_path / "first")
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "first", "first")
    return model


@pytest.fixture
def model_with_merged(llama: Any, tmp_path: Any) -> Any:
    """A model whose LoRA ``first`` (non-zero B, on q_proj as the bad folders' adapter) is merged into the base."""
    from peft import LoraConfig

    peft_reference(llama, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                     init_lora_weights=False), tmp_path / "first")
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "first", "first")
    adapterspec.merge_adapters(model)
    return model


def _merged_flags(model: Any) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The model's merged adapters, and each adapted module's."""
    from adapterspec_torch.switch import get_state

    state = get_state(model)
    return (list(state.merged) if state is not None else [],
            [(n, m.merged_adapters) for n, m in model.named_modules() if hasattr(m, "merged_adapters")])


def _variant(good: Any, tmp_path: Any, edit: Any) -> Any:
    folder = tmp_path / "bad"
    shutil.copytree(good, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def _drop_module(tensors: dict[str, Any]) -> None:
    for param in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"):
        del tensors[f"{Q0}.{param}"]


def _widen(tensors: dict[str, Any]) -> None:
    a = tensors[f"{Q0}.lora_A.weight"]
    tensors[f"{Q0}.lora_A.weight"] = torch.cat([a, a[:, :1]], dim=1)  # in_features + 1: rank still fits


def _extra_layer(tensors: dict[str, Any]) -> None:
    for param in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"):
        tensors[f"base_model.model.model.layers.7.self_attn.q_proj.{param}"] = tensors[f"{Q0}.{param}"].clone()


def _untargeted(tensors: dict[str, Any]) -> None:
    for param in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"):
        tensors[f"{Q0.replace('q_proj', 'k_proj')}.{param}"] = tensors[f"{Q0}.{param}"].clone()


@pytest.mark.parametrize(("edit", "error", "key"), [
    (_drop_module, adapterspec.MissingTensorError, f"{Q0}.lora_A.weight"),
    (_widen, adapterspec.ShapeMismatchError, f"{Q0}.lora_A.weight"),
    (_extra_layer, adapterspec.TargetNotFoundError, "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"),
    (_untargeted, adapterspec.UnexpectedTensorError, f"{Q0.replace('q_proj', 'k_proj')}.lora_A.weight"),
], ids=["missing", "shape", "absent-module", "untargeted"])
def test_bad_folder_leaves_model_untouched(model_with_adapter: Any, good: Any, tmp_path: Any, edit: Any,
                                           error: type, key: str) -> None:
    bad = _variant(good, tmp_path, edit)
    before = snapshot(model_with_adapter)
    with pytest.raises(error) as info:
        adapterspec.load_adapter(model_with_adapter, bad, "second")
    assert info.value.key == key
    assert key in str(info.value)
    assert_same_snapshot(model_with_adapter, before)
    # and the model still works with the good folder afterwards
    adapterspec.load_adapter(model_with_adapter, good, "second")
    assert adapterspec.active_adapters(model_with_adapter) == ["second"]


@pytest.mark.parametrize("activate", [True, False], ids=["activate", "inactive"])
@pytest.mark.parametrize(("edit", "error"), [(_drop_module, adapterspec.MissingTensorError),
                                             (_widen, adapterspec.ShapeMismatchError),
                                             (_extra_layer, adapterspec.TargetNotFoundError),
                                             (_untargeted, adapterspec.UnexpectedTensorError)],
                         ids=["missing", "shape", "absent-module", "untargeted"])
def test_bad_folder_keeps_a_merged_adapter_merged(model_with_merged: Any, good: Any, tmp_path: Any, token_inputs: Any,
                                                  edit: Any, error: type, activate: bool) -> None:
    """The rollback restored the active set with set_active, which unmerges first: ``first`` came out unmerged
    (its delta taken out of the base weights, 0.0088 on q_proj; it ran unmerged again, logits 1.5e-7 off), silently.
    Now every weight is the same to the bit, ``first`` merged on every module, the logits equal."""
    model = model_with_merged
    bad = _variant(good, tmp_path, edit)
    before, flags, out = snapshot(model), _merged_flags(model), logits(model, token_inputs)
    assert flags[0] == ["first"] and flags[1] and all(merged == ["first"] for _, merged in flags[1])
    with pytest.raises(error):
        adapterspec.load_adapter(model, bad, "second", activate=activate)
    assert_same_snapshot(model, before)
    assert _merged_flags(model) == flags
    assert torch.equal(logits(model, token_inputs), out)


def test_targets_matching_nothing_are_named_by_their_field(llama: Any) -> None:
    """As in the Keras backend (whose message began with the regex itself, or "None:" for a null list)."""
    model = fresh(llama)
    before = snapshot(model)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ".*nothing"}
    with pytest.raises(adapterspec.TargetNotFoundError) as info:
        adapterspec.inject_adapter(model, config)
    assert info.value.pointer == "/target_modules"
    assert str(info.value).startswith("/target_modules: no module of the model matches target_modules='.*nothing'")
    assert_same_snapshot(model, before)


@pytest.mark.parametrize("wrap", [torch.nn.DataParallel, lambda m: torch.nn.Sequential(m)], ids=["DataParallel", "Sequential"])
def test_a_wrapped_model_is_named_in_the_refusal(llama: Any, good: Any, wrap: Any) -> None:
    """A model wrapped (DataParallel, a container) before loading holds the adapter's modules under a prefix: the
    refusal names where they are and which model to load into (it said the adapter had another architecture)."""
    wrapped = wrap(fresh(llama))
    before = snapshot(wrapped)
    with pytest.raises(adapterspec.TargetNotFoundError) as info:
        adapterspec.load_adapter(wrapped, good)
    prefix = "module" if isinstance(wrapped, torch.nn.DataParallel) else "0"
    assert f"'{prefix}.model.layers.0.self_attn.q_proj'" in info.value.message
    assert f"model.get_submodule({prefix!r})" in (info.value.hint or "")
    assert_same_snapshot(wrapped, before)
    inner = wrapped.get_submodule(prefix)
    adapterspec.load_adapter(inner, good)  # as the hint says
    assert adapterspec.active_adapters(inner) == ["default"]


@pytest.mark.parametrize("wrap", [torch.nn.DataParallel, lambda m: torch.nn.Sequential(m),
                                  lambda m: torch.compile(m, backend="eager")],
                         ids=["DataParallel", "Sequential", "torch.compile"])
def test_calls_on_a_wrapper_of_the_adapted_model_are_refused(llama: Any, good: Any, wrap: Any) -> None:
    """Every model-level call on a module wrapping the adapted model (DDP, torch.compile, a container) is refused
    with the inner model's place; they did nothing, silently: adapter_names said [], disabled_adapters ran the
    adapter (0.45 from the base), merge_adapters and unload(merge=True) left the weights as they were."""
    inner = fresh(llama)
    adapterspec.load_adapter(inner, good)
    wrapped = wrap(inner)
    prefix = {torch.nn.DataParallel: "module", torch.nn.Sequential: "0"}.get(type(wrapped), "_orig_mod")
    before = snapshot(inner)
    calls = {
        "adapter_names": lambda: adapterspec.adapter_names(wrapped),
        "active_adapters": lambda: adapterspec.active_adapters(wrapped),
        "set_active_adapters": lambda: adapterspec.set_active_adapters(wrapped, []),
        "disabled_adapters": lambda: adapterspec.disabled_adapters(wrapped).__enter__(),
        "merge_adapters": lambda: adapterspec.merge_adapters(wrapped),
        "unmerge_adapters": lambda: adapterspec.unmerge_adapters(wrapped),
        "unload": lambda: adapterspec.unload(wrapped, merge=True),
        "delete_adapter": lambda: adapterspec.delete_adapter(wrapped, "default"),
        "save_adapter": lambda: adapterspec.save_adapter(wrapped, "never-written"),
        "extract_adapter": lambda: adapterspec.extract_adapter(wrapped),
    }
    for name, call in calls.items():
        with pytest.raises(adapterspec.AdapterNotFoundError) as info:
            call()
        assert f"wraps the LlamaForCausalLM they were loaded into ({prefix!r}, adapters ['default'])" in info.value.message, name
        assert f"model.get_submodule({prefix!r})" in (info.value.hint or ""), name
    assert_same_snapshot(inner, before)
    assert adapterspec.active_adapters(wrapped.get_submodule(prefix)) == ["default"]  # as the hint says
    assert adapterspec.adapter_names(torch.nn.Linear(2, 2)) == []  # a model without adapters has none


def test_calls_on_a_peft_model_are_refused(llama: Any, good: Any) -> None:
    """A PeftModel holds PEFT's own layers, which adapterspec does not drive: ``adapter_names`` said ``[]`` and
    ``merge_adapters`` did nothing; each call is refused, naming a PEFT layer, and PEFT's model is unchanged."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(fresh(llama), str(good))
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    for call in (adapterspec.adapter_names, adapterspec.active_adapters, adapterspec.merge_adapters,
                 lambda m: adapterspec.save_adapter(m, "never-written")):
        with pytest.raises(adapterspec.UnsupportedError, match="PEFT's own adapter layers") as info:
            call(peft_model)
        assert "lora.layer.Linear" in info.value.message and "merge_and_unload" in (info.value.hint or "")
    after = peft_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class _Pipe(torch.nn.Module):
    """A model with diffusers' adapter methods (its ``PeftAdapterMixin``): ``add_adapter`` puts PEFT's layers in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(4, 8, 3)

    def save_lora_adapter(self, folder: str) -> None:  # diffusers writes pytorch_lora_weights.safetensors
        raise AssertionError("not called")


def test_a_model_adapted_by_its_library_gets_that_library_s_methods(llama: Any) -> None:
    """A model holding PEFT's layers that is no PeftModel (diffusers' or transformers' add_adapter, PEFT's
    inject_adapter_in_model): the hint named PeftModel's methods (merge_and_unload does not exist on such a model, and
    a diffusers model's save_pretrained writes the whole model); it names the methods of the library that adapted it."""
    from peft import LoraConfig, inject_adapter_in_model

    pipe = inject_adapter_in_model(LoraConfig(r=2, target_modules=["conv_in"]), _Pipe())
    causal = fresh(llama)
    causal.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]))
    plain = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), torch.nn.Sequential(torch.nn.Linear(4, 4)))
    for model, needles in ((pipe, ("diffusers' own methods", "save_lora_adapter", "fuse_lora")),
                           (causal, ("transformers' adapter methods", "set_adapter", "save_pretrained saves")),
                           (plain, ("PEFT's functions", "get_peft_model_state_dict"))):
        with pytest.raises(adapterspec.UnsupportedError, match="PEFT's own adapter layers") as info:
            adapterspec.adapter_names(model)
        hint = info.value.hint or ""
        assert all(needle in hint for needle in needles) and "merge_and_unload" not in hint, hint


def test_unsupported_target_names_the_module(llama: Any, good: Any, tmp_path: Any) -> None:
    folder = tmp_path / "mlp"
    shutil.copytree(good, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "v_proj", "mlp"]  # LlamaMLP is not a layer LoRA can adapt
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model = fresh(llama)
    before = snapshot(model)
    with pytest.raises(adapterspec.UnsupportedError) as info:
        adapterspec.load_adapter(model, folder)
    assert info.value.key == "model.layers.0.mlp"
    assert_same_snapshot(model, before)


def test_no_matching_module(llama: Any, good: Any, tmp_path: Any) -> None:
    folder = tmp_path / "none"
    shutil.copytree(good, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "v_proj"]
    config["layers_to_transform"] = [5]  # the tiny model has layers 0 and 1
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model = fresh(llama)
    before = snapshot(model)
    with pytest.raises((adapterspec.TargetNotFoundError, adapterspec.UnexpectedTensorError)):
        adapterspec.load_adapter(model, folder)
    assert_same_snapshot(model, before)


def test_failure_after_injection_rolls_back(model_with_adapter: Any, good: Any, monkeypatch: Any) -> None:
    """A failure while reading tensors (after the layers were injected) removes them again."""
    before = snapshot(model_with_adapter)

    def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise adapterspec.FileFormatError("simulated read failure", key="x")

    monkeypatch.setattr(adapterspec.Adapter, "load_tensors", broken)
    with pytest.raises(adapterspec.FileFormatError, match="simulated"):
        adapterspec.load_adapter(model_with_adapter, good, "second")
    assert_same_snapshot(model_with_adapter, before)


@pytest.mark.parametrize(("field", "value"), [("use_qalora", True), ("layer_replication", [[0, 1]]),
                                              ("alora_invocation_tokens", [1, 2])])
def test_unimplemented_lora_variants_are_refused(llama: Any, good: Any, tmp_path: Any, field: str, value: Any) -> None:
    folder = tmp_path / "variant"
    shutil.copytree(good, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config[field] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model = fresh(llama)
    before = snapshot(model)
    with pytest.raises(adapterspec.AdapterSpecError) as info:
        adapterspec.load_adapter(model, folder)
    assert field in str(info.value)
    assert_same_snapshot(model, before)
