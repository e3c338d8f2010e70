"""Where load_adapter looks: a local-looking path never becomes a Hub lookup; a model no backend takes names
what is really installed and the pip line that fixes it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import adapterspec
from adapterspec import api, hub
from adapterspec.errors import BackendError, FileFormatError


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    asked: list[str] = []
    monkeypatch.setattr(hub, "download_adapter", lambda text, **kw: asked.append(text) or Path("/hub") / text)
    return asked


@pytest.mark.parametrize("source", ["out/my-lroa", "./my-lora", "../my-lora", "~/no-such-adapter-xyz",
                                    "/no/such/adapter", "a/b/c", "justaname", "win\\path"])
def test_local_looking_paths_never_go_to_the_hub(source: str, tmp_path: Path, no_hub: list[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "my-lora").mkdir(parents=True)
    with pytest.raises(FileFormatError, match="no such adapter folder") as exc:
        api.resolve_source(source)
    assert no_hub == [] and "HF_HUB_OFFLINE" not in str(exc.value)


def test_typo_gets_a_did_you_mean(tmp_path: Path, no_hub: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "my-lora").mkdir(parents=True)
    with pytest.raises(FileFormatError) as exc:
        api.resolve_source("out/my-lroa")
    assert exc.value.hint == "did you mean 'out/my-lora'?; a Hub repo is named hf://org/name"
    assert exc.value.path == "out/my-lroa"


def test_a_path_object_is_local(tmp_path: Path, no_hub: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileFormatError, match="no such adapter folder"):
        api.resolve_source(Path("org/name"))
    assert no_hub == []


@pytest.mark.parametrize("source", ["org/name", "org/name@v2", "hf://org/name"])
def test_repo_ids_go_to_the_hub(source: str, tmp_path: Path, no_hub: list[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert api.resolve_source(source) == Path("/hub") / source
    assert no_hub == [source]


def test_existing_local_folder_wins(tmp_path: Path, no_hub: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert api.resolve_source("org/name") == Path("org/name") and no_hub == []


def test_no_backend_names_what_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "keras")
                        else real(name, *a))
    with pytest.raises(BackendError) as exc:
        adapterspec.load_adapter(object(), "unused")
    assert "frameworks installed: none" in exc.value.message
    assert exc.value.hint == ('pass a torch.nn.Module or a Keras model; to install a framework: '
                              'pip install "adapterspec[torch]" or pip install "adapterspec[keras]"')


def test_no_backend_with_frameworks_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "torch"
                        else None if name == "keras" else real(name, *a))
    with pytest.raises(BackendError) as exc:
        api.backend_name(3)
    assert exc.value.message.endswith("frameworks installed: torch)")
    assert exc.value.hint is not None and exc.value.hint.endswith('pip install "adapterspec[keras]"')


@pytest.mark.parametrize("framework, module, install", [("pt", "torch", 'pip install "adapterspec[torch]"'),
                                                        ("flax", "jax", "pip install jax")])
def test_tensors_for_a_missing_framework_name_the_pip_line(framework: str, module: str, install: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import numpy as np

    from adapterspec.errors import UnsupportedError

    adapter = adapterspec.Adapter.from_tensors(
        {"peft_type": "IA3", "target_modules": ["q"], "feedforward_modules": []},
        {"base_model.model.l.q.ia3_l": np.arange(4, dtype=np.float32).reshape(4, 1)})
    real = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(UnsupportedError) as exc:
        adapter.load_tensors(framework)
    assert exc.value.message == f"{framework!r} tensors need {module}, which is not installed"
    assert exc.value.hint == install
    assert adapter.load_tensors("numpy")["base_model.model.l.q.ia3_l"].ravel().tolist() == [0, 1, 2, 3]
