"""The forward pass of one plain LoRA on a Linear: its term is added into the base output by one ``addmm_``,
with PEFT's values and gradients; hooks, autocast, mixed dtypes and training dropout take the general path."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from adapterspec_torch.state import expected_params  # noqa: E402
from torch_helpers import assert_close, unique_values  # noqa: E402

IN, OUT, RANK = 12, 10, 3


class Holder(torch.nn.Module):
    def __init__(self, base: Any) -> None:
        super().__init__()
        self.proj = base

    def forward(self, x: Any) -> Any:
        return self.proj(x)


def _pair(*, dropout: float = 0.0, conv1d: bool = False, trainable: bool = False,
          dtype: Any = None) -> tuple[Any, Any]:
    """adapterspec's and PEFT's LoRA (r=3, alpha=7: a scale that is no power of two) on copies of one layer,
    with the same element-unique A and B."""
    from peft import LoraConfig, get_peft_model

    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(OUT, IN)
    else:
        base = torch.nn.Linear(IN, OUT)
    with torch.no_grad():
        for i, p in enumerate(base.parameters()):
            p.copy_(unique_values(tuple(p.shape), 50 + i))
    ours = Holder(copy.deepcopy(base)).requires_grad_(False)
    adapterspec.inject_adapter(ours, {"peft_type": "LORA", "r": RANK, "lora_alpha": 7, "target_modules": ["proj"],
                                      "lora_dropout": dropout, "fan_in_fan_out": conv1d},
                               trainable=trainable, dtype=dtype)
    a, b = unique_values((RANK, IN), 1, scale=0.3), unique_values((OUT, RANK), 2, scale=0.3)
    with torch.no_grad():
        params = expected_params(ours, "default")
        params["base_model.model.proj.lora_A.weight"].copy_(a)
        params["base_model.model.proj.lora_B.weight"].copy_(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(Holder(copy.deepcopy(base)), LoraConfig(
            r=RANK, lora_alpha=7, target_modules=["proj"], lora_dropout=dropout, fan_in_fan_out=conv1d))
    layer = theirs.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    if not trainable:
        theirs.requires_grad_(False)
    return ours, theirs


@pytest.fixture
def addmm_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []
    real = torch.Tensor.addmm_

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("alpha"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "addmm_", spy)
    return calls


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d_hf"])
def test_one_plain_lora_is_added_in_place_with_peft_values(addmm_calls: list[Any], conv1d: bool) -> None:
    ours, theirs = _pair(conv1d=conv1d)
    x = unique_values((2, 5, IN), 7, scale=1.0)
    with torch.no_grad():
        expected = theirs(x)
        got = ours(x)
    assert addmm_calls == [7 / RANK]
    assert got.shape == expected.shape == (2, 5, OUT)
    assert_close(got, expected, atol=1e-6)  # one rounding less than PEFT's three: fp32 ulps
    with torch.inference_mode():
        assert_close(ours(x[0]), theirs(x[0]), atol=1e-6)  # 2-D input too


def test_gradients_through_the_in_place_add_are_peft_gradients(addmm_calls: list[Any]) -> None:
    ours, theirs = _pair(trainable=True)
    ours.train()
    theirs.train()
    weight = unique_values((2, 5, OUT), 9, scale=1.0)
    grads = []
    for model in (ours, theirs):
        x = unique_values((2, 5, IN), 7, scale=1.0).requires_grad_(True)
        (model(x) * weight).sum().backward()
        a, b = (p for name, p in sorted(model.named_parameters()) if p.requires_grad)
        grads.append((x.grad, a.grad, b.grad))
    assert len(addmm_calls) == 1
    for mine, peft_grad in zip(*grads):
        assert_close(mine, peft_grad, atol=1e-5)


def test_a_hook_on_the_base_layer_sees_the_base_output(addmm_calls: list[Any]) -> None:
    ours, _ = _pair()
    base = ours.proj.base_layer
    x = unique_values((4, IN), 3, scale=1.0)
    seen = []
    handle = base.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        with torch.no_grad():
            out = ours(x)
            plain = torch.nn.functional.linear(x, base.weight, base.bias)
    finally:
        handle.remove()
    assert addmm_calls == []
    assert torch.equal(seen[0], plain) and not torch.equal(out, plain)


@pytest.mark.parametrize("where", ["module", "module-pre", "global", "global-pre"])
def test_a_full_backward_hook_gets_peft_gradients(where: str, addmm_calls: list[Any]) -> None:
    """A full backward hook makes the base output a view autograd may not change in place: the general path
    runs, and the hook and the gradients are PEFT's (the in-place add raised a RuntimeError in backward)."""
    ours, theirs = _pair(trainable=True)
    weight = unique_values((2, 5, OUT), 9, scale=1.0)
    results = []
    for model in (ours, theirs):
        base = model.proj.base_layer
        seen: list[Any] = []
        handle = {
            "module": lambda: base.register_full_backward_hook(lambda m, gi, go: seen.append(go[0])),
            "module-pre": lambda: base.register_full_backward_pre_hook(lambda m, go: seen.append(go[0])),
            "global": lambda: torch.nn.modules.module.register_module_full_backward_hook(
                lambda m, gi, go: seen.append(go[0]) if m is base else None),
            "global-pre": lambda: torch.nn.modules.module.register_module_full_backward_pre_hook(
                lambda m, go: seen.append(go[0]) if m is base else None),
        }[where]()
        try:
            x = unique_values((2, 5, IN), 7, scale=1.0).requires_grad_(True)
            (model(x) * weight).sum().backward()
        finally:
            handle.remove()
        a, b = (p for name, p in sorted(model.named_parameters()) if p.requires_grad)
        results.append((seen[0], x.grad, a.grad, b.grad))
    assert addmm_calls == []
    for mine, peft_value in zip(*results):
        assert_close(mine, peft_value, atol=1e-5)


def test_autocast_takes_the_general_path_in_the_autocast_dtype(addmm_calls: list[Any]) -> None:
    ours, theirs = _pair()
    x = unique_values((4, IN), 3, scale=1.0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = ours(x), theirs(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert_close(got.float(), expected.float(), atol=0)
    assert addmm_calls == []


def test_an_adapter_in_another_dtype_takes_the_general_path(addmm_calls: list[Any]) -> None:
    ours, theirs = _pair(dtype=torch.float64)
    x = unique_values((4, IN), 3, scale=1.0)
    with torch.no_grad():
        got = ours(x)
        base = ours.proj.base_layer
        a, b = (expected_params(ours, "default")[f"base_model.model.proj.lora_{n}.weight"] for n in "AB")
        expected = (base(x) + (x.double() @ a.T @ b.T) * (7 / RANK)).float()
    assert got.dtype == torch.float32 and addmm_calls == []
    assert_close(got, expected, atol=1e-6)


def test_dropout_while_training_is_peft_dropout(addmm_calls: list[Any]) -> None:
    ours, theirs = _pair(dropout=0.5)
    ours.train()
    theirs.train()
    x = unique_values((4, IN), 3, scale=1.0)
    outs = []
    for model in (ours, theirs):
        torch.manual_seed(5)
        with torch.no_grad():
            outs.append(model(x))
    assert_close(outs[0], outs[1], atol=1e-6)
    assert addmm_calls == []
    ours.eval()
    with torch.no_grad():
        evaluated = ours(x)
    assert addmm_calls == [7 / RANK]  # no dropout when evaluating: the in-place add
    assert not torch.allclose(evaluated, outs[0])


@pytest.mark.gpu
def test_cuda_bf16_in_place_add_has_peft_values_and_gradients(addmm_calls: list[Any]) -> None:
    ours, theirs = _pair(trainable=True)
    reference = copy.deepcopy(ours).double()  # the exact values, to size bf16's rounding
    ours.to("cuda", torch.bfloat16).train()
    theirs.to("cuda", torch.bfloat16).train()
    weight = unique_values((2, 5, OUT), 9, scale=1.0)
    results = []
    for model, device, dtype in ((ours, "cuda", torch.bfloat16), (theirs, "cuda", torch.bfloat16),
                                 (reference.train(), "cpu", torch.float64)):
        x = unique_values((2, 5, IN), 7, scale=1.0).to(device, dtype).requires_grad_(True)
        out = model(x)
        (out * weight.to(device, dtype)).sum().backward()
        a, b = (p for name, p in sorted(model.named_parameters()) if p.requires_grad)
        results.append([t.detach().double().cpu() for t in (out, x.grad, a.grad, b.grad)])
    assert addmm_calls[0] == 7 / RANK  # the CUDA bf16 call took the in-place add
    mine, peft_values, exact = results
    for got, theirs_value, truth in zip(mine, peft_values, exact):
        # bf16 keeps 8 bits; sums of rounded products (the gradients of A and B) lose a few more: PEFT's
        # error on this case is 0.6-2.9% of the largest value, ours 0.6-2.3% (CPU bf16)
        bound = 2.0 ** -5 * truth.abs().max().item()
        assert_close(got, truth, atol=bound)
        assert_close(theirs_value, truth, atol=bound)
