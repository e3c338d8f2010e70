"""A new adapter on a float16/bfloat16 base starts from PEFT 0.21.2's values (SPEC.md 7.5): PEFT casts the fresh
tensors to the base layer's dtype and ``autocast_adapter_dtype`` back to float32, so its start values are the draws
rounded to the base's dtype. Same seed: every tensor and the logits equal PEFT's, atol 0."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from torch_helpers import fresh  # noqa: E402

T = ["q_proj", "v_proj"]
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("LORA", dict(r=4, init_lora_weights=False, target_modules=T)),
    "lora-embedding": ("LORA", dict(r=4, init_lora_weights=False, target_modules=["embed_tokens"])),
    "dora": ("LORA", dict(r=4, init_lora_weights=False, use_dora=True, target_modules=T)),
    "loha": ("LOHA", dict(r=4, init_weights=False, target_modules=T)),
    "lokr": ("LOKR", dict(r=4, init_weights=False, target_modules=T)),
    "ia3": ("IA3", dict(init_ia3_weights=False, target_modules=["q_proj", "down_proj"],
                        feedforward_modules=["down_proj"])),
    "vera": ("VERA", dict(r=4, init_weights=False, target_modules=T)),
    "oft": ("OFT", dict(r=0, oft_block_size=8, init_weights=False, target_modules=T)),
    "boft": ("BOFT", dict(boft_block_size=8, init_weights=False, target_modules=T)),
    "road": ("ROAD", dict(init_weights=False, group_size=8, target_modules=T)),
    "miss": ("MISS", dict(r=4, init_weights=False, target_modules=T)),
    "hra": ("HRA", dict(r=4, init_weights=False, target_modules=T)),
    "vblora": ("VBLORA", dict(r=4, num_vectors=16, vector_length=8, target_modules=T)),
    "gralora": ("GRALORA", dict(r=4, gralora_k=2, hybrid_r=2, init_weights=False, target_modules=T)),
    "delora": ("DELORA", dict(r=4, init_weights=False, target_modules=T)),
    "c3a": ("C3A", dict(block_size=16, init_weights="xavier_uniform", target_modules=T)),
}


#: float16 too for these (PEFT's DoRA computes B @ A in float32 there, then rounds it to float16)
FLOAT16 = ("lora", "dora", "gralora", "c3a")


def _both(base: Any, peft_type: str, fields: dict[str, Any]) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    from peft import get_peft_model
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(fresh(base), PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](**fields)).eval()
    torch.manual_seed(5)
    model = fresh(base)
    adapterspec.inject_adapter(model, {"peft_type": peft_type, **fields}, "default")
    ours = adapterspec.extract_adapter(model, "default").load_tensors("pt")
    return reference, model, get_peft_model_state_dict(reference, save_embedding_layers=False), ours


@pytest.mark.parametrize(("dtype", "case"), [("bfloat16", c) for c in CASES] + [("float16", c) for c in FLOAT16])
def test_new_adapter_on_half_base_starts_from_peft_values(dtype: str, case: str, llama: Any,
                                                          token_inputs: dict[str, Any]) -> None:
    reference, model, theirs, ours = _both(fresh(llama).to(getattr(torch, dtype)), *CASES[case])
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype == torch.float32, key
        assert torch.equal(ours[key], tensor), key
    with torch.no_grad():
        assert torch.equal(model(**token_inputs).logits, reference(**token_inputs).logits)


class _Conv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: Any) -> Any:
        return self.head(self.conv(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("use_dora", [False, True])
def test_new_conv_lora_on_bfloat16_base_starts_from_peft_values(use_dora: bool) -> None:
    torch.manual_seed(0)
    base = _Conv().eval().to(torch.bfloat16)
    fields = dict(r=4, init_lora_weights=False, use_dora=use_dora, target_modules=["conv"])
    reference, model, theirs, ours = _both(base, "LORA", fields)
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


#: LoRA's inits that reset A and B after the layers' constructors drew (PEFT's update_layer always builds
#: nn.Linear / nn.ConvNd or torch.randn pairs, then reset_lora_parameters draws again unless init is false)
RESET_INITS: dict[str, dict[str, Any]] = {
    "default": dict(r=4, target_modules=T),
    "gaussian": dict(r=4, init_lora_weights="gaussian", target_modules=T),
    "dora-default": dict(r=4, use_dora=True, target_modules=T),
    "bias-default": dict(r=4, lora_bias=True, target_modules=T),
    "embedding-default": dict(r=4, target_modules=["embed_tokens"]),
}


@pytest.mark.parametrize("case", sorted(RESET_INITS))
def test_new_lora_with_a_reset_init_starts_from_peft_values(case: str, llama: Any) -> None:
    """float32 too: a default LoRA's lora_A was one kaiming draw where PEFT's is the third (its nn.Linear pair's
    constructors draw first): 0.25 apart under one seed, gaussian 1.1 (training from there is not PEFT's run)."""
    reference, model, theirs, ours = _both(fresh(llama), "LORA", RESET_INITS[case])
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key
    conv = _Conv().eval()
    reference, model, theirs, ours = _both(conv, "LORA", dict(r=4, target_modules=["conv"], **(
        {"use_dora": True} if "dora" in case else {})))
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("init", [False, None])
def test_new_trainable_tokens_with_random_rows_start_from_peft_values(dtype: str, init: Any, llama: Any) -> None:
    """The TRAINABLE_TOKENS method with init_weights false (or null: PEFT's truth test) starts from torch.randn rows
    drawn in the weight's dtype, as PEFT's; ours had copied the current rows (the identity start of init true):
    2.8 apart under one seed, and the logits of the chosen tokens differed."""
    fields = dict(token_indices=[1, 5, 9], init_weights=init, target_modules=["embed_tokens"])
    reference, model, theirs, ours = _both(fresh(llama).to(getattr(torch, dtype)), "TRAINABLE_TOKENS", fields)
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key
    ids = torch.tensor([[1, 2, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
