"""The hook contract keeps its promises: every hook documented and tested, and dispatch works for any plugin.

Meta-tests (after datasette's): each hook in :mod:`adapterspec.hookspecs` has a docstring, a section in
``docs/plugins.md`` headed by its exact name, and at least one test in the repository that calls it or a
public function that calls it. Then an inline dummy backend, registered with ``pm.register`` and
unregistered in ``finally``, shows that :func:`adapterspec.load_adapter` dispatches to whatever plugin
claims the model, and rolls back through ``adapterspec_delete`` when ``adapterspec_load_state`` raises.
"""

from __future__ import annotations

import inspect
import re
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapterspec
from adapterspec import hookimpl, hookspecs
from adapterspec.errors import BackendError, MissingTensorError
from adapterspec.plugins import get_plugin_manager

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "plugins.md"

HOOKS = sorted(name for name, fn in vars(hookspecs).items() if name.startswith("adapterspec_") and callable(fn))

#: hook -> the public functions that call it (checked below against their source).
CALLERS: dict[str, tuple[str, ...]] = {
    "adapterspec_backend_name": ("adapterspec.api:backend_name",),
    "adapterspec_base_identity": ("adapterspec.api:save_adapter", "adapterspec.api:save_adapters",
                                  "adapterspec.api:load_adapter"),
    "adapterspec_inject": ("adapterspec.api:load_adapter", "adapterspec.api:inject_adapter"),
    "adapterspec_load_state": ("adapterspec.api:load_adapter",),
    "adapterspec_extract_state": ("adapterspec.api:save_adapter", "adapterspec.api:save_adapters",
                                  "adapterspec.api:extract_adapter"),
    "adapterspec_adapter_names": ("adapterspec.api:adapter_names",),
    "adapterspec_active_adapters": ("adapterspec.api:active_adapters",),
    "adapterspec_set_active": ("adapterspec.api:set_active_adapters", "adapterspec.api:disabled_adapters"),
    "adapterspec_delete": ("adapterspec.api:delete_adapter", "adapterspec.api:unload"),
    "adapterspec_merge": ("adapterspec.api:merge_adapters",),
    "adapterspec_unmerge": ("adapterspec.api:unmerge_adapters",),
    "adapterspec_read_buffer": ("adapterspec.api:load_adapter",),
    "adapterspec_reads_slices": ("adapterspec.api:load_adapter",),
    "adapterspec_write": ("adapterspec.api:save_adapter", "adapterspec.api:save_adapters"),
    "adapterspec_conformance_implementations": ("adapterspec.conformance.implementations:resolve_implementation",
                                                "adapterspec.conformance.implementations:available_implementations"),
}


def _resolve(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(__import__(module, fromlist=[name]), name)


def test_the_hook_list_is_what_the_mapping_covers() -> None:
    assert len(HOOKS) >= 11
    assert sorted(CALLERS) == HOOKS, "a hook was added or removed: update CALLERS and docs/plugins.md"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_docstring(hook: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert len(doc) > 40, f"{hook} needs a docstring"
    firstresult = getattr(hookspecs, hook).adapterspec_spec.get("firstresult", False)
    # pytest's convention: a first-result hook says so in its first paragraph
    assert ("Stops at first non-None result" in doc.split("\n\n")[0]) == firstresult, hook


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook: str) -> None:
    text = DOCS.read_text("utf-8")
    assert re.search(rf"^### `{hook}`\s*$", text, re.MULTILINE), f"docs/plugins.md needs a '### `{hook}`' section"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_callers_really_call_it(hook: str) -> None:
    for target in CALLERS[hook]:
        fn = _resolve(target)
        source = inspect.getsource(fn) + inspect.getsource(inspect.getmodule(fn))
        assert hook in source, f"{target} was listed as calling {hook}, but its module never names it"


def _test_sources() -> dict[Path, str]:
    return {p: p.read_text("utf-8") for p in sorted((ROOT / "tests").rglob("*.py")) if p != Path(__file__).resolve()}


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook: str) -> None:
    names = [hook] + [target.partition(":")[2] for target in CALLERS[hook]]
    pattern = re.compile(rf"\b{hook}\b|\b(?:{'|'.join(names)})\s*\(")
    users = [p.relative_to(ROOT) for p, text in _test_sources().items()
             if re.search(r"^\s*def test_", text, re.MULTILINE) and pattern.search(text)]
    assert users, f"no test calls {hook} or one of {names[1:]}"


def test_the_documented_skeleton_registers_and_implements_every_hook() -> None:
    text = DOCS.read_text("utf-8")
    section = text.split("## A minimal plugin", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    module = types.ModuleType("adapterspec_doc_skeleton")
    exec(compile(code, str(DOCS), "exec"), module.__dict__)  # noqa: S102 - our own documentation
    assert sorted(n for n in vars(module) if n.startswith("adapterspec_")) == HOOKS
    pm = get_plugin_manager()
    pm.register(module, name="doc-skeleton")  # pluggy validates every hookimpl against its spec here
    try:
        assert pm.hook.adapterspec_backend_name(model=object()) is None
    finally:
        pm.unregister(name="doc-skeleton")
    assert pm.get_plugin("doc-skeleton") is None


# -- an inline plugin ------------------------------------------------------------------------------------

class DummyModel:
    """A 'framework' model: named modules and what a backend keeps about its adapters."""

    def __init__(self, modules: list[str]) -> None:
        self.modules = modules
        self.adapters: dict[str, dict[str, Any]] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.calls: list[tuple[str, Any]] = []
        self.fail_load = False


class DummyBackend:
    """Claims :class:`DummyModel` objects and keeps adapters as NumPy arrays in them."""

    @staticmethod
    def _owns(model: Any) -> bool:
        return isinstance(model, DummyModel)

    @hookimpl
    def adapterspec_backend_name(self, model: Any) -> str | None:
        return "dummy" if self._owns(model) else None

    @hookimpl
    def adapterspec_inject(self, model: Any, config: Any, adapter_name: str, options: Any) -> list[str] | None:
        if not self._owns(model):
            return None
        model.calls.append(("inject", adapter_name))
        modules = [m for m in model.modules if config.matches(m)]
        model.adapters[adapter_name] = {"config": config, "modules": modules, "tensors": {}}
        return modules

    @hookimpl
    def adapterspec_load_state(self, model: Any, adapter: Any, adapter_name: str, options: Any) -> list[str] | None:
        if not self._owns(model):
            return None
        model.calls.append(("load_state", adapter_name))
        if model.fail_load:
            raise MissingTensorError("the dummy backend refuses", key="base_model.model.layers.0.q.lora_B.weight",
                                     hint="test")
        model.adapters[adapter_name]["tensors"] = adapter.load_tensors("numpy")
        return sorted(adapter.tensors)

    @hookimpl
    def adapterspec_extract_state(self, model: Any, adapter_name: str) -> tuple[Any, dict[str, Any]] | None:
        if not self._owns(model):
            return None
        entry = model.adapters[adapter_name]
        return entry["config"], dict(entry["tensors"])

    @hookimpl
    def adapterspec_adapter_names(self, model: Any) -> list[str] | None:
        return list(model.adapters) if self._owns(model) else None

    @hookimpl
    def adapterspec_active_adapters(self, model: Any) -> list[str] | None:
        return list(model.active) if self._owns(model) else None

    @hookimpl
    def adapterspec_set_active(self, model: Any, adapter_names: list[str]) -> bool | None:
        if not self._owns(model):
            return None
        model.calls.append(("set_active", list(adapter_names)))
        model.active = list(adapter_names)
        return True

    @hookimpl
    def adapterspec_delete(self, model: Any, adapter_name: str, unloading: bool) -> bool | None:
        if not self._owns(model):
            return None
        model.calls.append(("delete", adapter_name))
        if not unloading and adapter_name in model.merged:  # the contract: unmerged first (delete_adapter)
            model.merged = []
        del model.adapters[adapter_name]
        model.active = [n for n in model.active if n != adapter_name]
        return True

    @hookimpl
    def adapterspec_merge(self, model: Any, adapter_names: list[str]) -> bool | None:
        if not self._owns(model):
            return None
        model.calls.append(("merge", list(adapter_names)))
        model.merged += adapter_names
        return True

    @hookimpl
    def adapterspec_unmerge(self, model: Any) -> bool | None:
        if not self._owns(model):
            return None
        model.calls.append(("unmerge", None))
        model.merged = []
        return True


@pytest.fixture
def dummy_backend():  # type: ignore[no-untyped-def]
    pm = get_plugin_manager()
    pm.register(DummyBackend(), name="dummy-test")
    try:
        yield
    finally:
        pm.unregister(name="dummy-test")


@pytest.fixture
def lora_folder(tmp_path: Path) -> Path:
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]}
    a = (np.sin(np.arange(2 * 6)) / 3).reshape(2, 6).astype(np.float32)
    b = (np.cos(np.arange(4 * 2)) / 3).reshape(4, 2).astype(np.float32)
    tensors = {"base_model.model.layers.0.q.lora_A.weight": a, "base_model.model.layers.0.q.lora_B.weight": b}
    return adapterspec.write_adapter(tmp_path / "lora", config, tensors)


def test_load_adapter_dispatches_to_an_inline_plugin(dummy_backend: None, lora_folder: Path, tmp_path: Path) -> None:
    model = DummyModel(["layers.0.q", "layers.0.k", "layers.1.k"])
    assert adapterspec.backend_name(model) == "dummy"
    assert adapterspec.load_adapter(model, lora_folder) == ["layers.0.q"]
    assert model.calls == [("inject", "default"), ("load_state", "default"), ("set_active", ["default"])]
    assert adapterspec.adapter_names(model) == ["default"] and adapterspec.active_adapters(model) == ["default"]
    stored = model.adapters["default"]["tensors"]["base_model.model.layers.0.q.lora_A.weight"]
    np.testing.assert_array_equal(stored, (np.sin(np.arange(12)) / 3).reshape(2, 6).astype(np.float32))

    out = adapterspec.save_adapter(model, tmp_path / "saved")
    assert sorted(adapterspec.read_adapter(out).tensors) == sorted(adapterspec.read_adapter(lora_folder).tensors)
    adapterspec.merge_adapters(model)
    adapterspec.delete_adapter(model, "default")  # the backend unmerges it first
    assert model.calls[-2:] == [("merge", ["default"]), ("delete", "default")] and model.merged == []
    assert adapterspec.adapter_names(model) == []


def test_load_adapter_rolls_back_through_delete(dummy_backend: None, lora_folder: Path) -> None:
    model = DummyModel(["layers.0.q"])
    adapterspec.load_adapter(model, lora_folder, "keep")
    model.calls.clear()
    model.fail_load = True
    with pytest.raises(MissingTensorError) as info:
        adapterspec.load_adapter(model, lora_folder, "bad")
    assert info.value.key == "base_model.model.layers.0.q.lora_B.weight"
    # the delete left the active set as it was: no set_active (a backend's set_active unmerges first)
    assert model.calls == [("inject", "bad"), ("load_state", "bad"), ("delete", "bad")]
    assert adapterspec.adapter_names(model) == ["keep"] and adapterspec.active_adapters(model) == ["keep"]


class OlderDelete(DummyBackend):
    """A plugin written before ``adapterspec_delete`` took ``unloading``: its delete leaves a merged delta in place."""

    @hookimpl
    def adapterspec_delete(self, model: Any, adapter_name: str) -> bool | None:  # type: ignore[override]
        if not self._owns(model):
            return None
        model.calls.append(("delete", adapter_name))
        del model.adapters[adapter_name]
        model.active = [n for n in model.active if n != adapter_name]
        return True


def test_a_plugin_of_the_older_delete_contract_is_unmerged_first(lora_folder: Path) -> None:
    """delete_adapter unmerges every adapter before an older plugin's delete (whose contract that was), so a merged
    adapter never leaves its delta behind; a plugin taking ``unloading`` unmerges itself (no SDK unmerge)."""
    pm = get_plugin_manager()
    for plugin, expected in ((OlderDelete(), [("unmerge", None), ("delete", "a")]),
                             (DummyBackend(), [("delete", "a")])):
        pm.register(plugin, name="dummy-test")
        try:
            model = DummyModel(["layers.0.q"])
            adapterspec.load_adapter(model, lora_folder, "a")
            adapterspec.merge_adapters(model)
            model.calls.clear()
            adapterspec.delete_adapter(model, "a")
            assert model.calls == expected and model.merged == []
        finally:
            pm.unregister(name="dummy-test")


def test_unregistered_plugin_no_longer_claims(lora_folder: Path) -> None:
    pm = get_plugin_manager()
    pm.register(DummyBackend(), name="dummy-test")
    try:
        assert adapterspec.backend_name(DummyModel([])) == "dummy"
    finally:
        pm.unregister(name="dummy-test")
    with pytest.raises(BackendError):
        adapterspec.load_adapter(DummyModel(["layers.0.q"]), lora_folder)


# -- a plugin that misbehaves: its failure is a BackendError naming it, the hook and what it did ---------------

class InjectRaises(DummyBackend):
    @hookimpl
    def adapterspec_inject(self, model: Any, config: Any, adapter_name: str, options: Any) -> list[str] | None:
        if not self._owns(model):
            return None
        raise KeyError("q_proj")


class LoadStateRaises(DummyBackend):
    @hookimpl
    def adapterspec_load_state(self, model: Any, adapter: Any, adapter_name: str, options: Any) -> list[str] | None:
        if not self._owns(model):
            return None
        model.calls.append(("load_state", adapter_name))
        if adapter_name == "bad":
            raise ValueError("bad buffer")
        return sorted(adapter.tensors)


class BackendNameRaises(DummyBackend):
    @hookimpl
    def adapterspec_backend_name(self, model: Any) -> str | None:
        raise RuntimeError("claim crashed")


class ExtractRaises(DummyBackend):
    @hookimpl
    def adapterspec_extract_state(self, model: Any, adapter_name: str) -> tuple[Any, dict[str, Any]] | None:
        if not self._owns(model):
            return None
        return model.adapters["missing"]  # type: ignore[no-any-return]


class InjectReturnsStr(DummyBackend):
    @hookimpl
    def adapterspec_inject(self, model: Any, config: Any, adapter_name: str, options: Any) -> list[str] | None:
        modules = super().adapterspec_inject(model, config, adapter_name, options)
        return None if modules is None else modules[0]  # type: ignore[return-value]


class LoadStateReturnsNone(DummyBackend):
    @hookimpl
    def adapterspec_load_state(self, model: Any, adapter: Any, adapter_name: str, options: Any) -> list[str] | None:
        return None


class ExtractReturnsStr(DummyBackend):
    @hookimpl
    def adapterspec_extract_state(self, model: Any, adapter_name: str) -> tuple[Any, dict[str, Any]] | None:
        return ("not a config", {}) if self._owns(model) else None


class NamesReturnStr(DummyBackend):
    @hookimpl
    def adapterspec_adapter_names(self, model: Any) -> list[str] | None:
        return ",".join(model.adapters) if self._owns(model) else None  # type: ignore[return-value]


class SetActiveReturnsFalse(DummyBackend):
    @hookimpl
    def adapterspec_set_active(self, model: Any, adapter_names: list[str]) -> bool | None:
        if super().adapterspec_set_active(model, adapter_names) is None:
            return None
        return False


class MergeMissing(DummyBackend):
    adapterspec_merge = None  # type: ignore[assignment]  # this backend has no merge hook at all


@pytest.fixture
def register() -> Any:
    """``register(backend)``: the backend registered as plugin 'misbehaving' until the test ends."""
    pm = get_plugin_manager()

    def add(backend: DummyBackend) -> None:
        pm.register(backend, name="misbehaving")
    try:
        yield add
    finally:
        if pm.get_plugin("misbehaving") is not None:
            pm.unregister(name="misbehaving")


def _backend_error(call: Any) -> BackendError:
    with pytest.raises(BackendError) as info:
        call()
    return info.value


@pytest.mark.parametrize(("backend", "hook", "raised"), [
    (InjectRaises, "adapterspec_inject", "KeyError: 'q_proj'"),
    (BackendNameRaises, "adapterspec_backend_name", "RuntimeError: claim crashed"),
])
def test_an_exception_escaping_a_hook_is_a_backend_error(register: Any, lora_folder: Path, backend: type,
                                                        hook: str, raised: str) -> None:
    register(backend())
    model = DummyModel(["layers.0.q"])
    error = _backend_error(lambda: adapterspec.load_adapter(model, lora_folder))
    assert str(error).startswith(f"plugin 'misbehaving' (registered by hand, no entry point): {hook} raised {raised}")
    assert type(error.__cause__).__name__ == raised.split(":")[0]
    assert "report it to the plugin's authors" in str(error)
    assert model.adapters == {} and model.active == []


def test_a_load_state_that_raises_rolls_back_and_names_the_plugin(register: Any, lora_folder: Path) -> None:
    register(LoadStateRaises())
    model = DummyModel(["layers.0.q"])
    adapterspec.load_adapter(model, lora_folder, "keep")
    model.calls.clear()
    error = _backend_error(lambda: adapterspec.load_adapter(model, lora_folder, "bad"))
    assert str(error).startswith("plugin 'misbehaving' (registered by hand, no entry point): adapterspec_load_state "
                                 "raised ValueError: bad buffer")
    assert isinstance(error.__cause__, ValueError) and str(error.__cause__) == "bad buffer"
    # the delete left the active set as it was: no set_active (a backend's set_active unmerges first)
    assert model.calls == [("inject", "bad"), ("load_state", "bad"), ("delete", "bad")]
    assert adapterspec.adapter_names(model) == ["keep"] and adapterspec.active_adapters(model) == ["keep"]


def test_an_exception_while_saving_names_the_plugin(register: Any, lora_folder: Path, tmp_path: Path) -> None:
    register(ExtractRaises())
    model = DummyModel(["layers.0.q"])
    adapterspec.load_adapter(model, lora_folder)
    error = _backend_error(lambda: adapterspec.save_adapter(model, tmp_path / "out"))
    assert "adapterspec_extract_state raised KeyError: 'missing'" in str(error)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("backend", "call", "message"), [
    (InjectReturnsStr, lambda m, folder, out: adapterspec.load_adapter(m, folder, "other"),
     "adapterspec_inject returned 'layers.0.q' (a str); the hook returns a list of module paths (str)"),
    (InjectReturnsStr, lambda m, folder, out: adapterspec.inject_adapter(
        m, {"peft_type": "LORA", "r": 2, "target_modules": ["q"]}, "other"),
     "adapterspec_inject returned 'layers.0.q' (a str); the hook returns a list of module paths (str)"),
    (ExtractReturnsStr, lambda m, folder, out: adapterspec.save_adapter(m, out),
     "adapterspec_extract_state returned ('not a config', {}) (a tuple); the hook returns "
     "a tuple (AdapterConfig, dict of tensor key -> tensor)"),
    (NamesReturnStr, lambda m, folder, out: adapterspec.adapter_names(m),
     "adapterspec_adapter_names returned 'default' (a str); the hook returns a list of adapter names (str)"),
    (SetActiveReturnsFalse, lambda m, folder, out: adapterspec.set_active_adapters(m, []),
     "adapterspec_set_active returned False (a bool); the hook returns True"),
    (LoadStateReturnsNone, lambda m, folder, out: adapterspec.load_adapter(m, folder, "other"),
     "adapterspec_load_state returned None for a model its backend 'dummy' claims; the hook returns "
     "a list of tensor keys (str)"),
])
def test_a_result_of_the_wrong_type_is_a_backend_error(register: Any, lora_folder: Path, tmp_path: Path,
                                                      backend: type, call: Any, message: str) -> None:
    register(DummyBackend())
    model = DummyModel(["layers.0.q"])
    adapterspec.load_adapter(model, lora_folder)  # the well-behaved backend loads one
    get_plugin_manager().unregister(name="misbehaving")
    register(backend())
    error = _backend_error(lambda: call(model, lora_folder, tmp_path / "out"))
    assert str(error).startswith(f"plugin 'misbehaving' (registered by hand, no entry point): {message}"), str(error)
    assert list(model.adapters) == ["default"]  # a failed load was rolled back
    assert not (tmp_path / "out").exists()


def test_a_backend_without_a_hook_is_said_not_to_implement_it(register: Any, lora_folder: Path) -> None:
    register(MergeMissing())
    model = DummyModel(["layers.0.q"])
    adapterspec.load_adapter(model, lora_folder)
    error = _backend_error(lambda: adapterspec.merge_adapters(model))
    assert str(error) == ("the 'dummy' backend (plugin 'misbehaving' (registered by hand, no entry point)) does not "
                          "implement adapterspec_merge (fix: upgrade the backend plugin)")


def test_an_entry_point_plugin_is_named_with_its_distribution() -> None:
    pytest.importorskip("torch")
    from adapterspec.plugins import describe_plugin

    assert re.fullmatch(r"plugin 'torch' \(entry point adapterspec:torch = adapterspec_torch\.plugin, "
                        r"from adapterspec \S+\)", describe_plugin("torch")), describe_plugin("torch")


def test_every_adapter_attribute_the_contract_names_exists(lora_folder: Path) -> None:
    """docs/plugins.md and the hookspecs name the ``Adapter`` attributes a backend uses: each exists."""
    adapter = adapterspec.read_adapter(lora_folder)
    text = DOCS.read_text("utf-8") + inspect.getsource(hookspecs)
    named = set(re.findall(r"\b[aA]dapter\.([a-z_]+)\b", text))
    assert named and sorted(n for n in named if not hasattr(adapter, n)) == []


@pytest.mark.parametrize("framework", ["tf", "flax"])
def test_load_tensors_gives_every_framework_for_a_folder_and_in_memory(lora_folder: Path, framework: str) -> None:
    """docs/plugins.md 'Reading tensors': "tf" and "flax" work for an adapter read from a folder and for one built in
    memory (extract_adapter's result), with the same values as "numpy"."""
    pytest.importorskip("tensorflow" if framework == "tf" else "jax")
    read = adapterspec.read_adapter(lora_folder)
    built = adapterspec.Adapter.from_tensors(read.config, read.load_tensors("numpy"))
    for adapter in (read, built):
        tensors = adapter.load_tensors(framework)
        assert sorted(tensors) == sorted(read.tensors)
        for key, value in read.load_tensors("numpy").items():
            np.testing.assert_array_equal(np.asarray(tensors[key]), value)
