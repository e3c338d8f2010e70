"""SPEC 4.1 (1.2): the null booleans of RoAd, MiSS and HRA act as PEFT 0.21.2 reads them, on torch: a new adapter
with a null ``init_weights`` starts where PEFT's does (RoAd: ``is False``, so the identity; MiSS and HRA: a truth
test, so PEFT's random start, drawn bit for bit), and HRA's null ``apply_GS`` loads as false. Also SPEC 17.3's
refusal of ``apply_GS`` with ``r`` above a layer's input features (the model unchanged)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import adapterspec  # noqa: E402
from adapterspec.errors import UnsupportedError  # noqa: E402
from torch_helpers import assert_same_snapshot, fresh, snapshot  # noqa: E402

CONFIGS = {
    "ROAD": {"peft_type": "ROAD", "variant": "road_2", "group_size": 8, "target_modules": ["q_proj", "v_proj"]},
    "MISS": {"peft_type": "MISS", "r": 4, "target_modules": ["q_proj", "v_proj"]},
    "HRA": {"peft_type": "HRA", "r": 4, "apply_GS": None, "target_modules": ["q_proj", "v_proj"]},
    "DELORA": {"peft_type": "DELORA", "r": 4, "target_modules": ["q_proj", "v_proj"]},  # SPEC 17.6: 'is True'
}


def _peft(base: Any, config: dict[str, Any]) -> Any:
    from peft import PeftConfig, get_peft_model
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls: type[PeftConfig] = PEFT_TYPE_TO_CONFIG_MAPPING[config["peft_type"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(fresh(base), cls(**{k: v for k, v in config.items() if k != "peft_type"}))


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_null_init_weights_starts_where_peft_starts(llama: Any, method: str) -> None:
    from peft.utils import get_peft_model_state_dict

    config = CONFIGS[method] | {"init_weights": None}
    torch.manual_seed(7)
    reference = _peft(llama, config)
    torch.manual_seed(7)
    model = fresh(llama)
    adapterspec.inject_adapter(model, config, "default")
    mine = adapterspec.extract_adapter(model, "default").load_tensors("pt")
    theirs = get_peft_model_state_dict(reference)
    assert sorted(mine) == sorted(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(mine[key], tensor), key
    if method == "ROAD":  # null is not False: PEFT's identity start
        assert all(torch.all(t == (1 if k.endswith("road_alpha") else 0)) for k, t in theirs.items())
    else:  # null is falsy: PEFT's random start, not zeros / paired columns
        assert all(t.abs().max() > 0 for t in theirs.values())


def test_hra_gram_schmidt_beyond_the_input_features_is_refused_unchanged(llama: Any, tmp_path: Path) -> None:
    """q_proj has 64 input features: apply_GS with r 65 has no defined result (SPEC 17.3), refused naming /r."""
    features = llama.model.layers[0].self_attn.q_proj.in_features
    config = {"peft_type": "HRA", "r": features + 1, "apply_GS": True, "init_weights": False,
              "target_modules": ["q_proj"]}
    model = fresh(llama)
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as info:
        adapterspec.inject_adapter(model, config, "default")
    assert info.value.pointer == "/r"
    assert_same_snapshot(model, before)
    ok = fresh(llama)
    adapterspec.inject_adapter(ok, config | {"r": features}, "default")  # r = F: a full basis, defined
