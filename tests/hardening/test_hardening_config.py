"""Hostile adapter configs: generated JSON of every shape, wrong types, huge and non-finite numbers,
deep nesting, unknown methods, unicode tricks, invalid regular expressions and regex bombs.

``AdapterConfig.from_dict`` / ``from_file`` / ``validate_config`` and ``read_adapter`` must end in a
``ConfigError`` (or ``FileFormatError`` for what is not JSON) naming the field -- or accept a config
that then writes and reads back identically.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hardening_harness import SCALE, STATS, expect_clean, long_mode_extra, probe
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import adapterspec
from adapterspec import AdapterConfig, ConfigError, FileFormatError
from adapterspec.config import load_schema, validate_config

pytestmark = pytest.mark.filterwarnings("ignore::adapterspec.AdapterSpecWarning")

METHODS = ["LORA", "IA3", "PREFIX_TUNING", "PROMPT_TUNING", "LOHA", "LOKR"]
BAD_METHODS = ["", "lora", "ADALORA", "VERA", "LORA ", "L\u039fRA", None, 5, ["LORA"], {"x": "LORA"}]


def _fields() -> list[str]:
    schema = load_schema()
    names = set(schema["properties"])
    for method in METHODS:
        names |= set(schema["$defs"][method].get("properties", {}))
    return sorted(names)


FIELDS = _fields()
PATHS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head", "a" * 300, "", "x.\u202eq",
         "model.layers.0.self_attn.q_proj\n", "../../etc/q_proj"]

_atoms = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(2**70), 2**70), st.sampled_from([0, 1, -1, 2**63, 2**64, -(2**64), 10**30]),
    st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, 5e-324, -0.0]),
    st.text(max_size=12), st.sampled_from(["q_proj", "(a+)+$", "a(b", ".*", "all-linear", "\ud800", "../x", "\x00", "LORA"]),
)
_json = st.recursive(_atoms, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                     max_leaves=12)
_configs = st.builds(
    lambda method, fields, extra: {**({"peft_type": method} if method is not None else {}), **fields, **extra},
    st.one_of(st.sampled_from(METHODS), st.sampled_from(BAD_METHODS)),
    st.dictionaries(st.sampled_from(FIELDS), _json, max_size=6),
    st.dictionaries(st.text(max_size=10), _json, max_size=2),
)


def _check_accepted(cfg: AdapterConfig, tmp: Path) -> None:
    """An accepted config is usable: it matches paths without error, and writes and reads back equal."""
    for path in PATHS:
        cfg.matches(path)
    tmp.write_text(cfg.to_json(), "utf-8")
    again = AdapterConfig.from_file(tmp)
    assert again == AdapterConfig.from_dict(json.loads(cfg.to_json())), "write/read round trip changed the config"


@settings(max_examples=400 * SCALE, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=_configs)
def test_generated_configs(data: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = _scratch(tmp_path_factory) / "adapter_config.json"
    label = f"config {repr(data)[:200]}"
    outcome = probe(label + ":from_dict", lambda: AdapterConfig.from_dict(data))
    outcomes = [outcome, probe(label + ":validate_config", lambda: validate_config(data))]
    if outcome.kind == "typed":
        assert isinstance(outcome.error, ConfigError), outcome.error
        assert outcome.error.pointer is not None, f"{outcome.error!r} names no field"
    elif outcome.kind == "ok":
        outcomes.append(probe(label + ":use", lambda: _check_accepted(outcome.value, tmp)))
    # the same config as a file, NaN and Infinity written as JSON constants
    try:
        text = json.dumps(data)
    except (TypeError, ValueError):
        text = None
    if text is not None:
        tmp.write_text(text, "utf-8")
        from_file = probe(label + ":from_file", lambda: AdapterConfig.from_file(tmp))
        outcomes.append(from_file)
        if from_file.kind == "typed":
            assert isinstance(from_file.error, (ConfigError, FileFormatError)), from_file.error
            assert str(tmp) in str(from_file.error), f"{from_file.error!r} names no file"
    STATS.count("config-generated")
    expect_clean(outcomes)


_SCRATCH: dict[str, Path] = {}


def _scratch(factory: pytest.TempPathFactory) -> Path:
    if "d" not in _SCRATCH:
        import atexit
        import tempfile

        from hardening_harness import scratch_root

        root = scratch_root()
        _SCRATCH["d"] = Path(tempfile.mkdtemp(prefix="adapterspec-hardening-", dir=root)) if root else factory.mktemp("cfg")
        atexit.register(shutil.rmtree, _SCRATCH["d"], True)
    return _SCRATCH["d"]


def _nested(depth: int, leaf: object = 1) -> object:
    value: object = leaf
    for _ in range(depth):
        value = [value]
    return value


def _nested_dicts(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _cycle() -> dict:
    cyclic: dict = {"peft_type": "LORA", "target_modules": ["q"]}
    cyclic["auto_mapping"] = cyclic
    return cyclic


BASE = {"peft_type": "LORA", "target_modules": ["q"], "r": 2}
DICT_CASES = {
    "not a mapping (list)": ([BASE], ""),
    "not a mapping (str)": ("LORA", ""),
    "no peft_type": ({"target_modules": ["q"]}, ""),
    "100k nested lists in target_modules": ({**BASE, "target_modules": _nested(100_000)}, "/target_modules"),
    "100k nested lists in an unknown field": ({**BASE, "x_custom": _nested(100_000)}, "/x_custom"),
    "100k nested dicts in auto_mapping": ({**BASE, "auto_mapping": _nested_dicts(100_000)}, "/auto_mapping"),
    "cyclic dict": (_cycle(), "/auto_mapping"),
    "NaN lora_alpha": ({**BASE, "lora_alpha": math.nan}, "/lora_alpha"),
    "inf lora_alpha": ({**BASE, "lora_alpha": math.inf}, "/lora_alpha"),
    "NaN lora_dropout": ({**BASE, "lora_dropout": math.nan}, "/lora_dropout"),
    "NaN in an unknown field": ({**BASE, "x": [1, math.nan]}, "/x/1"),
    "r = 2**64": ({**BASE, "r": 2**64}, "/r"),
    "r = 10**5000": ({**BASE, "r": 10**5000}, "/r"),
    "r = 0": ({**BASE, "r": 0}, "/r"),
    "r = -3": ({**BASE, "r": -3}, "/r"),
    "r = true": ({**BASE, "r": True}, "/r"),
    "r = '8'": ({**BASE, "r": "8"}, "/r"),
    "r = 2.5": ({**BASE, "r": 2.5}, "/r"),
    "non-string key": ({**BASE, 3: "x"}, ""),
    "bytes value": ({**BASE, "x": b"\x00"}, "/x"),
    "set value": ({**BASE, "target_modules": {"q"}}, "/target_modules"),
    "object value": ({**BASE, "x": object()}, "/x"),
    "rank_pattern value 0": ({**BASE, "rank_pattern": {"q": 0}}, "/rank_pattern/q"),
    "rank_pattern value NaN": ({**BASE, "rank_pattern": {"q": math.nan}}, "/rank_pattern/q"),
    "target_modules empty string": ({**BASE, "target_modules": ""}, "/target_modules"),
    "unknown method": ({**BASE, "peft_type": "NOT_A_PEFT_METHOD"}, "/peft_type"),  # ADALORA is recognised since 1.1
    "method lower case": ({**BASE, "peft_type": "lora"}, "/peft_type"),
    "method homoglyph": ({**BASE, "peft_type": "L\u039fRA"}, "/peft_type"),
    "version 2.0": ({**BASE, "adapterspec_version": "2.0"}, "/adapterspec_version"),
    "version int": ({**BASE, "adapterspec_version": 1}, "/adapterspec_version"),
}
DICT_CASES["version with newline"] = ({**BASE, "adapterspec_version": "1.0\n"}, "/adapterspec_version")

REGEX_FIELDS = {  # field -> (bad value builder, pointer)
    "target_modules": (lambda p: p, "/target_modules"),
    "exclude_modules": (lambda p: p, "/exclude_modules"),
    "layers_pattern": (lambda p: [p], "/layers_pattern/0"),
    "modules_to_save": (lambda p: [p], "/modules_to_save/0"),
    "rank_pattern": (lambda p: {p: 4}, "/rank_pattern/"),
    "alpha_pattern": (lambda p: {p: 4}, "/alpha_pattern/"),
}
BAD_REGEXES = {  # refused: Python cannot compile them, or they have no linear-time matching
    "unbalanced": "q_proj(",
    "bad escape": "q\\",
    "bad repeat": "*q",
    "huge repeat": "q{99999999999}",
    "bad group name": "(?P<1>q)",
    "10k nested groups": "(" * 10_000 + "q" + ")" * 10_000,
    "backreference": "(q)\\1",
    "atomic group": "(?>q*)q",
    "possessive repeat": "q*+q",
    "20k-state repeat": "(?:q{100}){1000}",
}
#: Backtracking bombs for re, which adapterspec matches in linear time: accepted, and never slow. The
#: first passed the old structural check and ran for minutes (10 groups: 3.4 s per match, 11: 13.8 s).
REGEX_BOMBS = {
    "16 overlapping classes": "[a-z0-9._]*" * 16 + "X",
    "nested quantifier": "(a+)+$",
    "nested star": "(.*)*q_proj",
    "nested with separator": "(\\w+\\.)*q_proj",
    "ambiguous alternation": "(a|a)*b",
    "ambiguous prefix": "(q|q_proj)*x",
    "repeat of repeat, bounded outer": "(.*a){20}",
    "polynomial wildcards": ".*.*.*.*.*x",
    "polynomial classes": "\\w+\\w+\\w+\\w+x",
    "lookahead in a loop": "(?:(?!X).)*X",
}
#: Module paths that make re backtrack on the bombs (long, every character in their classes).
BOMB_PATHS = ["a" * 60, "a." * 30, "model.layers.0." + "q_proj" * 10, "a" * 1000]


@pytest.mark.parametrize("case", sorted(DICT_CASES))
def test_crafted_config_dicts(case: str) -> None:
    data, pointer = DICT_CASES[case]
    outcome = probe(case, lambda: AdapterConfig.from_dict(data))
    STATS.count("config-crafted")
    expect_clean([outcome], allow_ok=False)
    assert isinstance(outcome.error, ConfigError), repr(outcome.error)
    assert outcome.error.pointer == pointer or (pointer and (outcome.error.pointer or "").startswith(pointer)), \
        f"{case}: pointer {outcome.error.pointer!r}, expected {pointer!r} ({outcome.error})"


@pytest.mark.parametrize("regex", sorted(BAD_REGEXES))
@pytest.mark.parametrize("field", sorted(REGEX_FIELDS))
def test_bad_regex_is_a_config_error_at_its_field(field: str, regex: str) -> None:
    build, pointer = REGEX_FIELDS[field]
    data = {"peft_type": "LORA", "target_modules": ["q_proj"], "r": 2, field: build(BAD_REGEXES[regex])}
    if field == "layers_pattern":
        data["layers_to_transform"] = [0]  # the schema allows layers_pattern only with it
    if (field, regex) in (("layers_pattern", "bad escape"), ("layers_pattern", "bad repeat"),
                          ("modules_to_save", "bad repeat")):
        # spliced into PEFT's wrapping ('q\\\.(?P<idx>...', '(?:^|.*?\\.)*q...'), a valid pattern
        assert AdapterConfig.from_dict(data)
        return
    outcome = probe(f"{field}={regex}", lambda: AdapterConfig.from_dict(data), seconds=5)
    STATS.count("config-regex")
    expect_clean([outcome], allow_ok=False)
    assert isinstance(outcome.error, ConfigError)
    assert (outcome.error.pointer or "").startswith(pointer), f"{outcome.error.pointer} vs {pointer}"


def test_regex_bomb_in_a_file_with_matching_keys(tmp_path: Path) -> None:
    """A bomb in the config of a folder whose keys would trigger it: refused fast, naming the field."""
    key = "base_model.model." + "a" * 60 + ".lora_A.weight"
    adapterspec.write_adapter(tmp_path / "ok", {"peft_type": "LORA", "target_modules": ["q"], "r": 2},
                              {"base_model.model.l.q.lora_A.weight": np.ones((2, 3), np.float32),
                               "base_model.model.l.q.lora_B.weight": np.ones((4, 2), np.float32)})
    outcomes = []
    for name, regex in BAD_REGEXES.items():
        folder = Path(shutil.copytree(tmp_path / "ok", tmp_path / f"bomb{len(outcomes)}"))
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["target_modules"] = regex
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        from safetensors.numpy import save_file

        save_file({key: np.ones((2, 3), np.float32)}, str(folder / "adapter_model.safetensors"))
        outcome = probe(f"bomb {name}", lambda: adapterspec.read_adapter(folder), seconds=5)
        outcomes.append(outcome)
        assert outcome.kind == "typed" and outcome.error.pointer == "/target_modules", (name, outcome.error)
        assert "adapter_config.json" in str(outcome.error)
    STATS.count("config-regex", len(outcomes))
    expect_clean(outcomes, allow_ok=False)


@pytest.mark.parametrize("bomb", sorted(REGEX_BOMBS))
@pytest.mark.parametrize("field", sorted(REGEX_FIELDS))
def test_regex_bombs_are_accepted_and_matched_in_bounded_time(field: str, bomb: str) -> None:
    """Every regex-bearing field: the config is valid (PEFT accepts it), and matching long paths with it
    ends well inside the deadline -- by construction (a linear-time matcher), not by a budget."""
    build, _ = REGEX_FIELDS[field]
    data = {"peft_type": "LORA", "target_modules": ["q_proj"], "r": 2, field: build(REGEX_BOMBS[bomb])}
    if field == "layers_pattern":
        data["layers_to_transform"] = [0]
    outcome = probe(f"{field}={bomb}", lambda: AdapterConfig.from_dict(data), seconds=5)
    expect_clean([outcome])
    assert outcome.kind == "ok", outcome.error
    cfg = outcome.value
    for path in BOMB_PATHS:
        answer = probe(f"{field}={bomb} on {path[:20]}", lambda: (cfg.matches(path + ".q_proj"), cfg.rank_for(path)),
                       seconds=5)
        expect_clean([answer])
        assert answer.kind == "ok", answer.error
    STATS.count("regex-budget", 1 + len(BOMB_PATHS))


def test_regex_bomb_as_a_rank_pattern_key_through_write_validate_and_read(tmp_path: Path) -> None:
    """The reported case: ``write_adapter`` / ``validate`` / ``read_adapter`` with the bomb as a rank_pattern key
    and module paths it backtracks on ran for over 60 s; now they finish, and the bomb (which matches no path)
    leaves every module at r."""
    from adapterspec.cli import main

    modules = [f"model.layers.{i}.self_attn.q_proj" + "_long" * 8 for i in range(20)]
    config = {"peft_type": "LORA", "target_modules": ["q_proj" + "_long" * 8], "r": 2,
              "rank_pattern": {REGEX_BOMBS["16 overlapping classes"]: 4}}
    tensors = {}
    for i, module in enumerate(modules):
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.full((2, 3), i, np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.full((4, 2), i, np.float32)
    calls = {
        "write": lambda: adapterspec.write_adapter(tmp_path / "a", config, tensors),
        "validate": lambda: adapterspec.validate_adapter(tmp_path / "a"),
        "cli": lambda: main(["validate", str(tmp_path / "a")]),
        "read": lambda: adapterspec.read_adapter(tmp_path / "a"),
    }
    outcomes = {name: probe(f"bomb rank_pattern {name}", call, seconds=5) for name, call in calls.items()}
    expect_clean(list(outcomes.values()))
    assert outcomes["validate"].value == [] and outcomes["cli"].value == 0
    adapter = outcomes["read"].value
    assert [adapter.config.rank_for(m) for m in modules] == [2] * len(modules)
    STATS.count("regex-budget", len(calls))


def test_accepted_regexes_stay_usable() -> None:
    """Patterns seen in real PEFT configs are accepted, and match as PEFT does."""
    real = {
        r".*\.(q_proj|v_proj)": ("model.layers.0.self_attn.q_proj", True),
        r"^(?!.*vision_tower).*(q_proj|k_proj)$": ("vision_tower.layers.0.q_proj", False),
        r".*decoder.*(self_attn|encoder_attn).*(q_proj|v_proj)$": ("model.decoder.layers.1.self_attn.v_proj", True),
        r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj": ("model.layers.12.self_attn.k_proj", True),
        r"model\.layers\.\d+\.mlp\.experts\.\d+\.\w+": ("model.layers.1.mlp.experts.7.up_proj", True),
    }
    for regex, (path, expected) in real.items():
        cfg = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": regex})
        assert cfg.matches(path) is expected, regex
    STATS.count("config-regex", len(real))


# -- config files ---------------------------------------------------------------------------
TEXT_CASES = {
    "NaN constant": '{"peft_type": "LORA", "target_modules": ["q"], "lora_alpha": NaN}',
    "Infinity constant": '{"peft_type": "LORA", "target_modules": ["q"], "lora_alpha": Infinity}',
    "-Infinity constant": '{"peft_type": "LORA", "target_modules": ["q"], "lora_alpha": -Infinity}',
    "1e999 overflows to inf": '{"peft_type": "LORA", "target_modules": ["q"], "lora_alpha": 1e999}',
    "10**5000 digits": '{"peft_type": "LORA", "target_modules": ["q"], "r": 1' + "0" * 5000 + "}",
    "100k nested lists": '{"peft_type": "LORA", "target_modules": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "900 nested lists": '{"peft_type": "LORA", "target_modules": ["q"], "x": ' + "[" * 900 + "]" * 900 + "}",
    "empty": "",
    "whitespace": "  \n",
    "null": "null",
    "list": '[{"peft_type": "LORA"}]',
    "string": '"LORA"',
    "trailing garbage": '{"peft_type": "LORA", "target_modules": ["q"]} x',
    "trailing comma": '{"peft_type": "LORA", "target_modules": ["q"],}',
    "single quotes": "{'peft_type': 'LORA'}",
    "comment": '{"peft_type": "LORA", /* c */ "target_modules": ["q"]}',
    "BOM": "\ufeff" + '{"peft_type": "LORA", "target_modules": ["q"]}',
    "lone surrogate in target": '{"peft_type": "LORA", "target_modules": ["\\ud800"]}',
    "NUL in target": '{"peft_type": "LORA", "target_modules": ["q\\u0000"]}',
    "RTL override in method": '{"peft_type": "\\u202eARO L", "target_modules": ["q"]}',
    "duplicate peft_type": '{"peft_type": "LORA", "peft_type": "NOPE", "target_modules": ["q"]}',
    "backreference in target_modules": '{"peft_type": "LORA", "target_modules": "(a)\\\\1"}',
    "invalid regex in rank_pattern": '{"peft_type": "LORA", "target_modules": ["q"], "rank_pattern": {"q(": 2}}',
}
BYTE_CASES = {
    "non-UTF8": b'{"peft_type": "LORA", "target_modules": ["\xff"]}',
    "UTF-16": '{"peft_type": "LORA", "target_modules": ["q"]}'.encode("utf-16"),
    "binary": bytes(range(256)),
    "NUL bytes": b"\x00" * 64,
}


@pytest.mark.parametrize("case", sorted(TEXT_CASES) + sorted(BYTE_CASES))
def test_crafted_config_files(tmp_path: Path, case: str) -> None:
    path = tmp_path / "adapter_config.json"
    if case in BYTE_CASES:
        path.write_bytes(BYTE_CASES[case])
    else:
        path.write_text(TEXT_CASES[case], "utf-8", errors="surrogatepass")
    outcome = probe(case, lambda: AdapterConfig.from_file(path))
    STATS.count("config-file-crafted")
    if case in ("lone surrogate in target", "NUL in target"):  # odd but valid JSON strings: accepted, usable
        expect_clean([outcome])
        if outcome.kind == "ok":
            outcome.value.matches("model.q_proj")
            json.loads(outcome.value.to_json())
        return
    expect_clean([outcome], allow_ok=False)
    assert isinstance(outcome.error, (ConfigError, FileFormatError)), repr(outcome.error)
    assert str(path) in str(outcome.error)


def test_config_truncation_and_flips(good_adapter: Path, scratch: Path) -> None:
    """Every truncation and byte flip of a real written config: a typed error or a valid config."""
    raw = (good_adapter / "adapter_config.json").read_bytes()
    path = scratch / "adapter_config.json"
    outcomes = []
    variants = [raw[:cut] for cut in range(len(raw))]
    for at in range(len(raw)):
        for flip in (0x01, 0x80, 0x20):
            mutated = bytearray(raw)
            mutated[at] ^= flip
            variants.append(bytes(mutated))
    variants += long_mode_extra(raw, len(variants), seed=3)
    for i, blob in enumerate(variants):
        path.write_bytes(blob)
        outcome = probe(f"config variant {i}", lambda: AdapterConfig.from_file(path))
        outcomes.append(outcome)
        if outcome.kind == "typed":
            assert str(path) in str(outcome.error)
    STATS.count("config-file-mutation", len(variants))
    expect_clean(outcomes)
    assert all(o.kind == "typed" for o in outcomes[: len(raw) - 2]), "a truncated config was accepted"


def test_regex_bombs_through_torch_inject_and_load(tmp_path: Path) -> None:
    """``inject_adapter`` and ``load_adapter`` match every module of the model against the config: with
    the bomb as target_modules and as a rank_pattern key, on module names it backtracks on, they finish."""
    torch = pytest.importorskip("torch")
    name = "a" * 60
    model = torch.nn.ModuleDict({name: torch.nn.ModuleDict({"q_proj": torch.nn.Linear(3, 4)}),
                                 "b" * 60: torch.nn.Linear(3, 4)})
    bomb = REGEX_BOMBS["16 overlapping classes"]
    config = {"peft_type": "LORA", "r": 2, "target_modules": f"(?:{bomb})|{name}\\.q_proj",
              "rank_pattern": {bomb: 4}}
    outcome = probe("bomb inject", lambda: adapterspec.inject_adapter(model, config), seconds=5)
    expect_clean([outcome])
    assert outcome.value == [f"{name}.q_proj"]
    saved = probe("bomb save", lambda: adapterspec.save_adapter(model, tmp_path / "a"), seconds=5)
    expect_clean([saved])
    adapterspec.delete_adapter(model, "default")
    loaded = probe("bomb load", lambda: adapterspec.load_adapter(model, tmp_path / "a"), seconds=5)
    expect_clean([loaded])
    assert loaded.value == [f"{name}.q_proj"]
    assert adapterspec.read_adapter(tmp_path / "a").tensors[
        f"base_model.model.{name}.q_proj.lora_A.weight"].shape == (2, 3)  # the bomb matched no module: r
    STATS.count("regex-budget", 3)


@pytest.mark.parametrize(("field", "wrap"), [("block_size_pattern", "C3A"), ("lambda_pattern", "DELORA")])
def test_regex_bombs_as_lazily_matched_pattern_keys_finish(field: str, wrap: str) -> None:
    """C3A's ``block_size_pattern`` and DeLoRA's ``lambda_pattern`` keys are matched only where a module reaches them
    (PEFT's lazy ``re.match``), outside the config check's regex pass: each bomb as a key, on every path it backtracks
    on, finishes (``re`` took 2.6 s on an 18-character path for ``(.|.|.)*Z`` and ran past 60 s on a module name)."""
    from adapterspec import _c3a, _delora

    outcomes = []
    for label, bomb in {**REGEX_BOMBS, "alternation star": "(.|.|.)*Z"}.items():
        config = {"peft_type": wrap, field: {bomb: 2}}
        call = _c3a.block_size_for if wrap == "C3A" else _delora.lambda_for
        for path in BOMB_PATHS:
            outcomes.append(probe(f"{field} {label}", lambda c=config, p=path: call(c, p), seconds=5))
    expect_clean(outcomes)
    assert all(o.kind == "ok" for o in outcomes), [o for o in outcomes if o.kind != "ok"][:3]
    STATS.count("regex-budget", len(outcomes))
