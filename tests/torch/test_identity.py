"""The torch base fingerprint (``adapterspec_torch.identity``) against SPEC.md 9.1's recipe, for weights in any layout."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import adapterspec  # noqa: E402
from adapterspec.identity import fingerprint, sample_indices  # noqa: E402
from adapterspec_torch.identity import base_identity  # noqa: E402

LORA = {"peft_type": "LORA", "r": 2, "target_modules": ["0", "2"]}


def _model(weights: list[torch.Tensor]) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(12, 11), torch.nn.ReLU(), torch.nn.Linear(11, 12))
    for index, weight in zip((0, 2), weights):
        model[index].weight = torch.nn.Parameter(weight)
    return model


def _recipe(weights: list[torch.Tensor]) -> str:
    """SPEC.md 9.1 from the values alone (row-major over the logical [out, in] shape), through NumPy."""
    out = {}
    for path, weight in zip(("0", "2"), weights):
        values = weight.detach().float().contiguous().numpy().ravel()
        out[path] = (tuple(weight.shape), values[sample_indices(values.size)])
    return fingerprint(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed view"])
def test_fingerprint_follows_the_logical_layout(dtype: torch.dtype, layout: str) -> None:
    """A weight that is a transposed view (strides not row-major) is sampled by its logical indices, as a
    contiguous one; every dtype gives the recipe's value. Element-unique values: a stride mix-up changes it."""
    weights = [torch.sin(torch.arange(132, dtype=torch.float64) * 0.37 + k).reshape(shape).to(dtype)
               for k, shape in ((0, (11, 12)), (1, (12, 11)))]
    if layout == "transposed view":
        weights = [w.T.contiguous().T for w in weights]
        assert not any(w.is_contiguous() for w in weights)
    model = _model(weights)
    adapterspec.inject_adapter(model, LORA)
    expected = _recipe(weights)
    assert base_identity(model, "default")["fingerprint"] == expected
    assert 3 * 11 + 4 in sample_indices(132)
    with torch.no_grad():
        model[2].weight[3, 4] += 0.5  # a sampled element: the fingerprint must change
    assert base_identity(model, "default")["fingerprint"] != expected
