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
from adapterspec_flax.layers import (  # noqa: E402
    AdaptedEmbed,
    AdaptedLinear,
    AdapterParam,
    AdapterVariable,
    FrozenParam,
)

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
    def __init__(self, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        self.q_proj = nnx.Linear(DIM, HID, rngs=rngs, dtype=dtype, param_dtype=dtype)
        self.o_proj = nnx.Linear(HID, DIM, use_bias=False, rngs=rngs, dtype=dtype, param_dtype=dtype)


class FlaxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs, dtype=dtype, param_dtype=dtype)
        self.layers = nnx.List([FlaxBlock(rngs, dtype), FlaxBlock(rngs, dtype)])

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


def flax_net(source: TorchNet | None = None, dtype: Any = jnp.float32) -> FlaxNet:
    """The NNX twin of :func:`torch_net` (or of ``source``): same weights, kernels transposed, in ``dtype``."""
    net = FlaxNet(nnx.Rngs(0), dtype)
    sd = {k: v.detach().float().numpy() for k, v in (source or torch_net()).state_dict().items()}
    net.embed.embedding.set_value(jnp.asarray(sd["embed.weight"], dtype))
    for i, block in enumerate(net.layers):
        block.q_proj.kernel.set_value(jnp.asarray(sd[f"layers.{i}.q_proj.weight"].T, dtype))
        block.q_proj.bias.set_value(jnp.asarray(sd[f"layers.{i}.q_proj.bias"], dtype))
        block.o_proj.kernel.set_value(jnp.asarray(sd[f"layers.{i}.o_proj.weight"].T, dtype))
    return net


HALF = {"bfloat16": (jnp.bfloat16, torch.bfloat16), "float16": (jnp.float16, torch.float16)}


def half_nets(dtype: str) -> tuple[TorchNet, FlaxNet]:
    """The twins in half precision, base weights rounded to quarters: a layer's base output on a quarter-valued input
    is then exact in both frameworks (an nnx.Linear rounds x @ W before adding its bias, torch's rounds once), so
    the adapted layers' outputs can differ only by how the adapters are applied."""
    net = torch_net()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.round(p * 4) / 4)
    return net.to(HALF[dtype][1]), flax_net(net, HALF[dtype][0])


def quarters(rows: int, cols: int) -> np.ndarray:
    """A quarter-valued input in [-1, 1] (see :func:`half_nets`)."""
    return (np.round(np.sin(np.arange(rows * cols) * 0.61) * 4) / 4).reshape(rows, cols)


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


def _sgd_step(model: nnx.Module) -> None:
    """One step of NNX's default training recipe: an optimizer and gradients over every ``nnx.Param``."""
    import optax

    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    grads = nnx.grad(lambda m: jnp.mean(m(jnp.asarray(IDS)) ** 2), argnums=nnx.DiffState(0, nnx.Param))(model)
    optimizer.update(model, grads)


def test_freeze_base_leaves_the_base_out_of_training_until_the_last_trainer_goes(saved: dict) -> None:
    """``freeze_base`` (the default with ``trainable``, PEFT's get_peft_model, SPEC's LoadOptions): every base
    parameter stops being an ``nnx.Param`` -- the same Variable objects, now :class:`FrozenParam` -- so an optimizer
    and ``nnx.grad`` over ``nnx.Param`` train the adapter alone; deleting the last adapter that froze them gives
    their types back. It was ignored: one SGD step moved the base q_proj kernel by 1.4e-2 and the embedding by 2.6e-2
    with freeze_base=True as with False."""
    model = flax_net()
    kernel_var, embed_var = model.layers[0].q_proj.kernel, model.embed.embedding
    kernel, embedding = np.asarray(kernel_var[...]), np.asarray(embed_var[...])
    before = {path: type(v) for path, v in nnx.to_flat_state(nnx.state(model))}
    adapterspec.load_adapter(model, saved["lora"][0], trainable=True)
    trainable = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert trainable == {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, AdapterParam))}
    assert model.layers[0].q_proj.base_layer.kernel is kernel_var and isinstance(kernel_var, FrozenParam)
    lora_b = np.asarray(model.layers[0].q_proj.adapters["default"].lora_B[...])
    _sgd_step(model)
    np.testing.assert_array_equal(np.asarray(kernel_var[...]), kernel)
    np.testing.assert_array_equal(np.asarray(embed_var[...]), embedding)
    assert np.abs(np.asarray(model.layers[0].q_proj.adapters["default"].lora_B[...]) - lora_b).max() > 1e-4

    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "target_modules": ["o_proj"]}, "second")
    adapterspec.delete_adapter(model, "default")  # "second" froze the base too: it stays frozen
    assert isinstance(kernel_var, FrozenParam) and isinstance(embed_var, FrozenParam)
    adapterspec.delete_adapter(model, "second")
    assert {path: type(v) for path, v in nnx.to_flat_state(nnx.state(model))} == before
    assert model.layers[0].q_proj is not None and type(kernel_var) is nnx.Param and model.embed.embedding is embed_var

    # freeze_base=False, and a frozen (not trainable) load, leave the base's variables as they are
    for options in ({"trainable": True, "freeze_base": False}, {}):
        model = flax_net()
        adapterspec.load_adapter(model, saved["lora"][0], **options)
        assert type(model.layers[0].q_proj.base_layer.kernel) is nnx.Param
        adapterspec.unload(model)
        assert {path: type(v) for path, v in nnx.to_flat_state(nnx.state(model))} == before


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


def test_every_switch_changes_the_graph_definition(saved: dict) -> None:
    """What the README says of ``graphdef, state = nnx.split(model)`` once and ``jax.jit`` over the state: each switch
    changes the graph definition, so the split must be taken again; the old one with the new state runs the old
    structure (after a merge: the delta twice, 0.45 off PEFT on the probe's model), the new one PEFT's output."""
    model = flax_net()

    def forward(graphdef: Any, state: Any, ids: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(ids)

    run = jax.jit(forward, static_argnums=0)
    steps = {"load": lambda: adapterspec.load_adapter(model, saved["lora"][0]),
             "load another": lambda: adapterspec.load_adapter(model, saved["lora2"][0], "second"),
             "set active": lambda: adapterspec.set_active_adapters(model, "default"),
             "merge": lambda: adapterspec.merge_adapters(model),
             "unmerge": lambda: adapterspec.unmerge_adapters(model),
             "delete": lambda: adapterspec.delete_adapter(model, "second"),
             "inject": lambda: adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2,
                                                                 "target_modules": ["o_proj"]}, "fresh"),
             "unload": lambda: adapterspec.unload(model)}
    graphdefs = {"before": nnx.split(model)[0]}
    for step, change in steps.items():
        previous = list(graphdefs.values())[-1]
        change()
        graphdefs[step] = nnx.split(model)[0]
        assert graphdefs[step] != previous, step
    model = flax_net()
    adapterspec.load_adapter(model, saved["lora"][0])
    graphdef, state = nnx.split(model)
    assert_near(np.asarray(run(graphdef, state, jnp.asarray(IDS))), saved["lora"][1])
    adapterspec.merge_adapters(model)
    fresh, state = nnx.split(model)
    assert_near(np.asarray(run(fresh, state, jnp.asarray(IDS))), saved["lora"][1])
    assert np.abs(np.asarray(run(graphdef, state, jnp.asarray(IDS))) - saved["lora"][1]).max() > 1e-2  # stale


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
    on the same layers would stop ``b`` there (PEFT's output then moves by the whole of ``b``); refused, nothing
    changes."""
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



@pytest.mark.parametrize("lora", ["lora", "dora"])
def test_ia3_with_lora_on_one_layer_is_refused_as_the_sdk_rule(saved: dict, lora: str) -> None:
    """SPEC 8.9, one SDK rule for every backend (``adapterspec.config.mix_refusal``): IA3 and LoRA/DoRA active or
    merged together on one layer have no defined result (PEFT refuses adapters of different methods) and the torch and
    Keras backends refuse them; the Flax backend ran them (IA3 scaling, then the LoRA term). Refused from
    set_active_adapters and merge_adapters, both orders, nothing changed; IA3 with IA3 and LoRA with LoRA still run."""
    model = flax_net()
    adapterspec.load_adapter(model, saved[lora][0], lora)
    adapterspec.load_adapter(model, saved["ia3"][0], "ia3")
    kernel = np.asarray(model.layers[0].q_proj.base_layer.kernel[...])
    alone = run_flax(model)
    for names in ([lora, "ia3"], ["ia3", lora]):
        for action in (adapterspec.set_active_adapters, adapterspec.merge_adapters):
            with pytest.raises(UnsupportedError, match=f"IA3 adapter 'ia3' cannot run together with .*{lora!r}") \
                    as info:
                action(model, names)
            assert info.value.key == "layers.0.o_proj"  # the first layer holding both, in graph order
            assert adapterspec.active_adapters(model) == ["ia3"] and model.layers[0].q_proj.merged == ()
            np.testing.assert_array_equal(np.asarray(model.layers[0].q_proj.base_layer.kernel[...]), kernel)
            np.testing.assert_array_equal(run_flax(model), alone)
    adapterspec.load_adapter(model, saved["ia3"][0], "ia3b")
    adapterspec.set_active_adapters(model, ["ia3", "ia3b"])  # one method: vectors multiply, as PEFT's
    assert adapterspec.active_adapters(model) == ["ia3", "ia3b"]


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


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["lora", "lora2", "dora", "ia3"])
def test_half_precision_base_runs_adapters_in_float32_like_peft(saved: dict, name: str, dtype: str) -> None:
    """SPEC 7.5: on a float16/bfloat16 base with no dtype asked for, the adapter is held in float32 (PEFT's
    autocast_adapter_dtype, the torch backend's UPCAST_DTYPES) and each adapted layer computes as PEFT's does: the
    input in float32 through the adapter, the terms added in float32, the sum cast to the base's dtype once. Every
    adapted layer's output equals PEFT's on the same half-precision torch model (the adapters were held
    in the base's dtype: 24 to 108 elements per adapter one ulp off, 1.6e-2 on bfloat16)."""
    folder = saved[name][0]
    torch_model, model = half_nets(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(torch_model, folder).eval().base_model.model
    adapterspec.load_adapter(model, folder)
    held = {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(model, AdapterVariable))}
    assert held == {jnp.dtype(jnp.float32)}
    assert model.layers[0].q_proj.base_layer.kernel.get_value().dtype == HALF[dtype][0]
    outs, expected = [], []
    for i in range(2):
        for attr, width in (("q_proj", DIM), ("o_proj", HID)):
            layer = getattr(model.layers[i], attr)
            if not isinstance(layer, AdaptedLinear):
                continue
            x = quarters(5, width)
            with torch.no_grad():
                expected.append(getattr(reference.layers[i], attr)(torch.tensor(x).to(HALF[dtype][1])))
            outs.append(layer(jnp.asarray(x, HALF[dtype][0])))
    assert len(outs) == {"lora": 4, "lora2": 2, "dora": 4, "ia3": 4}[name]
    if name == "lora":
        with torch.no_grad():
            expected.append(reference.embed(torch.tensor(IDS)))
        outs.append(model.embed(jnp.asarray(IDS)))
    assert {out.dtype for out in outs} == {jnp.dtype(HALF[dtype][0])}
    out = np.concatenate([np.asarray(o.astype(jnp.float32)).ravel() for o in outs])
    want = np.concatenate([e.float().numpy().ravel() for e in expected])
    # equal but where the float32 adapter term's last bit (XLA's and torch's sums round apart) decides the half
    # rounding: one ulp, on 1 element of 280 in float16 here (the adapters held in the base's dtype: 15-54% of them)
    ulp = np.spacing(np.abs(want).astype(HALF[dtype][0])).astype(np.float32)
    assert np.all(np.abs(out - want) <= ulp)
    assert np.count_nonzero(out != want) <= 0.01 * out.size


def _base_weights(model: nnx.Module | torch.nn.Module) -> dict[str, np.ndarray]:
    """Every base weight of a twin (adapted or not), torch layout, as float32."""
    if isinstance(model, torch.nn.Module):
        return {k.replace(".base_layer", ""): v.detach().float().numpy() for k, v in model.state_dict().items()
                if not any(t in k for t in ("lora_", "ia3_"))}
    out = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if isinstance(variable, AdapterParam):
            continue
        key = ".".join(str(p) for p in path if p != "base_layer")
        value = np.asarray(variable.get_value().astype(jnp.float32))
        key, _, param = key.rpartition(".")
        out[f"{key}.{ {'kernel': 'weight', 'embedding': 'weight'}.get(param, param)}"] = (
            value.T if param == "kernel" else value)
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["lora", "lora2", "dora", "ia3"])
def test_half_precision_merge_rounds_as_peft(saved: dict, name: str, dtype: str) -> None:
    """A float32 adapter merged into (and unmerged from) a half-precision base gives PEFT's weights to the bit: the
    sum taken in float32 and rounded once, but a LoRA's delta rounded first where PEFT rounds it
    (adapterspec.config.rounds_delta_first: an embedding, an unmerge). Merging the adapter in the base's dtype, or
    rounding the delta every time, left 35 to 217 merged weights one ulp off PEFT's."""
    folder = saved[name][0]
    torch_model, model = half_nets(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(torch_model, folder).eval()
    adapterspec.load_adapter(model, folder)
    reference.merge_adapter()
    adapterspec.merge_adapters(model)
    want, got = _base_weights(reference.base_model.model), _base_weights(model)
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"merged {key}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's IA3: 'Unmerge result can be inaccurate'
        reference.unmerge_adapter()
    adapterspec.unmerge_adapters(model)
    want, got = _base_weights(reference.base_model.model), _base_weights(model)
    for key in want:
        # DoRA divides by m / ||W + dW||, a norm XLA and torch sum apart: float32 rounding at the weights' scale
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=fp32_tolerance(want[key], HID) if name == "dora"
                                   else 0, err_msg=f"unmerged {key}")


@pytest.mark.parametrize("name", ["lora", "lora2", "dora", "ia3"])
def test_half_precision_base_round_trip_writes_the_stored_values(saved: dict, tmp_path: Path, name: str) -> None:
    """SPEC 7.5: a load -> save round trip on a bfloat16 base writes the file's values exactly, in the file's dtype:
    a float32 file comes back float32 (it came back BF16, 9.1e-4 off on LoRA, 3.8e-3 on DoRA/IA3), and a bfloat16
    file, held in float32, comes back BF16 (the torch backend's stored dtypes); a value moved off bfloat16's grid
    (training) is saved in float32."""
    from safetensors.numpy import load_file, save_file

    folder = saved[name][0]
    original = load_file(folder / "adapter_model.safetensors")
    _, model = half_nets("bfloat16")
    adapterspec.load_adapter(model, folder)
    back = load_file(adapterspec.save_adapter(model, tmp_path / "f32") / "adapter_model.safetensors")
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        assert back[key].dtype == np.float32, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)

    half = tmp_path / "bf16-file"
    half.mkdir()
    (half / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    stored = {key: value.astype(jnp.bfloat16) for key, value in original.items()}
    save_file(stored, half / "adapter_model.safetensors")
    _, model = half_nets("bfloat16")
    adapterspec.load_adapter(model, half)
    assert {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(model, AdapterVariable))} == {
        jnp.dtype(jnp.float32)}
    back = load_file(adapterspec.save_adapter(model, tmp_path / "bf16") / "adapter_model.safetensors")
    for key, value in stored.items():
        assert back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key].view(np.uint16), value.view(np.uint16), err_msg=key)
    weights = model.layers[0].q_proj.adapters["default"]
    variable = weights.ia3_l if name == "ia3" else weights.lora_B
    variable.set_value(variable.get_value() * (1 + 2.0 ** -12))  # a step finer than bfloat16's
    extracted = adapterspec.extract_adapter(model).tensors
    param = "ia3_l" if name == "ia3" else "lora_B.weight"
    assert extracted[f"base_model.model.layers.0.q_proj.{param}"].dtype == "F32"
    assert extracted[f"base_model.model.layers.1.q_proj.{param}"].dtype == "BF16"


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

    q_proj = {"kind": "linear", "in_features": 8, "out_features": 8, "bias": False}
    modules: dict[str, Any] = {"model.layers.0.self_attn.q_proj": q_proj}
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


@pytest.mark.parametrize("name", ["layers", "graph", "devices", "inject", "state", "switch", "plugin", "conformance"])
def test_docstring_examples(name: str) -> None:
    import doctest
    import importlib

    module = importlib.import_module(f"adapterspec_flax.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL)
    assert result.failed == 0
