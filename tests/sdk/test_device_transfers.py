"""Tensors to and from a GPU in one transfer: a load copies all of a file's tensor bytes to the device
at once (tensors are views of that copy), a save gathers them and copies them back at once.

On the CPU the transfer itself is stood in for (a copy into another storage), so that the offsets,
dtypes, alignment and the one-copy rule are checked here; tests marked ``gpu`` run the real thing
and compare it bit for bit with the plain path.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import adapterspec  # noqa: E402
from adapterspec import _safetensors  # noqa: E402

CONFIG = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "target_modules": ["q", "v"], "lora_bias": True}


def _mixed() -> dict[str, Any]:
    """Element-unique values in four dtypes (bf16 has no NumPy dtype), so that the file is not in key order."""
    out = {}
    for i, module in enumerate(("layers.0.q", "layers.0.v", "layers.1.q", "layers.1.v")):
        dtype = (torch.float32, torch.float16, torch.float64, torch.bfloat16)[i]
        prefix = f"base_model.model.{module}."
        out[prefix + "lora_A.weight"] = (torch.arange(3 * 7) / 31 + i).to(dtype).reshape(3, 7)
        out[prefix + "lora_B.weight"] = (torch.arange(5 * 3) / 17 - i).to(dtype).reshape(5, 3)
        out[prefix + "lora_B.bias"] = (torch.arange(5) / 7 + 2 * i).to(dtype)
    return out


def _write(folder: Path) -> dict[str, Any]:
    tensors = _mixed()
    adapterspec.write_adapter(folder, CONFIG, tensors)
    return tensors


@pytest.fixture
def transfers(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Stand in for the host->device copy: a copy into new memory, recorded."""
    seen: list[Any] = []

    def to_device(data: Any, device: Any, path: Any) -> Any:
        seen.append((data, device))
        return data.clone()

    monkeypatch.setattr(_safetensors, "_to_device", to_device)
    return seen


@pytest.mark.parametrize("prefetch", [False, True], ids=["read", "prefetched"])
def test_tensors_for_a_device_are_views_of_one_copy_of_their_bytes(tmp_path: Path, transfers: list[Any],
                                                                    prefetch: bool) -> None:
    tensors = _write(tmp_path / "a")
    adapter = adapterspec.read_adapter(tmp_path / "a", prefetch=prefetch)
    loaded = adapter.load_tensors("pt", device="cuda:0")
    assert len(transfers) == 1
    data, device = transfers[0]
    assert device == "cuda:0"
    header = adapter._file_header()
    assert data.numel() == header.size - len(header.raw)  # the tensor bytes, not the header
    storages = {t.untyped_storage().data_ptr() for t in loaded.values()}
    assert len(storages) == 1 and storages != {data.untyped_storage().data_ptr()}  # all views of the copy
    assert sorted(loaded) == sorted(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape and loaded[key].is_contiguous()
        assert torch.equal(loaded[key], value), key


def test_spans_unaligned_on_the_device_are_copied_out(tmp_path: Path, transfers: list[Any]) -> None:
    """A hand-made file with an F32 tensor 6 bytes into the data (after an F16 one): exact all the same."""
    h = torch.arange(3, dtype=torch.float16) / 3
    a = (torch.arange(3 * 7, dtype=torch.float32) / 9).reshape(3, 7)
    keys = {"base_model.model.q.lora_B.weight": h.reshape(1, 3), "base_model.model.q.lora_A.weight": a}
    header = {"base_model.model.q.lora_B.weight": {"dtype": "F16", "shape": [1, 3], "data_offsets": [0, 6]},
              "base_model.model.q.lora_A.weight": {"dtype": "F32", "shape": [3, 7], "data_offsets": [6, 90]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(
        struct.pack("<Q", len(text)) + text + h.numpy().tobytes() + a.numpy().tobytes())
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 3, "target_modules": ["q"]}))
    loaded = adapterspec.read_adapter(folder).load_tensors("pt", device="cuda")
    assert len(transfers) == 1
    for key, value in keys.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    assert loaded["base_model.model.q.lora_A.weight"].data_ptr() % 4 == 0


def test_the_cpu_and_the_meta_device_take_no_transfer(tmp_path: Path, transfers: list[Any]) -> None:
    tensors = _write(tmp_path / "a")
    adapter = adapterspec.read_adapter(tmp_path / "a")
    assert all(torch.equal(adapter.load_tensors("pt")[k], v) for k, v in tensors.items())
    assert transfers == []
    on_meta = adapterspec.read_adapter(tmp_path / "a").load_tensors("pt", device="meta")
    assert {k: (t.device.type, t.dtype, t.shape) for k, t in on_meta.items()} == \
        {k: ("meta", v.dtype, v.shape) for k, v in tensors.items()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "nonsense"])
def test_a_device_torch_cannot_use_is_refused_naming_it(tmp_path: Path, device: str) -> None:
    _write(tmp_path / "a")
    with pytest.raises(adapterspec.UnsupportedError, match=f"cannot copy the tensors to device '{device}'") as info:
        adapterspec.read_adapter(tmp_path / "a").load_tensors("pt", device=device)
    assert info.value.path and info.value.path.endswith("adapter_model.safetensors")


def test_a_gather_is_one_copy_into_one_host_buffer_in_checksum_order() -> None:
    tensors = {**_mixed(), "z.empty": torch.zeros(0, 4, dtype=torch.bfloat16), "a.scalar": torch.tensor(2.5),
               "m.strided": (torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7).T}
    sizes: list[int] = []

    def allocate(size: int) -> Any:
        sizes.append(size)
        return np.full(size, 0xAB, dtype=np.uint8)  # not zeros: every byte must be written

    views = _safetensors._gather(tensors, allocate)
    assert sizes == [sum(t.numel() * t.element_size() for t in tensors.values())]
    assert list(views) == sorted(tensors, key=lambda k: k.encode())
    base = views["a.scalar"].base
    assert all(v.base is base for v in views.values())  # views of the one buffer
    for key, value in tensors.items():
        assert views[key].tobytes() == value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), key


def test_tensors_in_cpu_memory_or_on_several_devices_are_not_gathered() -> None:
    tensors = _mixed()
    assert _safetensors._gathered_byte_views(tensors) is None
    assert _safetensors._gathered_byte_views({k: v.to("meta") for k, v in tensors.items()}) is None
    assert _safetensors._gathered_byte_views({"a": np.zeros(3, np.float32)}) is None
    assert _safetensors._gathered_byte_views({}) is None


# -- on a real GPU --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [False, True], ids=["read", "prefetched"])
def test_cuda_load_is_one_transfer_bit_identical_to_the_plain_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   prefetch: bool) -> None:
    tensors = _write(tmp_path / "a")
    seen = []
    real = _safetensors._to_device
    monkeypatch.setattr(_safetensors, "_to_device", lambda data, device, path: seen.append(data.is_pinned()) or
                        real(data, device, path))
    loaded = adapterspec.read_adapter(tmp_path / "a", prefetch=prefetch).load_tensors("pt", device="cuda")
    assert seen == [not prefetch]  # read into pinned memory when this read is the load's own
    assert len({t.untyped_storage().data_ptr() for t in loaded.values()}) == 1
    plain = adapterspec.read_adapter(tmp_path / "a").load_tensors("pt")
    for key, value in tensors.items():
        assert loaded[key].is_cuda and loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key].cpu(), value) and torch.equal(loaded[key].cpu(), plain[key]), key


@pytest.mark.gpu
def test_cuda_save_is_one_transfer_and_writes_the_file_a_cpu_save_writes(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = _mixed()
    on_gpu = {k: v.cuda() for k, v in tensors.items()}
    gathers = []
    real = _safetensors._gather
    monkeypatch.setattr(_safetensors, "_gather", lambda t, allocate: gathers.append(len(t)) or real(t, allocate))
    monkeypatch.setattr(torch.Tensor, "cpu", lambda *a, **k: pytest.fail("a copy per tensor"))
    adapterspec.write_adapter(tmp_path / "gpu", CONFIG, on_gpu)
    monkeypatch.undo()
    adapterspec.write_adapter(tmp_path / "cpu", CONFIG, tensors)
    assert gathers == [len(tensors)]
    name = "adapter_model.safetensors"
    assert (tmp_path / "gpu" / name).read_bytes() == (tmp_path / "cpu" / name).read_bytes()
    assert adapterspec.read_adapter(tmp_path / "gpu", verify=True).verify_checksum()


@pytest.mark.gpu
def test_cuda_model_loads_and_saves_its_adapter_bit_for_bit(tmp_path: Path) -> None:
    """A model on the GPU: its adapter's parameters are the file's values, and saving writes them back exactly."""
    layers = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([
        torch.nn.ModuleDict({"q": torch.nn.Linear(7, 5), "v": torch.nn.Linear(7, 5)}) for _ in range(2)])})
    tensors = _mixed()
    layers = layers.cuda()
    adapterspec.write_adapter(tmp_path / "a", CONFIG, tensors)
    adapterspec.load_adapter(layers, tmp_path / "a")
    from adapterspec_torch.state import expected_params

    params = expected_params(layers, "default")
    assert all(p.is_cuda for p in params.values())
    for key, value in tensors.items():
        assert torch.equal(params[key].cpu(), value.float()), key
    adapterspec.save_adapter(layers, tmp_path / "b")
    saved = adapterspec.read_adapter(tmp_path / "b", verify=True).load_tensors("pt")
    assert all(torch.equal(saved[k], params[k].cpu()) for k in tensors)


def _linears() -> Any:
    return torch.nn.ModuleDict({"layers": torch.nn.ModuleList([
        torch.nn.ModuleDict({"q": torch.nn.Linear(7, 5), "v": torch.nn.Linear(7, 5)}) for _ in range(2)])})


def test_load_adapter_reads_the_file_into_the_buffer_the_backend_gives(tmp_path: Path) -> None:
    """The optional hook ``adapterspec_read_buffer``: asked for the file's size before the layers are injected,
    its buffer is the one read (a CPU model's tensors are views of it)."""
    from adapterspec import hookimpl
    from adapterspec.plugins import get_plugin_manager

    tensors = {k: v.float() for k, v in _mixed().items()}
    adapterspec.write_adapter(tmp_path / "a", CONFIG, tensors)
    model = _linears()
    given: list[Any] = []

    class Staging:
        @hookimpl
        def adapterspec_read_buffer(self, model: Any, nbytes: int, options: Any) -> Any:
            assert adapterspec.adapter_names(model) == []  # before injection
            given.append(np.empty(nbytes, dtype=np.uint8))
            return given[-1]

    pm = get_plugin_manager()
    pm.register(Staging(), name="staging")
    try:
        adapterspec.load_adapter(model, tmp_path / "a")
    finally:
        pm.unregister(name="staging")
    assert [g.nbytes for g in given] == [(tmp_path / "a" / "adapter_model.safetensors").stat().st_size]
    from adapterspec_torch.state import expected_params

    start = given[0].ctypes.data
    for key, param in expected_params(model, "default").items():
        assert start <= param.data_ptr() < start + given[0].nbytes, key
        assert torch.equal(param, tensors[key]), key


@pytest.mark.gpu
def test_cuda_model_load_reads_into_pinned_memory_and_copies_once(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = {k: v.float() for k, v in _mixed().items()}
    adapterspec.write_adapter(tmp_path / "a", CONFIG, tensors)
    model = _linears().cuda()
    seen = []
    real = _safetensors._to_device
    monkeypatch.setattr(_safetensors, "_to_device", lambda data, device, path: seen.append(data.is_pinned()) or
                        real(data, device, path))
    adapterspec.load_adapter(model, tmp_path / "a")
    assert seen == [True]
    from adapterspec_torch.state import expected_params

    params = expected_params(model, "default")
    assert len({p.untyped_storage().data_ptr() for p in params.values()}) == 1
    assert all(p.is_cuda and torch.equal(p.cpu(), tensors[k]) for k, p in params.items())
