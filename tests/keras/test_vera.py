"""VeRA (SPEC.md 15.5) on keras-hub models, exact against PEFT 0.21 (fp32) in both directions; the shared
projections stored once; the refusals typed, as the torch backend's.

Each case: a PEFT VeRA model with element-unique lambdas and projections is saved with ``save_projection`` (shared
``base_model.vera_A`` / ``vera_B``, sliced per module). A keras-hub model converted from the same checkpoint loads
the folder and gives PEFT's logits within the base conversion error; ``save_adapter`` writes bit-identical tensors
(the projections once) that PEFT loads with nothing missing or unexpected and no warning of its own; merging gives
PEFT's merged logits, unmerging the unmerged ones.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from adapterspec.errors import MissingTensorError, ShapeMismatchError, UnsupportedError  # noqa: E402
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
    """Element-unique lambdas (b around 1, d around 0.5) and projections: a transpose or a wrong slice shows."""
    with torch.no_grad():
        tensors = sorted(list(model.named_parameters()) + list(model.named_buffers()))
        for index, (name, tensor) in enumerate(tensors):
            shape = tuple(tensor.shape)
            if "vera_lambda_b" in name:
                tensor.copy_(torch.from_numpy(unique_values(shape, index, around=1.0, scale=0.5)))
            elif "vera_lambda_d" in name:
                tensor.copy_(torch.from_numpy(unique_values(shape, index, around=0.5, scale=0.5)))
            elif "vera_A" in name or "vera_B" in name:
                tensor.copy_(torch.from_numpy(unique_values(shape, index, scale=0.3)))


def _peft_folder(checkpoint: Path, config: Any, folder: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(hf_model(checkpoint), config)
        _fill(model)
        model.eval()
        model.save_pretrained(str(folder))
    return model






CASES: dict[str, tuple[str, Callable[[], Any]]] = {
    "llama": ("llama", lambda: peft.VeraConfig(r=8, target_modules=LLAMA)),
    "gpt2-fused-c_attn": ("gpt2", lambda: peft.VeraConfig(r=6, target_modules=GPT2, projection_prng_key=7)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_vera_gives_peft_logits_in_keras_and_round_trips(case: str, checkpoints: Any, token_ids: np.ndarray,
                                                              tmp_path: Path) -> None:
    arch, make_config = CASES[case]
    reference = _peft_folder(checkpoints[arch], make_config(), tmp_path / "peft")
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    theirs = adapterspec.read_adapter(tmp_path / "peft")
    assert "base_model.vera_A" in theirs.tensors and "base_model.vera_B" in theirs.tensors
    _, said_peft = peft_load_exactly(checkpoints[arch], tmp_path / "peft")
    expected = torch_logits(reference, token_ids)
    base_torch = torch_logits(hf_model(checkpoints[arch]), token_ids)
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, token_ids)
    assert np.abs(expected - base_torch).max() > 1e-2  # the adapter changes the output: the comparison means something

    modules = adapterspec.load_adapter(model, tmp_path / "peft")
    assert len(modules) == len([k for k in theirs.tensors if k.endswith(".vera_lambda_b")])
    got = keras_logits(model, token_ids)
    assert_peft_close(got, expected, base, base_torch)
    with adapterspec.disabled_adapters(model):
        assert np.abs(keras_logits(model, token_ids) - base).max() == 0.0

    # Keras saves exactly PEFT's tensors (the projections once) and config; PEFT loads them cleanly, same logits
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    ours = adapterspec.read_adapter(saved)
    assert set(ours.tensors) == set(theirs.tensors)
    ours_np, theirs_np = ours.load_tensors("numpy"), theirs.load_tensors("numpy")
    for key in theirs_np:
        assert ours_np[key].dtype == theirs_np[key].dtype and np.array_equal(ours_np[key], theirs_np[key]), key
    ours_config = json.loads((saved / "adapter_config.json").read_text())
    assert {k: v for k, v in ours_config.items() if k in peft_config} == peft_config
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

    # deleting the adapter leaves the model as it was (up to the merge's rounding, as for every method)
    adapterspec.delete_adapter(model, "default")
    assert adapterspec.adapter_names(model) == []
    assert_near(keras_logits(model, token_ids), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_adapter_made_in_keras_loads_in_peft(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """A VeRA injected on Keras (``init_weights`` false: lambdas random, projections Keras' Kaiming draws) saves its
    projections; PEFT loads the folder with nothing missing or unexpected and gives Keras' logits."""
    model = keras_model("gpt2", checkpoints["gpt2"])
    adapterspec.inject_adapter(model, {"peft_type": "VERA", "r": 4, "target_modules": GPT2, "init_weights": False},
                               trainable=False)
    adapterspec.set_active_adapters(model, ["default"])
    got = keras_logits(model, token_ids)
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    tensors = adapterspec.read_adapter(saved).tensors
    assert tuple(tensors["base_model.vera_A"].shape) == (4, 256)
    assert tuple(tensors["base_model.vera_B"].shape) == (256, 4)
    reloaded, _ = peft_load_exactly(checkpoints["gpt2"], saved)
    base = keras_logits(keras_model("gpt2", checkpoints["gpt2"]), token_ids)
    base_torch = torch_logits(hf_model(checkpoints["gpt2"]), token_ids)
    assert np.abs(got - base).max() > 1e-2
    assert_peft_close(got, torch_logits(reloaded, token_ids), base, base_torch)




def _edited(checkpoint: Path, folder: Path, edit: Callable[[dict[str, np.ndarray]], Any], **fields: Any) -> Path:
    from safetensors.numpy import load_file, save_file

    _peft_folder(checkpoint, peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"], **fields), folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_missing_projection_is_refused(checkpoints: Any, tmp_path: Path) -> None:
    folder = _edited(checkpoints["llama"], tmp_path / "peft", lambda t: t.pop("base_model.vera_B"))
    model = keras_model("llama", checkpoints["llama"])
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, folder), MissingTensorError, "base_model.vera_B")


def test_a_projection_of_another_width_is_refused(checkpoints: Any, tmp_path: Path) -> None:
    folder = _edited(checkpoints["llama"], tmp_path / "peft",
                     lambda t: t.update({"base_model.vera_A": np.ascontiguousarray(t["base_model.vera_A"][:, :32])}))
    model = keras_model("llama", checkpoints["llama"])
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, folder), ShapeMismatchError, "base_model.vera_A")


def test_save_projection_false_and_bias_are_refused_naming_the_field(checkpoints: Any, tmp_path: Path) -> None:
    model = keras_model("llama", checkpoints["llama"])
    for field, value in (("save_projection", False), ("bias", "all")):
        config = {"peft_type": "VERA", "r": 4, "target_modules": ["q_proj"], field: value}
        assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(model, config), UnsupportedError, f"/{field}")


def test_embeddings_are_refused_as_in_peft(checkpoints: Any) -> None:
    model = keras_model("llama", checkpoints["llama"])
    config = {"peft_type": "VERA", "r": 4, "target_modules": ["embed_tokens"]}
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(model, config), UnsupportedError, "model.embed_tokens")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_training_step_equals_peft(arch: str, checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """Loaded trainable, one SGD step on the same loss gives PEFT's lambdas after its step (the projections frozen,
    unchanged); the gradients are the forward's, so a wrong slice or a missing scale would show here too."""
    import tensorflow as tf

    targets = LLAMA if arch == "llama" else GPT2
    reference = _peft_folder(checkpoints[arch], peft.VeraConfig(r=4, target_modules=targets), tmp_path / "peft")
    weights = unique_values((2, 9, 128), 5, around=0.0, scale=1.0)
    lr = 0.5

    reference.eval()  # GPT-2's own dropouts off on both sides (the gradient needs no train mode)
    optimiser = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=lr)
    logits = reference(input_ids=torch.from_numpy(np.asarray(token_ids, dtype=np.int64))).logits
    (logits * torch.from_numpy(weights)).sum().backward()
    optimiser.step()
    from peft.utils import get_peft_model_state_dict

    expected = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(reference).items()}

    model = keras_model(arch, checkpoints[arch])
    adapterspec.load_adapter(model, tmp_path / "peft", trainable=True)
    before = adapterspec.extract_adapter(model, "default").load_tensors("numpy")
    variables = model.trainable_variables
    assert variables
    from keras_helpers import keras_inputs

    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(keras_inputs(token_ids), training=False) * weights)
    for variable, grad in zip(variables, tape.gradient(loss, variables)):
        variable.assign_sub(lr * grad)
    after = adapterspec.extract_adapter(model, "default").load_tensors("numpy")
    assert set(after) == set(expected)
    worst = 0.0
    for key, value in expected.items():
        if "vera_lambda" in key:
            assert np.abs(value - before[key]).max() > 1e-3, key  # the step moved it
            worst = max(worst, float(np.abs(after[key] - value).max() / np.abs(value).max()))
        else:
            assert np.array_equal(after[key], before[key]) and np.array_equal(after[key], value), key  # frozen
    print(f"lambdas after one step: max relative diff vs PEFT {worst:.3g}")
    assert worst < 1e-4


def test_vera_dropout_drops_the_input_in_training_only(checkpoints: Any, token_ids: np.ndarray) -> None:
    """``vera_dropout``: PEFT drops the adapter's input while training; at inference the forward is deterministic."""
    from keras_helpers import keras_inputs

    model = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(model, {"peft_type": "VERA", "r": 4, "target_modules": ["q_proj"],
                                       "init_weights": False, "vera_dropout": 0.5})
    adapterspec.set_active_adapters(model, ["default"])
    inputs = keras_inputs(token_ids)
    first, second = (np.asarray(model(inputs, training=False)) for _ in range(2))
    assert np.array_equal(first, second)
    trained = np.asarray(model(inputs, training=True))
    assert np.abs(trained - first).max() > 1e-4


def test_every_vera_case_of_the_corpus_passes() -> None:
    """Dense and GPT-2's Conv1D layers, numeric (against the reference, itself checked against PEFT), round-trip
    and folder cases: all pass on this backend, none is unsupported."""
    from adapterspec.conformance import Status, load_corpus, run_suite
    from adapterspec_keras.conformance import KerasImplementation

    corpus = load_corpus(Path(__file__).parents[2] / "conformance_tests" / "v1")
    report = run_suite(KerasImplementation(), corpus, include=[r"vera"])
    names = {r.name: r.status for r in report.results}
    assert len(names) >= 6 and any("gpt2" in n for n in names)
    assert {n: s for n, s in names.items() if s is not Status.PASSED} == {}


def _bf16_logits_close(model: Any, reference: Any, checkpoint: Path, token_ids: np.ndarray, roundings: int = 4) -> float:
    """The bfloat16 Keras model's logits are the bfloat16 PEFT model's up to what the two frameworks' bfloat16
    kernels differ by without any adapter, plus a few (``roundings``) roundings of the logits' size for the
    adapter's part."""
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
    assert diff <= gap + roundings * step
    return diff


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bf16_model_keeps_the_adapter_in_float32_and_equals_peft(checkpoints: Any, token_ids: np.ndarray,
                                                                 tmp_path: Path) -> None:
    """On a bfloat16 keras-hub model the adapter stays float32 (SPEC.md 7.5), its part is computed in float32 and
    the logits are PEFT's on its bfloat16 model within the frameworks' bfloat16 gap, merged too; saved back, the
    tensors are the file's."""
    import keras_hub
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "peft"
    _peft_folder(checkpoints["llama"], peft.VeraConfig(r=4, target_modules=LLAMA), folder)
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
    # merged, every adapted kernel is rounded to bfloat16 (one ulp of the weight each), by each framework in its
    # own order of operations, and the bfloat16 matmuls then see weights up to an ulp apart: through two layers
    # that reached 10.5 roundings of the logits on an AVX2 CPU (4.4 unmerged), over the 4 the unmerged check allows
    _bf16_logits_close(model, reference, checkpoints["llama"], token_ids, roundings=16)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_vera_adapters_keep_their_own_projections(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """Two VeRA adapters of different ranks on the same modules: each has its own shared projections; active alone,
    each gives its PEFT model's logits; each saves its own file back; deleting one leaves the other whole."""
    arch = "llama"
    configs = {"one": peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),
               "two": peft.VeraConfig(r=6, target_modules=["q_proj", "down_proj"], projection_prng_key=3)}
    expected = {}
    for name, config in configs.items():
        expected[name] = torch_logits(_peft_folder(checkpoints[arch], config, tmp_path / name), token_ids)
    base_torch = torch_logits(hf_model(checkpoints[arch]), token_ids)
    assert min(np.abs(e - base_torch).max() for e in expected.values()) > 1e-2
    assert np.abs(expected["one"] - expected["two"]).max() > 1e-2
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, token_ids)
    for name in configs:
        adapterspec.load_adapter(model, tmp_path / name, name)
    for name in configs:
        adapterspec.set_active_adapters(model, [name])
        assert_peft_close(keras_logits(model, token_ids), expected[name], base, base_torch)
        ours = adapterspec.extract_adapter(model, name).load_tensors("numpy")
        theirs = adapterspec.read_adapter(tmp_path / name).load_tensors("numpy")
        assert set(ours) == set(theirs)
        for key in theirs:
            assert np.array_equal(ours[key], theirs[key]), (name, key)
    adapterspec.delete_adapter(model, "one")
    adapterspec.set_active_adapters(model, ["two"])
    assert_peft_close(keras_logits(model, token_ids), expected["two"], base, base_torch)
