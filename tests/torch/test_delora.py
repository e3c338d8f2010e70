"""DeLoRA (SPEC.md 17.6) exact against PEFT 0.21 in both directions, merge and unmerge included; refusals typed.

One PEFT model (tiny Llama, element-unique ``delora_A``/``delora_B``/``delora_lambda``, a ``delora_w_norm`` that is
*not* the base's column norms, a ``rank_pattern``) is saved once per module: ``adapterspec.load_adapter`` gives PEFT's
logits on a fresh copy of the base, ``save_adapter`` writes PEFT's tensors bit for bit, which PEFT loads silently;
merging gives PEFT's merged logits and unmerging its unmerged weights.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from adapterspec.errors import UnsupportedError  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch_helpers import (  # noqa: E402
    assert_close,
    assert_peft_loads_ours,
    assert_saved_as_peft_saved,
    assert_same_snapshot,
    fresh,
    logits,
    peft_reference,
    snapshot,
    unique_values,
)

TARGETS = ["q_proj", "v_proj", "down_proj"]
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _fill(model: Any, *, adapter: str = "default", salt: int = 0) -> None:
    """Element-unique A and B, a bound per module, and w_norm scaled away from the base's norms (so a reader that
    recomputed it from the base would be caught)."""
    with torch.no_grad():
        for index, (name, tensor) in enumerate(sorted([*model.named_parameters(), *model.named_buffers()])):
            if not name.endswith(f".{adapter}") or "delora_" not in name:
                continue
            if "delora_lambda" in name:
                tensor.fill_(2.0 + 0.25 * ((salt + index) % 7))
            elif "delora_w_norm" in name:
                tensor.mul_(unique_values(tuple(tensor.shape), salt + index, around=1.0, scale=0.3))
            else:
                tensor.copy_(unique_values(tuple(tensor.shape), salt + index, scale=0.5))


def _config(**kwargs: Any) -> Any:
    from peft import DeloraConfig

    return DeloraConfig(**{"r": 4, "target_modules": TARGETS, "rank_pattern": {"down_proj": 2}, **kwargs})


@pytest.fixture(scope="module")
def saved(llama: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The PEFT reference model (eval) and its folder."""
    folder = tmp_path_factory.mktemp("delora") / "peft"
    return peft_reference(llama, _config(), folder, fill=_fill), folder


def test_peft_folder_roundtrip_merge_unmerge(saved: tuple[Any, Path], llama: Any, token_inputs: Any, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    reference, folder = saved
    expected = logits(reference, token_inputs)
    base_out = logits(llama, token_inputs)
    assert (expected - base_out).abs().max() > 1e-2, "the adapter must change the output for the test to mean anything"
    assert adapterspec.validate_adapter(folder) == []

    # PEFT folder -> adapterspec: PEFT's operations in PEFT's order (measured bit-equal)
    model = fresh(llama)
    adapterspec.load_adapter(model, folder)
    assert_close(logits(model, token_inputs), expected)
    with adapterspec.disabled_adapters(model):
        assert_close(logits(model, token_inputs), base_out, atol=0)

    # adapterspec -> folder: PEFT's tensors bit for bit, PEFT's config; PEFT loads it silently
    adapterspec.save_adapter(model, tmp_path / "ours")
    assert_saved_as_peft_saved(folder, tmp_path / "ours")
    assert_peft_loads_ours(llama, folder, tmp_path / "ours", caplog, token_inputs, expected)

    # merge: PEFT's merged logits (the delta rounded to the weight's dtype first); unmerge: PEFT's weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    try:
        merged_expected = logits(reference, token_inputs)
        adapterspec.merge_adapters(model)
        assert_close(logits(model, token_inputs), merged_expected)
        assert_close(logits(model, token_inputs), expected)
    finally:
        reference.unmerge_adapter()
    adapterspec.unmerge_adapters(model)
    restored = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()}
    peft_restored = {k.replace(".base_layer.", ".").replace("base_model.model.", "", 1): v
                     for k, v in reference.state_dict().items()}
    for key, value in llama.state_dict().items():
        assert_close(restored[key], peft_restored[key], atol=0)
        assert_close(restored[key], value, atol=1e-6)
    assert_close(logits(model, token_inputs), expected)


def test_stored_w_norm_and_lambda_are_what_runs(saved: tuple[Any, Path], llama: Any, token_inputs: Any,
                                                tmp_path: Path) -> None:
    """A swapped A/B pair of two modules, a changed bound or a w_norm put back to the base's norms each change the
    logits: the file, not the base or the config, decides the forward."""
    reference, folder = saved
    expected = logits(reference, token_inputs)
    tensors = load_file(folder / "adapter_model.safetensors")
    v = Q.replace("q_proj", "v_proj")
    weight = llama.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    for name, change in (("swap", {f"{Q}.delora_A": tensors[f"{v}.delora_A"], f"{v}.delora_A": tensors[f"{Q}.delora_A"]}),
                         ("lambda", {f"{Q}.delora_lambda": tensors[f"{Q}.delora_lambda"] * 2}),
                         ("w_norm", {f"{Q}.delora_w_norm": torch.norm(weight, dim=0)})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
        save_file({**tensors, **change}, str(tmp_path / name / "adapter_model.safetensors"))
        model = fresh(llama)
        adapterspec.load_adapter(model, tmp_path / name)
        assert (logits(model, token_inputs) - expected).abs().max() > 1e-5, name  # the load itself: bit-equal


@pytest.mark.parametrize("init_weights", [True, False])
def test_inject_draws_peft_s_values_and_trains_what_peft_trains(init_weights: bool, llama: Any,
                                                               token_inputs: Any) -> None:
    """With one seed the fresh tensors are PEFT's bit for bit (kaiming A, zero or kaiming B, the bound from
    lambda_pattern, w_norm the base's column norms); w_norm is not trained (a PEFT buffer)."""
    from peft import get_peft_model

    config = {"peft_type": "DELORA", "r": 3, "target_modules": ["q_proj", "up_proj"], "delora_lambda": 7,
              "lambda_pattern": {"up_proj": 2.5}, "init_weights": init_weights,
              "module_dropout": -0.5}  # PEFT: p <= 0 is no dropout (nn.Identity), not an error
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(fresh(llama), _config(**{k: v for k, v in config.items() if k != "peft_type"},
                                                         rank_pattern={}))
    model = fresh(llama)
    torch.manual_seed(11)
    adapterspec.inject_adapter(model, config, trainable=True)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == reference.get_nb_trainable_parameters()[0]
    ours = {k.replace(".adapter_weights.default.", "."): v for k, v in model.state_dict().items() if "delora_" in k}
    theirs = {k.removeprefix("base_model.model.").replace(".default", ""): v
              for k, v in reference.state_dict().items() if "delora_" in k}
    assert sorted(ours) == sorted(theirs) and len(ours) == 16
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    assert_close(logits(model, token_inputs), logits(reference.eval(), token_inputs))
    assert_close(logits(model.train(), token_inputs), logits(reference.train(), token_inputs))
    model.eval()
    if init_weights:
        assert_close(logits(model, token_inputs), logits(llama, token_inputs), atol=0)


def test_gradients_equal_peft(saved: tuple[Any, Path], llama: Any, token_inputs: Any) -> None:
    _, folder = saved
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(fresh(llama), str(folder), is_trainable=True).train()
    reference(**token_inputs).logits.square().mean().backward()
    expected = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                for n, p in reference.named_parameters() if p.requires_grad}
    model = fresh(llama).train()
    adapterspec.load_adapter(model, folder, trainable=True)
    model(**token_inputs).logits.square().mean().backward()
    got = {n.replace(".adapter_weights.default.", "."): p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(got) == sorted(expected) and len(got) == 18  # A, B, lambda of 6 modules; w_norm is not trained
    for key, grad in expected.items():
        assert grad is not None and grad.abs().max() > 0, key
        assert_close(got[key], grad, atol=1e-5 * float(grad.abs().max()))


def test_bfloat16_base_equals_peft_unmerged_and_merged(saved: tuple[Any, Path], llama: Any,
                                                       token_inputs: Any) -> None:
    """PEFT's dtype policy: float32 adapter tensors, the term summed into a bf16 zero tensor, the float32 delta rounded
    to bf16 before a merge adds it."""
    _, folder = saved
    base = fresh(llama).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(fresh(base), str(folder)).eval()
    model = fresh(base)
    adapterspec.load_adapter(model, folder)
    assert {p.dtype for n, p in model.named_parameters() if "adapter_weights" in n} == {torch.float32}
    assert_close(logits(model, token_inputs).float(), logits(reference, token_inputs).float(), atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model)
    assert_close(logits(model, token_inputs).float(), logits(reference, token_inputs).float(), atol=0)
    reference.unmerge_adapter()
    adapterspec.unmerge_adapters(model)
    peft_weights = {k.replace(".base_layer.", ".").replace("base_model.model.", "", 1): v
                    for k, v in reference.state_dict().items()}
    for key, value in model.state_dict().items():
        if "adapter_weights" not in key:
            assert torch.equal(value, peft_weights[key.replace(".base_layer.", ".")]), key


def test_autocast_returns_the_input_s_dtype_as_peft(saved: tuple[Any, Path], llama: Any, token_inputs: Any) -> None:
    """PEFT's DeLoRA layer casts its result back to the input's dtype (LoRA's keeps the base output's): under
    ``torch.autocast`` (bfloat16 on a float32 model) a layer returned bfloat16 where PEFT's returns float32, and the
    logits drifted by 3.9e-3 downstream (a reviewer's SiLU on gate_proj). Now each layer's dtype and the logits are
    PEFT's, to the bit."""
    reference, folder = saved
    model = fresh(llama)
    adapterspec.load_adapter(model, folder)
    x = unique_values((2, 3, 64), 11, scale=1.0).float()
    ours_layer, peft_layer = model.model.layers[0].self_attn.q_proj, reference.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = ours_layer(x), peft_layer(x)
        got_logits, expected_logits = logits(model, token_inputs), logits(reference, token_inputs)
    assert expected.dtype == torch.float32 and got.dtype == expected.dtype
    assert torch.equal(got, expected)
    assert torch.equal(got_logits, expected_logits)


def test_two_deloras_and_one_with_lora_like_peft(saved: tuple[Any, Path], llama: Any, token_inputs: Any,
                                                 tmp_path: Path) -> None:
    """Two DeLoRA adapters active: PEFT's PeftModel with both active. DeLoRA with LoRA on q_proj: PEFT's
    PeftMixedModel takes no DeLoRA, so the reference is the DeLoRA merged into the base under the LoRA (SPEC.md 8.9)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    _, folder = saved
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(fresh(llama), str(folder)).eval()
        reference.add_adapter("b", _config(r=2, target_modules=["q_proj", "up_proj"], rank_pattern={}))
        _fill(reference, adapter="b", salt=5)
        reference.save_pretrained(str(tmp_path / "ab"))
        reference.base_model.set_adapter(["default", "b"])
    model = fresh(llama)
    adapterspec.load_adapter(model, folder)
    adapterspec.load_adapter(model, tmp_path / "ab" / "b", "b")
    adapterspec.set_active_adapters(model, ["default", "b"])
    assert_close(logits(model, token_inputs), logits(reference, token_inputs))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(fresh(llama), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                target_modules=["q_proj"])).save_pretrained(str(tmp_path / "l"))
        merged = PeftModel.from_pretrained(fresh(llama), str(folder)).merge_and_unload()
        mixed = PeftModel.from_pretrained(merged, str(tmp_path / "l")).eval()
    adapterspec.load_adapter(model, tmp_path / "l", "l")
    adapterspec.set_active_adapters(model, ["default", "l"])
    assert_close(logits(model, token_inputs), logits(mixed, token_inputs))


def _folder(tmp_path: Path, name: str, config: dict[str, Any], tensors: dict[str, Any]) -> Path:
    (tmp_path / name).mkdir()
    (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / name / "adapter_model.safetensors"))
    return tmp_path / name


def test_refusals_are_typed_and_change_nothing(saved: tuple[Any, Path], llama: Any, gpt2: Any,
                                               tmp_path: Path) -> None:
    _, folder = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    cases = [
        ("missing", config, {k: v for k, v in tensors.items() if k != f"{Q}.delora_w_norm"},
         adapterspec.MissingTensorError, "delora_w_norm"),
        ("rank", {**config, "r": 3}, tensors, adapterspec.ShapeMismatchError, "q_proj.delora_A"),
        ("w-norm", config, {**tensors, f"{Q}.delora_w_norm": torch.ones(32)}, adapterspec.ShapeMismatchError,
         "delora_w_norm"),
        ("lambda", config, {**tensors, f"{Q}.delora_lambda": torch.ones(2)}, adapterspec.ShapeMismatchError,
         "delora_lambda"),
        ("bias", {**config, "bias": "delora_only"}, tensors, UnsupportedError, "/bias"),
        ("r0", {**config, "rank_pattern": {"down_proj": 0}}, tensors, UnsupportedError, "/rank_pattern/down_proj"),
        ("lambda-key", {**config, "lambda_pattern": {"v_proj": 1, "(": 3}}, tensors, UnsupportedError,
         "/lambda_pattern/("),  # q_proj reaches "(": PEFT's get_pattern_key raises re.error there
    ]
    for name, cfg, changed, error, needle in cases:
        where = _folder(tmp_path, name, cfg, changed)
        assert any(needle in str(e) for e in adapterspec.validate_adapter(where)), name
        model = fresh(llama)
        before = snapshot(model)
        with pytest.raises(error) as info:
            adapterspec.load_adapter(model, where)
        assert needle in str(info.value), (name, info.value)
        assert_same_snapshot(model, before)
    with pytest.raises(TypeError):  # PEFT refuses GPT-2's Conv1D and every non-Linear layer
        peft.get_peft_model(fresh(gpt2), _config(target_modules=["c_attn"], rank_pattern={}))
    for base, target in ((gpt2, "c_attn"), (llama, "embed_tokens")):
        model = fresh(base)
        before = snapshot(model)
        with pytest.raises(UnsupportedError, match="DELORA cannot adapt") as refused:
            adapterspec.inject_adapter(model, {"peft_type": "DELORA", "r": 2, "target_modules": [target]})
        assert refused.value.key is not None and refused.value.key.endswith(target)
        assert_same_snapshot(model, before)


def test_unused_zero_rank_and_unreached_bad_lambda_key_load_as_peft(llama: Any, token_inputs: Any,
                                                                  tmp_path: Path) -> None:
    """PEFT 0.21.2 loads rank_pattern {"nothing": 0} (update_layer refuses only a rank a layer takes) and a
    lambda_pattern key that does not compile after one matching every module (get_pattern_key is lazy; PEFT's save
    sorts the keys, so the file is written back in the in-memory order as PEFT's load reads it): same logits,
    and a new adapter starts with PEFT's bounds."""
    from peft import PeftModel

    lambdas = {"q_proj|v_proj": 3, "down_proj": 5, "(": 1}
    config = _config(rank_pattern={"down_proj": 2, "nothing": 0}, lambda_pattern=lambdas)
    reference = peft_reference(llama, config, tmp_path / "peft", fill=_fill)
    config_path = tmp_path / "peft" / "adapter_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"lambda_pattern": lambdas}))
    expected = logits(reference, token_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(logits(PeftModel.from_pretrained(fresh(llama), str(tmp_path / "peft")).eval(), token_inputs),
                     expected, atol=0)
    assert adapterspec.validate_adapter(tmp_path / "peft") == []
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_close(logits(model, token_inputs), expected)
    new = fresh(llama)
    adapterspec.inject_adapter(new, json.loads(config_path.read_text()))
    theirs = peft.get_peft_model(fresh(llama), _config(rank_pattern={"down_proj": 2, "nothing": 0},
                                                       lambda_pattern=lambdas))
    bounds = {k.replace(".default", ""): float(v) for k, v in theirs.state_dict().items() if "delora_lambda" in k}
    ours = {k: float(v) for k, v in new.state_dict().items() if "delora_lambda" in k}
    assert sorted(bounds.values()) == sorted(ours.values()) and set(bounds.values()) == {3.0, 5.0}


def test_reference_equals_peft_float64() -> None:
    """The NumPy reference against PEFT's own DeloraLinear in float64, a tiny A row included (the 1e-4 clamp)."""
    from peft import DeloraConfig, get_peft_model

    from adapterspec.conformance.reference_delora import delora_weight

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False)).double()
    peft_model = get_peft_model(model, DeloraConfig(r=3, target_modules=["0"], init_weights=False))
    layer = peft_model.base_model.model[0]
    with torch.no_grad():
        layer.delora_A["default"][1].mul_(1e-5)  # its norm below 1e-4: the clamp decides
        layer.delora_lambda["default"].fill_(2.5)
    tensors = {name: getattr(layer, name)["default"].detach().double().numpy()
               for name in ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")}
    weight = layer.base_layer.weight.detach().numpy()
    ours = delora_weight({"kind": "linear"}, weight, {"peft_type": "DELORA", "r": 3, "target_modules": ["0"]}, "0", tensors)
    x = np.linspace(-1, 1, 12).reshape(2, 6)
    with torch.no_grad():
        expected = peft_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(x @ ours.T, expected, rtol=1e-12, atol=1e-12)


def test_docstring_examples() -> None:
    import doctest

    from adapterspec import _delora
    from adapterspec_torch import delora

    for module in (delora, _delora):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted >= 1, module
