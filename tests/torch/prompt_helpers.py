"""Round trips of prefix/prompt/P-tuning adapters between PEFT and adapterspec, both directions."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch_helpers import assert_close, fresh, logits, peft_reference

import adapterspec


def peft_loads(base: nn.Module, folder: Path, caplog: pytest.LogCaptureFixture) -> tuple[nn.Module, list[str]]:
    """``PeftModel.from_pretrained`` of ``folder`` over a copy of ``base``, and every warning it gave."""
    from peft import PeftModel

    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(fresh(base), str(folder)).eval()
    said = sorted({str(w.message) for w in caught} |
                  {r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING})
    return loaded, said


def round_trip(base: nn.Module, config: Any, inputs: dict[str, Any], tmp_path: Path,
               caplog: pytest.LogCaptureFixture, *, atol: float | None = None) -> dict[str, float]:
    """PEFT saves ``config`` (element-unique weights); ours loads the folder and must give PEFT's outputs
    (the in-memory PEFT model and PEFT's reload of its folder); ours saves it again: the same tensors and
    config; PEFT loads our folder with no more warnings than its own and gives the same outputs.

    :returns: the measured max abs differences (ours vs PEFT in memory, ours vs PEFT's reload, PEFT on
        our folder vs PEFT on its own), for the report.
    """
    reference = peft_reference(base, config, tmp_path / "peft")
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "peft")
    expected = logits(reference, inputs)
    ours = logits(model, inputs)
    plain = logits(base, inputs)
    assert (expected[:, -plain.shape[1]:] - plain).abs().max() > 1e-3  # the adapter changes the outputs
    assert_close(ours, expected, atol)
    reloaded_peft, said_peft = peft_loads(base, tmp_path / "peft", caplog)
    assert_close(ours, logits(reloaded_peft, inputs), atol)

    adapterspec.save_adapter(model, tmp_path / "ours")
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(saved[key], tensor), key
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: v for k, v in ours_config.items() if k in peft_config} == peft_config

    reloaded_ours, said_ours = peft_loads(base, tmp_path / "ours", caplog)
    assert said_ours == said_peft
    from peft.utils import get_peft_model_state_dict

    theirs_state, ours_state = get_peft_model_state_dict(reloaded_peft), get_peft_model_state_dict(reloaded_ours)
    assert sorted(theirs_state) == sorted(ours_state)
    for key, tensor in theirs_state.items():
        assert torch.equal(ours_state[key], tensor), key
    peft_on_ours = logits(reloaded_ours, inputs)
    assert_close(peft_on_ours, expected, atol)
    return {"ours_vs_peft": (ours - expected).abs().max().item(),
            "ours_vs_peft_reload": (ours - logits(reloaded_peft, inputs)).abs().max().item(),
            "peft_on_ours_vs_peft": (peft_on_ours - expected).abs().max().item()}
