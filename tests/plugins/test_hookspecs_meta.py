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
    def adapterspec_delete(self, model: Any, adapter_name: str) -> bool | None:
        if not self._owns(model):
            return None
        model.calls.append(("delete", adapter_name))
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
    adapterspec.delete_adapter(model, "default")  # unmerges first
    assert model.calls[-3:] == [("merge", ["default"]), ("unmerge", None), ("delete", "default")]
    assert adapterspec.adapter_names(model) == []


def test_load_adapter_rolls_back_through_delete(dummy_backend: None, lora_folder: Path) -> None:
    model = DummyModel(["layers.0.q"])
    adapterspec.load_adapter(model, lora_folder, "keep")
    model.calls.clear()
    model.fail_load = True
    with pytest.raises(MissingTensorError) as info:
        adapterspec.load_adapter(model, lora_folder, "bad")
    assert info.value.key == "base_model.model.layers.0.q.lora_B.weight"
    assert model.calls == [("inject", "bad"), ("load_state", "bad"), ("delete", "bad"), ("set_active", ["keep"])]
    assert adapterspec.adapter_names(model) == ["keep"] and adapterspec.active_adapters(model) == ["keep"]


def test_unregistered_plugin_no_longer_claims(lora_folder: Path) -> None:
    pm = get_plugin_manager()
    pm.register(DummyBackend(), name="dummy-test")
    try:
        assert adapterspec.backend_name(DummyModel([])) == "dummy"
    finally:
        pm.unregister(name="dummy-test")
    with pytest.raises(BackendError):
        adapterspec.load_adapter(DummyModel(["layers.0.q"]), lora_folder)
