"""Which adapters may run together on one layer (SPEC.md 8.9): the one rule both backends ask, in both orders."""

from __future__ import annotations

import re

import pytest

from adapterspec._mix import SAVED_WHOLE, TOKEN_ROWS, Running, mix_refusal

LORA, DORA = Running("l", "LORA"), Running("d", "LORA", dora=True)
LOHA, LOKR, ADALORA, VERA = Running("h", "LOHA"), Running("k", "LOKR"), Running("a", "ADALORA"), Running("v", "VERA")
IA3, IA3_B = Running("i", "IA3"), Running("j", "IA3")
OFT, BOFT = Running("o", "OFT"), Running("b", "BOFT")
VBLORA, VBLORA_B = Running("vb", "VBLORA"), Running("vc", "VBLORA")  # SPEC.md 17.4: an added term, as VeRA
DELORA, DELORA_B = Running("de", "DELORA"), Running("df", "DELORA")  # SPEC.md 17.6: an added term too
BEFT, BEFT_B = Running("be", "BEFT"), Running("bf", "BEFT")  # SPEC.md 17.8: an added bias


@pytest.mark.parametrize(("first", "second", "needle"), [
    (Running("x", SAVED_WHOLE), Running("y", SAVED_WHOLE), "runs one adapter at a time"),
    (LORA, IA3, "IA3 adapter 'i' cannot run together with LoRA adapter 'l'"),
    (DORA, IA3, "IA3 adapter 'i' cannot run together with DoRA adapter 'd'"),
    (LOHA, IA3, "IA3 adapter 'i' cannot run together with LoHa adapter 'h'"),
    (Running("t", TOKEN_ROWS, rows=(3,)), IA3, "IA3 adapter 'i' cannot run together"),
    (OFT, LORA, "cannot run together with \\['l'\\]"),
    (OFT, BOFT, "cannot run together with each other"),
    (DORA, LOHA, "DoRA adapter 'd' cannot run together with LoHa adapter 'h'"),
    (DORA, LOKR, "with LoKr adapter 'k'"),
    (DORA, ADALORA, "with AdaLoRA adapter 'a'"),
    (DORA, VERA, "with VeRA adapter 'v'"),
    (DORA, VBLORA, "DoRA adapter 'd' cannot run together with VB-LoRA adapter 'vb'"),
    (VBLORA, IA3, "IA3 adapter 'i' cannot run together with VB-LoRA adapter 'vb'"),
    (VBLORA, OFT, "OFT adapters \\['o'\\] cannot run together with \\['vb'\\]"),
    (VBLORA, Running("r", "ROAD"), "ROAD adapters \\['r'\\] cannot run together with \\['vb'\\]"),
    (VBLORA, Running("hr", "HRA"), "HRA adapters \\['hr'\\] cannot run together with \\['vb'\\]"),
    (VBLORA, Running("m", "MISS"), "MiSS adapter 'm' cannot run together with VB-LoRA adapter 'vb'"),
    (DORA, DELORA, "DoRA adapter 'd' cannot run together with DeLoRA adapter 'de'"),
    (DELORA, IA3, "IA3 adapter 'i' cannot run together with DeLoRA adapter 'de'"),
    (DELORA, BOFT, "BOFT adapters \\['b'\\] cannot run together with \\['de'\\]"),
    (DELORA, Running("hr", "HRA"), "HRA adapters \\['hr'\\] cannot run together with \\['de'\\]"),
    (DELORA, Running("m", "MISS"), "MiSS adapter 'm' cannot run together with DeLoRA adapter 'de'"),
    (DORA, BEFT, "DoRA adapter 'd' cannot run together with BEFT adapter 'be'"),
    (BEFT, IA3, "IA3 adapter 'i' cannot run together with BEFT adapter 'be'"),
    (BEFT, Running("r", "ROAD"), "ROAD adapters \\['r'\\] cannot run together with \\['be'\\]"),
    (BEFT, Running("c", "C3A"), "C3A adapter 'c' cannot run together with BEFT adapter 'be'"),
    (Running("t", TOKEN_ROWS, rows=(1, 5, 7)), Running("u", TOKEN_ROWS, rows=(11, 7, 5)), "rows \\[5, 7\\]"),
])
def test_refused_in_either_order_naming_the_module(first: Running, second: Running, needle: str) -> None:
    for running in ([first, second], [second, first]):
        refusal = mix_refusal("model.layers.0.q_proj", running)
        assert refusal is not None and refusal.key == "model.layers.0.q_proj" and refusal.hint
        assert "'model.layers.0.q_proj'" in refusal.message
        assert re.search(needle, refusal.message), refusal.message


@pytest.mark.parametrize("running", [
    [LORA, DORA], [DORA, LORA], [LORA, LOHA, LOKR, ADALORA, VERA], [IA3, IA3_B],
    [VBLORA, VBLORA_B], [VBLORA, LORA, LOHA, LOKR, ADALORA, VERA], [LORA, VBLORA], [OFT, Running("o2", "OFT")],
    [DELORA, DELORA_B], [DELORA, LORA, LOHA, LOKR, ADALORA, VERA, VBLORA],
    [BEFT, BEFT_B], [BEFT, LORA, LOHA, LOKR, ADALORA, VERA, VBLORA, DELORA],
    [Running("t", TOKEN_ROWS, rows=(1, 5, 7)), Running("u", TOKEN_ROWS, rows=(2, 9))],
    [Running("t", TOKEN_ROWS, rows=(1,)), LORA, DORA], [DORA], [Running("x", SAVED_WHOLE)], [],
])
def test_defined_mixes_run(running: list[Running]) -> None:
    assert mix_refusal("q_proj", running) is None


C3A, C3A_B = Running("c", "C3A"), Running("c2", "C3A")  # SPEC.md 17.7


@pytest.mark.parametrize("other", [LORA, DORA, LOHA, LOKR, ADALORA, VERA, VBLORA, IA3, OFT, BOFT, Running("r", "ROAD"),
                                   Running("hr", "HRA"), Running("m", "MISS"), Running("x", SAVED_WHOLE),
                                   Running("t", TOKEN_ROWS, rows=(3,)), C3A_B])
def test_c3a_runs_alone(other: Running) -> None:
    """C3A runs with no other method on a layer (PEFT: one method per layer) and with no second C3A adapter (PEFT's
    forward chains them: measured unmerged vs merged 8e-4 on a Llama q_proj), in either order."""
    for running in ([C3A, other], [other, C3A]):
        refusal = mix_refusal("model.layers.0.q_proj", running)
        assert refusal is not None and refusal.key == "model.layers.0.q_proj" and refusal.hint
        assert ("C3A" in refusal.message or "'c'" in refusal.message) and "'model.layers.0.q_proj'" in refusal.message
    assert mix_refusal("q_proj", [C3A]) is None
