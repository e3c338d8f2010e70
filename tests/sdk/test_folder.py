"""Writing and reading adapter folders: round trip, checksum, manifest, refusal to overwrite, no half-writes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import adapterspec
from adapterspec import folder as folder_module

CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]}


def tensors(offset: float = 0.0) -> dict[str, np.ndarray]:
    """Element-unique values: a transpose or a swapped key cannot pass."""
    a = np.sin(np.arange(2 * 6, dtype=np.float32) + offset).reshape(2, 6)
    b = np.cos(np.arange(5 * 2, dtype=np.float32) + offset).reshape(5, 2)
    return {"base_model.model.layers.0.q.lora_A.weight": a, "base_model.model.layers.0.q.lora_B.weight": b}


def test_round_trip_is_exact(tmp_path: Path) -> None:
    adapterspec.write_adapter(tmp_path / "a", CONFIG, tensors())
    adapter = adapterspec.read_adapter(tmp_path / "a", verify=True)
    loaded = adapter.load_tensors()
    assert sorted(loaded) == sorted(tensors())
    for key, value in tensors().items():
        assert np.array_equal(loaded[key], value)
    # spec 1.1: the version is in the safetensors metadata only (PEFT warns about unknown config fields)
    assert adapter.config["r"] == 2 and "adapterspec_version" not in json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert adapter.metadata["format"] == "pt" and adapter.metadata["adapterspec_version"] == "1.2"
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["inference_mode"] is True and config["lora_dropout"] == 0.0  # PEFT defaults filled


def test_checksum_matches_spec_definition(tmp_path: Path) -> None:
    import hashlib

    adapterspec.write_adapter(tmp_path / "a", CONFIG, tensors())
    expected = hashlib.sha256()
    for key in sorted(tensors()):
        expected.update(tensors()[key].tobytes())
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "numpy") as f:
        assert f.metadata()["adapterspec_sha256"] == expected.hexdigest()


def test_tampering_is_detected(tmp_path: Path) -> None:
    adapterspec.write_adapter(tmp_path / "a", CONFIG, tensors())
    path = tmp_path / "a" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    errors = adapterspec.validate_adapter(tmp_path / "a")
    assert [type(e).__name__ for e in errors] == ["IntegrityError"]
    with pytest.raises(adapterspec.IntegrityError, match="adapter_model.safetensors: tensor data sha256"):
        adapterspec.read_adapter(tmp_path / "a", verify=True)


def test_invalid_adapter_is_never_written(tmp_path: Path) -> None:
    bad = tensors()
    bad["base_model.model.layers.0.q.lora_B.weight"] = bad["base_model.model.layers.0.q.lora_B.weight"].T.copy()
    with pytest.raises(adapterspec.ShapeMismatchError, match="lora_B.weight"):
        adapterspec.write_adapter(tmp_path / "a", CONFIG, bad)
    assert list(tmp_path.iterdir()) == []


def test_existing_adapter_is_kept_unless_overwrite(tmp_path: Path) -> None:
    adapterspec.write_adapter(tmp_path / "a", CONFIG, tensors())
    with pytest.raises(adapterspec.AdapterExistsError, match="overwrite=True"):
        adapterspec.write_adapter(tmp_path / "a", CONFIG, tensors(1.0))
    adapterspec.write_adapter(tmp_path / "a", CONFIG, tensors(1.0), overwrite=True)
    loaded = adapterspec.read_adapter(tmp_path / "a", verify=True).load_tensors()
    assert np.array_equal(loaded["base_model.model.layers.0.q.lora_A.weight"],
                          tensors(1.0)["base_model.model.layers.0.q.lora_A.weight"])


@pytest.mark.parametrize("exists", [False, True])
def test_failed_write_leaves_previous_adapter_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     exists: bool) -> None:
    target = tmp_path / "a"
    if exists:
        adapterspec.write_adapter(target, CONFIG, tensors())
    before = sorted(p.name for p in tmp_path.rglob("*"))
    calls = []

    real_write = folder_module._write_file

    def failing_write(path: Path, content: object, **kwargs: object) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        real_write(path, content, **kwargs)

    monkeypatch.setattr(folder_module, "_write_file", failing_write)
    with pytest.raises(OSError, match="injected"):
        adapterspec.write_adapter(target, CONFIG, tensors(1.0), overwrite=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no temp litter
    if exists:
        loaded = adapterspec.read_adapter(target, verify=True).load_tensors()
        assert np.array_equal(loaded["base_model.model.layers.0.q.lora_A.weight"],
                              tensors()["base_model.model.layers.0.q.lora_A.weight"])


def test_several_adapters_with_manifest(tmp_path: Path) -> None:
    ia3 = {"peft_type": "IA3", "target_modules": ["q"], "feedforward_modules": []}
    ia3_tensors = {"base_model.model.layers.0.q.ia3_l": np.linspace(0.5, 1.5, 5, dtype=np.float32).reshape(5, 1)}
    adapterspec.write_adapters(tmp_path / "m", {"default": (CONFIG, tensors()), "fr": (ia3, ia3_tensors)})
    manifest = json.loads((tmp_path / "m" / "adapterspec.json").read_text())
    save = manifest["adapters"]["default"]["save_id"]  # SPEC 3.4: the save that wrote the set, in each adapter too
    assert len(save) == 32 and int(save, 16) >= 0
    assert manifest == {"adapterspec_version": "1.2", "adapters": {"default": {"path": ".", "save_id": save},
                                                                   "fr": {"path": "fr", "save_id": save}}}
    found = adapterspec.list_adapters(tmp_path / "m")
    assert found == {"default": tmp_path / "m", "fr": tmp_path / "m" / "fr"}
    adapters = adapterspec.read_adapters(tmp_path / "m")
    assert adapters["fr"].config.peft_type == "IA3"
    assert {name: a.metadata["adapterspec_save_id"] for name, a in adapters.items()} == {"default": save, "fr": save}
    adapterspec.write_adapters(tmp_path / "m", {"default": (CONFIG, tensors()), "fr": (ia3, ia3_tensors)},
                               overwrite=True)
    again = json.loads((tmp_path / "m" / "adapterspec.json").read_text())["adapters"]["fr"]["save_id"]
    assert again != save and adapterspec.read_adapters(tmp_path / "m")["fr"].metadata["adapterspec_save_id"] == again


def test_adapter_names_are_folder_safe(tmp_path: Path) -> None:
    for name in ("../evil", "a/b", "", ".", "..", "x" * 200):
        with pytest.raises(adapterspec.UnsafeFileError):
            adapterspec.write_adapters(tmp_path / "m", {name: (CONFIG, tensors())})
    assert not (tmp_path / "m").exists()


def test_pickle_needs_opt_in(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    torch.save({k: torch.from_numpy(v) for k, v in tensors().items()}, folder / "adapter_model.bin")
    with pytest.raises(adapterspec.UnsafeFileError, match="allow_pickle=True"):
        adapterspec.read_adapter(folder)
    adapter = adapterspec.read_adapter(folder, allow_pickle=True)
    loaded = adapter.load_tensors()
    assert all(np.array_equal(loaded[k], v) for k, v in tensors().items())


def test_error_locations_escape_control_characters() -> None:
    error = adapterspec.UnexpectedTensorError("bad", key="base_model.model.x\u202e\x1b[31m\n.lora_A.weight")
    assert str(error) == "base_model.model.x\\u202e\\x1b[31m\\n.lora_A.weight: bad"


def test_manifest_listing_is_linear_in_its_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same-folder check resolves each entry's folder a fixed number of times (it compared every pair:
    4,000 entries took 189 s); counted, not timed."""
    n = 400
    for i in range(n):
        (tmp_path / f"a{i}").mkdir()
        (tmp_path / f"a{i}" / "adapter_config.json").write_text("{}")
    manifest = {"adapterspec_version": "1.0", "adapters": {f"a{i}": {"path": f"a{i}"} for i in range(n)}}
    (tmp_path / "adapterspec.json").write_text(json.dumps(manifest))
    calls = 0
    resolve = Path.resolve

    def counting(self: Path, strict: bool = False) -> Path:
        nonlocal calls
        calls += 1
        return resolve(self, strict)

    monkeypatch.setattr(Path, "resolve", counting)
    found = adapterspec.list_adapters(tmp_path)
    assert found == {f"a{i}": tmp_path / f"a{i}" for i in range(n)}
    assert calls <= 4 * n  # a pairwise check makes n * (n - 1) / 2 = 79,800


def test_manifest_entries_sharing_a_folder_are_refused(tmp_path: Path) -> None:
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    (tmp_path / "z").symlink_to(tmp_path / "x")  # inside the folder, so allowed, but the same folder as "a"
    adapters = {"a": {"path": "x"}, "b": {"path": "y"}, "c": {"path": "z"}}
    (tmp_path / "adapterspec.json").write_text(json.dumps({"adapterspec_version": "1.0", "adapters": adapters}))
    with pytest.raises(adapterspec.ConfigError, match=r"adapters 'a' and 'c' have the same folder") as info:
        adapterspec.list_adapters(tmp_path)
    assert info.value.pointer == "/adapters/c/path"


def test_manifest_errors_echo_long_values_cut(tmp_path: Path) -> None:
    for i in range(2000):
        (tmp_path / f"adapter_with_a_long_name_{i:04}").mkdir()
        (tmp_path / f"adapter_with_a_long_name_{i:04}" / "adapter_config.json").write_text("{}")
    adapters = {f"adapter_with_a_long_name_{i:04}": {"path": f"adapter_with_a_long_name_{i:04}"} for i in range(2000)}
    (tmp_path / "adapterspec.json").write_text(json.dumps({"adapterspec_version": "1.0", "adapters": adapters,
                                                           "default": "missing"}))
    with pytest.raises(adapterspec.ConfigError, match=r"is not listed in adapters \(adapter_with_a_long_name_0000, ")\
            as info:
        adapterspec.list_adapters(tmp_path)
    assert "characters)" in info.value.message and len(info.value.message) < 500
    (tmp_path / "adapterspec.json").write_text(json.dumps({"adapterspec_version": "1.0",
                                                           "adapters": {"a": {"path": "/" + "x" * 5000}}}))
    with pytest.raises(adapterspec.UnsafeFileError, match="leaves the folder") as unsafe:
        adapterspec.list_adapters(tmp_path)
    assert len(unsafe.value.message) < 300


def test_hashing_ahead_writes_the_same_file(tmp_path: Path) -> None:
    """``hashing_ahead`` (the sha256 started before the config is final, as save_adapter does while a backend
    fingerprints the base) writes the same bytes as a plain write; tensors it cannot hash ahead pass through and
    are refused typed by the write as before."""
    import torch

    adapterspec.write_adapter(tmp_path / "plain", CONFIG, tensors())
    ahead = folder_module.hashing_ahead(tensors())
    assert ahead.checksum is not None  # type: ignore[attr-defined]
    adapterspec.write_adapter(tmp_path / "ahead", CONFIG, ahead)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "ahead" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    mixed = {**tensors(), "base_model.model.layers.0.q.lora_B.weight": torch.ones(5, 2)}
    assert folder_module.hashing_ahead(mixed) is mixed
    with pytest.raises(adapterspec.TensorError, match="several frameworks"):
        adapterspec.write_adapter(tmp_path / "mixed", CONFIG, mixed)
    assert not (tmp_path / "mixed").exists()


def _overwrite_in_worker(folder: str) -> None:
    import time

    remove_tree = folder_module._staging.remove_tree

    def slow_remove(path: Path) -> None:  # the worker ends before a quick removal would be done
        time.sleep(0.5)
        remove_tree(path)

    folder_module._staging.remove_tree = slow_remove  # type: ignore[assignment]  # this worker's only
    adapterspec.write_adapter(folder, CONFIG, tensors(1.0), overwrite=True)


def test_a_worker_process_removes_the_adapter_it_replaced_before_it_ends(tmp_path: Path) -> None:
    """A ``multiprocessing`` worker ends with ``os._exit`` (no atexit handler runs): the old adapter, removed on
    a thread after the swap, must still be gone when the worker has ended (it was left, hidden, beside it).
    This process overwrites first, so its own registration (cleared in a forked worker) is there to inherit."""
    import multiprocessing

    folder = tmp_path / "adapter"
    adapterspec.write_adapter(folder, CONFIG, tensors(2.0))
    adapterspec.write_adapter(folder, CONFIG, tensors(), overwrite=True)
    folder_module.wait_for_removals()
    worker = multiprocessing.get_context("fork").Process(target=_overwrite_in_worker, args=(str(folder),))
    worker.start()
    worker.join(30)
    assert worker.exitcode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    loaded = adapterspec.read_adapter(folder).load_tensors()
    assert all(np.array_equal(loaded[k], v) for k, v in tensors(1.0).items())


@pytest.fixture
def reachable_tmp(tmp_path: Path) -> Iterator[Path]:
    """A folder an unprivileged user can reach: ``tmp_path`` itself, or (as root, whose ``tmp_path`` is private)
    a fresh folder in ``/tmp``, every mode restored and removed afterwards."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    base = Path(tempfile.mkdtemp(prefix="adapterspec-perm-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        for path in [base, *base.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(base)


def _as_unprivileged(calls: dict[str, Callable[[], object]]) -> dict[str, str]:
    """Each call's outcome (``ok ...``, ``<ErrorClass>: <message>`` or ``RAW <class>: ...``) in a forked child run as
    ``nobody`` (uid/gid 65534) when this is root -- root ignores file modes -- else as the current user."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            outcomes = {label: _outcome(call) for label, call in calls.items()}
            with os.fdopen(write, "w") as out:
                json.dump(outcomes, out)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        text = fh.read()
    os.waitpid(pid, 0)
    return json.loads(text)


def _outcome(call: Callable[[], object]) -> str:
    try:
        result = call()
    except adapterspec.AdapterSpecError as exc:
        return f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - what the test is about
        return f"RAW {type(exc).__name__}: {exc}"
    return f"ok {sorted(result) if isinstance(result, dict) else type(result).__name__}"


def _cli(*argv: str) -> Callable[[], object]:
    def run() -> object:
        from adapterspec.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
        if code != 0:
            raise adapterspec.FileFormatError(f"exit {code}: {out.getvalue()} {err.getvalue()}".strip())
        return {"exit 0": out.getvalue()}

    return run


def _raising(call: Callable[[], list[adapterspec.AdapterSpecError]]) -> Callable[[], object]:
    def run() -> object:
        errors = call()
        if errors:
            raise errors[0]
        return errors

    return run


def _reads(path: Path) -> dict[str, Callable[[], object]]:
    return {"read_adapter": lambda: adapterspec.read_adapter(path),
            "validate_adapter": _raising(lambda: adapterspec.validate_adapter(path)),
            "list_adapters": lambda: adapterspec.list_adapters(path),
            "read_adapters": lambda: adapterspec.read_adapters(path),
            "resolve_source": lambda: adapterspec.read_adapter(adapterspec.api.resolve_source(path)),
            "cli validate": _cli("validate", str(path)),
            "cli inspect": _cli("inspect", str(path))}


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX file modes, fork and setuid")
def test_a_folder_that_may_not_be_read_is_a_permission_error(reachable_tmp: Path) -> None:
    """No permission on the way to an adapter is said as such, naming the folder that refuses and the fix: before,
    list_adapters and read_adapters raised a bare PermissionError, read_adapter, validate_adapter and load_adapter
    said 'no such adapter folder' about a folder that exists, and the CLI printed a traceback."""
    base = reachable_tmp
    unsearchable_parent = adapterspec.write_adapter(base / "p1" / "a", CONFIG, tensors())
    unsearchable = adapterspec.write_adapter(base / "p2" / "a", CONFIG, tensors())
    unlistable = adapterspec.write_adapter(base / "p3" / "a", CONFIG, tensors())
    peft_layout = base / "p4" / "m"
    for name in ("de", "fr"):
        adapterspec.write_adapter(peft_layout / name, CONFIG, tensors())
    several = adapterspec.write_adapters(base / "p5" / "m", {"default": (CONFIG, tensors()), "fr": (CONFIG, tensors(1.0))})
    for command in ("validate", "inspect"):  # its lazy imports done here: the interpreter may be out of nobody's reach
        _cli(command, str(unlistable))()
    (base / "p1").chmod(0o600)
    for folder, mode in [(unsearchable, 0o600), (unlistable, 0o311), (peft_layout / "fr", 0o600), (several / "fr", 0o600)]:
        folder.chmod(mode)
    calls = {f"{layout} {label}": call for layout, path in [("parent", unsearchable_parent), ("folder", unsearchable)]
             for label, call in _reads(path).items()}
    calls |= {f"unlistable {label}": call for label, call in _reads(unlistable).items()}
    calls |= {f"peft {label}": call for label, call in _reads(peft_layout).items() if "adapters" in label}
    calls |= {f"manifest {label}": call for label, call in _reads(several).items() if "adapters" in label}
    outcomes = _as_unprivileged(calls)

    search = "permission denied: the folder {} may not be searched (fix: get search (x) permission on {}"
    for label, outcome in outcomes.items():
        layout = label.split()[0]
        if layout == "unlistable" and label.split(" ", 1)[1] not in ("list_adapters", "read_adapters", "cli validate"):
            assert outcome.startswith("ok"), (label, outcome)  # its files are reached by name: it reads exactly
            continue
        assert outcome.startswith("FileFormatError: "), (label, outcome)
        blocked = {"parent": base / "p1", "folder": unsearchable, "peft": peft_layout / "fr",
                   "manifest": several / "fr"}.get(layout)
        if blocked is None:
            assert f"{unlistable}: permission denied: the folder cannot be listed (fix: get read permission on " \
                   f"{unlistable}" in outcome, (label, outcome)
        else:
            assert search.format(blocked, blocked) in outcome, (label, outcome)
    assert "peft list_adapters" in outcomes and len(outcomes) == 2 * 7 + 7 + 2 + 2


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links")
def test_a_dangling_link_is_said_to_be_one(tmp_path: Path) -> None:
    """A file of the adapter that is a symbolic link to nothing is named as such, with its target: before, a
    dangling adapter_model.safetensors (or config) read 'no adapter_model.safetensors in the folder', and a
    dangling manifest made the folder a PEFT layout (its subfolders listed without it)."""
    folder = adapterspec.write_adapter(tmp_path / "a", CONFIG, tensors())
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    weights.unlink()
    weights.symlink_to("gone.safetensors")
    with pytest.raises(adapterspec.FileFormatError) as info:
        adapterspec.read_adapter(folder)
    assert str(info.value) == (f"{weights}: adapter_model.safetensors is a dangling symbolic link: its target "
                               f"'gone.safetensors' ({folder / 'gone.safetensors'}) does not exist (fix: point the "
                               "link at the file, or replace it with the file itself)")
    assert [str(e) for e in adapterspec.validate_adapter(folder)] == [str(info.value)]

    config.unlink()
    config.symlink_to(folder / "old" / "adapter_config.json")  # an absolute target: shown once
    with pytest.raises(adapterspec.FileFormatError, match=r"adapter_config.json is a dangling symbolic link: its "
                       rf"target '{folder}/old/adapter_config.json' does not exist \(fix"):
        adapterspec.read_adapter(folder)
    with pytest.raises(adapterspec.FileFormatError, match="adapter_config.json is a dangling symbolic link"):
        adapterspec.list_adapters(folder)

    outside = tmp_path / "elsewhere.json"
    config.unlink()
    config.symlink_to(outside)  # leads outside, to nothing: SPEC 11.3 still refuses it as unsafe
    with pytest.raises(adapterspec.UnsafeFileError, match=r"leads outside the adapter folder \(to .*elsewhere.json, "
                       "which does not exist\\)"):
        adapterspec.read_adapter(folder)

    several = adapterspec.write_adapters(tmp_path / "several", {"default": (CONFIG, tensors()), "fr": (CONFIG, tensors(1.0))})
    manifest = several / "adapterspec.json"
    manifest.unlink()
    manifest.symlink_to("adapterspec.json.bak")
    with pytest.raises(adapterspec.FileFormatError, match="adapterspec.json is a dangling symbolic link"):
        adapterspec.list_adapters(several)
    with pytest.raises(adapterspec.FileFormatError, match="adapterspec.json is a dangling symbolic link"):
        adapterspec.read_adapters(several)


# -- the save of a set (SPEC 3.4 save_id) ---------------------------------------------------------------
def _set(root: Path, offset: float = 0.0) -> Path:
    return adapterspec.write_adapters(root, {"default": (CONFIG, tensors(offset)), "fr": (CONFIG, tensors(offset))},
                                      overwrite=True)


def _mix(root: Path) -> None:
    """Make ``root`` a set of two saves, as a save killed after its first adapter leaves it: the root from a new
    save, ``fr`` and the manifest from the old one."""
    old_manifest = (root / "adapterspec.json").read_bytes()
    old_fr = root.parent / "old-fr"
    (root / "fr").rename(old_fr)
    _set(root, 1.0)
    folder_module._staging.remove_tree(root / "fr")
    old_fr.rename(root / "fr")
    (root / "adapterspec.json").write_bytes(old_manifest)


def test_adapters_of_two_saves_are_refused_naming_them(tmp_path: Path) -> None:
    """read_adapters / list_adapters / validate of a set whose root is of another save than its manifest: refused
    with IntegrityError naming the folder and the adapter (they returned the mix, each adapter valid alone)."""
    root = _set(tmp_path / "m")
    _mix(root)
    for read in (adapterspec.read_adapters, adapterspec.list_adapters):
        with pytest.raises(adapterspec.IntegrityError) as caught:
            read(root)
        assert caught.value.path == str(root) and caught.value.key == "default"
        assert caught.value.message == ("the folder holds adapters of two saves: 'default' is not of the save "
                                        "adapterspec.json records ('fr' is); a save of the set was interrupted")
        assert "save the set again" in (caught.value.hint or "")
    assert adapterspec.validate_adapter(root) == [] and adapterspec.validate_adapter(root / "fr") == []  # each alone
    from adapterspec.cli import main

    assert main(["validate", str(root)]) == 1
    _set(root, 1.0)  # the fix the hint gives
    assert sorted(adapterspec.read_adapters(root)) == ["default", "fr"]


def test_a_manifest_without_save_ids_reads_as_before(tmp_path: Path) -> None:
    """Older writers' manifests (and PEFT folders, which have none) record no save: the same mix reads as before."""
    root = _set(tmp_path / "m")
    _mix(root)
    manifest = json.loads((root / "adapterspec.json").read_text())
    for entry in manifest["adapters"].values():
        del entry["save_id"]
    (root / "adapterspec.json").write_text(json.dumps(manifest))
    assert sorted(adapterspec.read_adapters(root)) == ["default", "fr"]
    (root / "adapterspec.json").unlink()
    assert sorted(adapterspec.read_adapters(root)) == ["default", "fr"]


def test_an_adapter_saved_alone_into_a_set_is_read_with_it(tmp_path: Path) -> None:
    """write_adapter of one adapter of a set (or PEFT's save_pretrained) records no save of a set: the set reads,
    with the new one. A save id the caller passes in the metadata is not written (it would claim a set's save)."""
    root = _set(tmp_path / "m")
    save = json.loads((root / "adapterspec.json").read_text())["adapters"]["fr"]["save_id"]
    adapterspec.write_adapter(root / "fr", CONFIG, tensors(2.0), overwrite=True,
                              metadata={"adapterspec_save_id": "f" * 32, "note": "kept"})
    adapters = adapterspec.read_adapters(root)
    assert "adapterspec_save_id" not in adapters["fr"].metadata and adapters["fr"].metadata["note"] == "kept"
    np.testing.assert_array_equal(adapters["fr"].load_tensors()["base_model.model.layers.0.q.lora_A.weight"],
                                  tensors(2.0)["base_model.model.layers.0.q.lora_A.weight"])
    assert adapters["default"].metadata["adapterspec_save_id"] == save


@pytest.mark.parametrize("value", [7, "", "x" * 129])
def test_a_malformed_save_id_is_a_config_error(tmp_path: Path, value: object) -> None:
    root = _set(tmp_path / "m")
    manifest = json.loads((root / "adapterspec.json").read_text())
    manifest["adapters"]["fr"]["save_id"] = value
    (root / "adapterspec.json").write_text(json.dumps(manifest))
    with pytest.raises(adapterspec.ConfigError) as caught:
        adapterspec.list_adapters(root)
    assert caught.value.pointer == "/adapters/fr/save_id"


def test_reading_a_file_that_is_no_adapter_folder_says_it_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps(CONFIG))
    with pytest.raises(adapterspec.FileFormatError) as info:
        adapterspec.read_adapter(tmp_path / "bad.json")
    assert str(info.value) == (f"{tmp_path}/bad.json: a file, not an adapter folder (fix: pass the folder holding "
                               "adapter_config.json and adapter_model.safetensors; check a config file alone with "
                               "validate_config or 'adapterspec validate')")
    with pytest.raises(adapterspec.FileFormatError, match="no such adapter folder"):
        adapterspec.read_adapter(tmp_path / "nonexistent")


def test_names_differing_only_in_case_are_refused_before_writing(tmp_path: Path) -> None:
    """SPEC.md 3.3: writers must not put adapters whose names differ only in letter case into one folder (their
    folders collide on case-insensitive file systems); write_adapters wrote both, which its readers then refused."""
    for names in (("Fr", "fr"), ("default", "DEFAULT"), ("a", "x", "A")):
        with pytest.raises(adapterspec.ConfigError, match=f"'{names[0]}' and '{names[-1]}' differ only in letter case") as info:
            adapterspec.write_adapters(tmp_path / "m", {name: (CONFIG, tensors(i)) for i, name in enumerate(names)})
        assert info.value.key == names[-1] and "rename one" in (info.value.hint or "")
        assert not (tmp_path / "m").exists()
