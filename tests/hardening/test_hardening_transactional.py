"""A failing load leaves the model exactly as it was, in both backends.

The model already carries a good adapter ``a`` (active); loading a bad adapter ``b`` must fail with an
``AdapterSpecError`` (or the injected interrupt) and leave every variable's value, the module/layer
objects, trainable flags, the adapters and the active set, and the forward output unchanged -- and
the name ``b`` usable afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hardening_harness import STATS

import adapterspec
from adapterspec.spec import CONFIG_NAME, SAFETENSORS_NAME

pytestmark = pytest.mark.filterwarnings("ignore::adapterspec.AdapterSpecWarning")

CONFIG = {"peft_type": "LORA", "target_modules": ["q", "v"], "r": 2, "lora_alpha": 4}
SHAPES = {"lora_A.weight": (2, 3), "lora_B.weight": (4, 2)}


def tensors(salt: int = 0) -> dict[str, np.ndarray]:
    out, offset = {}, salt * 100
    for module in ("q", "v"):
        for param, shape in SHAPES.items():
            n = int(np.prod(shape))
            out[f"base_model.model.{module}.{param}"] = (0.3 * np.sin(np.arange(offset, offset + n) * 0.731)).reshape(shape).astype(np.float32)
            offset += n
    return out


def _write(folder: Path, config: dict, values: dict[str, np.ndarray]) -> Path:
    """Write even what write_adapter would refuse (to test the readers)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    save_file(values, str(folder / SAFETENSORS_NAME), metadata={"format": "pt"})
    return folder


def _without(key: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in tensors(1).items() if k != key}


def _reshaped(key: str, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {**tensors(1), key: np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) / 10}


Q_A, Q_B, V_B = ("base_model.model.q.lora_A.weight", "base_model.model.q.lora_B.weight", "base_model.model.v.lora_B.weight")

#: name -> (how to make the source, the error class expected)
BAD: dict[str, tuple[Callable[[Path], Any], type | tuple[type, ...]]] = {
    "missing key": (lambda d: _write(d, CONFIG, _without(V_B)), adapterspec.MissingTensorError),
    "rank disagrees with config": (lambda d: _write(d, CONFIG, _reshaped(Q_A, (3, 3))), adapterspec.ShapeMismatchError),
    "in_features disagree with the model": (
        lambda d: _write(d, CONFIG, {**_reshaped(Q_A, (2, 5)), "base_model.model.v.lora_A.weight": np.ones((2, 5), np.float32)}),
        adapterspec.ShapeMismatchError),
    "out_features disagree with the model (2nd module)": (
        lambda d: _write(d, CONFIG, _reshaped(V_B, (7, 2))), adapterspec.ShapeMismatchError),
    "unexpected key": (lambda d: _write(d, CONFIG, {**tensors(1), "base_model.model.q.lora_C.weight": np.ones((2, 2), np.float32)}),
                       adapterspec.UnexpectedTensorError),
    "module the model lacks": (lambda d: _write(d, {**CONFIG, "target_modules": ["q", "v", "zz"]},
                                                {**tensors(1), "base_model.model.zz.lora_A.weight": np.ones((2, 3), np.float32),
                                                 "base_model.model.zz.lora_B.weight": np.ones((4, 2), np.float32)}),
                               # the backends disagree (keras: TargetNotFoundError, torch: UnexpectedTensorError)
                               (adapterspec.TargetNotFoundError, adapterspec.UnexpectedTensorError)),
    "module not targeted by the config": (lambda d: _write(d, {**CONFIG, "target_modules": ["q"]}, tensors(1)),
                                          adapterspec.UnexpectedTensorError),
    "integer dtype": (lambda d: _write(d, CONFIG, {**tensors(1), Q_A: np.arange(6, dtype=np.int32).reshape(2, 3)}),
                      adapterspec.DTypeMismatchError),
    "adapter name left in a key": (lambda d: _write(d, CONFIG, {**_without(Q_A), "base_model.model.q.lora_A.default.weight":
                                                                tensors(1)[Q_A]}), adapterspec.UnexpectedTensorError),
    "corrupt file": (lambda d: (_write(d, CONFIG, tensors(1)), (d / SAFETENSORS_NAME).write_bytes(b"\x08" + b"\x00" * 7 + b"{}")),
                     adapterspec.FileFormatError),
    "file truncated after it was read": (lambda d: _truncated_after_read(d), adapterspec.FileFormatError),
    "bad config": (lambda d: _write(d, {**CONFIG, "r": 0}, tensors(1)), adapterspec.ConfigError),
    "pickle only": (lambda d: (_write(d, CONFIG, tensors(1)), (d / SAFETENSORS_NAME).rename(d / "adapter_model.bin")),
                    adapterspec.UnsafeFileError),
}


def _truncated_after_read(folder: Path) -> adapterspec.Adapter:
    """An Adapter whose header was read and checked, and whose file then lost its data (the load must fail late)."""
    _write(folder, CONFIG, tensors(1))
    adapter = adapterspec.read_adapter(folder)
    weights = folder / SAFETENSORS_NAME
    weights.write_bytes(weights.read_bytes()[:-10])
    return adapter


# -- backends ---------------------------------------------------------------------------------
class TorchBackend:
    name = "torch"

    def __init__(self) -> None:
        self.torch = pytest.importorskip("torch")

    def model(self) -> Any:
        torch = self.torch

        class Tiny(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.q = torch.nn.Linear(3, 4)
                self.v = torch.nn.Linear(3, 4)

            def forward(self, x):  # type: ignore[no-untyped-def]
                return self.q(x) + 2 * self.v(x)

        torch.manual_seed(0)
        return Tiny().eval()

    def snapshot(self, model: Any) -> dict[str, Any]:
        x = self.torch.linspace(-1, 1, 6).reshape(2, 3)
        with self.torch.no_grad():
            out = model(x).numpy().copy()
        return {
            "values": {k: v.detach().clone().numpy() for k, v in model.state_dict().items()},
            "modules": [(n, id(m), type(m).__name__) for n, m in model.named_modules()],
            "trainable": [(n, p.requires_grad) for n, p in model.named_parameters()],
            "adapters": adapterspec.adapter_names(model),
            "active": adapterspec.active_adapters(model),
            "merged": _torch_merged(model),
            "output": out,
        }


class KerasBackend:
    name = "keras"

    def __init__(self) -> None:
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        self.keras = pytest.importorskip("keras")

    def model(self) -> Any:
        keras = self.keras
        inputs = keras.Input((3,))
        init = keras.initializers.RandomNormal(seed=0)
        q = keras.layers.Dense(4, name="q", kernel_initializer=init)(inputs)
        v = keras.layers.Dense(4, name="v", kernel_initializer=init)(inputs)
        return keras.Model(inputs, q + 2 * v)

    def snapshot(self, model: Any) -> dict[str, Any]:
        x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
        return {
            "values": {v.path: np.array(v.numpy()) for v in model.variables},
            "modules": [(layer.path, id(layer), type(layer).__name__) for layer in model._flatten_layers()],
            "trainable": [(v.path, v.trainable) for v in model.variables],
            "adapters": adapterspec.adapter_names(model),
            "active": adapterspec.active_adapters(model),
            "merged": _keras_merged(model),
            "output": np.array(model(x)),
        }


def _torch_merged(model: Any) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The model's merged adapters and each adapted layer's (name, merged adapters)."""
    from adapterspec_torch.switch import get_state

    state = get_state(model)
    layers = [(n, list(m.merged_adapters)) for n, m in model.named_modules() if hasattr(m, "merged_adapters")]
    return (list(state.merged) if state is not None else []), layers


def _keras_merged(model: Any) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The model's merged adapters and each adapted layer's (path, merged adapters)."""
    from adapterspec_keras.switch import get_state

    state = get_state(model)
    if state is None:
        return [], []
    return list(state.merged), sorted((layer.site.path, list(layer.merged)) for layer in state.adapter_layers.values())


BACKENDS = {"torch": TorchBackend, "keras": KerasBackend}


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Any:
    impl = BACKENDS[request.param]()
    try:  # can this backend load at all? (it may still be under construction)
        probe_model = impl.model()
        folder = Path(request.getfixturevalue("tmp_path_factory").mktemp("probe")) / "a"
        adapterspec.write_adapter(folder, CONFIG, tensors(0))
        adapterspec.load_adapter(probe_model, folder, "a")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"the {request.param} backend cannot load a LoRA adapter yet: {type(exc).__name__}: {exc}")
    return impl


def _assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["modules"] == before["modules"], "module/layer objects changed"
    assert after["adapters"] == before["adapters"] and after["active"] == before["active"]
    assert after["trainable"] == before["trainable"]
    assert after["merged"] == before["merged"], "merged adapters changed"
    assert list(after["values"]) == list(before["values"]), "variables added or removed"
    for key, value in before["values"].items():
        assert np.array_equal(after["values"][key], value), f"{key} changed"
    assert np.array_equal(after["output"], before["output"]), "forward output changed"


@pytest.fixture
def loaded(backend: Any, tmp_path: Path) -> tuple[Any, Path]:
    model = backend.model()
    good = adapterspec.write_adapter(tmp_path / "good", CONFIG, tensors(0))
    adapterspec.load_adapter(model, good, "a")
    return model, good


@pytest.mark.parametrize("case", sorted(BAD))
def test_failed_load_leaves_the_model_untouched(backend: Any, loaded: tuple[Any, Path], tmp_path: Path, case: str) -> None:
    model, good = loaded
    make, expected = BAD[case]
    source = make(tmp_path / "bad")
    if source is None or isinstance(source, tuple):
        source = tmp_path / "bad"
    before = backend.snapshot(model)
    with pytest.raises(adapterspec.AdapterSpecError) as info:
        adapterspec.load_adapter(model, source, "b")
    assert isinstance(info.value, expected), f"{type(info.value).__name__}: {info.value}"
    _assert_same(before, backend.snapshot(model))
    STATS.count(f"transactional-{backend.name}")
    # the name is free and the model healthy: the good adapter loads under it and changes the output
    adapterspec.load_adapter(model, good, "b")
    assert adapterspec.adapter_names(model) == ["a", "b"]


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_load_reports_what_the_spec_checks_report(backend: Any, loaded: tuple[Any, Path], tmp_path: Path,
                                                    case: str) -> None:
    """load_adapter leaves the spec's tensor checks to its comparison with the injected adapter (they are
    implied when it passes); when it fails, the error is still the one read_adapter's full checks give."""
    model, _ = loaded
    source = BAD[case][0](tmp_path / "bad")
    if source is None or isinstance(source, tuple):
        source = tmp_path / "bad"
    if isinstance(source, adapterspec.Adapter):
        pytest.skip("an Adapter already read")
    try:
        adapterspec.read_adapter(source)
    except adapterspec.AdapterSpecError as exc:
        spec_error: adapterspec.AdapterSpecError | None = exc
    else:
        spec_error = None  # a problem with the model, not with the spec: the backend names it
    with pytest.raises(adapterspec.AdapterSpecError) as info:
        adapterspec.load_adapter(model, source, "b")
    if spec_error is not None:
        assert (type(info.value), str(info.value)) == (type(spec_error), str(spec_error))
    assert adapterspec.adapter_names(model) == ["a"]


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, MemoryError, RuntimeError])
def test_interrupt_during_tensor_loading_rolls_back(backend: Any, loaded: tuple[Any, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, interrupt: type) -> None:
    model, good = loaded
    other = adapterspec.write_adapter(tmp_path / "other", CONFIG, tensors(2))
    before = backend.snapshot(model)

    def explode(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise interrupt("injected while reading tensors")

    monkeypatch.setattr(adapterspec.Adapter, "load_tensors", explode)
    # an exception that is no AdapterSpecError escaping the backend's hook is a BackendError naming it, chained;
    # an interrupt (BaseException) and running out of memory pass through as they are
    expected = adapterspec.errors.BackendError if interrupt is RuntimeError else interrupt
    with pytest.raises(expected) as info:
        adapterspec.load_adapter(model, other, "b")
    monkeypatch.undo()
    if interrupt is RuntimeError:
        assert type(info.value.__cause__) is RuntimeError
        assert f"plugin {backend.name!r} (entry point adapterspec:{backend.name} = " in str(info.value)
        assert str(info.value).endswith(f"adapterspec_load_state raised RuntimeError: injected while reading "
                                        f"tensors (fix: report it to the plugin's authors, or set "
                                        f"ADAPTERSPEC_DISABLE_PLUGINS={backend.name} to leave the plugin out)")
    _assert_same(before, backend.snapshot(model))
    STATS.count(f"transactional-{backend.name}")
    adapterspec.load_adapter(model, other, "b")


@pytest.mark.parametrize("name", ["a", "../x", "", "x\n", "default/../a"])
def test_bad_adapter_name_leaves_the_model_untouched(backend: Any, loaded: tuple[Any, Path], name: str) -> None:
    model, good = loaded
    before = backend.snapshot(model)
    # a name the caller passes is a ConfigError (SPEC.md 3.3; UnsafeFileError is for names read from a file)
    with pytest.raises(adapterspec.AdapterExistsError if name == "a" else adapterspec.ConfigError):
        adapterspec.load_adapter(model, good, name)
    _assert_same(before, backend.snapshot(model))
    STATS.count(f"transactional-{backend.name}")


def test_malicious_pickle_never_reaches_the_model(backend: Any, loaded: tuple[Any, Path], tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    model, good = loaded
    folder = Path(shutil.copytree(good, tmp_path / "evil"))
    (folder / SAFETENSORS_NAME).unlink()
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    torch.save({**{k: torch.from_numpy(v) for k, v in tensors(1).items()}, Q_A: Payload()}, folder / "adapter_model.bin")
    before = backend.snapshot(model)
    for allow in (False, True):
        with pytest.raises(adapterspec.UnsafeFileError):
            adapterspec.load_adapter(model, folder, "b", allow_pickle=allow)
    _assert_same(before, backend.snapshot(model))
    assert not marker.exists()
    STATS.count(f"transactional-{backend.name}", 2)


@pytest.fixture
def merged(loaded: tuple[Any, Path]) -> tuple[Any, Path]:
    """The model with ``a`` loaded and merged into the base weights."""
    model, good = loaded
    adapterspec.merge_adapters(model)
    return model, good


@pytest.mark.parametrize("activate", [True, False], ids=["activate", "inactive"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_failed_load_keeps_a_merged_adapter_merged(backend: Any, merged: tuple[Any, Path], tmp_path: Path, case: str,
                                                   activate: bool) -> None:
    """The rollback restored the active set through the backend's set_active, which unmerges first: ``a`` came out
    unmerged (its kernels changed by the refused load, 0.18 on the prober's torch model)."""
    model, good = merged
    source = BAD[case][0](tmp_path / "bad")
    if source is None or isinstance(source, tuple):
        source = tmp_path / "bad"
    before = backend.snapshot(model)
    assert before["merged"][0] == ["a"]
    with pytest.raises(adapterspec.AdapterSpecError):
        adapterspec.load_adapter(model, source, "b", activate=activate)
    _assert_same(before, backend.snapshot(model))


def test_failed_load_of_a_set_keeps_a_merged_adapter_merged(backend: Any, merged: tuple[Any, Path],
                                                            tmp_path: Path) -> None:
    """Adapters of a multi-adapter folder (read_adapters) loaded one by one: the one the model refuses leaves ``a``
    merged and the adapters loaded before it as they were."""
    model, _ = merged
    wide = {**tensors(2), Q_A: np.arange(10, dtype=np.float32).reshape(2, 5) / 10}  # in_features 5: the model has 3
    folder = adapterspec.write_adapters(tmp_path / "set", {"default": (CONFIG, tensors(1), None),
                                                           "wide": (CONFIG, wide, None)})
    adapters = adapterspec.read_adapters(folder)
    adapterspec.load_adapter(model, adapters["default"], "c", activate=False)
    before = backend.snapshot(model)
    with pytest.raises(adapterspec.ShapeMismatchError):
        adapterspec.load_adapter(model, adapters["wide"], "wide")
    _assert_same(before, backend.snapshot(model))


@pytest.mark.parametrize("config", [{**CONFIG, "target_modules": ["zz"]}, {**CONFIG, "r": 0}],
                         ids=["no-target", "bad-config"])
def test_refused_inject_keeps_a_merged_adapter_merged(backend: Any, merged: tuple[Any, Path],
                                                      config: dict[str, Any]) -> None:
    """inject_adapter's refusals (a target matching nothing, a bad config) leave ``a`` merged too."""
    model, _ = merged
    before = backend.snapshot(model)
    with pytest.raises(adapterspec.AdapterSpecError):
        adapterspec.inject_adapter(model, config, "b")
    _assert_same(before, backend.snapshot(model))


@pytest.mark.parametrize("case", ["in_features disagree with the model", "missing key", "module the model lacks"])
def test_failed_trainable_load_keeps_the_trainable_flags(backend: Any, tmp_path: Path, case: str) -> None:
    """A refused trainable load beside a trainable adapter ``a``: every variable's trainable flag, ``a``'s included,
    is what it was (the base frozen for ``a`` stays frozen)."""
    model = backend.model()
    good = adapterspec.write_adapter(tmp_path / "good", CONFIG, tensors(0))
    adapterspec.load_adapter(model, good, "a", trainable=True)
    source = BAD[case][0](tmp_path / "bad")
    before = backend.snapshot(model)
    assert any(flag for _, flag in before["trainable"]) and not all(flag for _, flag in before["trainable"])
    with pytest.raises(adapterspec.AdapterSpecError):
        adapterspec.load_adapter(model, source, "b", trainable=True)
    _assert_same(before, backend.snapshot(model))
