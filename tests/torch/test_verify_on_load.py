"""What a load checks of the tensor data (README "What a load checks"): a bit flip in an intact-looking file
loads as it is by default, and is refused with verify=True, the model left as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import adapterspec
from adapterspec.errors import IntegrityError
from adapterspec.folder import write_adapter

A = np.arange(1, 9, dtype=np.float32).reshape(2, 4) / 8
B = np.arange(1, 7, dtype=np.float32).reshape(3, 2) / 4


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 3)


def flipped_folder(tmp_path: Path) -> Path:
    folder = write_adapter(tmp_path / "lora", {"peft_type": "LORA", "target_modules": ["q"], "r": 2},
                           {"base_model.model.q.lora_A.weight": A, "base_model.model.q.lora_B.weight": B})
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of lora_B's last value (little endian: its exponent's low bit and the sign)
    weights.write_bytes(bytes(data))
    return folder


def test_bit_flip_loads_without_verify(tmp_path: Path) -> None:
    model = Tiny()
    adapterspec.load_adapter(model, flipped_folder(tmp_path))
    tensors = adapterspec.extract_adapter(model).arrays or {}
    values = np.asarray(torch.as_tensor(tensors["base_model.model.q.lora_B.weight"]).detach())
    assert values.flat[-1] != B.flat[-1] and np.array_equal(values.flat[:-1], B.flat[:-1])
    np.testing.assert_array_equal(np.asarray(torch.as_tensor(tensors["base_model.model.q.lora_A.weight"])), A)


def test_bit_flip_is_refused_with_verify(tmp_path: Path) -> None:
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IntegrityError, match="sha256"):
        adapterspec.load_adapter(model, flipped_folder(tmp_path), verify=True)
    assert adapterspec.adapter_names(model) == []
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
