"""Downloading adapters through the real huggingface_hub client, from a Hub-compatible test server."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hubdata import lora_config, lora_tensors

import adapterspec
from adapterspec import HubError, UnsafeFileError
from adapterspec.hub import HubRef, download_adapter, download_adapters, parse_hub_ref, push_to_hub

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")  # inside huggingface_hub's LFS upload


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    return adapterspec.read_adapter(folder).load_tensors("numpy")


def _assert_same_adapter(got: Path, want: Path) -> None:
    a, b = _tensors(got), _tensors(want)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert (got / "adapter_model.safetensors").read_bytes() == (want / "adapter_model.safetensors").read_bytes()


# -- parsing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("source", "kwargs", "want"), [
    ("org/name", {}, HubRef("org/name")),
    ("org/name@v2", {}, HubRef("org/name", "v2")),
    ("hf://org/name", {}, HubRef("org/name")),
    ("hf://org/name/", {}, HubRef("org/name")),
    ("hf://org/name@v2", {}, HubRef("org/name", "v2")),
    ("hf://org/name/fr", {}, HubRef("org/name", None, "fr")),
    ("hf://org/name@refs%2Fpr%2F3/a/b", {}, HubRef("org/name", "refs/pr/3", "a/b")),
    ("org/name", {"subfolder": "/fr/", "revision": "dev"}, HubRef("org/name", "dev", "fr")),
    ("hf://org/name@dev/fr", {"subfolder": "fr", "revision": "dev"}, HubRef("org/name", "dev", "fr")),
])
def test_parse_hub_ref(source: str, kwargs: dict[str, str], want: HubRef) -> None:
    assert parse_hub_ref(source, **kwargs) == want


@pytest.mark.parametrize(("source", "kwargs", "error", "text"), [
    ("no/such/local/folder", {}, HubError, "neither an existing local folder nor a Hub repo id"),
    ("justaname", {}, HubError, "neither an existing local folder"),
    ("hf://datasets/org/name", {}, HubError, "datasets repos do not hold adapters"),
    ("hf://org/na me", {}, HubError, "not a valid Hub repo id"),
    ("hf://org/name@v1", {"revision": "v2"}, HubError, "two revisions given"),
    ("hf://org/name/a", {"subfolder": "b"}, HubError, "two subfolders given"),
    ("hf://org/name/../x", {}, UnsafeFileError, "not a safe path"),
    ("org/name", {"subfolder": "a/../../b"}, UnsafeFileError, "not a safe path"),
    ("org/name", {"revision": "../../etc"}, HubError, "not a valid revision"),
])
def test_parse_hub_ref_refuses(source: str, kwargs: dict[str, str], error: type, text: str) -> None:
    with pytest.raises(error, match="fix:") as info:
        parse_hub_ref(source, **kwargs)
    assert text in str(info.value)


# -- what is downloaded ------------------------------------------------------------------------------------
def test_download_fetches_only_the_adapter_files(hub, make_lora, hf_env: Path) -> None:
    local = make_lora("one")
    push_to_hub(local, "org/one")
    assert set(hub.files("org/one")) == {".gitattributes", "README.md", "adapter_config.json",
                                         "adapter_model.safetensors"}
    hub.requests.clear()

    folder = download_adapter("org/one")

    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert folder.is_relative_to(hf_env)  # huggingface_hub's cache, not a private copy
    _assert_same_adapter(folder, local)
    fetched = sorted(r.path.rsplit("/", 1)[-1] for r in hub.requests if r.method == "GET" and "/resolve/" in r.path)
    assert fetched == ["adapter_config.json", "adapter_model.safetensors"]  # no README, no .gitattributes
    assert download_adapter("hf://org/one") == folder


def test_safetensors_preferred_over_the_pickle(hub, make_lora) -> None:
    local = make_lora("both")
    files = {name: (local / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
    hub.commit("org/both", {**files, "adapter_model.bin": b"a pickle that must not be fetched"})
    hub.commit("org/pickle", {"adapter_config.json": files["adapter_config.json"], "adapter_model.bin": b"pickle"})

    assert sorted(os.listdir(download_adapter("org/both"))) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not any(r.path.endswith(".bin") for r in hub.requests if "/resolve/" in r.path)
    folder = download_adapter("org/pickle")
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.bin"]
    with pytest.raises(UnsafeFileError, match="allow_pickle"):  # downloaded, but still not unpickled by default
        adapterspec.read_adapter(folder)


def test_revision_and_commit_sha_load_the_right_files(hub, make_lora) -> None:
    first, second, dev = make_lora("v1", 0.0), make_lora("v2", 1.0), make_lora("dev", 2.0)
    commit1 = push_to_hub(first, "org/versions")
    commit2 = push_to_hub(second, "org/versions")
    push_to_hub(dev, "org/versions", revision="dev")  # a new branch, created from main
    assert commit1.oid != commit2.oid and commit1.oid in commit1

    _assert_same_adapter(download_adapter("org/versions"), second)
    _assert_same_adapter(download_adapter("org/versions", revision=commit1.oid), first)
    _assert_same_adapter(download_adapter(f"hf://org/versions@{commit1.oid}"), first)
    _assert_same_adapter(download_adapter("org/versions@dev"), dev)
    _assert_same_adapter(download_adapter("org/versions", revision="main"), second)
    assert hub.files("org/versions")["adapter_model.safetensors"] == (second / "adapter_model.safetensors").read_bytes()


def test_a_repo_holding_a_diffusers_lora_file_says_so(hub) -> None:
    """A Stable Diffusion LoRA repo (diffusers' pytorch_lora_weights.safetensors, no adapter_config.json) said "no
    adapter in the repo root (no adapter_config.json)": it names the file, and how to use it."""
    hub.commit("org/sd-lora", {"pytorch_lora_weights.safetensors": b"not read", "README.md": b"# a LoRA"})
    with pytest.raises(HubError) as info:
        download_adapter("org/sd-lora")
    assert info.value.message == ("no adapter_config.json in the repo root of 'org/sd-lora': it holds "
                                  "pytorch_lora_weights.safetensors, a diffusers-format LoRA file, not a PEFT-format "
                                  "adapter")
    assert "load_lora_weights" in (info.value.hint or "")


def test_subfolders_hold_separate_adapters(hub, make_lora) -> None:
    fr, de = make_lora("fr", 0.5), make_lora("de", 1.5)
    push_to_hub(fr, "org/langs", subfolder="fr")
    push_to_hub(de, "org/langs", subfolder="de")

    _assert_same_adapter(download_adapter("org/langs", subfolder="fr"), fr)
    _assert_same_adapter(download_adapter("hf://org/langs/de"), de)
    with pytest.raises(HubError, match=r"no adapter_config.json in the repo root .* it holds adapters in: de, fr"):
        download_adapter("org/langs")
    with pytest.raises(HubError, match="no adapter in 'it'"):
        download_adapter("org/langs", subfolder="it")
    with pytest.raises(HubError, match=r"no adapter in 'f' of 'org/langs' \(no adapter_config.json\)"):
        download_adapter("org/langs", subfolder="f")  # a prefix of "fr" is not "fr"


def test_multi_adapter_folder_and_its_manifest(hub, tmp_path: Path) -> None:
    several = adapterspec.write_adapters(tmp_path / "several", {
        "default": (lora_config(), lora_tensors(0.0)),
        "fr": (lora_config(4), lora_tensors(3.0, r=4)),
    })
    push_to_hub(several, "org/several")
    assert {"adapterspec.json", "fr/adapter_config.json", "fr/adapter_model.safetensors"} <= set(hub.files("org/several"))

    _assert_same_adapter(download_adapter("org/several"), several)
    _assert_same_adapter(download_adapter("org/several", subfolder="fr"), several / "fr")

    folder = download_adapters("org/several")
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors", "adapterspec.json", "fr"]
    got = adapterspec.read_adapters(folder)
    assert sorted(got) == ["default", "fr"]
    assert got["fr"].config["r"] == 4


def test_manifest_name_resolves_to_its_path(hub, tmp_path: Path, make_lora) -> None:
    """An adapter listed in the manifest under a name that differs from its folder."""
    local = make_lora("x", 0.25)
    files = {f"weights/v1/{n}": (local / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    manifest = b'{"adapterspec_version": "1.0", "adapters": {"french": {"path": "weights/v1"}}}'
    hub.commit("org/named", {**files, "adapterspec.json": manifest})

    folder = download_adapter("org/named", subfolder="french")

    assert folder.as_posix().endswith("weights/v1")
    _assert_same_adapter(folder, local)


# -- errors ------------------------------------------------------------------------------------------
def test_repo_not_found(hub) -> None:
    with pytest.raises(HubError) as info:
        download_adapter("org/missing")
    text = str(info.value)
    assert "repository 'org/missing' not found" in text and "no local folder 'org/missing'" in text
    assert "token=" in text  # the fix for a private repo


def test_revision_not_found(hub, make_lora) -> None:
    push_to_hub(make_lora("one"), "org/one")
    with pytest.raises(HubError, match=r"hf://org/one@nope: revision 'nope' not found in 'org/one'.*fix: use an existing"):
        download_adapter("org/one", revision="nope")


def test_weights_missing(hub, make_lora) -> None:
    hub.commit("org/config-only", {"adapter_config.json": (make_lora("c") / "adapter_config.json").read_bytes()})
    with pytest.raises(HubError, match="adapter_config.json has no adapter_model.safetensors"):
        download_adapter("org/config-only")


def test_private_repo_needs_a_token(hub, make_lora, monkeypatch: pytest.MonkeyPatch) -> None:
    local = make_lora("secret")
    push_to_hub(local, "org/secret", private=True)
    monkeypatch.delenv("HF_TOKEN")

    with pytest.raises(HubError, match="repository 'org/secret' not found.*private repo needs token="):
        download_adapter("org/secret")
    _assert_same_adapter(download_adapter("org/secret", token="hf_test_write_token"), local)
    with pytest.raises(HubError, match="HTTP 401"):
        download_adapter("org/secret", token="hf_wrong", cache_dir=local.parent / "other-cache")


# -- cache and offline -----------------------------------------------------------------------------------
def test_offline_loads_from_the_cache(hub, make_lora, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    local = make_lora("cached")
    commit = push_to_hub(local, "org/cached", subfolder="fr")
    online = download_adapter("org/cached", subfolder="fr")
    by_sha = download_adapter("org/cached", subfolder="fr", revision=commit.oid)
    hub.stop()  # no server any more
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert download_adapter("org/cached", subfolder="fr") == online
    assert download_adapter("hf://org/cached@main/fr") == online
    assert download_adapter("org/cached", subfolder="fr", revision=commit.oid) == by_sha
    _assert_same_adapter(online, local)

    with pytest.raises(HubError, match=r"not in the local Hugging Face cache and offline mode is on \(HF_HUB_OFFLINE=1\)"):
        download_adapter("org/cached", subfolder="fr", cache_dir=tmp_path / "empty-cache")
    with pytest.raises(HubError, match="hf://org/never-downloaded: the adapter is not in the local Hugging Face cache"):
        download_adapter("org/never-downloaded")
    with pytest.raises(HubError, match="offline mode is on"):
        download_adapter("org/cached", subfolder="de")  # that subfolder was never downloaded


def test_unreachable_hub_falls_back_to_the_cache(hub, make_lora, tmp_path: Path) -> None:
    local = make_lora("fallback")
    push_to_hub(local, "org/fallback")
    online = download_adapter("org/fallback")
    hub.stop()  # online mode, but nothing listens any more

    assert download_adapter("org/fallback") == online
    with pytest.raises(HubError, match="not in the local Hugging Face cache and .* cannot be reached"):
        download_adapter("org/fallback", cache_dir=tmp_path / "empty-cache")


def test_lfs_pointer_committed_as_a_file_is_named_by_its_hub_address(hub, make_lora,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A repo whose weights file is a git-LFS pointer's text: refused online and from the cache, named hf://..."""
    from adapterspec import FileFormatError

    local = make_lora("pointer")
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 123456\n"
    sha = hub.commit("org/pointer", {"adapter_config.json": (local / "adapter_config.json").read_bytes(),
                               "adapter_model.safetensors": pointer})
    want = r"hf://org/pointer/adapter_model.safetensors: a git-LFS pointer \(oid sha256:(ab){32}, size 123456\)"
    with pytest.raises(FileFormatError, match=want) as info:
        adapterspec.read_adapter(download_adapter("org/pointer"))
    assert "push the weights file" in str(info.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the refused download left the files in the cache, under the commit
    with pytest.raises(FileFormatError, match=want.replace("pointer/", f"pointer@{sha}/")):
        download_adapter("org/pointer", revision=sha)


def test_lfs_pointer_committed_as_the_config_is_named_by_its_hub_address(hub, make_lora) -> None:
    """Public repos hold adapter_config.json files that are pointers: it read "not valid JSON ... fix the JSON
    syntax" (the cache path named); now named by its hf:// address."""
    from adapterspec import FileFormatError

    local = make_lora("config-pointer")
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"cd" * 32 + b"\nsize 902\n"
    sha = hub.commit("org/config-pointer", {"adapter_config.json": pointer,
                                            "adapter_model.safetensors": (local / "adapter_model.safetensors").read_bytes()})
    want = (r"hf://org/config-pointer/adapter_config.json: a git-LFS pointer \(oid sha256:(cd){32}, size 902\), "
            "not the config it stands for")
    with pytest.raises(FileFormatError, match=want) as info:
        adapterspec.read_adapter(download_adapter("org/config-pointer"))
    assert "push the config file" in str(info.value)
    with pytest.raises(FileFormatError, match=want.replace("pointer/", f"pointer@{sha}/")):
        download_adapter("org/config-pointer", revision=sha)


def test_load_adapter_and_validate_resolve_hub_sources(hub, make_lora) -> None:
    """The core's resolve_source and the CLI's ``validate hf://...`` go through download_adapter."""
    from adapterspec.api import resolve_source
    from adapterspec.cli import main

    local = make_lora("cli")
    push_to_hub(local, "org/cli", subfolder="x")
    assert resolve_source("org/cli", subfolder="x") == download_adapter("hf://org/cli/x")
    assert main(["validate", "hf://org/cli/x"]) == 0
    assert main(["validate", "hf://org/cli/missing"]) == 1


def test_resolve_for_validation_gets_every_adapter(hub, tmp_path: Path, make_lora,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``adapterspec validate hf://org/name`` of a repo of several adapters checks them all."""
    from adapterspec.hub import resolve_for_validation

    local = make_lora("peft-layout")
    files = {n: (local / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    hub.commit("org/peft-layout", {**files, **{f"fr/{n}": d for n, d in files.items()},
                                   **{f"deep/er/{n}": d for n, d in files.items()}, "notes.txt": b"not fetched"})

    folder = resolve_for_validation("hf://org/peft-layout")

    assert sorted(adapterspec.list_adapters(folder)) == ["default", "fr"]  # PEFT's layout: root + one level down
    assert not (folder / "deep").exists() and not (folder / "notes.txt").exists()
    assert all(adapterspec.validate_adapter(p) == [] for p in adapterspec.list_adapters(folder).values())
    assert resolve_for_validation(str(local)) == local  # local paths stay local
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_for_validation("hf://org/peft-layout") == folder
    with pytest.raises(HubError, match="offline mode is on"):
        resolve_for_validation("hf://org/other")


def test_docstring_examples() -> None:
    import doctest

    from adapterspec import _hubsafety, _modelcard, hub

    for module in (hub, _hubsafety, _modelcard):
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0
