"""Hostile folder layouts: symlinks leaving the folder, symlink loops, FIFOs, missing files, unsafe
adapter and subfolder names, and hostile manifests (absolute / ``..`` paths, not JSON, naming missing
adapters, truncated or flipped at every byte).

Targets: ``read_adapter``, ``validate_adapter``, ``list_adapters``, ``read_adapters``,
``api.resolve_source(subfolder=...)``, ``write_adapters`` and ``check_adapter_name``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hardening_harness import LORA_CONFIG, lora_tensors
from hardening_harness import SCALE, STATS, expect_clean, long_mode_extra, probe, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapterspec
from adapterspec import api
from adapterspec.spec import CONFIG_NAME, MANIFEST_NAME, PICKLE_NAME, SAFETENSORS_NAME

pytestmark = pytest.mark.filterwarnings("ignore::adapterspec.AdapterSpecWarning")


def _reads(folder: Path, label: str) -> list:
    return [probe(label + ":read", lambda: adapterspec.read_adapter(folder)),
            probe(label + ":validate", lambda: adapterspec.validate_adapter(folder))]


def _refused(outcomes: list, *, kinds: tuple[type, ...] = (adapterspec.AdapterSpecError,), names: str = "") -> None:
    expect_clean(outcomes)
    read, validate = outcomes
    assert read.kind == "typed" and isinstance(read.error, kinds), (read.label, read.error or read.value)
    assert validate.kind == "ok" and validate.value and isinstance(validate.value[0], kinds), validate.value
    if names:
        assert names in str(read.error), f"{read.error} does not name {names}"


# -- symlinks, special files, missing files ---------------------------------------------------
def _outside(tmp_path: Path) -> Path:
    secret = tmp_path / "outside"
    secret.mkdir(exist_ok=True)
    (secret / "secret.json").write_text(json.dumps(LORA_CONFIG))
    shutil.copy(tmp_path / "a" / SAFETENSORS_NAME, secret / "weights.safetensors")
    return secret


LAYOUTS = {
    "config links outside": lambda f, out: _relink(f / CONFIG_NAME, out / "secret.json"),
    "weights link outside": lambda f, out: _relink(f / SAFETENSORS_NAME, out / "weights.safetensors"),
    "config links to /etc/passwd": lambda f, out: _relink(f / CONFIG_NAME, Path("/etc/passwd")),
    "weights link to /dev/zero": lambda f, out: _relink(f / SAFETENSORS_NAME, Path("/dev/zero")),
    "weights link to /dev/urandom": lambda f, out: _relink(f / SAFETENSORS_NAME, Path("/dev/urandom")),
    "config via ../ relative link": lambda f, out: _relink(f / CONFIG_NAME, Path("..") / "outside" / "secret.json"),
    "config symlink loop": lambda f, out: _relink(f / CONFIG_NAME, f / CONFIG_NAME),
    "weights symlink loop": lambda f, out: _relink(f / SAFETENSORS_NAME, f / "w2") or _relink(f / "w2", f / SAFETENSORS_NAME),
    "config dangling link": lambda f, out: _relink(f / CONFIG_NAME, f / "nowhere"),
    "config is a FIFO": lambda f, out: _replace(f / CONFIG_NAME, os.mkfifo),
    "weights are a FIFO": lambda f, out: _replace(f / SAFETENSORS_NAME, os.mkfifo),
    "config is a folder": lambda f, out: _replace(f / CONFIG_NAME, os.mkdir),
    "weights are a folder": lambda f, out: _replace(f / SAFETENSORS_NAME, os.mkdir),
    "config missing": lambda f, out: (f / CONFIG_NAME).unlink(),
    "weights missing": lambda f, out: (f / SAFETENSORS_NAME).unlink(),
    "config empty": lambda f, out: (f / CONFIG_NAME).write_text(""),
    "weights empty": lambda f, out: (f / SAFETENSORS_NAME).write_bytes(b""),
    "only a pickle": lambda f, out: (f / SAFETENSORS_NAME).rename(f / PICKLE_NAME),
    "config unreadable (mode 000)": lambda f, out: os.chmod(f / CONFIG_NAME, 0),
}
INSIDE_LINKS = {  # links that stay inside the folder are fine
    "config links to a file inside": lambda f, out: ((f / CONFIG_NAME).rename(f / "real.json"), _relink(f / CONFIG_NAME, Path("real.json"))),
}


def _relink(link: Path, target: Path) -> None:
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(target)


def _replace(path: Path, make) -> None:  # type: ignore[no-untyped-def]
    path.unlink()
    make(path)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hostile_layouts_are_refused(tmp_path: Path, good_adapter: Path, layout: str) -> None:
    folder = Path(shutil.copytree(good_adapter, tmp_path / "a"))
    out = _outside(tmp_path)
    LAYOUTS[layout](folder, out)
    if layout.startswith("config unreadable") and os.access(folder / CONFIG_NAME, os.R_OK):
        pytest.skip("running as root: mode 000 is still readable")
    before, outside_before = snapshot(folder), snapshot(out)
    outcomes = _reads(folder, layout)
    STATS.count("folder-layout")
    names = {"links outside": "leads outside", "link outside": "leads outside", "passwd": "leads outside",
             "/dev/": "leads outside", "relative link": "leads outside", "FIFO": "regular file"}
    expected = next((v for k, v in names.items() if k in layout), "")
    _refused(outcomes, names=expected)
    error = outcomes[0].error
    assert error.path and Path(error.path).name in (CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME, "a", "w2"), error
    if "outside" in expected:
        assert isinstance(error, adapterspec.UnsafeFileError)
    assert snapshot(folder) == before and snapshot(out) == outside_before


@pytest.mark.parametrize("layout", sorted(INSIDE_LINKS))
def test_links_inside_the_folder_are_fine(tmp_path: Path, good_adapter: Path, layout: str) -> None:
    folder = Path(shutil.copytree(good_adapter, tmp_path / "a"))
    INSIDE_LINKS[layout](folder, None)
    assert adapterspec.validate_adapter(folder) == []


def test_hugging_face_cache_layout_is_allowed(tmp_path: Path, good_adapter: Path) -> None:
    """huggingface_hub's cache keeps files in ``blobs/`` and links them from ``snapshots/<rev>/``."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for name in (CONFIG_NAME, SAFETENSORS_NAME):
        blob = repo / "blobs" / name.replace(".", "_")
        shutil.copy(good_adapter / name, blob)
        (snap / name).symlink_to(Path("../..") / "blobs" / blob.name)
    assert adapterspec.validate_adapter(snap) == []
    # ...but only into that repo's blobs/, and not through a blobs/ that is itself a link
    elsewhere = Path(shutil.copytree(repo / "blobs", tmp_path / "elsewhere"))
    shutil.rmtree(repo / "blobs")
    (repo / "blobs").symlink_to(elsewhere)
    assert isinstance(adapterspec.validate_adapter(snap)[0], adapterspec.UnsafeFileError)


@pytest.mark.parametrize("source", ["nonexistent", "", "a\x00b", "x" * 5000, "/dev/null", "/proc/self/mem"])
def test_bad_source_paths(tmp_path: Path, source: str) -> None:
    path = source if source.startswith("/") else str(tmp_path / source)
    outcomes = _reads(Path(path), f"source {source[:20]!r}")
    STATS.count("folder-layout")
    _refused(outcomes)


# -- names ------------------------------------------------------------------------------------
UNSAFE_NAMES = ["", ".", "..", "../x", "a/b", "a\\b", "/abs", "x\n", "x\r", "\nx", "a\x00", "-x", "_x", ".hidden",
                "x" * 129, "caf\u00e9", "\u0430dapter", "x\u202e", "a b", "a:b", "C:", "x/", "ｘ", "\ud800", None, 5, b"x"]


@pytest.mark.parametrize("name", UNSAFE_NAMES, ids=repr)
def test_unsafe_adapter_names(tmp_path: Path, name: object) -> None:
    outcome = probe(f"name {name!r}", lambda: adapterspec.check_adapter_name(name))
    expect_clean([outcome], allow_ok=False)
    assert isinstance(outcome.error, adapterspec.UnsafeFileError)
    write = probe(f"write_adapters {name!r}", lambda: adapterspec.write_adapters(
        tmp_path / "multi", {name: (LORA_CONFIG, lora_tensors())}))  # type: ignore[dict-item]
    expect_clean([write], allow_ok=False)
    assert not (tmp_path / "multi").exists() and list(tmp_path.iterdir()) == []
    STATS.count("names", 2)


@settings(max_examples=300 * SCALE, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(name=st.text(max_size=140))
def test_generated_names(name: str) -> None:
    outcome = probe(f"name {name!r}", lambda: adapterspec.check_adapter_name(name))
    STATS.count("names")
    expect_clean([outcome])
    if outcome.kind == "ok":  # whatever is accepted is a plain, portable folder name
        assert outcome.value == name and 1 <= len(name) <= 128
        assert name not in (".", "..") and all(c.isascii() and (c.isalnum() or c in "._-") for c in name)
        assert name[0].isalnum()


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json", "adapterspec.json", "README.md"])
def test_names_colliding_with_format_files(tmp_path: Path, name: str) -> None:
    with pytest.raises(adapterspec.UnsafeFileError):
        adapterspec.write_adapters(tmp_path / "m", {"default": (LORA_CONFIG, lora_tensors()), name: (LORA_CONFIG, lora_tensors())})
    assert not (tmp_path / "m").exists()


SUBFOLDERS = ["..", "../x", "../../etc", "/etc", "a/../../x", "x\n", "a\x00b", "loop", "outlink", ".hidden"]


@pytest.mark.parametrize("subfolder", SUBFOLDERS, ids=repr)
def test_resolve_source_subfolder(tmp_path: Path, good_adapter: Path, subfolder: str) -> None:
    root = tmp_path / "root"
    shutil.copytree(good_adapter, root / "fr")
    (root / "loop").symlink_to("loop")
    (root / "outlink").symlink_to(good_adapter, target_is_directory=True)
    outcome = probe(f"subfolder {subfolder!r}", lambda: api.resolve_source(root, subfolder=subfolder))
    STATS.count("subfolder")
    expect_clean([outcome], allow_ok=False)
    assert isinstance(outcome.error, adapterspec.UnsafeFileError), outcome.error


def test_resolve_source_good_subfolder(tmp_path: Path, good_adapter: Path) -> None:
    shutil.copytree(good_adapter, tmp_path / "root" / "fr")
    assert api.resolve_source(tmp_path / "root", subfolder="fr") == tmp_path / "root" / "fr"


# -- manifests --------------------------------------------------------------------------------
def _multi(tmp_path: Path) -> Path:
    return adapterspec.write_adapters(tmp_path / "multi", {"default": (LORA_CONFIG, lora_tensors()),
                                                           "fr": (LORA_CONFIG, lora_tensors())})


MANIFESTS = {
    "absolute path": {"adapterspec_version": "1.0", "adapters": {"fr": {"path": "/etc"}}},
    "dotdot path": {"adapterspec_version": "1.0", "adapters": {"fr": {"path": "../outside"}}},
    "nested dotdot": {"adapterspec_version": "1.0", "adapters": {"fr": {"path": "fr/../../outside"}}},
    "backslash path": {"adapterspec_version": "1.0", "adapters": {"fr": {"path": "..\\outside"}}},
    "drive path": {"adapterspec_version": "1.0", "adapters": {"fr": {"path": "C:/x"}}},
    "missing adapter": {"adapterspec_version": "1.0", "adapters": {"de": {"path": "de"}}},
    "path is a file": {"adapterspec_version": "1.0", "adapters": {"fr": {"path": "fr/adapter_config.json"}}},
    "unsafe name": {"adapterspec_version": "1.0", "adapters": {"../x": {"path": "fr"}}},
    "newline name": {"adapterspec_version": "1.0", "adapters": {"fr\n": {"path": "fr"}}},
    "no adapters": {"adapterspec_version": "1.0", "adapters": {}},
    "adapters a list": {"adapterspec_version": "1.0", "adapters": ["fr"]},
    "entry a string": {"adapterspec_version": "1.0", "adapters": {"fr": "fr"}},
    "path an int": {"adapterspec_version": "1.0", "adapters": {"fr": {"path": 3}}},
    "no version": {"adapters": {"fr": {"path": "fr"}}},
    "version 2.0": {"adapterspec_version": "2.0", "adapters": {"fr": {"path": "fr"}}},
    "a list": [{"fr": "fr"}],
    "null": None,
    "deep nesting": {"adapterspec_version": "1.0", "adapters": {"fr": {"path": "fr", "x": [[[[[[[[[[]]]]]]]]]]}}},
}
UNSAFE_MANIFESTS = {"absolute path", "dotdot path", "nested dotdot", "backslash path", "drive path", "unsafe name",
                    "newline name"}
RAW_MANIFESTS = {
    "not JSON": b"{nope",
    "empty": b"",
    "non-UTF8": b'{"adapterspec_version": "1.0", "adapters": {"\xff": {"path": "fr"}}}',
    "100k nesting": b"[" * 100_000 + b"]" * 100_000,
    "NaN": b'{"adapterspec_version": NaN, "adapters": {}}',
}


@pytest.mark.parametrize("case", sorted(MANIFESTS) + sorted(RAW_MANIFESTS))
def test_hostile_manifests(tmp_path: Path, case: str) -> None:
    root = _multi(tmp_path)
    shutil.copytree(root / "fr", tmp_path / "outside")
    raw = RAW_MANIFESTS.get(case)
    (root / MANIFEST_NAME).write_bytes(raw if raw is not None else json.dumps(MANIFESTS[case]).encode())
    before = snapshot(root)
    outcomes = [probe(case + ":list", lambda: adapterspec.list_adapters(root)),
                probe(case + ":read_adapters", lambda: api.read_adapters(root))]
    STATS.count("manifest-crafted")
    if case == "deep nesting":  # unknown fields in an entry are allowed (and kept)
        expect_clean(outcomes)
        return
    expect_clean(outcomes, allow_ok=False)
    for o in outcomes:
        assert MANIFEST_NAME in str(o.error), o.error
    if case in UNSAFE_MANIFESTS:
        assert isinstance(outcomes[0].error, adapterspec.UnsafeFileError), outcomes[0].error
    assert snapshot(root) == before


@pytest.mark.parametrize("kind", ["FIFO", "symlink outside", "huge"])
def test_manifest_special_files(tmp_path: Path, kind: str) -> None:
    root = _multi(tmp_path)
    manifest = root / MANIFEST_NAME
    manifest.unlink()
    if kind == "FIFO":
        os.mkfifo(manifest)
    elif kind == "symlink outside":
        (tmp_path / "m.json").write_text(json.dumps({"adapterspec_version": "1.0", "adapters": {"fr": {"path": "fr"}}}))
        manifest.symlink_to(tmp_path / "m.json")
    else:
        with open(manifest, "wb") as fh:
            fh.truncate(20 * 2**30)  # sparse: must be refused by size, not read
    outcome = probe(f"manifest {kind}", lambda: adapterspec.list_adapters(root), seconds=5)
    STATS.count("manifest-crafted")
    if kind == "symlink outside":  # only its relative paths are used, and they are checked: harmless
        expect_clean([outcome])
        assert outcome.kind == "typed" or outcome.value == {"fr": root / "fr"}
        return
    expect_clean([outcome], allow_ok=False)
    assert MANIFEST_NAME in str(outcome.error)


def test_peft_layout_with_a_subfolder_linking_outside(tmp_path: Path, good_adapter: Path) -> None:
    root = Path(shutil.copytree(good_adapter, tmp_path / "peft"))
    (root / "fr").symlink_to(good_adapter, target_is_directory=True)
    (root / "loop").symlink_to("loop")
    outcome = probe("subfolder link", lambda: adapterspec.list_adapters(root))
    expect_clean([outcome], allow_ok=False)
    assert isinstance(outcome.error, adapterspec.UnsafeFileError) and "fr" in str(outcome.error)


def test_manifest_truncation_and_flips(scratch: Path) -> None:
    root = _multi(scratch)
    raw = (root / MANIFEST_NAME).read_bytes()
    shutil.copytree(root / "fr", scratch / "outside")
    variants = [raw[:cut] for cut in range(len(raw))]
    for at in range(len(raw)):
        for flip in (0x01, 0x80, 0x0F):
            mutated = bytearray(raw)
            mutated[at] ^= flip
            variants.append(bytes(mutated))
    variants += long_mode_extra(raw, len(variants), seed=4)
    before = snapshot(root)
    outcomes = []
    for i, blob in enumerate(variants):
        (root / MANIFEST_NAME).write_bytes(blob)
        outcome = probe(f"manifest variant {i}", lambda: adapterspec.list_adapters(root))
        outcomes.append(outcome)
        if outcome.kind == "ok":  # whatever is listed is inside the folder
            for name, where in outcome.value.items():
                adapterspec.check_adapter_name(name)
                assert where.resolve().is_relative_to(root.resolve())
        elif outcome.kind == "typed":
            assert MANIFEST_NAME in str(outcome.error) or "adapter_config" in str(outcome.error), outcome.error
    (root / MANIFEST_NAME).write_bytes(raw)
    assert snapshot(root) == before
    STATS.count("manifest-mutation", len(variants))
    expect_clean(outcomes)
