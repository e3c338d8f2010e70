"""The read and write fast paths: one read of the file with tensor views, the
checksum hashed from the tensors while safetensors writes, and old adapters removed in the background.

Each must give exactly what the plain path gives: the same values (element-unique, mixed dtypes,
unaligned spans), the spec's checksum, typed errors for a file that changed, no shared-memory refusal.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file as np_save_file

import adapterspec
from adapterspec import _safetensors
from adapterspec import folder as folder_module

CONFIG = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "target_modules": ["q", "v"], "lora_bias": True}


def _mixed() -> dict[str, np.ndarray]:
    """Element-unique values in three dtypes, so that the file's data is not in key order."""
    out = {}
    for i, module in enumerate(("layers.0.q", "layers.0.v", "layers.1.q")):
        dtype = (np.float32, np.float16, np.float64)[i]
        prefix = f"base_model.model.{module}."
        out[prefix + "lora_A.weight"] = (np.arange(3 * 7) / 31 + i).astype(dtype).reshape(3, 7)
        out[prefix + "lora_B.weight"] = (np.arange(5 * 3) / 17 - i).astype(dtype).reshape(5, 3)
        out[prefix + "lora_B.bias"] = (np.arange(5) / 7 + 2 * i).astype(dtype)
    return out


def _spec_sha256(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors, key=lambda k: k.encode()):
        h.update(np.ascontiguousarray(tensors[key]).tobytes())
    return h.hexdigest()


def test_numpy_views_equal_safetensors_values(tmp_path: Path) -> None:
    adapterspec.write_adapter(tmp_path / "a", CONFIG, _mixed())
    adapter = adapterspec.read_adapter(tmp_path / "a")
    loaded = adapter.load_tensors("numpy")
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "numpy") as f:
        reference = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(loaded) == sorted(reference) == sorted(_mixed())
    for key, value in reference.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape
        assert np.array_equal(loaded[key], value) and np.array_equal(loaded[key], _mixed()[key])


def test_torch_views_equal_safetensors_values_and_each_load_reads_anew(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    adapterspec.write_adapter(tmp_path / "a", CONFIG, _mixed())
    adapter = adapterspec.read_adapter(tmp_path / "a")
    adapter.prefetch()
    loaded = adapter.load_tensors("pt")
    again = adapter.load_tensors("pt")
    for key, value in _mixed().items():
        expected = torch.from_numpy(value)
        assert loaded[key].dtype == expected.dtype and loaded[key].is_contiguous()
        assert torch.equal(loaded[key], expected) and torch.equal(again[key], expected)
    changed = "base_model.model.layers.0.v.lora_B.weight"
    loaded[changed].add_(1)  # views of one buffer, but each its own span
    assert all(torch.equal(loaded[k], torch.from_numpy(v)) for k, v in _mixed().items() if k != changed)


def test_unaligned_spans_are_copied_out(tmp_path: Path) -> None:
    """A hand-made file whose header length leaves the F32 data at an odd offset still loads exactly."""
    torch = pytest.importorskip("torch")
    a = (np.arange(3 * 7, dtype=np.float32) / 9).reshape(3, 7)
    b = (np.arange(5 * 3, dtype=np.float32) / 5).reshape(5, 3)
    keys = {"base_model.model.q.lora_A.weight": a, "base_model.model.q.lora_B.weight": b}
    header = {"base_model.model.q.lora_A.weight": {"dtype": "F32", "shape": [3, 7], "data_offsets": [0, 84]},
              "base_model.model.q.lora_B.weight": {"dtype": "F32", "shape": [5, 3], "data_offsets": [84, 144]}}
    text = json.dumps(header).encode()
    text += b" " * ((1 - len(text)) % 4)  # 8 + len(text) is 1 modulo 4
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(
        struct.pack("<Q", len(text)) + text + a.tobytes() + b.tobytes())
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 3, "target_modules": ["q"]}))
    loaded = adapterspec.read_adapter(folder).load_tensors("pt")
    for key, value in keys.items():
        assert torch.equal(loaded[key], torch.from_numpy(value))


@pytest.mark.skipif(not hasattr(os, "preadv"), reason="parts are read with os.preadv")
def test_a_large_file_is_read_in_parts_on_threads_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts of at least _PART_BYTES, one per CPU: shrunk here, so that the small file is read in four parts."""
    monkeypatch.setattr(_safetensors, "_PART_BYTES", 100)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    reads: list[tuple[threading.Thread, int]] = []
    preadv = os.preadv

    def counted(fd: int, buffers: list[Any], offset: int) -> int:
        reads.append((threading.current_thread(), offset))  # kept: no id reused
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counted)
    adapterspec.write_adapter(tmp_path / "a", CONFIG, _mixed())
    loaded = adapterspec.read_adapter(tmp_path / "a").load_tensors("numpy")
    assert sorted(loaded) == sorted(_mixed())
    assert all(np.array_equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in _mixed().items())
    size = (tmp_path / "a" / "adapter_model.safetensors").stat().st_size
    assert [offset for _, offset in sorted(reads, key=lambda r: r[1])] == [i * -(-size // 4) for i in range(4)]
    assert len({thread for thread, _ in reads}) == 4  # the caller's thread and three others

    path = tmp_path / "a" / "adapter_model.safetensors"
    buffer = np.zeros(size + 50, np.uint8)  # the file is shorter than the read expects: its last part ends early
    with open(path, "rb", buffering=0) as file, pytest.raises(adapterspec.FileFormatError, match="the file ended after"):
        _safetensors._read_into(file, buffer, path)
    assert not [t for t in threading.enumerate() if t.name == "adapterspec-read-part"]  # all ended


def test_a_file_changed_after_reading_is_refused(tmp_path: Path) -> None:
    adapterspec.write_adapter(tmp_path / "a", CONFIG, _mixed())
    adapter = adapterspec.read_adapter(tmp_path / "a")
    other = _mixed()
    other["base_model.model.layers.0.q.lora_A.weight"] = np.zeros((3, 8), np.float32)  # another shape
    np_save_file(other, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(adapterspec.FileFormatError, match=r"replaced or changed since the adapter was read"):
        adapter.load_tensors("numpy")
    renamed = {k.replace(".q.", ".k."): v for k, v in _mixed().items()}  # same size, another header
    adapterspec.write_adapter(tmp_path / "b", {**CONFIG, "target_modules": ["k", "v"]}, renamed)
    shutil.copyfile(tmp_path / "b" / "adapter_model.safetensors", tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(adapterspec.FileFormatError, match=r"replaced or changed since the adapter was read"):
        adapter.load_tensors("numpy")
    path = tmp_path / "a" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    adapter.prefetch()  # only advice: the error surfaces where the tensors are asked for
    with pytest.raises(adapterspec.FileFormatError, match=r"replaced or changed since the adapter was read"):
        adapter.load_tensors("numpy")


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_checksum_hashed_while_writing_is_the_spec_checksum(tmp_path: Path, framework: str) -> None:
    tensors: dict = _mixed()
    if framework == "torch":
        torch = pytest.importorskip("torch")
        tensors = {k: torch.from_numpy(v) for k, v in tensors.items()}
        tensors["base_model.model.layers.0.v.lora_A.weight"] = tensors["base_model.model.layers.0.v.lora_A.weight"].to(
            torch.bfloat16)  # no NumPy dtype: hashed through a byte view
    assert _safetensors._byte_views(tensors) is not None
    adapterspec.write_adapter(tmp_path / "a", CONFIG, tensors)
    path = tmp_path / "a" / "adapter_model.safetensors"
    with safe_open(str(path), "numpy") as f:
        recorded = f.metadata()["adapterspec_sha256"]
    expected = _mixed()
    if framework == "torch":
        key = "base_model.model.layers.0.v.lora_A.weight"
        expected[key] = tensors[key].view(torch.int16).numpy()  # bf16's bytes
    assert recorded == _spec_sha256(expected) == _safetensors.sha256_of_file(path)
    assert adapterspec.read_adapter(tmp_path / "a", verify=True).verify_checksum()


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_our_writer_writes_what_safetensors_reads(tmp_path: Path, framework: str) -> None:
    """save_file writes CPU tensors itself (safetensors' writer holds the GIL, so the checksum could not
    overlap it): safetensors must read back every tensor, dtype and metadata entry exactly, offsets aligned."""
    import ml_dtypes

    arrays = {
        "b.f64": np.arange(6, dtype=np.float64).reshape(2, 3) / 7,
        "a.f16": (np.arange(5) / 3).astype(np.float16),  # odd byte count before wider dtypes would misalign
        "c.bf16": (np.arange(8) / 5 - 1).astype(ml_dtypes.bfloat16).reshape(2, 2, 2),
        "d.i64": np.arange(-3, 3, dtype=np.int64), "e.i32": np.arange(4, dtype=np.int32) * 7,
        "f.i16": np.arange(3, dtype=np.int16) - 1, "g.i8": np.arange(3, dtype=np.int8),
        "h.u8": np.arange(9, dtype=np.uint8).reshape(3, 3), "i.bool": np.array([True, False, True]),
        "j.scalar": np.array(2.5, dtype=np.float32), "k.empty": np.zeros((0, 4), np.float32),
        "l.ünï": np.arange(3, dtype=np.float32) + 0.25, "m.f32": np.arange(12, dtype=np.float32).reshape(3, 4) / 11,
    }
    tensors: dict = arrays
    if framework == "torch":
        torch = pytest.importorskip("torch")
        tensors = {k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) if k == "c.bf16" else torch.from_numpy(v)
                   for k, v in arrays.items()}
    metadata = {"format": "pt", "note": 'a "quoted" value with ' + "0" * 64, "adapterspec_sha256x": "y"}
    path = tmp_path / "x.safetensors"
    digest = _safetensors.save_file(tensors, path, metadata)
    with safe_open(str(path), "numpy") as f:
        assert f.metadata() == {**metadata, "adapterspec_sha256": digest}
        assert sorted(f.keys()) == sorted(arrays)
        for key, value in arrays.items():
            got = f.get_tensor(key)
            assert got.dtype == value.dtype and got.shape == value.shape and np.array_equal(got, value), key
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8 : 8 + n])
    assert n % 8 == 0 and all(entry["data_offsets"][0] % np.dtype(arrays[key].dtype).itemsize == 0
                              for key, entry in header.items() if key != "__metadata__")
    assert digest == _spec_sha256(arrays) == _safetensors.sha256_of_file(path)


@pytest.mark.parametrize("old", ["longer", "shorter", "empty"])
def test_our_writer_over_an_existing_file_leaves_exactly_the_new_one(tmp_path: Path, old: str) -> None:
    """The writer opens without O_TRUNC (ext4 flushes a file truncated to zero at close): what an older file held
    beyond the new one's end must be cut, byte for byte the file a fresh write gives."""
    tensors = {"m.f32": np.arange(12, dtype=np.float32).reshape(3, 4) / 11, "a.f16": (np.arange(5) / 3).astype(np.float16)}
    fresh = tmp_path / "fresh.safetensors"
    _safetensors.save_file(tensors, fresh, {"format": "pt"})
    path = tmp_path / "x.safetensors"
    size = {"longer": fresh.stat().st_size * 3 + 5, "shorter": 7, "empty": 0}[old]
    path.write_bytes(bytes(range(256)) * (size // 256) + b"\xff" * (size % 256))
    _safetensors.save_file(tensors, path, {"format": "pt"})
    assert path.read_bytes() == fresh.read_bytes()
    with safe_open(str(path), "numpy") as f:
        assert sorted(f.keys()) == ["a.f16", "m.f32"] and np.array_equal(f.get_tensor("m.f32"), tensors["m.f32"])


def test_checksum_from_the_file_when_tensors_are_not_in_cpu_memory(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_safetensors, "_byte_views", lambda tensors: None)
    adapterspec.write_adapter(tmp_path / "a", CONFIG, _mixed())
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "numpy") as f:
        assert f.metadata()["adapterspec_sha256"] == _spec_sha256(_mixed())


def test_views_of_one_storage_are_saved_without_copies_and_overlaps_are_copied() -> None:
    torch = pytest.importorskip("torch")
    flat = torch.arange(40, dtype=torch.float32)
    tensors = {"a": flat[:12].view(3, 4), "b": flat[12:24].view(3, 4), "c": flat[20:32].view(3, 4)}
    savable = folder_module._savable(tensors)
    assert savable["a"].data_ptr() == flat.data_ptr()  # side by side: kept as views
    assert savable["b"].untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    assert savable["c"].untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()  # overlaps b: copied
    assert all(torch.equal(savable[k], tensors[k]) for k in tensors)


def test_loaded_adapter_saves_again_exactly(tmp_path: Path) -> None:
    """Tensors loaded as views of one buffer go back to a file byte-identical in data and checksum."""
    torch = pytest.importorskip("torch")
    adapterspec.write_adapter(tmp_path / "a", CONFIG, _mixed())
    loaded = adapterspec.read_adapter(tmp_path / "a").load_tensors("pt")
    adapterspec.write_adapter(tmp_path / "b", CONFIG, loaded)
    a = adapterspec.read_adapter(tmp_path / "a", verify=True)
    b = adapterspec.read_adapter(tmp_path / "b", verify=True)
    assert a.metadata["adapterspec_sha256"] == b.metadata["adapterspec_sha256"]
    assert all(torch.equal(v, b.load_tensors("pt")[k]) for k, v in loaded.items())


def test_overwrite_removes_the_old_adapter(tmp_path: Path) -> None:
    adapterspec.write_adapter(tmp_path / "a", CONFIG, _mixed())
    new = {k: v * 2 for k, v in _mixed().items()}
    adapterspec.write_adapter(tmp_path / "a", CONFIG, new, overwrite=True)
    folder_module.wait_for_removals()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    loaded = adapterspec.read_adapter(tmp_path / "a", verify=True).load_tensors()
    assert all(np.array_equal(loaded[k], v) for k, v in new.items())


@pytest.mark.parametrize("durable", [False, True])
def test_durable_fsyncs_every_file_before_it_appears(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     durable: bool) -> None:
    import os
    import stat

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        synced.append("dir" if stat.S_ISDIR(mode) else os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1])
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    adapterspec.write_adapter(tmp_path / "a", CONFIG, _mixed(), durable=durable)
    files = sorted(name for name in synced if name != "dir")
    assert files == (["adapter_config.json", "adapter_model.safetensors"] if durable else [])
    assert synced.count("dir") == (2 if durable else 0)  # the staging folder, then the parent after the rename
    assert adapterspec.read_adapter(tmp_path / "a", verify=True).verify_checksum()


def test_prefetch_reads_on_a_thread_and_the_load_takes_that_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    adapterspec.write_adapter(tmp_path / "a", CONFIG, _mixed())
    assert adapterspec.read_adapter(tmp_path / "a")._prefetched is None
    real_read_into, release, reader = _safetensors._read_into, threading.Event(), []

    def held_read_into(*args):  # the read waits until the caller has gone on: it cannot be on the caller's thread
        reader.append(threading.current_thread().name)
        assert release.wait(10)
        return real_read_into(*args)

    monkeypatch.setattr(_safetensors, "_read_into", held_read_into)
    adapter = adapterspec.read_adapter(tmp_path / "a", prefetch=True)
    release.set()
    monkeypatch.setattr(_safetensors, "read_buffer", lambda *a: pytest.fail("read again"))
    loaded = adapter.load_tensors()
    assert reader == ["adapterspec-read"]
    assert loaded.keys() == _mixed().keys()
    assert all(loaded[k].dtype == v.dtype and np.array_equal(loaded[k], v) for k, v in _mixed().items())
    monkeypatch.undo()
    again = adapter.load_tensors()  # the prefetched read is taken once; the next load reads anew
    assert all(np.array_equal(again[k], v) for k, v in _mixed().items())
    assert not np.shares_memory(again["base_model.model.layers.0.q.lora_A.weight"],
                                loaded["base_model.model.layers.0.q.lora_A.weight"])


def test_a_failed_prefetched_read_is_raised_by_load_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapterspec.write_adapter(tmp_path / "a", CONFIG, _mixed())

    def broken(file, buffer, path):
        raise _safetensors._unreadable(path, OSError(5, "Input/output error"))

    monkeypatch.setattr(_safetensors, "_read_into", broken)
    adapter = adapterspec.read_adapter(tmp_path / "a", prefetch=True)  # the thread fails; nothing raised yet
    with pytest.raises(adapterspec.FileFormatError, match="cannot read tensors: .*Input/output error"):
        adapter.load_tensors()


def test_prefetched_torch_tensors_go_to_the_device_asked_for_and_load_adapter_prefetches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    adapterspec.write_adapter(tmp_path / "a", CONFIG, _mixed())
    adapter = adapterspec.read_adapter(tmp_path / "a", prefetch=True)
    on_meta = adapter.load_tensors("pt", device="meta")
    assert {k: (t.device.type, tuple(t.shape)) for k, t in on_meta.items()} == \
        {k: ("meta", v.shape) for k, v in _mixed().items()}
    started = []
    real = _safetensors.read_buffer_in_background
    monkeypatch.setattr(_safetensors, "read_buffer_in_background", lambda *a, **k: started.append(a) or real(*a, **k))
    monkeypatch.setattr(_safetensors, "read_buffer", lambda *a: pytest.fail("read on the caller's thread"))
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([
        torch.nn.ModuleDict({"q": torch.nn.Linear(7, 5), "v": torch.nn.Linear(7, 5)}),
        torch.nn.ModuleDict({"q": torch.nn.Linear(7, 5)})]).double()})
    adapterspec.load_adapter(model, tmp_path / "a")
    assert len(started) == 1
    q = model["layers"][0]["q"]
    assert torch.equal(q.adapter_weights["default"].lora_A_weight,
                       torch.from_numpy(_mixed()["base_model.model.layers.0.q.lora_A.weight"]).double())


def test_config_validation_is_memoised_by_content_and_errors_are_not(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterspec import config as config_module

    calls = []
    real = config_module.config_errors
    monkeypatch.setattr(config_module, "config_errors", lambda data, **kw: calls.append(1) or real(data, **kw))
    monkeypatch.setattr(config_module, "_VALID", {})
    good = {"peft_type": "LORA", "r": 5, "target_modules": ["q"]}
    adapterspec.AdapterConfig.from_dict(good)
    adapterspec.AdapterConfig.from_dict(dict(reversed(list(good.items()))))  # same content, other key order
    assert len(calls) == 1
    for _ in range(2):  # an invalid config is checked (and refused) every time
        with pytest.raises(adapterspec.ConfigError, match="/r"):
            adapterspec.AdapterConfig.from_dict({**good, "r": "five"})
    assert len(calls) == 3
    monkeypatch.setattr(config_module, "_VALID_SIZE", 2)
    for r in (1, 2, 3):
        adapterspec.AdapterConfig.from_dict({**good, "r": r})
    assert len(config_module._VALID) == 2  # bounded


def test_read_adapter_can_leave_the_tensor_checks_to_the_caller(tmp_path: Path) -> None:
    adapterspec.write_adapter(tmp_path / "a", CONFIG, _mixed())
    assert adapterspec.read_adapter(tmp_path / "a").tensors_checked
    adapter = adapterspec.read_adapter(tmp_path / "a", check_tensors=False)
    assert not adapter.tensors_checked
    adapter.check_tensors()
    assert adapter.tensors_checked
    # a rank that disagrees with the config: refused now by default, later by check_tensors()
    bad = {**_mixed(), "base_model.model.layers.0.q.lora_A.weight": np.arange(4 * 7, dtype=np.float32).reshape(4, 7)}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(CONFIG))
    np_save_file(bad, str(tmp_path / "bad" / "adapter_model.safetensors"))
    with pytest.raises(adapterspec.ShapeMismatchError, match="rank 4 disagrees") as now:
        adapterspec.read_adapter(tmp_path / "bad")
    later = adapterspec.read_adapter(tmp_path / "bad", check_tensors=False)
    with pytest.raises(adapterspec.ShapeMismatchError) as deferred:
        later.check_tensors()
    assert str(deferred.value) == str(now.value)  # the same error, naming the file


@pytest.mark.parametrize("change", ["auxiliary tensor", "modules_to_save", "bias", "integer dtype", "not a method key"])
def test_tensors_the_injected_adapter_cannot_check_are_checked_at_once(tmp_path: Path, change: str) -> None:
    config, tensors = dict(CONFIG), dict(_mixed())
    if change == "auxiliary tensor":
        config["bias"] = "lora_only"
        tensors["base_model.model.layers.0.q.base_layer.bias"] = np.arange(5, dtype=np.float32)
    elif change == "modules_to_save":
        config["modules_to_save"] = ["head"]
        tensors["base_model.model.head.weight"] = np.arange(6, dtype=np.float32).reshape(2, 3)
    elif change == "bias":
        config["bias"] = "all"
    elif change == "integer dtype":
        tensors["base_model.model.layers.0.q.lora_B.bias"] = np.arange(5, dtype=np.int32)
    else:
        tensors["base_model.model.layers.0.q.lora_C.weight"] = np.arange(6, dtype=np.float32).reshape(2, 3)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    np_save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    try:
        adapter = adapterspec.read_adapter(tmp_path / "a", check_tensors=False)
    except adapterspec.AdapterSpecError:
        assert change in ("integer dtype", "not a method key")  # refused at once, as without check_tensors=False
        return
    assert adapter.tensors_checked


def test_load_adapter_checks_tensors_a_lax_backend_let_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend's load_state must refuse tensors it has no place for; if one does not, load_adapter still
    refuses a tensor of a module the backend did not adapt (the spec's checks run then)."""
    torch = pytest.importorskip("torch")
    import adapterspec_torch.state

    model = torch.nn.ModuleDict({"q": torch.nn.Linear(7, 5), "v": torch.nn.Linear(7, 5)})
    tensors = {k.replace("layers.0.", ""): v.astype(np.float32) for k, v in _mixed().items() if "layers.0." in k}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**CONFIG, "target_modules": ["q"]}))
    np_save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))  # v's tensors: not targeted
    monkeypatch.setattr(adapterspec_torch.state, "load_state", lambda *args, **kwargs: [])  # lax: takes anything
    with pytest.raises(adapterspec.UnexpectedTensorError, match="module 'v' is not targeted by the config"):
        adapterspec.load_adapter(model, tmp_path / "a")
    assert adapterspec.adapter_names(model) == [] and type(model["q"]) is torch.nn.Linear


def test_load_and_delete_leave_the_garbage_collector_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The collector is process-wide: a load that paused it paused it for every other thread (4 threads
    loading in a loop kept it off 99% of the time). It stays as the caller has it, on or off."""
    import gc

    torch = pytest.importorskip("torch")
    import adapterspec_torch.inject
    import adapterspec_torch.state

    seen = []
    real_load, real_remove = adapterspec_torch.state.load_state, adapterspec_torch.inject.remove_adapter_modules
    monkeypatch.setattr(adapterspec_torch.state, "load_state",
                        lambda *args, **kwargs: seen.append(gc.isenabled()) or real_load(*args, **kwargs))
    monkeypatch.setattr(adapterspec_torch.inject, "remove_adapter_modules",
                        lambda *args, **kwargs: seen.append(gc.isenabled()) or real_remove(*args, **kwargs))
    model = torch.nn.ModuleDict({"q": torch.nn.Linear(7, 5)})
    tensors = {k.replace("layers.0.", ""): v.astype(np.float32) for k, v in _mixed().items() if "layers.0.q" in k}
    adapterspec.write_adapter(tmp_path / "a", {**CONFIG, "target_modules": ["q"]}, tensors)
    assert gc.isenabled()
    adapterspec.load_adapter(model, tmp_path / "a")
    adapterspec.delete_adapter(model, "default")
    assert seen == [True, True] and gc.isenabled()
    gc.disable()  # the caller's choice is kept
    try:
        adapterspec.load_adapter(model, tmp_path / "a")
        adapterspec.delete_adapter(model, "default")
        assert seen[2:] == [False, False] and not gc.isenabled()
    finally:
        gc.enable()


def test_configs_that_target_alike_share_their_matches_and_others_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterspec import config as config_module

    monkeypatch.setattr(config_module, "_SHARED_MATCHES", {})
    calls: list[str] = []
    real = config_module.Targeting.matches
    monkeypatch.setattr(config_module.Targeting, "matches", lambda self, path: calls.append(path) or real(self, path))
    paths = ["model.layers.0.q", "model.layers.0.v", "model.layers.1.q", "model.layers.1.k"]
    base = {"peft_type": "LORA", "target_modules": ["q", "v"], "layers_to_transform": [0]}
    first = adapterspec.AdapterConfig.from_dict({**base, "r": 4})
    second = adapterspec.AdapterConfig.from_dict({**base, "r": 8, "lora_alpha": 3})  # other fields, same targeting
    assert [first.matches(p) for p in paths] == [True, True, False, False]
    assert [second.matches(p) for p in paths] == [True, True, False, False]
    assert calls == paths  # the second config asked nothing again
    for field, value, expected in (("target_modules", ["k"], [False, False, False, False]),
                                   ("layers_to_transform", [1], [False, False, True, False]),
                                   ("exclude_modules", ["model.layers.0.v"], [True, False, False, False]),
                                   ("modules_to_save", ["q"], [False, True, False, False]),
                                   ("layers_pattern", "nothing", [False, False, False, False])):
        other = adapterspec.AdapterConfig.from_dict({**base, field: value})
        assert [other.matches(p) for p in paths] == expected, field
    hand_made = adapterspec.AdapterConfig({**base, "target_modules": {"q"}})  # not JSON: a memo of its own
    shared = len(config_module._SHARED_MATCHES)
    assert hand_made.matches("model.layers.0.q") and len(config_module._SHARED_MATCHES) == shared


def test_the_shared_matches_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterspec import config as config_module

    monkeypatch.setattr(config_module, "_SHARED_MATCHES", {})
    for i in range(config_module._MAX_SHARED + 10):
        assert adapterspec.AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": [f"m{i}"]}).matches(f"m{i}")
    assert len(config_module._SHARED_MATCHES) == config_module._MAX_SHARED
    assert not any("m0" in key for key in config_module._SHARED_MATCHES)  # the oldest went first


def test_a_load_keeps_no_prefetched_read_the_backend_did_not_take(tmp_path: Path) -> None:
    """On the meta device the backend reads nothing; after a failed load nothing is read either: the buffer goes."""
    torch = pytest.importorskip("torch")
    adapterspec.write_adapter(tmp_path / "a", CONFIG, _mixed())
    adapter = adapterspec.read_adapter(tmp_path / "a")

    def model(device: str):
        with torch.device(device):
            return torch.nn.ModuleDict({"layers": torch.nn.ModuleList([
                torch.nn.ModuleDict({"q": torch.nn.Linear(7, 5), "v": torch.nn.Linear(7, 5)}),
                torch.nn.ModuleDict({"q": torch.nn.Linear(7, 5)})])})

    on_meta = model("meta")
    adapterspec.load_adapter(on_meta, adapter)
    assert adapter._prefetched is None
    assert on_meta["layers"][0]["q"].adapter_weights["default"].lora_A_weight.is_meta
    with pytest.raises(adapterspec.AdapterExistsError):
        adapterspec.load_adapter(on_meta, adapter)
    assert adapter._prefetched is None


def test_inject_leaves_the_garbage_collector_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The collector is process-wide: pausing it for an inject stalled other threads' collections (issue #14.12)."""
    import gc

    torch = pytest.importorskip("torch")
    from adapterspec import api

    seen = []
    real = api._call

    def call(hook: str, *args: Any, **kwargs: Any) -> Any:
        if hook == "adapterspec_inject":
            seen.append(gc.isenabled())
        return real(hook, *args, **kwargs)

    monkeypatch.setattr(api, "_call", call)
    model = torch.nn.ModuleDict({"q": torch.nn.Linear(7, 5)})
    assert gc.isenabled()
    assert adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "target_modules": ["q"]}) == ["q"]
    assert seen == [True] and gc.isenabled()
