"""``init_lora_weights`` on torch (SPEC.md 8.1): PiSSA and OLoRA adapters run on the residual base PEFT rebuilds at
every load; inits no load can rebuild are refused; data-driven ones warn. Compared with PEFT 0.21.2 itself."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from adapterspec.identity import FINGERPRINT_KEY  # noqa: E402
from torch_helpers import (  # noqa: E402
    assert_close,
    assert_same_snapshot,
    fresh,
    logits,
    peft_load,
    peft_reference,
    snapshot,
)


def _lora(init: Any, targets: list[str], **extra: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, **extra)


CASES = [
    ("llama", "pissa", ["q_proj", "v_proj", "down_proj"], {}),
    ("llama", "olora", ["q_proj", "v_proj", "down_proj"], {}),
    ("llama", "pissa", ["q_proj", "k_proj", "up_proj"], {"use_rslora": True, "rank_pattern": {"k_proj": 2},
                                                        "alpha_pattern": {"up_proj": 3}}),
    ("llama", "pissa", ["q_proj", "o_proj"], {"use_dora": True}),
    ("llama", "olora", ["q_proj", "embed_tokens"], {}),  # PEFT's embeddings run no OLoRA: their base stays
    ("gpt2", "pissa", ["c_attn", "mlp.c_proj"], {}),  # transformers Conv1D: [in, out] as stored
    ("gpt2", "olora", ["attn.c_proj"], {}),  # square Conv1D: PEFT factors it as stored
]


@pytest.mark.parametrize(("arch", "init", "targets", "extra"), CASES)
def test_peft_adapter_loads_onto_the_original_base_as_peft_loads_it(arch: str, init: str, targets: list[str],
                                                                    extra: dict[str, Any],
                                                                    request: pytest.FixtureRequest, tmp_path: Path,
                                                                    token_inputs: dict[str, Any],
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """PEFT's model as trained (residual base, trained A and B), PEFT's load of its folder onto the original base,
    and ours: one output (PEFT's residual base weights, to the bit); deleting the adapter gives the original base back, byte for byte."""
    base = request.getfixturevalue(arch)
    trained = peft_reference(base, _lora(init, targets, **extra), tmp_path / "peft")
    expected = logits(trained, token_inputs)
    reloaded, _ = peft_load(base, tmp_path / "peft", caplog)
    assert_close(logits(reloaded, token_inputs), expected)
    model = fresh(base)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PiSSA/OLoRA need no warning: the residual is rebuilt
        adapterspec.load_adapter(model, tmp_path / "peft")
    assert_close(logits(model, token_inputs), logits(reloaded, token_inputs))  # the residuals below: to the bit
    residuals = {k: v for k, v in trained.base_model.model.state_dict().items() if "base_layer.weight" in k}
    mine = {k: v for k, v in model.state_dict().items() if "base_layer.weight" in k}
    assert sorted(mine) == sorted(residuals) and all(torch.equal(mine[k], residuals[k]) for k in residuals)
    changed = [k for k in residuals if not torch.equal(residuals[k], before["state"][k.replace(".base_layer", "")])]
    assert changed and all("embed_tokens" not in k for k in changed)
    adapterspec.delete_adapter(model, "default")
    assert_same_snapshot(model, before)


def test_saved_again_holds_no_base_tensor_and_reloads_without_mismatch(llama: Any, tmp_path: Path,
                                                                      token_inputs: dict[str, Any],
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The residual is never saved (PEFT saves none); the fingerprint describes the original base, so a load onto
    it is not a mismatch; PEFT loads our copy with the same outputs."""
    trained = peft_reference(llama, _lora("pissa", ["q_proj", "gate_proj"]), tmp_path / "peft")
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "peft")
    adapterspec.save_adapter(model, tmp_path / "ours")
    saved = adapterspec.read_adapter(tmp_path / "ours")
    assert sorted(saved.load_tensors()) == sorted(adapterspec.read_adapter(tmp_path / "peft").load_tensors())
    assert saved.config["init_lora_weights"] == "pissa"
    assert saved.metadata[FINGERPRINT_KEY] == adapterspec_fingerprint(llama, tmp_path / "plain")
    again = fresh(llama)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapterspec.load_adapter(again, tmp_path / "ours", strict=True)
    assert torch.equal(logits(again, token_inputs), logits(model, token_inputs))
    peft_ours, _ = peft_load(llama, tmp_path / "ours", caplog)
    assert_close(logits(peft_ours, token_inputs), logits(trained, token_inputs))


def adapterspec_fingerprint(base: Any, folder: Path) -> str:
    """The fingerprint a plain LoRA on q_proj and gate_proj records for ``base`` (unchanged)."""
    model = fresh(base)
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "gate_proj"]})
    adapterspec.save_adapter(model, folder)
    return str(adapterspec.read_adapter(folder).metadata[FINGERPRINT_KEY])


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("dora", [False, True])
def test_new_adapter_starts_as_peft_s_new_adapter(init: str, dora: bool, llama: Any,
                                                  token_inputs: dict[str, Any]) -> None:
    """A new PiSSA/OLoRA adapter: PEFT's A₀, B₀ and residual base (exact), and the base model's outputs."""
    from peft import get_peft_model

    targets = ["q_proj", "down_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(fresh(llama), _lora(init, targets, use_dora=dora))
    from peft.utils import get_peft_model_state_dict

    model = fresh(llama)
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets,
                                       "init_lora_weights": init, "use_dora": dora})
    theirs = get_peft_model_state_dict(reference)
    ours = adapterspec.extract_adapter(model).load_tensors("pt")
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        if "lora_magnitude_vector" in key:  # ||W_res + s·B₀A₀|| = ||W|| up to rounding
            assert_close(ours[key], value)
        else:
            assert torch.equal(ours[key], value), key
    mine = {n: m.weight for n, m in model.named_modules() if n.endswith("base_layer")}
    ref = {n: m.weight for n, m in reference.base_model.model.named_modules() if n.endswith("base_layer")}
    assert sorted(mine) == sorted(ref) and len(ref) == 4
    assert all(torch.equal(mine[n], ref[n]) for n in ref)
    assert_close(logits(model, token_inputs), logits(llama, token_inputs))
    model(**token_inputs).logits.pow(2).mean().backward()
    residual = model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not residual.requires_grad and model.model.layers[0].self_attn.q_proj.adapter_params("default")[
        "lora_A.weight"].grad is not None


def test_merge_and_unload_give_peft_s_merged_model(llama: Any, tmp_path: Path, token_inputs: dict[str, Any]) -> None:
    trained = peft_reference(llama, _lora("olora", ["q_proj", "up_proj"]), tmp_path / "peft")
    expected = logits(trained, token_inputs)
    merged_peft = trained.merge_and_unload()
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "peft")
    adapterspec.merge_adapters(model)
    assert_close(logits(model, token_inputs), expected)
    adapterspec.unmerge_adapters(model)
    assert_close(logits(model, token_inputs), expected)
    plain = adapterspec.unload(model, merge=True)
    assert_close(logits(plain, token_inputs), logits(merged_peft, token_inputs))
    assert not adapterspec.adapter_names(plain)


@pytest.mark.parametrize(("init", "match"), [("pissa_niter_4", "randomised SVD"), ("corda", "preprocess_corda"),
                                             ("loftq", "quantised residual")])
def test_inits_no_load_can_rebuild_are_refused(init: str, match: str, llama: Any, tmp_path: Path) -> None:
    config = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "init_lora_weights": init}
    if init == "loftq":
        config["loftq_config"] = {"loftq_bits": 4}
    source = fresh(llama)
    adapterspec.inject_adapter(source, {**config, "init_lora_weights": True})
    adapterspec.save_adapter(source, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(
        (tmp_path / "a" / "adapter_config.json").read_text().replace('"init_lora_weights": true',
                                                                     f'"init_lora_weights": "{init}"'))
    model = fresh(llama)
    before = snapshot(model)
    with pytest.raises(adapterspec.UnsupportedError, match=match) as caught:
        adapterspec.load_adapter(model, tmp_path / "a")
    assert caught.value.pointer == "/init_lora_weights"
    assert_same_snapshot(model, before)
    with pytest.raises(adapterspec.UnsupportedError, match="init_lora_weights"):
        adapterspec.inject_adapter(model, config)
    assert_same_snapshot(model, before)


def test_mica_starts_and_trains_as_peft(llama: Any, tmp_path: Path, token_inputs: dict[str, Any]) -> None:
    """MiCA (PEFT's mica_init + MiCALinearVariant): a new adapter's B is the minor left singular vectors (PEFT's own,
    exactly; embeddings too), A zero; training moves A only -- B stays frozen, also for a loaded adapter."""
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    targets = ["q_proj", "down_proj", "embed_tokens"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(fresh(llama), _lora("mica", targets))
    model = fresh(llama)
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets,
                                       "init_lora_weights": "mica"})
    theirs = {k: v for k, v in get_peft_model_state_dict(reference).items() if ".lora_" in k}
    ours = {k: v for k, v in adapterspec.extract_adapter(model).load_tensors("pt").items() if ".lora_" in k}
    assert sorted(ours) == sorted(theirs) and len(ours) == 10 and all(torch.equal(ours[k], v) for k, v in theirs.items())
    assert all(v.abs().sum() > 0 for k, v in ours.items() if "_B" in k)
    flags = {n.split(".adapter_weights.")[0] + "." + n.rsplit(".", 1)[-1]: p.requires_grad
             for n, p in model.named_parameters() if "adapter_weights" in n}
    assert flags and all(flag == ("_A" in name) for name, flag in flags.items()), flags
    assert_close(logits(model, token_inputs), logits(llama, token_inputs))
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = {k: v.clone() for k, v in ours.items()}
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    model(**token_inputs, labels=token_inputs["input_ids"]).loss.backward()
    optimizer.step()
    after = adapterspec.extract_adapter(model).load_tensors("pt")
    assert all(torch.equal(after[k], before[k]) == ("_B" in k) for k in before)  # A moved, B did not
    adapterspec.save_adapter(model, tmp_path / "trained")
    loaded = fresh(llama)
    adapterspec.load_adapter(loaded, tmp_path / "trained", trainable=True)
    assert sorted(n for n, p in loaded.named_parameters() if p.requires_grad) == sorted(
        n for n, p in loaded.named_parameters() if "adapter_weights" in n and "_A" in n.rsplit(".", 1)[-1])


def test_mica_refusals(llama: Any, cnn: Any) -> None:
    """As PEFT refuses them: MiCA with DoRA (no such variant; a load too), r above a side, a convolution."""
    for base, config, match in (
            (llama, {"target_modules": ["q_proj"], "use_dora": True}, "use_dora"),
            (llama, {"target_modules": ["k_proj"], "r": 40}, "min"),
            (cnn, {"target_modules": ["conv1"]}, "linear layers only")):
        model = fresh(base)
        before = snapshot(model)
        with pytest.raises(adapterspec.UnsupportedError, match=match):
            adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 4, "init_lora_weights": "mica", **config})
        assert_same_snapshot(model, before)


def test_data_driven_inits_warn(llama: Any, tmp_path: Path) -> None:
    model = fresh(llama)
    with pytest.warns(adapterspec.AdapterSpecWarning, match=r"/init_lora_weights: .*initialize_lora_eva_weights"):
        adapterspec.inject_adapter(model, {"peft_type": "LORA", "target_modules": ["q_proj"],
                                           "init_lora_weights": "eva"})
    q = model.model.layers[0].self_attn.q_proj.adapter_params("default")
    assert not q["lora_B.weight"].any() and q["lora_A.weight"].any()  # PEFT's start: B zero
    adapterspec.save_adapter(model, tmp_path / "ga")
    path = tmp_path / "ga" / "adapter_config.json"
    path.write_text(path.read_text().replace('"init_lora_weights": "eva"', '"init_lora_weights": "lora_ga"'))
    with pytest.warns(adapterspec.AdapterSpecWarning, match=r"/init_lora_weights: .*gradients"):
        adapterspec.load_adapter(fresh(llama), tmp_path / "ga")


def test_layers_peft_cannot_decompose_are_refused(gpt2: Any, cnn: Any, llama: Any) -> None:
    for model, config, match in (
            (fresh(gpt2), {"target_modules": ["c_attn"], "init_lora_weights": "olora"}, "square"),
            (fresh(cnn), {"target_modules": ["conv1"], "init_lora_weights": "pissa"}, "linear layers only"),
            (fresh(llama).double(), {"target_modules": ["q_proj"], "init_lora_weights": "olora"}, "not float64")):
        before = snapshot(model)
        with pytest.raises(adapterspec.UnsupportedError, match=match):
            adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, **config})
        assert_same_snapshot(model, before)
    model = fresh(llama)
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}, "plain")
    adapterspec.merge_adapters(model)
    with pytest.raises(adapterspec.UnsupportedError, match="merged adapter"):
        adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"],
                                           "init_lora_weights": "pissa"}, "second")
    assert adapterspec.adapter_names(model) == ["plain"]


def test_new_orthogonal_adapter_starts_as_peft_s_does(llama: Any, cnn: Any, token_inputs: dict[str, Any]) -> None:
    """PEFT's orthogonal_init: A₀ and B₀ of rank r/2 each from one orthogonal Q, so B₀A₀ = 0 (the model starts as
    the base) while neither is zero, unlike the plain init's B₀ = 0; an odd rank and a convolution are refused."""
    model = fresh(llama)
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 6, "target_modules": ["q_proj", "down_proj"],
                                       "init_lora_weights": "orthogonal"})
    for layer in (model.model.layers[0].self_attn.q_proj, model.model.layers[1].mlp.down_proj):
        params = layer.adapter_params("default")
        a, b = params["lora_A.weight"].detach(), params["lora_B.weight"].detach()
        assert torch.linalg.matrix_rank(a) == 3 and torch.linalg.matrix_rank(b) == 3
        assert (b @ a).abs().max() < 1e-6 * a.abs().max() * b.abs().max() * a.shape[0] + 1e-9
    assert_close(logits(model, token_inputs), logits(llama, token_inputs))
    for base, config, match in ((llama, {"r": 5, "target_modules": ["q_proj"]}, "even rank"),
                                (cnn, {"r": 4, "target_modules": ["conv1"]}, "linear layers only")):
        refused = fresh(base)
        before = snapshot(refused)
        with pytest.raises(adapterspec.UnsupportedError, match=match):
            adapterspec.inject_adapter(refused, {"peft_type": "LORA", "init_lora_weights": "orthogonal", **config})
        assert_same_snapshot(refused, before)


def test_a_rank_above_a_layer_s_side_is_peft_s_smaller_one(llama: Any, tmp_path: Path,
                                                            token_inputs: dict[str, Any]) -> None:
    """r = 40 on k_proj [32, 64]: PEFT's SVD has 32 triplets, so it stores lora_A [32, 64] and lora_B [32, 32] there
    (q_proj [64, 64] keeps 40), scaled by alpha / 40; the load takes them, a new adapter makes them."""
    from safetensors.torch import load_file

    from peft import LoraConfig

    trained = peft_reference(llama, LoraConfig(r=40, lora_alpha=8, target_modules=["q_proj", "k_proj"],
                                               init_lora_weights="pissa"), tmp_path / "peft")
    stored = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert stored["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].shape == (32, 64)
    assert stored["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (40, 64)
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_close(logits(model, token_inputs), logits(trained, token_inputs))
    new = fresh(llama)
    adapterspec.inject_adapter(new, {"peft_type": "LORA", "r": 40, "lora_alpha": 8, "init_lora_weights": "pissa",
                                     "target_modules": ["q_proj", "k_proj"]})
    ours = adapterspec.extract_adapter(new).load_tensors("pt")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in stored.items()}
    assert_close(logits(new, token_inputs), logits(llama, token_inputs))


def test_a_load_that_fails_after_the_residual_leaves_the_base_as_it_was(llama: Any, tmp_path: Path) -> None:
    """The residual goes in at injection; a tensor of the wrong shape found after it undoes everything."""
    from safetensors.torch import load_file, save_file

    peft_reference(llama, _lora("pissa", ["q_proj", "v_proj"]), tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = tensors[key][:, :3].contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    model = fresh(llama)
    before = snapshot(model)
    with pytest.raises(adapterspec.AdapterSpecError):
        adapterspec.load_adapter(model, tmp_path / "peft")
    assert_same_snapshot(model, before)


def test_a_trained_pissa_adapter_resumes_loads_and_reaches_peft_as_trained(llama: Any, tmp_path: Path,
                                                                           token_inputs: dict[str, Any]) -> None:
    """Train a new PiSSA adapter (only A and B move; the residual base is frozen), save it: a resumed copy (inject +
    restore_adapter), a load and PEFT's load all compute what the trained model computes."""
    from peft import PeftModel

    from adapterspec_torch.training import restore_adapter

    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
              "init_lora_weights": "pissa"}
    model = fresh(llama)
    adapterspec.inject_adapter(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 2 * 4 * ((64 + 64) + (64 + 32) + (128 + 64))  # A and B only
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        model(**token_inputs, labels=token_inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapterspec.save_adapter(model, tmp_path / "trained")
    expected = logits(model, token_inputs)
    assert (expected - logits(llama, token_inputs)).abs().max() > 1e-2
    resumed = fresh(llama)
    adapterspec.inject_adapter(resumed, config)
    restore_adapter(resumed, tmp_path / "trained")
    loaded = fresh(llama)
    adapterspec.load_adapter(loaded, tmp_path / "trained")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(fresh(llama), str(tmp_path / "trained")).eval()
    for other in (resumed, loaded, theirs):
        assert torch.equal(logits(other, token_inputs), expected)


def test_pissa_on_parameters_and_a_new_orthogonal_one_are_refused(llama: Any) -> None:
    """PEFT rebuilds a residual of a target parameter too (and starts it orthogonally): not implemented, refused."""
    model = fresh(llama)
    before = snapshot(model)
    for init, pointer in (("pissa", "/init_lora_weights"), ("olora", "/init_lora_weights"),
                          ("orthogonal", "/target_parameters")):
        with pytest.raises(adapterspec.UnsupportedError) as caught:
            adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"],
                                               "target_parameters": ["mlp.gate_proj.weight"],
                                               "init_lora_weights": init})
        assert caught.value.pointer == pointer
    assert_same_snapshot(model, before)
