"""Target matching and rank/alpha patterns answer as PEFT's rules (SPEC.md 4.3, 4.4), prepared once per config."""

from __future__ import annotations

import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import adapterspec
from adapterspec.targets import PatternTable, Targeting, layer_index, module_matches, pattern_value


def spec_is_targeted(config: dict[str, Any], name: str) -> bool:
    """SPEC.md 4.3's ``is_targeted``, verbatim (on re)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith("." + e) for e in exclude):
            return False
    for m in config.get("modules_to_save") or []:
        if re.match(rf"(^|.*\.){m}($|\..*)", name):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    layers = None if config.get("peft_type") == "IA3" else config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = config.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if match:
                break
    if match is None or match["idx"] is None:  # PEFT: int(None) raises (an unbracketed "h|layers")
        return False
    index = int(match["idx"])
    return index == layers if isinstance(layers, int) else index in layers


SEGMENTS = ["model", "layers", "h", "0", "1", "12", "self_attn", "q_proj", "v_proj", "mlp", "up_proj", "vision"]
PATHS = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6).map(".".join)
NAMES = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=2).map(".".join)
REGEXES = st.sampled_from([r".*\.(q_proj|v_proj)", r"^(?!.*vision).*q_proj", r"model\.layers\.\d+\..*", r".*\.1\d*\..*",
                           r"(.*\.)*q_proj", r"[a-z_.0-9]*[a-z_.0-9]*proj", "q_proj|v_proj", r"\w+"])
CONFIGS = st.fixed_dictionaries({"target_modules": st.one_of(st.lists(NAMES, max_size=4), REGEXES)}, optional={
    "exclude_modules": st.one_of(st.lists(NAMES, max_size=2), REGEXES, st.just("")),
    "modules_to_save": st.lists(st.sampled_from(["mlp", "up_proj", "h", "layers.1", "v.*"]), max_size=2),
    "layers_to_transform": st.one_of(st.integers(0, 12), st.lists(st.sampled_from([0, 1, 12]), max_size=2)),
    "layers_pattern": st.one_of(st.sampled_from(["layers", "h", "", "layers|h", "(?:layers|h)", r"\w+", "1"]),
                                st.lists(st.sampled_from(["layers", "h", "h|layers"]), max_size=2)),
})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=CONFIGS, paths=st.lists(PATHS, min_size=1, max_size=8))
@example(config={"target_modules": ["model.layers.0.q_proj"], "layers_to_transform": [1]},
         paths=["model.layers.0.q_proj"])  # an exact entry ignores layers_to_transform (PEFT); ours applied it
def test_targeting_equals_the_spec(config: dict[str, Any], paths: list[str]) -> None:
    targeting = Targeting(config)
    for path in paths:
        assert targeting.matches(path) == spec_is_targeted(config, path), (config, path)
        assert module_matches(config, path) == spec_is_targeted(config, path), (config, path)


def test_an_exact_entry_ignores_layers_to_transform_as_peft_does() -> None:
    from peft.tuners.tuners_utils import check_target_module_exists

    config = {"target_modules": ["model.layers.0.q_proj", "v_proj"], "layers_to_transform": [1],
              "layers_pattern": None, "exclude_modules": None, "modules_to_save": None, "target_parameters": None}
    peft_config = SimpleNamespace(**config)
    for path in ("model.layers.0.q_proj", "model.layers.0.v_proj", "model.layers.1.v_proj", "x.model.layers.0.q_proj"):
        assert module_matches(config, path) == bool(check_target_module_exists(peft_config, path)), path
    cfg = adapterspec.AdapterConfig.from_dict({"peft_type": "LORA", **{k: v for k, v in config.items() if v is not None}})
    assert cfg.matches("model.layers.0.q_proj")


KEYS = st.one_of(
    st.lists(st.sampled_from(["a", "b", "_", "0", ".", "q", "proj"]), min_size=1, max_size=5).map("".join),
    st.sampled_from([r"q_proj|v_proj", r"layers\.0\..*", r"^a\..*", r"[ab]+", r"\d", r"(?i:A)", "q$", r"a\.b"]),
)
PATTERN_PATHS = st.one_of(PATHS, st.text(alphabet="ab_0.q\n", max_size=10))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys=st.lists(KEYS, max_size=8, unique=True), paths=st.lists(PATTERN_PATHS, min_size=1, max_size=8))
@example(keys=["q", "a.q", "b"], paths=["a.q", "a.q\n", "x\n.a.q", "aq", "xa.q", "a\nq"])
def test_pattern_table_equals_the_first_matching_key(keys: list[str], paths: list[str]) -> None:
    patterns = {key: i for i, key in enumerate(keys)}
    table = PatternTable(patterns)
    for path in paths:
        expected = next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", path)), None)
        assert table.value(path, default=None) == expected, (patterns, path)
        assert pattern_value(patterns, path, default=None) == expected


class CountingList(list):  # type: ignore[type-arg]
    """A list that counts how often it is scanned (iterated or searched)."""

    scans = 0

    def __iter__(self) -> Iterator[Any]:
        CountingList.scans += 1
        return super().__iter__()

    def __contains__(self, item: object) -> bool:
        CountingList.scans += 1
        return super().__contains__(item)


class CountingDict(dict):  # type: ignore[type-arg]
    scans = 0

    def items(self) -> Any:
        CountingDict.scans += 1
        return super().items()


def test_a_config_is_prepared_once_not_per_module() -> None:
    """20k target_modules x 30k modules was quadratic (a list scan per module), as was a 2,000-key rank_pattern
    (every key tried per module, past re's cache of 512 compiled patterns): counted, not timed."""
    modules = [f"model.layers.{i}.mlp.experts.{j}.up_proj" for i in range(10) for j in range(100)]
    data = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": CountingList(modules),
            "rank_pattern": CountingDict({f"model.layers.{i}.mlp.experts.{j}.up_proj": 1 + j % 7
                                          for i in range(10) for j in range(100)})}
    cfg = adapterspec.AdapterConfig(data)
    CountingList.scans = CountingDict.scans = 0
    assert all(cfg.matches(m) for m in modules)
    assert [cfg.rank_for(m) for m in modules] == [1 + j % 7 for _ in range(10) for j in range(100)]
    assert CountingList.scans <= 2 and CountingDict.scans <= 1  # the shared memo's key, the set; per module: 2,000


def test_layer_index_with_a_pattern_takes_re_s_match() -> None:
    assert layer_index("model.layers.3.h.5.q", "layers") == 3
    assert layer_index("model.layers.3.h.5.q", "h") == 5
    assert layer_index("model.layers.3.h.5.q", ["nothing", "h"]) == 5
    assert layer_index("x.a.1.2.y", r"(?:a|a\.1)") == 1  # re's priorities: the first alternative that leads on
    assert layer_index("x.a.1.2.y", r"(?:a\.1|a)") == 2
    assert layer_index("x.a.1.2.y", r"a|a\.1") is None  # spliced unbracketed: a match without the index


def test_a_valid_adapter_is_never_refused_for_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2,000-key rank_pattern on a slow machine was refused after a 30 s budget ("took over 30 s"); matching
    is linear now and has no clock. Simulated: every clock reading jumps 100 s."""
    import itertools
    import time

    from adapterspec.checks import TensorInfo, tensor_errors

    modules = [f"model.layers.{i}.self_attn.q_proj" for i in range(2000)]
    cfg = adapterspec.AdapterConfig.from_dict({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"],
                                                "rank_pattern": {m: 1 + i % 4 for i, m in enumerate(modules)}})
    infos = {}
    for i, module in enumerate(modules):
        infos[f"base_model.model.{module}.lora_A.weight"] = TensorInfo((1 + i % 4, 16), "F32")
        infos[f"base_model.model.{module}.lora_B.weight"] = TensorInfo((32, 1 + i % 4), "F32")
    clock = itertools.count(0, 100)
    monkeypatch.setattr(time, "monotonic", lambda: float(next(clock)))
    assert tensor_errors(cfg, infos) == []


@pytest.mark.parametrize(("layers", "matched"), [(1.0, [1]), ([0.0, 2.0], [0, 2]), (1e300, [])])
def test_layers_to_transform_written_as_integral_floats(layers: object, matched: list[int]) -> None:
    """JSON's ``1.0`` is the integer 1 (the schema's ``integer`` takes it); ``1e300`` names no layer. Hypothesis
    found ``1e300`` crashing the matcher with an untyped TypeError."""
    config = adapterspec.AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q"],
                                                  "layers_to_transform": layers})
    assert [i for i in range(4) if config.matches(f"model.layers.{i}.q")] == matched


def _spec_is_targeted() -> Any:
    """SPEC.md 4.3's ``is_targeted``, executed from the spec's own code block."""
    from pathlib import Path

    spec = (Path(__file__).resolve().parents[2] / "spec" / "v1" / "SPEC.md").read_text("utf-8")
    code = spec.split("### 4.3 ", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "SPEC.md 4.3", "exec"), namespace)  # noqa: S102 - our own spec
    return namespace["is_targeted"]


@pytest.mark.parametrize("method", ["LORA", "IA3", "LOHA", "LOKR"])
def test_the_spec_code_selects_what_peft_selects_for_each_method(method: str) -> None:
    """layers_to_transform restricts LoRA, LoHa and LoKr to its layers; IA3's PEFT config has no such field (it is
    dropped as unknown, SPEC 2.5), so IA3 adapts every layer -- SPEC 4.3's code applied it to IA3 too."""
    import warnings

    from peft import PeftConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    data: dict[str, Any] = {"peft_type": method, "target_modules": ["q", "k"], "layers_to_transform": [1],
                            "layers_pattern": "layers"}
    if method == "IA3":
        data["feedforward_modules"] = ["k"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT and the SDK warn of IA3's unknown field
        peft_config = PeftConfig.from_peft_type(**data)
        config = adapterspec.AdapterConfig.from_dict(data)
    is_targeted = _spec_is_targeted()
    names = [f"model.layers.{i}.{m}" for i in (0, 1, 2) for m in ("q", "k", "v")]
    peft_selects = [n for n in names if check_target_module_exists(peft_config, n)]
    assert [n for n in names if is_targeted(data, n)] == peft_selects
    assert [n for n in names if config.matches(n)] == peft_selects
    assert peft_selects == ([f"model.layers.{i}.{m}" for i in (0, 1, 2) for m in ("q", "k")] if method == "IA3"
                            else ["model.layers.1.q", "model.layers.1.k"])
