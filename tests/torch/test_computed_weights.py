"""Merging into a layer whose weight is computed at each forward (``adapterspec_torch.computed``): weight
normalisation (``torch.nn.utils.parametrizations.weight_norm`` and the older ``torch.nn.utils.weight_norm`` hook, as
Wav2Vec2's and HuBERT's ``pos_conv_embed.conv``) is merged exactly, through ``g`` and ``v``; spectral normalisation
and parametrizations without an exact inverse are refused, the model unchanged.

The bug this guards: ``layer.weight`` of such a layer is recomputed from the stored tensors, so a merge that added
into it in place changed a throwaway tensor; the adapter was marked merged and skipped, and the merged output was the
base's (LoRA's effect, 5.84 on the probe's conv, lost; every method; ``unload(merge=True)`` returned the base).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from adapterspec.errors import UnsupportedError  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import parametrizations, parametrize  # noqa: E402
from torch_helpers import assert_close, fill_adapter_weights, snapshot, unique_values  # noqa: E402


def _old_weight_norm(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation of the hook
        return torch.nn.utils.weight_norm(module)


def _old_spectral_norm(module: nn.Module) -> nn.Module:
    return torch.nn.utils.spectral_norm(module)


class _Doubled(nn.Module):
    """A parametrization without an exact inverse known to adapterspec (its right_inverse halves)."""

    def forward(self, weight: Any) -> Any:
        return weight * 2

    def right_inverse(self, weight: Any) -> Any:
        return weight / 2


def _doubled(module: nn.Module) -> nn.Module:
    parametrize.register_parametrization(module, "weight", _Doubled())
    return module


WEIGHT_NORMS = {"parametrizations.weight_norm": lambda m: parametrizations.weight_norm(m, dim=0),
                "weight_norm-hook": _old_weight_norm}
NO_EXACT_WRITE = {"parametrizations.spectral_norm": (parametrizations.spectral_norm, "spectral_norm"),
                  "spectral_norm-hook": (_old_spectral_norm, "spectral_norm"),
                  "unknown-parametrization": (_doubled, "_Doubled")}


X = unique_values((2, 4, 5, 5), 9, scale=1.0)


class _Net(nn.Module):
    """A Conv2d and a Linear, both wrapped (weight-normed, spectral-normed...)."""

    def __init__(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        super().__init__()
        self.c = wrap(nn.Conv2d(4, 6, 3, padding=1))
        self.l = wrap(nn.Linear(6, 5))

    def forward(self, x: Any) -> Any:
        return self.l(self.c(x).mean((2, 3)))


def _maker(wrap: Callable[[nn.Module], nn.Module], *, run: bool = True) -> Callable[[], nn.Module]:
    """Fresh copies of one base (the old hooks' modules cannot be deep-copied: torch refuses).

    :param run: run the base once after setting its values, as a model that has computed anything has: the old
        hooks set ``weight`` before each forward only, so until then it holds the values of construction (PEFT's
        BOFT conv reads that attribute without calling the layer).
    """
    def make() -> nn.Module:
        torch.manual_seed(0)
        net = _Net(wrap)
        with torch.no_grad():
            for index, (_, param) in enumerate(sorted(net.named_parameters())):
                param.copy_(unique_values(tuple(param.shape), 40 + index, scale=0.4))
            if run:
                net.eval()(X)
        return net.eval()
    return make


def _fill(model: nn.Module) -> None:
    """Element-unique adapter tensors far from their start (BOFT's too), so every method's effect is large."""
    fill_adapter_weights(model, scale=0.3)
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(model.named_parameters())):
            if "boft_s" in name:
                param.copy_(unique_values(tuple(param.shape), index, around=1.0, scale=0.3))
            elif "boft_R" in name:
                param.copy_(unique_values(tuple(param.shape), index, scale=0.3))
            elif "hada_" in name:  # a product of four factors: larger ones, for an effect of LoRA's size
                param.mul_(2.0)


CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c", "l"]),
    "dora": lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c", "l"], use_dora=True),
    "loha": lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["c", "l"]),
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=["c", "l"]),
    "ia3": lambda: peft.IA3Config(target_modules=["c", "l"], feedforward_modules=["l"]),
    "boft": lambda: peft.BOFTConfig(boft_block_size=2, target_modules=["c", "l"]),
}

def _saved(make: Callable[[], nn.Module], config: Any, folder: Path) -> Any:
    """PEFT's adapter of ``config`` saved to ``folder``; PEFT's unmerged output of it (loaded on a fresh base)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = peft.get_peft_model(make(), config)
        _fill(trained)
        trained.save_pretrained(str(folder))
        loaded = peft.PeftModel.from_pretrained(make(), str(folder)).eval()
    with torch.no_grad():
        return loaded(X)


def _run(model: nn.Module) -> Any:
    with torch.no_grad():
        return model(X)


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("norm", list(WEIGHT_NORMS))
def test_merge_into_a_weight_normed_layer_is_exact(norm: str, method: str, tmp_path: Path) -> None:
    """Unmerged = PEFT's unmerged; merged = unmerged (it was the base's: effect lost), the layer still weight-normed;
    unmerged again = unmerged; ``unload(merge=True)`` = unmerged (it was the base's)."""
    make = _maker(WEIGHT_NORMS[norm])
    expected = _saved(make, CONFIGS[method](), tmp_path)
    base_out = _run(make())
    assert (expected - base_out).abs().max() > 0.05  # the adapter's effect: what a lost merge loses
    model = make()
    adapterspec.load_adapter(model, tmp_path)
    unmerged = _run(model)
    assert_close(unmerged, expected, length=36)
    adapterspec.merge_adapters(model)
    assert_close(_run(model), unmerged, length=36)
    adapterspec.unmerge_adapters(model)
    assert_close(_run(model), unmerged, length=36)
    adapterspec.merge_adapters(model)
    adapterspec.unmerge_adapters(model)
    adapterspec.merge_adapters(model)
    assert_close(_run(model), unmerged, length=36)

    plain = make()
    adapterspec.load_adapter(plain, tmp_path)
    plain = adapterspec.unload(plain, merge=True)
    assert adapterspec.adapter_names(plain) == []
    assert_close(_run(plain), unmerged, length=36)
    if norm == "parametrizations.weight_norm":
        assert parametrize.is_parametrized(plain.c, "weight") and parametrize.is_parametrized(plain.l, "weight")
    else:
        assert {"weight_g", "weight_v"} <= set(plain.c._parameters) and "weight" not in plain.c._parameters


@pytest.mark.parametrize("method", ["lora", "ia3", "boft"])
@pytest.mark.parametrize("norm", list(NO_EXACT_WRITE))
def test_merge_into_a_weight_without_exact_write_is_refused(norm: str, method: str, tmp_path: Path) -> None:
    """Spectral norm (W / sigma(W)) and an unknown parametrization: no stored value recomputes to W + dW. Merge and
    ``unload(merge=True)`` are refused naming the module and what computes its weight; nothing changes, and the
    adapter keeps running unmerged (as PEFT's unmerged)."""
    wrap, needle = NO_EXACT_WRITE[norm]
    make = _maker(wrap)
    expected = _saved(make, CONFIGS[method](), tmp_path)
    model = make()
    adapterspec.load_adapter(model, tmp_path)
    unmerged = _run(model)
    assert_close(unmerged, expected, length=36)
    before = snapshot(model)
    for call in (lambda: adapterspec.merge_adapters(model), lambda: adapterspec.unload(model, merge=True)):
        with pytest.raises(UnsupportedError) as info:
            call()
        assert info.value.key == "c" and needle in info.value.message, info.value
        assert "keep the adapter unmerged" in (info.value.hint or "")
        after = snapshot(model)
        assert after["modules"] == before["modules"] and after["adapters"] == before["adapters"]
        for key, value in before["state"].items():
            assert torch.equal(after["state"][key], value), key
        assert torch.equal(_run(model), unmerged)


def test_a_module_saved_whole_with_a_weight_norm_runs_and_unloads_as_peft(tmp_path: Path) -> None:
    """modules_to_save of a weight-normed conv: the copy keeps its parametrization (PEFT's tensor names), runs as
    PEFT's, and ``unload(merge=True)`` keeps the copy."""
    make = _maker(WEIGHT_NORMS["parametrizations.weight_norm"])
    expected = _saved(make, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["l"], modules_to_save=["c"]), tmp_path)
    model = make()
    adapterspec.load_adapter(model, tmp_path)
    assert_close(_run(model), expected, length=36)
    model = adapterspec.unload(model, merge=True)
    assert_close(_run(model), expected, length=36)
    assert parametrize.is_parametrized(model.c, "weight")


def test_boft_on_a_conv_reads_the_weight_the_hook_computes(tmp_path: Path) -> None:
    """BOFT's unmerged conv builds its rotated kernel from the base weight without calling the layer, so the old
    weight-norm hook never sets it: it read the attribute left from construction (0.027 off the model's own weight,
    as PEFT 0.21 does); it reads the weight the hook computes from ``weight_g``/``weight_v`` now."""
    make = _maker(WEIGHT_NORMS["weight_norm-hook"])
    expected = _saved(make, CONFIGS["boft"](), tmp_path)
    stale = _maker(WEIGHT_NORMS["weight_norm-hook"], run=False)()
    adapterspec.load_adapter(stale, tmp_path)
    assert_close(_run(stale), expected, length=36)


def test_a_module_saved_whole_with_the_old_weight_norm_hook_is_copied(tmp_path: Path) -> None:
    """modules_to_save of a module under the old weight-norm hook: torch cannot deep-copy the weight that hook left
    from a forward with gradients (a raw RuntimeError 'Only Tensors created explicitly by the user...'; PEFT fails the
    same way). The copy is made without it (its next forward computes it): the adapter runs as PEFT's on a module the
    hook has run in eval mode."""
    make = _maker(WEIGHT_NORMS["weight_norm-hook"])
    expected = _saved(make, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["l"], modules_to_save=["c"]), tmp_path)
    model = _maker(WEIGHT_NORMS["weight_norm-hook"], run=False)()
    model(X)  # with gradients on: the hook's weight is no leaf
    adapterspec.load_adapter(model, tmp_path)
    assert_close(_run(model), expected, length=36)
    model = adapterspec.unload(model, merge=True)
    assert_close(_run(model), expected, length=36)
    assert {"weight_g", "weight_v"} <= set(model.c._parameters)
