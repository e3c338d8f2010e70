"""Pushing adapters: validated before anything is sent, only the adapter files plus a model card, one commit."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hubserver
import numpy as np
import pytest
from hubdata import TOKEN, lora_config, lora_tensors
from safetensors.numpy import save_file

import adapterspec
from adapterspec import HubError, IntegrityError, ShapeMismatchError
from adapterspec.cli import main
from adapterspec.hub import download_adapter, push_to_hub

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")  # inside huggingface_hub's LFS upload


def _bad_rank_folder(path: Path) -> Path:
    """A PEFT-style folder whose config says r=4 while its tensors have rank 2."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(lora_config(4)))
    save_file(lora_tensors(0.0, r=2), str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


def test_invalid_adapter_is_refused_and_nothing_uploaded(hub, tmp_path: Path) -> None:
    bad = _bad_rank_folder(tmp_path / "bad")
    with pytest.raises(ShapeMismatchError) as info:
        push_to_hub(bad, "org/bad")
    assert "lora_A.weight" in str(info.value)
    assert hub.requests == [] and hub.commit_requests() == [] and "org/bad" not in hub.repos


def test_tampered_checksum_is_refused(hub, make_lora) -> None:
    folder = make_lora("tampered")
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of tensor data flipped after the sha256 was recorded
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        push_to_hub(folder, "org/tampered")
    assert hub.requests == []


def test_one_invalid_adapter_refuses_the_whole_folder(hub, tmp_path: Path) -> None:
    several = adapterspec.write_adapters(tmp_path / "several", {"default": (lora_config(), lora_tensors()),
                                                                 "fr": (lora_config(), lora_tensors(1.0))})
    save_file(lora_tensors(1.0, r=3), str(several / "fr" / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ShapeMismatchError):
        push_to_hub(several, "org/several")
    assert hub.requests == []


@pytest.mark.parametrize("layout", ["adapter", "root of several"])
def test_a_save_during_the_push_never_mixes_two_saves(hub, make_lora, monkeypatch: pytest.MonkeyPatch,
                                                      layout: str) -> None:
    """Another save lands just after the push copied the config: the commit holds one save's config and weights
    (the push used to copy them one after the other by path and sent save 1's config with save 2's weights,
    which no check can tell from one save: the same shapes)."""
    import shutil

    from adapterspec import hub as hub_module

    folder = make_lora("moving", offset=0.0)
    if layout == "root of several":
        adapterspec.write_adapter(folder / "fr", lora_config(), lora_tensors(5.0))
    saved: list[Path] = []

    def then_another_save(copy: Any) -> Any:
        def copy_then_save(source: Any, target: Any, *args: Any) -> Any:
            out = copy(source, target, *args)
            if not saved and str(getattr(target, "name", target)).endswith("adapter_config.json"):
                saved.append(adapterspec.write_adapter(folder, lora_config(3, lora_alpha=9), lora_tensors(1.0, r=3),
                                                       overwrite=True))
            return out
        return copy_then_save

    for copy in ("copyfile", "copyfileobj"):  # (by path, or from an open file)
        monkeypatch.setattr(hub_module.shutil, copy, then_another_save(getattr(shutil, copy)))
    commit = push_to_hub(folder, "org/moving")
    assert saved  # the other save did land in the middle
    files = hub.files("org/moving", commit.oid)
    pushed = json.loads(files["adapter_config.json"])
    from safetensors.numpy import load as load_bytes

    weights = load_bytes(files["adapter_model.safetensors"])
    r, offset = (3, 1.0) if pushed["r"] == 3 else (2, 0.0)
    assert pushed["lora_alpha"] == (9 if r == 3 else 4)
    expected = lora_tensors(offset, r)
    assert sorted(weights) == sorted(expected) and all(np.array_equal(weights[k], expected[k]) for k in expected)


def test_only_adapter_files_and_a_model_card_are_uploaded(hub, make_lora) -> None:
    folder = make_lora("extras")
    (folder / "optimizer.pt").write_bytes(b"training state, not part of the adapter")
    (folder / "README.md").write_text("PEFT's template card")

    commit = push_to_hub(folder, "org/extras")

    files = hub.files("org/extras")
    assert set(files) == {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert files["adapter_model.safetensors"] == (folder / "adapter_model.safetensors").read_bytes()
    assert files["adapter_config.json"] == (folder / "adapter_config.json").read_bytes()
    assert len(hub.commit_requests()) == 1 and commit.oid == hub.repos["org/extras"].branches["main"]
    assert commit.startswith(hub.url + "/org/extras/commit/")


def test_model_card_metadata_and_body(hub, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    folder = adapterspec.write_adapter(tmp_path / "dora", lora_config(use_dora=True, use_rslora=True), {
        **lora_tensors(), "base_model.model.layers.0.q_proj.lora_magnitude_vector": np.arange(6, dtype=np.float32)})
    push_to_hub(folder, "org/dora", subfolder="v1")

    card = ModelCard(hub.files("org/dora")["v1/README.md"].decode())
    assert card.data.library_name == "peft"
    assert card.data.base_model == "tiny-org/tiny-llama"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["adapterspec", "peft", "lora", "dora", "rslora"]
    body = card.text
    assert "| default | `.` | LORA | 2 | 2.82843 | q_proj | 1 | 3 | 34 | F32 |" in body  # alpha 4 / sqrt(2)
    assert 'adapterspec.load_adapter(model, "org/dora", subfolder="v1")' in body
    assert 'PeftModel.from_pretrained(model, "org/dora", subfolder="v1")' in body


def test_model_card_of_several_adapters_and_custom_card(hub, tmp_path: Path, make_lora) -> None:
    from huggingface_hub import ModelCard

    several = adapterspec.write_adapters(tmp_path / "several", {"default": (lora_config(), lora_tensors()),
                                                                 "fr": (lora_config(4), lora_tensors(1.0, r=4))})
    push_to_hub(several, "org/several")
    card = ModelCard(hub.files("org/several")["README.md"].decode())
    assert "2 adapters (LORA)" in card.text and "| fr | `fr` | LORA | 4 |" in card.text
    assert 'adapterspec.load_adapter(model, "org/several", "fr", subfolder="fr", activate=False)' in card.text

    push_to_hub(make_lora("mine"), "org/mine", model_card="---\nlicense: mit\n---\n# My own card\n")
    assert hub.files("org/mine")["README.md"] == b"---\nlicense: mit\n---\n# My own card\n"


@pytest.mark.parametrize(("task_type", "auto"), [("SEQ_CLS", "AutoModelForSequenceClassification"),
                                                 ("SEQ_2_SEQ_LM", "AutoModelForSeq2SeqLM"),
                                                 ("FEATURE_EXTRACTION", "AutoModel"),
                                                 ("CAUSAL_LM", "AutoModelForCausalLM"),
                                                 (None, "AutoModelForCausalLM")])
def test_model_card_loads_the_base_with_the_task_types_class(tmp_path: Path, task_type, auto) -> None:
    from adapterspec._modelcard import build_model_card

    folder = adapterspec.write_adapter(tmp_path / "a", lora_config(task_type=task_type), lora_tensors())
    text = str(build_model_card({"default": adapterspec.read_adapter(folder)}, "org/a"))
    assert f"from transformers import {auto}\n" in text
    assert f'model = {auto}.from_pretrained("tiny-org/tiny-llama")' in text


def test_pushing_the_same_files_again_makes_no_commit(hub, make_lora) -> None:
    folder = make_lora("same")
    first = push_to_hub(folder, "org/same")
    again = push_to_hub(folder, "org/same")
    assert again.oid == first.oid and len(hub.repos["org/same"].commits) == 2  # the initial commit + one


def test_hub_refusals_become_hub_errors(hub, make_lora) -> None:
    folder = make_lora("refused")
    with pytest.raises(HubError, match="repository 'org/absent' not found.*create it or pass create_repo=True"):
        push_to_hub(folder, "org/absent", create_repo=False)
    with pytest.raises(HubError, match="HTTP 401.*token is invalid or lacks write access"):
        push_to_hub(folder, "org/refused", token="hf_not_a_valid_token")
    assert hub.commit_requests() == []


def test_push_command(hub, make_lora, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_lora("cli")
    code = main(["push", str(folder), "org/cli", "--subfolder", "fr", "--revision", "dev", "--private",
                 "--token", TOKEN, "-m", "first French adapter"])
    assert code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(hub.url + "/org/cli/commit/")
    repo = hub.repos["org/cli"]
    assert repo.private and repo.branches["dev"] == out.rsplit("/", 1)[-1]
    assert repo.commits[repo.branches["dev"]].title == "first French adapter"
    assert "fr/adapter_model.safetensors" in hub.files("org/cli", "dev")
    assert "fr/adapter_model.safetensors" not in hub.files("org/cli", "main")
    assert download_adapter("hf://org/cli@dev/fr").is_dir()

    bad = _bad_rank_folder(tmp_path / "bad")
    hub.requests.clear()
    assert main(["push", str(bad), "org/cli"]) == 1
    assert "lora_A.weight" in capsys.readouterr().err and hub.requests == []


def test_progress_bars_for_uploads_and_downloads(hub, make_lora, capfd: pytest.CaptureFixture[str]) -> None:
    """huggingface_hub's own tqdm bars show the transfers (HF_HUB_DISABLE_PROGRESS_BARS=1 hides them)."""
    push_to_hub(make_lora("bars"), "org/bars")
    upload = capfd.readouterr().err
    assert "adapter_model.safetensors" in upload and "100%" in upload

    download_adapter("org/bars")
    assert "Fetching 2 files" in capfd.readouterr().err


def test_push_refused_offline_after_validation(hub, make_lora, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ShapeMismatchError):  # validation still runs offline
        push_to_hub(_bad_rank_folder(tmp_path / "bad"), "org/offline")
    with pytest.raises(HubError, match=r"cannot upload: offline mode is on .*fix: unset HF_HUB_OFFLINE"):
        push_to_hub(make_lora("offline"), "org/offline")
    assert hub.requests == []


def _refuse_lfs_put(handler: Any, oid: str, body: bytes) -> None:
    raise hubserver._HubError(400, "content does not hash")


def _drop_lfs_put(handler: Any, oid: str, body: bytes) -> None:
    handler.close_connection = True
    handler.connection.shutdown(2)  # the connection is cut mid-PUT, no response sent


@pytest.mark.parametrize(("fault", "said"), [(_refuse_lfs_put, r"HTTP 400.*content does not hash"),
                                             (_drop_lfs_put, r"failed: the connection broke \(RemoteProtocolError")])
def test_an_interrupted_upload_is_a_hub_error_and_commits_nothing(hub, make_lora, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  fault: Any, said: str) -> None:
    """huggingface_hub wraps a failed LFS upload in a bare RuntimeError("Error while uploading ..."): before,
    push_to_hub raised it as such (after 23 s of retries for a dropped connection), naming neither the repo nor
    what to do."""
    from huggingface_hub.utils import _http

    monkeypatch.setattr(hubserver._Handler, "_lfs_put", fault)
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda seconds: None))  # huggingface_hub's retries
    folder = make_lora("cut")
    with pytest.raises(HubError) as info:
        push_to_hub(folder, "org/cut", subfolder="fr")
    text = str(info.value)
    assert info.value.path == "hf://org/cut/fr" and "'fr/adapter_model.safetensors'" in text
    assert re.search(said, text) and "nothing was committed" in text and "retry the push" in text
    assert len(hub.repos["org/cut"].commits) == 1  # the repo's initial commit only
    assert main(["push", str(folder), "org/cut"]) == 1
    assert "hf://org/cut: uploading 'adapter_model.safetensors' failed" in capsys.readouterr().err


def test_a_runtime_error_of_another_cause_is_not_turned_into_a_hub_error(hub, make_lora,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug, not the Hub") from KeyError("x")

    monkeypatch.setattr(HfApi, "upload_folder", broken)
    with pytest.raises(RuntimeError, match="a bug, not the Hub") as info:
        push_to_hub(make_lora("bug"), "org/bug")
    assert not isinstance(info.value, HubError)


def test_a_dangling_weights_link_is_refused_before_anything_is_sent(hub, make_lora) -> None:
    folder = make_lora("dangling")
    weights = folder / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to("moved.safetensors")
    with pytest.raises(adapterspec.FileFormatError, match="adapter_model.safetensors is a dangling symbolic link: "
                       r"its target 'moved.safetensors' \(.*moved.safetensors\) does not exist") as info:
        push_to_hub(folder, "org/dangling")
    assert info.value.path == str(weights) and hub.requests == []


def _set_files_saves(files: dict[str, bytes], names: dict[str, str]) -> set[str]:
    """The saves the pushed manifest and each pushed adapter's metadata record (one element: one save)."""
    import struct

    manifest = json.loads(files["adapterspec.json"])
    saves = {entry["save_id"] for entry in manifest["adapters"].values()}
    for folder in names.values():
        blob = files[f"{folder}adapter_model.safetensors"]
        (n,) = struct.unpack("<Q", blob[:8])
        saves.add(json.loads(blob[8:8 + n])["__metadata__"]["adapterspec_save_id"])
    return saves


def test_a_set_save_during_the_push_uploads_one_save(hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another save of the whole set lands just after the push copied the root adapter: the commit holds one save
    of the set (the push copied the adapters one after the other and sent the old 'default' with the new 'fr' and
    the new manifest, each valid alone)."""
    import shutil

    from adapterspec import hub as hub_module

    def the_set(offset: float) -> dict[str, Any]:
        return {"default": (lora_config(), lora_tensors(offset)), "fr": (lora_config(), lora_tensors(offset + 0.5))}

    several = adapterspec.write_adapters(tmp_path / "several", the_set(0.0))
    copyfileobj, saved, copies = shutil.copyfileobj, [], [0]

    def save_then_copy(source: Any, target: Any, *args: Any) -> Any:
        copies[0] += 1
        if copies[0] == 3:  # the root's config and weights are copied: 'fr' is next
            saved.append(adapterspec.write_adapters(several, the_set(3.0), overwrite=True))
        return copyfileobj(source, target, *args)

    monkeypatch.setattr(hub_module.shutil, "copyfileobj", save_then_copy)
    commit = push_to_hub(several, "org/several")
    assert saved  # the other save did land in the middle
    files = hub.files("org/several", commit.oid)
    from safetensors.numpy import load as load_bytes

    for name, folder, offset in (("default", "", 3.0), ("fr", "fr/", 3.5)):  # the new set, both adapters
        got = load_bytes(files[f"{folder}adapter_model.safetensors"])
        assert all(np.array_equal(got[k], v) for k, v in lora_tensors(offset).items()), name
    assert len(_set_files_saves(files, {"default": "", "fr": "fr/"})) == 1  # and the manifest of that save


def test_a_set_of_two_saves_is_refused_and_nothing_uploaded(hub, tmp_path: Path) -> None:
    """A set a killed save left with adapters of two saves (the new root, the old 'fr' and manifest) is refused
    before anything is sent (it was uploaded as it was)."""
    several = adapterspec.write_adapters(tmp_path / "several", {"default": (lora_config(), lora_tensors()),
                                                                 "fr": (lora_config(), lora_tensors(1.0))})
    old_manifest = (several / "adapterspec.json").read_bytes()
    (several / "fr").rename(tmp_path / "old-fr")
    adapterspec.write_adapters(several, {"default": (lora_config(), lora_tensors(2.0)),
                                         "fr": (lora_config(), lora_tensors(3.0))}, overwrite=True)
    import shutil

    shutil.rmtree(several / "fr")
    (tmp_path / "old-fr").rename(several / "fr")
    (several / "adapterspec.json").write_bytes(old_manifest)
    with pytest.raises(IntegrityError, match="two saves") as caught:
        push_to_hub(several, "org/mixed")
    assert caught.value.path == str(several) and caught.value.key == "default"
    assert hub.requests == [] and "org/mixed" not in hub.repos
