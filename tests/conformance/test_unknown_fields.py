"""SPEC.md 2.5: a field the method's schema does not know MUST NOT change the computation.

Every numeric case is run again with the fields other methods act on (``use_rslora``, ``use_dora``,
``layers_to_transform``, ``alpha_pattern``, ...) added to its config wherever its own method does not know
them, each at a value that would change the outputs if it acted; PEFT drops such fields when it loads the
config, and the expected outputs (computed by PEFT without them) must still come out. LoHa with
``use_rslora`` scaled by ``alpha / sqrt(r)`` and IA3 with ``layers_to_transform`` adapted one layer before
this was enforced.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest

from adapterspec.config import load_schema
from adapterspec.conformance import Corpus, Status, load_corpus, run_case

#: A value per field that changes the outputs of a method that knows the field.
ACTING: dict[str, Any] = {
    "use_dora": True, "use_rslora": True, "fan_in_fan_out": True, "lora_bias": True, "bias": "all",
    "layers_to_transform": [1], "layers_pattern": "nope", "rank_pattern": {"q_proj": 1, "conv": 1},
    "alpha_pattern": {".*": 97.0}, "lora_alpha": 997, "alpha": 997, "r": 1, "init_weights": False,
    "decompose_both": True, "use_effective_conv2d": True, "target_parameters": ["q_proj.weight"],
    "trainable_token_indices": [0], "exclude_modules": ".*", "feedforward_modules": ".*",
    "use_cayley_neumann": True, "num_cayley_neumann_terms": 1, "block_share": True, "coft": True, "eps": 0.5,
    "oft_block_size": 2, "boft_block_size": 2, "boft_block_num": 0, "boft_n_butterfly_factor": 2,
    "layer_replication": [[0, 1]], "d_initial": 0.5, "projection_prng_key": 7, "save_projection": False,
    "alora_invocation_tokens": [1], "num_virtual_tokens": 3, "token_dim": 4, "init_r": 3, "target_r": 2,
    "ensure_weight_tying": True, "embedding_modules": ["q_proj"], "target_modules": ".*",
}


def _foreign(method: str) -> dict[str, Any]:
    """The :data:`ACTING` fields that ``method``'s schema does not know (and some other method does)."""
    schema = load_schema()
    top = set(schema["properties"])
    by_method = {name: set(d.get("properties", {})) | top for name, d in schema["$defs"].items()}
    anywhere = set().union(*by_method.values())
    return {k: v for k, v in ACTING.items() if k in anywhere and k not in by_method[method]}


@pytest.fixture(scope="module")
def with_foreign_fields(tmp_path_factory: pytest.TempPathFactory, corpus: Corpus) -> Corpus:
    """A copy of the corpus whose numeric configs carry every field their method does not know."""
    root = tmp_path_factory.mktemp("corpus") / "v1"
    shutil.copytree(corpus.root, root)
    copy = load_corpus(root)
    for case in copy.cases:
        if case.kind == "numeric":
            path = case.adapter / "adapter_config.json"
            data = json.loads(path.read_text())
            path.write_text(json.dumps({**data, **_foreign(data["peft_type"])}))
    return copy


def _implementation(name: str) -> Any:
    if name == "torch":
        pytest.importorskip("torch")
        from adapterspec_torch.conformance import TorchImplementation
        return TorchImplementation()
    if name == "keras":
        pytest.importorskip("keras")
        from adapterspec_keras.conformance import KerasImplementation
        return KerasImplementation()
    from adapterspec.conformance.reference_impl import ReferenceImplementation
    return ReferenceImplementation()


def test_the_copy_carries_foreign_fields(with_foreign_fields: Corpus) -> None:
    configs = {c.name: json.loads((c.adapter / "adapter_config.json").read_text())
               for c in with_foreign_fields.cases if c.kind == "numeric"}
    assert configs["numeric/loha-linear-f32"]["use_rslora"] is True
    assert configs["numeric/ia3-linear-f32"]["layers_to_transform"] == [1]
    assert "use_rslora" not in _foreign("LORA") and "alpha" not in _foreign("LOHA")
    assert sum(bool(_foreign(c["peft_type"])) for c in configs.values()) == len(configs)


@pytest.mark.parametrize("name", ["reference", "torch", "keras"])
def test_fields_a_method_does_not_know_change_no_output(with_foreign_fields: Corpus, tmp_path: Path,
                                                         name: str) -> None:
    impl = _implementation(name)
    allowed = {Status.PASSED} | ({Status.UNSUPPORTED} if name == "reference" else set())  # BF16 without ml_dtypes
    failures = {}
    count = 0
    for case in with_foreign_fields.cases:
        if case.kind != "numeric":
            continue
        work = tmp_path / case.name.replace("/", "_")
        work.mkdir()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the unknown-fields note
            result = run_case(impl, case, work)
        count += 1
        if result.status not in allowed:
            failures[case.name] = f"{result.status.value}: {result.message}"
    assert count >= 70
    assert failures == {}
