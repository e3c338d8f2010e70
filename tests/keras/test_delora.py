"""DeLoRA (SPEC.md 17.6) on a keras-hub Llama, exact against PEFT 0.21 (fp32) in both directions; the layers PEFT
refuses refused typed, with the model unchanged.

A PEFT DeLoRA model (element-unique A, B and bounds, a w_norm scaled away from the base's column norms, a
rank_pattern) is saved once per module. The keras-hub model converted from the same checkpoint loads the folder and
gives PEFT's logits within the base conversion error; ``save_adapter`` writes bit-identical tensors that PEFT loads
with no warning of its own; merging gives PEFT's merged logits, unmerging the unmerged ones. An adapter made in Keras
(Keras' draws of PEFT's distributions, w_norm the kernel's column norms) loads in PEFT with Keras' logits.
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

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _fill(model: Any) -> None:
    """Element-unique A and B, a bound per module, w_norm scaled away from the base's norms."""
    with torch.no_grad():
        for index, (name, tensor) in enumerate(sorted([*model.named_parameters(), *model.named_buffers()])):
            shape = tuple(tensor.shape)
            if "delora_lambda" in name:
                tensor.fill_(2.0 + 0.25 * (index % 7))
            elif "delora_w_norm" in name:
                tensor.mul_(torch.from_numpy(unique_values(shape, index, around=1.0, scale=0.3)))
            elif "delora_A" in name or "delora_B" in name:
                tensor.copy_(torch.from_numpy(unique_values(shape, index, scale=0.5)))


@pytest.fixture(scope="module")
def saved(checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("delora") / "peft"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(hf_model(checkpoints["llama"]),
                                    peft.DeloraConfig(r=4, target_modules=TARGETS, rank_pattern={"down_proj": 2}))
        _fill(model)
        model.save_pretrained(str(folder))
    return folder


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_delora_gives_peft_logits_in_keras_and_round_trips(saved: Path, checkpoints: Any, token_ids: np.ndarray,
                                                                tmp_path: Path) -> None:
    peft_config = json.loads((saved / "adapter_config.json").read_text())
    theirs = adapterspec.read_adapter(saved)
    reference, said_peft = peft_load_exactly(checkpoints["llama"], saved)
    expected = torch_logits(reference, token_ids)
    base_torch = torch_logits(hf_model(checkpoints["llama"]), token_ids)
    model = keras_model("llama", checkpoints["llama"])
    base = keras_logits(model, token_ids)
    assert np.abs(expected - base_torch).max() > 1e-2  # the adapter changes the output: the comparison means something

    adapterspec.load_adapter(model, saved)
    got = keras_logits(model, token_ids)
    assert_peft_close(got, expected, base, base_torch)
    with adapterspec.disabled_adapters(model):
        assert np.abs(keras_logits(model, token_ids) - base).max() == 0.0

    # Keras saves exactly PEFT's tensors and config; PEFT loads them cleanly, same logits
    out = adapterspec.save_adapter(model, tmp_path / "keras")
    ours = adapterspec.read_adapter(out)
    assert set(ours.tensors) == set(theirs.tensors)
    ours_np, theirs_np = ours.load_tensors("numpy"), theirs.load_tensors("numpy")
    for key in theirs_np:
        assert ours_np[key].dtype == theirs_np[key].dtype and np.array_equal(ours_np[key], theirs_np[key]), key
    ours_config = json.loads((out / "adapter_config.json").read_text())
    assert {k: v for k, v in ours_config.items() if k in peft_config} == peft_config
    reloaded, said_ours = peft_load_exactly(checkpoints["llama"], out)
    assert said_ours == said_peft  # no warning of its own
    assert np.array_equal(torch_logits(reloaded, token_ids), expected)

    # merged: PEFT's merged logits; unmerged: back to the unmerged forward
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model)
    assert_peft_close(keras_logits(model, token_ids), torch_logits(reference, token_ids), base, base_torch)
    adapterspec.unmerge_adapters(model)
    assert_near(keras_logits(model, token_ids), got)

    # refusals leave the model as it was: DeLoRA adapts Linear layers only (PEFT raises on the embedding)
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(
        model, {"peft_type": "DELORA", "r": 2, "target_modules": ["embed_tokens"]}, "e"), UnsupportedError, "DELORA")
    adapterspec.delete_adapter(model, "default")
    assert_near(keras_logits(model, token_ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_adapter_made_in_keras_loads_in_peft(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """A DeLoRA injected on Keras with init_weights false (both factors kaiming-uniform: the output moves) saves
    w_norm = the kernel's column norms, trains what PEFT trains (w_norm frozen), and loads in PEFT with Keras' logits."""
    import keras

    keras.utils.set_random_seed(3)
    model = keras_model("llama", checkpoints["llama"])
    base = keras_logits(model, token_ids)
    config = {"peft_type": "DELORA", "r": 3, "target_modules": ["q_proj", "up_proj"], "init_weights": False,
              "delora_lambda": 4, "lambda_pattern": {"up_proj": 2.5}}
    adapterspec.inject_adapter(model, config, trainable=True)
    got = keras_logits(model, token_ids)
    assert np.abs(got - base).max() > 1e-3
    out = adapterspec.save_adapter(model, tmp_path / "keras")
    tensors = adapterspec.read_adapter(out).load_tensors("numpy")
    hf = hf_model(checkpoints["llama"])
    weights = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    for key, value in tensors.items():
        module = key.removeprefix("base_model.model.").rpartition(".")[0]
        if key.endswith("delora_w_norm"):
            np.testing.assert_allclose(value, np.linalg.norm(weights[f"{module}.weight"], axis=0), rtol=1e-5)
        if key.endswith("delora_lambda"):
            assert value.tolist() == ([2.5] if "up_proj" in key else [4.0]), key
    reloaded, said = peft_load_exactly(checkpoints["llama"], out)
    assert not [m for m in said if "missing" in m.lower() or "unexpected" in m.lower()], said
    assert_peft_close(got, torch_logits(reloaded, token_ids), base, torch_logits(hf, token_ids))
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)  # the base is frozen (freeze_base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(hf_model(checkpoints["llama"]), peft.DeloraConfig(
            r=3, target_modules=["q_proj", "up_proj"]))
    assert trainable == theirs.get_nb_trainable_parameters()[0]  # A, B, lambda; w_norm is a buffer


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_delora_adapters_active_give_peft_s_logits(saved: Path, checkpoints: Any, token_ids: np.ndarray,
                                                       tmp_path: Path) -> None:
    """Two DeLoRA adapters active on shared layers: PEFT's PeftModel with both active (their terms summed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(hf_model(checkpoints["llama"]), str(saved)).eval()
        reference.add_adapter("b", peft.DeloraConfig(r=2, target_modules=["q_proj", "up_proj"], init_weights=False))
        reference.save_pretrained(str(tmp_path))
        alone = torch_logits(reference, token_ids)
        reference.base_model.set_adapter(["default", "b"])
    expected = torch_logits(reference, token_ids)
    assert np.abs(expected - alone).max() > 1e-3  # "b" changes the output: the comparison means something
    model = keras_model("llama", checkpoints["llama"])
    base = keras_logits(model, token_ids)
    adapterspec.load_adapter(model, saved)
    adapterspec.load_adapter(model, tmp_path / "b", "b")
    adapterspec.set_active_adapters(model, ["default", "b"])
    assert_peft_close(keras_logits(model, token_ids), expected, base, torch_logits(hf_model(checkpoints["llama"]),
                                                                                     token_ids))


def test_bfloat16_layer_sums_two_adapters_as_peft_to_the_bit(saved: Path, checkpoints: Any, tmp_path: Path) -> None:
    """On a bfloat16 model PEFT adds each DeLoRA term into a zero tensor of the output's dtype (rounded at each step),
    then adds that to the base output once; Keras had added each term to the output in float32 and rounded once (one
    adapter: 64 of 640 q_proj outputs off by up to 7 bf16 ulps; two: 206, 23 ulps). Now the layer's output equals
    PEFT's bit for bit with one adapter and with two, and the merged and unmerged kernels too."""
    import keras
    import keras_hub

    from keras_helpers import ARCHS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(hf_model(checkpoints["llama"]).to(torch.bfloat16), str(saved))
        reference.add_adapter("b", peft.DeloraConfig(r=2, target_modules=["q_proj"], init_weights=False))
        reference.save_pretrained(str(tmp_path), selected_adapters=["b"])
    reference.eval()
    task = getattr(keras_hub.models, ARCHS["llama"].keras_task)
    model = task.from_preset(str(checkpoints["llama"]), preprocessor=None, dtype="bfloat16")
    adapterspec.load_adapter(model, saved)
    adapterspec.load_adapter(model, tmp_path / "b", "b")
    layer = model.backbone.transformer_layers[0]._self_attention_layer._query_dense
    peft_layer = reference.base_model.model.model.layers[0].self_attn.q_proj
    x = unique_values((2, 5, 64), 3, scale=1.0)

    def outputs() -> tuple[np.ndarray, np.ndarray]:
        got = keras.ops.convert_to_numpy(keras.ops.cast(layer(keras.ops.cast(x, "bfloat16")), "float32"))
        with torch.no_grad():
            expected = peft_layer(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
        return got.reshape(expected.shape), expected

    for active in (["default"], ["default", "b"]):
        adapterspec.set_active_adapters(model, active)
        reference.base_model.set_adapter(active)
        got, expected = outputs()
        assert np.array_equal(got, expected), (active, float(np.abs(got - expected).max()))
    adapterspec.merge_adapters(model)
    reference.merge_adapter()
    kernel = keras.ops.convert_to_numpy(keras.ops.cast(layer.kernel, "float32")).reshape(64, -1).T
    assert np.array_equal(kernel, peft_layer.base_layer.weight.detach().float().numpy())


def test_gpt2_conv1d_is_refused_as_peft_refuses(checkpoints: Any) -> None:
    with pytest.raises(TypeError):
        peft.get_peft_model(hf_model(checkpoints["gpt2"]), peft.DeloraConfig(r=2, target_modules=["c_attn"]))
    model = keras_model("gpt2", checkpoints["gpt2"])
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(
        model, {"peft_type": "DELORA", "r": 2, "target_modules": ["c_fc"]}), UnsupportedError, "Conv1D")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unused_zero_rank_and_unreached_bad_lambda_key_load_as_peft(saved: Path, checkpoints: Any,
                                                                  token_ids: np.ndarray, tmp_path: Path) -> None:
    """PEFT 0.21.2 loads rank_pattern {"nothing": 0} and a lambda_pattern key that does not compile after one every
    module matches (get_pattern_key is lazy): Keras loads that folder with PEFT's logits, and starts a new adapter
    with PEFT's bounds; a key q_proj reaches first, or a zero rank a module takes, is refused naming the entry."""
    config = json.loads((saved / "adapter_config.json").read_text())
    lambdas = {"q_proj|v_proj": 3, "down_proj": 5, "(": 1}
    changed = {**config, "rank_pattern": {"down_proj": 2, "nothing": 0}, "lambda_pattern": lambdas}

    def folder(name: str, cfg: dict[str, Any]) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(cfg))
        (tmp_path / name / "adapter_model.safetensors").write_bytes((saved / "adapter_model.safetensors").read_bytes())
        return tmp_path / name

    reference, _ = peft_load_exactly(checkpoints["llama"], folder("ok", changed))
    expected = torch_logits(reference, token_ids)
    model = keras_model("llama", checkpoints["llama"])
    base = keras_logits(model, token_ids)
    base_torch = torch_logits(hf_model(checkpoints["llama"]), token_ids)
    for name, cfg, needle in (("late", {**config, "lambda_pattern": {"v_proj": 1, "(": 3}}, "/lambda_pattern/("),
                              ("zero", {**config, "rank_pattern": {"down_proj": 0}}, "/rank_pattern/down_proj")):
        where = folder(name, cfg)
        assert_refused_unchanged(model, lambda w=where: adapterspec.load_adapter(model, w), UnsupportedError, needle)
    adapterspec.load_adapter(model, tmp_path / "ok")
    assert_peft_close(keras_logits(model, token_ids), expected, base, base_torch)
    adapterspec.delete_adapter(model, "default")
    adapterspec.inject_adapter(model, changed)
    tensors = adapterspec.read_adapter(adapterspec.save_adapter(model, tmp_path / "new")).load_tensors("numpy")
    bounds = {k.split(".")[-2]: float(v[0]) for k, v in tensors.items() if k.endswith("delora_lambda")}
    assert bounds == {"q_proj": 3.0, "v_proj": 3.0, "down_proj": 5.0}  # PEFT's get_pattern_key, first key wins
