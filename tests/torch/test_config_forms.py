"""Spec 1.1 config forms on the torch backend: what PEFT fills from the model at load, adapterspec fills the
same way (null ``target_modules`` from PEFT's per-architecture table, prompt sizes from ``model.config``);
methods the spec does not define are refused with ``UnsupportedError``; layers the backend cannot adapt
are reported as such (SPEC.md 14)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any, cast

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from adapterspec.errors import ConfigError, UnsupportedError  # noqa: E402
from torch_helpers import assert_close, assert_same_snapshot, fresh, logits, peft_reference, snapshot  # noqa: E402


def _edit(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _peft_loads(base: Any, folder: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(fresh(base), str(folder)).eval()


@pytest.mark.parametrize(("make", "changes"), [
    (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), {"target_modules": None}),
    (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), {"target_modules": ...}),
    (lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
     {"target_modules": None, "feedforward_modules": None}),
    (lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]), {"target_modules": None}),
    (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "q_proj"]),
     {"target_modules": ["q_proj", "v_proj", "q_proj"]}),
], ids=["lora-null", "lora-absent", "ia3-null", "loha-null", "lora-duplicates"])
def test_null_targets_load_as_peft_resolves_them(llama: Any, token_inputs: dict[str, Any], tmp_path: Path,
                                                 make: Any, changes: dict[str, Any]) -> None:
    """PEFT's ``save_pretrained`` writes the resolved list; the config is edited back to the form PEFT also
    accepts, and both PEFT and adapterspec load the edited folder to the same outputs."""
    peft_reference(llama, make(), tmp_path)
    _edit(tmp_path, **changes)
    expected = logits(_peft_loads(llama, tmp_path), token_inputs)
    assert (expected - logits(llama, token_inputs)).abs().max() > 1e-3
    model = fresh(llama)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the duplicate's AdapterSpecWarning
        modules = adapterspec.load_adapter(model, tmp_path)
    assert sorted({m.rsplit(".", 1)[1] for m in modules}) == sorted(set(make().target_modules))
    assert len(modules) == 2 * len(set(make().target_modules))  # two layers
    assert_close(logits(model, token_inputs), expected)


def test_a_field_the_method_does_not_know_changes_nothing_as_in_peft(llama: Any, token_inputs: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    """IA3 has no ``layers_to_transform``: PEFT drops it with a warning and adapts every layer; the field is
    kept as unknown (with the note saying it is not acted on) and targeting ignores it too."""
    make = lambda: peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])  # noqa: E731
    peft_reference(llama, make(), tmp_path)
    _edit(tmp_path, layers_to_transform=[1], layers_pattern="layers")
    expected = logits(_peft_loads(llama, tmp_path), token_inputs)
    model = fresh(llama)
    with pytest.warns(adapterspec.AdapterSpecWarning, match="not acted on: layers_pattern, layers_to_transform"):
        modules = adapterspec.load_adapter(model, tmp_path)
    assert sorted(modules) == [f"model.layers.{i}.{m}" for i in (0, 1)
                               for m in ("mlp.down_proj", "self_attn.k_proj")]
    assert_close(logits(model, token_inputs), expected)


def test_null_targets_on_an_unknown_architecture_refused(tmp_path: Path) -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(4, 4)

    base = Net()
    peft_reference(base, peft.LoraConfig(r=2, target_modules=["q_proj"]), tmp_path)
    _edit(tmp_path, target_modules=None)
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as info:
        adapterspec.load_adapter(model, tmp_path)
    assert info.value.pointer == "/target_modules" and "None" in info.value.message
    assert_same_snapshot(model, before)


@pytest.mark.parametrize(("make", "dropped"), [
    (lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
     ("token_dim", "num_layers", "num_attention_heads")),
    (lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
     ("token_dim", "num_layers", "num_attention_heads")),
], ids=["prefix", "prompt"])
def test_prompt_sizes_filled_from_the_model(llama: Any, token_inputs: dict[str, Any], tmp_path: Path,
                                            make: Any, dropped: tuple[str, ...]) -> None:
    peft_reference(llama, make(), tmp_path)
    _edit(tmp_path, **dict.fromkeys(dropped, ...))
    expected = logits(_peft_loads(llama, tmp_path), token_inputs)
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path)
    assert_close(logits(model, token_inputs), expected)
    with pytest.raises(adapterspec.ShapeMismatchError):  # the sizes from the model still check the tensor
        other = fresh(llama)
        small = tmp_path / "small"
        peft_reference(llama, make(), small)
        _edit(small, num_virtual_tokens=make().num_virtual_tokens + 1, **dict.fromkeys(dropped, ...))
        adapterspec.load_adapter(other, small)


def test_prefix_sizes_the_config_gives_are_recomputed_on_a_gqa_model(llama: Any, token_inputs: dict[str, Any],
                                                                    tmp_path: Path) -> None:
    """PEFT's method_comparison prefixtuning/llama-3.2-3B-* configs give token_dim = the hidden size and
    num_attention_heads = the attention heads of a grouped-query model; PEFT recomputes both from its key/value
    heads (SPEC.md 14.3) and loads the tensor [3, 2 * 2 * 32]. It was refused by check 12 with the config's sizes
    ("shape [3, 128] disagrees with the config ... [3, 256]"), by validate too."""
    peft_reference(llama, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), tmp_path)
    _edit(tmp_path, token_dim=64, num_attention_heads=4)  # tiny Llama: hidden 64, 4 heads, 2 key/value heads of 16
    expected = logits(_peft_loads(llama, tmp_path), token_inputs)
    assert (expected - logits(llama, token_inputs)).abs().max() > 1e-2
    assert adapterspec.validate_adapter(tmp_path) == []
    model = fresh(llama)
    assert adapterspec.load_adapter(model, tmp_path) == []
    assert_close(logits(model, token_inputs), expected)

    # a tensor laid out with the config's sizes [3, 2 * 2 * 64] fits the config but not the model: PEFT refuses it too
    from safetensors.torch import load_file, save_file

    wide = tmp_path / "wide"
    peft_reference(llama, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), wide)
    _edit(wide, token_dim=64, num_attention_heads=4)
    tensor = load_file(wide / "adapter_model.safetensors")["prompt_embeddings"]
    save_file({"prompt_embeddings": torch.cat([tensor, tensor], dim=1)}, wide / "adapter_model.safetensors")
    with pytest.raises(RuntimeError, match="size mismatch"):
        _peft_loads(llama, wide)
    assert adapterspec.validate_adapter(wide) == []  # without the model: any key/value width
    other = fresh(llama)
    before = snapshot(other)
    with pytest.raises(adapterspec.ShapeMismatchError) as info:
        adapterspec.load_adapter(other, wide)
    assert info.value.key == "prompt_embeddings" and "[3, 256]" in info.value.message
    assert_same_snapshot(other, before)
    bad = tmp_path / "bad"  # not [num_virtual_tokens, num_layers * 2 * d] for any d: refused without the model
    shutil.copytree(wide, bad)
    save_file({"prompt_embeddings": tensor[:, :-2].contiguous()}, bad / "adapter_model.safetensors")
    assert [e.key for e in adapterspec.validate_adapter(bad)] == ["prompt_embeddings"]


@pytest.mark.parametrize(("make", "changes"), [
    (lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
     {"prompt_tuning_init": "PromptTuningInit.TEXT", "prompt_tuning_init_text": "Classify:"}),
    (lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
     {"prompt_tuning_init": "PromptTuningInit.SAMPLE_VOCAB"}),
    (lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), {"prompt_tuning_init": None}),
    (lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16),
     {"encoder_reparameterization_type": "PromptEncoderReparameterizationType.LSTM"}),
    (lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), {"init_weights": "ZERO"}),
], ids=["prompt-init-enum-str", "prompt-init-enum-str-vocab", "prompt-init-null", "p-tuning-encoder-enum-str",
        "prefix-init-other"])
def test_init_fields_load_whatever_peft_loads(llama: Any, token_inputs: dict[str, Any], tmp_path: Path, make: Any,
                                             changes: dict[str, Any]) -> None:
    """PEFT compares these training-time fields with its str enums (or 'zero') and takes any other value for the
    default; it loads them all and writes them back as given. A published tutorial config has
    "prompt_tuning_init": "PromptTuningInit.TEXT" (the enum's str()): it was a ConfigError ("is not one of
    ['RANDOM', 'SAMPLE_VOCAB', 'TEXT']")."""
    peft_reference(llama, make(), tmp_path / "peft")
    _edit(tmp_path / "peft", **changes)
    expected = logits(_peft_loads(llama, tmp_path / "peft"), token_inputs)
    assert adapterspec.validate_adapter(tmp_path / "peft") == []
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_close(logits(model, token_inputs), expected)
    adapterspec.save_adapter(model, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert {k: saved[k] for k in changes} == changes  # kept as given, as PEFT keeps them


def test_enum_fields_peft_refuses_in_their_str_form_are_refused(llama: Any, tmp_path: Path) -> None:
    """task_type and peft_type are checked by PEFT against the enums' values: "TaskType.CAUSAL_LM" is a ValueError,
    "PeftType.PROMPT_TUNING" a KeyError. A fresh prompt with exactly "TEXT" needs PEFT's tokenizer initialisation:
    refused (it was initialised at random, silently); "PromptTuningInit.TEXT" is random in PEFT too."""
    peft_reference(llama, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), tmp_path)
    for field, value in (("task_type", "TaskType.CAUSAL_LM"), ("peft_type", "PeftType.PROMPT_TUNING")):
        _edit(tmp_path, **{field: value})
        with pytest.raises((ValueError, KeyError)):
            _peft_loads(llama, tmp_path)
        with pytest.raises(ConfigError) as info:
            adapterspec.load_adapter(fresh(llama), tmp_path)
        assert info.value.pointer == f"/{field}"
        _edit(tmp_path, task_type="CAUSAL_LM", peft_type="PROMPT_TUNING")
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3,
              "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "Classify:", "tokenizer_name_or_path": "t"}
    model = fresh(llama)
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as refused:
        adapterspec.inject_adapter(model, config)
    assert refused.value.pointer == "/prompt_tuning_init"
    assert_same_snapshot(model, before)
    adapterspec.inject_adapter(model, {**config, "prompt_tuning_init": "PromptTuningInit.TEXT"})


def test_a_fresh_prefix_with_init_weights_zero_starts_at_zero_as_in_peft(llama: Any, token_inputs: dict[str, Any],
                                                                       tmp_path: Path) -> None:
    """PEFT starts the prefix at zero for exactly init_weights "zero" (it started at random here: logits 0.61 off PEFT's
    prefix); a fresh one gives PEFT's logits then, and any other value stays random."""
    from safetensors.torch import load_file

    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "init_weights": "zero"}
    reference = peft.get_peft_model(fresh(llama), peft.PrefixTuningConfig(**{k: v for k, v in config.items()
                                                                            if k != "peft_type"})).eval()
    model = fresh(llama)
    adapterspec.inject_adapter(model, config)
    adapterspec.save_adapter(model, tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")["prompt_embeddings"]
    assert ours.shape == (3, 2 * 2 * 32) and not ours.any()
    assert_close(logits(model, token_inputs), logits(reference, token_inputs))
    other = fresh(llama)
    adapterspec.inject_adapter(other, {**config, "init_weights": "ZERO"})  # random in PEFT too
    adapterspec.save_adapter(other, tmp_path / "random")
    assert load_file(tmp_path / "random" / "adapter_model.safetensors")["prompt_embeddings"].abs().min() > 0


def test_not_portable_method_refused_at_load(llama: Any, tmp_path: Path) -> None:
    peft_reference(llama, peft.FourierFTConfig(n_frequency=4, target_modules=["q_proj", "v_proj"]), tmp_path)  # stays not portable
    _peft_loads(llama, tmp_path)  # PEFT loads it
    model = fresh(llama)
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as info:
        adapterspec.load_adapter(model, tmp_path)
    assert not isinstance(info.value, ConfigError)
    assert info.value.pointer == "/peft_type" and "FOURIERFT" in info.value.message and "PEFT" in info.value.message
    assert_same_snapshot(model, before)
    with pytest.warns(adapterspec.AdapterSpecWarning, match="not portable"):
        assert adapterspec.validate_adapter(tmp_path) == []


def test_multihead_attention_reports_the_backend_refusal(tmp_path: Path) -> None:
    """PEFT's LoRA on nn.MultiheadAttention saves keys under ``attn.base_layer.out_proj`` too; the backend's
    UnsupportedError (it cannot adapt the layer) is the error, not the tensor check it sets off."""
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: Any) -> Any:
            return self.attn(x, x, x)[0]

    torch.manual_seed(0)
    base = Net()
    peft_reference(base, peft.LoraConfig(r=2, target_modules=["attn"]), tmp_path)
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as info:
        adapterspec.load_adapter(model, tmp_path)
    assert info.value.key == "attn" and "MultiheadAttention" in info.value.message
    assert_same_snapshot(model, before)


class _OneConv(torch.nn.Module):
    def __init__(self, conv: torch.nn.Module) -> None:
        super().__init__()
        self.c = conv

    def forward(self, x: Any) -> Any:
        return self.c(x)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize(("make_conv", "needle"), [
    # the shapes line up: it ran, and merging changed the output by 2.84
    (lambda: torch.nn.Conv2d(8, 8, 3, stride=5, padding=1, dilation=2), "dilation=(2, 2)"),
    # lora_A's output is larger than the layer's: the first forward raised torch's RuntimeError
    (lambda: torch.nn.Conv1d(8, 8, 3, padding=2, dilation=2), "dilation=(2,)"),
    (lambda: torch.nn.Conv3d(4, 4, (1, 3, 1), padding=(0, 1, 0), dilation=(1, 3, 1)), "dilation=(1, 3, 1)"),
    # zero-padded lora_A under a circularly padded kernel: merged and unmerged differed by 2.6 (PEFT too)
    (lambda: torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), "padding_mode='circular'"),
], ids=["conv2d", "conv1d", "conv3d", "circular"])
def test_lora_on_a_dilated_conv_is_refused(make_conv: Any, needle: str, dora: bool, tmp_path: Path) -> None:
    """SPEC.md 8.1: PEFT's lora_A has the base layer's kernel size, stride and padding but no dilation (and zero
    padding), so the unmerged and merged forms differ; load and inject refuse the layer, naming it."""
    torch.manual_seed(0)
    base = _OneConv(make_conv()).eval()
    peft_reference(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c"], use_dora=dora), tmp_path)
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as info:
        adapterspec.load_adapter(model, tmp_path)
    assert info.value.key == "c" and needle in info.value.message
    assert_same_snapshot(model, before)
    with pytest.raises(UnsupportedError, match="dilation|padding_mode"):
        adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 4, "target_modules": ["c"], "use_dora": dora})
    assert_same_snapshot(model, before)


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
@pytest.mark.parametrize(("make_config", "label"), [
    # merged - unmerged on PEFT's reflect-padded conv: LoHa 36.3, LoKr 14.9, AdaLoRA 1.23 (the same layers loaded and
    # merged here without a word)
    (lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["c"]), "LoHa"),
    (lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=["c"]), "LoKr"),
    (lambda: peft.AdaLoraConfig(r=2, init_r=2, total_step=10, target_modules=["c"]), "AdaLoRA"),
], ids=["loha", "lokr", "adalora"])
def test_a_zero_padded_delta_on_a_conv_with_another_padding_mode_is_refused(make_config: Any, label: str, mode: str,
                                                                            tmp_path: Path) -> None:
    """SPEC.md 8.6, 8.7, 15.4: PEFT's unmerged LoHa, LoKr and AdaLoRA convolve the input with the delta weight with
    zero padding, whatever the layer's padding_mode, so merged and unmerged differ (as LoRA's lora_A, SPEC.md 8.1):
    load and inject refuse the layer, naming it, the model unchanged. (IA3 scales channels, which padding copies:
    its merge stays exact.)"""
    torch.manual_seed(0)
    base = _OneConv(torch.nn.Conv2d(4, 6, 3, padding=1, padding_mode=mode)).eval()
    peft_reference(base, make_config(), tmp_path)
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as info:
        adapterspec.load_adapter(model, tmp_path)
    assert info.value.key == "c" and f"{label} on a Conv2d with padding_mode={mode!r}" in info.value.message
    assert_same_snapshot(model, before)
    if label == "AdaLoRA":
        return  # a new AdaLoRA adapter is refused as such (training AdaLoRA is not implemented)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    with pytest.raises(UnsupportedError, match=f"padding_mode={mode!r}"):
        adapterspec.inject_adapter(model, config)
    assert_same_snapshot(model, before)


@pytest.mark.parametrize("feedforward", [True, False], ids=["input", "output"])
def test_ia3_on_a_conv_with_another_padding_mode_loads_and_merges_as_peft(feedforward: bool, tmp_path: Path) -> None:
    """IA3 scales the input (or output) channels, and padding copies values within a channel: its merge is exact on
    a reflect-padded conv, which loads as in PEFT."""
    torch.manual_seed(0)
    base = _OneConv(torch.nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")).eval()
    reference = peft_reference(base, peft.IA3Config(target_modules=["c"], feedforward_modules=["c"] if feedforward
                                                    else []), tmp_path)
    x = torch.sin(torch.arange(2 * 4 * 5 * 5, dtype=torch.float32)).reshape(2, 4, 5, 5)
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    with torch.no_grad():
        expected = reference(x)
        assert (expected - base(x)).abs().max() > 1e-2
        assert_close(model(x), expected, length=36)
        adapterspec.merge_adapters(model)
        assert_close(model(x), expected, length=36)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_dilation_along_a_kernel_of_one_loads_as_peft(dora: bool, tmp_path: Path) -> None:
    """Dilation along an axis where the kernel has size 1 changes nothing (PEFT's lora_A computes the layer's own
    window): such a conv loads, unmerged and merged equal to PEFT's."""
    torch.manual_seed(0)
    base = _OneConv(torch.nn.Conv2d(4, 6, (3, 1), padding=(1, 0), dilation=(1, 2))).eval()
    reference = peft_reference(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c"], use_dora=dora), tmp_path)
    x = torch.sin(torch.arange(2 * 4 * 5 * 5, dtype=torch.float32)).reshape(2, 4, 5, 5)
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    with torch.no_grad():
        expected = reference(x)
        assert (expected - base(x)).abs().max() > 1e-3
        assert_close(model(x), expected, length=12)
        reference.merge_adapter()
        adapterspec.merge_adapters(model)
        assert_close(model(x), reference(x), length=12)


class _TwoLinears(torch.nn.Module):
    """Not a transformers model: ``all-linear`` has no output layer to leave out (PEFT's rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(4, 6)
        self.act = torch.nn.ReLU()
        self.out = torch.nn.Linear(6, 3)

    def forward(self, x: Any) -> Any:
        return self.out(self.act(self.up(x)))


@pytest.mark.parametrize("base_name", ["llama", "gpt2", "plain"])
def test_all_linear_loads_as_peft_expands_it(request: pytest.FixtureRequest, token_inputs: dict[str, Any],
                                             tmp_path: Path, base_name: str) -> None:
    """SPEC.md 4.3: ``target_modules: "all-linear"`` (any case) is every Linear / Conv1D module but the output
    layer of a transformers model. PEFT writes the list it expanded; the folder edited back to the shorthand
    loads in PEFT and in adapterspec onto the same modules with the same outputs."""
    torch.manual_seed(4)
    base = _TwoLinears().eval() if base_name == "plain" else request.getfixturevalue(base_name)
    peft_model = peft_reference(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"), tmp_path)
    expanded = set(json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"])
    _edit(tmp_path, target_modules="ALL-Linear")
    model = fresh(base)
    modules = adapterspec.load_adapter(model, tmp_path)
    assert set(modules) == expanded
    assert ("lm_head" in expanded) is False and (base_name != "plain" or expanded == {"up", "out"})
    if base_name == "plain":
        x = torch.linspace(-1, 1, 8).reshape(2, 4)
        expected = _peft_loads(base, tmp_path)(x)
        assert_close(model(x), expected)
        assert_close(peft_model(x), expected)
    else:
        expected = logits(_peft_loads(base, tmp_path), token_inputs)
        assert (expected - logits(base, token_inputs)).abs().max() > 1e-3
        assert_close(logits(model, token_inputs), expected)


@pytest.mark.parametrize("changes", [
    {"alpha_pattern": {"v_proj": 40, ".*_proj": 5}},  # unsorted: v_proj's own key comes first and wins
    {"r": 4.0, "rank_pattern": {"v_proj": 2.0}},  # integral floats: PEFT itself cannot load these
], ids=["pattern-order", "integral-floats"])
def test_saved_config_reloads_to_the_same_outputs_in_peft(llama: Any, token_inputs: dict[str, Any], tmp_path: Path,
                                                          changes: dict[str, Any]) -> None:
    """A config form PEFT's reader accepts (pattern keys in document order) or that the spec asks readers to
    normalise (``4.0`` for an integer) is saved so that PEFT and adapterspec reload it to the outputs it was
    loaded with: the pattern keys keep their order, integers are written as integers (SPEC.md 3.1, 4.1, 4.4)."""
    peft_reference(llama, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          rank_pattern={"v_proj": 2}), tmp_path / "src")
    _edit(tmp_path / "src", **changes)
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "src")
    loaded = logits(model, token_inputs)
    if "alpha_pattern" in changes:  # PEFT reads the edited order as adapterspec does; sorted, it differs
        assert_close(loaded, logits(_peft_loads(llama, tmp_path / "src"), token_inputs))
        _edit(tmp_path / "src", alpha_pattern=dict(sorted(changes["alpha_pattern"].items())))
        assert (logits(_peft_loads(llama, tmp_path / "src"), token_inputs) - loaded).abs().max() > 1e-2
    adapterspec.save_adapter(model, tmp_path / "saved")
    text = (tmp_path / "saved" / "adapter_config.json").read_text()
    saved = json.loads(text)
    for field, value in changes.items():
        assert json.dumps(saved[field]) == json.dumps(value).replace(".0", "")  # order kept, integers as integers
    assert list(saved) == sorted(saved)  # the rest as PEFT writes it
    assert_close(logits(_peft_loads(llama, tmp_path / "saved"), token_inputs), loaded)
    again = fresh(llama)
    adapterspec.load_adapter(again, tmp_path / "saved")
    assert torch.equal(logits(again, token_inputs), loaded)


@pytest.mark.parametrize(("task", "head"), [("SEQ_CLS", "classifier"), ("QUESTION_ANS", "qa_outputs")])
def test_a_task_heads_are_saved_whole_even_when_the_config_lists_none(tmp_path: Path, task: str, head: str) -> None:
    """PEFT's task classes add their heads to ``modules_to_save`` at every load (SPEC.md 4.3), so older configs
    with a null ``modules_to_save`` carry the head in the file: it loads as PEFT loads it, and is written back as
    it was (the config still null, the head's tensors saved)."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForQuestionAnswering, BertForSequenceClassification

    torch.manual_seed(4)
    bert = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      vocab_size=128, max_position_embeddings=64, num_labels=3 if task == "SEQ_CLS" else 2)
    base = (BertForSequenceClassification if task == "SEQ_CLS" else BertForQuestionAnswering)(bert).eval()
    ids = (torch.arange(18).reshape(2, 9) * 7) % 128

    def outputs(model: Any) -> Any:
        with torch.no_grad():
            out = model(input_ids=ids)
        return out.logits if task == "SEQ_CLS" else torch.cat((out.start_logits, out.end_logits))

    peft_reference(base, peft.LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules=["query", "value"]),
                   tmp_path / "src")
    _edit(tmp_path / "src", modules_to_save=None)
    head_weight = load_file(str(tmp_path / "src" / "adapter_model.safetensors"))[f"base_model.model.{head}.weight"]
    assert not torch.equal(head_weight, getattr(base, head).weight)  # the head was trained: loading it matters
    expected = outputs(_peft_loads(base, tmp_path / "src"))
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "src")
    assert_close(outputs(model), expected)
    adapterspec.save_adapter(model, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "adapter_config.json").read_text())["modules_to_save"] is None
    assert torch.equal(load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))[
        f"base_model.model.{head}.weight"], head_weight)
    assert_close(outputs(_peft_loads(base, tmp_path / "saved")), expected)


def _moe(model_type: str) -> Any:
    import transformers

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=128, max_position_embeddings=64)
    extra: dict[str, Any] = dict(num_local_experts=2, num_experts_per_tok=1, intermediate_size_mlp=64, head_dim=8,
                                 interleave_moe_layer_step=1, no_rope_layers=[1, 0], attention_chunk_size=4) \
        if model_type == "llama4_text" else dict(num_local_experts=4, num_experts_per_tok=2)
    config = transformers.AutoConfig.for_model(model_type, **sizes, **extra)
    torch.manual_seed(0)
    if model_type == "llama4_text":
        return transformers.Llama4ForCausalLM(config).eval()
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(("model_type", "make"), [
    ("llama4_text", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["router", "q_proj"])),
    ("llama4_text", lambda: peft.IA3Config(target_modules=["router", "q_proj"], feedforward_modules=[])),
    ("llama4_text", lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["router", "q_proj"])),
    ("phimoe", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["router", "q_proj"])),
], ids=["llama4-lora", "llama4-ia3", "llama4-loha", "phimoe-lora"])
def test_a_router_returning_a_tuple_is_refused_at_load(model_type: str, make: Any, tmp_path: Path) -> None:
    """Llama 4's and PhiMoE's routers are nn.Linear subclasses whose forward returns a tuple (scores and logits):
    PEFT loads an adapter on them and its forward fails; adapterspec loaded it too, and the first forward raised a raw
    AttributeError ('tuple' object has no attribute 'dtype'). Now load and inject refuse the router, naming it."""
    base = _moe(model_type)
    peft_reference(base, make(), tmp_path)
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as info:
        adapterspec.load_adapter(model, tmp_path)
    assert info.value.key == "model.layers.0.feed_forward.router" if model_type == "llama4_text" else \
        info.value.key == "model.layers.0.mlp.router"
    assert "returns a tuple" in info.value.message and "target_parameters" in (info.value.hint or "")
    assert_same_snapshot(model, before)
    with pytest.raises(UnsupportedError, match="returns a tuple"):
        adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "target_modules": "all-linear"})
    assert_same_snapshot(model, before)


class _Router(torch.nn.Linear):
    """An nn.Linear subclass returning its logits with their top-1 index; annotated as such or not."""

    def forward(self, x: Any) -> Any:
        logits = super().forward(x)
        return logits, logits.argmax(-1)


class _AnnotatedRouter(_Router):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cast("tuple[torch.Tensor, torch.Tensor]", super().forward(x))


class _Routed(torch.nn.Module):
    def __init__(self, router: type[torch.nn.Linear]) -> None:
        super().__init__()
        self.up = torch.nn.Linear(4, 4)
        self.router = router(4, 3)

    def forward(self, x: Any) -> Any:
        return self.router(self.up(x))[0]


def test_a_layer_annotated_to_return_a_tuple_is_refused_at_load(tmp_path: Path) -> None:
    base = _Routed(_AnnotatedRouter)
    peft_reference(base, peft.LoraConfig(r=2, target_modules=["up", "router"]), tmp_path)
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(UnsupportedError, match="returns a tuple") as info:
        adapterspec.load_adapter(model, tmp_path)
    assert info.value.key == "router"
    assert_same_snapshot(model, before)


@pytest.mark.parametrize("make", [
    lambda: peft.LoraConfig(r=2, target_modules=["up", "router"]),
    lambda: peft.LoraConfig(r=2, target_modules=["up", "router"], use_dora=True),
    lambda: peft.IA3Config(target_modules=["up", "router"], feedforward_modules=["router"]),
    lambda: peft.OFTConfig(r=2, oft_block_size=0, target_modules=["up", "router"]),
], ids=["lora", "dora", "ia3", "oft"])
def test_a_layer_found_to_return_a_tuple_at_the_first_forward_is_refused_there(make: Any, tmp_path: Path) -> None:
    """Without a known class or an annotation the tuple shows at the first forward: an UnsupportedError naming the
    module there, where a raw AttributeError / TypeError came from the adapter's arithmetic."""
    base = _Routed(_Router)
    peft_reference(base, make(), tmp_path)
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    with pytest.raises(UnsupportedError, match="returned a tuple") as info:
        model(torch.ones(2, 4))
    assert info.value.key == "router"


class _Pooling(torch.nn.Module):
    """nn.MultiheadAttention and a Linear head (SigLIP's pooling head): MHA's forward reads ``out_proj.weight`` and
    ``out_proj.bias`` itself and never calls ``out_proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: Any) -> Any:
        return self.head(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("make", [
    lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["out_proj", "head"]),
    lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["out_proj"], use_dora=True),
    lambda: peft.IA3Config(target_modules=["out_proj"], feedforward_modules=[]),
    lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["out_proj"]),
    lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=["out_proj"]),
    lambda: peft.OFTConfig(r=2, oft_block_size=0, target_modules=["out_proj"]),
    lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["head"], target_parameters=["attn.out_proj.weight"]),
], ids=["lora", "dora", "ia3", "loha", "lokr", "oft", "parameter"])
def test_an_adapter_on_multihead_attention_s_out_proj_is_refused(make: Any, tmp_path: Path) -> None:
    """PEFT adapts the out_proj Linear and its adapter does nothing unmerged, then changes the output once merged;
    adapterspec did the same (unmerged effect 0.0, merged 0.62 from the unmerged output). Now load and inject refuse
    the module, naming it, model unchanged."""
    torch.manual_seed(0)
    base = _Pooling().eval()
    peft_reference(base, make(), tmp_path)
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as info:
        adapterspec.load_adapter(model, tmp_path)
    assert info.value.key == "attn.out_proj" and "MultiheadAttention" in info.value.message
    assert "exclude_modules=['attn.out_proj']" in (info.value.hint or "")
    assert_same_snapshot(model, before)


def test_all_linear_selecting_an_out_proj_is_refused_until_excluded(tmp_path: Path) -> None:
    """PEFT's all-linear selects MultiheadAttention's out_proj (as adapterspec expands it, SPEC.md 4.3): the load
    or inject is refused, naming the module and the exclude_modules that fixes it; with it, the adapter equals
    PEFT's, and out_proj saved whole (modules_to_save: MHA reads the running copy's weight) does too."""
    torch.manual_seed(0)
    base = _Pooling().eval()
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as info:
        adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 4, "target_modules": "all-linear"})
    assert info.value.key == "attn.out_proj" and "all-linear" in (info.value.hint or "")
    assert_same_snapshot(model, before)
    x = torch.sin(torch.arange(2 * 5 * 16, dtype=torch.float32)).reshape(2, 5, 16)
    for i, config in enumerate([
            peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["attn.out_proj"]),
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=["head"], modules_to_save=["out_proj"])]):
        folder = tmp_path / str(i)
        reference = peft_reference(base, config, folder)
        with torch.no_grad():
            expected = reference(x)
            assert (expected - base(x)).abs().max() > 1e-3
        model = fresh(base)
        adapterspec.load_adapter(model, folder)
        with torch.no_grad():
            assert_close(model(x), expected)
