"""Which adapters may run together on one layer (SPEC.md 8.9): one rule for every backend.

A backend describes each layer's running adapters as :class:`Running` entries and asks :func:`mix_refusal`
whenever a set of adapters is about to run together -- activated (``set_active_adapters``) or merged
(``merge_adapters``) -- so that a refused set changes nothing. Adapters of different layers never interact.

>>> mix_refusal("q_proj", [Running("a", "LORA"), Running("b", "LOHA")]) is None
True
>>> mix_refusal("q_proj", [Running("a", "LORA"), Running("b", "IA3")]).key
'q_proj'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from .errors import UnsupportedError, shorten

__all__ = ["SAVED_WHOLE", "TOKEN_ROWS", "Running", "mix_refusal"]

#: The method of a :class:`Running` entry that is an adapter's copy of a module saved whole (``modules_to_save``,
#: LN tuning's copies).
SAVED_WHOLE = "MODULES_TO_SAVE"

#: The method of a :class:`Running` entry that replaces rows of an embedding matrix (the ``TRAINABLE_TOKENS``
#: method, LoRA's ``trainable_token_indices``).
TOKEN_ROWS = "TRAINABLE_TOKENS"

_NAMES = {"LORA": "LoRA", "LOHA": "LoHa", "LOKR": "LoKr", "ADALORA": "AdaLoRA", "VERA": "VeRA", "ROAD": "RoAd",
          "MISS": "MiSS", "VBLORA": "VB-LoRA", "GRALORA": "GraLoRA", "DELORA": "DeLoRA", "C3A": "C3A", "BEFT": "BEFT",
          SAVED_WHOLE: "modules_to_save", TOKEN_ROWS: "trainable-tokens"}
_ROTATIONS = ("OFT", "BOFT", "ROAD", "HRA")  # rotations: PEFT holds one method per layer, no PeftMixedModel
_ALONE = ("MISS", "GRALORA", "C3A")  # methods PEFT runs on no layer with another method (SPEC.md 17.2, 17.5, 17.7)
_SINGLE = ("C3A",)  # methods whose PEFT forward chains two adapters of the method on one layer (SPEC.md 17.7)
_ADDED = ("LORA", "LOHA", "LOKR", "ADALORA", "VERA", "VBLORA", "DELORA",
          "BEFT")  # methods that add a term to the layer's output (BEFT: a bias, SPEC.md 17.8)


class Running(NamedTuple):
    """One adapter running on one layer.

    :param name: the adapter.
    :param method: its ``peft_type`` on this layer, :data:`SAVED_WHOLE` or :data:`TOKEN_ROWS`.
    :param dora: a LoRA with ``use_dora``.
    :param rows: :data:`TOKEN_ROWS`: the rows it replaces.
    """

    name: str
    method: str
    dora: bool = False
    rows: tuple[int, ...] = ()


def _label(entry: Running) -> str:
    """``LoHa adapter 'b'``: the method as PEFT's docs write it, and the adapter."""
    return f"{'DoRA' if entry.dora else _NAMES.get(entry.method, entry.method)} adapter {entry.name!r}"


def mix_refusal(path: str, running: Sequence[Running]) -> UnsupportedError | None:
    """The refusal of the adapters ``running`` together on the layer at ``path``, or ``None`` when their result is
    defined (PEFT 0.21.2's, where PEFT runs them together: SPEC.md 8.9). Refused:

    * two copies of one module saved whole: one runs at a time (PEFT: "Only one adapter can be set at a time");
    * OFT/BOFT/RoAd/HRA with another method, or two of them together (PEFT holds one method per layer; its
      ``PeftMixedModel`` takes no BOFT, RoAd or HRA);
    * MiSS or GraLoRA with another method (PEFT's ``PeftModel`` refuses adapters of different methods and its
      ``PeftMixedModel`` takes neither);
    * C3A with another method (as MiSS), or two C3A adapters together: PEFT 0.21.2's C3A forward feeds each active
      adapter's term into the next one (its loop reassigns ``x``), so its unmerged result is no sum of the adapters
      and differs from its merged one (and fails where the layer's input and output sizes differ);
    * IA3 with another method: PEFT's ``PeftModel`` refuses adapters of different methods and its
      ``PeftMixedModel`` takes no IA3 (no defined result: a merge in one order differed from the unmerged output);
    * DoRA with another method that adds a term (LoHa, LoKr, AdaLoRA, VeRA, VB-LoRA, DeLoRA,
      BEFT): DoRA rescales what ran
      before it on the layer, and PEFT's ``PeftMixedModel`` nests its layers in load order and merges the outermost first, so its
      unmerged result depends on the load order and its merged one differs from it (LoRA and DoRA adapters together
      are one PEFT layer, applied in the active order: allowed);
    * two adapters replacing one row of an embedding matrix (PEFT refuses: "would result in undefined merging
      behavior"); disjoint rows compose.

    >>> mix_refusal("lm_head", [Running("a", SAVED_WHOLE), Running("b", SAVED_WHOLE)]).message[:40]
    "adapters 'a' and 'b' both hold a copy of"
    >>> mix_refusal("e", [Running("a", TOKEN_ROWS, rows=(1, 5)), Running("b", TOKEN_ROWS, rows=(5, 9))]) is None
    False
    >>> mix_refusal("e", [Running("a", TOKEN_ROWS, rows=(1, 5)), Running("b", TOKEN_ROWS, rows=(2, 9))]) is None
    True
    """
    if len(running) < 2:
        return None
    for check in (_copies, _rotations, _alone, _single, _ia3, _dora, _rows):
        refusal = check(path, running)
        if refusal is not None:
            return refusal
    return None


def _copies(path: str, running: Sequence[Running]) -> UnsupportedError | None:
    copies = [entry.name for entry in running if entry.method == SAVED_WHOLE]
    if len(copies) < 2:
        return None
    return UnsupportedError(
        f"adapters {copies[0]!r} and {copies[1]!r} both hold a copy of {path!r} (saved whole: modules_to_save or LN "
        "tuning), and a module saved whole runs one adapter at a time (PEFT 0.21 refuses more: 'Only one adapter can "
        "be set at a time')", key=path,
        hint=f"activate one of {copies} (set_active_adapters), or train one adapter that saves {path!r}")


def _rotations(path: str, running: Sequence[Running]) -> UnsupportedError | None:
    found = [entry for entry in running if entry.method in _ROTATIONS]
    methods = sorted({entry.method for entry in found})
    others = [entry.name for entry in running if entry.method not in _ROTATIONS]
    if not found or (not others and len(methods) < 2):
        return None
    return UnsupportedError(
        f"{', '.join(methods)} adapters {[e.name for e in found]} cannot run together with {others or 'each other'} "
        f"on {path!r} (PEFT holds one method per layer)", key=path,
        hint="activate the rotation adapters without other methods' adapters on this layer (set_active_adapters)")


def _alone(path: str, running: Sequence[Running]) -> UnsupportedError | None:
    found = next((entry for entry in running if entry.method in _ALONE), None)
    other = next((entry for entry in running if found is not None and entry.method != found.method), None)
    if found is None or other is None:
        return None
    return UnsupportedError(
        f"{_label(found)} cannot run together with {_label(other)} on {path!r} (PEFT holds one method per layer: its "
        f"PeftModel refuses adapters of different methods and its PeftMixedModel takes no {found.method})", key=path,
        hint=f"activate {found.name!r} and {other.name!r} apart (set_active_adapters)"
             + ("" if found.method in _SINGLE else "; adapters of one method run together"))


def _single(path: str, running: Sequence[Running]) -> UnsupportedError | None:
    found = [entry for entry in running if entry.method in _SINGLE]
    if len(found) < 2:
        return None
    return UnsupportedError(
        f"{_label(found[0])} cannot run together with {_label(found[1])} on {path!r}: PEFT 0.21.2's {found[0].method} "
        "forward feeds each active adapter's term into the next one, so its unmerged result differs from its merged "
        "one (and fails where the layer's input and output sizes differ)", key=path,
        hint=f"activate {found[0].name!r} and {found[1].name!r} apart (set_active_adapters), or combine them into one "
             "adapter (their kernels add: delta is linear in c3a_kernel)")


def _ia3(path: str, running: Sequence[Running]) -> UnsupportedError | None:
    ia3 = next((entry for entry in running if entry.method == "IA3"), None)
    other = next((entry for entry in running if entry.method != "IA3"), None)
    if ia3 is None or other is None:
        return None
    return UnsupportedError(
        f"IA3 adapter {ia3.name!r} cannot run together with {_label(other)} on {path!r} (PEFT holds one method per "
        "layer: its PeftModel refuses adapters of different methods and its PeftMixedModel takes no IA3, so the "
        "result is not defined)", key=path,
        hint=f"activate {ia3.name!r} and {other.name!r} apart (set_active_adapters); IA3 adapters run together")


def _dora(path: str, running: Sequence[Running]) -> UnsupportedError | None:
    dora = next((entry for entry in running if entry.dora), None)
    other = next((entry for entry in running if entry.method in _ADDED and entry.method != "LORA"), None)
    if dora is None or other is None:
        return None
    return UnsupportedError(
        f"{_label(dora)} cannot run together with {_label(other)} on {path!r}: DoRA rescales what ran before it on "
        "the layer, and PEFT's PeftMixedModel nests the layers in load order and merges the outermost first (its "
        "result depends on the load order, its merged model differs from its unmerged one)", key=path,
        hint=f"activate {dora.name!r} and {other.name!r} apart (set_active_adapters); DoRA runs together with LoRA "
             "adapters, and with other methods' adapters on other layers")


def _rows(path: str, running: Sequence[Running]) -> UnsupportedError | None:
    owner: dict[int, str] = {}
    for entry in running:
        if entry.method != TOKEN_ROWS:
            continue
        shared = sorted({row for row in entry.rows if row in owner})
        if shared:
            first = owner[shared[0]]
            return UnsupportedError(
                f"adapters {first!r} and {entry.name!r} both replace rows {shorten(shared)} of {path!r} (trainable "
                "tokens): which one's rows run would depend on the order (PEFT refuses: 'undefined merging "
                "behavior')", key=path,
                hint=f"activate {first!r} and {entry.name!r} apart (set_active_adapters); adapters replacing "
                     "disjoint rows run together")
        owner.update((row, entry.name) for row in entry.rows)
    return None
