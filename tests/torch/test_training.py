"""Training with the torch backend: a frozen base, PEFT's dtype policy, base identity, adapter-only checkpoints."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch_helpers import fresh

import adapterspec

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _trainable(model: torch.nn.Module) -> dict[str, int]:
    return {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}


def _peft_trainable(base: torch.nn.Module, config: dict[str, Any]) -> int:
    from peft import get_peft_model
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    fields = {k: v for k, v in config.items() if k != "peft_type"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(fresh(base), PEFT_TYPE_TO_CONFIG_MAPPING[config["peft_type"]](**fields))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    return int(trainable)


@pytest.mark.parametrize("config", [
    pytest.param(LORA, id="lora"),
    pytest.param({**LORA, "modules_to_save": ["lm_head"]}, id="modules_to_save"),
    pytest.param({**LORA, "trainable_token_indices": [3, 7, 1]}, id="trainable_tokens"),
    pytest.param({**LORA, "use_dora": True, "bias": "lora_only"}, id="dora_bias"),
    pytest.param({"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
                 id="ia3"),
    pytest.param({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "task_type": "CAUSAL_LM",
                  "token_dim": 64, "num_layers": 2, "num_attention_heads": 4}, id="prompt"),
])
def test_inject_trains_exactly_what_get_peft_model_trains(llama: Any, config: dict[str, Any]) -> None:
    model = fresh(llama)
    total = sum(p.numel() for p in model.parameters())
    assert sum(_trainable(model).values()) == total  # a fresh transformers model trains everything
    adapterspec.inject_adapter(model, config)
    trainable = _trainable(model)
    assert sum(trainable.values()) == _peft_trainable(llama, config)
    assert 0 < sum(trainable.values()) < total // 4
    assert not [name for name in trainable if "base_layer" in name or "original_module" in name]
    adapterspec.delete_adapter(model, "default")
    assert sum(_trainable(model).values()) == total  # the base's flags come back with the last adapter


def test_freeze_base_false_keeps_the_base_trainable(llama: Any) -> None:
    model = fresh(llama)
    model.model.embed_tokens.weight.requires_grad_(False)  # a user's own choice, kept
    adapterspec.inject_adapter(model, LORA, freeze_base=False)
    trainable = _trainable(model)
    assert "model.embed_tokens.weight" not in trainable
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in trainable
    assert sum(1 for n in trainable if ".lora_" in n or "adapter_weights" in n) == 8


def test_training_a_merged_adapter_is_refused(llama: Any) -> None:
    """The forward skips a merged adapter: a training step raised torch's raw "does not require grad" (with a frozen
    base), or trained the base alone (``freeze_base=False``), as in PEFT. Refused, as in Keras; eval and no_grad run."""
    x = torch.arange(12).reshape(2, 6)
    for freeze_base in (True, False):
        model = fresh(llama)
        adapterspec.inject_adapter(model, {**LORA, "init_lora_weights": False}, freeze_base=freeze_base)
        adapterspec.merge_adapters(model)
        model.train()
        with pytest.raises(adapterspec.UnsupportedError, match="'default' is merged: training cannot reach") as info:
            model(input_ids=x, labels=x).loss.backward()
        assert "unmerge_adapters" in (info.value.hint or "")
        with torch.no_grad():
            model(input_ids=x)  # a forward without gradient runs
        adapterspec.unmerge_adapters(model)
        model(input_ids=x, labels=x).loss.backward()
        assert model.model.layers[0].self_attn.q_proj.adapter_params("default")["lora_A.weight"].grad is not None


def test_frozen_flags_restored_only_after_the_last_trainable_adapter(llama: Any) -> None:
    model = fresh(llama)
    model.model.norm.weight.requires_grad_(False)
    adapterspec.inject_adapter(model, LORA, "a")
    adapterspec.inject_adapter(model, {**LORA, "target_modules": ["k_proj"]}, "b")
    trainable = _trainable(model)
    assert {n.split(".adapter_weights.")[1].split(".")[0] for n in trainable} == {"a", "b"}  # a stays trainable
    adapterspec.delete_adapter(model, "a")
    assert not [n for n in _trainable(model) if "adapter_weights" not in n]
    adapterspec.delete_adapter(model, "b")
    trainable = _trainable(model)
    assert "model.norm.weight" not in trainable and len(trainable) == len(list(model.parameters())) - 1


def test_load_trainable_freezes_the_base(llama: Any, tmp_path: Path) -> None:
    model = fresh(llama)
    adapterspec.inject_adapter(model, LORA)
    adapterspec.save_adapter(model, tmp_path / "a")
    other = fresh(llama)
    adapterspec.load_adapter(other, tmp_path / "a", trainable=True)
    assert sorted(_trainable(other)) == sorted(_trainable(model))
    assert len(_trainable(other)) == 8 and all("adapter_weights" in n for n in _trainable(other))
    plain = fresh(llama)
    adapterspec.load_adapter(plain, tmp_path / "a")
    assert all(".lora_" not in n and "adapter_weights" not in n for n in _trainable(plain))


# -- PEFT's dtype policy (SPEC.md 7.5) ---------------------------------------------------------------
def _peft_adapter(base: torch.nn.Module, config: Any, folder: Path, *, half: bool = False) -> None:
    from peft import get_peft_model
    from safetensors.torch import load_file, save_file
    from torch_helpers import fill_adapter_weights

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(fresh(base), config)
    fill_adapter_weights(peft_model)
    peft_model.save_pretrained(str(folder))
    if half:  # the file stores float16 values (as a half-precision training run writes them)
        file = folder / "adapter_model.safetensors"
        save_file({k: v.to(torch.float16) for k, v in load_file(file).items()}, file, metadata={"format": "pt"})


@pytest.mark.parametrize("half_file", [False, True], ids=["fp32_file", "fp16_file"])
@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "loha", "tokens", "prompt"])
def test_half_precision_base_keeps_the_adapter_in_float32_as_peft(llama: Any, token_inputs: dict[str, Any],
                                                                  tmp_path: Path, method: str, half_file: bool) -> None:
    from peft import IA3Config, LoHaConfig, LoraConfig, PeftModel, PromptTuningConfig
    from safetensors.torch import load_file
    from torch_helpers import logits

    config = {"lora": LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
              "dora": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
              "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
              "loha": LoHaConfig(r=2, target_modules=["q_proj"]),
              "tokens": LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 7, 1]),
              "prompt": PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")}[method]
    _peft_adapter(llama, config, tmp_path / "a", half=half_file)
    base = fresh(llama).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(fresh(base), str(tmp_path / "a")).eval()
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "a")
    adapter_params = [p for n, p in model.named_parameters() if "adapter_weights" in n or "_adapterspec_prompts" in n]
    assert adapter_params and {p.dtype for p in adapter_params} == {torch.float32}
    assert torch.equal(logits(model, token_inputs), logits(reference, token_inputs))
    adapterspec.save_adapter(model, tmp_path / "again")  # the stored values come back exactly
    stored, saved = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(tmp_path / "again" /
                                                                                     "adapter_model.safetensors")
    assert sorted(saved) == sorted(stored)
    for key, value in stored.items():
        assert saved[key].dtype == value.dtype and torch.equal(saved[key], value), key  # bit-exact (SPEC.md 7.5)
    pinned = fresh(base)
    adapterspec.load_adapter(pinned, tmp_path / "a", dtype=torch.bfloat16)  # dtype= still decides
    assert {p.dtype for n, p in pinned.named_parameters() if "adapter_weights" in n or "_adapterspec_prompts" in n} \
        == {torch.bfloat16}


def test_half_precision_inject_trains_in_float32_and_merges(llama: Any, token_inputs: dict[str, Any]) -> None:
    from torch_helpers import logits

    model = fresh(llama).to(torch.float16)
    adapterspec.inject_adapter(model, {**LORA, "use_dora": True})
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float32}
    with torch.no_grad():
        for i, p in enumerate(trainable):
            p.add_(0.01 * torch.sin(torch.arange(p.numel(), dtype=torch.float32) + i).reshape(p.shape))
    unmerged = logits(model, token_inputs)
    adapterspec.merge_adapters(model)
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.float16
    assert (logits(model, token_inputs) - unmerged).abs().max() < 2e-2  # fp16 weights round the merged delta


def test_trained_values_are_saved_in_float32(llama: Any, tmp_path: Path) -> None:
    """A loaded float16 adapter trained further leaves float16's grid: those tensors are saved in float32."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    _peft_adapter(llama, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a", half=True)
    model = fresh(llama).to(torch.bfloat16)
    adapterspec.load_adapter(model, tmp_path / "a", trainable=True)
    lora_a = model.model.layers[0].self_attn.q_proj.adapter_weights["default"].lora_A_weight
    with torch.no_grad():
        lora_a.add_(1e-5)  # a step smaller than float16's spacing near these values
    adapterspec.save_adapter(model, tmp_path / "again")
    saved = load_file(tmp_path / "again" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert saved[key].dtype == torch.float32 and torch.equal(saved[key], lora_a.detach())
    assert {v.dtype for k, v in saved.items() if k != key} == {torch.float16}


# -- base-model identity (SPEC.md 9.1) --------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_folder(llama: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    llama.save_pretrained(folder)
    return folder


def _from(folder: Path, **kwargs: Any) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, **kwargs).eval()


def test_save_records_the_base_and_autopeft_loads_it(llama_folder: Path, tmp_path: Path,
                                                     token_inputs: dict[str, Any]) -> None:
    from peft import AutoPeftModelForCausalLM
    from torch_helpers import logits

    model = _from(llama_folder)
    adapterspec.inject_adapter(model, LORA)
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            if p.requires_grad:
                p.copy_(0.05 * torch.sin(torch.arange(p.numel(), dtype=torch.float32) * 0.7 + i).reshape(p.shape))
    adapterspec.save_adapter(model, tmp_path / "a")
    config = adapterspec.read_adapter(tmp_path / "a").config
    assert config["base_model_name_or_path"] == str(llama_folder) and config["task_type"] == "CAUSAL_LM"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a")).eval()
    assert torch.equal(logits(reference, token_inputs), logits(model, token_inputs))
    adapterspec.save_adapter(model, tmp_path / "b", base_model_name_or_path="org/tiny-llama")  # the caller's wins
    assert adapterspec.read_adapter(tmp_path / "b").config["base_model_name_or_path"] == "org/tiny-llama"


@pytest.mark.parametrize("recorded", [None, "org/trained-on"])
def test_a_loaded_adapter_is_saved_with_the_base_peft_records(recorded: str | None, llama_folder: Path,
                                                              tmp_path: Path) -> None:
    """A loaded adapter keeps its config's base and task type; an absent base is filled from the model, as PEFT's
    ``save_pretrained`` fills it; an absent task type stays absent (PEFT keeps it None) -- the same config PEFT
    writes for the same load and save."""
    import json

    from peft import LoraConfig, PeftModel

    _peft_adapter(_from(llama_folder), LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": recorded,
                                "task_type": None}))
    model = _from(llama_folder)
    adapterspec.load_adapter(model, tmp_path / "peft")
    adapterspec.save_adapter(model, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(_from(llama_folder), str(tmp_path / "peft")).save_pretrained(str(tmp_path / "theirs"))
    ours = adapterspec.read_adapter(tmp_path / "ours").config
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert ours["base_model_name_or_path"] == theirs["base_model_name_or_path"] == (recorded or str(llama_folder))
    assert ours.get("task_type") is None and theirs["task_type"] is None


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fingerprint_is_computable_from_the_base_file_alone(kind: str, request: pytest.FixtureRequest,
                                                            tmp_path: Path) -> None:
    """SPEC.md 9.1's recipe, from the base's safetensors file with NumPy: what another implementation computes
    (GPT-2's Conv1D stores its weight [in, out]: the spec layout is its transpose)."""
    from safetensors.numpy import load_file

    from adapterspec.identity import FINGERPRINT_KEY, fingerprint, sample_indices

    request.getfixturevalue(kind).save_pretrained(tmp_path / "base")
    model = type(request.getfixturevalue(kind)).from_pretrained(tmp_path / "base")
    targets = ("q_proj", "v_proj") if kind == "llama" else ("c_attn",)
    adapterspec.inject_adapter(model, {**LORA, "target_modules": list(targets)})
    adapterspec.save_adapter(model, tmp_path / "a")
    weights = {}
    for key, value in load_file(tmp_path / "base" / "model.safetensors").items():
        path = key.removesuffix(".weight")
        if key.endswith(".weight") and path.endswith(targets):
            spec = value.T if kind == "gpt2" else value
            weights[path] = (spec.shape, spec.ravel()[sample_indices(spec.size)])
    assert len(weights) == (4 if kind == "llama" else 2)
    recorded = adapterspec.read_adapter(tmp_path / "a").metadata[FINGERPRINT_KEY]
    assert recorded == fingerprint(weights)
    next(iter(weights.values()))[1][5] += 0.01
    assert recorded != fingerprint(weights)


def test_another_base_warns_and_strict_refuses(llama_folder: Path, tmp_path: Path) -> None:
    from torch_helpers import assert_same_snapshot, snapshot

    model = _from(llama_folder)
    adapterspec.inject_adapter(model, LORA)
    adapterspec.save_adapter(model, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapterspec.load_adapter(_from(llama_folder), tmp_path / "a", strict=True)  # the same base: silent
        adapterspec.load_adapter(_from(llama_folder, dtype=torch.bfloat16), tmp_path / "a", strict=True)
    other = _from(llama_folder)
    with torch.no_grad():
        weight = other.model.layers[1].self_attn.v_proj.weight  # same shapes, another base (a fine-tune of it)
        weight.add_(0.01 * torch.sin(torch.arange(weight.numel(), dtype=torch.float32)).reshape(weight.shape))
    with pytest.warns(adapterspec.BaseModelMismatchWarning, match="trained on another base model"):
        adapterspec.load_adapter(other, tmp_path / "a")
    adapterspec.delete_adapter(other, "default")
    before = snapshot(other)
    with pytest.raises(adapterspec.BaseModelMismatchError, match=str(llama_folder)):
        adapterspec.load_adapter(other, tmp_path / "a", strict=True)
    assert_same_snapshot(other, before)


def test_adapters_without_a_fingerprint_load_silently(llama: Any, tmp_path: Path) -> None:
    from peft import LoraConfig

    _peft_adapter(llama, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "peft")
    other = fresh(llama)
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.mul_(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapterspec.load_adapter(other, tmp_path / "peft", strict=True)


@pytest.mark.parametrize("config", [
    pytest.param({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}, id="lora"),
    pytest.param({"peft_type": "IA3", "target_modules": ["v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
                 id="ia3"),
])
def test_a_merged_adapter_records_the_base_fingerprint(config: dict[str, Any], llama: Any, tmp_path: Path) -> None:
    """SPEC.md 9.1, as on Keras: an adapter saved while merged records the samples taken before the merge (the
    weights now hold the deltas), which the base loads strictly; after ``unload(merge=True)`` the merged weights
    are the base a new adapter records."""
    from adapterspec.identity import FINGERPRINT_KEY

    model = fresh(llama)
    adapterspec.inject_adapter(model, config)
    with torch.no_grad():
        for i, p in enumerate(p for p in model.parameters() if p.requires_grad):
            p.copy_(1.0 + 0.3 * torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.7 + i).reshape(p.shape))
    adapterspec.save_adapter(model, tmp_path / "unmerged")
    adapterspec.merge_adapters(model)
    adapterspec.save_adapter(model, tmp_path / "merged")
    unmerged = adapterspec.read_adapter(tmp_path / "unmerged").metadata[FINGERPRINT_KEY]
    assert adapterspec.read_adapter(tmp_path / "merged").metadata.get(FINGERPRINT_KEY) == unmerged  # was: none
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapterspec.load_adapter(fresh(llama), tmp_path / "merged", strict=True)
    adapterspec.unload(model, merge=True)
    adapterspec.inject_adapter(model, config, "next")
    adapterspec.save_adapter(model, tmp_path / "next", "next")
    assert adapterspec.read_adapter(tmp_path / "next").metadata[FINGERPRINT_KEY] not in (None, unmerged)


def test_unmerge_that_rounds_differently_keeps_the_base_fingerprint(llama: Any, tmp_path: Path) -> None:
    """A bfloat16 base: merging a float32 LoRA and subtracting it again leaves some weights one bf16 step away from
    the base; the fingerprint still describes the base (no mismatch warning on a strict load of the save), until a
    sampled weight is changed for real."""
    from adapterspec.identity import FINGERPRINT_KEY

    base = fresh(llama).to(torch.bfloat16)
    model = fresh(base)
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    with torch.no_grad():
        for i, p in enumerate(p for p in model.parameters() if p.requires_grad):
            p.copy_(0.05 * torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.7 + i).reshape(p.shape))
    adapterspec.save_adapter(model, tmp_path / "before")
    adapterspec.merge_adapters(model)
    adapterspec.unmerge_adapters(model)
    drifted = model.model.layers[0].self_attn.q_proj.base_layer.weight.detach()
    assert not torch.equal(drifted, original)  # the round trip rounded some elements differently
    adapterspec.save_adapter(model, tmp_path / "after", overwrite=True)
    recorded = adapterspec.read_adapter(tmp_path / "before").metadata[FINGERPRINT_KEY]
    assert adapterspec.read_adapter(tmp_path / "after").metadata[FINGERPRINT_KEY] == recorded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapterspec.load_adapter(fresh(base), tmp_path / "after", strict=True)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.base_layer.weight.add_(1.0)  # every element: the sampled ones too
    adapterspec.save_adapter(model, tmp_path / "changed")
    assert adapterspec.read_adapter(tmp_path / "changed").metadata[FINGERPRINT_KEY] != recorded


# -- Trainer: adapter-only checkpoints and resume ------------------------------------------------------
class _Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = (torch.arange(8) * (i + 3) + i) % 128
        return {"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": ids}


def _trainer(base: torch.nn.Module, out: Path, *, stop_at: int | None = None, name: str = "default",
             freeze_base: bool = True, **args: Any) -> Any:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from adapterspec_torch.training import AdapterCheckpoints

    class Stop(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step == stop_at:
                control.should_training_stop = True  # the process dies right after this checkpoint
            return control

    model = fresh(base).train()
    torch.manual_seed(7)
    adapterspec.inject_adapter(model, {**LORA, "lora_dropout": 0.1}, name, freeze_base=freeze_base)
    arguments = TrainingArguments(str(out), max_steps=6, save_steps=2, save_total_limit=2, learning_rate=5e-3,
                                  per_device_train_batch_size=4, lr_scheduler_type="linear", warmup_steps=2,
                                  report_to=[], use_cpu=True, seed=3, data_seed=3, logging_steps=100,
                                  disable_tqdm=True, dataloader_num_workers=0, **args)
    trainer = Trainer(model=model, args=arguments, train_dataset=_Tokens(), eval_dataset=_Tokens(),
                      callbacks=[Stop()] if stop_at else [])
    AdapterCheckpoints(trainer)
    return trainer


def _adapter(model: torch.nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapterspec.extract_adapter(model, name).load_tensors("pt").items()}


def test_trainer_resume_ends_with_the_uninterrupted_adapter(llama: Any, tmp_path: Path) -> None:
    whole = _trainer(llama, tmp_path / "whole")
    whole.train()
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == ["checkpoint-4", "checkpoint-6"]  # keeps 2
    files = sorted(p.name for p in (tmp_path / "whole" / "checkpoint-6").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "optimizer.pt",
                     "rng_state.pth", "scheduler.pt", "trainer_state.json", "training_args.bin"]
    checkpoint = adapterspec.read_adapter(tmp_path / "whole" / "checkpoint-6")
    assert all(".lora_" in key for key in checkpoint.tensors) and len(checkpoint.tensors) == 8
    expected = _adapter(whole.model)
    for key, value in checkpoint.load_tensors("pt").items():
        assert torch.equal(value, expected[key]), key

    first = _trainer(llama, tmp_path / "cut", stop_at=4)
    first.train()
    assert first.state.global_step == 4
    after_four = _adapter(first.model)
    resumed = _trainer(llama, tmp_path / "cut")  # a new process: new model, new adapter init, new trainer
    assert any(not torch.equal(v, after_four[k]) for k, v in _adapter(resumed.model).items())
    params = [p for p in resumed.model.parameters() if p.requires_grad]
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-4"))
    assert [p for p in resumed.model.parameters() if p.requires_grad] == params  # the same parameter objects
    assert resumed.state.global_step == 6
    final = _adapter(resumed.model)
    assert sorted(final) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(final[key], value), key  # optimizer, scheduler, RNG (dropout, data order) restored
    assert any(not torch.equal(expected[k], v) for k, v in after_four.items())


def test_trainer_resume_under_another_adapter_name_refuses(llama: Any, tmp_path: Path) -> None:
    """A checkpoint of adapter 'default' resumed into a model training 'sft': skipped, training went on from the
    fresh adapter beside the restored optimizer and step (0.11 off the uninterrupted run). Refused, naming both."""
    _trainer(llama, tmp_path / "cut", stop_at=4).train()
    resumed = _trainer(llama, tmp_path / "cut", name="sft")
    before = _adapter(resumed.model, "sft")
    with pytest.raises(adapterspec.AdapterNotFoundError, match=r"no adapter 'sft'.*\['default'\]"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-4"))
    after = _adapter(resumed.model, "sft")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_adapter_checkpoints_refuse_a_trainable_base(llama: Any, tmp_path: Path) -> None:
    """freeze_base=False trains the base too, which adapter-only checkpoints do not hold: a resume restarted it from
    its pretrained values (0.42 off the uninterrupted run, silently). Refused when the callback is attached."""
    with pytest.raises(adapterspec.UnsupportedError, match="belongs to no adapter.*freeze_base=True"):
        _trainer(llama, tmp_path / "run", freeze_base=False)
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_trainer_best_checkpoint_and_plain_save_model(llama: Any, tmp_path: Path) -> None:
    trainer = _trainer(llama, tmp_path / "run", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                       metric_for_best_model="loss", greater_is_better=True)  # the worst loss: not the last
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")
    saved = adapterspec.read_adapter(best).load_tensors("pt")
    final = _adapter(trainer.model)
    assert all(torch.equal(saved[k], final[k]) for k in saved)
    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "model.safetensors").exists()
    assert adapterspec.read_adapter(tmp_path / "final").config["task_type"] == "CAUSAL_LM"


def test_save_pretrained_on_an_adapted_model_refuses(llama: Any, tmp_path: Path) -> None:
    model = fresh(llama)
    adapterspec.inject_adapter(model, LORA)
    with pytest.raises(adapterspec.UnsupportedError, match="save_adapter"):
        model.save_pretrained(tmp_path / "full")
    assert not (tmp_path / "full").exists()
    adapterspec.unload(model, merge=True)
    model.save_pretrained(tmp_path / "merged")  # the merged plain model saves as usual
    assert (tmp_path / "merged" / "model.safetensors").exists()


@pytest.mark.parametrize("where", ["backbone", "outer"])
def test_save_pretrained_of_a_model_around_or_inside_the_adapted_one_refuses(where: str, llama: Any,
                                                                             tmp_path: Path) -> None:
    """The adapter in ``model.model`` and ``model.save_pretrained`` called, or the adapter in ``model`` and
    ``model.model.save_pretrained``: each wrote renamed keys that reloaded 4.3 off the adapted model."""
    model = fresh(llama)
    adapterspec.inject_adapter(model.model if where == "backbone" else model, LORA)
    saving = model if where == "backbone" else model.model
    with pytest.raises(adapterspec.UnsupportedError, match="save_adapter"):
        saving.save_pretrained(tmp_path / "full")
    assert not (tmp_path / "full").exists()
    adapterspec.unload(model.model if where == "backbone" else model, merge=True)
    saving.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").exists()


@pytest.mark.parametrize("where", ["model", "outer", "part"])
def test_load_state_dict_into_a_merged_adapter_is_refused(where: str, llama: Any,
                                                          token_inputs: dict[str, Any]) -> None:
    """The adapted model's own state dict (taken unmerged: a training checkpoint) loaded while the adapter was
    merged replaced the merged weights (base + delta) with the base, and the unmerge subtracted the delta from it:
    the logits after ``unload`` stayed 0.51 off the base's (the adapter's effect: 0.69), silently. Refused now before
    anything is loaded, on the model, a model around it and a part of it; unmerged, the load runs (PEFT loads
    either way)."""
    model = fresh(llama)
    with torch.no_grad():
        base = model(**token_inputs).logits
    adapterspec.inject_adapter(model, {**LORA, "init_lora_weights": False}, trainable=False)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        adapted = model(**token_inputs).logits
    assert (adapted - base).abs().max() > 0.01
    adapterspec.merge_adapters(model)
    outer = torch.nn.ModuleDict({"inner": model})
    loading, state = {"model": (model, saved), "outer": (outer, {f"inner.{k}": v for k, v in saved.items()}),
                      "part": (model.model.layers[0], {k[len("model.layers.0."):]: v for k, v in saved.items()
                                                       if k.startswith("model.layers.0.")})}[where]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(adapterspec.UnsupportedError, match=r"load_state_dict.*q_proj.*merged adapter 'default'") \
            as caught:
        loading.load_state_dict(state)
    assert "unmerge_adapters" in caught.value.hint
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    adapterspec.unmerge_adapters(model)
    loading.load_state_dict(state)  # unmerged: the same load runs
    with torch.no_grad():
        assert (model(**token_inputs).logits - adapted).abs().max() <= 1e-5  # (the unmerge rounds: not bitwise)
    adapterspec.unload(model)
    with torch.no_grad():
        assert (model(**token_inputs).logits - base).abs().max() <= 1e-5


def _tiny_vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=16, patch_size=4, num_labels=3,
                                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()


def _checkpointing_grads(model: torch.nn.Module, pixels: torch.Tensor) -> list[float]:
    model.train()
    model(pixel_values=pixels, labels=torch.tensor([0, 2])).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    return sorted(g.abs().sum().item() for g in grads if g is not None)


@pytest.mark.parametrize("head", [True, False], ids=["with-head", "adapter-only"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("order", ["checkpointing-first", "adapter-first"])
def test_gradient_checkpointing_trains_the_adapter_as_peft(order: str, reentrant: bool, head: bool,
                                                           tmp_path: Path) -> None:
    """Reentrant checkpointing on a model whose main input is not ``input_ids`` (ViT): a checkpointed block whose
    inputs do not require grad gives outputs that do not either, so the adapter inside got no gradient -- 0 of 8
    LoRA tensors, the classifier in modules_to_save training alone (silently), or without it torch's raw
    'element 0 of tensors does not require grad'. PEFT makes the input embeddings' outputs require grad when it wraps a
    model with checkpointing on (8 of 8; enabled after, PEFT trains nothing either). Now in both orders every
    gradient is PEFT's (its checkpointing-first model), to the bit; deleting the adapter takes the hooks away."""
    from peft import LoraConfig, PeftModel
    from torch_helpers import peft_reference

    vit = _tiny_vit()
    pixels = torch.sin(torch.arange(2 * 3 * 16 * 16, dtype=torch.float32)).reshape(2, 3, 16, 16)
    enable = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    peft_reference(vit, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                   modules_to_save=["classifier"] if head else None), tmp_path)
    theirs = fresh(vit)
    theirs.gradient_checkpointing_enable(**enable)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(theirs, str(tmp_path), is_trainable=True)
    expected = _checkpointing_grads(theirs, pixels)
    assert len(expected) == 8 + 2 * head

    ours = fresh(vit)
    if order == "checkpointing-first":
        ours.gradient_checkpointing_enable(**enable)
    adapterspec.load_adapter(ours, tmp_path, trainable=True)
    if order == "adapter-first":
        ours.gradient_checkpointing_enable(**enable)
    assert _checkpointing_grads(ours, pixels) == expected
    adapterspec.delete_adapter(ours, "default")
    assert not getattr(ours, "_require_grads_hooks", None)  # (transformers' own: not made for a ViT)


# -- TRL's SFTTrainer ------------------------------------------------------------------------------------
def _tokenizer() -> Any:
    """A word-level tokenizer over the tiny Llama's 128 ids, built locally (SFTTrainer wants one; the dataset is
    already tokenized, so it only pads)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   pad_token="t0", eos_token="t1", unk_token="t0")


def _sft_trainer(base: torch.nn.Module, out: Path, *, stop_at: int | None = None) -> Any:
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import TrainerCallback

    from adapterspec_torch.training import AdapterCheckpoints

    class Stop(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step == stop_at:
                control.should_training_stop = True
            return control

    model = fresh(base).train()
    torch.manual_seed(7)
    adapterspec.inject_adapter(model, {**LORA, "lora_dropout": 0.1})
    rows = [{"input_ids": [int(t) for t in (torch.arange(8) * (i + 3) + i) % 128]} for i in range(16)]
    arguments = trl.SFTConfig(str(out), max_steps=6, save_steps=2, save_total_limit=2, learning_rate=5e-3,
                              per_device_train_batch_size=4, lr_scheduler_type="linear", warmup_steps=2,
                              report_to=[], use_cpu=True, seed=3, data_seed=3, logging_steps=100, disable_tqdm=True,
                              dataloader_num_workers=0, max_length=8, packing=False, dataset_num_proc=None)
    trainer = trl.SFTTrainer(model=model, args=arguments, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=_tokenizer(), callbacks=[Stop()] if stop_at else [])
    AdapterCheckpoints(trainer)
    return trainer


def test_sft_trainer_checkpoints_hold_the_adapter_and_resume_exactly(llama: Any, tmp_path: Path) -> None:
    """TRL's SFTTrainer (a Trainer subclass) with AdapterCheckpoints: checkpoints hold only the adapter and the
    trainer's state, and an interrupted run resumed from its checkpoint ends with the uninterrupted run's adapter."""
    whole = _sft_trainer(llama, tmp_path / "whole")
    whole.train()
    files = sorted(p.name for p in (tmp_path / "whole" / "checkpoint-6").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_state.pth",
                     "scheduler.pt", "tokenizer.json", "tokenizer_config.json", "trainer_state.json",
                     "training_args.bin"]  # the Trainer saves the processing class too; no base weights
    expected = _adapter(whole.model)
    saved = adapterspec.read_adapter(tmp_path / "whole" / "checkpoint-6").load_tensors("pt")
    assert sorted(saved) == sorted(expected) and all(torch.equal(saved[k], expected[k]) for k in saved)

    first = _sft_trainer(llama, tmp_path / "cut", stop_at=4)
    first.train()
    after_four = _adapter(first.model)
    resumed = _sft_trainer(llama, tmp_path / "cut")
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-4"))
    final = _adapter(resumed.model)
    assert sorted(final) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(final[key], value), key
    assert any(not torch.equal(expected[k], v) for k, v in after_four.items())


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "loha", "lokr"])
def test_autocast_training_steps_match_peft(llama: Any, token_inputs: dict[str, Any], tmp_path: Path,
                                            method: str) -> None:
    """Under CPU autocast (bfloat16) the loss and every adapter gradient are PEFT's to the bit: IA3's Linear keeps
    the base output's dtype as PEFT's does (it was cast back to float32, which moved gradients by 1.7e-5); LoHa and
    LoKr cast their output back to the input's dtype, as PEFT's do, and LoHa's weight takes PEFT's backward (the
    products recomputed from the float32 factors): their gradients were up to 2e-4 off PEFT's on |g| 0.02."""
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel
    from torch_helpers import peft_reference

    config = {"lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
              "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
              "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
              "loha": LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
              "lokr": LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], decompose_both=True,
                                 decompose_factor=4)}
    peft_reference(llama, config[method], tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(fresh(llama), str(tmp_path), is_trainable=True)
    ours = fresh(llama)
    adapterspec.load_adapter(ours, tmp_path, trainable=True)
    results = []
    for model in (ours, theirs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**token_inputs, labels=token_inputs["input_ids"]).loss
        loss.backward()
        grads = sorted(p.grad.abs().sum().item() for p in model.parameters() if p.requires_grad)
        results.append((loss.item(), grads))
    assert results[0][0] == results[1][0]
    assert len(results[0][1]) == len(results[1][1]) > 0 and results[0][1] == results[1][1]


@pytest.mark.parametrize("case", ["loha-rank", "loha-module", "lokr-rank", "lokr-rank-unscaled", "lokr-module"])
def test_lycoris_dropouts_train_as_peft(llama: Any, token_inputs: dict[str, Any], tmp_path: Path, case: str) -> None:
    """LoHa/LoKr ``rank_dropout`` and ``module_dropout`` in training mode: with one seed, each forward drops what
    PEFT's drops (the same draws, in the same order), so losses and gradients are PEFT's to the bit; they were
    ignored (every training forward gave the eval loss, gradients 40-600% off PEFT's)."""
    from peft import LoHaConfig, LoKrConfig, PeftModel
    from torch_helpers import peft_reference

    method, kind = case.split("-", 1)
    make = LoHaConfig if method == "loha" else LoKrConfig
    field = "module_dropout" if kind == "module" else "rank_dropout"
    extra = {"rank_dropout_scale": kind == "rank"} if method == "lokr" else {}
    config = make(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False,
                  **{field: 0.5 if kind == "module" else 0.3}, **extra)
    peft_reference(llama, config, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(fresh(llama), str(tmp_path), is_trainable=True).train()
    ours = fresh(llama).train()
    adapterspec.load_adapter(ours, tmp_path, trainable=True)
    results = []
    for model in (ours, theirs):
        torch.manual_seed(7)
        losses = [model(**token_inputs, labels=token_inputs["input_ids"]).loss for _ in range(3)]
        sum(losses).backward()
        grads = sorted(p.grad.abs().sum().item() for p in model.parameters() if p.requires_grad)
        results.append(([loss.item() for loss in losses], grads))
    model.eval()
    with torch.no_grad():
        plain = model(**token_inputs, labels=token_inputs["input_ids"]).loss.item()
    assert len(set(results[1][0])) > 1 and plain not in results[1][0]  # the dropout draws do change PEFT's forward
    assert results[0][0] == results[1][0]
    assert len(results[0][1]) == len(results[1][1]) > 0
    assert results[0][1] == results[1][1]


def test_loha_effective_conv_gradients_are_the_true_ones() -> None:
    """LoHa's effective (CP) form on a 3x3 convolution: autograd's gradients equal central differences in float64
    for every factor. (PEFT 0.21's custom backward differs for ``hada_w1_a``/``hada_w2_a``: -2.8e-3 true, +4.3e-4
    PEFT's; this backend does not copy it: SPEC.md 8.7.)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).double()
    adapterspec.inject_adapter(model, {"peft_type": "LOHA", "r": 2, "alpha": 4, "target_modules": ["0"],
                                       "use_effective_conv2d": True})
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("hada_t1" in n for n in params) and len(params) == 6
    with torch.no_grad():
        for i, p in enumerate(params.values()):
            p.copy_(torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.7 + i).reshape(p.shape) * 0.5)
    x = torch.cos(torch.arange(2 * 3 * 6 * 6, dtype=torch.float64)).reshape(2, 3, 6, 6)

    def loss() -> torch.Tensor:
        return (model(x) ** 2).sum()

    loss().backward()
    for name, p in params.items():
        for index in (0, p.numel() // 2, p.numel() - 1):
            with torch.no_grad():
                flat = p.view(-1)
                flat[index] += 1e-6
                up = loss().item()
                flat[index] -= 2e-6
                down = loss().item()
                flat[index] += 1e-6
            numeric = (up - down) / 2e-6
            assert p.grad.view(-1)[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-7), (name, index)
