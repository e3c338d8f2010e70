"""``init_lora_weights`` on Keras (SPEC.md 8.1), as on torch (tests/torch/test_lora_init.py): PEFT's PiSSA and OLoRA
adapters run on the residual base PEFT rebuilds at every load, with PEFT's logits; deleting the adapter gives the
kernels back; a new adapter starts as PEFT's; what no load can rebuild is refused, with the model unchanged."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from keras_helpers import (  # noqa: E402
    assert_near,
    assert_refused_unchanged,
    assert_same_snapshot,
    hf_model,
    keras_logits,
    keras_model,
    make_peft_adapter,
    snapshot,
    torch_logits,
)

CASES = {
    "llama-pissa": ("llama", dict(init_lora_weights="pissa", target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])),
    "llama-olora-dora-patterns": ("llama", dict(init_lora_weights="olora", use_dora=True, rank_pattern={"v_proj": 2},
                                                alpha_pattern={"down_proj": 3},
                                                target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])),
    "gpt2-pissa-fused-c_attn": ("gpt2", dict(init_lora_weights="pissa", target_modules=["c_attn", "mlp.c_proj"])),
    "gpt2-olora-square-c_proj": ("gpt2", dict(init_lora_weights="olora", target_modules=["attn.c_proj"])),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_gives_peft_logits_and_delete_gives_the_base_back(case: str, checkpoints: Any,
                                                                        token_ids: np.ndarray, tmp_path: Path) -> None:
    arch, extra = CASES[case]
    trained, folder = make_peft_adapter(checkpoints[arch], tmp_path / "a", peft.LoraConfig(r=4, lora_alpha=8, **extra))
    expected = torch_logits(trained, token_ids)
    reloaded = peft.PeftModel.from_pretrained(hf_model(checkpoints[arch]), folder).eval()
    assert_near(torch_logits(reloaded, token_ids), expected)  # PEFT's own load rebuilds the residual
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, token_ids)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", adapterspec.AdapterSpecWarning)
        adapterspec.load_adapter(model, folder)
    got = keras_logits(model, token_ids)
    assert_near(got, expected)
    assert np.abs(expected - base).max() > 1e-3  # the adapter changes the output: the comparison means something
    adapterspec.delete_adapter(model, "default")
    assert_same_snapshot(before, snapshot(model))
    assert np.array_equal(keras_logits(model, token_ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_save_keeps_no_base_tensor_merge_and_peft_reloads(checkpoints: Any, token_ids: np.ndarray,
                                                          tmp_path: Path) -> None:
    trained, folder = make_peft_adapter(checkpoints["llama"], tmp_path / "a", peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["q_proj", "up_proj"]))
    expected = torch_logits(trained, token_ids)
    model = keras_model("llama", checkpoints["llama"])
    adapterspec.load_adapter(model, folder)
    adapterspec.save_adapter(model, tmp_path / "ours")
    assert sorted(adapterspec.read_adapter(tmp_path / "ours").tensors) == sorted(adapterspec.read_adapter(folder).tensors)
    again = keras_model("llama", checkpoints["llama"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", adapterspec.AdapterSpecWarning)
        adapterspec.load_adapter(again, tmp_path / "ours", strict=True)  # the fingerprint is the original base's
    assert_near(keras_logits(again, token_ids), expected)
    peft_ours = peft.PeftModel.from_pretrained(hf_model(checkpoints["llama"]), tmp_path / "ours").eval()
    assert_near(torch_logits(peft_ours, token_ids), expected)
    adapterspec.merge_adapters(model)
    assert_near(keras_logits(model, token_ids), expected)
    adapterspec.unmerge_adapters(model)
    assert_near(keras_logits(model, token_ids), expected)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_new_adapter_starts_as_peft_s_new_adapter(init: str, checkpoints: Any, token_ids: np.ndarray) -> None:
    """PEFT's A₀, B₀ up to the decomposition's signs (B₀A₀ to rounding), its residual kernels, the base's logits."""
    from peft.utils import get_peft_model_state_dict

    targets = ["q_proj", "down_proj"]
    reference = peft.get_peft_model(hf_model(checkpoints["llama"]), peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=init, target_modules=targets, use_dora=True))
    theirs = {k: v.numpy() for k, v in get_peft_model_state_dict(reference).items()}
    model = keras_model("llama", checkpoints["llama"])
    base = keras_logits(model, token_ids)
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets,
                                       "init_lora_weights": init, "use_dora": True})
    ours = adapterspec.extract_adapter(model).load_tensors()
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        if key.endswith("lora_A.weight"):
            b_key = key.replace("lora_A", "lora_B")
            assert_near(ours[b_key] @ ours[key], theirs[b_key] @ theirs[key], length=4)
            assert_near(np.abs(ours[key]), np.abs(theirs[key]), length=64)
        elif "magnitude" in key:
            assert_near(ours[key], theirs[key], length=64)
    assert_near(keras_logits(model, token_ids), base)
    assert_near(keras_logits(model, token_ids), torch_logits(reference, token_ids))


def test_inits_no_load_can_rebuild_and_layers_peft_refuses_are_refused(checkpoints: Any, tmp_path: Path) -> None:
    model = keras_model("gpt2", checkpoints["gpt2"])
    for config, needle in (({"init_lora_weights": "pissa_niter_2", "target_modules": ["c_attn"]}, "randomised SVD"),
                           ({"init_lora_weights": "olora", "target_modules": ["c_attn"]}, "square"),
                           ({"init_lora_weights": "mica", "target_modules": ["c_attn"], "use_dora": True}, "use_dora"),
                           ({"init_lora_weights": "mica", "target_modules": ["attn.c_proj"], "r": 65}, "min")):
        assert_refused_unchanged(model, lambda c=config: adapterspec.inject_adapter(
            model, {"peft_type": "LORA", "r": 2, **c}), adapterspec.UnsupportedError, needle)
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "target_modules": ["attn.c_proj"]}, "plain")
    adapterspec.merge_adapters(model)
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(
        model, {"peft_type": "LORA", "r": 2, "target_modules": ["attn.c_proj"], "init_lora_weights": "pissa"}, "b"),
        adapterspec.UnsupportedError, "merged adapter")


def test_new_orthogonal_adapter_starts_as_peft_s_does(checkpoints: Any, token_ids: np.ndarray) -> None:
    """As on torch: A₀, B₀ of rank r/2 with B₀A₀ = 0 (the base's logits), neither zero; an odd rank refused."""
    model = keras_model("llama", checkpoints["llama"])
    base = keras_logits(model, token_ids)
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 6, "target_modules": ["q_proj", "down_proj"],
                                       "init_lora_weights": "orthogonal"})
    tensors = adapterspec.extract_adapter(model).load_tensors()
    pairs = [(tensors[k], tensors[k.replace("lora_A", "lora_B")]) for k in tensors if k.endswith("lora_A.weight")]
    assert len(pairs) == 4
    for a, b in pairs:
        assert np.linalg.matrix_rank(a) == 3 and np.linalg.matrix_rank(b) == 3
        assert np.abs(b @ a).max() < 1e-6 * np.abs(a).max() * np.abs(b).max() * a.shape[0]
    assert_near(keras_logits(model, token_ids), base)
    other = keras_model("llama", checkpoints["llama"])
    assert_refused_unchanged(other, lambda: adapterspec.inject_adapter(other, {
        "peft_type": "LORA", "r": 5, "target_modules": ["q_proj"], "init_lora_weights": "orthogonal"}),
        adapterspec.UnsupportedError, "even rank")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_rank_above_a_layer_s_side_is_peft_s_smaller_one(checkpoints: Any, token_ids: np.ndarray,
                                                            tmp_path: Path) -> None:
    """As on torch: where r exceeds a side, PEFT stores min(r, in, out) factors; Keras loads and makes the same."""
    from keras_helpers import ARCHS

    hidden = ARCHS["llama"].config["hidden_size"]
    trained, folder = make_peft_adapter(checkpoints["llama"], tmp_path / "a", peft.LoraConfig(
        r=hidden + 8, lora_alpha=8, init_lora_weights="pissa", target_modules=["k_proj", "down_proj"]))
    stored = adapterspec.read_adapter(folder).load_tensors()
    ranks = {k: v.shape[0] for k, v in stored.items() if k.endswith("lora_A.weight")}
    assert set(ranks.values()) <= set(range(1, hidden + 1)) and len(ranks) == 2 * ARCHS["llama"].config[
        "num_hidden_layers"]
    model = keras_model("llama", checkpoints["llama"])
    adapterspec.load_adapter(model, folder)
    assert_near(keras_logits(model, token_ids), torch_logits(trained, token_ids))
    new = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(new, {"peft_type": "LORA", "r": hidden + 8, "lora_alpha": 8, "init_lora_weights": "pissa",
                                     "target_modules": ["k_proj", "down_proj"]})
    made = adapterspec.extract_adapter(new).load_tensors()
    assert {k: v.shape for k, v in made.items()} == {k: v.shape for k, v in stored.items()}


#: keras-hub converters beyond the decoders above: Qwen2-MoE (its one-output shared_expert_gate: PEFT stores rank 1),
#: BART (encoder-decoder), DeiT (a vision encoder with its classifier)
MATRIX = {"qwen2_moe": "pissa", "bart": "pissa", "deit": "olora"}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(MATRIX))
def test_pissa_and_olora_on_every_linear_layer_of_converted_models_match_peft(case: str, tmp_path: Path) -> None:
    import test_converter_matrix as matrix
    from keras_helpers import fill_adapter_weights

    _, kind, build = matrix.CASES[case]
    model, _, targets = build(tmp_path / "hf")
    base_expected = matrix._run_torch(model, kind)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                            init_lora_weights=MATRIX[case]))
    fill_adapter_weights(peft_model)
    peft_model.eval().save_pretrained(tmp_path / "adapter")
    expected = matrix._run_torch(peft_model, kind)
    keras_model_ = matrix._keras_model(case, kind, tmp_path / "hf")
    conversion = float(np.abs(matrix._run_keras(keras_model_, kind) - base_expected).max())
    adapterspec.load_adapter(keras_model_, tmp_path / "adapter")
    diff = float(np.abs(matrix._run_keras(keras_model_, kind) - expected).max())
    effect = float(np.abs(expected - base_expected).max())
    assert diff <= 3 * conversion + 1e-5 and effect > 10 * (3 * conversion + 1e-5), (diff, conversion, effect)


def test_a_load_that_fails_after_the_residual_leaves_the_kernels_as_they_were(checkpoints: Any,
                                                                               tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    _, folder = make_peft_adapter(checkpoints["llama"], tmp_path / "a", peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="olora", target_modules=["q_proj", "v_proj"]))
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = np.ascontiguousarray(tensors[key][:, :3])
    save_file(tensors, path, metadata={"format": "pt"})
    model = keras_model("llama", checkpoints["llama"])
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, folder), adapterspec.AdapterSpecError,
                             "v_proj")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_pissa_adapter_trained_with_fit_loads_in_peft_as_trained(checkpoints: Any, token_ids: np.ndarray,
                                                                   tmp_path: Path) -> None:
    """fit trains A and B of a new PiSSA adapter over the frozen residual kernels; PEFT's load of the saved folder
    onto the original checkpoint computes what the Keras model computes."""
    import keras

    from keras_helpers import keras_inputs

    model = keras_model("llama", checkpoints["llama"])
    keras.utils.set_random_seed(3)
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "init_lora_weights": "pissa",
                                       "target_modules": ["q_proj", "v_proj", "down_proj"]})
    kernels = {v.path: np.array(v.numpy()) for v in model.variables if "kernel" in v.path and not v.trainable}
    assert len(kernels) >= 3 * 2  # the residual kernels among them, frozen
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    ids = np.concatenate([token_ids, token_ids[::-1]])
    model.fit(keras_inputs(ids), np.roll(ids, -1, axis=1), epochs=2, batch_size=2, shuffle=False, verbose=0)
    assert all(np.array_equal(v.numpy(), kernels[v.path]) for v in model.variables if v.path in kernels)
    adapterspec.save_adapter(model, tmp_path / "trained")
    expected = keras_logits(model, token_ids)
    theirs = peft.PeftModel.from_pretrained(hf_model(checkpoints["llama"]), tmp_path / "trained").eval()
    assert_near(torch_logits(theirs, token_ids), expected)
    assert np.abs(expected - keras_logits(keras_model("llama", checkpoints["llama"]), token_ids)).max() > 1e-2


def _projector_tolerance(weight: np.ndarray, r: int) -> float:
    """How far two fp32 SVDs' projectors on ``weight``'s minor ``r``-dimensional left singular subspace may lie apart:
    a backward error ``k eps ||W||`` moves the subspace by at most that over the gap between the ``r``-th smallest
    singular value and the next (Davis-Kahan), so near-equal singular values make it ill-conditioned."""
    s = np.linalg.svd(weight.astype(np.float64), compute_uv=False)  # descending, k = min(out, in) values
    k = len(s)
    gap = s[k - r - 1] - s[k - r] if k > r else s[-1]
    return float(2 * k * np.finfo(np.float32).eps * s[0] / gap)



@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mica_starts_and_trains_as_peft(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """MiCA: a new adapter's B spans PEFT's minor left singular vectors (to their signs; embeddings too), A is zero;
    fit moves A only -- B's variables are not trainable, also for a loaded adapter; PEFT loads the result as trained."""
    import keras
    from peft.utils import get_peft_model_state_dict

    from keras_helpers import keras_inputs

    targets = ["q_proj", "down_proj", "embed_tokens"]
    reference = peft.get_peft_model(hf_model(checkpoints["llama"]), peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="mica", target_modules=targets))
    theirs = {k: v.numpy() for k, v in get_peft_model_state_dict(reference).items() if ".lora_" in k}
    model = keras_model("llama", checkpoints["llama"])
    base = keras_logits(model, token_ids)
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "init_lora_weights": "mica",
                                       "target_modules": targets})
    ours = {k: v for k, v in adapterspec.extract_adapter(model).load_tensors().items() if ".lora_" in k}
    assert sorted(ours) == sorted(theirs) and len(ours) == 10
    for key, value in theirs.items():
        if "_A" in key:
            assert not ours[key].any() and not value.any()
        else:  # the same columns up to sign: B Bᵀ, the projector on the minor singular subspace
            layer = reference.get_submodule(key.split(".lora_")[0]).get_base_layer()
            weight = layer.weight.detach().numpy()
            weight = weight.T if "embedding" in key else weight  # PEFT's MiCA takes an embedding's (dim, num) matrix
            diff = float(np.abs(ours[key] @ ours[key].T - value @ value.T).max())
            assert diff <= _projector_tolerance(weight, value.shape[1]), (key, diff)
    assert_near(keras_logits(model, token_ids), base)
    frozen = [v for v in model.variables if "lora" in v.path and "_B" in v.path.split("/")[-1]]
    assert frozen and not any(v.trainable for v in frozen)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    ids = np.concatenate([token_ids, token_ids[::-1]])
    model.fit(keras_inputs(ids), np.roll(ids, -1, axis=1), epochs=1, batch_size=2, shuffle=False, verbose=0)
    after = {k: v for k, v in adapterspec.extract_adapter(model).load_tensors().items() if ".lora_" in k}
    assert all(np.array_equal(after[k], ours[k]) == ("_B" in k) for k in ours)  # A moved, B did not
    adapterspec.save_adapter(model, tmp_path / "trained")
    loaded = keras_model("llama", checkpoints["llama"])
    adapterspec.load_adapter(loaded, tmp_path / "trained", trainable=True)
    assert not any(v.trainable for v in loaded.variables if "lora" in v.path and "_B" in v.path.split("/")[-1])
    theirs_loaded = peft.PeftModel.from_pretrained(hf_model(checkpoints["llama"]), tmp_path / "trained").eval()
    assert_near(torch_logits(theirs_loaded, token_ids), keras_logits(model, token_ids))
