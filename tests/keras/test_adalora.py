"""AdaLoRA (SPEC.md 15.4) on keras-hub models, exact against PEFT 0.21 (fp32) in both directions, after real rank
allocation; the refusals typed, as the torch backend's.

Each case trains a PEFT AdaLoRA model a few steps with ``update_and_allocate`` so that ranks really get pruned
(the saved ``rank_pattern`` keeps some, all or none of a module's ``init_r`` ranks), gives the adapter tensors
element-unique values and saves with PEFT. A keras-hub model converted from the same checkpoint loads the folder
and gives PEFT's logits within the base conversion error; ``save_adapter`` writes bit-identical tensors that PEFT
loads with nothing missing or unexpected and no warning; merging gives the same logits, unmerging the unmerged ones.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from adapterspec.errors import UnsupportedError  # noqa: E402
from keras_helpers import (  # noqa: E402
    assert_near,
    assert_peft_close,
    assert_refused_unchanged,
    hf_model,
    keras_logits,
    keras_model,
    peft_load_exactly,
    torch_logits,
    unique_values,
)

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
GPT2 = ["c_attn", "c_proj", "c_fc"]


def _fill(model: Any) -> None:
    """Element-unique A, B (scale 0.3) and singular values E around 1: the adapter clearly moves the outputs."""
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(model.named_parameters())):
            if ".lora_E." in name:
                param.copy_(torch.from_numpy(unique_values(tuple(param.shape), index, around=1.0, scale=0.5)))
            elif ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.from_numpy(unique_values(tuple(param.shape), index, scale=0.3)))


def _trained(checkpoint: Path, config: Any, folder: Path, ids: np.ndarray) -> None:
    """PEFT AdaLoRA trained ``config.total_step`` steps with rank allocation, filled, saved to ``folder``."""
    torch.manual_seed(0)
    inputs = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(hf_model(checkpoint), config)
        model.train()
        optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for step in range(config.total_step):
            model(input_ids=inputs, labels=inputs).loss.backward()
            optimiser.step()
            model.base_model.update_and_allocate(step)
            optimiser.zero_grad()
        _fill(model)
        model.eval()
        model.save_pretrained(str(folder))






CASES: dict[str, tuple[str, Callable[[], Any]]] = {
    "llama": ("llama", lambda: peft.AdaLoraConfig(init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8,
                                                  lora_alpha=8, target_modules=LLAMA)),
    "gpt2-fused-c_attn": ("gpt2", lambda: peft.AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1,
                                                             total_step=6, lora_alpha=16, target_modules=GPT2)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_trained_peft_adalora_gives_peft_logits_in_keras_and_round_trips(case: str, checkpoints: Any,
                                                                         token_ids: np.ndarray, tmp_path: Path) -> None:
    arch, make_config = CASES[case]
    config = make_config()
    _trained(checkpoints[arch], config, tmp_path / "peft", token_ids)
    saved_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    kept = [sum(v) for v in saved_config["rank_pattern"].values()]
    assert any(0 < k < config.init_r for k in kept), kept  # really pruned
    reference, said_peft = peft_load_exactly(checkpoints[arch], tmp_path / "peft")
    expected = torch_logits(reference, token_ids)
    base_torch = torch_logits(hf_model(checkpoints[arch]), token_ids)
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, token_ids)
    assert np.abs(expected - base_torch).max() > 1e-2  # the adapter changes the output: the comparison means something

    modules = adapterspec.load_adapter(model, tmp_path / "peft")
    assert len(modules) == len(saved_config["rank_pattern"])
    got = keras_logits(model, token_ids)
    assert_peft_close(got, expected, base, base_torch)
    with adapterspec.disabled_adapters(model):
        assert np.abs(keras_logits(model, token_ids) - base).max() == 0.0

    # Keras saves exactly PEFT's tensors and config; PEFT loads them cleanly with the same logits
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    ours, theirs = adapterspec.read_adapter(saved), adapterspec.read_adapter(tmp_path / "peft")
    assert set(ours.tensors) == set(theirs.tensors)
    ours_np, theirs_np = ours.load_tensors("numpy"), theirs.load_tensors("numpy")
    for key in theirs_np:
        assert ours_np[key].dtype == theirs_np[key].dtype and np.array_equal(ours_np[key], theirs_np[key]), key
    ours_config = json.loads((saved / "adapter_config.json").read_text())
    assert {k: v for k, v in ours_config.items() if k in saved_config} == saved_config
    reloaded, said_ours = peft_load_exactly(checkpoints[arch], saved)
    assert said_ours == said_peft  # no warning of its own
    assert np.array_equal(torch_logits(reloaded, token_ids), expected)

    # round trip in Keras: bit-exact
    again = keras_model(arch, checkpoints[arch])
    adapterspec.load_adapter(again, saved)
    assert np.array_equal(keras_logits(again, token_ids), got)

    # merged: PEFT's merged logits; unmerged: back to the unmerged forward
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    merged_expected = torch_logits(reference, token_ids)
    adapterspec.merge_adapters(model)
    assert_peft_close(keras_logits(model, token_ids), merged_expected, base, base_torch)
    adapterspec.unmerge_adapters(model)
    assert_near(keras_logits(model, token_ids), got)
    with adapterspec.disabled_adapters(model):
        assert_near(keras_logits(model, token_ids), base)


def _peft_folder(checkpoint: Path, folder: Path, **fields: Any) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(hf_model(checkpoint), peft.AdaLoraConfig(init_r=4, total_step=10,
                                                                             target_modules=["q_proj"], **fields))
        _fill(model)
        model.save_pretrained(str(folder))
    return folder




def test_training_is_refused_as_on_torch(checkpoints: Any, tmp_path: Path) -> None:
    folder = _peft_folder(checkpoints["llama"], tmp_path / "peft")
    model = keras_model("llama", checkpoints["llama"])
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, folder, trainable=True), UnsupportedError,
             "training AdaLoRA")


def test_bias_is_refused_naming_the_field(checkpoints: Any, tmp_path: Path) -> None:
    folder = _peft_folder(checkpoints["llama"], tmp_path / "peft", bias="lora_only")
    model = keras_model("llama", checkpoints["llama"])
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, folder), UnsupportedError, "/bias")


def test_a_missing_singular_value_tensor_is_refused(checkpoints: Any, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    folder = _peft_folder(checkpoints["llama"], tmp_path / "peft")
    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_E"]
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    model = keras_model("llama", checkpoints["llama"])
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, folder), adapterspec.MissingTensorError,
             "layers.1.self_attn.q_proj")


def test_embedding_targets_are_refused_as_in_peft(checkpoints: Any) -> None:
    model = keras_model("llama", checkpoints["llama"])
    config = {"peft_type": "ADALORA", "init_r": 2, "total_step": 10, "target_modules": ["embed_tokens"]}
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(model, config), UnsupportedError, "model.embed_tokens")


def test_every_adalora_case_of_the_corpus_passes() -> None:
    """Dense, GPT-2's Conv1D and Conv2D layers (``A`` ``[k, in * kh * kw]``, SPEC.md 15.4), numeric (against the
    reference, itself checked against PEFT), round-trip and folder cases: all pass on this backend, none is
    unsupported."""
    from adapterspec.conformance import Status, load_corpus, run_suite
    from adapterspec_keras.conformance import KerasImplementation

    corpus = load_corpus(Path(__file__).parents[2] / "conformance_tests" / "v1")
    report = run_suite(KerasImplementation(), corpus, include=[r"adalora"])
    names = {r.name: r.status for r in report.results}
    assert len(names) >= 8 and any("conv2d" in n for n in names) and any("gpt2" in n for n in names)
    assert {n: s for n, s in names.items() if s is not Status.PASSED} == {}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_conv2d_adalora_equals_peft_unmerged_merged_and_saved(tmp_path: Path) -> None:
    """PEFT's ``SVDConv2d`` (``A`` ``[k, in * kh * kw]``, the delta reshaped to the kernel) on a Keras Conv2D: PEFT's
    outputs unmerged and merged, and PEFT's tensors saved back bit for bit."""
    import keras

    from adapterspec_keras.conformance import build_model

    torch.manual_seed(3)
    net = torch.nn.Sequential()
    net.add_module("conv", torch.nn.Conv2d(3, 6, (3, 2), bias=True))
    base_weight = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(net, peft.AdaLoraConfig(init_r=3, lora_alpha=5, total_step=10,
                                                                target_modules=["conv"]))
    _fill(reference)
    reference.eval()
    reference.save_pretrained(str(tmp_path / "peft"))
    x = unique_values((2, 3, 7, 6), 11, scale=1.0)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
        base_out = net.conv.base_layer(torch.from_numpy(x)).numpy()

    model, layers = build_model({"modules": {"conv": {"kind": "conv2d", "in_channels": 3, "out_channels": 6,
                                                       "kernel_size": [3, 2], "stride": [1, 1], "padding": [0, 0]}}})
    conv = layers["conv"]
    conv.kernel.assign(np.transpose(base_weight["conv.weight"], (2, 3, 1, 0)))
    conv.bias.assign(base_weight["conv.bias"])

    def run() -> np.ndarray:
        y = conv(np.transpose(x, (0, 2, 3, 1)))
        return np.transpose(keras.ops.convert_to_numpy(y), (0, 3, 1, 2))

    assert np.abs(expected - base_out).max() > 1e-2
    adapterspec.load_adapter(model, tmp_path / "peft", module_map={"conv": conv})
    got = run()
    diff = float(np.abs(got - expected).max())
    print(f"conv2d: max abs diff vs PEFT {diff:.3g}")
    assert_near(got, expected)

    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    ours = adapterspec.read_adapter(saved).load_tensors("numpy")
    theirs = adapterspec.read_adapter(tmp_path / "peft").load_tensors("numpy")
    assert set(ours) == set(theirs)
    for key in theirs:
        assert np.array_equal(ours[key], theirs[key]), key

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    with torch.no_grad():
        merged_expected = reference(torch.from_numpy(x)).numpy()
    adapterspec.merge_adapters(model)
    merged = run()
    print(f"conv2d merged: max abs diff vs PEFT {float(np.abs(merged - merged_expected).max()):.3g}")
    assert_near(merged, merged_expected)
    adapterspec.unmerge_adapters(model)
    assert_near(run(), got)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_module_with_every_rank_pruned_adds_nothing_as_in_peft(checkpoints: Any, token_ids: np.ndarray,
                                                                  tmp_path: Path) -> None:
    """``rank_pattern`` keeping no rank of one module (its tensors ``[0, in]``...) and two of another: PEFT's logits,
    and the empty tensors saved back as PEFT wrote them."""
    from safetensors.numpy import load_file, save_file

    folder = _peft_folder(checkpoints["llama"], tmp_path / "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    pattern = {"model.layers.0.self_attn.q_proj": [False] * 4,
               "model.layers.1.self_attn.q_proj": [True, False, True, False]}
    config["rank_pattern"] = {f"{module}.lora_E": kept for module, kept in pattern.items()}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "adapter_model.safetensors")
    for module, kept in pattern.items():
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A"] = np.ascontiguousarray(tensors[f"{key}.lora_A"][kept])
        tensors[f"{key}.lora_E"] = np.ascontiguousarray(tensors[f"{key}.lora_E"][kept])
        tensors[f"{key}.lora_B"] = np.ascontiguousarray(tensors[f"{key}.lora_B"][:, kept])
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    reference, _ = peft_load_exactly(checkpoints["llama"], folder)
    expected = torch_logits(reference, token_ids)
    base_torch = torch_logits(hf_model(checkpoints["llama"]), token_ids)
    assert np.abs(expected - base_torch).max() > 1e-2

    model = keras_model("llama", checkpoints["llama"])
    base = keras_logits(model, token_ids)
    adapterspec.load_adapter(model, folder)
    assert_peft_close(keras_logits(model, token_ids), expected, base, base_torch)
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    ours = adapterspec.read_adapter(saved).load_tensors("numpy")
    assert set(ours) == set(tensors)
    for key, value in tensors.items():
        assert ours[key].shape == value.shape and np.array_equal(ours[key], value), key
    adapterspec.merge_adapters(model)
    assert_peft_close(keras_logits(model, token_ids), expected, base, base_torch)


def _bf16_logits_close(model: Any, reference: Any, checkpoint: Path, token_ids: np.ndarray) -> float:
    """The bfloat16 Keras model's logits are the bfloat16 PEFT model's up to what the two frameworks' bfloat16
    kernels differ by without any adapter, plus a few roundings of the logits' size for the adapter's part."""
    import keras_hub
    from transformers import AutoModelForCausalLM

    def floats(m: Any) -> np.ndarray:
        with torch.no_grad():
            out: np.ndarray = m(input_ids=torch.from_numpy(np.asarray(token_ids, dtype=np.int64))).logits.float().numpy()
        return out

    hf: Any = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    hf.eval()
    plain = keras_hub.models.Llama3CausalLM.from_preset(str(checkpoint), preprocessor=None, dtype="bfloat16")
    gap = float(np.abs(keras_logits(plain, token_ids).astype(np.float32) - floats(hf)).max())
    got, want = keras_logits(model, token_ids).astype(np.float32), floats(reference)
    step = 2.0 ** -8 * float(np.abs(want).max())
    diff = float(np.abs(got - want).max())
    print(f"bfloat16: max abs diff vs PEFT {diff:.3g} (base gap {gap:.3g}, one rounding {step:.3g})")
    assert diff <= gap + 4 * step
    return diff


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bf16_model_keeps_the_adapter_in_float32_and_equals_peft(checkpoints: Any, token_ids: np.ndarray,
                                                                 tmp_path: Path) -> None:
    """On a bfloat16 keras-hub model the adapter stays float32 (SPEC.md 7.5), its part is computed in float32 and
    the logits are PEFT's on its bfloat16 model within the frameworks' bfloat16 gap, merged too; saved back, the
    tensors are the file's."""
    import keras_hub
    from transformers import AutoModelForCausalLM

    folder = _peft_folder(checkpoints["llama"], tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base: Any = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], dtype=torch.bfloat16)
        base.eval()
        reference = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    model = keras_hub.models.Llama3CausalLM.from_preset(str(checkpoints["llama"]), preprocessor=None,
                                                        dtype="bfloat16")
    adapterspec.load_adapter(model, folder)
    _bf16_logits_close(model, reference, checkpoints["llama"], token_ids)
    saved = adapterspec.read_adapter(adapterspec.save_adapter(model, tmp_path / "keras")).load_tensors("numpy")
    stored = adapterspec.read_adapter(folder).load_tensors("numpy")
    for key, value in stored.items():
        assert saved[key].dtype == np.float32 and np.array_equal(saved[key], value), key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model)
    _bf16_logits_close(model, reference, checkpoints["llama"], token_ids)
