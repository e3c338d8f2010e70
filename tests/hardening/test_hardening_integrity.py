"""The sha256 of the tensor data in the safetensors metadata (SPEC: over each tensor's raw bytes, in
ascending UTF-8 key order): written by ``write_adapter``, checked by ``validate_adapter`` and
``read_adapter(verify=True)``; files without one (PEFT's) still validate.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from hardening_harness import LORA_CONFIG, lora_tensors
from hardening_harness import STATS

import adapterspec
from adapterspec.spec import METADATA_SHA256, SAFETENSORS_NAME

pytestmark = pytest.mark.filterwarnings("ignore::adapterspec.AdapterSpecWarning")


def _independent_sha256(path: Path) -> tuple[str, dict]:
    """The spec's checksum, computed here from the bytes without adapterspec's code."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    digest = hashlib.sha256()
    for key in sorted((k for k in header if k != "__metadata__"), key=lambda k: k.encode("utf-8")):
        begin, end = header[key]["data_offsets"]
        digest.update(data[begin:end])
    return digest.hexdigest(), header


def test_written_checksum_follows_the_spec(tmp_path: Path) -> None:
    # keys whose UTF-8 order differs from insertion order and from str order of mixed case
    values = {**lora_tensors(), "base_model.model.l.0.\u00e9.lora_A.weight": np.full((2, 3), 0.5, np.float32),
              "base_model.model.l.0.\u00e9.lora_B.weight": np.linspace(0, 1, 8, dtype=np.float32).reshape(4, 2),
              "base_model.model.l.0.Z.lora_A.weight": np.linspace(1, 2, 6, dtype=np.float32).reshape(2, 3),
              "base_model.model.l.0.Z.lora_B.weight": np.linspace(2, 3, 8, dtype=np.float32).reshape(4, 2)}
    folder = adapterspec.write_adapter(tmp_path / "a", {**LORA_CONFIG, "target_modules": ["q", "v", "\u00e9", "Z"]}, values)
    expected, header = _independent_sha256(folder / SAFETENSORS_NAME)
    assert header["__metadata__"][METADATA_SHA256] == expected
    assert adapterspec.read_adapter(folder).verify_checksum() is True


def test_one_flipped_data_byte_is_reported(tmp_path: Path, good_adapter: Path) -> None:
    """Every single data byte: validate_adapter reports an IntegrityError naming the file."""
    folder = Path(shutil.copytree(good_adapter, tmp_path / "a"))
    weights = folder / SAFETENSORS_NAME
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    for at in range(8 + n, len(raw)):
        tampered = bytearray(raw)
        tampered[at] ^= 0x01  # the smallest change: the low bit of a mantissa
        weights.write_bytes(bytes(tampered))
        problems = adapterspec.validate_adapter(folder)
        integrity = [p for p in problems if isinstance(p, adapterspec.IntegrityError)]
        assert integrity, f"byte {at}: {problems}"
        assert str(weights) in str(integrity[0]) and "sha256" in str(integrity[0])
        with pytest.raises(adapterspec.IntegrityError):
            adapterspec.read_adapter(folder, verify=True)
        adapterspec.read_adapter(folder)  # without verify only the header is read (documented)
        STATS.count("integrity")
    weights.write_bytes(raw)
    assert adapterspec.validate_adapter(folder) == []


@pytest.mark.parametrize("recorded", ["0" * 64, "A" * 64, "xyz", "", "0" * 63, "0" * 65])
def test_a_forged_checksum_is_refused(tmp_path: Path, good_adapter: Path, recorded: str) -> None:
    """Rewrite the header with another recorded value (same data): never accepted as verified."""
    folder = Path(shutil.copytree(good_adapter, tmp_path / "a"))
    weights = folder / SAFETENSORS_NAME
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"][METADATA_SHA256] = recorded
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    weights.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    problems = adapterspec.validate_adapter(folder)
    assert problems and isinstance(problems[0], adapterspec.FileFormatError) and str(weights) in str(problems[0])
    STATS.count("integrity")


def test_peft_written_adapter_without_checksum_validates(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = torch.nn.Linear(3, 4)
            self.v = torch.nn.Linear(3, 4)

        def forward(self, x):  # type: ignore[no-untyped-def]
            return self.q(x) + self.v(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], init_lora_weights=False))
        model.save_pretrained(tmp_path / "peft")
    folder = tmp_path / "peft"
    _, header = _independent_sha256(folder / SAFETENSORS_NAME)
    assert METADATA_SHA256 not in header.get("__metadata__", {}), "PEFT wrote no checksum"
    assert adapterspec.validate_adapter(folder) == []
    adapter = adapterspec.read_adapter(folder, verify=True)
    assert adapter.verify_checksum() is False  # nothing to verify, and that is not an error
    # round trip: written back by adapterspec, it gains the checksum, and PEFT still loads it
    out = adapterspec.write_adapter(tmp_path / "ours", adapter.config, adapter.load_tensors("numpy"))
    expected, header = _independent_sha256(out / SAFETENSORS_NAME)
    assert header["__metadata__"][METADATA_SHA256] == expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(Tiny(), str(out))
    state = {k: v for k, v in again.state_dict().items() if "lora_" in k}
    assert len(state) == 4
    for key, value in adapter.load_tensors("pt").items():
        module = key.removeprefix("base_model.model.").rsplit(".", 2)[0]
        param = key.rsplit(".", 2)[1]
        assert torch.equal(state[f"base_model.model.{module}.{param}.default.weight"], value)
