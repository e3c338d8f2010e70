"""The third-party Flax NNX backend (examples/adapterspec-flax), against PEFT itself.

A small torch network and an NNX network with the same attribute paths (``embed``,
``layers.0.q_proj``...) share their base weights (kernels transposed); adapters trained -- well,
filled with element-unique values -- in PEFT load into the NNX model through the entry-point plugin,
give PEFT's outputs, and save back into folders PEFT loads with no missing or unexpected key.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
nnx = pytest.importorskip("flax.nnx")
pytest.importorskip("adapterspec_flax")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from adapterspec.errors import (  # noqa: E402
    AdapterNotFoundError,
    ShapeMismatchError,
    TargetNotFoundError,
    UnsupportedError,
)
from adapterspec.plugins import get_plugin_manager, plugin_names  # noqa: E402
from tolerance import fp32_tolerance  # noqa: E402
from adapterspec_flax.layers import AdaptedEmbed, AdaptedLinear, AdapterParam, AdapterVariable  # noqa: E402

VOCAB, DIM, HID = 16, 8, 12


def assert_near(actual: Any, expected: Any) -> None:
    """Equal up to fp32 rounding of the twin nets' sums (at most HID terms) at ``expected``'s magnitude."""
    np.testing.assert_allclose(actual, expected, atol=fp32_tolerance(expected, HID), rtol=0)


# -- twin models -------------------------------------------------------------------------------------

class TorchBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(DIM, HID)
        self.o_proj = torch.nn.Linear(HID, DIM, bias=False)


class TorchNet(torch.nn.Module):
    """``embed`` -> per layer ``h += o_proj(tanh(q_proj(h)))``; returns ``h``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.layers = torch.nn.ModuleList([TorchBlock(), TorchBlock()])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = h + layer.o_proj(torch.tanh(layer.q_proj(h)))
        return h


class FlaxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.q_proj = nnx.Linear(DIM, HID, rngs=rngs)
        self.o_proj = nnx.Linear(HID, DIM, use_bias=False, rngs=rngs)


class FlaxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.layers = nnx.List([FlaxBlock(rngs), FlaxBlock(rngs)])

    def __call__(self, ids: jax.Array) -> jax.Array:
        h = self.embed(ids)
        for layer in self.layers:
            h = h + layer.o_proj(jnp.tanh(layer.q_proj(h)))
        return h


IDS = np.array([[0, 3, 5, 7, 15], [2, 4, 6, 8, 10]])


def _fill(params: list[torch.nn.Parameter], scale: float, offset: float = 0.0) -> None:
    """Element-unique values (a sine of the element index, shifted per tensor): a transpose cannot pass."""
    with torch.no_grad():
        for i, p in enumerate(params):
            idx = torch.arange(p.numel(), dtype=torch.float64)
            p.copy_((torch.sin(idx * 0.37 + i + offset) * scale).reshape(p.shape).to(p.dtype))


def torch_net() -> TorchNet:
    net = TorchNet().eval()
    _fill(list(net.parameters()), 0.5)
    return net


def flax_net() -> FlaxNet:
    """The NNX twin of :func:`torch_net`: same weights, kernels transposed."""
    net = FlaxNet(nnx.Rngs(0))
    sd = {k: v.detach().numpy() for k, v in torch_net().state_dict().items()}
    net.embed.embedding.set_value(jnp.asarray(sd["embed.weight"]))
    for i, block in enumerate(net.layers):
        block.q_proj.kernel.set_value(jnp.asarray(sd[f"layers.{i}.q_proj.weight"].T))
        block.q_proj.bias.set_value(jnp.asarray(sd[f"layers.{i}.q_proj.bias"]))
        block.o_proj.kernel.set_value(jnp.asarray(sd[f"layers.{i}.o_proj.weight"].T))
    return net


def run_torch(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).numpy()


def run_flax(model: nnx.Module) -> np.ndarray:
    return np.asarray(model(jnp.asarray(IDS)))


def peft_model(config: peft.PeftConfig, offset: float = 0.0) -> peft.PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(torch_net(), config)
    adapter_params = [p for n, p in model.named_parameters() if "base_layer" not in n and any(
        tag in n for tag in ("lora_", "ia3_"))]
    _fill(adapter_params, 0.2, offset)
    with torch.no_grad():  # IA3 vectors near 1 (as trained ones are), DoRA magnitudes positive
        for n, p in model.named_parameters():
            if "ia3_l" in n or "lora_magnitude_vector" in n:
                p.add_(1.0)
    return model.eval()


CONFIGS = {
    # rsLoRA, rank and alpha patterns, LoRA on the embedding
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["embed", "q_proj", "o_proj"],
                                    rank_pattern={"o_proj": 2}, alpha_pattern={"layers.1.q_proj": 3},
                                    init_lora_weights=False),
    # lora_B with a bias (PEFT allows it on linear layers only)
    "lora2": lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_bias=True,
                                     init_lora_weights=False),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_dora=True,
                                    init_lora_weights=False),
    "ia3": lambda: peft.IA3Config(target_modules=["q_proj", "o_proj"], feedforward_modules=["o_proj"]),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, np.ndarray]]:
    """name -> (folder written by PEFT's save_pretrained, PEFT's output on IDS)."""
    root = tmp_path_factory.mktemp("flax-peft")
    out = {}
    for offset, (name, make) in enumerate(CONFIGS.items()):
        model = peft_model(make(), offset=offset)
        with warnings.catch_warnings():  # PEFT 0.21 takes lora_B's 1-D bias for an unsharded ZeRO-3 tensor
            warnings.simplefilter("ignore")
            model.save_pretrained(root / name)
        out[name] = (root / name, run_torch(model))
    return out


# -- the plugin is found like any third-party one ------------------------------------------------------

def test_entry_point_registers_flax() -> None:
    assert "flax" in plugin_names()
    assert adapterspec.backend_name(flax_net()) == "flax"
    plugin = get_plugin_manager().get_plugin("flax")  # the entry point's module, as pluggy loaded it
    assert plugin.__name__ == "adapterspec_flax.plugin"
    # (the hook on this plugin only: calling it on all plugins imports every framework)
    assert [i.name for i in plugin.adapterspec_conformance_implementations()] == ["flax"]


def test_claiming_does_not_import_jax() -> None:
    code = ("import sys, adapterspec\n"
            "from adapterspec.plugins import get_plugin_manager\n"
            "assert 'flax' in [n for n, _ in get_plugin_manager().list_name_plugin()]\n"
            "assert get_plugin_manager().hook.adapterspec_backend_name(model=object()) is None\n"
            "assert 'jax' not in sys.modules and 'flax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={"ADAPTERSPEC_DISABLE_PLUGINS": "torch,keras"})


def test_disable_env_blocks_the_plugin() -> None:
    code = "from adapterspec.plugins import plugin_names\nassert 'flax' not in plugin_names(), plugin_names()\n"
    subprocess.run([sys.executable, "-c", code], check=True, env={"ADAPTERSPEC_DISABLE_PLUGINS": "flax,torch,keras"})


# -- numbers equal PEFT's -------------------------------------------------------------------------------

def test_base_models_agree() -> None:
    assert_near(run_flax(flax_net()), run_torch(torch_net()))


@pytest.mark.parametrize("name", ["lora", "lora2", "dora", "ia3"])
def test_peft_adapter_matches_torch(saved: dict, name: str) -> None:
    folder, expected = saved[name]
    model = flax_net()
    base = run_flax(model)
    modules = adapterspec.load_adapter(model, folder)
    assert modules == sorted(modules, key=lambda m: (m != "embed", m))  # embed, then layers in order
    assert "layers.0.q_proj" in modules and ("embed" in modules) == (name == "lora")
    out = run_flax(model)
    assert np.abs(out - base).max() > 1e-2  # the adapter does something
    assert_near(out, expected)
    assert isinstance(model.layers[0].q_proj, AdaptedLinear)
    assert isinstance(model.embed, AdaptedEmbed) == (name == "lora")


def test_loaded_adapter_is_frozen_and_injected_one_trainable(saved: dict) -> None:
    model = flax_net()
    adapterspec.load_adapter(model, saved["lora2"][0])
    weights = model.layers[0].q_proj.adapters["default"]
    assert isinstance(weights.lora_A, AdapterVariable) and not isinstance(weights.lora_A, nnx.Param)
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "target_modules": ["o_proj"]}, "fresh")
    assert isinstance(model.layers[1].o_proj.adapters["fresh"].lora_B, AdapterParam)
    trainable = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, AdapterParam))}
    assert trainable == {f"layers.{i}.o_proj.adapters.fresh.lora_{m}" for i in range(2) for m in "AB"}
    # a fresh LoRA starts as a no-op (B = 0) ...
    adapterspec.set_active_adapters(model, "fresh")
    np.testing.assert_array_equal(run_flax(model), run_flax(flax_net()))

    # ... and trains: gradients reach its B (A is random), nothing else is differentiated
    def loss(m: nnx.Module) -> jax.Array:
        return jnp.sum(m(jnp.asarray(IDS)) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, AdapterParam))(model)
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    assert set(flat) == trainable
    assert np.abs(flat["layers.0.o_proj.adapters.fresh.lora_B"]).max() > 1e-3


# -- round trip: Flax -> save -> PEFT ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lora", "lora2", "dora", "ia3"])
def test_roundtrip_saved_folder_loads_in_peft(saved: dict, tmp_path: Path, name: str) -> None:
    from peft.utils import load_peft_weights, set_peft_model_state_dict
    from safetensors.numpy import load_file

    folder, expected = saved[name]
    model = flax_net()
    adapterspec.load_adapter(model, folder)
    out = adapterspec.save_adapter(model, tmp_path / name)
    a, b = load_file(folder / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    config = peft.PeftConfig.from_pretrained(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.get_peft_model(torch_net(), config)
    result = set_peft_model_state_dict(reloaded, load_peft_weights(str(out)))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if any(t in k for t in ("lora_", "ia3_"))]
    assert_near(run_torch(reloaded.eval()), expected)
    # and through PeftModel.from_pretrained, as a user would
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(torch_net(), out)
    assert not [w for w in caught if "missing adapter keys" in str(w.message) or "unexpected" in str(w.message).lower()
                and "keyword arguments" not in str(w.message)]
    assert_near(run_torch(loaded.eval()), expected)


def test_fresh_flax_adapter_roundtrips(tmp_path: Path) -> None:
    model = flax_net()
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "target_modules": ["q_proj"],
                                       "init_lora_weights": False})
    flax_out = run_flax(model)
    adapterspec.save_adapter(model, tmp_path / "fresh")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(torch_net(), tmp_path / "fresh")
    assert_near(run_torch(loaded.eval()), flax_out)


# -- switching, disabling, deleting, merging -----------------------------------------------------------

def test_switch_disable_and_combine_like_peft(saved: dict) -> None:
    model = flax_net()
    base = run_flax(model)
    adapterspec.load_adapter(model, saved["lora"][0])
    adapterspec.load_adapter(model, saved["lora2"][0], "second")
    assert adapterspec.adapter_names(model) == ["default", "second"]
    assert adapterspec.active_adapters(model) == ["second"]
    assert_near(run_flax(model), saved["lora2"][1])
    adapterspec.set_active_adapters(model, "default")
    assert_near(run_flax(model), saved["lora"][1])
    with adapterspec.disabled_adapters(model):
        assert adapterspec.active_adapters(model) == []
        np.testing.assert_array_equal(run_flax(model), base)
    assert adapterspec.active_adapters(model) == ["default"]

    # both at once add up, as in PEFT
    reference = peft_model(CONFIGS["lora"](), offset=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.load_adapter(saved["lora2"][0], "second")
    reference.base_model.set_adapter(["default", "second"])
    adapterspec.set_active_adapters(model, ["default", "second"])
    assert_near(run_flax(model), run_torch(reference))
    with pytest.raises(AdapterNotFoundError):
        adapterspec.set_active_adapters(model, ["default", "nope"])
    assert adapterspec.active_adapters(model) == ["default", "second"]


def test_jit_sees_switches(saved: dict) -> None:
    model = flax_net()
    adapterspec.load_adapter(model, saved["lora"][0])

    @nnx.jit
    def forward(m: nnx.Module, ids: jax.Array) -> jax.Array:
        return m(ids)

    assert_near(np.asarray(forward(model, jnp.asarray(IDS))), saved["lora"][1])
    with adapterspec.disabled_adapters(model):
        assert_near(np.asarray(forward(model, jnp.asarray(IDS))), run_flax(flax_net()))


def test_delete_restores_the_original_layer_objects(saved: dict) -> None:
    model = flax_net()
    originals = {"embed": model.embed, "q0": model.layers[0].q_proj, "o1": model.layers[1].o_proj}
    before = nnx.state(model)
    adapterspec.load_adapter(model, saved["lora"][0])
    adapterspec.load_adapter(model, saved["ia3"][0], "ia3")
    adapterspec.delete_adapter(model, "default")
    assert model.embed is originals["embed"]  # only the LoRA was on the embedding
    assert isinstance(model.layers[0].q_proj, AdaptedLinear)  # the IA3 is still on it
    adapterspec.delete_adapter(model, "ia3")
    assert model.layers[0].q_proj is originals["q0"] and model.layers[1].o_proj is originals["o1"]
    assert adapterspec.adapter_names(model) == [] and not hasattr(model, "_adapterspec_state")
    after = nnx.state(model)
    assert jax.tree.structure(before) == jax.tree.structure(after)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(AdapterNotFoundError):
        adapterspec.delete_adapter(model, "default")


@pytest.mark.parametrize("name", ["lora", "lora2", "dora", "ia3"])
def test_merge_unmerge_and_unload(saved: dict, name: str) -> None:
    folder, expected = saved[name]
    model = flax_net()
    kernel = np.asarray(model.layers[0].q_proj.kernel[...])
    adapterspec.load_adapter(model, folder)
    adapterspec.merge_adapters(model)
    assert np.abs(np.asarray(model.layers[0].q_proj.base_layer.kernel[...]) - kernel).max() > 1e-3
    assert_near(run_flax(model), expected)
    adapterspec.unmerge_adapters(model)
    np.testing.assert_allclose(np.asarray(model.layers[0].q_proj.base_layer.kernel[...]), kernel, rtol=0,
                               atol=fp32_tolerance(kernel, 4))  # merged and unmerged: a few roundings per weight
    assert_near(run_flax(model), expected)
    # merge_and_unload: the plain layers keep the adapter's effect
    adapterspec.unload(model, merge=True)
    assert type(model.layers[0].q_proj) is nnx.Linear and adapterspec.adapter_names(model) == []
    assert_near(run_flax(model), expected)


def test_switching_unmerges_first(saved: dict) -> None:
    model = flax_net()
    adapterspec.load_adapter(model, saved["lora"][0])
    adapterspec.merge_adapters(model)
    with adapterspec.disabled_adapters(model):
        assert_near(run_flax(model), run_flax(flax_net()))
    assert adapterspec.active_adapters(model) == ["default"]
    assert_near(run_flax(model), saved["lora"][1])


def test_merging_one_of_two_active_adapters_is_refused(saved: dict) -> None:
    """SPEC 8.9, as the torch backend (``adapterspec.config.merge_refusal``): merging ``a`` alone while ``b`` is active
    on the same layers would stop ``b`` there (PEFT's output then moves by the whole of ``b``); refused, nothing changes."""
    model = flax_net()
    adapterspec.load_adapter(model, saved["lora"][0])
    adapterspec.load_adapter(model, saved["lora2"][0], "second")
    adapterspec.set_active_adapters(model, ["default", "second"])
    kernel = np.asarray(model.layers[0].q_proj.base_layer.kernel[...])
    both = run_flax(model)
    with pytest.raises(UnsupportedError) as info:
        adapterspec.merge_adapters(model, ["default"])
    assert info.value.key == "second" and "layers.0.q_proj" in str(info.value)
    np.testing.assert_array_equal(np.asarray(model.layers[0].q_proj.base_layer.kernel[...]), kernel)
    assert model.layers[0].q_proj.merged == () and adapterspec.active_adapters(model) == ["default", "second"]
    np.testing.assert_array_equal(run_flax(model), both)
    adapterspec.merge_adapters(model, ["default", "second"])  # both together: allowed, same output
    assert_near(run_flax(model), both)


# -- all or nothing --------------------------------------------------------------------------------------

def test_failed_load_leaves_the_model_unchanged(saved: dict, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((saved["lora2"][0] / "adapter_config.json").read_text())
    tensors = load_file(saved["lora2"][0] / "adapter_model.safetensors")
    key = "base_model.model.layers.1.q_proj.lora_A.weight"
    tensors[key] = np.ascontiguousarray(np.zeros((2, DIM + 1), np.float32))  # does not fit the layer
    tensors["base_model.model.layers.1.q_proj.lora_B.weight"] = np.zeros((HID, 2), np.float32)
    save_file(tensors, bad / "adapter_model.safetensors")
    model = flax_net()
    adapterspec.load_adapter(model, saved["lora"][0], "keep")
    adapterspec.set_active_adapters(model, "keep")
    layer = model.layers[1].q_proj
    with pytest.raises(ShapeMismatchError) as info:
        adapterspec.load_adapter(model, bad, "bad")
    assert info.value.key == key
    assert adapterspec.adapter_names(model) == ["keep"] and adapterspec.active_adapters(model) == ["keep"]
    assert model.layers[1].q_proj is layer and "bad" not in layer.adapters
    assert_near(run_flax(model), saved["lora"][1])


def test_unsupported_and_unmatched_targets_change_nothing() -> None:
    model = flax_net()
    with pytest.raises(TargetNotFoundError):
        adapterspec.inject_adapter(model, {"peft_type": "LORA", "target_modules": ["k_proj"]})
    with pytest.raises(UnsupportedError) as info:
        adapterspec.inject_adapter(model, {"peft_type": "IA3", "target_modules": ["q_proj", "embed"],
                                           "feedforward_modules": []})
    assert info.value.key == "embed"
    with pytest.raises(UnsupportedError) as info:
        adapterspec.inject_adapter(model, {"peft_type": "LOHA", "target_modules": ["q_proj"]})
    assert info.value.pointer == "/peft_type"
    with pytest.raises(UnsupportedError):
        adapterspec.inject_adapter(model, {"peft_type": "LORA", "target_modules": ["q_proj"],
                                           "modules_to_save": ["o_proj"]})
    for init in ("orthogonal", "pissa"):  # PEFT's start from an orthogonal pair, or from the base's SVD (SPEC 8.1)
        with pytest.raises(UnsupportedError) as info:
            adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"],
                                               "init_lora_weights": init})
        assert info.value.pointer == "/init_lora_weights"
    assert type(model.layers[0].q_proj) is nnx.Linear and adapterspec.adapter_names(model) == []


@pytest.mark.parametrize("field", ["target_modules", "feedforward_modules"])
def test_null_targets_without_a_default_are_refused(saved: dict, tmp_path: Path, field: str) -> None:
    """SPEC 14.2, as the torch backend (``AdapterConfig.for_model``): a null ``target_modules`` (IA3: or
    ``feedforward_modules``) means PEFT's default for the model type, and an NNX model without ``config.model_type``
    has none: UnsupportedError naming the field. IA3 with feedforward_modules null was injected (every module taken
    for not feed-forward) and saved a config PEFT refuses ('Please specify `feedforward_modules`'); a PEFT file so
    edited read ShapeMismatchError on o_proj's [1, 12] vector."""
    model = flax_net()
    config = ({"peft_type": "LORA", "target_modules": None} if field == "target_modules" else
              {"peft_type": "IA3", "target_modules": ["q_proj", "o_proj"], "feedforward_modules": None})
    with pytest.raises(UnsupportedError) as info:
        adapterspec.inject_adapter(model, config)
    assert info.value.pointer == f"/{field}" and "model type None" in str(info.value)
    assert type(model.layers[0].q_proj) is nnx.Linear and adapterspec.adapter_names(model) == []
    folder = tmp_path / "edited"
    folder.mkdir()
    source = saved["ia3" if field == "feedforward_modules" else "lora2"][0]
    edited = json.loads((source / "adapter_config.json").read_text())
    edited[field] = None
    (folder / "adapter_config.json").write_text(json.dumps(edited))
    (folder / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    with pytest.raises(UnsupportedError) as info:
        adapterspec.load_adapter(model, folder)
    assert info.value.pointer == f"/{field}"
    assert type(model.layers[0].q_proj) is nnx.Linear and adapterspec.adapter_names(model) == []


def test_null_target_modules_take_the_model_types_default(tmp_path: Path) -> None:
    """A model that names its architecture (``model.config.model_type``, as transformers' models do) gets PEFT's
    default targets (llama: q_proj, v_proj) and saves them, as the torch backend does."""
    @dataclasses.dataclass(frozen=True)
    class Config:  # static NNX data, as a port of a transformers model would hold its config
        model_type: str = "llama"

    model = flax_net()
    model.config = Config()
    modules = adapterspec.inject_adapter(model, {"peft_type": "LORA", "target_modules": None})
    assert modules == ["layers.0.q_proj", "layers.1.q_proj"]
    out = adapterspec.save_adapter(model, tmp_path / "defaults")
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] in (["q_proj", "v_proj"],
                                                                                        ["v_proj", "q_proj"])


def test_module_map_renames_spec_paths(saved: dict) -> None:
    class Renamed(nnx.Module):
        def __init__(self, net: FlaxNet) -> None:
            self.tok = net.embed
            self.blocks = net.layers

        def __call__(self, ids: jax.Array) -> jax.Array:
            h = self.tok(ids)
            for layer in self.blocks:
                h = h + layer.o_proj(jnp.tanh(layer.q_proj(h)))
            return h

    model = Renamed(flax_net())
    mapping = {"embed": "tok"} | {f"layers.{i}.{p}": f"blocks.{i}.{p}" for i in range(2) for p in ("q_proj", "o_proj")}
    modules = adapterspec.load_adapter(model, saved["lora"][0], module_map=mapping)
    assert "layers.0.q_proj" in modules and "embed" in modules
    assert_near(run_flax(model), saved["lora"][1])
    config, tensors = adapterspec.extract_adapter(model).config, adapterspec.extract_adapter(model).tensors
    assert config.peft_type == "LORA" and "base_model.model.layers.1.o_proj.lora_A.weight" in tensors


def test_dtype_option_bfloat16(saved: dict, tmp_path: Path) -> None:
    model = flax_net()
    adapterspec.load_adapter(model, saved["lora2"][0], dtype="bfloat16")
    assert model.layers[0].q_proj.adapters["default"].lora_A.get_value().dtype == jnp.bfloat16
    np.testing.assert_allclose(run_flax(model), saved["lora2"][1], atol=2e-2, rtol=0)
    out = adapterspec.save_adapter(model, tmp_path / "bf16")
    assert {i.dtype for i in adapterspec.read_adapter(out).tensors.values()} == {"BF16"}


# -- conformance ---------------------------------------------------------------------------------------

def test_conformance_suite_passes() -> None:
    """``adapterspec conformance --impl flax``: no failure; what the backend lacks is reported unsupported."""
    conformance = pytest.importorskip("adapterspec.conformance")
    if not (conformance.default_corpus_dir() / "numeric.json").exists():
        pytest.skip("no conformance corpus in this checkout")
    impl = conformance.resolve_implementation("flax")  # found through the plugin's hook
    report = conformance.run_suite(impl, exclude=["^schema/"])
    failed = [(r.name, r.message) for r in report.results if r.status.value == "failed"]
    assert not failed
    passed = set(report.by_status("passed"))
    for method in ("lora-linear-f32", "lora-linear-bf16", "lora-embedding-f32", "rslora-patterns-f32",
                   "lora-bias-f32", "dora-linear-f32", "ia3-linear-f32"):
        assert {f"numeric/{method}", f"roundtrip/roundtrip-{method}"} <= passed, method
    unsupported = report.by_status("unsupported")
    assert "numeric/lora-conv2d-f32" in unsupported and "numeric/loha-linear-f32" in unsupported
    # SPEC 5.3: an embedding saved whole replaces the model's, which this backend does not do (refused, typed)
    assert {"folder/embedding-saved-whole", "folder/embedding-saved-whole-gpt2"} <= set(unsupported)


@pytest.mark.parametrize("case", ["embedding-saved-whole", "embedding-saved-whole-gpt2"])
def test_embedding_saved_whole_is_refused_as_unsupported(case: str) -> None:
    """A valid adapter whose file holds an embedding saved whole (PEFT's save_embedding_layers, SPEC 5.3) asks the
    backend to replace the model's embedding: UnsupportedError naming the tensor (it read UnexpectedTensorError
    'the config does not target this module; fix target_modules or remove the tensor'), model unchanged."""
    conformance = pytest.importorskip("adapterspec.conformance")
    folder = conformance.default_corpus_dir() / "folders" / case
    if not folder.exists():
        pytest.skip("no conformance corpus in this checkout")
    from adapterspec_flax.conformance import build_model

    modules = {"model.layers.0.self_attn.q_proj": {"kind": "linear", "in_features": 8, "out_features": 8, "bias": False}}
    if case.endswith("gpt2"):
        modules |= {"transformer.wte": {"kind": "embedding", "num_embeddings": 10, "embedding_dim": 8},
                    "lm_head": {"kind": "linear", "in_features": 8, "out_features": 10, "bias": False}}
        keys = {"base_model.model.transformer.wte.weight", "base_model.model.lm_head.weight"}
    else:
        modules |= {"model.embed_tokens": {"kind": "embedding", "num_embeddings": 10, "embedding_dim": 8}}
        keys = {"base_model.model.model.embed_tokens.weight"}
    model = build_model({"dtype": "float32", "modules": modules})
    with pytest.raises(UnsupportedError) as info:
        adapterspec.load_adapter(model, folder)
    assert info.value.key in keys and "embedding saved whole" in str(info.value)
    assert "torch backend" in (info.value.hint or "")
    assert adapterspec.adapter_names(model) == []
    assert type(model["model"]["layers"]["0"]["self_attn"]["q_proj"]) is nnx.Linear


@pytest.mark.parametrize("name", ["layers", "graph", "devices", "inject", "switch", "plugin", "conformance"])
def test_docstring_examples(name: str) -> None:
    import doctest
    import importlib

    module = importlib.import_module(f"adapterspec_flax.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL)
    assert result.failed == 0
