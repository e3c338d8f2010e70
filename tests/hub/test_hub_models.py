"""Adapters trained in torch (PEFT), pushed to the test Hub and loaded by repo id into torch and Keras models."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from adapterspec.hub import download_adapter, push_to_hub  # noqa: E402
from tolerance import fp32_tolerance  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")

LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INPUT = torch.arange(12).reshape(2, 6) * 7 % 128


def _unique(shape: tuple[int, ...], salt: int) -> Any:
    n = math.prod(shape)
    return (0.05 * torch.sin(1.0 + salt * 0.37 + torch.arange(n, dtype=torch.float64) * 0.731)).reshape(shape).float()


@pytest.fixture(scope="module")
def base() -> Any:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()


@pytest.fixture(scope="module")
def trained(base: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT LoRA folders (``save_pretrained``, init_lora_weights=False, element-unique weights): v1 and v2 differ."""
    root = tmp_path_factory.mktemp("trained")
    folders = {}
    for version, salt in (("v1", 0), ("v2", 1000)):
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(copy.deepcopy(base), config)
            with torch.no_grad():
                for i, (name, param) in enumerate(sorted(model.named_parameters())):
                    if "lora_" in name:
                        param.copy_(_unique(tuple(param.shape), salt + i))
            model.save_pretrained(root / version)
        folders[version] = root / version
    return folders


def _logits(model: Any) -> Any:
    with torch.no_grad():
        return model(INPUT).logits


def _loaded(base: Any, source: Any, **kwargs: Any) -> Any:
    model = copy.deepcopy(base)
    adapterspec.load_adapter(model, source, **kwargs)
    return _logits(model)


def _peft_logits(base: Any, folder: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)))


def test_round_trip_torch(hub, base: Any, trained: dict[str, Path]) -> None:
    push_to_hub(trained["v1"], "org/llama-lora")

    from_hub = _loaded(base, "org/llama-lora")
    from_folder = _loaded(base, trained["v1"])

    assert torch.equal(from_hub, from_folder)
    expected = _peft_logits(base, trained["v1"])
    torch.testing.assert_close(from_hub, expected, atol=fp32_tolerance(expected, 64), rtol=0)
    assert not torch.allclose(from_hub, _logits(base), atol=1e-3)  # the adapter does change the outputs


def test_revision_loads_the_first_commit(hub, base: Any, trained: dict[str, Path]) -> None:
    first = push_to_hub(trained["v1"], "org/llama-versions")
    push_to_hub(trained["v2"], "org/llama-versions")

    v1, v2 = _loaded(base, trained["v1"]), _loaded(base, trained["v2"])
    assert not torch.allclose(v1, v2, atol=1e-3)
    assert torch.equal(_loaded(base, "org/llama-versions", revision=first.oid), v1)
    assert torch.equal(_loaded(base, f"hf://org/llama-versions@{first.oid}"), v1)
    assert torch.equal(_loaded(base, "org/llama-versions"), v2)


def test_subfolder_loads_the_right_adapter(hub, base: Any, trained: dict[str, Path]) -> None:
    push_to_hub(trained["v1"], "org/llama-subfolders", subfolder="one")
    push_to_hub(trained["v2"], "org/llama-subfolders", subfolder="two")

    assert torch.equal(_loaded(base, "org/llama-subfolders", subfolder="two"), _loaded(base, trained["v2"]))
    assert torch.equal(_loaded(base, "hf://org/llama-subfolders/one"), _loaded(base, trained["v1"]))


def test_push_a_model_then_peft_loads_it_from_the_hub(hub, base: Any, trained: dict[str, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A model's adapter is extracted, pushed, and loads from the Hub in adapterspec and in PEFT unchanged."""
    from huggingface_hub import constants, hf_api

    model = copy.deepcopy(base)
    adapterspec.load_adapter(model, trained["v2"], "mine")
    push_to_hub(model, "org/from-model", adapter_name="mine")
    assert torch.equal(_loaded(base, "org/from-model"), _logits(model))

    # PEFT calls huggingface_hub with its import-time endpoint: point that at the test server too.
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)  # the module-level HfApi behind file_exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), "org/from-model")
    expected = _logits(peft_model)
    torch.testing.assert_close(expected, _logits(model), atol=fp32_tolerance(expected, 64), rtol=0)


def test_offline_load_by_repo_id(hub, base: Any, trained: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                 tmp_path: Path) -> None:
    push_to_hub(trained["v1"], "org/llama-offline")
    online = _loaded(base, "org/llama-offline")
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert torch.equal(_loaded(base, "org/llama-offline"), online)
    model = copy.deepcopy(base)
    with pytest.raises(adapterspec.HubError, match="not in the local Hugging Face cache and offline mode is on"):
        adapterspec.load_adapter(model, "org/llama-offline", cache_dir=tmp_path / "empty")
    assert adapterspec.adapter_names(model) == []


def _keras_backbone(base: Any, tmp_path: Path) -> Any:
    """The same tiny Llama in keras-hub, converted from the transformers checkpoint; skips if not possible yet."""
    keras_plugin = pytest.importorskip("adapterspec_keras.plugin")
    if not hasattr(keras_plugin, "adapterspec_inject"):
        pytest.skip("the Keras backend (adapterspec_keras) does not implement loading yet")
    pytest.importorskip("keras")
    keras_hub = pytest.importorskip("keras_hub")
    folder = tmp_path / "tiny-llama"
    base.save_pretrained(folder)
    return keras_hub.models.LlamaBackbone.from_preset(str(folder))


def test_round_trip_keras(hub, base: Any, trained: dict[str, Path], tmp_path: Path) -> None:
    """The adapter pushed from torch loads by repo id into the Keras model and gives the torch outputs."""
    import numpy as np

    backbone = _keras_backbone(base, tmp_path)
    push_to_hub(trained["v1"], "org/llama-keras")
    try:
        adapterspec.load_adapter(backbone, "org/llama-keras")
    except adapterspec.BackendError as exc:
        pytest.skip(f"the Keras backend cannot load into a keras-hub Llama yet: {exc}")
    folder = download_adapter("org/llama-keras")
    reference = copy.deepcopy(base)
    adapterspec.load_adapter(reference, folder)
    with torch.no_grad():
        want = reference.model(INPUT).last_hidden_state.numpy()
        without = base.model(INPUT).last_hidden_state.numpy()
    inputs = {"token_ids": INPUT.numpy().astype("int32"), "padding_mask": np.ones(INPUT.shape, dtype="int32")}
    got = np.asarray(backbone(inputs))
    np.testing.assert_allclose(got, want, atol=fp32_tolerance(want, 64), rtol=0)  # torch and Keras: other orders
    assert np.abs(got - without).max() > 1e-2  # the adapter is applied, not just the base model matched
