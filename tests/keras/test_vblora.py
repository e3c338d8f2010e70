"""VB-LoRA (SPEC.md 17.1) on Keras: not implemented yet, so refused typed with the model unchanged.

The spec makes VB-LoRA portable and the torch backend computes it (tests/torch/test_vblora.py); the keras backend
refuses a PEFT VB-LoRA folder of either saved form, and a new VB-LoRA adapter, with an UnsupportedError naming the
module and saying PEFT and the torch backend load it -- never a partial or approximate load.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from adapterspec.errors import UnsupportedError  # noqa: E402
from keras_helpers import assert_refused_unchanged, hf_model, keras_model  # noqa: E402

FIELDS = dict(r=2, num_vectors=8, vector_length=16, topk=2, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.mark.parametrize("topk_only", [False, True], ids=["logits", "topk"])
def test_a_peft_folder_is_refused_unchanged(topk_only: bool, checkpoints: Any, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(hf_model(checkpoints["llama"]),
                                        peft.VBLoRAConfig(**FIELDS, save_only_topk_weights=topk_only))
        reference.save_pretrained(str(tmp_path))
    assert adapterspec.validate_adapter(tmp_path) == []
    model = keras_model("llama", checkpoints["llama"])
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, tmp_path), UnsupportedError,
                             "not implemented on Keras")


def test_a_new_adapter_is_refused_unchanged(checkpoints: Any) -> None:
    model = keras_model("llama", checkpoints["llama"])
    config = {"peft_type": "VBLORA", **FIELDS}
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(model, config), UnsupportedError,
                             "the torch backend")
